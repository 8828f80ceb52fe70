r"""Speed of FiSeCLIP-JAX per stage and end to end, with FLOPs, MFU and peak memory.

Random weights (speed does not depend on them), random normalized images, random unit text features.
Every stage is jitted on its own with fixed shapes; compilation and one warm-up call are excluded;
each timing blocks on the result; the median over `--repeats` calls is reported.

  python -m eval.bench --platform gpu
  python -m eval.bench --platform cpu --model tiny --batch_sizes 2,8 --dtypes float32
  python -m eval.bench --platform cpu --host_devices 8 --model tiny --devices 1,2,4,8

Stages (pipeline order): encoder (the vision tower with the SeCLIP proxy block, as
`fj.encode_image`), seclip (text probabilities and the initial mask M0), lnamd (all LNAMD maps,
`ficlip.feature_steps`), mutual_filtering (`ficlip.mutual_filtering`: masked mutual scoring of every
unordered pair and the votes), maps (`maps.pixel_maps`: upsampling and smoothing), end_to_end
(`pipeline._detect`, what `fj.detect` runs). See docs/PERFORMANCE.md.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform as py_platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fiseclip_jax as fj
from fiseclip_jax import ficlip, maps as maps_lib, pipeline, references, seclip, sharding
from fiseclip_jax.clip import model as clip_model
from fiseclip_jax.cli.runtime import versions

STAGES = ("encoder", "seclip", "lnamd", "mutual_filtering", "maps", "end_to_end")
MODELS = ("vit_l14_336", "vit_b16", "tiny")
H200_BF16_TFLOPS = 870.0   # bf16 dense matmul measured on the H200 (issue "Fast").

FLAGS = flags.FLAGS
flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"],
                  "jax_platforms, set before any device use.")
flags.DEFINE_integer("host_devices", None, "Force N host (CPU) devices via XLA_FLAGS (testing).")
flags.DEFINE_enum("model", "vit_l14_336", MODELS, "CLIP architecture (random weights).")
flags.DEFINE_integer("image_size", 518, "Input side S (a multiple of the patch size).")
flags.DEFINE_list("batch_sizes", ["2", "8", "16", "32", "64"], "Batch sizes B.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_list("stages", list(STAGES), "Stages to time.")
flags.DEFINE_integer("repeats", 5, "Timed calls per stage (median reported).")
flags.DEFINE_string("out", "results/bench.json", "JSON output path.")
flags.DEFINE_bool("torch_compare", True, "Also time transformers' CLIPVisionModel tower.")
flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads for the CPU comparison "
                     "(default: torch's own choice).")
flags.DEFINE_float("gpu_mem_fraction", 0.6, "With --torch_compare: JAX's share of GPU memory "
                   "(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set), the rest left to torch.")
flags.DEFINE_list("devices", None, "Device counts for data-parallel end-to-end rows, e.g. 1,2,4,8.")
flags.DEFINE_integer("dp_batch_size", 16, "Per-device batch of the data-parallel rows.")
flags.DEFINE_string("dp_dtype", None, "dtype of the data-parallel rows (default: bfloat16 off CPU "
                    "when listed in --dtypes, else the first of --dtypes).")
flags.DEFINE_bool("metrics_bench", True, "Time fiseclip_jax.metrics on random maps and blob masks.")
flags.DEFINE_integer("metrics_n", 150, "Maps in the metrics benchmark.")
flags.DEFINE_integer("metrics_size", 518, "Side of the maps in the metrics benchmark.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s for MFU, every dtype. Default: 870 on an "
                   "H200 (its bf16 matmul); on CPU a 2048^3 matmul of each dtype, measured at start "
                   "and end; elsewhere a bf16 8192^3 matmul.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")


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


def machine() -> dict:
  devs = jax.devices()
  return {"platform": jax.default_backend(), "devices": [str(d) for d in devs],
          "device_kind": devs[0].device_kind, "device_count": len(devs),
          "host_cpus": os.cpu_count(), "host": py_platform.platform()}


def random_inputs(cfg, b: int, size: int, seed: int = 0):
  """Images (B, S, S, 3) ~ N(0, 1) (normalized pixels), valid (B,), text (2, D) unit rows."""
  rng = np.random.RandomState(seed)
  images = jnp.asarray(rng.standard_normal((b, size, size, 3)).astype(np.float32))
  text = rng.standard_normal((2, cfg.embed_dim)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return images, jnp.ones((b,), bool), jnp.asarray(text)


# ------------------------------------------------------------------------------------------------
# Timing, memory, FLOPs.


def block(x):
  return jax.block_until_ready(x)


def time_fn(fn: Callable, *args, repeats: int = 5, sync: Callable = block) -> dict:
  """Run once (warm-up, excluded), then `repeats` timed calls, each waited for with `sync`."""
  sync(fn(*args))
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    sync(fn(*args))
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def max_rss_bytes() -> int:
  """High-water mark of this process's resident memory (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes(devices=None) -> Optional[int]:
  """Max over `devices` of the allocator's peak_bytes_in_use, None where not reported (CPU)."""
  peaks = []
  for d in devices or jax.local_devices()[:1]:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class MemoryProbe:
  """Peak memory around a block of work: device peak where reported, else host max-RSS growth."""

  def __init__(self, devices=None):
    self.devices = devices
    self.rss0 = max_rss_bytes()

  def result(self) -> dict:
    peak = device_peak_bytes(self.devices)
    if peak is not None:
      return {"peak_memory_bytes": peak, "peak_memory_source": "device_peak_bytes_in_use"}
    return {"peak_memory_bytes": max_rss_bytes() - self.rss0,
            "peak_memory_source": "host_max_rss_delta"}


