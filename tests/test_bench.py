"""Smoke tests of the benchmark (fiseclip-bench, eval/bench.py): a tiny model end to end, in process
and as the command line.

No wall-clock assertions: only that every stage ran and reported finite, positive numbers.
"""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fiseclip_jax as fj
from fiseclip_jax.bench import config as bench_config
from fiseclip_jax.bench import category_bench, metrics_bench, stages as bench, timing
from fiseclip_jax.bench import table as bench_table
from fiseclip_jax.bench import torch_tower as bench_torch
from fiseclip_jax.method import pipeline, seclip
from fiseclip_jax.models.clip import model as clip_model
from fiseclip_jax.outputs.provenance import versions

ROOT = Path(__file__).resolve().parents[1]
SIZE = 56
RATE_KEYS = ("ms_per_batch", "ms_per_image", "images_per_s", "min_ms_per_batch")
ROW_KEYS = RATE_KEYS + ("stage", "dtype", "batch", "times_ms", "flops_analytic", "flops_per_image",
                        "tflops_per_s", "mfu", "peak_memory_bytes", "peak_memory_source",
                        "xla_flops", "xla_memory_bytes", "compile_s", "attention_impl")


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_stage_rows(rows, batch=2, dtype="float32"):
  by_stage = {r["stage"]: r for r in rows if r.get("batch") == batch and r.get("dtype") == dtype}
  assert set(bench_config.STAGES) <= set(by_stage), sorted(by_stage)
  for name in bench_config.STAGES:
    r = by_stage[name]
    assert "error" not in r, r
    missing = set(ROW_KEYS) - set(r)
    assert not missing, (name, missing)
    for k in RATE_KEYS + ("flops_analytic", "tflops_per_s", "mfu"):
      assert positive(r[k]), (name, k, r[k])
    assert r["times_ms"] and all(positive(t) for t in r["times_ms"]), (name, r["times_ms"])
    assert r["peak_memory_source"] in ("device_peak_bytes_in_use", "host_max_rss_delta")
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    assert math.isclose(r["ms_per_image"] * batch, r["ms_per_batch"], rel_tol=1e-9)
  return by_stage


