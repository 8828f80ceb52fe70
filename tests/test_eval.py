"""The evaluation programs as a new user runs them (subprocesses, small sizes, random weights)."""
import csv
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data
from fiseclip_jax.data import demo_root

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--batch_size=8", "--noprogress",
        "--platform=cpu"]


def run(module, *args, check=True, timeout=600):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{module} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
  return p


def without_timing(doc):
  doc = json.loads(json.dumps(doc))
  for r in doc["categories"].values():
    r.pop("timing")
  return doc


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
  """An MVTec-layout root with two categories (the demo set twice, second one shuffled names)."""
  root = tmp_path_factory.mktemp("mvtec")
  shutil.copytree(Path(demo_root()) / "hazelnut", root / "hazelnut")
  shutil.copytree(Path(demo_root()) / "hazelnut", root / "nut_b")
  return root


def test_demo_runs_end_to_end_and_says_random(tmp_path):
  p = run("eval.demo", "--image_size=112", f"--out={tmp_path}", "--noprogress", "--platform=cpu", "--save_maps")
  assert "RANDOM WEIGHTS" in p.stdout and "MEANINGLESS" in p.stdout
  assert "hazelnut" in p.stdout and "px-AUROC" in p.stdout
  doc = json.loads((tmp_path / "results.json").read_text())
  m = doc["categories"]["hazelnut"]["metrics"]
  assert set(m["pixel"]) == {"auroc", "f1_max", "ap", "aupro"} and set(m["image"]) == {"auroc", "f1_max", "ap"}
  assert all(0.0 <= v <= 1.0 for level in m.values() for v in level.values())
  assert doc["checkpoint"]["weights"].startswith("random:")
  assert doc["categories"]["hazelnut"]["n_images"] == 23
  lines = (tmp_path / "scores" / "hazelnut.csv").read_text().splitlines()
  assert lines[0] == "path,label,score,n_ref,seclip_only" and len(lines) == 24
  assert (tmp_path / "results.csv").read_text().startswith("category,pixel_auroc")
  assert len(list((tmp_path / "maps" / "hazelnut" / "test").rglob("*.png"))) == 23
  # The recorded operating point reproduces the recorded F1-max from the saved scores.
  cat = doc["categories"]["hazelnut"]
  with open(tmp_path / "scores" / "hazelnut.csv") as f:
    rows = list(csv.DictReader(f))
  labels = np.array([int(r["label"]) for r in rows]) == 1
  pred = np.array([float(r["score"]) for r in rows]) >= cat["thresholds"]["image_f1_max"]
  tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
  assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(m["image"]["f1_max"], abs=1e-12)
  assert (tmp_path / "report.html").exists() and (tmp_path / "curves" / "hazelnut.json").exists()
  # The counts the page shows are those of the recorded threshold; one row per defect type.
  assert cat["confusion_at_f1_max"] == {"tp": int(tp), "fp": int(fp), "fn": int(fn),
                                        "tn": int((~pred & ~labels).sum())}
  assert {d: r["n"] for d, r in cat["by_defect"].items()} == {"good": 6, "colour": 17}
  assert cat["by_defect"]["colour"]["flagged"] == int(tp)
  assert cat["positive_share"]["image"] == pytest.approx(17 / 23)
  # Every file the page links exists (thumbnails, full-size overlays, originals, curves), and the
  # page carries the overlays' colour bar on the run's scale.
  page = (tmp_path / "report.html").read_text(encoding="utf-8")
  links = [html.unescape(m) for m in re.findall(r'(?:src|href)="([^"#][^"]*)"', page)]
  assert any(l.endswith("_full.png") for l in links) and any("_original" in l for l in links)
  for link in links:
    assert (tmp_path / urllib.parse.unquote(link)).is_file(), link
  assert 'class="colourbar"' in page and "linear-gradient" in page
  assert page.count('<figure>') == 12                          # three rows of four examples


