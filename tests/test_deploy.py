"""The bundle and the predictor as a line engineer uses them: one file made by fiseclip-bundle gives
the folder scorer's scores, labels and maps through `Predictor.predict` and fiseclip-predict, a
call of another length compiles nothing, a restarted process compiles nothing, and a bundle that
cannot be used is one line naming why."""
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--random_weights", "--model=demo", "--image_size=112", "--platform=cpu",
         "--class_name=hazelnut"]
# Scores and maps: the same program (one compiled batch of the same images, bank and params) on
# the same machine; the CSV keeps 8 decimals, the folder's .npy maps are float16.
SCORE_TOL = 1e-5


def program(name, *args, check=True):
  p = subprocess.run([sys.executable, "-m", f"eval.{name}", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"eval.{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
  return p


def rows(out):
  with open(out / "scores.csv") as f:
    return {r["path"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def line(tmp_path_factory):
  """Real hazelnut parts: 4 known-good for the bank, 4 others for the thresholds, 7 to score (one
  resized to 300 x 200, so the maps' own sizes differ)."""
  hazelnut = shared_data("otx_hazelnut_colour", "hazelnut")
  d = tmp_path_factory.mktemp("deploy")
  good = sorted((hazelnut / "train" / "good").iterdir())
  for sub, files in (("bank", good[:4]), ("good2", good[4:8])):
    (d / sub).mkdir()
    for p in files:
      shutil.copy(p, d / sub / p.name)
  (d / "line").mkdir()
  for p in sorted((hazelnut / "test" / "colour").iterdir())[:5]:
    shutil.copy(p, d / "line" / p.name)
  first_good = sorted((hazelnut / "test" / "good").iterdir())[0]
  shutil.copy(first_good, d / "line" / "good_a.jpg")
  with Image.open(first_good) as img:
    img.convert("RGB").resize((300, 200)).save(d / "line" / "good_small.png")
  return d


@pytest.fixture(scope="module")
def runs(line):
  """The folder scorer and a bundle made with the same bank and threshold images, and the
  predictor program on the same images."""
  common = [f"--normal_images={line / 'bank'}", "--references=bank",
            f"--threshold_from={line / 'good2'}", "--max_fpr=0.3", "--batch_size=4"]
  program("folder", *MODEL, "--noprogress", f"--images={line / 'line'}",
          f"--out={line / 'folder'}", *common)
  made = program("bundle", *MODEL, *common, f"--out={line / 'part.bundle'}")
  program("predict", str(line / "part.bundle"), str(line / "line"), f"--out={line / 'predict'}",
          "--noprogress")
  return made


def test_predictor_and_predict_program_give_the_folder_scorers_results(line, runs):
  from fiseclip_jax.deploy.predictor import Predictor
  assert "references bank (4 known-good)" in runs.stdout
  folder, predicted = rows(line / "folder"), rows(line / "predict")
  paths = sorted(folder)
  assert sorted(predicted) == paths and len(paths) == 7
  decision = json.loads((line / "folder" / "run.json").read_text())["decision"]
  p = Predictor.load(str(line / "part.bundle"))
  assert p.image_threshold == pytest.approx(decision["image_threshold"], abs=1e-7)
  assert p.pixel_threshold == pytest.approx(decision["pixel_threshold"], abs=1e-7)
  got = p.predict([str(line / "line" / name) for name in paths])
  for name, r in zip(paths, got):
    ref = folder[name]
    assert abs(r.score - float(ref["score"])) <= SCORE_TOL, name
    assert abs(float(predicted[name]["score"]) - float(ref["score"])) <= SCORE_TOL, name
    assert r.label == int(ref["pred_label"]) == int(predicted[name]["pred_label"]), name
    assert r.n_ref == int(ref["n_ref"]) == 4
    with Image.open(line / "line" / name) as img:
      hw = img.size[::-1]
    assert r.map.shape == r.mask.shape == hw, name                    # the image's own size
    folder_map = np.load(line / "folder" / "maps" / f"{name}.npy").astype(np.float32)
    assert folder_map.shape == hw
    # The folder stores float16: the predictor's map rounded the same way is the same map.
    assert np.abs(r.map.astype(np.float16).astype(np.float32) - folder_map).max() <= SCORE_TOL
    assert np.array_equal(np.load(line / "predict" / "maps" / f"{name}.npy"),
                          np.load(line / "folder" / "maps" / f"{name}.npy"))
    for out in ("folder", "predict"):
      with Image.open(line / out / "masks" / f"{name}.png") as m:
        assert np.array_equal(np.asarray(m) > 0, r.mask), (out, name)
  assert (line / "predict" / "report.html").is_file()


def test_a_call_of_another_length_compiles_nothing(line, runs):
  import jax
  from fiseclip_jax.deploy.predictor import Predictor
  p = Predictor.load(str(line / "part.bundle"))
  images = sorted((line / "line").iterdir())
  first = p.predict(images[:3])                    # compiles the batch of 4 (padded)
  compiles = []
  listener = lambda name, secs, **kw: compiles.append(name) if name.endswith(
      "backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = p.predict(images)                     # 7 images: two batches of 4, the last padded
    one = p.predict(np.asarray(Image.open(images[0]).convert("RGB")))   # an array, alone
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  assert [r.score for r in again[:3]] == pytest.approx([r.score for r in first], abs=1e-6)
  assert one[0].score == pytest.approx(again[0].score, abs=1e-6)


CHILD = textwrap.dedent("""
    import sys, time, jax
    t0 = time.time()
    compiles, hits = [], []     # every compile request (a cache hit too), the hits
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
    from fiseclip_jax.deploy.predictor import Predictor
    p = Predictor.load(sys.argv[1], cache_dir=sys.argv[2])
    score = p.predict([sys.argv[3]])[0].score
    print(len(compiles) - len(hits), len(hits), round(time.time() - t0, 2), score)
""")


def test_a_second_process_starts_from_the_compilation_cache(line, runs, tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["JAX_PLATFORMS"] = "cpu"
  image = str(sorted((line / "line").iterdir())[0])
  out = []
  for _ in range(2):
    p = subprocess.run([sys.executable, "-c", CHILD, str(line / "part.bundle"),
                        str(tmp_path / "cache"), image], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out.append(p.stdout.split())
  print("first process:", out[0], "second process:", out[1])   # XLA runs, hits, seconds, score
  assert int(out[0][0]) > 0 and int(out[0][1]) == 0
  assert int(out[1][0]) == 0 and int(out[1][1]) > 0              # everything from the cache
  assert float(out[0][3]) == float(out[1][3])


def test_weights_referenced_by_sha256_are_checked(tmp_path):
  from fiseclip_jax.convert.checkpoint import save_checkpoint
  from fiseclip_jax.core.config import FiSeConfig
  from fiseclip_jax.deploy.bundle import BundleError
  from fiseclip_jax.deploy.predictor import Predictor
  from fiseclip_jax.models import registry
  from fiseclip_jax.models.clip.config import CLIPConfig
  cfg = CLIPConfig.tiny()
  weights = tmp_path / "w.safetensors"
  save_checkpoint(str(weights), registry.init_params(cfg, 0), cfg)
  conf = FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2)
  p = Predictor.build(class_name="screw", conf=conf, cfg=cfg, weights=str(weights), batch_size=2)
  p.save(str(tmp_path / "ref.bundle"), embed_weights=False)
  p.save(str(tmp_path / "full.bundle"))
  assert (tmp_path / "ref.bundle").stat().st_size < (tmp_path / "full.bundle").stat().st_size / 5
  x = np.full((70, 90, 3), 128, np.uint8)
  score = p.predict([x, x[::-1]])[0].score
  assert Predictor.load(str(tmp_path / "ref.bundle")).predict([x, x[::-1]])[0].score == score
  save_checkpoint(str(weights), registry.init_params(cfg, 1), cfg)      # another file, same name
  with pytest.raises(BundleError, match="sha256 .* the bundle was built with"):
    Predictor.load(str(tmp_path / "ref.bundle"))


def test_a_bundle_that_cannot_be_used_is_one_line(line, runs, tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  src = line / "part.bundle"
  with safe_open(str(src), framework="numpy") as f:
    meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
  doc = json.loads(meta["fiseclip_bundle"])
  doc["format"], doc["version"] = "fiseclip-bundle/2", "9.0"
  save_file(tensors, str(tmp_path / "future.bundle"), {"fiseclip_bundle": json.dumps(doc)})
  (tmp_path / "text.bundle").write_text("not a bundle")
  for bad, needle in (("future.bundle", "format 'fiseclip-bundle/2', written by fiseclip-jax 9.0"),
                      ("text.bundle", "not a readable safetensors file"),
                      ("absent.bundle", "file not found")):
    p = program("predict", str(tmp_path / bad), str(line / "line"), f"--out={tmp_path / 'o'}",
                check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()                 # refused before anything is written


@pytest.mark.parametrize("flags,needle", [
    (["--references=bank"], "--references bank needs --normal_images"),
    (["--threshold=auto"], "--threshold auto fits a run's own scores"),
    (["--references=rolling", "--normal_images=."], "does not take --normal_images"),
])
def test_bundle_flags_are_refused_before_the_model_loads(tmp_path, flags, needle):
  p = program("bundle", *MODEL, *flags, f"--out={tmp_path / 'b.bundle'}", check=False)
  assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
  assert not (tmp_path / "b.bundle").exists()


def test_rolling_lines_keep_their_own_rings_across_calls():
  from fiseclip_jax.core.config import FiSeConfig
  from fiseclip_jax.deploy.predictor import Predictor
  from fiseclip_jax.models.clip.config import CLIPConfig
  conf = FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2, stream_window=2)
  p = Predictor.build(class_name="screw", conf=conf, cfg=CLIPConfig.tiny(), batch_size=2)
  rng = np.random.default_rng(0)
  a = [rng.integers(0, 256, (60 + 7 * i, 56, 3), dtype=np.uint8) for i in range(5)]
  b = [rng.integers(0, 256, (56, 70, 3), dtype=np.uint8) for _ in range(3)]
  alone_a = [r.score for r in p.predict(a, line="A")]
  p.reset()
  got_a, got_b = [], []
  for i in range(5):                            # the two lines interleaved, one part per call
    got_a += [r.score for r in p.predict([a[i]], line="A")]
    if i < 3:
      got_b += [r.n_ref for r in p.predict([b[i]], line="B")]
  assert got_a == pytest.approx(alone_a, abs=1e-6)
  assert got_b == [0, 1, 2]                       # B's ring holds B's parts only
  assert [r.n_ref for r in p.predict(a[:1], line="C")] == [0]