def test_analytic_flops_match_the_issue_figures():
  cfg, conf = bench.model_configs("vit_l14_336", 518)
  assert 0.95e12 < clip_model.tower_flops(cfg, 518) < 1.1e12                    # ~1.0 TFLOP/image
  flops = pipeline.stage_flops(fj.make_spec(cfg, conf), 518, 16)
  assert 0.33e12 < flops["mutual_filtering"] / 16 < 0.36e12                  # ~0.35 TFLOP/image
  assert flops["end_to_end"] == pytest.approx(sum(flops[k] for k in bench_config.STAGES[:-1]))
  # The proxy block runs in the seclip stage (from the tower's hooks): counted there, not in encoder.
  assert flops["encoder"] == pytest.approx(16 * clip_model.tower_flops(cfg, 518))
  assert flops["seclip"] > 16 * seclip.flops(cfg.vision_width, cfg.embed_dim, 518 // cfg.patch_size, conf)
  # A bank of 16 adds 16 one-way pairs per image; bank-only scoring drops the batch's pairs.
  both = pipeline.stage_flops(fj.make_spec(cfg, conf.replace(references="both")), 518, 16, 16)
  bank = pipeline.stage_flops(fj.make_spec(cfg, conf.replace(references="bank")), 518, 16, 16)
  pair = flops["mutual_filtering"] / (16 * 15 / 2)
  assert both["mutual_filtering"] == pytest.approx(pair * (16 * 15 / 2 + 16 * 16))
  assert bank["mutual_filtering"] == pytest.approx(pair * 16 * 16)


def test_model_configs_reject_bad_sizes():
  with pytest.raises(ValueError, match="patch size"):
    bench.model_configs("vit_b16", 518)


def test_bench_rows_in_process():
  cfg, conf = bench.model_configs("tiny", SIZE)
  params = fj.init_params(cfg, 0)
  rows = bench.bench_rows(params, cfg, conf, 2, repeats=1, peak=1.0)
  check_stage_rows(rows)
  refs = {r["stage"]: r for r in bench.reference_rows(params, cfg, conf, 2, 3, repeats=1, peak=1.0)}
  assert set(refs) == set(bench_config.REFERENCE_STAGES)
  assert refs["bank_features"]["batch"] == 3 and refs["end_to_end_bank"]["batch"] == 2
  for r in refs.values():
    assert positive(r["ms_per_image"]) and positive(r["flops_analytic"]), r
  if bench_torch.torch_available():
    images, _, _ = bench.random_inputs(cfg, 2, SIZE)
    model = bench_torch.torch_tower(cfg, "float32", "cpu")
    row = bench_torch.torch_row(model, images, "float32", "cpu", 2, 1e6, 1.0, 1)
    row.update(bench_torch.paired(bench.encoder_call(params, cfg, conf, 2),
                                  bench_torch.tower_call(model, images, "float32", "cpu"), 2))
    rows.append(row)
    bench_torch.compare_torch(rows)
    enc = next(r for r in rows if r["stage"] == "encoder")
    assert positive(enc["torch_ms_per_image"]) and positive(enc["jax_over_torch"])
    assert positive(enc["jax_over_torch_paired"]) and len(row["paired_jax_ms"]) == 2
  table = io.StringIO()
  result = {"machine": timing.machine(), "versions": versions(), "date": "today",
            "peak": {"tflops": {"float32": 1.0}, "source": "test"}, "rows": rows}
  bench_table.print_table(result, file=table)
  text = table.getvalue()
  for name in bench_config.STAGES:
    assert name in text


def test_float32_stage_rows_run_at_the_pipelines_precision():
  """A float32 row times what the pipeline runs: every dot at HIGHEST (DESIGN.md §8), whatever the
  process's default. On an H200 (2026-12-04) the encoder row ran at XLA's GPU default (TF32) and
  read 10 ms/image against the pipeline's float32, beside a float32 torch tower."""
  import jax
  from fiseclip_jax.method.api import make_spec
  cfg, conf = bench.model_configs("tiny", SIZE)
  params = fj.init_params(cfg, 0)
  images, roles, text = bench.random_inputs(cfg, 2, SIZE)
  with jax.default_matmul_precision("bfloat16"):   # a backend's own default, as on a GPU
    built = bench.build_stages(params, make_spec(cfg, conf), images, roles, text,
                               bench_config.STAGES)
    dots = {s.name: [l for l in s.fn.lower(*s.args).as_text().splitlines() if "dot_general" in l]
            for s in built}
  assert set(dots) == set(bench_config.STAGES) and dots["encoder"] and dots["seclip"]
  for name, lines in dots.items():
    assert all("precision = [HIGHEST, HIGHEST]" in l for l in lines), (name, lines[:1])


def test_time_pairs_alternates_the_calls_and_takes_the_median_of_round_ratios(monkeypatch):
  """A B A B after one warm-up of each; the ratio of each round's own pair, then their median (a
  ratio of the two medians would read 2 / 1 = 2 here)."""
  clock, calls = [0.0], []
  monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
  def call(name, durations):
    def run():
      calls.append(name)
      clock[0] += durations.pop(0)
    return run
  p = timing.time_pairs(call("a", [9.0, 1.0, 2.0, 3.0]), call("b", [9.0, 1.0, 2.0, 1.0]), 3)
  assert calls == ["a", "b"] * 4
  assert p["a_s"] == [1.0, 2.0, 3.0] and p["b_s"] == [1.0, 2.0, 1.0]
  assert p["ratios"] == [1.0, 1.0, 3.0] and p["median_ratio"] == 1.0


def test_metrics_bench_small():
  out = metrics_bench.metrics_bench(n=6, size=48)
  assert out["pixels"] == 6 * 48 * 48
  assert positive(out["pixel_metrics_s"]) and positive(out["image_metrics_s"])
  assert set(out["pixel_metrics"]) == {"auroc", "f1_max", "ap", "aupro"}
  assert all(math.isfinite(v) for v in out["pixel_metrics"].values())


def test_command_line_writes_complete_json(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "eval.bench", "--platform=cpu", "--host_devices=2", "--model=tiny",
         f"--image_size={SIZE}", "--batch_sizes=2", "--dtypes=float32", "--repeats=1",
         "--torch_compare", "--devices=1,2,4", "--dp_batch_size=2", "--metrics_n=4",
         "--metrics_size=40", f"--out={out}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "end_to_end" in proc.stdout and "# metrics" in proc.stdout
  res = json.loads(out.read_text())
  for key in ("date", "machine", "versions", "flags", "peak", "model", "fise", "rows", "dp_rows",
              "metrics", "torch"):
    assert key in res, key
  assert res["machine"]["platform"] == "cpu" and res["machine"]["device_count"] == 2
  assert res["flags"]["model"] == "tiny" and res["flags"]["batch_sizes"] == ["2"]
  for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
    assert name in res["versions"]
  assert positive(res["peak"]["tflops"]["float32"])
  stages = check_stage_rows(res["rows"])
  assert {"bank_features", "end_to_end_bank", "stream_step"} <= {r["stage"] for r in res["rows"]}
  if bench_torch.torch_available():
    torch_rows = [r for r in res["rows"] if r["stage"] == "torch_tower"]
    assert len(torch_rows) == 1 and positive(torch_rows[0]["ms_per_image"])
    assert positive(stages["encoder"]["jax_over_torch"])
    assert positive(stages["encoder"]["jax_over_torch_paired"])
    assert len(torch_rows[0]["paired_jax_ms"]) == len(torch_rows[0]["paired_torch_ms"]) == 1
    assert "paired" in proc.stdout
  dp = {r["devices"]: r for r in res["dp_rows"]}
  assert set(dp) == {1, 2, 4}
  assert "skipped" in dp[4]
  for n in (1, 2):
    assert positive(dp[n]["images_per_s"]) and dp[n]["images_per_call"] == 2 * n
  assert positive(res["metrics"]["pixel_metrics_s"]) and positive(res["metrics"]["image_metrics_s"])


def test_category_rows_time_the_category_programs_beside_batch_mode():
  """The category rows (--category_sizes): one per n and batch mode over the largest n's images,
  with the pair work of n (n - 1) directed pairs and the filter's XLA temporaries, which grow
  with the block workspace (one query block's distances), not with n^2."""
  cfg = fj.CLIPConfig.tiny()
  conf = fj.FiSeConfig(image_size=SIZE, feature_layers=(1, 2, 3, 4), proxy_layer=2)
  rows = category_bench.category_rows(fj.init_params(cfg, 0), cfg, conf, (4, 8), 2, repeats=1)
  assert [(r["stage"], r["n"]) for r in rows] == [("category", 4), ("category", 8),
                                                  ("batch_mode", 8)]
  spec = fj.make_spec(cfg, conf)
  for r in rows:
    assert positive(r["s_per_image"]) and positive(r["xla_temp_bytes"])
    pairs = r["n"] * (r["n"] - 1) if r["stage"] == "category" else r["n"] * (r["batch"] - 1)
    assert r["pair_flops"] == pytest.approx(category_bench.pair_flops(spec, SIZE, pairs))
  cat = {r["n"]: r for r in rows if r["stage"] == "category"}
  assert positive(cat[8]["filter_s"]) and cat[8]["features_bytes"] == 2 * cat[4]["features_bytes"]
  assert "| category | 8 | 2 |" in category_bench.markdown(rows)
