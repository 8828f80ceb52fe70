"""Image and mask preprocessing: any PIL-readable file to the towers' NHWC float32 input.

As in DESIGN.md §2: convert to RGB, resize to S x S with PIL bicubic (no crop), /255: RGB in
[0, 1]. Each tower normalizes with its own mean and std inside the jit. Every bad input raises
`BadInputError` with a message that names the file(s) and what was expected (DESIGN.md §13).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from fiseclip_jax.core.errors import BadInputError

PathLike = Union[str, os.PathLike]

# Modes whose samples are wider than 8 bits: scaled, not clipped, to 0..255.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@contextlib.contextmanager
def _opened(path: PathLike, what: str):
  """PIL's open with every failure as a BadInputError naming the file and what was expected."""
  try:
    with Image.open(path) as img:
      yield img
  except FileNotFoundError as err:
    raise BadInputError(f"{what} {os.fspath(path)}: file not found") from err
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    raise BadInputError(
        f"{what} {os.fspath(path)}: cannot read it as an image ({err}); expected a complete "
        "PNG/JPEG/BMP/TIFF/WebP file") from err


def _open_decoded(path: PathLike, what: str) -> Image.Image:
  """Opens and fully decodes `path`, so that truncated files fail here and not later.

  The file is closed on return (the decoded pixels stay in memory), also when decoding fails.
  """
  with _opened(path, what) as img:
    img.load()
  return img


def read_size(path: PathLike, what: str = "image") -> Tuple[int, int]:
  """(width, height) from the file's header, nothing decoded: the cheap check of a whole data set."""
  with _opened(path, what) as img:
    return img.size


JPEG_END = b"\xff\xd9"


