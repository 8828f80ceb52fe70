r"""Speed of FiSeCLIP-JAX per stage and end to end, with FLOPs, MFU and peak memory.

Random weights (speed does not depend on them), random normalized images, random unit text features.
Every stage row jits the pipeline's own stage function (`pipeline.encode`, `seclip_stage`,
`lnamd_stage`, `filter_stage`, `maps_stage`, `detect_batch`) with fixed shapes; compilation and one
warm-up call are excluded; each timing blocks on the result; the median over `--repeats` is reported.
References rows: `bank_features` (a known-good bank of --bank_size images, encoded once per
category), `end_to_end_bank` (a batch scored against that bank and its batch-mates, "both") and
`stream_step` (a batch of a stream against the ring of the --bank_size images before it).

  fiseclip-bench --platform gpu           (python -m eval.bench in a checkout)
  fiseclip-bench --platform cpu --model tiny --batch_sizes 2,8 --dtypes float32
  fiseclip-bench --platform cpu --host_devices 8 --model tiny --devices 1,2,4,8
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import functools

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import fiseclip_jax as fj
from fiseclip_jax import metrics, pipeline as pl, references, registry, sharding, timing
from fiseclip_jax.cli import app, bench_torch, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.pipeline import STAGES

FLAGS = flags.FLAGS
MODELS = ("vit_l14_336", "vit_b16", "tiny")
REFERENCE_STAGES = ("bank_features", "end_to_end_bank", "stream_step")


def define_flags() -> None:
  f = flags
  f.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "jax_platforms, set before any device use.")
  f.DEFINE_integer("host_devices", None, "Force N host (CPU) devices via XLA_FLAGS (testing).")
  f.DEFINE_enum("model", "vit_l14_336", MODELS, "CLIP architecture (random weights).")
  f.DEFINE_integer("image_size", 518, "Input side S (a multiple of the patch size).")
  f.DEFINE_list("batch_sizes", ["2", "8", "16", "32", "64"], "Batch sizes B.")
  f.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
  f.DEFINE_list("stages", list(STAGES) + list(REFERENCE_STAGES), "Stages to time.")
  f.DEFINE_integer("bank_size", 16, "K: images of the bank and of a stream's ring (references rows).")
  f.DEFINE_integer("repeats", 5, "Timed calls per stage (median reported).")
  f.DEFINE_string("out", "results/bench.json", "JSON output path.")
  f.DEFINE_bool("torch_compare", True, "Also time transformers' CLIPVisionModel tower.")
  f.DEFINE_integer("torch_threads", None, "torch.set_num_threads for the CPU comparison "
                   "(default: torch's own choice).")
  f.DEFINE_float("gpu_mem_fraction", 0.6, "With --torch_compare: JAX's share of GPU memory "
                 "(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set), the rest left to torch.")
  f.DEFINE_list("devices", None, "Device counts for data-parallel end-to-end rows, e.g. 1,2,4,8.")
  f.DEFINE_integer("dp_batch_size", 16, "Per-device batch of the data-parallel rows.")
  f.DEFINE_string("dp_dtype", None, "dtype of the data-parallel rows (default: bfloat16 off CPU "
                  "when listed in --dtypes, else the first of --dtypes).")
  f.DEFINE_bool("metrics_bench", True, "Time fiseclip_jax.metrics on random maps and blob masks.")
  f.DEFINE_integer("metrics_n", 150, "Maps in the metrics benchmark.")
  f.DEFINE_integer("metrics_size", 518, "Side of the maps in the metrics benchmark.")
  f.DEFINE_float("peak_tflops", None, "Peak TFLOP/s for MFU, every dtype. Default: 870 on an "
                 "H200 (its bf16 matmul); on CPU a 2048^3 matmul of each dtype, measured at start "
                 "and end; elsewhere a bf16 8192^3 matmul.")
  f.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")


# ------------------------------------------------------------------------------------------------
# Set-up.


def set_platform(platform: Optional[str], host_devices: Optional[int] = None,
                 gpu_mem_fraction: Optional[float] = None):
  """jax_platforms, forced host devices, JAX's GPU memory share; before the first device use."""
  if gpu_mem_fraction and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(gpu_mem_fraction)
  if host_devices:
    flag = f"--xla_force_host_platform_device_count={int(host_devices)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  if platform:
    jax.config.update("jax_platforms", platform)


