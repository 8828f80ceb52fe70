"""Whole-category references at growing category sizes n, beside batch mode on the same images.

Times the programs `run/category.py` runs (encode rounds into the devices' buffers, the
category's filter, the results round by round) on random images, and batch mode's round
(`sharding.round_fn`) over the same n images in batches of B. The filter's row carries XLA's
buffer plan (its temporaries are the block workspace: they must not grow with n^2) and the
ordered pair work it does: each image against each other, n (n - 1) directed pairs (batch mode
reads each unordered pair both ways from one matmul: B (B - 1) / 2 per batch).
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from fiseclip_jax.bench import table, timing
from fiseclip_jax.bench.stages import random_inputs
from fiseclip_jax.method.api import Model, text_input
from fiseclip_jax.method.references import Roles
from fiseclip_jax.method.spec import Params
from fiseclip_jax.run import category, sharding


def pair_flops(spec, size: int, directed_pairs: float) -> float:
  """One N x N x C matmul per directed pair and feature map (2 FLOPs per multiply-add)."""
  fi = spec.fi_tower
  n = (size // fi.patch_size) ** 2
  conf = spec.conf
  return directed_pairs * len(conf.feature_layers) * len(conf.r_list) * 2.0 * n * n * fi.width


def category_row(params, cfg, conf, n: int, b: int, repeats: int, seed: int = 0) -> dict:
  """Encode, filter and results of one category of n random images in blocks of b (one device)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  data = NamedSharding(mesh, P(sharding.AXIS))
  model = Model.of(sharding.replicate(params, mesh), cfg)
  conf = conf.replace(reference_scope="category")
  spec = model.spec(conf)
  images, _, text = random_inputs(cfg, n, conf.image_size, seed)
  text = text_input(spec, text)
  slots = category.slots_per_device(n, b, 1)
  m = slots * b
  query = np.zeros((1, m), bool)
  query[0, :n] = True
  probe = timing.MemoryProbe(mesh.devices.flatten().tolist())
  buf = category.empty_parts(mesh, category.part_shapes(spec, model.params, text, b, False), slots)
  encode = category.encode_fn(mesh, spec)

  def encode_batch(buf, j):
    batch = np.zeros((1, b) + images.shape[1:], np.float32)
    part = np.asarray(images[j * b:(j + 1) * b])
    batch[0, :len(part)] = part
    flags = jax.device_put(query[:, j * b:(j + 1) * b], data)
    roles = Roles(flags, flags, jax.device_put(np.zeros((1, b), np.int32), data))
    return encode(model.params, jax.device_put(batch, data), roles, text, buf, j * b)

  buf = jax.block_until_ready(encode_batch(buf, 0))         # compiles (written again below)
  t0 = time.perf_counter()
  for j in range(-(-n // b)):
    buf = encode_batch(buf, j)
  jax.block_until_ready(buf)
  encode_s = time.perf_counter() - t0
  roles = Roles(*(jax.device_put(x, data) for x in (query, query, np.zeros((1, m), np.int32))))
  fn = category.filter_fn(mesh, spec, b)
  t = time.perf_counter()
  compiled = fn.lower(buf, roles, None).compile()
  compile_s = time.perf_counter() - t
  plan = compiled.memory_analysis()
  timed = timing.time_fn(fn, buf, roles, None, repeats=repeats)
  filt, n_cand = fn(buf, roles, None)
  finish = category.finish_fn(mesh, spec, b)
  jax.block_until_ready(finish(buf, filt, n_cand, None, 0))  # compiles
  t = time.perf_counter()
  for j in range(-(-n // b)):
    jax.block_until_ready(finish(buf, filt, n_cand, None, j * b))
  finish_s = time.perf_counter() - t
  flops = pair_flops(spec, conf.image_size, n * (n - 1))
  total_s = encode_s + timed["median_s"] + finish_s
  return {"stage": "category", "n": n, "batch": b, "dtype": conf.compute_dtype,
          "image_size": conf.image_size, "slots": m, "encode_s": encode_s,
          "filter_s": timed["median_s"], "filter_compile_s": compile_s, "finish_s": finish_s,
          "s_per_image": total_s / n, "pair_flops": flops,
          "pair_tflops_per_s": flops / timed["median_s"] / 1e12,
          "xla_temp_bytes": int(plan.temp_size_in_bytes),
          "xla_argument_bytes": int(plan.argument_size_in_bytes),
          "features_bytes": int(np.prod(buf.steps.shape) * buf.steps.dtype.itemsize),
          "ms_per_image": 1e3 * total_s / n, **probe.result()}


def batch_row(params, cfg, conf, n: int, b: int, seed: int = 0) -> dict:
  """Batch mode over the same n images: n / b batches of the programs' round on one device."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  data = NamedSharding(mesh, P(sharding.AXIS))
  spec = Model.of(params, cfg).spec(conf)
  images, _, text = random_inputs(cfg, n, conf.image_size, seed)
  p = Params(sharding.replicate(params, mesh), None)
  fn = sharding.round_fn(mesh, spec)
  ones = jax.device_put(np.ones((1, b), bool), data)
  roles = Roles(ones, ones, jax.device_put(np.zeros((1, b), np.int32), data))
  batches = [np.asarray(images[j * b:(j + 1) * b]) for j in range(n // b)]
  compiled = fn.lower(p, jax.device_put(batches[0][None], data), roles, text, None).compile()
  plan = compiled.memory_analysis()
  probe = timing.MemoryProbe(mesh.devices.flatten().tolist())
  jax.block_until_ready(fn(p, jax.device_put(batches[0][None], data), roles, text, None))
  t = time.perf_counter()
  for x in batches:
    jax.block_until_ready(fn(p, jax.device_put(x[None], data), roles, text, None))
  total_s = time.perf_counter() - t
  flops = pair_flops(spec, conf.image_size, len(batches) * b * (b - 1))
  return {"stage": "batch_mode", "n": len(batches) * b, "batch": b, "dtype": conf.compute_dtype,
          "image_size": conf.image_size, "s_per_image": total_s / (len(batches) * b),
          "ms_per_image": 1e3 * total_s / (len(batches) * b), "pair_flops": flops,
          "xla_temp_bytes": int(plan.temp_size_in_bytes), **probe.result()}


def category_rows(params, cfg, conf, sizes: Sequence[int], b: int, repeats: int,
                  seed: int = 0) -> List[dict]:
  """A category row per n, and batch mode at B = b over the largest n's images."""
  rows = []
  for n in sizes:
    rows.append(category_row(params, cfg, conf, n, b, repeats, seed))
    logging.info("%s", table.format_row(rows[-1]))
  if sizes and max(sizes) >= b:
    rows.append(batch_row(params, cfg, conf, max(sizes), b, seed))
    logging.info("%s", table.format_row(rows[-1]))
  return rows


def markdown(rows: List[dict], model: Optional[str] = None) -> str:
  """The category rows as a markdown table (docs/PERFORMANCE.md)."""
  head = ("| model | mode | n | B | s / image | filter s | pair TFLOP | XLA temp MiB of the "
          "filter | features MiB | peak MiB |\n|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    mib = lambda k: f"{r[k] / 2 ** 20:.1f}" if r.get(k) is not None else "-"
    lines.append(f"| {model or '-'} | {r['stage']} | {r['n']} | {r['batch']} | "
                 f"{r['s_per_image']:.3f} | {r.get('filter_s', float('nan')):.2f} | "
                 f"{r['pair_flops'] / 1e12:.3f} | {mib('xla_temp_bytes')} | "
                 f"{mib('features_bytes')} | {mib('peak_memory_bytes')} |")
  return "\n".join(lines)
