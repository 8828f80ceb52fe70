"""Tests for fiseclip_jax.data: readers, preprocessing, batching, bad input, the demo set."""
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax import data as fd

S = 32
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _save(path: Path, img: Image.Image, **kw) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, **kw)
  return path


def _rgb(path: Path, size=(40, 30), colour=(200, 100, 50)) -> Path:
  return _save(path, Image.new("RGB", size, colour))


def _mask(path: Path, size=(40, 30), box=(0, 0, 20, 30), value=255) -> Path:
  m = Image.new("L", size, 0)
  m.paste(value, box)
  return _save(path, m)


def _mvtec(root: Path, category="metal_nut", size=(40, 30)) -> Path:
  """A tiny MVTec AD category: 2 good, 2 'crack' with masks."""
  cat = root / category
  for name in ("000.png", "001.png"):
    _rgb(cat / "test" / "good" / name, size, (10, 20, 30))
    _rgb(cat / "test" / "crack" / name, size, (200, 10, 10))
    _mask(cat / "ground_truth" / "crack" / name.replace(".png", "_mask.png"), size)
  return root


def _mode(path) -> str:
  with Image.open(path) as img:
    return img.mode


def _white_8bit() -> np.ndarray:
  return fd.preprocess_image(Image.new("RGB", (8, 8), (255, 255, 255)), S)


# Preprocessing.


def test_preprocess_matches_the_recipe(tmp_path):
  """RGB in [0, 1] (/255); each tower normalizes with its own statistics inside the jit."""
  p = _rgb(tmp_path / "a.png", (50, 20), (255, 128, 0))
  x = fd.load_image(p, S)
  assert x.shape == (S, S, 3) and x.dtype == np.float32
  expected = np.array([255, 128, 0]) / 255.0
  np.testing.assert_allclose(x[S // 2, S // 2], expected, atol=1e-6)
  np.testing.assert_array_equal(fd.to_uint8(x)[0, 0], [255, 128, 0])
  assert fd.to_uint8_rgb(p, S).shape == (S, S, 3)


def test_any_mode_loads_as_rgb(tmp_path):
  white = _white_8bit()
  grey = _save(tmp_path / "l.png", Image.new("L", (20, 10), 255))
  la = _save(tmp_path / "la.png", Image.new("LA", (20, 10), (255, 7)))
  rgba = _save(tmp_path / "rgba.png", Image.new("RGBA", (20, 10), (255, 255, 255, 0)))
  one_bit = _save(tmp_path / "1.png", Image.new("1", (20, 10), 1))
  w16 = _save(tmp_path / "w16.png", Image.fromarray(np.full((10, 20), 65535, np.uint16)))
  w32 = _save(tmp_path / "w32.tif", Image.fromarray(np.full((10, 20), 65535, np.int32)))
  cmyk = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (20, 10), (0, 0, 0, 0)), quality=100)
  assert [_mode(p) for p in (w16, w32, cmyk)] == ["I;16", "I", "CMYK"]
  for p in (grey, la, rgba, one_bit, w16, w32, cmyk):
    x = fd.load_image(p, S)
    assert x.shape == (S, S, 3) and x.dtype == np.float32 and np.isfinite(x).all(), p
    np.testing.assert_allclose(x, white, atol=0.013, err_msg=str(p))  # JPEG: +-1 grey level


def test_16bit_is_scaled_not_clipped(tmp_path):
  mid = _save(tmp_path / "mid.png", Image.fromarray(np.full((10, 20), 128 * 257, np.uint16)))
  x = fd.load_image(mid, S)
  np.testing.assert_allclose(x, fd.preprocess_image(Image.new("RGB", (8, 8), (128,) * 3), S),
                             atol=1e-6)
  black = _save(tmp_path / "k.png", Image.fromarray(np.zeros((10, 20), np.uint16)))
  assert fd.to_uint8(fd.load_image(black, S)).max() == 0


