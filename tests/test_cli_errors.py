"""Fail fast, lose nothing: every bad flag, file or situation ends with one `error:` line and the
right exit code (2 usage, 1 data / machine), before the model loads and with nothing written.

Each case was run against the code before this change and failed there (see the change's note).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fiseclip_jax.data import demo_root

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--batch_size=8", "--noprogress",
        "--platform=cpu"]


def run(module, *args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


def assert_one_line(p, code, *needles):
  """Exit code, a single `error:` line naming what is wrong, no traceback."""
  assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  for n in needles:
    assert n in errors[0], (n, errors[0])
  return errors[0]


@pytest.fixture()
def demo_copy(tmp_path):
  root = tmp_path / "mvtec"
  shutil.copytree(Path(demo_root()) / "hazelnut", root / "hazelnut")
  return root


@pytest.mark.parametrize("flag,needle", [
    ("--batch_size=0", "--batch_size 0"),
    ("--batch_size=-3", "--batch_size -3"),
    ("--batch_size=1", "--batch_size 1"),
    ("--image_size=17", "--image_size 17"),
    ("--pair_chunk=0", "--pair_chunk"),
    ("--r_list=2", "--r_list"),
    ("--feature_layers=6,30", "--feature_layers"),
    ("--proxy_layer=25", "--proxy_layer"),
    ("--mu=5", "--mu"),
    ("--lam=-1", "--lam"),
    ("--sigma=-2", "--sigma"),
    ("--topk_frac=0", "--topk_frac"),
    ("--num_devices=0", "--num_devices 0"),
    ("--num_devices=64", "--num_devices 64"),
    ("--categories=hazelnut,", "--categories"),
    ("--categories=screw", "screw"),
    ("--references=bank", "--references bank"),
    ("--k_shot=-1", "--k_shot"),
    ("--no_such_flag", "no_such_flag"),
])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, flag, needle):
  out = tmp_path / "out"
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST, flag)
  assert_one_line(p, 2, needle)
  assert not (out / "results.json").exists()


def test_first_error_comes_fast(tmp_path):
  """A bad flag is reported before JAX or the model start (the note gives the time measured)."""
  t = time.perf_counter()
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path}", *FAST, "--mu=5")
  seconds = time.perf_counter() - t
  assert_one_line(p, 2, "--mu")
  print(f"first error after {seconds:.2f} s")
  assert "RANDOM WEIGHTS" not in p.stdout             # the model was never set up


def test_out_under_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path / 'file' / 'out'}", *FAST)
  assert_one_line(p, 2, "--out")


def test_wrong_size_mask_is_found_before_scoring(demo_copy, tmp_path):
  mask = sorted((demo_copy / "hazelnut" / "ground_truth" / "colour").iterdir())[-1]
  Image.new("L", (10, 10)).save(mask)
  out = tmp_path / "out"
  p = run("eval.mvtec", f"--data_root={demo_copy}", f"--out={out}", *FAST, "--skip_bad_images")
  assert_one_line(p, 1, mask.name, "same size")
  assert "cpu device" not in p.stdout and "RANDOM WEIGHTS" not in p.stdout + p.stderr   # no model
  assert not (out / "results.json").exists()


def test_unreadable_image_header_is_found_before_scoring(demo_copy, tmp_path):
  bad = sorted((demo_copy / "hazelnut" / "test" / "good").iterdir())[0]
  bad.write_bytes(b"not an image")
  out = tmp_path / "out"
  p = run("eval.mvtec", f"--data_root={demo_copy}", f"--out={out}", *FAST)
  assert_one_line(p, 1, bad.name)
  assert "RANDOM WEIGHTS" not in p.stdout
  # Skipped under the flag, and listed in results.json.
  p = run("eval.mvtec", f"--data_root={demo_copy}", f"--out={out}", *FAST, "--skip_bad_images")
  assert p.returncode == 0, p.stderr[-2000:]
  cat = json.loads((out / "results.json").read_text())["categories"]["hazelnut"]
  assert cat["n_images"] == 22 and [Path(s).name for s in cat["skipped"]] == [bad.name]
  assert bad.name in p.stderr


def test_resume_refuses_other_settings_and_touches_nothing(tmp_path):
  out = tmp_path / "out"
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST)
  assert p.returncode == 0, p.stderr[-2000:]
  before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST, "--resume", "--mu=0.5",
          "--batch_size=4")
  line = assert_one_line(p, 2, "--resume", "batch_size", "mu")
  assert "0.57" in line and "0.5" in line
  assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
  # The same settings resume (nothing left to do).
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST, "--resume")
  assert p.returncode == 0 and "done earlier" in p.stdout


def test_earlier_run_is_not_mixed_with_a_new_one(tmp_path):
  out = tmp_path / "out"
  assert run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST).returncode == 0
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST, "--mu=0.5")
  assert_one_line(p, 2, "--out", "--resume", "--overwrite")


def test_corrupt_results_json_is_reported_not_overwritten(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text('{"categories": {"hazelnut": ')
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={out}", *FAST, "--resume")
  assert_one_line(p, 1, "results.json")
  assert (out / "results.json").read_text() == '{"categories": {"hazelnut": '


def test_full_disk_is_one_line(tmp_path):
  """Writing the results fails with ENOSPC: one line, exit 1."""
  code = ("import errno, sys\n"
          "import fiseclip_jax.outputs.files as r\n"
          "def full(path, *a, **k): raise OSError(errno.ENOSPC, 'No space left on device', path)\n"
          "r.atomic_write = full\n"
          "from fiseclip_jax.cli import evaluate\n"
          "evaluate.mvtec_main(sys.argv)\n")
  p = subprocess.run([sys.executable, "-c", code, f"--data_root={demo_root()}", f"--out={tmp_path}",
                      *FAST], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert_one_line(p, 1, "No space left on device")


def test_gpu_platform_without_a_gpu_says_what_to_install(tmp_path):
  import jax
  if any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("this machine has a GPU")
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path}",
          *[a for a in FAST if not a.startswith("--platform")], "--platform=gpu")
  assert_one_line(p, 1, "--platform gpu", "pip install")


def test_gpu_platform_starts_on_a_cuda_machine_without_rocm(monkeypatch):
  """`--platform gpu` leaves the choice to JAX and checks it found a GPU: JAX 0.11 reads a literal
  jax_platforms="gpu" as cuda AND rocm and fails on a CUDA machine without ROCm (seen on an H200,
  2026-12-04: every program stopped at "Unable to initialize backend 'rocm'")."""
  import jax
  from absl import flags
  from fiseclip_jax.cli import options, runtime
  if "platform" not in flags.FLAGS:
    options.define_platform_flag()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  monkeypatch.setattr(flags.FLAGS, "platform", "gpu")
  asked = []

  def update(name, value):
    assert name == "jax_platforms", name
    asked.append(value)

  def local_devices():   # this fake JAX has CUDA and no ROCm
    if asked and asked[-1] not in ("", "cuda"):
      raise RuntimeError(f"Unable to initialize backend for jax_platforms={asked[-1]!r}")
    return ["cuda:0"]

  monkeypatch.setattr(jax.config, "update", update)
  monkeypatch.setattr(jax, "local_devices", local_devices)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert runtime.start() == "gpu"


def test_help_lists_the_programs_flags_and_exits_0():
  for module, own in (("eval.mvtec", "--k_shot"), ("eval.folder", "--normal_images"),
                      ("eval.btad", "--class_name"), ("weights.convert", "--src")):
    p = run(module, "--help")
    assert p.returncode == 0, (module, p.stderr[-2000:])
    assert own in p.stdout and "--batch_size" in p.stdout or module == "weights.convert"
    assert "Try --helpfull" not in p.stdout


def test_runs_print_no_lines_that_read_like_errors(tmp_path):
  """Without --platform JAX probes for a TPU, and without PyTorch transformers complains: neither
  is an error for these programs, so neither is printed."""
  code = ("import runpy, sys\n"
          "sys.modules['torch'] = None\n"                  # as on a machine without PyTorch
          "sys.argv = ['eval.mvtec'] + sys.argv[1:]\n"
          "runpy.run_module('eval.mvtec', run_name='__main__')\n")
  args = [a for a in FAST if not a.startswith("--platform")]
  p = subprocess.run([sys.executable, "-c", code, f"--data_root={demo_root()}", f"--out={tmp_path}",
                      *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  for noise in ("Unable to initialize backend", "PyTorch was not found", "None of PyTorch"):
    assert noise not in p.stdout + p.stderr


def test_fi_weights_on_another_patch_grid(demo_copy, tmp_path):
  """SeCLIP's mask must lie on FiCLIP's grid: a DINOv2 with 16 px patches beside the demo CLIP's 14
  (7 x 7 against 8 x 8 at 112 px) is a usage error before the model loads."""
  import fiseclip_jax as fj
  cfg = fj.Dinov2Config.tiny(patch_size=16, image_size=64)
  weights = tmp_path / "dinov2_p16.safetensors"
  fj.save_checkpoint(str(weights), fj.init_params(cfg, 0), cfg)
  p = run("eval.mvtec", f"--data_root={demo_copy}", f"--out={tmp_path / 'o'}", f"--fi_weights={weights}",
          "--feature_layers=1,2,3,4", *FAST)
  assert_one_line(p, 2, "--fi_weights", "patch grid (8)", "(7)")
  assert not (tmp_path / "o").exists()
