"""Flags of the programs: the method's knobs generated from FiSeConfig, and the programs' own.

Each setting is declared once: a FiSeConfig field becomes a flag of the same name, with the
field's help text and choice tuple; `fise_config` turns the parsed flags back into a FiSeConfig
and reports a bad value as a usage error naming the flag.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional, Sequence

from absl import flags

from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.config import ConfigError, FiSeConfig, REFERENCE_MODES

FLAGS = flags.FLAGS
# Knobs whose flag default differs from the field's: resolved when the run starts.
_RESOLVED_LATER = {
    "compute_dtype": "Default: float32 on CPU, bfloat16 on GPU/TPU.",
    "references": "Default: batch, or both when a bank is given (--k_shot, --normal_images).",
}


def _define_knob(f: dataclasses.Field, choices_override: Optional[Sequence[str]] = None,
                 flag_values: flags.FlagValues = FLAGS) -> None:
  name, default, meta = f.name, f.default, f.metadata
  help_text = meta["help"] + (" " + _RESOLVED_LATER[name] if name in _RESOLVED_LATER else "")
  if name in _RESOLVED_LATER:
    default = None
  choices = choices_override or meta.get("choices")
  kw = dict(flag_values=flag_values)
  if choices is not None:
    flags.DEFINE_enum(name, default, [c for c in choices if c is not None], help_text, **kw)
  elif isinstance(f.default, tuple):
    flags.DEFINE_list(name, [str(x) for x in default], help_text, **kw)
  elif isinstance(f.default, bool):
    flags.DEFINE_bool(name, default, help_text, **kw)
  elif isinstance(f.default, int):
    flags.DEFINE_integer(name, default, help_text, **kw)
  else:                                      # float, or an optional float (default None)
    flags.DEFINE_float(name, default, help_text, **kw)


def define_method_flags(reference_modes: Sequence[str] = REFERENCE_MODES,
                        flag_values: flags.FlagValues = FLAGS) -> None:
  """One flag per FiSeConfig field (the references flag limited to `reference_modes`)."""
  for f in dataclasses.fields(FiSeConfig):
    _define_knob(f, reference_modes if f.name == "references" else None, flag_values)


def _int_list(name: str, values) -> tuple:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UsageError(f"--{name} {','.join(values)}: expected comma-separated integers") from None


def fise_config(backend: str, has_bank: bool, flag_values: flags.FlagValues = FLAGS) -> FiSeConfig:
  """FiSeConfig from the parsed flags; compute dtype by backend and reference mode by bank."""
  kw = {}
  for f in dataclasses.fields(FiSeConfig):
    value = getattr(flag_values, f.name)
    if isinstance(f.default, tuple):
      value = _int_list(f.name, value)
    kw[f.name] = value
  if kw["compute_dtype"] is None:
    kw["compute_dtype"] = "float32" if backend == "cpu" else "bfloat16"
  if kw["references"] is None:
    kw["references"] = "both" if has_bank else "batch"
  try:
    return FiSeConfig(**kw)
  except ConfigError as e:
    raise UsageError(f"--{e.field} {e.detail}") from None


def define_run_flags(what: str, with_data_root: bool = True, multihost: bool = True) -> None:
  """Flags every scoring program shares: platform, model, batching, output, devices."""
  f = flags
  f.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "JAX platform (set before any device use).")
  if with_data_root:
    f.DEFINE_string("data_root", None, f"{what} root folder.")
    f.DEFINE_list("categories", None, "Categories to run (default: all found).")
  f.DEFINE_string("weights", None, "CLIP checkpoint converted with `python -m weights.convert` (a "
                  "DINOv2 one alone runs FiCLIP only).")
  f.DEFINE_string("fi_weights", None, "Another tower for FiCLIP's features (e.g. DINOv2, converted "
                  "with `python -m weights.convert`); CLIP (--weights) keeps SeCLIP.")
  f.DEFINE_bool("random_weights", False, "Random weights instead of --weights (numbers are meaningless).")
  f.DEFINE_enum("model", "vit_l14_336", ["vit_l14_336", "demo"], "Architecture for --random_weights.")
  f.DEFINE_integer("batch_size", 16, "Images per batch (B): each image is scored against the others.")
  f.DEFINE_string("out", "results", "Output folder.")
  f.DEFINE_bool("resume", False, "Continue the run already in --out (refused if its settings differ).")
  f.DEFINE_bool("overwrite", False, "Replace an earlier run's outputs in --out.")
  f.DEFINE_bool("skip_bad_images", False, "Skip unreadable images (listed in the output) instead of failing.")
  if multihost:
    f.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, multi-node).")
    f.DEFINE_string("coordinator_address", None, "With --multihost off TPU: host:port of process 0.")
    f.DEFINE_integer("num_processes", None, "With --multihost off TPU: number of processes.")
    f.DEFINE_integer("process_id", None, "With --multihost off TPU: this process's index.")
  f.DEFINE_integer("num_devices", None, "Use only the first N local devices (default: all).")
  f.DEFINE_bool("progress", True, "Progress bar on a terminal, a periodic line in a log.")


def define_bank_flags(source: str = "the category's training split") -> None:
  flags.DEFINE_integer("k_shot", 0, f"Known-good images drawn (with --seed) from {source} as a "
                       "bank (0: none).")
  flags.DEFINE_integer("seed", 0, "Seed of the shuffled image order and of the --k_shot draw.")


def check_run_flags(has_bank: bool, references: Optional[str]) -> None:
  """Range checks of the shared flags, before anything is loaded."""
  if FLAGS.batch_size < 1:
    raise UsageError(f"--batch_size {FLAGS.batch_size}: expected >= 1")
  mode = references or ("both" if has_bank else "batch")
  if mode == "batch" and FLAGS.batch_size < 2:
    raise UsageError(f"--batch_size {FLAGS.batch_size} leaves no image a reference in "
                     "--references batch: use >= 2, or a bank of known-good images")
  if mode in ("bank", "both") and not has_bank:
    raise UsageError(f"--references {mode} needs a bank of known-good images "
                     "(--k_shot K, or --normal_images DIR for eval.folder)")
  if "k_shot" in FLAGS and FLAGS.k_shot < 0:
    raise UsageError(f"--k_shot {FLAGS.k_shot}: expected >= 0")
  if FLAGS.num_devices is not None and FLAGS.num_devices < 1:
    raise UsageError(f"--num_devices {FLAGS.num_devices}: expected >= 1 (or unset: all devices)")
  if not FLAGS.weights and not FLAGS.random_weights:
    raise UsageError("pass --weights FILE (convert one with `python -m weights.convert`) or "
                     "--random_weights")
  if FLAGS.weights and FLAGS.random_weights:
    raise UsageError("--weights and --random_weights exclude each other")
  if FLAGS.resume and FLAGS.overwrite:
    raise UsageError("--resume and --overwrite exclude each other")


def check_out_dir(path: str) -> None:
  """--out must be a folder this process can create and write in.

  The probe file has a unique name: every process of a multi-host run checks the same folder.
  """
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path, prefix=".fiseclip_write_test") as f:
      f.write("ok")
  except OSError as e:
    raise UsageError(f"--out {path}: not a writable folder ({e.strerror or e})") from None