def check_body(path: PathLike, what: str = "image") -> None:
  """BadInputError if the file's body is cut short, found without decoding pixels where the format
  allows: a PNG's chunks are read to IEND with their CRCs (`verify`, a few ms); a JPEG without its
  end marker near the end of the file is decoded to be sure (cameras may append data after it).
  Other formats are only checked when decoded."""
  with _opened(path, what) as img:
    fmt = img.format
  if fmt == "PNG":
    try:
      with Image.open(path) as img:
        img.verify()
    except (OSError, SyntaxError, ValueError) as err:
      raise BadInputError(f"{what} {os.fspath(path)}: its body is damaged or cut short ({err}); "
                          "expected a complete PNG file") from err
  elif fmt == "JPEG":
    with open(path, "rb") as f:
      f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
      tail = f.read()
    if JPEG_END not in tail:
      _open_decoded(path, what)           # raises naming the file if it is cut short


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
  """Single-channel 16/32-bit or float samples -> uint8, scaled to the type's full range.

  Integer modes ('I;16*', 'I') are read as 16-bit (0..65535 -> 0..255, so 65535 is 255).
  Float ('F') is read as 0..1 when its maximum is <= 1, else as 0..255.
  """
  x = np.asarray(img).astype(np.float64)
  x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
  if img.mode == "F":
    scale = 255.0 if x.size and x.max() <= 1.0 else 1.0
  else:
    scale = 255.0 / 65535.0
  return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts a decoded PIL image of any mode to 8-bit RGB.

  Alpha is dropped (as open_clip's `convert('RGB')` does); palette images with a transparency
  entry go through RGBA so PIL does not warn; wide greyscale is scaled, not clipped.
  """
  if img.mode == "RGB":
    return img
  if img.mode in _WIDE_MODES:
    return Image.fromarray(_wide_to_uint8(img)).convert("RGB")
  if img.mode in ("P", "PA") or "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


def read_rgb(path: PathLike) -> Image.Image:
  """Reads `path` at full resolution as an 8-bit RGB PIL image."""
  img = _open_decoded(path, "image")
  try:
    return to_rgb(img)
  except (OSError, ValueError) as err:
    raise BadInputError(
        f"image {os.fspath(path)}: cannot convert mode {img.mode!r} to RGB ({err})") from err


def crop(img: Image.Image, box: Optional[Tuple[int, int, int, int]]) -> Image.Image:
  """The (top, left, height, width) part of an image (None: all of it); a box past the image's
  edge is a caller's error."""
  if box is None:
    return img
  top, left, h, w = box
  if top < 0 or left < 0 or top + h > img.height or left + w > img.width or h < 1 or w < 1:
    raise ValueError(f"box {box} (top, left, height, width) is not inside a "
                     f"{img.width}x{img.height} (WxH) image")
  return img.crop((left, top, left + w, top + h))


def resize_rgb(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize to size x size, no crop (the aspect ratio is not kept)."""
  if img.size == (size, size):
    return img
  return img.resize((size, size), Image.Resampling.BICUBIC)


PAD_GREY = 128     # the letterbox padding, uint8 on every channel


def letterbox_box(hw: Tuple[int, int], size: int) -> Tuple[int, int, int, int]:
  """(top, left, height, width) of an (H, W) image letterboxed into size x size: the longer side
  `size`, the shorter one scaled with it (rounded, at least 1), centred (DESIGN.md §2)."""
  h, w = hw
  scale = size / max(h, w)
  nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
  return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox_rgb(img: Image.Image, size: int) -> Tuple[Image.Image, Tuple[int, int, int, int]]:
  """An RGB image letterboxed to size x size (bicubic, grey padding) and its content box."""
  top, left, h, w = box = letterbox_box((img.height, img.width), size)
  canvas = Image.new("RGB", (size, size), (PAD_GREY,) * 3)
  canvas.paste(img if img.size == (w, h) else img.resize((w, h), Image.Resampling.BICUBIC),
               (left, top))
  return canvas, box


def content_mask(box: Tuple[int, int, int, int], size: int) -> np.ndarray:
  """(size, size) bool: the pixels of a letterboxed image that are the image's (not padding)."""
  top, left, h, w = box
  m = np.zeros((size, size), bool)
  m[top:top + h, left:left + w] = True
  return m


def unletterbox(anomaly_map: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
  """A letterboxed (S, S) map back to the squashed geometry (S, S): its content box, resized
  bilinear, so a letterboxed run's maps are used as a squashed run's are."""
  size = anomaly_map.shape[-1]
  top, left, h, w = box
  crop = np.asarray(anomaly_map, np.float32)[top:top + h, left:left + w]
  if crop.shape == (size, size):
    return crop
  return np.asarray(Image.fromarray(crop, mode="F").resize((size, size),
                                                           Image.Resampling.BILINEAR))


def to_unit(rgb_uint8: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 RGB in [0, 1] (/255): what every tower takes."""
  return rgb_uint8.astype(np.float32) / np.float32(255.0)


def preprocess_image(img: Image.Image, size: int) -> np.ndarray:
  """An RGB PIL image -> float32 (size, size, 3) RGB in [0, 1]."""
  return to_unit(np.asarray(resize_rgb(to_rgb(img), size)))


def load_image(path: PathLike, size: int) -> np.ndarray:
  """Reads `path` and returns the towers' input: float32 (size, size, 3), RGB in [0, 1]."""
  return preprocess_image(read_rgb(path), size)


def to_uint8_rgb(path: PathLike, size: int) -> np.ndarray:
  """Reads `path` as uint8 (size, size, 3), resized like `load_image`: for heat-map overlays."""
  return np.asarray(resize_rgb(read_rgb(path), size))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Inverse of `to_unit`: float32 in [0, 1] (..., 3) -> uint8 (..., 3), for overlays of a batch."""
  x = np.asarray(images, np.float32) * np.float32(255.0)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _defect_pixels(img: Image.Image) -> np.ndarray:
  """A decoded mask of any mode -> bool (H, W): any non-zero sample is defect; alpha ignored."""
  if img.mode in ("1", "L") or img.mode in _WIDE_MODES:
    return np.asarray(img) != 0
  if img.mode == "LA":
    return np.asarray(img)[..., 0] != 0
  return np.asarray(to_rgb(img)).max(axis=-1) != 0


def load_mask(mask_path: PathLike, size: Optional[int], image_path: PathLike,
              image_hw: Tuple[int, int],
              box: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
  """Reads a ground-truth mask as bool (size, size), or at its own size when size is None.

  Any non-zero value is defect (VisA stores class indices, MVTec 255). The mask must have its
  image's original (H, W) = `image_hw`; box (top, left, height, width) keeps that part of it (a
  tile); it is resized as a 0/1 float map with PIL bilinear, then thresholded at 0.5 (DESIGN.md
  §12).
  """
  what = f"mask (of image {os.fspath(image_path)})"
  img = _open_decoded(mask_path, what)
  mask_hw = (img.height, img.width)
  if tuple(image_hw) != mask_hw:
    raise BadInputError(
        f"mask {os.fspath(mask_path)} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image "
        f"{os.fspath(image_path)} is {image_hw[1]}x{image_hw[0]}; a mask must have the same "
        "size as its image")
  try:
    defect = _defect_pixels(img)
  except (OSError, ValueError) as err:
    raise BadInputError(f"{what} {os.fspath(mask_path)}: cannot read mode {img.mode!r} ({err})"
                        ) from err
  if box is not None:
    top, left, h, w = box
    defect = defect[top:top + h, left:left + w]
  if size is None or defect.shape == (size, size):
    return defect
  small = Image.fromarray(defect.astype(np.float32))
  small = small.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(small) > 0.5
