"""report.html from a fake run folder: links resolve, curves counted in the SVGs, numbers shown,
names escaped, rebuilt idempotently, and a clear error where matplotlib is missing."""
import html
import json
import os
import re
import sys
import urllib.parse

import numpy as np
import pytest

from fiseclip_jax.outputs import curves_figure, html_report as report

BAD_NAME = 'a<b>&"c".png'


def _roc(n=1000, k=0.08):
  fpr = np.linspace(0, 1, n)
  return {"fpr": fpr.tolist(), "tpr": (fpr ** k).tolist()}


def _pr(n=1000, k=0.2):
  recall = np.linspace(1, 0, n)
  return {"recall": recall.tolist(), "precision": (1 - 0.6 * recall ** (1 / k)).tolist()}


def _thumb(out_dir, rel, colour):
  from PIL import Image
  path = os.path.join(out_dir, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (48, 48), colour).save(path)
  return rel


def _category(image, pixel, n_images, fpr_threshold):
  return {"metrics": {"image": image, "pixel": pixel}, "n_images": n_images,
          "seclip_only": {"total": 2, "no_candidates": 1, "all_masked": 1},
          "thresholds": {"image_f1_max": 0.61234, "pixel_f1_max": 0.4321,
                         "image_at_fpr": {"fpr": 0.05, "threshold": fpr_threshold}},
          "timing": {"seconds": 12.5, "images_per_s": 6.4}, "bank": [], "skipped": []}


def make_run(out_dir):
  """bottle: every curve and example; screw: no defective image, so no curve and no example."""
  out_dir = str(out_dir)
  cats = {
      "bottle": _category({"auroc": 0.973, "f1_max": 0.951, "ap": 0.989},
                          {"auroc": 0.9812, "f1_max": 0.642, "ap": 0.655, "aupro": 0.9177},
                          83, 0.7),
      "screw": _category({"auroc": None, "f1_max": None, "ap": None},
                         {"auroc": None, "f1_max": None, "ap": None, "aupro": None}, 41, None)}
  doc = {"dataset": "MVTec AD", "identity": {"dataset": "mvtec"},
         "config": {"image_size": 518, "feature_layers": [6, 12, 18, 24], "lam": 1.1,
                    "se_weight": None, "vote": "majority"},
         "checkpoint": {"weights": "/weights/vit_l14_336.npz", "sha256": "ab12" * 16},
         "versions": {"jax": "0.4.30", "fiseclip_jax": "0.1.0"},
         "categories": cats,
         "mean": {"image": {"auroc": 0.973, "f1_max": 0.951, "ap": 0.989},
                  "pixel": {"auroc": 0.9812, "f1_max": 0.642, "ap": 0.655, "aupro": 0.9177}}}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(doc, f)
  with open(os.path.join(out_dir, "results.csv"), "w") as f:
    f.write("category\nbottle\nscrew\n")
  os.makedirs(os.path.join(out_dir, "curves"))
  pro = np.linspace(0, 1, 200)
  curves = {"image": {"roc": _roc(), "pr": _pr()},
            "pixel": {"roc": _roc(k=0.05), "pr": _pr(k=0.5),
                      "pro": {"fpr": pro.tolist(), "pro": np.sqrt(pro).tolist()}}}
  with open(os.path.join(out_dir, "curves", "bottle.json"), "w") as f:
    json.dump(curves, f)
  with open(os.path.join(out_dir, "curves", "screw.json"), "w") as f:
    json.dump({"image": {"roc": None, "pr": None}, "pixel": None}, f)
  examples = {
      "good_highest": [
          {"path": f"/data/bottle/test/good/{i:03d}.png", "score": 0.5 - 0.1 * i, "label": 0,
           "image": _thumb(out_dir, f"report/bottle/good_{i}.png", (40 * i, 120, 80))}
          for i in range(3)],
      "defective_lowest": [
          {"path": f"/data/bottle/test/broken/{BAD_NAME}", "score": 0.25, "label": 1,
           "image": _thumb(out_dir, "report/bottle/defect_0.png", (200, 60, 60))},
          {"path": "/data/bottle/test/broken/001.png", "score": 0.3, "label": 1,
           "image": "report/bottle/defect_1.png"}]}   # a thumbnail that was never written
  with open(os.path.join(out_dir, "report", "bottle", "examples.json"), "w") as f:
    json.dump(examples, f)
  return out_dir


