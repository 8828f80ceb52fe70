"""What a scoring program sets up: the model's shape (cheaply, before anything is checked), the
JAX backend and devices, the params."""
from __future__ import annotations

import os
import platform as py_platform
from typing import Dict, NamedTuple, Optional

from absl import flags

from fiseclip_jax.cli.errors import EnvironmentProblem, UsageError

FLAGS = flags.FLAGS
DEMO_CONFIG = dict(vision_layers=24, image_size=224, patch_size=14, width=64)
INSTALL = {"gpu": 'pip install -U "jax[cuda12]" (or "jax[cuda13]")', "tpu": 'pip install -U "jax[tpu]"'}


class ModelSpec(NamedTuple):
  """A checkpoint's architecture and identity, read from its header (no tensor loaded)."""
  cfg: object          # CLIPConfig
  checkpoint: dict     # {"weights": ..., "sha256": ..., "source_sha256": ...}


def model_spec() -> ModelSpec:
  """--weights' architecture from its metadata, or the --random_weights architecture."""
  from fiseclip_jax import checkpoint
  from fiseclip_jax.config import CLIPConfig
  if FLAGS.weights:
    cfg = checkpoint.read_config(FLAGS.weights)
    meta = checkpoint.read_metadata(FLAGS.weights)
    return ModelSpec(cfg, {"weights": os.path.abspath(FLAGS.weights),
                           "sha256": checkpoint.sha256_file(FLAGS.weights),
                           "source_sha256": meta.get("source_sha256", "")})
  cfg = CLIPConfig.tiny(**DEMO_CONFIG) if FLAGS.model == "demo" else CLIPConfig.vit_l14_336()
  return ModelSpec(cfg, {"weights": f"random:{FLAGS.model}:seed0", "sha256": None})


def check_model(conf, spec: ModelSpec) -> None:
  """The method's knobs against the model's depth and patch size (a usage error if they do not fit)."""
  from fiseclip_jax.config import ConfigError
  try:
    conf.check_model(spec.cfg.vision_layers, spec.cfg.patch_size)
  except ConfigError as e:
    raise UsageError(f"--{e.field} {e.detail}") from None


def setup_backend() -> str:
  """--platform and --multihost before any device use; the backend's name ('cpu', 'gpu', 'tpu')."""
  import jax
  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  try:
    if "multihost" in FLAGS and FLAGS.multihost:
      from fiseclip_jax import sharding
      sharding.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    jax.local_devices()
  except RuntimeError as e:
    if not FLAGS.platform or FLAGS.platform == "cpu":
      raise EnvironmentProblem(f"JAX could not start: {e}") from None
    raise EnvironmentProblem(
        f"--platform {FLAGS.platform}: this JAX has no working {FLAGS.platform.upper()} backend "
        f"({str(e).splitlines()[0]}); install it with {INSTALL[FLAGS.platform]}, or run with "
        "--platform cpu") from None
  return jax.default_backend()


def devices():
  """The local devices to use (--num_devices of them)."""
  import jax
  available = jax.local_devices()
  n = FLAGS.num_devices
  if n is not None and n > len(available):
    raise UsageError(f"--num_devices {n}: this process sees {len(available)} "
                     f"{available[0].platform} device(s)")
  return available[:n] if n else available


def load_params(spec: ModelSpec):
  """The params of --weights (checked key by key), or random ones."""
  import fiseclip_jax as fj
  if FLAGS.weights:
    params, _ = fj.load_checkpoint(FLAGS.weights)
    return params
  print(f"RANDOM WEIGHTS ({FLAGS.model}): the pipeline runs end to end but the numbers are "
        "meaningless")
  return fj.init_params(spec.cfg, seed=0)


def versions() -> Dict[str, Optional[str]]:
  """Installed versions of the packages that matter (None: not installed)."""
  from importlib import metadata
  import fiseclip_jax
  out = {"python": py_platform.python_version(), "fiseclip_jax": fiseclip_jax.__version__}
  for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out
