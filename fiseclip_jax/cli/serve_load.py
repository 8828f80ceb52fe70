"""Load a running service and report its latency and throughput (a benchmark, not a test).

  fiseclip-serve-load URL --images DIR [--clients 8] [--requests 25] [--out load.json]

(`python -m eval.serve_load ...` in a checkout.) --clients threads each post --requests images of
DIR (round robin) to URL/v1/score, one after another; the figures are latency p50 / p90 / p99 in
ms over the answered requests and images per second over the whole load. Every refusal or lost
request is counted and the exit code is 1 if there was any.
"""
from __future__ import annotations

import json
import mimetypes
import os

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.deploy import load
from fiseclip_jax.outputs.files import write_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("images", None, "Required: a folder of images to post (round robin).")
  flags.DEFINE_integer("clients", 8, "Concurrent clients.", lower_bound=1)
  flags.DEFINE_integer("requests", 25, "Requests per client, one after another.", lower_bound=1)
  flags.DEFINE_string("token", None, "The service's token (default $FISECLIP_TOKEN).")
  flags.DEFINE_bool("line_per_client", False, "Each client posts as its own line (?line=cN): a "
                    "rolling service's lines.")
  flags.DEFINE_string("out", None, "Write the figures as JSON here.")


def run(url: str) -> None:
  if not FLAGS.images or not os.path.isdir(FLAGS.images):
    raise UsageError(f"--images {FLAGS.images}: expected a folder of images")
  samples, _ = data.list_folder(FLAGS.images, False)
  if not samples:
    raise UsageError(f"--images {FLAGS.images}: no image in it")
  images = []
  for s in samples:
    with open(s.path, "rb") as f:
      images.append((f.read(), mimetypes.guess_type(s.path)[0] or "application/octet-stream"))
  status, body = load.post(url.rstrip("/") + "/v1/score", images[0][0], images[0][1],
                           FLAGS.token or os.environ.get("FISECLIP_TOKEN"))
  if status != 200:
    raise UsageError(f"URL {url}: the first request got {status or 'no answer'}: "
                     f"{body.get('error', body)}")
  r = load.run(url, images, FLAGS.clients, FLAGS.requests,
               FLAGS.token or os.environ.get("FISECLIP_TOKEN"),
               (lambda c: f"c{c}") if FLAGS.line_per_client else None)
  fig = load.figures(r)
  fig.update(url=url, images=len(images))
  lat = fig["latency_ms"]
  print(f"{FLAGS.clients} clients x {FLAGS.requests} requests ({len(images)} images): "
        f"{fig['ok']} ok, {fig['failed']} failed, {fig['sent'] - fig['answered']} lost; latency "
        f"p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}, max "
        f"{lat['max']:.1f}; {fig['images_per_s']:.1f} images/s over {fig['wall_s']:.1f} s")
  if FLAGS.out:
    write_json(FLAGS.out, fig)
    print(f"figures: {FLAGS.out}")
  errors = sorted({json.dumps(a.body.get("error", "")) for a in r["answers"] if a.status != 200})
  if errors:
    raise UsageError(f"{fig['failed']} request(s) failed: {'; '.join(errors[:3])}")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv, positional=("URL",))