def test_deterministic_and_resume(two_categories, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  run("eval.mvtec", f"--data_root={two_categories}", f"--out={a}", *FAST)
  run("eval.mvtec", f"--data_root={two_categories}", f"--out={b}", *FAST)
  doc_a = json.loads((a / "results.json").read_text())
  assert without_timing(doc_a) == without_timing(json.loads((b / "results.json").read_text()))
  assert (a / "scores" / "nut_b.csv").read_text() == (b / "scores" / "nut_b.csv").read_text()
  # Kill a run once its first category is written, then resume: the first is not redone.
  c = tmp_path / "c"
  proc = subprocess.Popen([sys.executable, "-m", "eval.mvtec", f"--data_root={two_categories}", f"--out={c}", *FAST],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (c / "results.json").exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = json.loads((c / "results.json").read_text())["categories"]
  assert len(first) >= 1
  p = run("eval.mvtec", f"--data_root={two_categories}", f"--out={c}", "--resume", *FAST)
  for cat in first:
    assert f"{cat}: done earlier (--resume), skipped" in p.stdout
  final = json.loads((c / "results.json").read_text())
  assert set(final["categories"]) == {"hazelnut", "nut_b"}
  assert without_timing(final) == without_timing(doc_a)


def test_greyscale_grid_subset(tmp_path):
  root = shared_data("mvtec_ad_grid_subset")
  run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path}", *FAST)
  doc = json.loads((tmp_path / "results.json").read_text())
  assert doc["categories"]["grid"]["n_images"] == 14


def test_folder_scores_single_image_with_seclip_alone(tmp_path):
  images = tmp_path / "imgs"
  images.mkdir()
  shutil.copy(Path(demo_root()) / "hazelnut" / "test" / "good" / sorted(os.listdir(Path(demo_root()) / "hazelnut" / "test" / "good"))[0], images / "one.jpg")
  p = run("eval.folder", f"--images={images}", "--class_name=hazelnut", f"--out={tmp_path / 'out'}", *FAST)
  assert "SeCLIP alone" in p.stdout
  lines = (tmp_path / "out" / "scores.csv").read_text().splitlines()
  assert len(lines) == 2 and lines[1].split(",")[0].endswith("one.jpg")
  assert np.isfinite(float(lines[1].split(",")[1]))
  assert (tmp_path / "out" / "maps" / "one.jpg.png").exists()


def test_wrong_layout_and_missing_weights_are_clear_errors(tmp_path):
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "x.png").write_bytes(b"")
  p = run("eval.mvtec", f"--data_root={tmp_path / 'flat'}", f"--out={tmp_path / 'o'}", *FAST, check=False)
  assert p.returncode != 0 and "MVTec" in (p.stdout + p.stderr) and "expected" in (p.stdout + p.stderr)
  p = run("eval.mvtec", f"--data_root={tmp_path}", "--platform=cpu", check=False)
  assert p.returncode != 0 and "--weights" in p.stderr


def test_bad_image_is_named_or_skipped(tmp_path):
  root = tmp_path / "mvtec"
  shutil.copytree(Path(demo_root()) / "hazelnut", root / "hazelnut")
  good = sorted((root / "hazelnut" / "test" / "good").iterdir())[0]
  good.write_bytes(good.read_bytes()[:200])                      # truncated JPEG
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path / 'o'}", *FAST, check=False)
  assert p.returncode == 1 and good.name in p.stderr and "Traceback" not in p.stderr
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path / 'o'}", "--skip_bad_images", *FAST)
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  assert doc["categories"]["hazelnut"]["n_images"] == 22
  assert good.name in p.stderr                                    # the warning names it


def test_missing_mask_is_a_clear_error(tmp_path):
  root = tmp_path / "mvtec"
  shutil.copytree(Path(demo_root()) / "hazelnut", root / "hazelnut")
  mask = sorted((root / "hazelnut" / "ground_truth" / "colour").iterdir())[0]
  mask.unlink()
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path / 'o'}", *FAST, check=False)
  assert p.returncode == 1 and mask.name in p.stderr and "Traceback" not in p.stderr


