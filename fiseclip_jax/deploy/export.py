"""A predictor as one program any JAX runs without this package (`jax.export`, DESIGN.md §15).

The program is the predictor's batch scorer as a pure function of (images, valid): the towers'
params, the class's text features and the bank are closed over, so they are constants of the
serialized StableHLO, and one file holds everything. Roles come from `valid` as the predictor
gives them (query = reference = valid; a padding slot has no role). The shapes are fixed (B, S):
the caller resizes and pads, as the sidecar says (`export_format`).

Streams (references "rolling") carry their ring from call to call and are not exported.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.core.version import __version__
from fiseclip_jax.deploy import export_format as fmt
from fiseclip_jax.deploy.predictor import Predictor
from fiseclip_jax.method import pipeline
from fiseclip_jax.method.references import Roles
from fiseclip_jax.method.spec import resolve_attention
from fiseclip_jax.outputs.files import write_json


class ExportError(BadInputError):
  """A predictor or a request that cannot be exported; the message says why."""


class Exported(NamedTuple):
  """What `export` made, before it is written."""
  program: bytes            # jax.export's serialization
  meta: dict                # the sidecar
  n_constants: int          # values embedded as constants (params the program reads, text, bank)


def attention_for(conf, platforms: Tuple[str, ...]) -> str:
  """The attention kernel of an export: one platform's own default (`resolve_attention` for the
  bundle's dtype), or one every platform asked lowers (`fmt.PORTABLE_ATTENTION`)."""
  if len(platforms) == 1:
    impl = resolve_attention(conf, fmt.BACKEND[platforms[0]])
  else:
    impl = conf.attention_impl or fmt.PORTABLE_ATTENTION
  if impl == "cudnn" and platforms != ("cuda",):
    raise ExportError(f"attention 'cudnn' lowers for cuda only, not for {','.join(platforms)}: "
                      "export for cuda alone, or rebuild the bundle with another attention_impl")
  return impl


def scoring_fn(predictor: Predictor, batch_size: int, attention: str) -> Callable:
  """fn(images (B, S, S, 3) float32, valid (B,) bool) -> (scores (B,), maps (B, S, S)) float32,
  with the predictor's params, text and bank as host constants."""
  if predictor.conf.streaming:
    raise ExportError("a bundle of --references rolling (a stream) carries its ring of earlier "
                      "parts from call to call: it is not exported; export a bundle of "
                      "references batch, bank or both")
  if predictor.conf.letterbox:
    raise ExportError("a letterboxed bundle (--resize letterbox) marks each image's padding for "
                      "matching: the exported program takes images squashed to the model's size; "
                      "export a bundle built with --resize squash")
  if predictor.tiling is not None:
    raise ExportError("a bundle of tiles (--tile) cuts each image at its own size and stitches "
                      "the tiles' maps back: the exported program takes whole images at the "
                      "model's size; export a bundle built without --tile")
  spec = dataclasses.replace(predictor.spec, attention_impl=attention)
  params, text, bank = jax.device_get((predictor.model.params, predictor.text, predictor.bank))
  text = pipeline_text(spec, text)
  position = np.arange(batch_size, dtype=np.int32)

  def fn(images, valid):
    roles = Roles(valid, valid, jnp.asarray(position))
    res = pipeline.detect_batch(spec, params, images, roles, text, bank)
    return res.image_scores.astype(jnp.float32), res.anomaly_maps.astype(jnp.float32)

  return fn


def pipeline_text(spec, text) -> np.ndarray:
  """The text features the scorer reads: (2, D) float32, or the placeholder of FiCLIP alone."""
  return np.asarray(text, np.float32) if spec.has_text else np.zeros((2, 1), np.float32)


def input_specs(batch_size: int, size: int):
  """The program's arguments: images (B, S, S, 3) float32 and valid (B,) bool."""
  return (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch_size,), jnp.bool_))


def export(predictor: Predictor, platforms: Sequence[str] = ("cpu",),
           batch_size: Optional[int] = None) -> Exported:
  """The predictor as a serialized `jax.export` program and its sidecar. batch_size: the
  program's B (default: the bundle's)."""
  platforms = fmt.parse_platforms(platforms)
  b = int(batch_size or predictor.batch_size)
  if b < 1:
    raise ExportError(f"batch size {b}; expected >= 1")
  attention = attention_for(predictor.conf, platforms)
  fn = scoring_fn(predictor, b, attention)
  args = input_specs(b, predictor.conf.image_size)
  n_constants = int(sum(np.size(c) for c in jax.make_jaxpr(fn)(*args).consts))
  program = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  return Exported(bytes(program.serialize()), sidecar(predictor, b, platforms, attention,
                                                      n_constants), n_constants)


def sidecar(predictor: Predictor, b: int, platforms: Tuple[str, ...], attention: str,
            n_constants: int) -> dict:
  """What a caller needs to feed the program and read its outputs."""
  s, d = predictor.conf.image_size, predictor.bundle.decision
  return {
      "format": fmt.FORMAT, "package_version": __version__, "class_name": predictor.class_name,
      "references": predictor.bundle.references, "batch_size": b, "image_size": s,
      "inputs": [{"name": "images", "shape": [b, s, s, 3], "dtype": "float32",
                  "meaning": "RGB in [0, 1]; slots past the call's images may hold anything"},
                 {"name": "valid", "shape": [b], "dtype": "bool",
                  "meaning": "the slots holding an image (query and reference); others padding"}],
      "outputs": [{"name": "scores", "shape": [b], "dtype": "float32",
                   "meaning": "image anomaly score"},
                  {"name": "maps", "shape": [b, s, s], "dtype": "float32",
                   "meaning": "pixel anomaly map at S x S (resize it to the image's size)"}],
      "resize": fmt.RESIZE_RULE,
      "thresholds": {"image": d.get("image_threshold"), "pixel": d.get("pixel_threshold"),
                     "how": d.get("how"),
                     "rule": "label 1 iff score >= image; the pixel threshold marks defects only "
                             "in parts the image threshold flags (DESIGN.md §13)"},
      "platforms": list(platforms), "attention_impl": attention,
      "compute_dtype": predictor.conf.compute_dtype, "constants": n_constants,
      "python": fmt.snippet("model.jaxexport"),
  }


def write(exported: Exported, out: str) -> Tuple[int, str]:
  """The program at out and its sidecar beside it (atomically); (program bytes, sidecar path)."""
  meta = dict(exported.meta, python=fmt.snippet(os.path.basename(out)))
  atomic_write(out, exported.program)
  path = fmt.sidecar_path(out)
  write_json(path, meta)
  return len(exported.program), path
