"""The folder scorer's review page (report.html in --out): parts by score with their decision, the
original beside the overlay, every link resolving, the histogram and the colour key."""
import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

from fiseclip_jax.data import demo_root
from fiseclip_jax.outputs import folder_report

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(demo_root()) / "hazelnut" / "test"
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--noprogress", "--platform=cpu",
        "--class_name=hazelnut", "--batch_size=3"]


def _links(page):
  return [html.unescape(m) for m in re.findall(r'(?:src|href)="([^"#][^"]*)"', page)]


def test_the_review_page_of_a_folder_run(tmp_path):
  images = tmp_path / "line"
  (images / "b").mkdir(parents=True)
  for p in sorted((DEMO / "good").glob("*.jpg"))[:2]:
    shutil.copy(p, images / p.name)
  for p in sorted((DEMO / "colour").glob("*.jpg"))[:3]:
    shutil.copy(p, images / "b" / p.name)
  out = tmp_path / "out"
  # A threshold inside the run's scores, so both decisions appear: the median of a first run.
  p = subprocess.run([sys.executable, "-m", "eval.folder", f"--images={images}", "--recursive",
                      f"--out={out}", *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(out / "scores.csv") as f:
    scores = sorted(float(r["score"]) for r in csv.DictReader(f))
  t = (scores[1] + scores[2]) / 2
  p = subprocess.run([sys.executable, "-m", "eval.folder", f"--images={images}", "--recursive",
                      f"--out={out}", "--overwrite", f"--threshold={t}", "--pixel_threshold=0.3",
                      "--overlay_legend", *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.count("review page:") == 1 and p.stdout.rstrip().endswith("report.html")
  page = (out / "report.html").read_text(encoding="utf-8")
  # Every file the page links exists: thumbnails, overlays, masks, originals in the scored folder.
  links = _links(page)
  assert any("report/thumbs/" in l for l in links) and any(l.startswith("maps/") for l in links)
  assert any(l.startswith("masks/") for l in links) and any(l.startswith("../line/") for l in links)
  for link in links:
    assert not os.path.isabs(link) and "://" not in link, link
    assert (out / urllib.parse.unquote(link)).is_file(), link
  # Parts sorted by score, most anomalous first, each with its decision.
  with open(out / "scores.csv") as f:
    rows = {r["path"]: r for r in csv.DictReader(f)}
  order = re.findall(r'<th scope="row">([^<]*)</th>', page)
  order = [html.unescape(o) for o in order]
  assert order == sorted(rows, key=lambda k: (-float(rows[k]["score"]), k))
  doc = json.loads((out / "run.json").read_text())
  ng = sum(r["pred_label"] == "1" for r in rows.values())
  assert ng == doc["flagged"] == 3 and 0 < ng < len(rows)
  cards = re.findall(r'<figure class="part">(.*?)</figure>', page)
  assert len(cards) == len(rows)
  assert sum('badge ng' in c for c in cards) == ng and sum('badge ok' in c for c in cards) == 2
  assert 'id="histogram"' in page and 'class="threshold"' in page and 'class="colourbar"' in page
  assert "RANDOM WEIGHTS" in page
  # --overlay_legend: each full-size overlay carries the key under the image, at the image's width.
  from PIL import Image
  for rel in rows:
    with Image.open(images / rel) as a, Image.open(out / "maps" / (rel + ".png")) as b:
      assert b.width == a.width and b.height > a.height, rel


def _fake_run(out, decision, scores, known_good=None, max_fpr=None):
  os.makedirs(out, exist_ok=True)
  ident = {"images": "/nowhere", "class_name": "part", "map_range": "0,1", "max_fpr": max_fpr,
           "checkpoint_sha256": "ab" * 32, "config": {"references": "batch"}}
  with open(os.path.join(out, "run.json"), "w") as f:
    json.dump({"identity": ident, "decision": decision, "scored": len(scores)}, f)
  with open(os.path.join(out, "scores.csv"), "w") as f:
    has_t = decision.get("image_threshold") is not None
    f.write("path,score,n_ref,seclip_only" + (",pred_label" if has_t else "") + "\n")
    for i, s in enumerate(scores):
      f.write(f"p{i}.png,{s},3,0" + (f",{int(s >= decision['image_threshold'])}" if has_t else "")
              + "\n")
  if known_good is not None:
    with open(os.path.join(out, "known_good.csv"), "w") as f:
      f.write("path,score\n" + "".join(f"g{i}.png,{s}\n" for i, s in enumerate(known_good)))


def test_no_threshold_says_how_to_get_one(tmp_path):
  _fake_run(str(tmp_path), {"image_threshold": None, "pixel_threshold": None,
                            "how": "none: scores only"}, [0.2, 0.5, 0.4])
  page = open(folder_report.write_folder_report(str(tmp_path), "/nowhere"), encoding="utf-8").read()
  assert "No image threshold" in page and "--threshold auto" in page
  assert "badge ng" not in page and "badge ok" not in page
  assert page.count("no original") == 3                    # the scored folder is gone: said so


def test_known_good_scores_and_unresolvable_fpr_are_shown(tmp_path):
  _fake_run(str(tmp_path), {"image_threshold": 0.45, "pixel_threshold": 0.4, "how": "known-good",
                            "resolvable_fpr": 1 / 8}, [0.2, 0.5, 0.4], [0.1, 0.2, 0.3] * 2 + [0.4, 0.44],
            max_fpr=0.01)
  page = open(folder_report.write_folder_report(str(tmp_path), "/nowhere"), encoding="utf-8").read()
  assert "known-good (8)" in page and "scored parts (3)" in page
  assert "8 known-good images cannot resolve a false-positive rate of 0.01" in page
