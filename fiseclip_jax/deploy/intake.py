"""A request's body as an image, or one refusal that says why (DESIGN.md §15).

The service takes a part as a raw body (Content-Type image/* or application/octet-stream) or as
multipart/form-data (the file in field "image", or the form's only file; a field "line" may name
the line). Each refusal is a `Refused` with the HTTP status a client should see: 400 for a request
that says nothing usable (empty body, no file, a bad line id), 413 for a body or image over the
limits, 415 for a content type that is no image, 422 for bytes that do not decode as an image.
Light: PIL and the standard library only.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import re
from typing import NamedTuple, Optional

from PIL import Image

from fiseclip_jax.data import preprocess

RAW_TYPES = ("application/octet-stream",)
LINE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Refused(Exception):
  """A request the service answers with `status` and the one-line `message`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


class Limits(NamedTuple):
  max_bytes: int                 # the request body
  max_pixels: int                # width x height from the image's header, before decoding
  min_side: int                  # the smallest side that holds one patch of each tower


class Part(NamedTuple):
  image: Image.Image             # 8-bit RGB, decoded
  name: str                      # the file name a multipart upload gave, else ""
  line: Optional[str]            # the line id of the form, None when the form names none


def media_type(content_type: Optional[str]) -> str:
  return (content_type or "").split(";", 1)[0].strip().lower()


def check_line(line: Optional[str]) -> Optional[str]:
  """A line id: 1 to 64 of letters, digits and _ . : - (it names a ring and appears in logs)."""
  if line is None or line == "":
    return None
  if not LINE_ID.match(line):
    raise Refused(400, f"line {line[:70]!r}: expected 1 to 64 characters of letters, digits and "
                       "_ . : -")
  return line


def check_length(content_length: Optional[str], limits: Limits) -> None:
  """Content-Length over the limit: refused before the body is read."""
  if content_length is None:
    return
  try:
    n = int(content_length)
  except ValueError:
    raise Refused(400, f"Content-Length {content_length[:30]!r} is not a number") from None
  if n > limits.max_bytes:
    raise Refused(413, f"the body has {n} bytes, more than the limit of {limits.max_bytes} "
                       "(--max_bytes)")


def _multipart(body: bytes, content_type: str):
  """(file bytes, file name, line field) of a multipart/form-data body."""
  msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
      b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
  if not msg.is_multipart():
    raise Refused(400, "a multipart/form-data body without parts (or without its boundary)")
  files, line = [], None
  for part in msg.iter_parts():
    name = part.get_param("name", header="content-disposition")
    filename = part.get_filename()
    payload = part.get_payload(decode=True) or b""
    if name == "line" and filename is None:
      line = payload.decode("utf-8", "replace").strip()
    elif filename is not None or name == "image":
      files.append((name, filename or "", payload))
  chosen = [f for f in files if f[0] == "image"] or files
  if len(chosen) != 1:
    raise Refused(400, f"a form with {len(chosen)} files; expected one image (field \"image\")")
  return chosen[0][2], chosen[0][1], line


def decode(body: bytes, content_type: Optional[str], limits: Limits) -> Part:
  """The part a request carries, or `Refused`."""
  mt = media_type(content_type)
  name, line = "", None
  if len(body) > limits.max_bytes:
    raise Refused(413, f"the body has more than {limits.max_bytes} bytes (--max_bytes)")
  if mt == "multipart/form-data":
    body, name, line = _multipart(body, content_type or "")
  elif not (mt.startswith("image/") or mt in RAW_TYPES):
    raise Refused(415, f"Content-Type {mt or 'none'!r}: expected an image (image/png, image/jpeg, "
                       "...), application/octet-stream or multipart/form-data")
  if not body:
    raise Refused(400, "an empty body; expected the bytes of one image")
  try:
    with Image.open(io.BytesIO(body)) as img:
      w, h = img.size
      if w * h > limits.max_pixels:
        raise Refused(413, f"an image of {w} x {h} pixels, more than the limit of "
                           f"{limits.max_pixels} (--max_pixels)")
      if min(w, h) < limits.min_side:
        raise Refused(422, f"an image of {w} x {h} pixels; expected sides of at least "
                           f"{limits.min_side} (one patch of the model)")
      img.load()
      rgb = preprocess.to_rgb(img)
  except Refused:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
    raise Refused(422, f"the body is not a readable image ({why}); expected a complete "
                       "PNG/JPEG/BMP/TIFF/WebP file") from None
  return Part(rgb, name, line)
