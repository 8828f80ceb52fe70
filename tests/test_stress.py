"""The repeated-defect stress benchmark (DESIGN.md §16): the pasting it does, and the program on a
real defect of ../shared/data (a bank's scores do not depend on the other images of the batch;
bad settings are one line)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data
from fiseclip_jax.bench import stress

ROOT = Path(__file__).resolve().parents[1]


def defect(size=32, seed=0):
  rng = np.random.RandomState(seed)
  mask = np.zeros((size, size), bool)
  mask[5:9, 20:27] = True
  return stress.Defect(rng.rand(size, size, 3).astype(np.float32), mask)


def test_a_pasted_copy_moves_the_defect_pixels_and_their_mask():
  d = defect()
  base = np.zeros((32, 32, 3), np.float32)
  img, gt = stress.paste(base, d, (10, -20))
  np.testing.assert_array_equal(gt[15:19, 0:7], True)
  assert gt.sum() == d.mask.sum()
  np.testing.assert_array_equal(img[15:19, 0:7], d.pixels[5:9, 20:27])
  assert not img[~gt].any()                          # nothing else touched


def test_random_places_keep_the_region_inside_and_same_keeps_it_in_place():
  d = defect()
  rng = np.random.RandomState(1)
  moves = stress.shifts(d.mask, 200, "random", rng)
  ys, xs = np.nonzero(d.mask)
  for dy, dx in moves:
    assert 0 <= ys.min() + dy and ys.max() + dy < 32 and 0 <= xs.min() + dx and xs.max() + dx < 32
  assert len(set(moves)) > 100 and stress.shifts(d.mask, 3, "same", rng) == [(0, 0)] * 3
  images, masks, carriers = stress.stressed_batch(np.zeros((6, 32, 32, 3), np.float32), d, 4,
                                                  "same", 0)
  assert carriers.sum() == 4 and masks[carriers].all(axis=0).sum() == d.mask.sum()
  assert not masks[~carriers].any() and not images[~carriers].any()


def test_the_program_on_a_real_defect(tmp_path):
  hazelnut = shared_data("otx_hazelnut_colour", "hazelnut")
  common = [sys.executable, "-m", "eval.stress", f"--category_dir={hazelnut}", "--random_weights",
            "--model=demo", "--image_size=112", "--platform=cpu"]
  p = subprocess.run(common + ["--batch_size=4", "--repeats=1,2", "--placements=same",
                               "--ref_aggs=interval", "--references=batch,bank", "--bank_size=2",
                               f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads((tmp_path / "stress.json").read_text())
  rows = {(r["references"], r["k"]): r for r in out["rows"]}
  assert sorted(rows) == [("bank", 1), ("bank", 2), ("batch", 1), ("batch", 2)]
  for r in out["rows"]:
    assert sum(r["carriers"]) == r["k"] and 0 <= r["pixel_auroc"] <= 1
  # Against a bank a part's score is its own: a slot clean (or carrying the same copy) in both
  # batches scores the same whatever else is in the batch.
  a, b = rows[("bank", 1)], rows[("bank", 2)]
  same = [i for i in range(4) if a["carriers"][i] == b["carriers"][i]]
  assert same
  np.testing.assert_allclose([a["scores"][i] for i in same], [b["scores"][i] for i in same],
                             atol=1e-5, rtol=0)
  table = (tmp_path / "stress.md").read_text()
  assert "| batch | interval | same |" in table and "k=2" in table
  bad = subprocess.run(common + ["--batch_size=4", "--repeats=4", f"--out={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: --repeats 4") and \
      bad.stderr.count("\n") == 1, bad.stderr
