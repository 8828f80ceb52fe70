"""Whole-category references over the mesh (DESIGN.md §5 "category", §11).

Every image of a category is a query and a reference of every other, as in one batch of all of
them, without that batch's memory. Three programs:

  encode   one batch per device per round (batch mode's rounds), its `pipeline.Part` written into
           buffers that stay on the devices: a fixed number of batch slots per device, the rounds
           rounded up to a size class (one program per class; empty batches cost nothing)
  filter   once per category: each device filters its own images, in query blocks of one batch
           against every image of the category, gathered once per filtering step (an all-gather
           of the step's features and masks: the only collectives, checked by a test)
  finish   fusion, maps and image score, round by round, the results as batch mode's
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fiseclip_jax import data
from fiseclip_jax.data import Batch, Sample
from fiseclip_jax.method import pipeline
from fiseclip_jax.method.api import Model, check_references, text_input
from fiseclip_jax.method.pipeline import Part
from fiseclip_jax.method.references import External, Roles
from fiseclip_jax.method.seclip import SeCLIPOut
from fiseclip_jax.method.spec import Spec, matmul_precision
from fiseclip_jax.run import scoring, sharding
from fiseclip_jax.run.scoring import (Collector, Scored, host_results, rounds_of, skip_recorder,
                                      stack_roles)

AXIS = sharding.AXIS
SIZE_CLASSES = sorted({1 << k for k in range(40)} | {3 << k for k in range(40)})   # 1, 2, 3, 4, 6, 8, 12..


def slots_per_device(n_images: int, batch_size: int, n_devices: int) -> int:
  """Batches each device holds for a category of n_images: its rounds, rounded up to the next
  size class (powers of two and 3/2 of them), so categories of different sizes share a handful
  of programs and at most a third of the buffers is padding."""
  batches = -(-n_images // batch_size)
  rounds = max(1, -(-batches // n_devices))
  return next(c for c in SIZE_CLASSES if c >= rounds)


def _update(buf, new, start, axis):
  return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=axis)


def put(buf: Part, part: Part, start) -> Part:
  """buf with one batch's part written at image slot `start` (steps' image axis is 2)."""
  return Part(SeCLIPOut(*(_update(b, p, start, 0) for b, p in zip(buf.se, part.se))),
              _update(buf.steps, part.steps, start, 2),
              None if buf.padding is None else _update(buf.padding, part.padding, start, 0),
              _update(buf.embed, part.embed, start, 0))


def take(part: Part, start, size: int) -> Part:
  """One batch's slots [start, start + size) of a category's part (its steps left out)."""
  sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)
  return Part(SeCLIPOut(*(sl(x) for x in part.se)), None,
              None if part.padding is None else sl(part.padding), sl(part.embed))


def local(tree):
  """This device's block of a (1, ...) shard_map argument."""
  return jax.tree.map(lambda x: x[0], tree)


def stacked(tree):
  """A per-device result as its (1, ...) block."""
  return jax.tree.map(lambda x: x[None], tree)


def part_shapes(spec: Spec, params, text, batch_size: int, letterbox: bool) -> Part:
  """The shapes of one batch's part (traced, not run)."""
  size = spec.conf.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  roles = Roles(jax.ShapeDtypeStruct((batch_size,), bool), jax.ShapeDtypeStruct((batch_size,), bool),
                jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                jax.ShapeDtypeStruct((batch_size, size, size), bool) if letterbox else None)
  return jax.eval_shape(functools.partial(pipeline.encode_part, spec), params, images, roles, text)


def empty_parts(mesh: Mesh, shapes: Part, slots: int) -> Part:
  """A category's buffers on the mesh, zero: (n_devices, ...) with `slots` batches per device."""
  n_dev = mesh.devices.size

  def grow(x, axis):
    shape = list(x.shape)
    shape[axis] *= slots
    return jnp.zeros([n_dev] + shape, x.dtype)

  def make():
    return Part(SeCLIPOut(*(grow(x, 0) for x in shapes.se)), grow(shapes.steps, 2),
                None if shapes.padding is None else grow(shapes.padding, 0),
                grow(shapes.embed, 0))
  return jax.jit(make, out_shardings=NamedSharding(mesh, P(AXIS)))()


@functools.lru_cache(maxsize=16)
def encode_fn(mesh: Mesh, spec: Spec):
  """One batch per device into the category's buffers (donated): fn(params, images (n, B, ...),
  roles (n, B), text, buffers, start) with `start` the round's first slot."""
  def per_device(params, images, roles, text, buf, start):
    with matmul_precision(spec.conf):
      part = pipeline.encode_part(spec, params, images[0], local(roles), text)
    return stacked(put(local(buf), part, start))

  data_, rep = P(AXIS), P()
  fn = shard_map(per_device, mesh=mesh, in_specs=(rep, data_, data_, rep, data_, rep),
                 out_specs=data_, check_vma=False)
  return jax.jit(fn, donate_argnums=4)


