"""References as data (DESIGN.md §5): slot roles, who may serve as whose reference, the bank, the ring.

A batch slot says whether it is a *query* (results returned) and whether it may serve as a
*reference* to the others; external references (a known-good bank, or the ring buffer of a stream)
come as an `External` value. `candidates` turns roles, the config and the external set into two
boolean relations, so no role pattern of a given shape recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
EMPTY_POSITION = -(2 ** 30)   # position of an empty ring slot: never inside a window


class Roles(NamedTuple):
  """Per-slot roles of a batch; a slot with neither flag is padding."""
  query: Array       # (B,) bool: scored, results returned
  reference: Array   # (B,) bool: may serve as a reference to the other slots
  position: Array    # (B,) int32: stream position (streams; ignored otherwise)
  content: Optional[Array] = None   # (B, S, S) bool: each image's own pixels, False on letterbox
  #                                   padding (DESIGN.md §2); None: every pixel is the image's


def padding_patches(content: Array, grid: Tuple[int, int]) -> Array:
  """(B, N) bool: the patches with no pixel of their image (letterbox padding), from content
  (B, S, S) on the (h, w) patch grid."""
  b, s_h, s_w = content.shape
  h, w = grid
  has = content.reshape(b, h, s_h // h, w, s_w // w).any(axis=(2, 4))
  return ~has.reshape(b, h * w)


class BuiltUnder(NamedTuple):
  """The settings an external set's feature maps were computed under (DESIGN.md §5): a bank or a
  ring only pairs with a scorer of the same ones, step for step."""
  tower: Any                       # FiCLIP's tower (its class and architecture)
  feature_layers: Tuple[int, ...]
  r_list: Tuple[int, ...]
  filter_loop: str
  image_size: int
  compute_dtype: str
  resize: str = "squash"           # squashed or letterboxed images (DESIGN.md §2)

  def differences(self, other: "BuiltUnder") -> list:
    """'name: this -> other' for every setting that differs."""
    return [f"{k} {a!r} -> {b!r}" for k, a, b in zip(self._fields, self, other) if a != b]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["feats", "masks", "valid", "position"], meta_fields=["built_under"])
@dataclasses.dataclass(frozen=True)
class External:
  """References from outside the batch: a known-good bank or a stream's ring buffer."""
  feats: Array         # (S, G, K, N, C) feature maps arranged as filtering steps
  masks: Array         # (S, K, N) bool: the exclusion mask of each entry at each step
  valid: Array         # (K,) bool
  position: Array      # (K,) int32 stream position (streams; ignored otherwise)
  built_under: Optional[BuiltUnder] = None   # static: the settings of the feature maps

  @property
  def capacity(self) -> int:
    return int(self.valid.shape[0])


def make_roles(query, reference=None, position=None) -> Roles:
  """Roles from a query flag (B,), a reference flag (default: the query flag) and positions
  (default 0..B-1)."""
  query = jnp.asarray(query, bool)
  reference = query if reference is None else jnp.asarray(reference, bool)
  if position is None:
    position = jnp.arange(query.shape[0], dtype=jnp.int32)
  return Roles(query, reference, jnp.asarray(position, jnp.int32))


def as_roles(valid_or_roles) -> Roles:
  """A `Roles`, or one boolean `valid` array meaning query = reference = valid."""
  if isinstance(valid_or_roles, Roles):
    return Roles(*(None if x is None else jnp.asarray(x) for x in valid_or_roles))
  return make_roles(valid_or_roles)


def window_relation(pos_u: Array, pos_v: Array, window: int) -> Array:
  """(U, V) bool: v is one of the `window` stream positions just before u."""
  diff = pos_u[:, None] - pos_v[None, :]
  return (diff >= 1) & (diff <= window)