def test_palette_and_cmyk_colours(tmp_path):
  pal = Image.new("P", (20, 10), 1)
  pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  red = fd.preprocess_image(Image.new("RGB", (8, 8), (255, 0, 0)), S)
  np.testing.assert_allclose(fd.load_image(_save(tmp_path / "p.png", pal), S), red, atol=1e-6)
  pal_t = pal.copy()
  pal_t.info["transparency"] = 0
  np.testing.assert_allclose(fd.load_image(_save(tmp_path / "pt.png", pal_t), S), red, atol=1e-6)
  cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (20, 10), (0, 255, 255, 0)), quality=100)
  np.testing.assert_allclose(fd.load_image(cmyk, S), red, atol=0.013)


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
  good = _rgb(tmp_path / "good.jpg", (64, 64))
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(good.read_bytes()[:200])
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image at all")
  missing = tmp_path / "missing.png"
  for p in (truncated, garbage, missing):
    with pytest.raises(fd.BadInputError, match=p.name):
      fd.load_image(p, S)


def test_bad_image_in_batches_raises_or_is_skipped(tmp_path, caplog):
  paths = [_rgb(tmp_path / f"{i}.png", colour=(i * 50, 0, 0)) for i in range(4)]
  bad = tmp_path / "2.png"
  bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
  samples = fd.folder_samples(tmp_path)
  with pytest.raises(fd.BadInputError, match="2.png"):
    list(fd.iter_batches(samples, 2, S))
  skipped = []
  with caplog.at_level(logging.WARNING):
    batches = list(fd.iter_batches(samples, 2, S, skip_bad_images=True,
                                   on_skip=lambda p, e: skipped.append(p)))
  assert skipped == [str(bad)]
  assert "2.png" not in caplog.text        # the caller reports it: warned once, not twice
  with caplog.at_level(logging.WARNING):
    list(fd.iter_batches(samples, 2, S, skip_bad_images=True))
  assert "2.png" in caplog.text            # no caller listening: the loader logs it
  assert [b.valid.tolist() for b in batches] == [[True, True], [True, False]]
  kept = [s.path for b in batches for s in b.samples if s is not None]
  assert kept == [str(paths[0]), str(paths[1]), str(paths[3])]  # the slot is refilled, in order


# Masks.