def _links(page):
  return [html.unescape(m) for m in re.findall(r'(?:src|href)="([^"]*)"', page)]


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, _, names in os.walk(root) for n in names)


@pytest.fixture
def run(tmp_path):
  return make_run(tmp_path)


def test_report(run):
  path = report.write_report(run)
  assert path == os.path.join(run, "report.html") and os.path.isfile(path)
  page = open(path, encoding="utf-8").read()
  links = _links(page)
  assert "report/bottle/curves.svg" in links and "results.json" in links and "results.csv" in links
  for link in links:
    if link.startswith("#"):
      assert f'id="{link[1:]}"' in page, link
    else:
      assert "://" not in link and not os.path.isabs(link), link
      assert os.path.isfile(os.path.join(run, urllib.parse.unquote(link))), link
  svg = open(os.path.join(run, "report", "bottle", "curves.svg"), encoding="utf-8").read()
  assert svg.count('id="curve-') == 5
  for kind in ("image-roc", "pixel-roc", "image-pr", "pixel-pr", "pro"):
    assert f'id="curve-{kind}"' in svg
  assert "image AUROC 97.3" in svg and "AU-PRO 91.8" in svg
  assert len(svg) < 80_000
  # screw has no curve: no figure, and the page says so instead of linking one.
  assert not os.path.exists(os.path.join(run, "report", "screw", "curves.svg"))
  screw = page[page.index('id="cat-screw"'):]
  assert "No curves" in screw and "<img" not in screw
  # Table 1's numbers in percent, '-' for undefined, thresholds, SeCLIP-only count.
  for text in ("97.3", "98.1", "91.8", "65.5", "0.6123", "0.4321", "@ FPR 5%", ">83<", ">2<"):
    assert text in page, text
  row = re.search(r'<tr><th scope="row"><a href="#cat-screw">screw</a></th>(.*?)</tr>', page)
  assert row.group(1).count(">-<") >= 8
  assert 'class="mean"' in page and "MVTec AD" in page and "ab12ab12ab12" in page
  # File names are escaped, never raw HTML; the missing thumbnail is a placeholder.
  assert BAD_NAME not in page and html.escape(BAD_NAME) in page
  assert "no thumbnail" in page
  assert not [n for n in _files(run) if n.endswith(".tmp")]


def test_report_is_idempotent(run):
  first = open(report.write_report(run), encoding="utf-8").read()
  svg_path = os.path.join(run, "report", "bottle", "curves.svg")
  svg, files = open(svg_path, "rb").read(), _files(run)
  os.utime(svg_path, (0, 0))
  second = open(report.write_report(run), encoding="utf-8").read()
  assert _files(run) == files
  assert open(svg_path, "rb").read() == svg and os.stat(svg_path).st_mtime == 0  # kept, not redrawn
  strip = lambda s: re.sub(r'<span class="generated">[^<]*</span>', "", s)  # noqa: E731
  assert strip(first) == strip(second)
  # A changed metric redraws the figure with the new legend.
  doc = json.load(open(os.path.join(run, "results.json")))
  doc["categories"]["bottle"]["metrics"]["image"]["auroc"] = 0.5
  json.dump(doc, open(os.path.join(run, "results.json"), "w"))
  report.write_report(run)
  assert "image AUROC 50.0" in open(svg_path, encoding="utf-8").read()


def test_partial_and_empty_runs(tmp_path):
  # Only pixel ROC and PRO written: two curves.
  fig, n = curves_figure.curves_figure({"pixel": {"roc": _roc(), "pro": {"fpr": [0, 1], "pro": [0, 1]}},
                                 "image": None}, None)
  assert n == 2
  svg = curves_figure.figure_svg(fig, "k")
  assert svg.count('id="curve-') == 2 and 'id="curve-pixel-roc"' in svg
  assert report.anchor("a&b c") != report.anchor("a b c")   # ids stay unique
  # Before any category finished (no results.json at all): a page that says so.
  page = open(report.write_report(str(tmp_path)), encoding="utf-8").read()
  assert "no category finished yet" in page


