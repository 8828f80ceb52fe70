"""Dataset readers: MVTec AD, VisA, BTAD and a plain folder, as lists of `Sample`s (test split).

Readers only list files (and check that every defective image has a mask file); decoding is the
loader's job. Every layout problem raises `BadInputError` saying which layout was expected.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.preprocess import PathLike, check_body, read_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

MVTEC_LAYOUT = ("expected <root>/<category>/test/<defect>/<image>, masks at "
                "<root>/<category>/ground_truth/<defect>/<stem>_mask.png (MVTec AD layout)")
VISA_LAYOUT = ("expected VisA as distributed, <root>/split_csv/1cls.csv with columns "
               "object,split,label,image,mask, or a <root>/meta.json in the APRIL-GAN / "
               'AnomalyCLIP / MuSc form {"test": {"<category>": [{"img_path", "mask_path", '
               '"anomaly", ...}]}} '
               "(paths relative to <root>)")
BTAD_LAYOUT = ("expected <root>/<category>/test/{ok,ko}/<image>, masks at "
               "<root>/<category>/ground_truth/ko/<same stem>.<png|bmp|...> (BTAD layout)")

_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
_CSV_LABELS = {"normal": 0, "anomaly": 1}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image to score.

  label: 1 defect, 0 good, -1 unknown (unlabeled). mask_path: the ground truth of a defective
  image, else None. defect: the defect type ('good' for normal images, '' when unlabeled).
  box: (top, left, height, width) in the image's pixels: only that part is scored (a tile,
  `data.tiles`), None: the whole image.
  """
  path: str
  label: int = -1
  mask_path: Optional[str] = None
  defect: str = ""
  box: Optional[Tuple[int, int, int, int]] = None


def class_name(category: str) -> str:
  """The object name used in prompts: '_' -> ' ' in the folder name ('metal_nut' -> 'metal nut')."""
  return category.replace("_", " ")


def _is_image(p: Path) -> bool:
  return (not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _list_images(d: Path) -> List[Path]:
  """Image files directly in `d` (extensions case-insensitive, dotfiles skipped), sorted by name."""
  if not d.is_dir():
    return []
  return sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(d: Path) -> List[Path]:
  return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.name)


def _index_by_stem(d: Path) -> Dict[str, Path]:
  """stem -> image file in `d`; when several share a stem the earlier IMAGE_EXTENSIONS wins."""
  rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
  index: Dict[str, Path] = {}
  for p in sorted(_list_images(d), key=lambda p: rank[p.suffix.lower()], reverse=True):
    index[p.stem] = p
  return index


def _existing_dir(root: PathLike, layout: str, what: str = "data root") -> Path:
  root = Path(root)
  if not root.is_dir():
    raise BadInputError(f"{what} {root} is not a folder; {layout}")
  return root


def _sorted(samples: List[Sample]) -> List[Sample]:
  return sorted(samples, key=lambda s: s.path)


def _require_some(samples: List[Sample], category: str, where: str, layout: str) -> List[Sample]:
  if not samples:
    raise BadInputError(f"category {category!r} has no test images in {where}; {layout}")
  return _sorted(samples)


# MVTec AD.


def mvtec_categories(root: PathLike) -> List[str]:
  """Sorted names of the folders under `root` that have a test/ subfolder."""
  root = _existing_dir(root, MVTEC_LAYOUT)
  cats = [d.name for d in _subdirs(root) if (d / "test").is_dir()]
  if not cats:
    hint = " (it looks like a category folder: pass its parent)" if (root / "test").is_dir() else ""
    raise BadInputError(f"data root {root} has no <category>/test/ folder{hint}; {MVTEC_LAYOUT}")
  return cats


def _category_test_dir(root: PathLike, category: str, layout: str) -> Path:
  test = _existing_dir(root, layout) / category / "test"
  if not test.is_dir():
    raise BadInputError(f"category {category!r}: {test} is not a folder; {layout}")
  return test