def test_mask_is_any_nonzero_and_resized_bilinear(tmp_path):
  img = _rgb(tmp_path / "img.png", (40, 30))
  m = _mask(tmp_path / "m.png", (40, 30), box=(0, 0, 20, 30), value=1)  # VisA-style index 1
  out = fd.load_mask(m, S, img, (30, 40))
  assert out.dtype == bool and out.shape == (S, S)
  assert out[:, : S // 2 - 1].all() and not out[:, S // 2 + 1:].any()


def test_mask_of_another_size_names_both_files(tmp_path):
  root = _mvtec(tmp_path)
  mask = root / "metal_nut" / "ground_truth" / "crack" / "001_mask.png"
  _mask(mask, (41, 30))
  image = root / "metal_nut" / "test" / "crack" / "001.png"
  with pytest.raises(fd.BadInputError) as err:
    fd.load_mask(mask, S, image, (30, 40))
  assert str(mask) in str(err.value) and str(image) in str(err.value)
  with pytest.raises(fd.BadInputError) as err:
    list(fd.iter_batches(fd.mvtec_samples(root, "metal_nut"), 4, S))
  assert str(mask) in str(err.value) and str(image) in str(err.value)
  assert "41x30" in str(err.value) and "40x30" in str(err.value)


# Readers.


def test_mvtec_samples(tmp_path):
  root = _mvtec(tmp_path)
  _rgb(root / "metal_nut" / "train" / "good" / "000.png")  # the train split is not listed
  (root / "notes").mkdir()
  assert fd.mvtec_categories(root) == ["metal_nut"]
  samples = fd.mvtec_samples(root, "metal_nut")
  assert [s.path for s in samples] == sorted(s.path for s in samples)
  assert [(s.label, s.defect) for s in samples] == [(1, "crack")] * 2 + [(0, "good")] * 2
  assert samples[0].mask_path.endswith("ground_truth/crack/000_mask.png")
  assert all(s.mask_path is None for s in samples[2:])
  assert fd.class_name("metal_nut") == "metal nut" and fd.class_name("pcb1") == "pcb1"
  assert fd.class_name("pipe_fryum") == "pipe fryum"


def test_defective_image_without_mask_names_both(tmp_path):
  root = _mvtec(tmp_path)
  _rgb(root / "metal_nut" / "test" / "crack" / "002.png")
  with pytest.raises(fd.BadInputError) as err:
    fd.mvtec_samples(root, "metal_nut")
  msg = str(err.value)
  assert str(root / "metal_nut" / "test" / "crack" / "002.png") in msg
  assert str(root / "metal_nut" / "ground_truth" / "crack" / "002_mask.png") in msg


def test_empty_category(tmp_path):
  (tmp_path / "screw" / "test" / "good").mkdir(parents=True)
  with pytest.raises(fd.BadInputError, match="'screw'.*no test images"):
    fd.mvtec_samples(tmp_path, "screw")
  (tmp_path / "01" / "test" / "ok").mkdir(parents=True)
  with pytest.raises(fd.BadInputError, match="'01'.*no test images"):
    fd.btad_samples(tmp_path, "01")


def test_wrong_layout_says_which_was_expected(tmp_path):
  _rgb(tmp_path / "a.png")
  with pytest.raises(fd.BadInputError, match=r"MVTec AD layout") as err:
    fd.mvtec_categories(tmp_path)
  assert "<root>/<category>/test/<defect>/" in str(err.value)
  with pytest.raises(fd.BadInputError, match="MVTec AD layout"):
    fd.mvtec_samples(tmp_path, "bottle")
  with pytest.raises(fd.BadInputError, match="1cls.csv.*meta.json"):
    fd.visa_categories(tmp_path)
  with pytest.raises(fd.BadInputError, match="BTAD layout"):
    fd.btad_categories(tmp_path)
  with pytest.raises(fd.BadInputError, match="not a folder"):
    fd.mvtec_categories(tmp_path / "nowhere")
  root = _mvtec(tmp_path / "r")
  with pytest.raises(fd.BadInputError, match="pass its parent"):
    fd.mvtec_categories(root / "metal_nut")


def _visa_files(root: Path):
  for rel in ("candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Anomaly/000.JPG",
              "pipe_fryum/Data/Images/Normal/0000.JPG"):
    _rgb(root / rel)
  _mask(root / "candle/Data/Masks/Anomaly/000.png", value=1)


def test_visa_split_csv(tmp_path):
  _visa_files(tmp_path)
  csv_path = tmp_path / "split_csv" / "1cls.csv"
  csv_path.parent.mkdir()
  csv_path.write_text(
      "object,split,label,image,mask\n"
      "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
      "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
      "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
      "pipe_fryum,test,normal,pipe_fryum/Data/Images/Normal/0000.JPG,\n")
  assert fd.visa_categories(tmp_path) == ["candle", "pipe_fryum"]
  samples = fd.visa_samples(tmp_path, "candle")
  assert [(Path(s.path).name, s.label, s.defect) for s in samples] == [
      ("000.JPG", 1, "anomaly"), ("0000.JPG", 0, "good")]
  assert samples[0].mask_path == str(tmp_path / "candle/Data/Masks/Anomaly/000.png")
  batch = next(fd.iter_batches(samples, 2, S))
  assert batch.masks[0].any() and not batch.masks[1].any()
  with pytest.raises(fd.BadInputError, match="'nope'"):
    fd.visa_samples(tmp_path, "nope")
  # Preferred over meta.json when both exist.
  (tmp_path / "meta.json").write_text(json.dumps({"test": {"other": []}}))
  assert fd.visa_categories(tmp_path) == ["candle", "pipe_fryum"]


def test_visa_meta_json(tmp_path):
  _visa_files(tmp_path)
  meta = {"train": {"candle": []}, "test": {
      "candle": [
          {"img_path": "candle/Data/Images/Normal/0000.JPG", "mask_path": "",
           "cls_name": "candle", "specie_name": "", "anomaly": 0},
          {"img_path": "candle/Data/Images/Anomaly/000.JPG",
           "mask_path": "candle/Data/Masks/Anomaly/000.png", "cls_name": "candle",
           "specie_name": "", "anomaly": 1}],
      "pipe_fryum": [
          {"img_path": "pipe_fryum/Data/Images/Normal/0000.JPG", "mask_path": "",
           "cls_name": "pipe_fryum", "specie_name": "", "anomaly": 0}]}}
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  assert fd.visa_categories(tmp_path) == ["candle", "pipe_fryum"]
  samples = fd.visa_samples(tmp_path, "candle")
  assert [(s.label, s.defect, s.mask_path is None) for s in samples] == [
      (1, "anomaly", False), (0, "good", True)]
  meta["test"]["candle"][1]["mask_path"] = "candle/Data/Masks/Anomaly/999.png"
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(fd.BadInputError, match="000.JPG.*999.png"):
    fd.visa_samples(tmp_path, "candle")


def test_btad_masks_matched_by_stem(tmp_path):
  cat = tmp_path / "03"
  _rgb(cat / "test" / "ok" / "0000.bmp")
  _rgb(cat / "test" / "ko" / "0001.bmp")
  _rgb(cat / "test" / "ko" / "0002.png")
  _mask(cat / "ground_truth" / "ko" / "0001.bmp")
  _mask(cat / "ground_truth" / "ko" / "0002.png")
  assert fd.btad_categories(tmp_path) == ["03"]
  samples = fd.btad_samples(tmp_path, "03")
  assert [(Path(s.path).name, s.label) for s in samples] == [
      ("0001.bmp", 1), ("0002.png", 1), ("0000.bmp", 0)]
  assert samples[0].mask_path == str(cat / "ground_truth" / "ko" / "0001.bmp")
  batch = next(fd.iter_batches(samples, 4, S))
  assert batch.masks[:2].any(axis=(1, 2)).all() and not batch.masks[2:].any()
  _rgb(cat / "test" / "ko" / "0003.jpg")
  with pytest.raises(fd.BadInputError, match="0003.jpg.*ground_truth/ko/0003"):
    fd.btad_samples(tmp_path, "03")


def test_folder_samples(tmp_path):
  for name in ("b.PNG", "a.jpeg", "c.TIF", "d.webp", "e.Bmp"):
    _rgb(tmp_path / name)
  (tmp_path / "notes.txt").write_text("x")
  (tmp_path / "sub").mkdir()
  _rgb(tmp_path / "sub" / "z.png")  # not recursive
  samples = fd.folder_samples(tmp_path)
  assert [Path(s.path).name for s in samples] == ["a.jpeg", "b.PNG", "c.TIF", "d.webp", "e.Bmp"]
  assert all(s.label == -1 and s.mask_path is None and s.defect == "" for s in samples)
  (tmp_path / "empty").mkdir()
  with pytest.raises(fd.BadInputError, match="no images"):
    fd.folder_samples(tmp_path / "empty")
  with pytest.raises(fd.BadInputError, match="not a folder"):
    fd.folder_samples(tmp_path / "a.jpeg")


# Batches.


def test_padded_last_batch(tmp_path):
  root = _mvtec(tmp_path)
  _rgb(root / "metal_nut" / "test" / "good" / "002.png", (40, 30), (10, 20, 30))
  samples = fd.mvtec_samples(root, "metal_nut")  # 2 crack, 3 good
  batches = list(fd.iter_batches(samples, 2, S, num_workers=2))
  assert len(batches) == 3
  for b in batches:
    assert b.images.shape == (2, S, S, 3) and b.images.dtype == np.float32
    assert b.valid.shape == (2,) and b.labels.shape == (2,) and b.masks.shape == (2, S, S)
  last = batches[-1]
  assert last.valid.tolist() == [True, False] and last.samples[1] is None
  assert last.labels.tolist() == [0, -1]
  assert not last.images[1].any() and not last.masks[1].any()
  assert [b.labels.tolist() for b in batches[:2]] == [[1, 1], [0, 0]]
  assert batches[0].masks.all(axis=0)[:, : S // 2 - 1].all()  # left half of 40 px is defect
  assert not batches[1].masks.any()
  no_masks = list(fd.iter_batches(samples, 2, S, with_masks=False))
  assert all(b.masks is None for b in no_masks)


def test_batches_are_deterministic_whatever_the_threads(tmp_path):
  for i in range(11):
    _rgb(tmp_path / f"{i:02d}.png", colour=(i * 20, 0, 0))
  samples = fd.folder_samples(tmp_path)
  ref = [b.images for b in fd.iter_batches(samples, 4, S, num_workers=0)]
  for workers in (1, 4):
    got = [b.images for b in fd.iter_batches(samples, 4, S, num_workers=workers)]
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
      np.testing.assert_array_equal(a, b)
  first = next(fd.iter_batches(samples, 4, S))  # abandoning the iterator is fine
  assert first.valid.all()


def test_next_batches_are_decoded_while_the_caller_works(tmp_path, monkeypatch):
  from fiseclip_jax.data import loader
  for i in range(12):
    _rgb(tmp_path / f"{i:02d}.png")
  decoded = []
  real = loader.read_rgb
  monkeypatch.setattr(loader, "read_rgb", lambda path: decoded.append(path) or real(path))
  batches = fd.iter_batches(fd.folder_samples(tmp_path), 2, S, num_workers=2, prefetch_batches=2)
  next(batches)
  deadline = time.monotonic() + 5.0
  while len(decoded) < 6 and time.monotonic() < deadline:  # this batch and the next two
    time.sleep(0.01)
  assert len(decoded) == 6
  assert sum(1 for _ in batches) == 5


# The embedded demo set and the real images in ../shared/data.


def test_demo_set_present_and_readable():
  root = Path(fd.demo_root())
  assert (root / "NOTICE.txt").is_file()
  assert "Apache License" in (root / "NOTICE.txt").read_text()
  assert fd.mvtec_categories(root) == ["hazelnut"]
  samples = fd.mvtec_samples(root, "hazelnut")
  assert len(samples) == 23 and sum(s.mask_path is not None for s in samples) == 17
  assert not (root / "hazelnut" / "train").exists()
  size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
  assert size < 1024 * 1024
  batches = list(fd.iter_batches(samples, 8, S))
  assert len(batches) == 3 and sum(int(b.valid.sum()) for b in batches) == 23
  defect = np.concatenate([b.masks[b.labels == 1] for b in batches])
  assert len(defect) == 17 and defect.any(axis=(1, 2)).all()


def _shared(name: str) -> Path:
  path = SHARED_DATA / name
  if not path.is_dir():
    pytest.skip(f"{path} is absent (a fresh clone has no ../shared/data)")
  return path


def test_real_mvtec_grid_subset():
  root = _shared("mvtec_ad_grid_subset")
  assert fd.mvtec_categories(root) == ["grid"]
  samples = fd.mvtec_samples(root, "grid")
  assert len(samples) == 14 and sum(s.label == 1 for s in samples) == 11
  assert sum(s.mask_path is not None for s in samples) == 11
  assert _mode(samples[0].path) == "L"
  batches = list(fd.iter_batches(samples, 8, 64))
  assert [int(b.valid.sum()) for b in batches] == [8, 6]
  labels = np.concatenate([b.labels[b.valid] for b in batches])
  masks = np.concatenate([b.masks[b.valid] for b in batches])
  assert np.isfinite(np.concatenate([b.images for b in batches])).all()
  assert masks[labels == 1].any(axis=(1, 2)).sum() >= 9  # thin defects may vanish at 64 px
  assert not masks[labels == 0].any()


def test_real_hazelnut_source_matches_demo():
  src = _shared("otx_hazelnut_colour")
  full = fd.mvtec_samples(src, "hazelnut")
  demo = fd.mvtec_samples(fd.demo_root(), "hazelnut")
  assert [Path(s.path).name for s in full] == [Path(s.path).name for s in demo]
  a = fd.load_image(full[0].path, S)
  b = fd.load_image(demo[0].path, S)
  assert np.abs(a - b).mean() < 0.05