def model_configs(model: str, image_size: int):
  """(CLIPConfig, FiSeConfig) of a named model, feature / proxy layers fitted to its depth."""
  if model == "vit_l14_336":
    cfg, layers, proxy = fj.CLIPConfig.vit_l14_336(), (6, 12, 18, 24), 12
  elif model == "vit_b16":
    cfg, layers, proxy = fj.CLIPConfig.vit_b16(), (3, 6, 9, 12), 6
  elif model == "tiny":
    cfg, layers, proxy = fj.CLIPConfig.tiny(), (1, 2, 3, 4), 2
  else:
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  if image_size % cfg.patch_size:
    raise ValueError(f"--image_size {image_size} is not a multiple of {model}'s patch size "
                     f"{cfg.patch_size}")
  return cfg, fj.FiSeConfig(image_size=image_size, feature_layers=layers, proxy_layer=proxy)


def random_inputs(cfg, b: int, size: int, seed: int = 0):
  """Images (B, S, S, 3) ~ N(0, 1) (normalized pixels), roles (all query + reference), text (2, D)."""
  rng = np.random.RandomState(seed)
  images = jnp.asarray(rng.standard_normal((b, size, size, 3)).astype(np.float32))
  text = rng.standard_normal((2, cfg.embed_dim)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return images, fj.make_roles(np.ones(b, bool)), jnp.asarray(text)


# ------------------------------------------------------------------------------------------------
# Stages: each one the pipeline's own function, jitted with the Spec static.


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


def stage_fns(spec) -> Dict[str, Callable]:
  """The pipeline's stage functions, jitted (Spec closed over: static)."""
  fns = dict(encoder=pl.encode, seclip=pl.seclip_stage, lnamd=pl.lnamd_stage,
             mutual_filtering=pl.filter_stage, maps=pl.maps_stage, end_to_end=pl.detect_batch,
             bank_features=pl.features_steps, end_to_end_bank=pl.detect_batch,
             stream_step=pl.stream_step)
  static = {"seclip": (3,), "lnamd": (1,), "maps": (1,)}   # n_patches, grid, out_hw (after spec)
  return {k: jax.jit(functools.partial(f, spec), static_argnums=static.get(k, ()))
          for k, f in fns.items()}


def build_stages(params, spec, images, roles, text, stages: Sequence[str]) -> List[Stage]:
  """The requested pipeline stages, compiled, each with the outputs of the stage before it."""
  fns = stage_fns(spec)
  p = pl.Params(params, None)
  size = images.shape[1]
  grid = spec.grid((size, size))
  out = {}

  def run(name, *args):
    out[name] = compile_stage(name, fns[name], args)
    return jax.block_until_ready(fns[name](*args))

  feats = run("encoder", p, images)
  se = run("seclip", p, feats, text, grid[0] * grid[1])
  steps = run("lnamd", feats.layer_tokens, grid)
  filt, _ = run("mutual_filtering", steps, se.mask0, roles, None)
  if "maps" in stages:
    patch_map = pl.fusion_stage(spec, se.seg_prob, filt.step_scores, filt.n_ref)
    out["maps"] = compile_stage("maps", fns["maps"], (patch_map.reshape(-1, *grid), (size, size)))
  if "end_to_end" in stages:
    out["end_to_end"] = compile_stage("end_to_end", fns["end_to_end"], (p, images, roles, text, None))
  return [out[k] for k in pl.STAGES if k in stages]


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
  spec = fj.make_spec(cfg, conf)
  images, roles, text = random_inputs(cfg, b, conf.image_size, seed)
  flops = pl.stage_flops(spec, conf.image_size, b)
  common = {"model_width": cfg.vision_width, "model_layers": cfg.vision_layers,
            "dtype": conf.compute_dtype, "batch": b, "image_size": conf.image_size,
            "attention_impl": spec.attention_impl}
  rows = []
  for stage in build_stages(params, spec, images, roles, text, [s for s in stages if s in pl.STAGES]):
    rows.append({**common, **bench_stage(stage, b, flops[stage.name], peak, repeats)})
    logging.info("%s", format_row(rows[-1]))
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
  both = fj.make_spec(cfg, conf.replace(references="both"))
  fns = stage_fns(both)
  p = pl.Params(params, None)
  steps = jax.block_until_ready(fns["bank_features"](p, bank_images))
  bank = references.bank(steps)
  enc = pl.stage_flops(both, conf.image_size, k)
  runs = {
      "bank_features": (fns["bank_features"], (p, bank_images), k, enc["encoder"] + enc["lnamd"]),
      "end_to_end_bank": (fns["end_to_end_bank"], (p, images, roles, text, bank), b,
                          pl.stage_flops(both, conf.image_size, b, k)["end_to_end"]),
  }
  rolling = fj.make_spec(cfg, conf.replace(references="rolling"))
  ring = pl.empty_stream(cfg, rolling.conf, k)
  positions = fj.make_roles(np.ones(b, bool), np.ones(b, bool), np.arange(b) + k)
  stream_flops = pl.stage_flops(rolling, conf.image_size, b, k)["end_to_end"]
  # Results and the updated ring are both outputs (nothing dead-code eliminated); not donated, so
  # every timed call starts from the same ring.
  runs["stream_step"] = (stage_fns(rolling)["stream_step"], (p, images, positions, text, ring), b,
                         stream_flops)
  for name in stages:
    fn, args, n, flops = runs[name]
    stage = compile_stage(name, fn, args)
    rows.append({**common, "batch": n, **bench_stage(stage, n, flops, peak, repeats)})
    logging.info("%s", format_row(rows[-1]))
  return rows


# ------------------------------------------------------------------------------------------------
# Data parallel: independent batches sharded over a "data" axis, the eval programs' round.


def dp_row(params, cfg, conf, n_dev: int, b: int, repeats: int, peak: Optional[float],
           seed: int = 0) -> dict:
  """End-to-end scoring of n_dev independent batches of b images, one per device."""
  devices = jax.devices()[:n_dev]
  mesh = sharding.make_mesh(devices)
  data = NamedSharding(mesh, P("data"))
  spec = fj.make_spec(cfg, conf)
  images, _, text = random_inputs(cfg, n_dev * b, conf.image_size, seed)
  images = jax.device_put(images.reshape(n_dev, b, *images.shape[1:]), data)
  ones = np.ones((n_dev, b), bool)
  roles = fj.Roles(*(jax.device_put(x, data) for x in (ones, ones, np.zeros((n_dev, b), np.int32))))
  p = pl.Params(sharding.replicate(params, mesh), None)
  text = sharding.replicate(text, mesh)
  fn = sharding.round_fn(mesh, spec)            # what the eval programs run
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
    logging.info("%s", format_row(rows[-1]))
  base = next((r for r in rows if r.get("devices") == 1 and "images_per_s" in r), None)
  for r in rows:
    if base and "images_per_s" in r:
      r["scaling_efficiency"] = r["images_per_s"] / (base["images_per_s"] * r["devices"])
  return rows


# ------------------------------------------------------------------------------------------------
# Metrics.


def blob_masks(rng, n: int, size: int):
  """(n, size, size) bool: about half the images hold 1-3 discs, the rest are normal."""
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((n, size, size), bool)
  for i in range(n):
    if i % 2 == 0:
      continue
    for _ in range(rng.randint(1, 4)):
      cy, cx = rng.randint(0, size, 2)
      r = rng.uniform(0.02, 0.12) * size
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  return masks


def metrics_bench(n: int = 150, size: int = 518, seed: int = 0) -> dict:
  """Seconds of pixel_metrics on n random size x size float32 maps with blob masks, and of
  image_metrics on the n per-image labels and max scores (data generation not timed)."""
  rng = np.random.RandomState(seed)
  masks = blob_masks(rng, n, size)
  maps = (rng.random_sample(masks.shape) + 0.5 * masks).astype(np.float32)
  t = time.perf_counter()
  pix = metrics.pixel_metrics(masks, maps)
  pixel_s = time.perf_counter() - t
  labels, scores = masks.reshape(n, -1).any(1), maps.reshape(n, -1).max(1)
  t = time.perf_counter()
  img = metrics.image_metrics(labels, scores)
  image_s = time.perf_counter() - t
  return {"n_maps": n, "size": size, "pixels": int(masks.size), "pixel_metrics_s": pixel_s,
          "image_metrics_s": image_s, "pixel_metrics": pix, "image_metrics": img}


# ------------------------------------------------------------------------------------------------
# Output.


def _scaled(key: str, scale: float) -> Callable:
  return lambda r: r[key] * scale if r.get(key) is not None else None


# (header, width, format, value of a row)
COLUMNS = (
    ("ms/batch", 10, ".2f", _scaled("ms_per_batch", 1)),
    ("ms/img", 9, ".3f", _scaled("ms_per_image", 1)),
    ("img/s", 9, ".2f", _scaled("images_per_s", 1)),
    ("GFLOP/img", 9, ".2f", _scaled("flops_per_image", 1e-9)),
    ("GFLOP/s", 9, ".1f", _scaled("tflops_per_s", 1e3)),
    ("MFU%", 6, ".1f", _scaled("mfu", 100)),
    ("peak MiB", 9, ".1f", _scaled("peak_memory_bytes", 2 ** -20)),
    ("XLA MiB", 9, ".1f", _scaled("xla_memory_bytes", 2 ** -20)),
    ("torch ms", 9, ".3f", _scaled("torch_ms_per_image", 1)),
    ("ratio", 6, ".2f", _scaled("jax_over_torch", 1)),
)
HEADER = f"{'stage':<17} {'dtype':<9} {'B':>4} " + " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)


def _fmt(v, width: int, spec: str) -> str:
  ok = v is not None and math.isfinite(v)
  return format(v, f"{width}{spec}") if ok else f"{'-':>{width}}"


def format_row(r: dict) -> str:
  stage = r.get("stage", "?") + (f"[{r['devices']}]" if "devices" in r else "")
  head = f"{stage:<17} {r.get('dtype', '-'):<9} {r.get('batch', '-'):>4} "
  if "error" in r or "skipped" in r:
    return head + (r.get("error") or r.get("skipped"))
  return head + " ".join(_fmt(get(r), w, spec) for _, w, spec, get in COLUMNS)


def print_table(result: dict, file=sys.stdout):
  """The rows as a fixed-width table, then the data-parallel rows and the metrics timing."""
  m = result["machine"]
  peaks = ", ".join(f"{d} {v:.3f}" for d, v in result["peak"]["tflops"].items())
  print(f"# {m['device_kind']} x{m['device_count']} ({m['platform']}), "
        f"jax {result['versions']['jax']}, {result['date']}; peak TFLOP/s: {peaks} "
        f"({result['peak']['source']})", file=file)
  print("# mem: " + ", ".join(sorted({r["peak_memory_source"] for r in result["rows"]
                                      if r.get("peak_memory_source")})) +
        "; XLA MiB: compiled buffers (args + outputs + temps); MFU and GFLOP/s from the analytic "
        "FLOP count; ratio = JAX encoder / torch tower ms per image", file=file)
  print(HEADER, file=file)
  for r in result["rows"]:
    print(format_row(r), file=file)
  for r in result.get("dp_rows", []):
    line = format_row(r)
    if "scaling_efficiency" in r:
      line += f"  eff {r['scaling_efficiency']:.2f}"
    print(line, file=file)
  mb = result.get("metrics")
  if mb:
    print(f"# metrics: pixel_metrics on {mb['n_maps']} maps of {mb['size']}x{mb['size']} "
          f"({mb['pixels'] / 1e6:.1f} M pixels): {mb['pixel_metrics_s']:.2f} s; image_metrics: "
          f"{mb['image_metrics_s'] * 1e3:.2f} ms", file=file)


def write_json(result: dict, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------


def dp_dtype(dtypes: Sequence[str], explicit: Optional[str]) -> str:
  if explicit:
    return explicit
  if jax.default_backend() != "cpu" and "bfloat16" in dtypes:
    return "bfloat16"
  return dtypes[0]


def new_result(cfg, base) -> dict:
  """The JSON skeleton: date, machine, versions, flags, configs, peaks."""
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": timing.machine(), "versions": runtime.versions(),
          "flags": {f.name: f.value for f in app.program_flags()},
          "model": {"name": FLAGS.model, **cfg.to_dict()}, "fise": base.to_dict(),
          "inputs": "random weights, images ~ N(0,1), random unit text features",
          "peak": timing.peak_tflops(FLAGS.peak_tflops, FLAGS.dtypes), "rows": [], "dp_rows": []}


def setup_torch() -> tuple:
  """(torch device or None, a note saying what was compared or why not)."""
  if not FLAGS.torch_compare:
    return None, "skipped: disabled"
  if not bench_torch.torch_available():
    return None, "skipped: torch/transformers not importable"
  device = bench_torch.torch_device(jax.default_backend())
  if device is None:
    return None, "skipped: torch has no device matching the JAX platform"
  if device == "cpu" and FLAGS.torch_threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(FLAGS.torch_threads)
  return device, "compared on " + device


def error_row(stage: str, dtype: str, b: int, e: Exception) -> dict:
  logging.exception("%s dtype %s B=%d failed", stage, dtype, b)
  return {"stage": stage, "dtype": dtype, "batch": b, "error": repr(e)[:500]}


def bench_dtype(result: dict, params, cfg, conf, batch_sizes: Sequence[int],
                device: Optional[str]):
  """Stage rows, references rows and the torch tower row of every B at one dtype (OOM: error row)."""
  dtype, peak = conf.compute_dtype, result["peak"]["tflops"][conf.compute_dtype]
  model = bench_torch.torch_tower(cfg, dtype, device, FLAGS.seed) if device else None
  ref_stages = [s for s in FLAGS.stages if s in REFERENCE_STAGES]
  for b in batch_sizes:
    try:
      result["rows"] += bench_rows(params, cfg, conf, b, repeats=FLAGS.repeats, peak=peak,
                                   stages=FLAGS.stages, seed=FLAGS.seed)
      if ref_stages:
        result["rows"] += reference_rows(params, cfg, conf, b, FLAGS.bank_size,
                                         repeats=FLAGS.repeats, peak=peak, stages=ref_stages,
                                         seed=FLAGS.seed)
    except Exception as e:   # pylint: disable=broad-except  (e.g. out of memory at large B)
      result["rows"].append(error_row("all", dtype, b, e))
    if model is not None:
      try:
        images, _, _ = random_inputs(cfg, b, conf.image_size, FLAGS.seed)
        flops = b * cfg_flops(cfg, conf.image_size)
        result["rows"].append(bench_torch.torch_row(model, images, dtype, device, b, flops, peak,
                                                    FLAGS.repeats))
        logging.info("%s", format_row(result["rows"][-1]))
      except Exception as e:   # pylint: disable=broad-except
        result["rows"].append(error_row("torch_tower", dtype, b, e))
    bench_torch.compare_torch(result["rows"])
    write_json(result, FLAGS.out)


def cfg_flops(cfg, size: int) -> float:
  """One vision pass per image (what the torch tower runs), from the CLIP port's own count."""
  return registry.for_config(cfg).flops(cfg, size)


def refine_cpu_peaks(result: dict):
  """A shared CPU's matmul rate drifts with its load: keep the better of start and end."""
  peaks = result["peak"]["tflops"]
  start, end = dict(peaks), timing.peak_tflops(None, list(peaks))["tflops"]
  peaks.update({d: max(start[d], end[d]) for d in peaks})
  result["peak"].update(start_tflops=start, end_tflops=end)
  timing.set_mfu(result["rows"] + result["dp_rows"], peaks)


def run() -> None:
  set_platform(FLAGS.platform, FLAGS.host_devices,
               FLAGS.gpu_mem_fraction if FLAGS.torch_compare else None)
  bad = sorted(set(FLAGS.stages) - set(STAGES) - set(REFERENCE_STAGES))
  if bad:
    raise UsageError(f"--stages: unknown {bad}; expected a subset of {STAGES + REFERENCE_STAGES}")
  try:
    cfg, base = model_configs(FLAGS.model, FLAGS.image_size)
  except ValueError as e:
    raise UsageError(str(e)) from None
  result = new_result(cfg, base)
  logging.info("machine %s, peak %s", result["machine"], result["peak"])
  params = fj.init_params(cfg, FLAGS.seed)
  device, result["torch"] = setup_torch()
  for dtype in FLAGS.dtypes:
    bench_dtype(result, params, cfg, base.replace(compute_dtype=dtype),
                [int(b) for b in FLAGS.batch_sizes], device)
  if FLAGS.devices:
    conf = base.replace(compute_dtype=dp_dtype(FLAGS.dtypes, FLAGS.dp_dtype))
    result["dp_rows"] = dp_rows(params, cfg, conf, [int(n) for n in FLAGS.devices],
                                FLAGS.dp_batch_size, FLAGS.repeats,
                                result["peak"]["tflops"].get(conf.compute_dtype), FLAGS.seed)
    write_json(result, FLAGS.out)
  if FLAGS.metrics_bench:
    result["metrics"] = metrics_bench(FLAGS.metrics_n, FLAGS.metrics_size, FLAGS.seed)
  if FLAGS.peak_tflops is None and jax.default_backend() == "cpu":
    refine_cpu_peaks(result)
  write_json(result, FLAGS.out)
  print_table(result)
  print(f"# wrote {FLAGS.out}")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv)
