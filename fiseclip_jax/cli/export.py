"""Export a bundle as one program that JAX runs without this package (`jax.export`).

  fiseclip-export BUNDLE --out model.jaxexport [--batch_size B] [--platforms cpu,cuda,tpu]

(`python -m eval.export ...` in a checkout.) The file is serialized StableHLO with the towers'
weights, the class's text features and the bank embedded; it takes images (B, S, S, 3) float32,
RGB in [0, 1], already resized to the bundle's size S, and a validity mask (B,) bool, and gives
image scores (B,) and maps (B, S, S). model.jaxexport.json beside it says the shapes, the resize
rule, the thresholds and the ten lines of Python (jax and numpy only) that load and call it.
One platform: its own attention kernel; several: XLA's, which every one of them lowers.
Streams (--references rolling bundles) are not exported: they carry a ring from call to call.
"""
from __future__ import annotations

import os

from absl import flags

from fiseclip_jax.cli import app, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.deploy import export_format

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Required: the exported program's file (its JSON sidecar is "
                      "written beside it, the same name + .json).")
  flags.DEFINE_integer("batch_size", None, "The program's batch B (default: the bundle's).",
                       lower_bound=1)
  flags.DEFINE_list("platforms", ["cpu"], "Platforms the program runs on, comma-separated: "
                    f"some of {','.join(export_format.PLATFORMS)}.")
  flags.register_validator("platforms", _valid_platforms)


def _valid_platforms(names) -> bool:
  try:
    export_format.parse_platforms(names)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


def check_paths(bundle: str, out: str) -> None:
  """The bundle readable and --out a file whose folder can be written, before JAX starts."""
  if not os.path.isfile(bundle):
    raise BadInputError(f"BUNDLE {bundle}: no such file")
  if not out:
    raise UsageError("--out FILE is required (e.g. --out model.jaxexport)")
  if os.path.isdir(out):
    raise UsageError(f"--out {out} is a folder; expected a file path such as "
                     f"{os.path.join(out, 'model.jaxexport')}")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
    raise UsageError(f"--out {out}: its folder {folder} is missing or not writable")


def run(bundle: str) -> None:
  check_paths(bundle, FLAGS.out)
  platforms = export_format.parse_platforms(FLAGS.platforms)
  e = runtime.export_engine()
  predictor = e.predictor.Predictor.load(bundle, cache_dir="")
  exported = e.export.export(predictor, platforms, FLAGS.batch_size)
  size, sidecar = e.export.write(exported, FLAGS.out)
  meta = exported.meta
  print(f"wrote {FLAGS.out}: {size / 2**20:.1f} MiB ({size} bytes, {exported.n_constants} "
        f"constants), batch {meta['batch_size']} x {meta['image_size']} px, platforms "
        f"{','.join(platforms)}, attention {meta['attention_impl']}\nsidecar {sidecar}")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv, positional=("BUNDLE",))
