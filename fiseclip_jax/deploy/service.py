"""The scoring service: a predictor behind HTTP, for a production line (DESIGN.md §15).

  POST /v1/score[?line=ID]      a part (raw image body or multipart "image") -> its decision
  GET  /v1/health               the predictor, the batch, how many parts were scored
  GET  /v1/parts?after=ID       the last parts kept (what the page shows), newest last
  GET  /v1/parts/ID/{image.jpg,overlay.jpg,mask.png}
  GET  /                        the inspector's page (page.html), updating by itself

Requests are decoded in the server's thread pool, gathered into the compiled batch by one worker
(`gather.Gatherer`: one batch per line in rolling mode, each line its own ring on the device),
and answered with JSON. Every refusal is a 4xx with {"error": "..."} on one line; a request the
service cannot answer for its own reasons is a 503, and the next request is served. With a token
every route but /v1/health wants it (Authorization: Bearer T, or ?token=T for links and images).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import html
import io
import logging
import threading
import time
from importlib import resources
from typing import List, NamedTuple, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fiseclip_jax.core.version import __version__
from fiseclip_jax.deploy import gather, intake
from fiseclip_jax.deploy.serve_config import ServeConfig
from fiseclip_jax.deploy.predictor import Predictor
from fiseclip_jax.outputs import decisions, overlays

log = logging.getLogger("fiseclip_jax.serve")


class Shown(NamedTuple):
  """What a kept part's pictures are drawn from, at the page's size (longest side `side`)."""
  rgb: np.ndarray                  # (h, w, 3) uint8
  map: np.ndarray                  # (h, w) float16
  score: float
  contour: Optional[float]         # the part's pixel threshold (None: it passed, no contour)


class Kept:
  """The last `keep` parts: their decision, what their pictures are drawn from, and the pictures
  once asked for (JPEG part and overlay, drawn on the first request; PNG mask at the image's size)."""

  def __init__(self, keep: int):
    self._parts: "collections.OrderedDict[int, dict]" = collections.OrderedDict()
    self._keep, self._lock, self._next = int(keep), threading.Lock(), 1
    self.scored = 0
    self.flagged = 0

  def new_id(self) -> int:
    with self._lock:
      i, self._next = self._next, self._next + 1
      return i

  def add(self, record: dict, shown: Shown, mask_png: Optional[bytes]) -> None:
    with self._lock:
      self._parts[record["id"]] = {"record": record, "shown": shown,
                                   "pictures": {} if mask_png is None else {"mask": mask_png}}
      self.scored += 1
      self.flagged += int(record["label"] == 1)
      while len(self._parts) > self._keep:
        self._parts.popitem(last=False)

  def after(self, after: int) -> List[dict]:
    with self._lock:
      return [p["record"] for i, p in self._parts.items() if i > after]

  def picture(self, part_id: int, kind: str, draw) -> Optional[bytes]:
    """The part's picture `kind`, drawn by draw(shown, kind) the first time (None: not kept)."""
    with self._lock:
      p = self._parts.get(part_id)
      if p is None:
        return None
      if kind in p["pictures"] or kind == "mask":
        return p["pictures"].get(kind)
      shown = p["shown"]
    pic = draw(shown, kind)
    with self._lock:
      p["pictures"][kind] = pic
    return pic


ENCODING = {"JPEG": {"quality": 90}, "PNG": {"compress_level": 1}}


def _encoded(a: np.ndarray, fmt: str, mode: Optional[str] = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a, mode=mode).save(buf, format=fmt, **ENCODING[fmt])
  return buf.getvalue()


def shown(image: Image.Image, p, pixel_threshold: Optional[float], side: int) -> Shown:
  """A part at the page's size: the longest side at most `side`."""
  size = overlays.shrunk_size((image.height, image.width), side)
  rgb = np.asarray(image if size is None else image.resize(size, Image.Resampling.LANCZOS))
  m = overlays.resize_map(p.map, rgb.shape[:2]).astype(np.float16)
  return Shown(rgb, m, p.score, decisions.part_pixel_threshold(p.score, p.threshold,
                                                               pixel_threshold))


def draw(s: Shown, kind: str, scale: overlays.ColourScale, legend: bool) -> Optional[bytes]:
  """The part ("image") or its overlay ("overlay": contour at the part's pixel threshold, the
  score written on it) as JPEG; None for another kind."""
  if kind == "image":
    return _encoded(s.rgb, "JPEG")
  if kind == "overlay":
    return _encoded(overlays.render(s.rgb, s.map.astype(np.float32), scale, s.contour, s.score,
                                    legend=legend), "JPEG")
  return None


def mask_png(p) -> Optional[bytes]:
  """The part's defect mask at the image's own size (0 / 255 PNG), None without a pixel threshold."""
  return None if p.mask is None else _encoded(p.mask.astype(np.uint8) * 255, "PNG", "L")


KINDS = {"image": "image/jpeg", "overlay": "image/jpeg", "mask": "image/png"}
EXTENSION = {"image/jpeg": "jpg", "image/png": "png"}
DRAIN_FACTOR = 4     # a refused body is read and dropped up to 4 x --max_bytes, then the connection closes


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def make_app(predictor: Predictor, config: ServeConfig = ServeConfig()) -> FastAPI:
  """The service's app; its worker starts now and stops with the app."""
  rolling = predictor.conf.streaming
  min_side = max(t.cfg.patch_size for t in predictor.bundle.towers.values())
  limits = intake.Limits(config.max_bytes, config.max_pixels, min_side)
  scale = overlays.ColourScale.for_run(config.map_range, predictor.pixel_threshold)
  kept = Kept(config.keep)
  worker = gather.Gatherer(lambda line, images: predictor.predict(images, line=line),
                           predictor.batch_size, config.max_wait_ms / 1000.0,
                           config.max_waiting, config.max_lines if rolling else None)
  page = resources.files("fiseclip_jax.deploy").joinpath("page.html").read_text()
  started = time.time()

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    worker.close()

  app = FastAPI(title="fiseclip-serve", version=__version__, docs_url=None, redoc_url=None,
                openapi_url=None, lifespan=lifespan)

  def authorized(request: Request) -> bool:
    if not config.token:
      return True
    given = request.query_params.get("token", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
      given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), config.token.encode())

  @app.middleware("http")
  async def one_line_per_request(request: Request, call_next):
    t0 = time.perf_counter()
    if request.url.path != "/v1/health" and not authorized(request):
      response = _error(401, "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN")
    else:
      try:
        response = await call_next(request)
      except Exception as e:  # pylint: disable=broad-except  (one line, never a traceback)
        log.exception("request failed")
        response = _error(503, f"the service could not answer ({type(e).__name__}: {e})")
    what = getattr(request.state, "what", "")
    log.info("%s %s %d %.1f ms%s", request.method, request.url.path, response.status_code,
             1000 * (time.perf_counter() - t0), f" {what}" if what else "")
    return response

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e):
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

  @app.exception_handler(intake.Refused)
  async def _refused(request, e):
    return _error(e.status, e.message)

  @app.get("/v1/health")
  async def health():
    return {"status": "ok", "version": __version__, "predictor": predictor.describe(),
            "rolling": rolling, "lines": len(predictor.rings), "scored": kept.scored,
            "flagged": kept.flagged, "waiting": worker.waiting, "batches": worker.batches,
            "uptime_s": round(time.time() - started, 1),
            "limits": {"max_bytes": config.max_bytes, "max_pixels": config.max_pixels,
                       "min_side": min_side, "max_wait_ms": config.max_wait_ms}}

  async def drain(stream) -> None:
    """Read and drop what a refused client is still sending (up to DRAIN_FACTOR x --max_bytes):
    a client that sends its whole body before reading (urllib, requests) then reads the refusal
    instead of a broken pipe."""
    n = 0
    async for chunk in stream:
      n += len(chunk)
      if n > DRAIN_FACTOR * limits.max_bytes:
        return

  @app.post("/v1/score")
  async def score(request: Request):
    stream = request.stream()
    try:
      intake.check_length(request.headers.get("content-length"), limits)
    except intake.Refused:
      await drain(stream)
      raise
    chunks, n = [], 0
    async for chunk in stream:
      n += len(chunk)
      if n > limits.max_bytes:
        await drain(stream)
        raise intake.Refused(413, f"the body has more than {limits.max_bytes} bytes (--max_bytes)")
      chunks.append(chunk)
    line = intake.check_line(request.query_params.get("line"))
    part = await run_in_threadpool(intake.decode, b"".join(chunks),
                                   request.headers.get("content-type"), limits)
    line = line or intake.check_line(part.line)
    key = (line or "default") if rolling else None
    try:
      future = worker.submit(key, part.image)
    except gather.Full as e:
      raise intake.Refused(503, f"the service is busy: {e}; retry") from None
    except gather.TooManyKeys as e:
      raise intake.Refused(429, f"line {line!r} is new and {e}") from None
    p = await asyncio.wrap_future(future)
    part_id = kept.new_id()
    view = await run_in_threadpool(shown, part.image, p, predictor.pixel_threshold,
                                   config.picture_side)
    mask = await run_in_threadpool(mask_png, p)
    token = f"?token={config.token}" if config.token else ""
    links = {k: f"/v1/parts/{part_id}/{k}.{EXTENSION[t]}{token}" for k, t in KINDS.items()
             if k != "mask" or mask is not None}
    record = {"id": part_id, "time": time.time(), "name": part.name, "line": key,
              "score": p.score, "label": p.label,
              "decision": None if p.label is None else ("NG" if p.label else "OK"),
              "threshold": p.threshold, "n_ref": p.n_ref, "seclip_only": p.seclip_only,
              "size": list(part.image.size), "overlay": links["overlay"], "links": links}
    kept.add(record, view, mask)
    request.state.what = (f"part {part_id}{'' if key is None else ' line ' + key} score "
                          f"{p.score:.6f}{'' if p.label is None else ' ' + record['decision']}")
    return record

  @app.get("/v1/parts")
  async def parts(after: int = 0):
    return {"parts": kept.after(after), "scored": kept.scored, "flagged": kept.flagged}

  @app.get("/v1/parts/{part_id}/{picture}")
  async def picture(part_id: int, picture: str):
    kind, _, ext = picture.partition(".")
    if kind not in KINDS or ext != EXTENSION[KINDS[kind]]:
      raise intake.Refused(404, f"{picture}: expected one of "
                                f"{', '.join(k + '.' + EXTENSION[t] for k, t in KINDS.items())}")
    data = await run_in_threadpool(kept.picture, part_id, kind,
                                   lambda s, k: draw(s, k, scale, config.legend))
    if data is None:
      raise intake.Refused(404, f"part {part_id} has no {kind} kept (the last {config.keep} parts "
                                "are kept: --keep; a mask needs the bundle's pixel threshold)")
    return Response(data, media_type=KINDS[kind])

  @app.get("/")
  async def index():
    t = predictor.image_threshold
    fill = {"CLASS": predictor.class_name, "REFERENCES": predictor.bundle.references,
            "THRESHOLD": "none (scores only)" if t is None else f"{t:.6f}", "VERSION": __version__}
    text = page
    for k, v in fill.items():
      text = text.replace("{{" + k + "}}", html.escape(str(v)))
    return HTMLResponse(text)

  return app


WARM_UP_LINE = "fiseclip-warm-up"


def warm_up(predictor: Predictor) -> None:
  """Compile before the first part arrives: one grey image scored (on a line then forgotten, in
  rolling mode), so no line's ring holds it."""
  side = max(t.cfg.patch_size for t in predictor.bundle.towers.values())
  grey = np.full((max(side, 32), max(side, 32), 3), 128, np.uint8)
  predictor.predict([grey], line=WARM_UP_LINE)
  predictor.reset(WARM_UP_LINE)


def serve(app: FastAPI, sock) -> None:
  """Run the app on a bound, listening socket until interrupted (uvicorn, one process: the
  predictor and its rings live here)."""
  import uvicorn  # pylint: disable=import-outside-toplevel  (only the program needs it)
  config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=5)
  uvicorn.Server(config).run(sockets=[sock])
