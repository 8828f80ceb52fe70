"""eval.folder as a line engineer runs it: references (batch, bank, rolling), a long job that can be
killed and resumed, file names that cannot collide, everything it skipped or ignored listed."""
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fiseclip_jax.data import demo_root

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--noprogress", "--platform=cpu",
        "--class_name=hazelnut"]
TEST = Path(demo_root()) / "hazelnut" / "test"


def run(*args, check=True, timeout=600):
  p = subprocess.run([sys.executable, "-m", "eval.folder", *FAST, *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"eval.folder failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
  return p


def rows(out):
  with open(out / "scores.csv") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def line(tmp_path_factory):
  """The 23 demo test images as one flat folder, in a fixed order (a production line)."""
  d = tmp_path_factory.mktemp("line")
  for i, p in enumerate(sorted(TEST.rglob("*.jpg"))):
    shutil.copy(p, d / f"{i:02d}_{p.parent.name}.jpg")
  return d


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  d = tmp_path_factory.mktemp("good")
  for p in sorted((TEST / "good").iterdir())[:4]:
    shutil.copy(p, d / p.name)
  return d


def test_rolling_mode_counts_its_references(line, tmp_path):
  out = tmp_path / "out"
  p = run(f"--images={line}", f"--out={out}", "--references=rolling", "--bank_size=3",
          "--batch_size=4")
  r = rows(out)
  assert [x["path"] for x in r] == sorted(x.name for x in line.iterdir())
  assert [int(x["n_ref"]) for x in r] == [0, 1, 2] + [3] * 20
  assert [x["seclip_only"] for x in r][:2] == ["1", "0"]
  assert "1 scored by SeCLIP alone" in p.stdout
  # The stream's batching does not change the results.
  out1 = tmp_path / "out1"
  run(f"--images={line}", f"--out={out1}", "--references=rolling", "--bank_size=3", "--batch_size=1")
  for a, b in zip(r, rows(out1)):
    assert a["path"] == b["path"] and a["n_ref"] == b["n_ref"]
    assert abs(float(a["score"]) - float(b["score"])) < 1e-5


def test_known_good_bank(line, good, tmp_path):
  out = tmp_path / "bank"
  run(f"--images={line}", f"--out={out}", f"--normal_images={good}", "--references=bank",
      "--batch_size=8")
  assert {x["n_ref"] for x in rows(out)} == {"4"}
  out = tmp_path / "both"
  p = run(f"--images={line}", f"--out={out}", f"--normal_images={good}", "--batch_size=8")
  assert "references both (4 known-good)" in p.stdout
  assert {x["n_ref"] for x in rows(out)} == {"11"}          # 7 batch-mates (top-up) + 4 bank
  ident = json.loads((out / "run.json").read_text())["identity"]
  assert len(ident["bank"]) == 4 and ident["config"]["references"] == "both"


def test_killed_and_resumed_scores_every_image_once_as_an_uninterrupted_run(line, tmp_path):
  full = tmp_path / "full"
  run(f"--images={line}", f"--out={full}", "--batch_size=2")
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "eval.folder", *FAST, f"--images={line}",
                           f"--out={out}", "--batch_size=2"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  log = out / "scores.log.csv"
  deadline = time.time() + 300
  while time.time() < deadline and (not log.exists() or log.read_text().count("#end") < 4):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = log.read_text().count("#end")
  assert 4 <= written < 12, written                       # killed halfway
  p = run(f"--images={line}", f"--out={out}", "--batch_size=2", "--resume")
  got, want = rows(out), rows(full)
  assert [x["path"] for x in got] == [x["path"] for x in want]    # each image exactly once
  for a, b in zip(got, want):
    assert abs(float(a["score"]) - float(b["score"])) <= 1e-6, (a, b)
  assert "scored 23 image(s)" in p.stdout


def test_names_cannot_collide_and_subfolders_are_searched(tmp_path):
  d = tmp_path / "imgs"
  (d / "sub").mkdir(parents=True)
  src = sorted((TEST / "good").iterdir())
  shutil.copy(src[0], d / "a.jpg")
  from PIL import Image
  Image.open(src[1]).save(d / "a.png")
  shutil.copy(src[2], d / "sub" / "a.jpg")
  (d / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  p = run(f"--images={d}", f"--out={out}", "--batch_size=2", "--recursive")
  assert [x["path"] for x in rows(out)] == ["a.jpg", "a.png", "sub/a.jpg"]
  for name in ("a.jpg", "a.png", "sub/a.jpg"):
    assert (out / "maps" / f"{name}.png").exists() and (out / "maps" / f"{name}.npy").exists()
  assert "1 non-image file(s) ignored" in p.stdout
  assert json.loads((out / "run.json").read_text())["ignored_files"] == 1
  # Without --recursive the sub-folder is not searched, and --nosave_maps writes no map.
  out2 = tmp_path / "out2"
  run(f"--images={d}", f"--out={out2}", "--batch_size=2", "--nosave_maps")
  assert [x["path"] for x in rows(out2)] == ["a.jpg", "a.png"]
  assert not (out2 / "maps").exists()


def test_skipped_images_are_listed(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  for p in sorted((TEST / "good").iterdir())[:3]:
    shutil.copy(p, d / p.name)
  bad = d / "zz_truncated.jpg"
  bad.write_bytes((TEST / "good" / sorted(x.name for x in (TEST / "good").iterdir())[0]).read_bytes()[:300])
  out = tmp_path / "out"
  p = run(f"--images={d}", f"--out={out}", "--batch_size=2", "--skip_bad_images")
  with open(out / "skipped.csv") as f:
    skipped = list(csv.DictReader(f))
  assert [s["path"] for s in skipped] == ["zz_truncated.jpg"] and skipped[0]["reason"]
  assert len(rows(out)) == 3 and "1 skipped" in p.stdout


def test_earlier_results_are_never_mixed_in(line, tmp_path):
  out = tmp_path / "out"
  run(f"--images={line}", f"--out={out}", "--batch_size=8")
  p = run(f"--images={line}", f"--out={out}", "--batch_size=4", check=False)
  assert p.returncode == 2 and "--resume" in p.stderr
  p = run(f"--images={line}", f"--out={out}", "--batch_size=4", "--resume", check=False)
  assert p.returncode == 2 and "batch_size" in p.stderr
  run(f"--images={line}", f"--out={out}", "--batch_size=4", "--overwrite")
  assert {x["n_ref"] for x in rows(out)} == {"3"}


def test_decisions_and_maps_at_the_images_size(good, tmp_path):
  """--threshold_from sets the thresholds from known-good images scored like the run; every image
  gets pred_label, an overlay and a mask at its own size (here 600 x 800, not the model's square)."""
  from PIL import Image
  d = tmp_path / "imgs"
  d.mkdir()
  for i, p in enumerate(sorted((TEST / "colour").iterdir())[:3]):
    Image.open(p).convert("RGB").resize((800, 600)).save(d / f"part{i}.png")
  out = tmp_path / "out"
  p = run(f"--images={d}", f"--out={out}", f"--threshold_from={good}", "--max_fpr=0.1",
          "--batch_size=3", "--normalized_scores")
  doc = json.loads((out / "run.json").read_text())
  decision = doc["decision"]
  assert decision["known_good"]["n"] == 4 and decision["known_good"]["image"]["fpr"] <= 0.1
  assert "known-good images" in decision["how"] and "thresholds from 4 known-good" in p.stdout
  # 4 known-good images cannot measure an FPR below 1/4: said once, recorded always.
  warnings = [l for l in p.stderr.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "1/4 = 0.25" in warnings[0] and "--max_fpr 0.1" in warnings[0]
  assert decision["resolvable_fpr"] == 0.25
  with open(out / "known_good.csv") as f:
    known = list(csv.DictReader(f))
  assert sorted(Path(k["path"]).name for k in known) == sorted(x.name for x in good.iterdir())
  assert decision["image_threshold"] > max(float(k["score"]) for k in known)
  for r in rows(out):
    assert r["pred_label"] == str(int(float(r["score"]) >= decision["image_threshold"]))
    assert (float(r["score_normalized"]) >= 0.5) == (r["pred_label"] == "1")
    assert Image.open(out / "maps" / (r["path"] + ".png")).size == (800, 600)
    assert Image.open(out / "masks" / (r["path"] + ".png")).size == (800, 600)
  # A given threshold is used as is and recorded as given.
  out2 = tmp_path / "given"
  run(f"--images={d}", f"--out={out2}", "--threshold=0", "--batch_size=3")
  assert {r["pred_label"] for r in rows(out2)} == {"1"}
  assert json.loads((out2 / "run.json").read_text())["decision"]["how"] == "given"


def _contour_pixels(overlay, reference):
  """Pixels of the contour colour in an overlay that the same overlay drawn without a threshold
  lacks (the caption is white too, so colour alone is not enough)."""
  import numpy as np
  from fiseclip_jax.outputs import overlays
  c = np.array(overlays.CONTOUR, np.uint8)
  return int(((overlay == c).all(-1) & ~(reference == c).all(-1)).sum())


def test_one_decision_per_part(good, tmp_path):
  """A part the image threshold passes (pred_label 0) gets no defect contour and an all-zero mask:
  the pixel threshold applies only inside the parts the image threshold flags. Without an image
  threshold the pixel rule alone applies."""
  import numpy as np
  from PIL import Image
  from fiseclip_jax.outputs import overlays
  px = tmp_path / "pixel_only"
  run(f"--images={good}", f"--out={px}", "--pixel_threshold=0", "--batch_size=4")
  scores = sorted(float(r["score"]) for r in rows(px))
  for r in rows(px):                                # map >= 0 everywhere: every mask flags pixels
    assert np.asarray(Image.open(px / "masks" / (r["path"] + ".png"))).any()
  t = (scores[1] + scores[2]) / 2                   # two parts pass, two are flagged
  out = tmp_path / "both"
  run(f"--images={good}", f"--out={out}", f"--threshold={t!r}", "--pixel_threshold=0",
      "--batch_size=4")
  labels = {r["path"]: r["pred_label"] for r in rows(out)}
  assert sorted(labels.values()) == ["0", "0", "1", "1"]
  for r in rows(out):
    name = r["path"] + ".png"
    mask = np.asarray(Image.open(out / "masks" / name))
    overlay = np.asarray(Image.open(out / "maps" / name).convert("RGB"))
    rgb = overlays.read_original(good / r["path"])
    amap = np.load(out / "maps" / (r["path"] + ".npy")).astype(np.float32)
    scale = overlays.ColourScale.for_run("0,1", 0.0)
    plain = overlays.render(rgb, amap, scale, None, float(r["score"]))
    drawn = overlays.render(rgb, amap, scale, 0.0, float(r["score"]))
    assert _contour_pixels(drawn, plain) > 0         # the pixel rule would draw a contour here
    if r["pred_label"] == "0":
      assert not mask.any(), name
      assert _contour_pixels(overlay, plain) == 0, name
    else:
      assert (mask == np.asarray(Image.open(px / "masks" / name))).all(), name
      assert _contour_pixels(overlay, plain) > 0, name


def test_threshold_auto(line, tmp_path):
  """--threshold auto: the threshold fitted to the run's own 23 scores after scoring, recorded with
  its numbers; one decision per part under it; normalized scores at 0.5; --resume refits it."""
  import numpy as np
  from PIL import Image
  from fiseclip_jax.outputs import decisions, overlays
  out = tmp_path / "auto"
  args = [f"--images={line}", f"--out={out}", "--threshold=auto", "--max_fpr=0.2",
          "--pixel_threshold=0", "--normalized_scores", "--batch_size=8"]
  p = run(*args)
  doc = json.loads((out / "run.json").read_text())
  decision, got = doc["decision"], rows(out)
  assert doc["identity"]["threshold"] == "auto" and doc["identity"]["max_fpr"] == 0.2
  fit = decisions.auto_threshold([float(r["score"]) for r in got], 0.2)
  assert decision["image_threshold"] == fit.threshold and decision["auto"] == fit._asdict()
  assert decision["how"].startswith("auto: ") and "most parts are good" in decision["how"]
  assert "pixel threshold: given" in decision["how"] and decision["auto"]["n"] == 23
  labels = [int(float(r["score"]) >= fit.threshold) for r in got]
  assert [int(r["pred_label"]) for r in got] == labels and 0 < sum(labels) < 23
  assert all((float(r["score_normalized"]) >= 0.5) == (r["pred_label"] == "1") for r in got)
  assert f"{sum(labels)} flagged (score >= {fit.threshold:.6f}, auto)" in p.stdout
  scale = overlays.ColourScale.for_run("0,1", 0.0)
  for r in got:
    name = r["path"] + ".png"
    mask = np.asarray(Image.open(out / "masks" / name))
    overlay = np.asarray(Image.open(out / "maps" / name).convert("RGB"))
    amap = np.load(out / "maps" / (r["path"] + ".npy")).astype(np.float32)
    plain = overlays.render(overlays.read_original(line / r["path"]), amap, scale, None,
                            float(r["score"]))
    assert mask.all() if r["pred_label"] == "1" else not mask.any(), name
    assert (_contour_pixels(overlay, plain) > 0) == (r["pred_label"] == "1"), name
  # Resumed, the threshold is fitted again from all the scores, under the same identity.
  p = run(*args, "--resume")
  assert json.loads((out / "run.json").read_text())["decision"]["image_threshold"] == fit.threshold


def test_threshold_auto_with_no_spread_is_refused_after_scoring(tmp_path):
  """20 copies of one image score alike: no scale to fit. One error line; scores.csv is written."""
  d = tmp_path / "same"
  d.mkdir()
  src = sorted((TEST / "good").iterdir())[0]
  for i in range(20):
    shutil.copy(src, d / f"{i:02d}.jpg")
  out = tmp_path / "out"
  p = run(f"--images={d}", f"--out={out}", "--threshold=auto", "--batch_size=20", check=False)
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "--threshold auto" in errors[0] and "no spread" in errors[0]
  assert len(rows(out)) == 20 and "pred_label" not in rows(out)[0]
  assert "no spread" in json.loads((out / "run.json").read_text())["decision"]["error"]


@pytest.mark.parametrize("flags,needles", [
    (["--threshold=abc"], ["--threshold abc", "'auto'"]),
    (["--threshold=nan"], ["--threshold nan", "'auto'"]),
    (["--threshold=auto"], ["--threshold auto", "at least 20 images", "has 4"]),
    (["--threshold=auto", "--max_fpr=0.5"], ["--max_fpr", "0.5"]),
    (["--threshold=auto", "--threshold_from=GOOD"], ["--threshold_from", "exclude"]),
    (["--normalized_scores"], ["--normalized_scores", "--threshold"]),
    (["--normalized_scores", "--threshold=0"], ["--normalized_scores", "positive"])])
def test_decision_flags_are_refused_before_the_model_loads(good, tmp_path, flags, needles):
  out = tmp_path / "out"
  p = run(f"--images={good}", f"--out={out}", *[f.replace("GOOD", str(good)) for f in flags],
          check=False, timeout=120)
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert all(n in errors[0] for n in needles), errors[0]
  assert "RANDOM WEIGHTS" not in p.stdout and not out.exists()
