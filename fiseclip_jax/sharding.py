"""Scale out with JAX's own SPMD: a `data` mesh over devices, whole batches per device.

A round is `n_devices` independent batches stacked on a leading axis and sharded along it; params
and text features are replicated. Each device scores whole batches, so there is no communication
inside `detect`. Multi-host: `initialize()` calls `jax.distributed.initialize`, each process scores
its own share of the batches on its local devices, and `gather_rows` collects results on every
process (process 0 writes files).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fiseclip_jax.config import CLIPConfig, FiSeConfig
from fiseclip_jax.pipeline import DetectResult, _detect, resolve_attention


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Multi-host set-up (TPU pods, multi-node GPU); arguments are auto-detected on TPU / SLURM."""
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis "data" over this process's devices (default: all local devices)."""
  devices = list(devices) if devices is not None else jax.local_devices()
  return Mesh(np.array(devices), ("data",))


@functools.lru_cache(maxsize=16)
def round_fn(mesh: Mesh, cfg: CLIPConfig, conf: FiSeConfig, attention_impl: str):
  """jit(vmap(detect)) over (n, B, ...) batches sharded on "data"; params, text replicated.

  Called as fn(params, images, valid, text).
  """
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  per_batch = lambda params, images, valid, text: _detect(params, cfg, conf, images, valid, text, attention_impl)
  fn = jax.vmap(per_batch, in_axes=(None, 0, 0, None))
  return jax.jit(fn, in_shardings=(replicated, data, data, replicated), out_shardings=data)


def detect_round(mesh: Mesh, params, cfg: CLIPConfig, conf: FiSeConfig, images: np.ndarray,
                 valid: np.ndarray, text) -> DetectResult:
  """Score n_devices batches at once: images (n, B, S, S, 3), valid (n, B) -> outputs (n, B, ...).

  n must equal the mesh size; pad a short last round with all-invalid batches (`pad_round`).
  """
  n = mesh.devices.size
  if images.shape[0] != n:
    raise ValueError(f"a round has {images.shape[0]} batches; expected one per device ({n})")
  fn = round_fn(mesh, cfg, conf, resolve_attention(conf))
  data = NamedSharding(mesh, P("data"))
  return fn(params, jax.device_put(images, data), jax.device_put(valid, data), text)


def pad_round(images: np.ndarray, valid: np.ndarray, n: int):
  """Pad a round of k < n batches with empty batches (all slots invalid)."""
  k = images.shape[0]
  if k == n:
    return images, valid
  images = np.concatenate([images, np.zeros((n - k,) + images.shape[1:], images.dtype)])
  valid = np.concatenate([valid, np.zeros((n - k,) + valid.shape[1:], bool)])
  return images, valid


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
  from jax.experimental import multihost_utils
  counts = multihost_utils.process_allgather(np.array([len(rows)], np.int64)).reshape(-1)
  longest = int(counts.max())
  pad = np.zeros((longest - len(rows),) + rows.shape[1:], rows.dtype)
  everything = multihost_utils.process_allgather(np.concatenate([rows, pad]))
  everything = np.asarray(everything).reshape((len(counts), longest) + rows.shape[1:])
  return np.concatenate([everything[p, :c] for p, c in enumerate(counts)])


def unshard_outputs(out: DetectResult, fields=("image_scores", "anomaly_maps")) -> dict:
  """Host copies of the named outputs, (n, B, ...) -> (n * B, ...)."""
  return {f: np.asarray(getattr(out, f)).reshape((-1,) + getattr(out, f).shape[2:]) for f in fields}