def compiled_stats(compiled) -> dict:
  """XLA's own FLOP count and buffer sizes of a compiled stage (None where not available)."""
  out = {"xla_flops": None, "xla_memory_bytes": None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops", -1) >= 0:
      out["xla_flops"] = float(cost["flops"])
  except Exception:   # pylint: disable=broad-except
    pass
  try:
    m = compiled.memory_analysis()
    out["xla_memory_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                                  + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:   # pylint: disable=broad-except
    pass
  return out


def measure_matmul_tflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` TFLOP/s of an n x n x n matmul on the default device."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  t = time_fn(f, a, b, repeats=repeats)
  return 2.0 * n ** 3 / t["min_s"] / 1e12


def peak_tflops(flag_value: Optional[float], dtypes: Sequence[str]) -> dict:
  """The FLOP/s roof of each dtype for MFU, and where it comes from."""
  if flag_value:
    return {"tflops": {d: float(flag_value) for d in dtypes}, "source": "--peak_tflops"}
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return {"tflops": {d: measure_matmul_tflops(d, 2048, 20) for d in dtypes},
            "source": "measured 2048^3 matmul of each dtype (best of 20; better of start and end)"}
  if "H200" in dev.device_kind:
    return {"tflops": {d: H200_BF16_TFLOPS for d in dtypes},
            "source": "H200 bf16 dense matmul, 870 TFLOP/s (issue), for every dtype"}
  bf16 = measure_matmul_tflops("bfloat16", 8192, 10)
  return {"tflops": {d: bf16 for d in dtypes},
          "source": "measured bfloat16 8192^3 matmul, for every dtype"}


def set_mfu(rows: List[dict], peaks: Dict[str, float]):
  """MFU = achieved FLOP/s (analytic count) / (peak FLOP/s of the row's dtype x its devices)."""
  for r in rows:
    peak = peaks.get(r.get("dtype"))
    if r.get("tflops_per_s") is not None:
      r["mfu"] = r["tflops_per_s"] / (peak * r.get("devices", 1)) if peak else None


# ------------------------------------------------------------------------------------------------
# Analytic FLOP counts (per batch; multiply-add = 2 FLOPs).


def tower_flops(cfg, size: int) -> float:
  """Per image: patch embedding + every block (2 * params_per_token * T + 4 T^2 W attention)."""
  g = size // cfg.patch_size
  t, w, m = 1 + g * g, cfg.vision_width, cfg.vision_mlp
  patch = 2.0 * g * g * 3 * cfg.patch_size ** 2 * w
  blocks = cfg.vision_layers * (2.0 * t * (4 * w * w + 2 * w * m) + 4.0 * t * t * w)
  return patch + blocks + 2.0 * w * cfg.embed_dim


def proxy_flops(cfg, conf, size: int) -> float:
  """Per image: SeCLIP's proxy attention probabilities, proxy block and patch projection."""
  g = size // cfg.patch_size
  t, w = 1 + g * g, cfg.vision_width
  n_proj = 2 if conf.proxy_attention == "layer" else 1
  probs = 2.0 * t * n_proj * w * w + 2.0 * t * t * w
  block = 2.0 * t * w * w + 2.0 * t * t * w + 2.0 * t * w * w
  return probs + block + 2.0 * g * g * w * cfg.embed_dim


def n_maps(conf) -> int:
  return len(conf.feature_layers) * len(conf.r_list)


def matching_flops(cfg, conf, size: int, b: int) -> float:
  """Per batch: n_unordered_pairs * n_maps * 2 * N^2 * C (one N x N x C matmul per pair and map)."""
  n = (size // cfg.patch_size) ** 2
  return b * (b - 1) / 2 * n_maps(conf) * 2.0 * n * n * cfg.vision_width


def stage_flops(cfg, conf, size: int, b: int) -> Dict[str, float]:
  """Analytic FLOPs per batch of every stage (small stages: element-wise work, approximate)."""
  g = size // cfg.patch_size
  n, c, d = g * g, cfg.vision_width, cfg.embed_dim
  out = {
      "encoder": b * (tower_flops(cfg, size) + proxy_flops(cfg, conf, size)),
      "seclip": b * (n + 1) * (2.0 * 2 * d + 3.0 * d),
      "lnamd": b * n * c * sum(8.0 + r * r for r in conf.r_list) * len(conf.feature_layers),
      "mutual_filtering": matching_flops(cfg, conf, size, b),
      "maps": b * 2.0 * (g * g * size + g * size * size),
      "torch_tower": b * tower_flops(cfg, size),
  }
  out["end_to_end"] = sum(out[k] for k in STAGES[:-1])
  return out


# ------------------------------------------------------------------------------------------------
# Stages.


class Stage(NamedTuple):
  name: str
  fn: Callable           # jitted; every argument an array
  args: tuple
  compile_s: float       # lower + compile, before the first call
  xla: dict              # compiled_stats of the compiled stage


def compile_stage(name: str, fn: Callable, args: tuple) -> Stage:
  """Lower and compile (timed); later calls of fn with these shapes reuse the executable."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return Stage(name, fn, args, time.perf_counter() - t, compiled_stats(compiled))


def stage_fns(cfg, conf, impl: str) -> Dict[str, Callable]:
  """Each stage as a jitted function of arrays only (configs are closed over: static)."""
  dtype = conf.compute_dtype
  grid = (conf.image_size // cfg.patch_size,) * 2

  def encoder(params, images):
    return clip_model._encode_image(params, cfg, images, conf.feature_layers, conf.proxy_layer,
                                    conf.proxy_heads, conf.proxy_attention, dtype, impl)

  def seclip_stage(cls_embed, proxy_patch_embed, text, scale):
    seg_prob = seclip.text_probs(proxy_patch_embed, text, scale)
    mask0 = seclip.initial_mask(seg_prob, conf.lam)
    return seclip.cls_score(cls_embed, text, scale), seg_prob, mask0

  def lnamd(layer_tokens):
    steps = ficlip.feature_steps(layer_tokens.astype(jnp.float32), grid, conf.r_list,
                                 conf.filter_loop)
    return steps.astype(jnp.dtype(dtype))

  def mutual_filtering(steps, mask0, valid):
    batch_refs, _ = references.candidates(conf.references, fj.make_roles(valid), None)
    return ficlip.mutual_filtering(steps, mask0, batch_refs, mu=conf.mu, rule=conf.vote,
                                   topk_frac=conf.topk_frac, agg=conf.ref_agg,
                                   pair_chunk=conf.pair_chunk)

  def maps(patch_map):
    return maps_lib.pixel_maps(patch_map, (conf.image_size,) * 2, conf.sigma)

  def end_to_end(params, images, valid, text):
    return pipeline._detect(params, cfg, conf, images, fj.make_roles(valid), text, None, impl)

  fns = dict(encoder=encoder, seclip=seclip_stage, lnamd=lnamd, mutual_filtering=mutual_filtering,
             maps=maps, end_to_end=end_to_end)
  return {k: jax.jit(f) for k, f in fns.items()}


def build_stages(params, cfg, conf, impl, images, valid, text,
                 stages: Sequence[str] = STAGES) -> List[Stage]:
  """The requested stages, compiled, with real inputs: each from running the stage before it."""
  fns = stage_fns(cfg, conf, impl)
  grid = (conf.image_size // cfg.patch_size,) * 2
  out = {}

  def run(name, *args):
    out[name] = compile_stage(name, fns[name], args)
    return block(fns[name](*args))

  feats = run("encoder", params, images)
  se = run("seclip", feats.cls_embed, feats.proxy_patch_embed, text, fj.logit_scale(params))
  steps = run("lnamd", feats.layer_tokens)
  filt = run("mutual_filtering", steps, se[2], valid)
  if "maps" in stages:
    patch_map = pipeline.fuse(conf, se[1], filt.step_scores, filt.n_ref).reshape(-1, *grid)
    out["maps"] = compile_stage("maps", fns["maps"], (patch_map,))
  if "end_to_end" in stages:
    out["end_to_end"] = compile_stage("end_to_end", fns["end_to_end"],
                                      (params, images, valid, text))
  return [out[k] for k in STAGES if k in stages]


def row_rates(row: dict, seconds: float, b: int, flops: Optional[float], peak: Optional[float]):
  """Fill ms/batch, ms/image, images/s, achieved TFLOP/s and MFU of a row."""
  row.update(ms_per_batch=1e3 * seconds, ms_per_image=1e3 * seconds / b, images_per_s=b / seconds)
  if flops is not None:
    row.update(flops_per_image=flops / b, tflops_per_s=flops / seconds / 1e12)
    row["mfu"] = flops / seconds / (peak * 1e12) if peak else None
  return row


def bench_stage(stage: Stage, b: int, flops: Optional[float], peak: Optional[float],
                repeats: int) -> dict:
  """One compiled stage: warm-up, `repeats` timed calls, memory, rates."""
  probe = MemoryProbe()
  timing = time_fn(stage.fn, *stage.args, repeats=repeats)
  row = {"stage": stage.name, "compile_s": stage.compile_s, **stage.xla, **probe.result(),
         "flops_analytic": flops, "times_ms": [1e3 * s for s in timing["times_s"]],
         "min_ms_per_batch": 1e3 * timing["min_s"]}
  return row_rates(row, timing["median_s"], b, flops, peak)


def bench_rows(params, cfg, conf, b: int, *, repeats: int = 5, peak: Optional[float] = None,
               stages: Sequence[str] = STAGES, seed: int = 0) -> List[dict]:
  """Rows of every requested stage at batch size b and conf.compute_dtype."""
  impl = pipeline.resolve_attention(conf)
  images, valid, text = random_inputs(cfg, b, conf.image_size, seed)
  flops = stage_flops(cfg, conf, conf.image_size, b)
  common = {"model_width": cfg.vision_width, "model_layers": cfg.vision_layers,
            "dtype": conf.compute_dtype, "batch": b, "image_size": conf.image_size,
            "attention_impl": impl}
  rows = []
  for stage in build_stages(params, cfg, conf, impl, images, valid, text, stages):
    rows.append({**common, **bench_stage(stage, b, flops[stage.name], peak, repeats)})
    logging.info("%s", format_row(rows[-1]))
  return rows


# ------------------------------------------------------------------------------------------------
# transformers' PyTorch tower, for comparison.


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def torch_tower(cfg, dtype: str, device: str, seed: int = 0):
  """A random transformers CLIPVisionModel with cfg's vision architecture, in dtype on device."""
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from transformers import CLIPVisionConfig, CLIPVisionModel
  hf = CLIPVisionConfig(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp,
                        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                        image_size=cfg.image_size, patch_size=cfg.patch_size,
                        projection_dim=cfg.embed_dim, hidden_act="quick_gelu",
                        layer_norm_eps=cfg.layer_norm_eps)
  torch.manual_seed(seed)
  model = CLIPVisionModel(hf).eval()
  return model.to(device=device, dtype=getattr(torch, dtype))


def torch_device(platform: str) -> Optional[str]:
  """cuda when JAX runs on a GPU and torch sees one, cpu when JAX runs on CPU, else None."""
  import torch  # pylint: disable=import-outside-toplevel
  if platform == "cpu":
    return "cpu"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None


def torch_row(model, images, dtype: str, device: str, b: int, flops: float,
              peak: Optional[float], repeats: int) -> dict:
  """Time model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
  x = x.to(device=device, dtype=getattr(torch, dtype))
  cuda = device == "cuda"

  def call():
    with torch.inference_mode():
      return model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)

  def sync(_):
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  rss0 = max_rss_bytes()
  timing = time_fn(call, repeats=repeats, sync=sync)
  row = {"stage": "torch_tower", "dtype": dtype, "batch": b, "torch_device": device,
         "torch_attention": getattr(model.config, "_attn_implementation", None),
         "torch_threads": torch.get_num_threads(), "flops_analytic": flops,
         "times_ms": [1e3 * s for s in timing["times_s"]],
         "min_ms_per_batch": 1e3 * timing["min_s"]}
  if cuda:
    row.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
               peak_memory_source="torch.cuda.max_memory_allocated")
  else:
    row.update(peak_memory_bytes=max_rss_bytes() - rss0, peak_memory_source="host_max_rss_delta")
  return row_rates(row, timing["median_s"], b, flops, peak)


def compare_torch(rows: List[dict]):
  """Attach the torch tower's ms/image and the ratio JAX encoder / torch tower to encoder rows."""
  ref = {(r["dtype"], r["batch"]): r for r in rows
         if r.get("stage") == "torch_tower" and "ms_per_image" in r}
  for r in rows:
    t = ref.get((r.get("dtype"), r.get("batch")))
    if r.get("stage") == "encoder" and t and "ms_per_image" in r:
      r["torch_ms_per_image"] = t["ms_per_image"]
      r["jax_over_torch"] = r["ms_per_image"] / t["ms_per_image"]


# ------------------------------------------------------------------------------------------------
# Data parallel: independent batches sharded over a "data" axis.


def dp_row(params, cfg, conf, n_dev: int, b: int, repeats: int, peak: Optional[float],
           seed: int = 0) -> dict:
  """End-to-end detect of n_dev independent batches of b images, one per device."""
  devices = jax.devices()[:n_dev]
  mesh = Mesh(np.array(devices), ("data",))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  impl = pipeline.resolve_attention(conf)
  images, _, text = random_inputs(cfg, n_dev * b, conf.image_size, seed)
  images = jax.device_put(images.reshape(n_dev, b, *images.shape[1:]), data)
  ones = np.ones((n_dev, b), bool)
  valid = fj.Roles(*(jax.device_put(x, data) for x in (ones, ones, np.zeros((n_dev, b), np.int32))))
  p_rep, t_rep = jax.device_put(params, rep), jax.device_put(text, rep)
  fn = sharding.round_fn(mesh, cfg, conf, impl)            # what the eval programs run
  t = time.perf_counter()
  fn.lower(p_rep, images, valid, t_rep, None).compile()
  compile_s = time.perf_counter() - t
  probe = MemoryProbe(devices)
  timing = time_fn(fn, p_rep, images, valid, t_rep, None, repeats=repeats)
  flops = n_dev * stage_flops(cfg, conf, conf.image_size, b)["end_to_end"]
  row = {"stage": "end_to_end_dp", "devices": n_dev, "dtype": conf.compute_dtype, "batch": b,
         "images_per_call": n_dev * b, "compile_s": compile_s, "flops_analytic": flops,
         "times_ms": [1e3 * s for s in timing["times_s"]], **probe.result()}
  row = row_rates(row, timing["median_s"], n_dev * b, flops, peak * n_dev if peak else None)
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


def blob_masks(rng, n: int, size: int) -> np.ndarray:
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
  from fiseclip_jax import metrics  # pylint: disable=import-outside-toplevel
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
  own_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": machine(), "versions": versions(),
          "flags": {f.name: f.value for f in own_flags},
          "model": {"name": FLAGS.model, **cfg.to_dict()}, "fise": base.to_dict(),
          "inputs": "random weights, images ~ N(0,1), random unit text features",
          "peak": peak_tflops(FLAGS.peak_tflops, FLAGS.dtypes), "rows": [], "dp_rows": []}


def setup_torch() -> tuple:
  """(torch device or None, a note saying what was compared or why not)."""
  if not FLAGS.torch_compare:
    return None, "skipped: disabled"
  if not torch_available():
    return None, "skipped: torch/transformers not importable"
  device = torch_device(jax.default_backend())
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
  """JAX stage rows and the torch tower row of every batch size at one dtype (OOM: error row)."""
  dtype, peak = conf.compute_dtype, result["peak"]["tflops"][conf.compute_dtype]
  model = torch_tower(cfg, dtype, device, FLAGS.seed) if device else None
  for b in batch_sizes:
    try:
      result["rows"] += bench_rows(params, cfg, conf, b, repeats=FLAGS.repeats, peak=peak,
                                   stages=FLAGS.stages, seed=FLAGS.seed)
    except Exception as e:   # pylint: disable=broad-except  (e.g. out of memory at large B)
      result["rows"].append(error_row("all", dtype, b, e))
    if model is not None:
      try:
        images, _, _ = random_inputs(cfg, b, conf.image_size, FLAGS.seed)
        flops = stage_flops(cfg, conf, conf.image_size, b)["torch_tower"]
        result["rows"].append(torch_row(model, images, dtype, device, b, flops, peak,
                                        FLAGS.repeats))
        logging.info("%s", format_row(result["rows"][-1]))
      except Exception as e:   # pylint: disable=broad-except
        result["rows"].append(error_row("torch_tower", dtype, b, e))
    compare_torch(result["rows"])
    write_json(result, FLAGS.out)


def refine_cpu_peaks(result: dict):
  """A shared CPU's matmul rate drifts with its load: keep the better of start and end."""
  peaks = result["peak"]["tflops"]
  start, end = dict(peaks), peak_tflops(None, list(peaks))["tflops"]
  peaks.update({d: max(start[d], end[d]) for d in peaks})
  result["peak"].update(start_tflops=start, end_tflops=end)
  set_mfu(result["rows"] + result["dp_rows"], peaks)


def main(argv):
  del argv
  set_platform(FLAGS.platform, FLAGS.host_devices,
               FLAGS.gpu_mem_fraction if FLAGS.torch_compare else None)
  bad = sorted(set(FLAGS.stages) - set(STAGES))
  if bad:
    raise app.UsageError(f"unknown --stages {bad}; expected a subset of {STAGES}")
  try:
    cfg, base = model_configs(FLAGS.model, FLAGS.image_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
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


if __name__ == "__main__":
  app.run(main)