def candidates(conf, roles: Roles, external: Optional[External], others: Optional[Array] = None,
               offset=0) -> Tuple[Array, Optional[Array]]:
  """Candidate references of each slot: (batch (B, R) bool, external (B, K) bool or None).

  references "batch": every other reference slot; "bank": every valid external entry; "both": the
  two. A stream (conf.stream_window K > 0): the K stream positions before the slot's, in the batch
  or in the ring. Padding slots (neither flag) get none. others (R,): the reference flags of every
  slot of a category spread over devices, this batch's slots being others[offset:offset + B]
  (default: this batch alone, R = B).
  """
  b = roles.query.shape[0]
  active = roles.query | roles.reference                                    # (B,)
  if conf.streaming:
    batch = roles.reference[None, :] & window_relation(roles.position, roles.position,
                                                        conf.stream_window)
  elif conf.references in ("batch", "both") and others is not None:
    itself = (offset + jnp.arange(b))[:, None] == jnp.arange(others.shape[0])[None, :]
    batch = others[None, :] & ~itself                                       # (B, R)
  elif conf.references in ("batch", "both"):
    batch = roles.reference[None, :] & ~jnp.eye(b, dtype=bool)
  else:
    batch = jnp.zeros((b, b), bool)
  batch = batch & active[:, None]
  if external is None:
    return batch, None
  ext = jnp.broadcast_to(external.valid[None, :], (b, external.capacity))
  if conf.streaming:
    ext = ext & window_relation(roles.position, external.position, conf.stream_window)
  elif conf.references == "batch":
    ext = jnp.zeros_like(ext)
  return batch, ext & active[:, None]


def uses_batch_pairs(conf) -> bool:
  """Whether slots of a batch are compared with each other (static: it decides the program)."""
  return conf.streaming or conf.references != "bank"


def bank(steps: Array, valid=None, built_under: Optional[BuiltUnder] = None,
         padding: Optional[Array] = None) -> External:
  """A known-good bank from its feature maps arranged as steps (S, G, K, N, C) (DESIGN.md §5).

  Known normal: nothing of it is excluded, so its masks are all False at every step, except the
  letterbox padding of its images (padding (K, N) bool), which never serves as a reference.
  """
  s, _, k, n, _ = steps.shape
  valid = jnp.ones((k,), bool) if valid is None else jnp.asarray(valid, bool)
  masks = jnp.zeros((s, k, n), bool)
  if padding is not None:
    masks = masks | jnp.asarray(padding, bool)[None]
  return External(steps, masks, valid, jnp.zeros((k,), jnp.int32), built_under)


def empty_ring(n_steps: int, n_maps: int, k: int, n_patches: int, width: int,
               dtype="float32", built_under: Optional[BuiltUnder] = None) -> External:
  """A stream's ring buffer of capacity k with no image in it yet."""
  return External(jnp.zeros((n_steps, n_maps, k, n_patches, width), jnp.dtype(dtype)),
                  jnp.zeros((n_steps, k, n_patches), bool), jnp.zeros((k,), bool),
                  jnp.full((k,), EMPTY_POSITION, jnp.int32), built_under)


def push_ring(ring: External, steps: Array, masks: Array, roles: Roles) -> External:
  """The ring after a batch of the stream: its last K images, oldest first.

  steps (S, G, B, N, C) and masks (S, B, N) of the batch (the mask each step used). The batch's
  stream images are its reference slots, which must come first and in stream order.
  """
  k = ring.capacity
  n_new = roles.reference.sum().astype(jnp.int32)
  cat = lambda a, b, axis: jnp.concatenate([a, b.astype(a.dtype)], axis=axis)
  take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, n_new, k, axis=axis)
  return External(take(cat(ring.feats, steps, 2), 2), take(cat(ring.masks, masks, 1), 1),
                  take(cat(ring.valid, roles.reference, 0), 0),
                  take(cat(ring.position, roles.position, 0), 0), ring.built_under)


def check_stream_order(reference: np.ndarray) -> None:
  """Host check for stream batches: stream images first, padding after."""
  reference = np.asarray(reference, bool)
  n = int(reference.sum())
  if not reference[:n].all():
    raise ValueError("stream: a batch's stream images must fill its first slots, in stream "
                     f"order, padding after; got reference flags {reference.astype(int).tolist()}")
