"""The failures a careless or hostile user found on a816bd4, each now refused at once, recorded, or
true (issue "Nothing silent, nothing late, nothing doubled"). Every test here failed on that code.

The programs run as a user runs them: a subprocess, random demo weights, small images.
"""
import csv
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
DEMO = Path(demo_root())
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--noprogress", "--platform=cpu"]
FOLDER = FAST + ["--class_name=hazelnut", "--batch_size=2"]


def run(module, *args, timeout=600, env=None, code=None):
  cmd = [sys.executable, "-m", module, *args] if code is None else [sys.executable, "-c", code, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_error(p, code, *needles):
  """Exit code, a single `error:` line naming what is wrong, no traceback."""
  assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  for n in needles:
    assert n in errors[0], (n, errors[0])
  return errors[0]


def scores(out):
  with open(out / "scores.csv") as f:
    return {r["path"]: r for r in csv.DictReader(f)}


@pytest.fixture()
def images(tmp_path):
  """Four demo images as a flat folder."""
  d = tmp_path / "images"
  d.mkdir()
  for p in sorted((DEMO / "hazelnut" / "test" / "colour").glob("*.jpg"))[:4]:
    shutil.copy(p, d / p.name)
  return d


# Checked late, and non-finite numbers: every flag before any work.


@pytest.mark.parametrize("flag,needle", [("--map_range=1,0", "LO < HI"),
                                         ("--map_range=abc", "'LO,HI'"),
                                         ("--seed=-1", "--seed -1"),
                                         ("--categories=", "--categories"),
                                         ("--report_fpr=nan", "--report_fpr nan")])
def test_benchmark_flags_are_checked_before_any_work(tmp_path, flag, needle):
  out = tmp_path / "out"
  p = run("eval.mvtec", f"--data_root={DEMO}", f"--out={out}", *FAST, flag, timeout=120)
  one_error(p, 2, needle)
  assert "RANDOM WEIGHTS" not in p.stdout and not out.exists()


@pytest.mark.parametrize("flag", ["--threshold=nan", "--threshold=inf", "--pixel_threshold=-inf",
                                  "--max_fpr=nan"])
def test_non_finite_numbers_are_refused(images, tmp_path, flag):
  out = tmp_path / "out"
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, flag, timeout=120)
  one_error(p, 2, flag.split("=")[0])
  assert not out.exists()


def test_bench_flags_are_checked(tmp_path):
  for flag, needle in (("--batch_sizes=0", "--batch_sizes"), ("--dtypes=float8", "float8")):
    out = tmp_path / "bench.json"
    p = run("eval.bench", "--platform=cpu", "--model=tiny", "--image_size=56", flag,
            f"--out={out}", timeout=120)
    one_error(p, 2, needle)
    assert not out.exists()


# Images whose header reads but whose body is cut short.


def truncated(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def test_a_truncated_image_fails_before_the_model_loads(images, tmp_path):
  truncated(images / "01.jpg")
  p = run("eval.folder", f"--images={images}", f"--out={tmp_path / 'out'}", *FOLDER)
  one_error(p, 1, "01.jpg")
  assert "RANDOM WEIGHTS" not in p.stdout                   # before the model


@pytest.mark.parametrize("fmt", ["jpg", "bmp"])
def test_a_skipped_truncated_image_is_recorded_once(images, tmp_path, fmt):
  """JPEG: found by the up-front check; BMP: only when decoded, and recorded the same way."""
  name = f"02.{fmt}"
  Image.open(images / "02.jpg").save(images / name)
  if fmt != "jpg":
    (images / "02.jpg").unlink()
  truncated(images / name, 0.6)
  out = tmp_path / "out"
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--skip_bad_images")
  assert p.returncode == 0, p.stderr[-3000:]
  with open(out / "skipped.csv") as f:
    skipped = list(csv.DictReader(f))
  assert [r["path"] for r in skipped] == [name]
  assert json.loads((out / "run.json").read_text())["skipped"] == 1
  assert sum(name in line for line in p.stderr.splitlines()) == 1, p.stderr   # warned once
  assert name not in scores(out) and len(scores(out)) == 3


# Two writers, output inside input, empty selections.


def test_two_runs_into_one_out_do_not_both_write(images, tmp_path):
  out = tmp_path / "out"
  args = ["eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--overwrite"]
  first = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (out / "run.json").exists():
    time.sleep(0.1)
  second = run(*args)
  first.communicate(timeout=600)
  assert first.returncode == 0
  one_error(second, 2, "in use by another run")
  assert sorted(scores(out)) == sorted(p.name for p in images.iterdir())
  assert json.loads((out / "run.json").read_text())["scored"] == 4


def test_out_inside_images_is_not_scored(images):
  out = images / "out"
  for extra in ([], ["--overwrite"]):
    p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--recursive", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(scores(out)) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]


# Temporary files and full disks.


def test_convert_into_a_folder_is_refused_before_converting(hf_clip_dir, tmp_path):
  folder = tmp_path / "weights"
  folder.mkdir()
  p = run("weights.convert", f"--src={hf_clip_dir}", f"--out={folder}", timeout=300)
  one_error(p, 2, "is a folder")
  assert list(tmp_path.rglob("*.tmp")) == [] and list(folder.iterdir()) == []


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
  code = ("import errno, os, sys\n"
          "def full(fd): raise OSError(errno.ENOSPC, 'No space left on device')\n"
          "os.fsync = full\n"
          "import runpy\n"
          "sys.argv = ['eval.mvtec'] + sys.argv[1:]\n"
          "runpy.run_module('eval.mvtec', run_name='__main__')\n")
  out = tmp_path / "out"
  p = run(None, f"--data_root={DEMO}", f"--out={out}", *FAST, code=code)
  one_error(p, 1, "No space left on device", str(out))
  assert [f for f in out.rglob("*") if f.name.endswith(".tmp")] == []


# Bytes that are not UTF-8.


def test_a_flagfile_that_is_not_utf8_is_one_line(tmp_path):
  flagfile = tmp_path / "run.flags"
  flagfile.write_bytes(b"--mu=0.5\n--lam=\xff\xfe\n")
  p = run("eval.mvtec", f"--data_root={DEMO}", f"--out={tmp_path / 'out'}", *FAST,
          f"--flagfile={flagfile}", timeout=120)
  one_error(p, 2, str(flagfile), "UTF-8")


def test_a_log_with_bytes_that_are_not_utf8_resumes(images, tmp_path):
  out = tmp_path / "out"
  assert run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER).returncode == 0
  want = scores(out)
  log = out / "scores.log.csv"
  log.write_bytes(log.read_bytes().replace(b"03.jpg", b"03\xff.jpg"))     # the last batch torn
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--resume")
  assert p.returncode == 0, p.stderr[-3000:]
  assert scores(out) == want


