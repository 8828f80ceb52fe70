"""Measuring a compiled function: wall time, memory, XLA's own figures, the FLOP/s roof for MFU.

Used by the benchmark harness (`bench/`); nothing here knows the method.
"""
from __future__ import annotations

import os
import platform as py_platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

H200_BF16_TFLOPS = 870.0   # bf16 dense matmul measured on the H200 (the issue "Fast").


def machine() -> dict:
  devs = jax.devices()
  return {"platform": jax.default_backend(), "devices": [str(d) for d in devs],
          "device_kind": devs[0].device_kind, "device_count": len(devs),
          "host_cpus": os.cpu_count(), "host": py_platform.platform()}


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


def time_pairs(a: Callable[[], object], b: Callable[[], object], rounds: int) -> dict:
  """a and b in turn, A B A B ..., after one warm-up call of each; each call must wait for its own
  result. The median of the per-round ratios a / b holds on a shared machine whose speed drifts
  over a run, where the ratio of two medians timed minutes apart does not."""
  a(), b()
  a_s, b_s = [], []
  for _ in range(max(1, rounds)):
    for call, times in ((a, a_s), (b, b_s)):
      t = time.perf_counter()
      call()
      times.append(time.perf_counter() - t)
  ratios = [x / y for x, y in zip(a_s, b_s)]
  return {"a_s": a_s, "b_s": b_s, "ratios": ratios, "median_ratio": statistics.median(ratios)}


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


def row_rates(row: dict, seconds: float, b: int, flops: Optional[float], peak: Optional[float]):
  """Fill ms/batch, ms/image, images/s, achieved TFLOP/s and MFU of a row."""
  row.update(ms_per_batch=1e3 * seconds, ms_per_image=1e3 * seconds / b, images_per_s=b / seconds)
  if flops is not None:
    row.update(flops_per_image=flops / b, tflops_per_s=flops / seconds / 1e12)
    row["mfu"] = flops / seconds / (peak * 1e12) if peak else None
  return row


