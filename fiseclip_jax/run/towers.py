"""The towers a run scores with, from checkpoint files (or random for demos), on the devices.

`Checkpoints` (what the programs read from headers, before JAX starts: `cli/runtime`) becomes a
`method.api.Model` here: params loaded and checked key by key, replicated on the mesh once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from fiseclip_jax.convert.checkpoint import load_checkpoint
from fiseclip_jax.data import load_sample
from fiseclip_jax.data.preprocess import content_mask
from fiseclip_jax.method import prompts
from fiseclip_jax.method.api import Model
from fiseclip_jax.method.references import External
from fiseclip_jax.models import registry
from fiseclip_jax.run import sharding


def load_model(cfg, weights: Optional[str], fi_cfg=None, fi_weights: Optional[str] = None,
               seed: int = 0) -> Model:
  """A Model from converted checkpoints (weights None: random params of cfg, seeded)."""
  params = load_checkpoint(weights)[0] if weights else registry.init_params(cfg, seed)
  fi_params = load_checkpoint(fi_weights)[0] if fi_weights else None
  return Model.of(params, cfg, fi_params, fi_cfg)


def on_mesh(model: Model, mesh) -> Model:
  """The model with its params replicated on every device of the mesh (once, outside the loop)."""
  return model._replace(params=sharding.replicate(model.params, mesh))


def text_features(model: Model, class_name: str, conf):
  """F_t (2, D) of a class for the text tower; None when FiCLIP runs alone."""
  if not model.has_text:
    return None
  return prompts.text_features(model.params.text, model.text, class_name, conf)


def load_images(samples, image_size: int) -> np.ndarray:
  """(K, S, S, 3) inputs of a few samples (a bank; each its box, a tile, where it has one),
  decoded in order; errors name the file."""
  return np.stack([load_sample(s, image_size) for s in samples])


def letterboxed_images(samples, image_size: int):
  """(K, S, S, 3) letterboxed inputs of a few samples and their content (K, S, S) bool."""
  got = [load_sample(s, image_size, letterbox=True) for s in samples]
  return (np.stack([x for x, _ in got]),
          np.stack([content_mask(box, image_size) for _, box in got]))


def bank_on(model: Model, conf, samples, mesh) -> External:
  """A known-good bank from samples, built once and replicated on the mesh."""
  if conf.letterbox:
    images, content = letterboxed_images(samples, conf.image_size)
    return sharding.replicate(model.build_bank(conf, images, content=content), mesh)
  return sharding.replicate(model.build_bank(conf, load_images(samples, conf.image_size)), mesh)
