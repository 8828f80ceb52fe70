r"""Speed of FiSeCLIP-JAX per stage and end to end, with FLOPs, MFU and peak memory.

Random weights (speed does not depend on them), random images, random unit text features. Every
stage row jits the pipeline's own stage function with fixed shapes (`bench/stages.py`);
compilation and one warm-up call are excluded; each timing blocks on the result; the median over
`--repeats` is reported. References rows: `bank_features` (a known-good bank of --bank_size
images, encoded once per category), `end_to_end_bank` (a batch scored against that bank and its
batch-mates, "both") and `stream_step` (a batch of a stream against the ring of the --bank_size
images before it). docs/PERFORMANCE.md says what each row is and what was measured.

  fiseclip-bench --platform gpu           (python -m eval.bench in a checkout)
  fiseclip-bench --platform cpu --model tiny --batch_sizes 2,8 --dtypes float32
  fiseclip-bench --platform cpu --host_devices 8 --model tiny --devices 1,2,4,8
"""
from __future__ import annotations

import dataclasses
import os

from absl import flags

from fiseclip_jax.bench.config import BenchConfig
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError

FLAGS = flags.FLAGS


def define_flags() -> None:
  options.define_platform_flag()
  flags.DEFINE_integer("host_devices", None, "Force N host (CPU) devices via XLA_FLAGS (testing).")
  flags.DEFINE_float("gpu_mem_fraction", 0.6, "With --torch_compare: JAX's share of GPU memory "
                     "(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set), the rest left to torch.")
  flags.DEFINE_string("out", "results/bench.json", "JSON output path.")
  for f in dataclasses.fields(BenchConfig):
    options.define_field_flag(f)


def set_platform(platform, host_devices=None, gpu_mem_fraction=None) -> None:
  """Forced host devices and JAX's GPU memory share (read when JAX starts), then the platform."""
  if gpu_mem_fraction and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(gpu_mem_fraction)
  if host_devices:
    flag = f"--xla_force_host_platform_device_count={int(host_devices)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  runtime.start()


def run() -> None:
  bc = options.build(BenchConfig, options.field_values(BenchConfig))
  if FLAGS.host_devices is not None and FLAGS.host_devices < 1:
    raise UsageError(f"--host_devices {FLAGS.host_devices}: expected >= 1")
  if not 0 < FLAGS.gpu_mem_fraction <= 1:
    raise UsageError(f"--gpu_mem_fraction {FLAGS.gpu_mem_fraction}: expected 0 < value <= 1")
  if not FLAGS.out or os.path.isdir(FLAGS.out):
    raise UsageError(f"--out {FLAGS.out!r}: expected a JSON file path (not a folder)")
  set_platform(FLAGS.platform, FLAGS.host_devices,
               FLAGS.gpu_mem_fraction if bc.torch_compare else None)
  harness = runtime.bench_engine()
  result = harness.run(bc, FLAGS.out, {f.name: f.value for f in app.program_flags()})
  harness.table.print_table(result)
  print(f"# wrote {FLAGS.out}")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv)