@functools.lru_cache(maxsize=16)
def filter_fn(mesh: Mesh, spec: Spec, block: int):
  """The category's filter: fn(buffers, roles (n, M), bank) -> (FilterResult, n_candidates), each
  device its own M slots against all n * M, in query blocks of `block`."""
  gather = None   # one device: its slots are all the category's
  if mesh.devices.size > 1:
    gather = lambda x, axis: jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)

  def per_device(buf, roles, bank):
    part, roles = local(buf), local(roles)
    m = roles.query.shape[0]
    grid = spec.grid((spec.conf.image_size,) * 2)
    with matmul_precision(spec.conf):
      others = roles.reference if gather is None else gather(roles.reference, 0)
      out = pipeline.filter_stage(spec, part.steps, part.se.mask0, roles, bank, grid,
                                  part.padding, block, gather, others,
                                  jax.lax.axis_index(AXIS) * m)
    return stacked(out)

  data_, rep = P(AXIS), P()
  fn = shard_map(per_device, mesh=mesh, in_specs=(data_, data_, rep), out_specs=data_,
                 check_vma=False)
  return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def finish_fn(mesh: Mesh, spec: Spec, block: int):
  """One round's results: fn(buffers, filter result, n_candidates, content (n, B, S, S) or None,
  start) -> `DetectResult` (n, B, ...)."""
  size = (spec.conf.image_size,) * 2

  def per_device(buf, filt, n_cand, content, start):
    part, filt, n_cand = local(buf), local(filt), local(n_cand)
    one = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis)
    filt = type(filt)(one(filt.step_scores, 1), one(filt.masks, 1), one(filt.final_mask, 0),
                      one(filt.n_ref, 1))
    with matmul_precision(spec.conf):
      res = pipeline.finish(spec, take(part, start, block), filt, one(n_cand, 0), size,
                            None if content is None else content[0])
    return stacked(res)

  data_, rep = P(AXIS), P()
  fn = shard_map(per_device, mesh=mesh, in_specs=(data_, data_, data_, data_, rep),
                 out_specs=data_, check_vma=False)
  return jax.jit(fn)


def score_category(samples: Sequence[Sample], *, model: Model, conf, text, mesh, batch_size: int,
                   indices: Optional[Sequence[int]] = None, bank: Optional[External] = None,
                   with_masks: bool = False, keep_maps: bool = False,
                   skip_bad_images: bool = False,
                   on_batch: Optional[Callable] = None,
                   on_progress: Optional[Callable[[int], None]] = None,
                   on_skip: Optional[Callable] = None) -> Scored:
  """Score a category's samples, each against every other (conf.reference_scope 'category'), as
  `scoring.score_samples` does batch by batch: the same arguments (top-up is moot) and results.

  on_progress counts images encoded; the category's filter and results follow the last one.
  """
  n_dev = mesh.devices.size
  size = conf.image_size
  spec = model.spec(conf)
  check_references(spec, bank)
  skipped: List[str] = []
  on_skip = skip_recorder(skipped, on_skip)
  collect = Collector(keep_maps, with_masks and keep_maps)
  slots = slots_per_device(len(samples), batch_size, n_dev)
  m = slots * batch_size                                   # image slots per device
  text = text_input(spec, text)
  buf = empty_parts(mesh, part_shapes(spec, model.params, text, batch_size, conf.letterbox),
                    slots)
  query = np.zeros((n_dev, m), bool)
  rounds: List[tuple] = []       # per round: its batches, their roles, its padded content or None
  data_ = NamedSharding(mesh, P(AXIS))
  encode = encode_fn(mesh, spec)
  batches = data.iter_batches(samples, batch_size, size, with_masks=with_masks,
                              skip_bad_images=skip_bad_images, on_skip=on_skip, indices=indices,
                              letterbox=conf.letterbox)
  done = 0

  def encode_round(round_batches: List[Batch]) -> int:
    j = len(rounds)
    batch_roles = [scoring.batch_roles(b, b.valid.copy()) for b in round_batches]
    images, roles = sharding.pad_round(np.stack([b.images for b in round_batches]),
                                       stack_roles(batch_roles), n_dev)
    query[:, j * batch_size:(j + 1) * batch_size] = roles.query
    roles = Roles(*(None if x is None else jax.device_put(np.asarray(x), data_) for x in roles))
    nonlocal buf
    buf = encode(model.params, jax.device_put(images, data_), roles, text, buf, j * batch_size)
    rounds.append((round_batches, batch_roles, roles.content))
    return sum(int(b.valid.sum()) for b in round_batches)

  for round_batches in rounds_of(batches, n_dev):
    done += encode_round(round_batches)
    if on_progress is not None:
      on_progress(done)
  if not rounds:
    return collect.result((size, size), skipped)

  roles = Roles(*(jax.device_put(x, data_) for x in
                  (query, query, np.zeros((n_dev, m), np.int32))))
  filt, n_cand = filter_fn(mesh, spec, batch_size)(buf, roles, bank)
  finish = finish_fn(mesh, spec, batch_size)
  for j, (round_batches, batch_roles, content) in enumerate(rounds):
    out = finish(buf, filt, n_cand, content, j * batch_size)
    for r in host_results(out, round_batches, batch_roles):
      collect.add(r)
      if on_batch is not None:
        on_batch(r)
  return collect.result((size, size), skipped)
