"""The benchmark's table: fixed-width rows for a terminal, the whole result as JSON."""
from __future__ import annotations

import json
import math
import sys
from typing import Callable

from fiseclip_jax.core.files import atomic_write


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
    ("paired", 6, ".2f", _scaled("jax_over_torch_paired", 1)),
)
HEADER = f"{'stage':<17} {'dtype':<9} {'B':>4} " + " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)


def _fmt(v, width: int, spec: str) -> str:
  ok = v is not None and math.isfinite(v)
  return format(v, f"{width}{spec}") if ok else f"{'-':>{width}}"


def format_row(r: dict) -> str:
  stage = r.get("stage", "?") + (f"[{r['devices']}]" if "devices" in r else "")
  if r.get("match_window") is not None:
    stage += f"[w={r['match_window']}]"
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
        "FLOP count; ratio = JAX encoder / torch tower ms per image (the two rows' medians); paired = "
        "median of the ratios of the two timed in turn", file=file)
  print(HEADER, file=file)
  for r in result["rows"]:
    print(format_row(r), file=file)
  for r in result.get("dp_rows", []):
    line = format_row(r)
    if "scaling_efficiency" in r:
      line += f"  eff {r['scaling_efficiency']:.2f}"
    print(line, file=file)
  for r in result.get("category_rows", []):
    print(f"{r['stage'] + '[n=' + str(r['n']) + ']':<17} {r['dtype']:<9} {r['batch']:>4} "
          f"{r['s_per_image']:9.3f} s/img, pair {r['pair_flops'] / 1e12:.3f} TFLOP, XLA temp "
          f"{r['xla_temp_bytes'] / 2 ** 20:.1f} MiB", file=file)
  mb = result.get("metrics")
  if mb:
    print(f"# metrics: pixel_metrics on {mb['n_maps']} maps of {mb['size']}x{mb['size']} "
          f"({mb['pixels'] / 1e6:.1f} M pixels): {mb['pixel_metrics_s']:.2f} s; image_metrics: "
          f"{mb['image_metrics_s'] * 1e3:.2f} ms", file=file)


def write_json(result: dict, path: str) -> None:
  atomic_write(path, json.dumps(result, indent=1, default=str))