def mvtec_samples(root: PathLike, category: str) -> List[Sample]:
  """The test split of one MVTec AD category, sorted by path; defective images with their masks."""
  test = _category_test_dir(root, category, MVTEC_LAYOUT)
  ground_truth = test.parent / "ground_truth"
  samples = []
  for defect_dir in _subdirs(test):
    defect = defect_dir.name
    images = _list_images(defect_dir)
    if defect == "good":
      samples += [Sample(str(p), 0, None, "good") for p in images]
      continue
    masks = _index_by_stem(ground_truth / defect)
    for p in images:
      mask = masks.get(f"{p.stem}_mask")
      if mask is None:
        expected = ground_truth / defect / f"{p.stem}_mask.png"
        raise BadInputError(f"defective image {p} has no mask: expected {expected}")
      samples.append(Sample(str(p), 1, str(mask), defect))
  return _require_some(samples, category, f"{test}/<defect>/", MVTEC_LAYOUT)


def mvtec_train_samples(root: PathLike, category: str) -> List[Sample]:
  """The known-good training images of an MVTec AD category (`train/good`), sorted by path."""
  return _known_good(root, category, ("train", "good"), MVTEC_LAYOUT)


def _known_good(root: PathLike, category: str, where: Tuple[str, str], layout: str) -> List[Sample]:
  """The images of <root>/<category>/<where...>/ as normal samples; none is a clear error."""
  folder = _existing_dir(root, layout).joinpath(category, *where)
  samples = [Sample(str(p), 0, None, "good") for p in _list_images(folder)]
  if not samples:
    raise BadInputError(f"category {category!r} has no known-good images in {folder}; a bank "
                        f"(--k_shot) draws from <root>/<category>/{'/'.join(where)}/")
  return samples


# VisA.


