"""Serve a bundle over HTTP: a production line posts parts, an inspector keeps the page open.

  fiseclip-serve BUNDLE [--host 127.0.0.1] [--port 8000] [--token T] [--max_wait_ms 2]

(`python -m eval.serve ...` in a checkout; needs `pip install "fiseclip-jax[serve]"`.)
POST /v1/score takes one image (raw body, or multipart field "image"; ?line=ID names the line of a
rolling bundle) and answers JSON: score, label, decision (OK / NG), threshold, n_ref, seclip_only
and links to the part's overlay and mask. GET /v1/health says what is served; GET / is the page of
the last parts as they arrive. Concurrent requests are gathered into the bundle's compiled batch
(waiting at most --max_wait_ms for a fuller one). Binds to this machine only by default; any other
--host needs --token (or $FISECLIP_TOKEN), which every route but /v1/health then asks for.
The first line on stdout once the model is compiled is "serving http://HOST:PORT/".
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys

from absl import flags

from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import EnvironmentProblem, UsageError
from fiseclip_jax.deploy.bundle_header import read_meta
from fiseclip_jax.deploy.serve_config import ServeConfig

FLAGS = flags.FLAGS
TOKEN_ENV = "FISECLIP_TOKEN"


def define_flags() -> None:
  d = ServeConfig()
  options.define_platform_flag()
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind; another than this machine's "
                      "(loopback) needs --token.")
  flags.DEFINE_integer("port", 8000, "Port to bind (0: a free one, printed on the first line).",
                       lower_bound=0, upper_bound=65535)
  flags.DEFINE_string("token", None, f"A secret every route but /v1/health asks for (header "
                      f"'Authorization: Bearer T' or ?token=T); default ${TOKEN_ENV}.")
  flags.DEFINE_float("max_wait_ms", d.max_wait_ms, "How long a part waits for others to fill the compiled "
                     "batch (0: score what is there at once).", lower_bound=0.0)
  flags.DEFINE_integer("max_bytes", d.max_bytes, "The largest request body (413 beyond).",
                       lower_bound=1)
  flags.DEFINE_integer("max_pixels", d.max_pixels, "The largest image, width x height from its "
                       "header (413 beyond).", lower_bound=1)
  flags.DEFINE_integer("keep", d.keep, "Parts kept in memory for the page and their links.",
                       lower_bound=1)
  flags.DEFINE_string("cache_dir", None, "JAX's persistent compilation cache (default "
                      "$FISECLIP_CACHE_DIR or ~/.cache/fiseclip_jax/xla; '' for none).")
  options.define_overlay_flags()


def loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def bind(host: str, port: int) -> socket.socket:
  """The listening socket, bound before the model loads (a taken port is one line at once)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise EnvironmentProblem(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") \
        from None
  sock.listen(2048)
  return sock


def run(bundle: str) -> None:
  token = FLAGS.token or os.environ.get(TOKEN_ENV) or None
  if not loopback(FLAGS.host) and not token:
    raise UsageError(f"--host {FLAGS.host} serves beyond this machine: pass --token T (or set "
                     f"${TOKEN_ENV}), which clients then send")
  read_meta(bundle)                         # a bad bundle is one line before anything starts
  sock = bind(FLAGS.host, FLAGS.port)
  runtime.start()
  e = runtime.serve_engine()
  predictor = e.predictor.Predictor.load(bundle, cache_dir=FLAGS.cache_dir)
  if FLAGS.map_range == "threshold" and not (predictor.pixel_threshold or 0) > 0:
    raise UsageError("--map_range threshold needs the bundle's pixel threshold > 0")
  config = ServeConfig(
      max_wait_ms=FLAGS.max_wait_ms, max_bytes=FLAGS.max_bytes, max_pixels=FLAGS.max_pixels,
      keep=FLAGS.keep, token=token, map_range=FLAGS.map_range, legend=FLAGS.overlay_legend)
  d = predictor.describe()
  print(f"bundle {bundle}: class {d['class_name']!r}, references {d['references']}, batch "
        f"{d['batch_size']} x {d['image_size']} px; compiling the model (the first batch only)",
        flush=True)
  e.warm_up(predictor)
  app_ = e.service.make_app(predictor, config)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(f"serving http://{shown}:{port}/  (page /, POST /v1/score, GET /v1/health"
        f"{'; token required' if token else ''})", flush=True)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
  log = logging.getLogger("fiseclip_jax.serve")
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  e.uvicorn_serve(app_, sock)


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv, positional=("BUNDLE",))