def test_needs_matplotlib(run, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(curves_figure.ReportUnavailable) as e:
    report.write_report(run)
  assert str(e.value) == curves_figure.MISSING_MATPLOTLIB and "pip install matplotlib" in str(e.value)
  assert isinstance(e.value, RuntimeError)
  assert not os.path.exists(os.path.join(run, "report.html"))


def test_random_weights_are_said_on_the_page(run):
  """A run on random weights (the demo, --random_weights) says so above its numbers."""
  assert "RANDOM WEIGHTS" not in open(report.write_report(run), encoding="utf-8").read()
  doc = json.load(open(os.path.join(run, "results.json")))
  doc["checkpoint"] = {"weights": "random:demo:seed0", "sha256": None}
  json.dump(doc, open(os.path.join(run, "results.json"), "w"))
  page = open(report.write_report(run), encoding="utf-8").read()
  assert page.index("RANDOM WEIGHTS") < page.index("Metrics")


def test_metrics_are_shaded_against_their_chance_level(run):
  """An F1-max equal to flagging every image, an AP equal to the positive share and an AUROC
  below 50 are not green; the PR panel draws the positive shares it is read against."""
  doc = json.load(open(os.path.join(run, "results.json")))
  bottle = doc["categories"]["bottle"]
  p = 0.765
  bottle["positive_share"] = {"image": p, "pixel": 0.02}
  bottle["metrics"]["image"] = {"auroc": 0.45, "f1_max": 2 * p / (1 + p), "ap": p}
  bottle["metrics"]["pixel"]["ap"] = 0.655
  json.dump(doc, open(os.path.join(run, "results.json"), "w"))
  page = open(report.write_report(run), encoding="utf-8").read()
  row = re.search(r'<tr><th scope="row"><a href="#cat-bottle">bottle</a></th>(.*?)</tr>', page).group(1)
  cells = re.findall(r"<td([^>]*)>([^<]*)</td>", row)[:7]        # Table 1's seven columns
  by_header = dict(zip(report.HEADERS, cells))
  for h in ("im-AUROC", "im-F1max", "im-AP"):
    assert 'class="chance"' in by_header[h][0] and "46,160,90" not in by_header[h][0], h
  assert 'title="chance 50.0"' in by_header["im-AUROC"][0]
  assert f'title="chance {100 * p:.1f}"' in by_header["im-AP"][0]
  assert "46,160,90" in by_header["px-AP"][0] and 'title="chance 2.0"' in by_header["px-AP"][0]
  svg = open(os.path.join(run, "report", "bottle", "curves.svg"), encoding="utf-8").read()
  assert 'id="chance-image-pr"' in svg and 'id="chance-pixel-pr"' in svg
  # screw has no positive share recorded: F1 and AP chance unknown, so those cells stay unshaded.
  row = re.search(r'<tr><th scope="row"><a href="#cat-screw">screw</a></th>(.*?)</tr>', page).group(1)
  assert "46,160,90" not in row


def test_histogram_confusion_and_defect_rows(run, tmp_path):
  doc = json.load(open(os.path.join(run, "results.json")))
  bottle = doc["categories"]["bottle"]
  bottle["confusion_at_f1_max"] = {"tp": 7, "fp": 2, "fn": 1, "tn": 30}
  bottle["by_defect"] = {"good": {"n": 32, "flagged": 2, "mean": 0.3, "min": 0.1, "max": 0.7},
                         "broken_large": {"n": 8, "flagged": 7, "mean": 0.8, "min": 0.5,
                                          "max": 0.9, "auroc": 0.97}}
  bottle["overlay_scale"] = {"lo": 0.0, "hi": 1.0, "contour": 0.4321}
  json.dump(doc, open(os.path.join(run, "results.json"), "w"))
  os.makedirs(os.path.join(run, "scores"), exist_ok=True)
  with open(os.path.join(run, "scores", "bottle.csv"), "w") as f:
    f.write("path,label,score,n_ref,seclip_only\n")
    for i in range(32):
      f.write(f"g{i}.png,0,{0.1 + 0.01 * i},7,0\n")
    for i in range(8):
      f.write(f"d{i}.png,1,{0.5 + 0.05 * i},7,0\n")
  page = open(report.write_report(run), encoding="utf-8").read()
  bottle_html = page[page.index('id="cat-bottle"'):page.index('id="cat-screw"')]
  assert 'id="histogram"' in bottle_html and "good (32)" in bottle_html and "defective (8)" in bottle_html
  assert bottle_html.count('class="threshold"') == 2                # F1-max and the FPR threshold
  for text in ("7 caught", "1 missed", "2 false alarms", "30 passed", "broken_large", "7 of 8",
               "97.0", 'class="colourbar"'):
    assert text in bottle_html, text
  assert "tick-mark" in bottle_html                                  # the contour's place on the bar
