"""The benchmark's rows: the pipeline's own stage functions, compiled with fixed shapes and timed.

Every stage row jits the pipeline's function itself (`pipeline.encode`, `seclip_stage`,
`lnamd_stage`, `filter_stage`, `maps_stage`, `detect_batch`, `features_steps`, `stream_step`); a
stage's static values (the grid, the output size) are closed over by name, so nothing is kept in
step with argument positions. Compilation and one warm-up call are excluded; each timing blocks on
the result; the median over `repeats` is reported.
"""
from __future__ import annotations

import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from fiseclip_jax.bench import table, timing
from fiseclip_jax.bench.config import MODELS, REFERENCE_STAGES, STAGES
from fiseclip_jax.method import pipeline as pl
from fiseclip_jax.method import references
from fiseclip_jax.method.api import Model, make_spec
from fiseclip_jax.method.references import Roles, make_roles
from fiseclip_jax.method.spec import Params, matmul_precision
from fiseclip_jax.models.clip.config import VARIANTS
from fiseclip_jax.run import sharding


def model_configs(model: str, image_size: int):
  """(CLIPConfig, FiSeConfig) of a named model (`models/clip/config.VARIANTS`), its blocks."""
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  v = VARIANTS[model]
  if image_size % v.config.patch_size:
    raise ValueError(f"--image_size {image_size} is not a multiple of {model}'s patch size "
                     f"{v.config.patch_size}")
  return v.config, v.fise_config(image_size=image_size)


