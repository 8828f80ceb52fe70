"""One benchmark run: every requested row at every dtype and batch size, transformers' tower
beside the encoder rows, the data-parallel rows and the metrics' timing, written as JSON after
each step (DESIGN.md §9; docs/PERFORMANCE.md says what each row is)."""
from __future__ import annotations

import datetime
from typing import Optional, Sequence

import jax
from absl import logging

from fiseclip_jax.bench import category_bench, metrics_bench, stages, table, timing, torch_tower
from fiseclip_jax.bench.config import REFERENCE_STAGES, BenchConfig
from fiseclip_jax.models import registry
from fiseclip_jax.outputs.provenance import versions


def dp_dtype(dtypes: Sequence[str], explicit: Optional[str]) -> str:
  if explicit:
    return explicit
  if jax.default_backend() != "cpu" and "bfloat16" in dtypes:
    return "bfloat16"
  return dtypes[0]


def new_result(bc: BenchConfig, cfg, base, flags: dict) -> dict:
  """The JSON skeleton: date, machine, versions, flags, configs, peaks."""
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": timing.machine(), "versions": versions(), "flags": flags,
          "model": {"name": bc.model, **cfg.to_dict()}, "fise": base.to_dict(),
          "inputs": "random weights, images uniform RGB in [0, 1], random unit text features",
          "peak": timing.peak_tflops(bc.peak_tflops, bc.dtypes), "rows": [], "dp_rows": []}


def setup_torch(bc: BenchConfig) -> tuple:
  """(torch device or None, a note saying what was compared or why not)."""
  if not bc.torch_compare:
    return None, "skipped: disabled"
  if not torch_tower.torch_available():
    return None, "skipped: torch/transformers not importable"
  device = torch_tower.torch_device(jax.default_backend())
  if device is None:
    return None, "skipped: torch has no device matching the JAX platform"
  if device == "cpu" and bc.torch_threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(bc.torch_threads)
  return device, "compared on " + device


def error_row(stage: str, dtype: str, b: int, e: Exception) -> dict:
  logging.exception("%s dtype %s B=%d failed", stage, dtype, b)
  return {"stage": stage, "dtype": dtype, "batch": b, "error": repr(e)[:500]}


def bench_dtype(result: dict, bc: BenchConfig, out: str, params, cfg, conf,
                device: Optional[str]):
  """Stage rows, references rows and the torch tower row of every B at one dtype (OOM: error row);
  with an encoder row, the encoder and the tower also timed in turn (the paired ratio)."""
  dtype, peak = conf.compute_dtype, result["peak"]["tflops"][conf.compute_dtype]
  model = torch_tower.torch_tower(cfg, dtype, device, bc.seed) if device else None
  ref_stages = [s for s in bc.stages if s in REFERENCE_STAGES]
  for b in bc.batch_sizes:
    try:
      result["rows"] += stages.bench_rows(params, cfg, conf, b, repeats=bc.repeats, peak=peak,
                                          stages=bc.stages, seed=bc.seed)
      if bc.match_windows:
        result["rows"] += stages.window_rows(params, cfg, conf, b, bc.match_windows,
                                             repeats=bc.repeats, peak=peak, seed=bc.seed)
      if ref_stages:
        result["rows"] += stages.reference_rows(params, cfg, conf, b, bc.bank_size,
                                                repeats=bc.repeats, peak=peak, stages=ref_stages,
                                                seed=bc.seed)
    except Exception as e:   # pylint: disable=broad-except  (e.g. out of memory at large B)
      result["rows"].append(error_row("all", dtype, b, e))
    if model is not None:
      try:
        images, _, _ = stages.random_inputs(cfg, b, conf.image_size, bc.seed)
        flops = b * registry.tower_for(cfg).flops(conf.image_size)   # what the torch tower runs
        row = torch_tower.torch_row(model, images, dtype, device, b, flops, peak, bc.repeats)
        if "encoder" in bc.stages:
          row.update(torch_tower.paired(stages.encoder_call(params, cfg, conf, b, bc.seed),
                                        torch_tower.tower_call(model, images, dtype, device),
                                        bc.repeats))
        result["rows"].append(row)
        logging.info("%s", table.format_row(result["rows"][-1]))
      except Exception as e:   # pylint: disable=broad-except
        result["rows"].append(error_row("torch_tower", dtype, b, e))
    torch_tower.compare_torch(result["rows"])
    table.write_json(result, out)


def refine_cpu_peaks(result: dict):
  """A shared CPU's matmul rate drifts with its load: keep the better of start and end."""
  peaks = result["peak"]["tflops"]
  start, end = dict(peaks), timing.peak_tflops(None, list(peaks))["tflops"]
  peaks.update({d: max(start[d], end[d]) for d in peaks})
  result["peak"].update(start_tflops=start, end_tflops=end)
  timing.set_mfu(result["rows"] + result["dp_rows"], peaks)


def run(bc: BenchConfig, out: str, flags: dict) -> dict:
  """The whole benchmark; the result is written to `out` after each step and returned."""
  cfg, base = stages.model_configs(bc.model, bc.image_size)
  base = base.replace(attention_impl=bc.attention_impl)
  result = new_result(bc, cfg, base, flags)
  logging.info("machine %s, peak %s", result["machine"], result["peak"])
  params = registry.init_params(cfg, bc.seed)
  device, result["torch"] = setup_torch(bc)
  for dtype in bc.dtypes:
    bench_dtype(result, bc, out, params, cfg, base.replace(compute_dtype=dtype), device)
  if bc.devices:
    conf = base.replace(compute_dtype=dp_dtype(bc.dtypes, bc.dp_dtype))
    result["dp_rows"] = stages.dp_rows(params, cfg, conf, bc.devices, bc.dp_batch_size,
                                       bc.repeats, result["peak"]["tflops"].get(conf.compute_dtype),
                                       bc.seed)
    table.write_json(result, out)
  if bc.category_sizes:
    conf = base.replace(compute_dtype=bc.dtypes[0])
    result["category_rows"] = category_bench.category_rows(params, cfg, conf, bc.category_sizes,
                                                           bc.category_batch, bc.repeats, bc.seed)
    table.write_json(result, out)
  if bc.metrics_bench:
    result["metrics"] = metrics_bench.metrics_bench(bc.metrics_n, bc.metrics_size, bc.seed)
  if bc.peak_tflops is None and jax.default_backend() == "cpu":
    refine_cpu_peaks(result)
  table.write_json(result, out)
  return result