def test_seclip_only_images_are_counted_with_their_reason(tmp_path):
  """lam = 0 makes M0 exclude every patch: every reference is empty, so every image falls back to
  SeCLIP. That fallback was silent (only a batch of one was counted); now it is reported per image
  and per category, with the reason."""
  p = run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path}", "--lam=0", *FAST)
  doc = json.loads((tmp_path / "results.json").read_text())
  cat = doc["categories"]["hazelnut"]
  assert cat["seclip_only"] == {"total": 23, "no_candidates": 0, "all_masked": 23}
  with open(tmp_path / "scores" / "hazelnut.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 23 and {r["seclip_only"] for r in rows} == {"1"} and {r["n_ref"] for r in rows} == {"0"}
  assert "23 image(s) scored by SeCLIP alone" in p.stdout + p.stderr


def test_top_up_gives_every_image_b_minus_1_references(tmp_path):
  """23 images in batches of 8 (8, 8, 7): the last batch is topped up with an already-scored
  image as a reference only, so every image has 7 references; --notop_up leaves its 7 images 6."""
  run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path / 'a'}", *FAST)
  with open(tmp_path / "a" / "scores" / "hazelnut.csv") as f:
    assert {r["n_ref"] for r in csv.DictReader(f)} == {"7"}
  run("eval.mvtec", f"--data_root={demo_root()}", f"--out={tmp_path / 'b'}", "--notop_up", *FAST)
  with open(tmp_path / "b" / "scores" / "hazelnut.csv") as f:
    counts = sorted(int(r["n_ref"]) for r in csv.DictReader(f))
  assert counts == [6] * 7 + [7] * 16


def test_k_shot_bank_from_the_training_split(tmp_path):
  root = shared_data("otx_hazelnut_colour")
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path}", "--k_shot=4", *FAST)
  assert "references both (k_shot 4)" in p.stdout
  doc = json.loads((tmp_path / "results.json").read_text())
  cat = doc["categories"]["hazelnut"]
  assert len(cat["bank"]) == 4 and all("/train/good/" in b for b in cat["bank"])
  assert doc["identity"]["k_shot"] == 4 and doc["config"]["references"] == "both"
  with open(tmp_path / "scores" / "hazelnut.csv") as f:
    assert {r["n_ref"] for r in csv.DictReader(f)} == {"11"}      # 7 batch-mates + 4 known-good
  m = cat["metrics"]
  assert all(np.isfinite(v) for level in m.values() for v in level.values())


def test_dinov2_features_with_clip_text_and_dinov2_alone(tmp_path):
  """--fi_weights: FiCLIP matches DINOv2 features while CLIP keeps SeCLIP; DINOv2 as --weights alone
  runs FiCLIP only and says so. Random weights for both towers, on the shared hazelnut set."""
  import fiseclip_jax as fj
  root = shared_data("otx_hazelnut_colour")
  cfg = fj.Dinov2Config.tiny(layers=4, width=48, heads=4)
  weights = tmp_path / "dinov2.safetensors"
  fj.save_checkpoint(str(weights), fj.init_params(cfg, 0), cfg)
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path / 'both'}", f"--fi_weights={weights}",
          "--feature_layers=1,2,3,4", *FAST)
  doc = json.loads((tmp_path / "both" / "results.json").read_text())
  assert doc["identity"]["fi_model_config"]["layers"] == 4 and doc["fi_checkpoint"]["backbone"] == "dinov2"
  m = doc["categories"]["hazelnut"]["metrics"]
  assert all(np.isfinite(v) for level in m.values() for v in level.values())
  p = run("eval.mvtec", f"--data_root={root}", f"--out={tmp_path / 'alone'}", f"--weights={weights}",
          "--feature_layers=1,2,3,4", *[a for a in FAST if a not in ("--random_weights", "--model=demo")])
  assert "FiCLIP only" in p.stdout
  m = json.loads((tmp_path / "alone" / "results.json").read_text())["categories"]["hazelnut"]["metrics"]
  assert all(np.isfinite(v) for level in m.values() for v in level.values())