def random_inputs(cfg, b: int, size: int, seed: int = 0):
  """Images (B, S, S, 3) uniform RGB in [0, 1], roles (all query + reference), text (2, D)."""
  rng = np.random.RandomState(seed)
  images = jnp.asarray(rng.random_sample((b, size, size, 3)).astype(np.float32))
  text = rng.standard_normal((2, cfg.embed_dim)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return images, make_roles(np.ones(b, bool)), jnp.asarray(text)


class Stage(NamedTuple):
  name: str
  fn: Callable           # jitted; every argument an array (or a tree of them)
  args: tuple
  compile_s: float       # lower + compile, before the first call
  xla: dict              # compiled_stats of the compiled stage


def compile_stage(name: str, fn: Callable, args: tuple) -> Stage:
  """Lower and compile (timed); later calls of fn with these shapes reuse the executable."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return Stage(name, fn, args, time.perf_counter() - t, timing.compiled_stats(compiled))


def jit_stage(fn: Callable, spec, **static) -> Callable:
  """A pipeline stage jitted over its arrays, the Spec and any static values closed over, traced
  at the pipeline's matmul precision (a stage alone would take the backend's: TF32 on a GPU)."""
  def stage(*args):
    with matmul_precision(spec.conf):
      return fn(spec, *args, **static)
  return jax.jit(stage)


def build_stages(params, spec, images, roles, text, stages: Sequence[str]) -> List[Stage]:
  """The requested pipeline stages, compiled, each with the outputs of the stage before it."""
  p = Params(params, None)
  size = images.shape[1]
  grid = spec.grid((size, size))
  fns = {"encoder": jit_stage(pl.encode, spec),
         "seclip": jit_stage(pl.seclip_stage, spec, n_patches=grid[0] * grid[1]),
         "lnamd": jit_stage(pl.lnamd_stage, spec, grid=grid),
         "mutual_filtering": jit_stage(pl.filter_stage, spec, grid=grid),
         "maps": jit_stage(pl.maps_stage, spec, out_hw=(size, size)),
         "end_to_end": jit_stage(pl.detect_batch, spec)}
  out = {}

  def run(name, *args):
    out[name] = compile_stage(name, fns[name], args)
    return jax.block_until_ready(fns[name](*args))

  feats = run("encoder", p, images)
  se = run("seclip", p, feats, text)
  steps = run("lnamd", feats.layer_tokens)
  filt, _ = run("mutual_filtering", steps, se.mask0, roles, None)
  if "maps" in stages:
    patch_map = pl.fusion_stage(spec, se.seg_prob, filt.step_scores, filt.n_ref)
    out["maps"] = compile_stage("maps", fns["maps"], (patch_map.reshape(-1, *grid),))
  if "end_to_end" in stages:
    out["end_to_end"] = compile_stage("end_to_end", fns["end_to_end"], (p, images, roles, text, None))
  return [out[k] for k in STAGES if k in stages]


def encoder_call(params, cfg, conf, b: int, seed: int = 0) -> Callable[[], None]:
  """The encoder row's function on the encoder row's inputs, as a call that waits for its result
  (for timing it in turn with transformers' tower)."""
  spec = make_spec(cfg, conf)
  images, _, _ = random_inputs(cfg, b, conf.image_size, seed)
  fn, p = jit_stage(pl.encode, spec), Params(params, None)
  return lambda: jax.block_until_ready(fn(p, images))


def bench_stage(stage: Stage, b: int, flops: Optional[float], peak: Optional[float],
                repeats: int) -> dict:
  """One compiled stage: warm-up, `repeats` timed calls, memory, rates."""
  probe = timing.MemoryProbe()
  t = timing.time_fn(stage.fn, *stage.args, repeats=repeats)
  row = {"stage": stage.name, "compile_s": stage.compile_s, **stage.xla, **probe.result(),
         "flops_analytic": flops, "times_ms": [1e3 * s for s in t["times_s"]],
         "min_ms_per_batch": 1e3 * t["min_s"]}
  return timing.row_rates(row, t["median_s"], b, flops, peak)


def bench_rows(params, cfg, conf, b: int, *, repeats: int = 5, peak: Optional[float] = None,
               stages: Sequence[str] = None, seed: int = 0) -> List[dict]:
  """Rows of every requested pipeline stage at batch size b and conf.compute_dtype."""
  stages = STAGES if stages is None else stages
  spec = make_spec(cfg, conf)
  images, roles, text = random_inputs(cfg, b, conf.image_size, seed)
  flops = pl.stage_flops(spec, conf.image_size, b)
  common = {"model_width": cfg.vision_width, "model_layers": cfg.vision_layers,
            "dtype": conf.compute_dtype, "batch": b, "image_size": conf.image_size,
            "attention_impl": spec.attention_impl}
  rows = []
  for stage in build_stages(params, spec, images, roles, text, [s for s in stages if s in STAGES]):
    rows.append({**common, **bench_stage(stage, b, flops[stage.name], peak, repeats)})
    logging.info("%s", table.format_row(rows[-1]))
  return rows


def window_rows(params, cfg, conf, b: int, windows: Sequence[int], *, repeats: int = 5,
                peak: Optional[float] = None, seed: int = 0) -> List[dict]:
  """mutual_filtering rows with aligned matching (`match_window` w each, DESIGN.md §4), on the
  inputs of the stage row, beside the unrestricted one: the filter stage alone is compiled per w."""
  spec = make_spec(cfg, conf)
  images, roles, text = random_inputs(cfg, b, conf.image_size, seed)
  p = Params(params, None)
  size = conf.image_size
  grid = spec.grid((size, size))
  feats = jit_stage(pl.encode, spec)(p, images)
  se = jit_stage(pl.seclip_stage, spec, n_patches=grid[0] * grid[1])(p, feats, text)
  steps = jax.block_until_ready(jit_stage(pl.lnamd_stage, spec, grid=grid)(feats.layer_tokens))
  common = {"model_width": cfg.vision_width, "model_layers": cfg.vision_layers,
            "dtype": conf.compute_dtype, "batch": b, "image_size": size}
  rows = []
  for w in windows:
    spec_w = make_spec(cfg, conf.replace(match_window=w))
    stage = compile_stage("mutual_filtering", jit_stage(pl.filter_stage, spec_w, grid=grid),
                          (steps, se.mask0, roles, None))
    flops = pl.stage_flops(spec_w, size, b)["mutual_filtering"]
    rows.append({**common, "match_window": w, **bench_stage(stage, b, flops, peak, repeats)})
    logging.info("%s", table.format_row(rows[-1]))
  return rows


def reference_rows(params, cfg, conf, b: int, k: int, *, repeats: int = 5,
                   peak: Optional[float] = None, stages: Sequence[str] = REFERENCE_STAGES,
                   seed: int = 0) -> List[dict]:
  """The references rows: the bank built once (K images), a batch against bank + batch-mates, a
  stream's batch against its ring of K. The bank's row is per category, the others per batch."""
  rows = []
  images, roles, text = random_inputs(cfg, b, conf.image_size, seed)
  bank_images, _, _ = random_inputs(cfg, k, conf.image_size, seed + 1)
  common = {"dtype": conf.compute_dtype, "batch": b, "bank_size": k, "image_size": conf.image_size}
  both = make_spec(cfg, conf.replace(references="both"))
  p = Params(params, None)
  features = jit_stage(pl.features_steps, both)
  steps = jax.block_until_ready(features(p, bank_images))
  bank = references.bank(steps, built_under=both.built_under())
  enc = pl.stage_flops(both, conf.image_size, k)
  runs = {
      "bank_features": (features, (p, bank_images), k, enc["encoder"] + enc["lnamd"]),
      "end_to_end_bank": (jit_stage(pl.detect_batch, both), (p, images, roles, text, bank), b,
                          pl.stage_flops(both, conf.image_size, b, k)["end_to_end"]),
  }
  stream_conf = conf.replace(stream_window=k)
  stream = make_spec(cfg, stream_conf)
  ring = Model.of(params, cfg).empty_stream(stream_conf)
  positions = make_roles(np.ones(b, bool), np.ones(b, bool), np.arange(b) + k)
  # Results and the updated ring are both outputs (nothing dead-code eliminated); not donated, so
  # every timed call starts from the same ring.
  runs["stream_step"] = (jit_stage(pl.stream_step, stream), (p, images, positions, text, ring), b,
                         pl.stage_flops(stream, conf.image_size, b, k)["end_to_end"])
  for name in stages:
    fn, args, n, flops = runs[name]
    stage = compile_stage(name, fn, args)
    rows.append({**common, "batch": n, **bench_stage(stage, n, flops, peak, repeats)})
    logging.info("%s", table.format_row(rows[-1]))
  return rows


# ------------------------------------------------------------------------------------------------
# Data parallel: independent batches sharded over a "data" axis, the programs' round.


def dp_row(params, cfg, conf, n_dev: int, b: int, repeats: int, peak: Optional[float],
           seed: int = 0) -> dict:
  """End-to-end scoring of n_dev independent batches of b images, one per device."""
  devices = jax.devices()[:n_dev]
  mesh = sharding.make_mesh(devices)
  data = NamedSharding(mesh, P(sharding.AXIS))
  spec = make_spec(cfg, conf)
  images, _, text = random_inputs(cfg, n_dev * b, conf.image_size, seed)
  images = jax.device_put(images.reshape(n_dev, b, *images.shape[1:]), data)
  ones = np.ones((n_dev, b), bool)
  roles = Roles(*(jax.device_put(x, data) for x in (ones, ones, np.zeros((n_dev, b), np.int32))))
  p = Params(sharding.replicate(params, mesh), None)
  text = sharding.replicate(text, mesh)
  fn = sharding.round_fn(mesh, spec)            # what the programs run
  t = time.perf_counter()
  fn.lower(p, images, roles, text, None).compile()
  compile_s = time.perf_counter() - t
  probe = timing.MemoryProbe(devices)
  timed = timing.time_fn(fn, p, images, roles, text, None, repeats=repeats)
  flops = n_dev * pl.stage_flops(spec, conf.image_size, b)["end_to_end"]
  row = {"stage": "end_to_end_dp", "devices": n_dev, "dtype": conf.compute_dtype, "batch": b,
         "images_per_call": n_dev * b, "compile_s": compile_s, "flops_analytic": flops,
         "times_ms": [1e3 * s for s in timed["times_s"]], **probe.result()}
  row = timing.row_rates(row, timed["median_s"], n_dev * b, flops, peak * n_dev if peak else None)
  row["images_per_s_per_device"] = row["images_per_s"] / n_dev
  return row


def dp_rows(params, cfg, conf, counts: Sequence[int], b: int, repeats: int,
            peak: Optional[float], seed: int = 0) -> List[dict]:
  rows = []
  for n in counts:
    if n > jax.device_count():
      rows.append({"stage": "end_to_end_dp", "devices": n, "skipped":
                   f"only {jax.device_count()} device(s)"})
      continue
    rows.append(dp_row(params, cfg, conf, n, b, repeats, peak, seed))
    logging.info("%s", table.format_row(rows[-1]))
  base = next((r for r in rows if r.get("devices") == 1 and "images_per_s" in r), None)
  for r in rows:
    if base and "images_per_s" in r:
      r["scaling_efficiency"] = r["images_per_s"] / (base["images_per_s"] * r["devices"])
  return rows

