"""Scale out with JAX's own SPMD: a `data` mesh over devices, whole batches per device (DESIGN.md §11).

A round is `n_devices` independent batches stacked on a leading axis and sharded along it; params,
text features and a bank are replicated. Each device scores whole batches (`shard_map`), so there is
no communication inside a round. Multi-host: `initialize()` calls `jax.distributed.initialize`, each process scores
its own share of the batches on its local devices, and `gather_rows` collects results on every
process (process 0 writes files).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax.experimental import multihost_utils

from fiseclip_jax.core.config import FiSeConfig
from fiseclip_jax.method.api import Model, check_references, text_input
from fiseclip_jax.method.pipeline import DetectResult, detect_batch
from fiseclip_jax.method.references import Roles
from fiseclip_jax.method.spec import Spec


AXIS = "data"   # the mesh's one axis: batches (and a category's images) are spread along it


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Multi-host set-up (TPU pods, multi-node GPU); arguments are auto-detected on TPU / SLURM.

  Ends with one tiny all-gather, while every process stands at the same point: on CPU the first
  cross-process collective connects the processes (gloo) and waits only 30 s for its peers, and
  the first real gather comes after scoring, when processes can be further apart than that. Later
  collectives reuse the connection and wait as long as it takes.
  """
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)
  if jax.process_count() > 1:
    multihost_utils.process_allgather(np.zeros(1, np.int32))


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis "data" over this process's devices (default: all local devices)."""
  devices = list(devices) if devices is not None else jax.local_devices()
  return Mesh(np.array(devices), (AXIS,))


@functools.lru_cache(maxsize=16)
def round_fn(mesh: Mesh, spec: Spec):
  """One batch per device: `pipeline.detect_batch` over (n, B, ...) batches sharded on "data".

  Written with `shard_map`, so what runs on a device is stated in code: its own batch, against
  replicated params, text and bank, with no collective (an image is only compared with its batch
  and the bank; DESIGN.md §11). Called as fn(params, images, roles, text, bank).
  """
  def per_device(params, images, roles, text, bank):         # images (1, B, ...): this device's
    one = lambda p, i, r: detect_batch(spec, p, i, r, text, bank)
    return jax.vmap(one, in_axes=(None, 0, 0))(params, images, roles)

  data, rep = P(AXIS), P()
  fn = shard_map(per_device, mesh=mesh, in_specs=(rep, data, data, rep, rep), out_specs=data,
                 check_vma=False)
  return jax.jit(fn)


def detect_round(mesh: Mesh, model: Model, conf: FiSeConfig, images: np.ndarray, roles, text,
                 bank=None) -> DetectResult:
  """Score n_devices batches at once: images (n, B, S, S, 3) RGB in [0, 1], roles (n, B) ->
  outputs (n, B, ...).

  model: the towers and their params (`method.spec.Model`, params replicated on the mesh once:
  `replicate`). roles: a `Roles` of (n, B) arrays, or one (n, B) bool `valid` (query = reference =
  valid). n must equal the mesh size; pad a short last round with empty batches (`pad_round`).
  """
  n = mesh.devices.size
  if images.shape[0] != n:
    raise ValueError(f"a round has {images.shape[0]} batches; expected one per device ({n})")
  if not isinstance(roles, Roles):
    valid = np.asarray(roles, bool)
    roles = Roles(valid, valid, np.broadcast_to(np.arange(valid.shape[1], dtype=np.int32), valid.shape))
  spec = model.spec(conf)
  check_references(spec, bank)
  fn = round_fn(mesh, spec)
  data = NamedSharding(mesh, P(AXIS))
  roles = Roles(*(None if x is None else jax.device_put(np.asarray(x), data) for x in roles))
  return fn(model.params, jax.device_put(images, data), roles, text_input(spec, text), bank)


def pad_round(images: np.ndarray, roles, n: int):
  """Pad a round of k < n batches with empty batches (no slot has a role).

  roles: (k, B) bool `valid` or a `Roles` of (k, B) arrays; returned in the same form.
  """
  k = images.shape[0]
  if k == n:
    return images, roles
  pad = lambda x, fill: np.concatenate([x, np.full((n - k,) + x.shape[1:], fill, x.dtype)])
  images = pad(images, 0)
  if isinstance(roles, Roles):
    content = None if roles.content is None else pad(np.asarray(roles.content), True)
    return images, Roles(pad(np.asarray(roles.query), False), pad(np.asarray(roles.reference), False),
                         pad(np.asarray(roles.position), 0), content)
  return images, pad(np.asarray(roles, bool), False)


def replicate(tree, mesh: Mesh):
  """Put params (or any pytree) on every device of the mesh once, outside the batch loop."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def process_share(items: Sequence, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> list:
  """The items this process handles: a strided share, so every process gets a similar load."""
  i = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  return list(items)[i::n]


def gather_rows(rows: np.ndarray) -> np.ndarray:
  """Concatenate per-process arrays (different lengths allowed) on every process, process order.

  Single process: returned unchanged. Otherwise rows are padded to the longest share and
  all-gathered with `multihost_utils.process_allgather`.
  """
  if jax.process_count() == 1:
    return rows
  counts = multihost_utils.process_allgather(np.array([len(rows)], np.int64)).reshape(-1)
  longest = int(counts.max())
  pad = np.zeros((longest - len(rows),) + rows.shape[1:], rows.dtype)
  everything = multihost_utils.process_allgather(np.concatenate([rows, pad]))
  everything = np.asarray(everything).reshape((len(counts), longest) + rows.shape[1:])
  return np.concatenate([everything[p, :c] for p, c in enumerate(counts)])


def unshard_outputs(out: DetectResult, fields=("image_scores", "anomaly_maps")) -> dict:
  """Host copies of the named outputs, (n, B, ...) -> (n * B, ...)."""
  return {f: np.asarray(getattr(out, f)).reshape((-1,) + getattr(out, f).shape[2:]) for f in fields}