def _visa_from_csv(root: Path, csv_path: Path, split: str = "test") -> Dict[str, List[Sample]]:
  """Rows of one split of split_csv/1cls.csv by category (a category without such rows maps to []).

  The train split holds normal images only; they are the known-good bank of few-shot runs.
  """
  table: Dict[str, List[Sample]] = {}
  try:
    with open(csv_path, newline="", encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as err:
    raise BadInputError(f"{csv_path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"{VISA_LAYOUT}") from err
  reader = csv.DictReader(io.StringIO(text, newline=""))
  missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise BadInputError(f"{csv_path}: missing columns {missing}; {VISA_LAYOUT}")
  for row in reader:
    row = {k: (row.get(k) or "").strip() for k in _CSV_COLUMNS}
    cat_samples = table.setdefault(row["object"], [])
    if row["split"] != split:
      continue
    where = f"{csv_path} line {reader.line_num}"
    label = _CSV_LABELS.get(row["label"])
    if label is None:
      raise BadInputError(f"{where}: label {row['label']!r}; expected 'normal' or 'anomaly'")
    image = str(root / row["image"])
    if label and not row["mask"]:
      raise BadInputError(f"{where}: anomalous image {image} has no mask path")
    mask = str(root / row["mask"]) if label else None
    cat_samples.append(Sample(image, label, mask, "anomaly" if label else "good"))
  return table


def _visa_from_meta(root: Path, meta_path: Path, split: str = "test") -> Dict[str, List[Sample]]:
  """One part ("test" or "train") of an APRIL-GAN / AnomalyCLIP / MuSc meta.json, by category."""
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as err:
    raise BadInputError(f"{meta_path}: cannot read it as JSON ({err}); {VISA_LAYOUT}") from err
  part = meta.get(split) if isinstance(meta, dict) else None
  if not isinstance(part, dict):
    raise BadInputError(f"{meta_path}: no \"{split}\" object; {VISA_LAYOUT}")
  table: Dict[str, List[Sample]] = {}
  for cat, items in part.items():
    if not isinstance(items, list):
      raise BadInputError(f"{meta_path}: {split}/{cat} is not a list; {VISA_LAYOUT}")
    table[cat] = [_meta_sample(root, meta_path, f"{split}/{cat}", i, item) for i, item in enumerate(items)]
  return table


def _meta_sample(root: Path, meta_path: Path, cat: str, i: int, item) -> Sample:
  where = f"{meta_path}: {cat}[{i}]"
  if not isinstance(item, dict) or "img_path" not in item or "anomaly" not in item:
    raise BadInputError(f"{where} lacks img_path or anomaly; {VISA_LAYOUT}")
  if item["anomaly"] not in (0, 1):
    raise BadInputError(f"{where}: anomaly is {item['anomaly']!r}; expected 0 or 1")
  label = int(item["anomaly"])
  image = str(root / item["img_path"])
  if not label:
    return Sample(image, 0, None, "good")
  if not item.get("mask_path"):
    raise BadInputError(f"{where}: anomalous image {image} has no mask_path")
  return Sample(image, 1, str(root / item["mask_path"]), item.get("specie_name") or "anomaly")


def _visa_table(root: PathLike, split: str = "test") -> Dict[str, List[Sample]]:
  """All VisA samples of a split by category; split_csv/1cls.csv is preferred over meta.json."""
  root = _existing_dir(root, VISA_LAYOUT)
  csv_path = root / "split_csv" / "1cls.csv"
  meta_path = root / "meta.json"
  if csv_path.is_file():
    return _visa_from_csv(root, csv_path, split)
  if meta_path.is_file():
    return _visa_from_meta(root, meta_path, split)
  raise BadInputError(
      f"data root {root} has neither split_csv/1cls.csv nor meta.json; {VISA_LAYOUT}")


def visa_categories(root: PathLike) -> List[str]:
  """Sorted VisA category names ('candle', ..., 'pipe_fryum')."""
  cats = sorted(_visa_table(root))
  if not cats:
    raise BadInputError(f"data root {root}: the split file lists no category; {VISA_LAYOUT}")
  return cats


def visa_samples(root: PathLike, category: str) -> List[Sample]:
  """The test split of one VisA category, sorted by path; every mask file must exist."""
  table = _visa_table(root)
  if category not in table:
    raise BadInputError(f"VisA category {category!r} is not in {root}; found {sorted(table)}")
  for s in table[category]:
    if s.mask_path is not None and not os.path.isfile(s.mask_path):
      raise BadInputError(f"defective image {s.path} has no mask: expected {s.mask_path}")
  return _require_some(table[category], category, f"the test split of {root}", VISA_LAYOUT)


def visa_train_samples(root: PathLike, category: str) -> List[Sample]:
  """The normal training images of a VisA category (split "train", label "normal"), sorted."""
  table = _visa_table(root, "train")
  normals = [s for s in table.get(category, []) if s.label == 0]
  if not normals:
    raise BadInputError(f"VisA category {category!r} has no normal training image in the split "
                        f"file of {root}; a bank (--k_shot) draws from them")
  return _sorted(normals)


# BTAD.


def btad_categories(root: PathLike) -> List[str]:
  """Sorted names of the folders under `root` that have test/ok/ or test/ko/."""
  root = _existing_dir(root, BTAD_LAYOUT)
  cats = [d.name for d in _subdirs(root)
          if (d / "test" / "ok").is_dir() or (d / "test" / "ko").is_dir()]
  if not cats:
    raise BadInputError(f"data root {root} has no <category>/test/ok|ko/ folder; {BTAD_LAYOUT}")
  return cats


def btad_samples(root: PathLike, category: str) -> List[Sample]:
  """The test split of one BTAD category; masks matched by file stem whatever their extension."""
  test = _category_test_dir(root, category, BTAD_LAYOUT)
  samples = [Sample(str(p), 0, None, "good") for p in _list_images(test / "ok")]
  gt_dir = test.parent / "ground_truth" / "ko"
  masks = _index_by_stem(gt_dir)
  for p in _list_images(test / "ko"):
    mask = masks.get(p.stem)
    if mask is None:
      raise BadInputError(
          f"defective image {p} has no mask: expected {gt_dir}/{p.stem}.<png|bmp|...>")
    samples.append(Sample(str(p), 1, str(mask), "ko"))
  return _require_some(samples, category, f"{test}/ok/ or {test}/ko/", BTAD_LAYOUT)


def btad_train_samples(root: PathLike, category: str) -> List[Sample]:
  """The known-good training images of a BTAD category (`train/ok`), sorted by path."""
  return _known_good(root, category, ("train", "ok"), BTAD_LAYOUT)


# A plain folder.


def list_folder(directory: PathLike, recursive: bool = False,
                exclude: Sequence[PathLike] = ()) -> Tuple[List[Sample], List[str]]:
  """(images, ignored files) under `directory`, both sorted by path; unlabeled images (label -1).

  recursive: also search sub-folders (hidden ones skipped). Ignored (listed, not scored): files that
  are not images by their extension, hidden files, and links that lead nowhere. exclude: folders
  left out entirely (a program's own --out inside its input: its overlays are not parts).
  """
  layout = f"expected a folder of images ({' '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
  d = _existing_dir(directory, layout, "image folder")
  skip = {os.path.realpath(x) for x in exclude}
  images, ignored = [], []
  walk = os.walk(d) if recursive else [(str(d), [], os.listdir(d))]
  for folder, subdirs, files in walk:
    subdirs[:] = sorted(x for x in subdirs if not x.startswith(".")
                        and os.path.realpath(os.path.join(folder, x)) not in skip)
    if os.path.realpath(folder) in skip:
      continue
    for name in files:
      p = Path(folder) / name
      if os.path.isdir(p):
        continue
      if name.startswith(".") or not p.is_file():            # hidden, or a dangling link
        ignored.append(str(p))
        continue
      (images if _is_image(p) else ignored).append(str(p))
  if not images:
    hint = "" if recursive else " (sub-folders are not searched: pass --recursive)"
    raise BadInputError(f"folder {d} has no images{hint}; {layout}")
  return [Sample(p, -1, None, "") for p in sorted(images)], sorted(ignored)


def folder_samples(directory: PathLike, recursive: bool = False) -> List[Sample]:
  """The images in `directory` (sub-folders too when recursive), sorted, unlabeled (label -1)."""
  return list_folder(directory, recursive)[0]


class FileProblem(NamedTuple):
  sample: Sample
  error: BadInputError
  in_mask: bool        # the ground truth is wrong (never skipped: it would bias the metrics)


def check_files(samples: List[Sample], min_side: int = 1) -> List[FileProblem]:
  """Checks of every file before any model work: each image's header is readable, its body not cut
  short (`check_body`: PNG and JPEG, without decoding pixels), its sides at least `min_side` pixels
  (a tower's patch: a smaller image holds less than one patch), and each mask has its image's
  size. Returns the problems found."""
  problems = []
  for s in samples:
    try:
      size = read_size(s.path, "image")
      if min(size) < min_side:
        raise BadInputError(f"image {s.path} is {size[0]}x{size[1]} px; expected at least "
                            f"{min_side} px on each side (one patch of the model)")
      check_body(s.path, "image")
    except BadInputError as err:
      problems.append(FileProblem(s, err, False))
      continue
    if s.mask_path is None:
      continue
    try:
      mask_size = read_size(s.mask_path, f"mask (of image {s.path})")
      if mask_size != size:
        raise BadInputError(
            f"mask {s.mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {s.path} "
            f"is {size[0]}x{size[1]}; a mask must have the same size as its image")
      check_body(s.mask_path, f"mask (of image {s.path})")
    except BadInputError as err:
      problems.append(FileProblem(s, err, True))
  return problems
