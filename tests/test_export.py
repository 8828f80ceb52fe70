"""The exported program (fiseclip-export, deploy/export.py): run in a fresh process that has jax
and numpy but not this package, it gives the predictor's scores and maps on the same resized
inputs; multi-platform exports serialize and run on CPU; streams and bad platforms are refused
with one line."""
import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.data import demo_root, preprocess
from fiseclip_jax.deploy import export as export_lib
from fiseclip_jax.deploy.predictor import Predictor
from fiseclip_jax.models.clip.config import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
SIZE, B = 112, 4
TOL = 1e-5
DEMO = VARIANTS["demo"]
IMAGES = sorted(glob.glob(os.path.join(demo_root(), "hazelnut", "test", "*", "*.jpg")))
assert len(IMAGES) >= 9, IMAGES
GOOD = sorted(glob.glob(os.path.join(demo_root(), "hazelnut", "test", "good", "*.jpg")))

# The child: no site (so no editable-install finder of this package), jax and numpy from the
# venv's site-packages only; it runs the sidecar's own snippet, then the program on saved inputs.
CHILD = """
import importlib.util, json, sys
assert importlib.util.find_spec("fiseclip_jax") is None, "fiseclip_jax is importable"
meta = json.load(open("model.jaxexport.json"))
exec(meta["python"])                                   # the README's lines, as written
import numpy as np
for name in sys.argv[1:]:
  x = np.load(name + ".images.npy")
  images = np.zeros((b, s, s, 3), np.float32)
  images[:len(x)] = x
  scores, maps = program.call(images, np.arange(b) < len(x))
  np.save(name + ".scores.npy", np.asarray(scores)[:len(x)])
  np.save(name + ".maps.npy", np.asarray(maps)[:len(x)])
"""


def conf(**kw):
  return FiSeConfig(image_size=SIZE, feature_layers=DEMO.feature_layers,
                    proxy_layer=DEMO.proxy_layer, **kw)


def run_export(*args):
  return subprocess.run([sys.executable, "-m", "eval.export", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def assert_one_line(p, code, *needles):
  assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  for n in needles:
    assert n in errors[0], (n, errors[0])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A bank bundle (3 known-good images, B = 4) exported for cpu by the program."""
  d = tmp_path_factory.mktemp("export")
  p = Predictor.build(class_name="hazelnut", conf=conf(references="bank"), cfg=DEMO.config,
                      model_name="demo", normal_images=GOOD[:3], batch_size=B, threshold=0.35,
                      pixel_threshold=0.4)
  p.save(str(d / "x.bundle"))
  out = d / "model.jaxexport"
  r = run_export(d / "x.bundle", "--out", out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert str(out) in r.stdout and str(out) + ".json" in r.stdout
  queries = [x for x in IMAGES if x not in GOOD[:3]]
  x = np.stack([preprocess.load_image(f, SIZE) for f in queries[:B + 2]])   # (6, S, S, 3)
  return p, d, out, x


def test_fresh_process_gives_the_predictors_scores_and_maps(made):
  p, d, out, x = made
  batches = {"full": x[:B], "short": x[B:]}                  # B valid, then 2 valid of B
  for name, xs in batches.items():
    np.save(d / f"{name}.images.npy", xs)
  env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"],
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-S", "-c", CHILD, *batches], cwd=d, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  for name, xs in batches.items():
    want_scores, want_maps = p.score_resized(xs)
    scores, maps = np.load(d / f"{name}.scores.npy"), np.load(d / f"{name}.maps.npy")
    assert scores.shape == (len(xs),) and maps.shape == (len(xs), SIZE, SIZE)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=TOL)
    np.testing.assert_allclose(maps, want_maps, rtol=0, atol=TOL)
  assert np.ptp(want_maps) > 10 * TOL          # the maps differ across pixels: a real comparison


def test_sidecar_says_shapes_rule_and_thresholds(made):
  p, _, out, _ = made
  meta = json.loads(Path(str(out) + ".json").read_text())
  assert meta["inputs"][0]["shape"] == [B, SIZE, SIZE, 3] and meta["inputs"][1]["dtype"] == "bool"
  assert meta["outputs"][1]["shape"] == [B, SIZE, SIZE]
  assert meta["thresholds"]["image"] == p.image_threshold == 0.35
  assert meta["thresholds"]["pixel"] == 0.4 and meta["references"] == "bank"
  assert meta["platforms"] == ["cpu"] and meta["attention_impl"] == "blocked"
  assert "bicubic" in meta["resize"] and 'open("model.jaxexport", "rb")' in meta["python"]
  assert 3.5 < out.stat().st_size / meta["constants"] < 4.5     # float32 constants, ~4 B each


def test_multi_platform_export_serializes_and_runs_on_cpu(made):
  import jax  # the test process's own JAX: the export's call is on CPU here
  p, _, _, x = made
  e = export_lib.export(p, ["cpu", "cuda"], batch_size=3)
  assert e.meta["attention_impl"] == "xla" and e.meta["platforms"] == ["cpu", "cuda"]
  program = jax.export.deserialize(bytearray(e.program))
  assert program.platforms == ("cpu", "cuda")
  scores, maps = program.call(x[:3], np.ones(3, bool))
  want_scores, want_maps = p.score_resized(x[:3])
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(maps), want_maps, rtol=0, atol=TOL)


def test_cudnn_is_refused_for_other_platforms(made):
  p, _, _, _ = made
  with pytest.raises(export_lib.ExportError, match="cudnn"):
    export_lib.attention_for(p.conf.replace(attention_impl="cudnn"), ("cpu", "cuda"))
  assert export_lib.attention_for(p.conf.replace(compute_dtype="bfloat16"), ("cuda",)) == "cudnn"


def test_rolling_bundle_is_refused_with_one_line(tmp_path):
  p = Predictor.build(class_name="hazelnut", conf=conf(stream_window=2), cfg=DEMO.config,
                      model_name="demo", batch_size=B)
  p.save(str(tmp_path / "r.bundle"))
  r = run_export(tmp_path / "r.bundle", "--out", tmp_path / "r.jaxexport")
  assert_one_line(r, 1, "--references rolling")
  assert not (tmp_path / "r.jaxexport").exists()


def test_bad_platform_is_refused_at_flag_parsing(tmp_path):
  r = run_export(tmp_path / "none.bundle", "--out", tmp_path / "o", "--platforms", "cpu,gpu")
  assert_one_line(r, 2, "--platforms", "'gpu'")