# Resume notices content, and says what this session did.


def test_resume_rescores_an_image_replaced_under_its_name(images, tmp_path):
  out, fresh = tmp_path / "out", tmp_path / "fresh"
  assert run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER).returncode == 0
  time.sleep(0.01)
  shutil.copy(images / "00.jpg", images / "03.jpg")        # another part under the old name
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--resume")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "changed since they were scored" in p.stdout
  assert run("eval.folder", f"--images={images}", f"--out={fresh}", *FOLDER).returncode == 0
  assert scores(out)["03.jpg"]["score"] == scores(fresh)["03.jpg"]["score"]


def test_the_rate_of_a_resumed_session_counts_its_own_images(images, tmp_path):
  out = tmp_path / "out"
  assert run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER).returncode == 0
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER, "--resume")
  assert p.returncode == 0
  assert "scored 4 image(s), 0 in this session (0.00 img/s this session)" in p.stdout


# Silently accepted nonsense.


def test_nonsense_is_refused(images, tmp_path):
  Image.new("RGB", (1, 1)).save(images / "dot.png")
  p = run("eval.folder", f"--images={images}", f"--out={tmp_path / 'a'}", *FOLDER, timeout=120)
  one_error(p, 1, "dot.png", "1x1")
  (images / "dot.png").unlink()
  for flag, needle in (("--image_size=14", "1 x 1 patch grid"), ("--r_list=1,3,99", "r = 99"),
                       (f"--class_name={'part ' * 300}", "characters")):
    args = [a for a in FOLDER if not (flag.startswith("--image_size") and a.startswith("--image_size"))]
    p = run("eval.folder", f"--images={images}", f"--out={tmp_path / 'b'}", *args, flag,
            timeout=120)
    one_error(p, 2, needle)


def test_hidden_files_and_dangling_links_are_counted(images, tmp_path):
  (images / ".DS_Store").write_bytes(b"\0")
  os.symlink(tmp_path / "nowhere.png", images / "gone.png")
  out = tmp_path / "out"
  p = run("eval.folder", f"--images={images}", f"--out={out}", *FOLDER)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads((out / "run.json").read_text())["ignored_files"] == 2


# Words that were not true.


def test_help_and_records_say_what_the_folder_scorer_does(images, tmp_path):
  p = run("eval.folder", "--help", timeout=60)
  lines = p.stdout.splitlines()
  seed_help = lines[next(i for i, l in enumerate(lines) if l.startswith("  --seed ")) + 1]
  assert "shuffle" not in seed_help and "k_shot" in seed_help, seed_help
  assert "with --save_maps" not in p.stdout
  out, good = tmp_path / "out", tmp_path / "good"
  shutil.copytree(DEMO / "hazelnut" / "test" / "good", good)
  assert run("eval.folder", f"--images={images}", f"--normal_images={good}", "--k_shot=2",
             "--seed=7", f"--out={out}", *FOLDER).returncode == 0
  assert json.loads((out / "run.json").read_text())["identity"]["seed"] == 7
