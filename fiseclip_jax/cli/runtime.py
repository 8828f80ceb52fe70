"""What a scoring program sets up: the model's shape (cheaply, before anything is checked), the
JAX backend and devices, the params."""
from __future__ import annotations

import dataclasses
import os
import platform as py_platform
from typing import Dict, NamedTuple, Optional

from absl import flags

from fiseclip_jax.cli.errors import EnvironmentProblem, UsageError

FLAGS = flags.FLAGS
DEMO_CONFIG = dict(vision_layers=24, image_size=224, patch_size=14, width=64)
INSTALL = {"gpu": 'pip install -U "jax[cuda12]" (or "jax[cuda13]")', "tpu": 'pip install -U "jax[tpu]"'}


class ModelSpec(NamedTuple):
  """The towers' architectures and identities, read from checkpoint headers (no tensor loaded)."""
  cfg: object                # --weights' config (CLIP; or DINOv2 alone: FiCLIP only)
  checkpoint: dict           # {"weights": ..., "sha256": ..., "source_sha256": ...}
  fi_cfg: object = None      # --fi_weights' config (FiCLIP's tower), None: cfg's tower
  fi_checkpoint: Optional[dict] = None

  @property
  def has_text(self) -> bool:
    from fiseclip_jax import registry
    return registry.text_aligned(self.cfg)

  def identity(self) -> dict:
    ident = {"checkpoint_sha256": self.checkpoint["sha256"] or self.checkpoint["weights"],
             "model_config": dataclasses.asdict(self.cfg)}
    if self.fi_cfg is not None:
      ident.update(fi_checkpoint_sha256=self.fi_checkpoint["sha256"],
                   fi_model_config=dataclasses.asdict(self.fi_cfg))
    return ident


def _checkpoint(path: str) -> dict:
  from fiseclip_jax import checkpoint
  meta = checkpoint.read_metadata(path)
  return {"weights": os.path.abspath(path), "sha256": checkpoint.sha256_file(path),
          "backbone": checkpoint.read_backbone(path), "source_sha256": meta.get("source_sha256", "")}


def model_spec() -> ModelSpec:
  """--weights' (and --fi_weights') architecture from metadata, or the --random_weights one."""
  from fiseclip_jax import checkpoint
  from fiseclip_jax.config import CLIPConfig
  fi_cfg = fi_ckpt = None
  if FLAGS.fi_weights:
    fi_cfg, fi_ckpt = checkpoint.read_config(FLAGS.fi_weights), _checkpoint(FLAGS.fi_weights)
  if FLAGS.weights:
    cfg, ckpt = checkpoint.read_config(FLAGS.weights), _checkpoint(FLAGS.weights)
  else:
    cfg = CLIPConfig.tiny(**DEMO_CONFIG) if FLAGS.model == "demo" else CLIPConfig.vit_l14_336()
    ckpt = {"weights": f"random:{FLAGS.model}:seed0", "sha256": None, "backbone": "clip"}
  spec = ModelSpec(cfg, ckpt, fi_cfg, fi_ckpt)
  if not spec.has_text and fi_cfg is not None:
    raise UsageError(f"--weights {FLAGS.weights} is a {ckpt['backbone']} tower without text: "
                     "pass a CLIP checkpoint as --weights and the FiCLIP tower as --fi_weights")
  return spec


def check_model(conf, spec: ModelSpec) -> None:
  """The method's knobs against the towers' depths and patch sizes (usage errors if they do not fit)."""
  from fiseclip_jax import registry
  from fiseclip_jax.config import ConfigError
  text_b = registry.for_config(spec.cfg)
  fi_cfg = spec.fi_cfg if spec.fi_cfg is not None else spec.cfg
  fi_b = registry.for_config(fi_cfg)
  try:
    conf.check_model(fi_b.depth(fi_cfg), fi_b.patch_size(fi_cfg),
                     proxy_layer=spec.has_text and spec.fi_cfg is None)
    if spec.has_text:
      conf.check_model(text_b.depth(spec.cfg), text_b.patch_size(spec.cfg),
                       feature_layers=spec.fi_cfg is None)
  except ConfigError as e:
    raise UsageError(f"--{e.field} {e.detail}") from None
  if spec.has_text and spec.fi_cfg is not None:
    from fiseclip_jax import pipeline
    try:   # a Spec built directly: make_spec would pick the attention kernel, starting the backend
      pipeline.check_grids(pipeline.Spec(conf, spec.cfg, spec.fi_cfg), conf.image_size)
    except ValueError as e:
      raise UsageError(f"--fi_weights: {e}") from None


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


def load_model(spec: ModelSpec):
  """A scoring.Model: --weights (checked key by key) or random params, and --fi_weights."""
  import fiseclip_jax as fj
  from fiseclip_jax.scoring import Model
  if FLAGS.weights:
    params, _ = fj.load_checkpoint(FLAGS.weights)
  else:
    print(f"RANDOM WEIGHTS ({FLAGS.model}): the pipeline runs end to end but the numbers are "
          "meaningless")
    params = fj.init_params(spec.cfg, seed=0)
  fi_params = fj.load_checkpoint(FLAGS.fi_weights)[0] if FLAGS.fi_weights else None
  if not spec.has_text:
    print(f"{spec.checkpoint['backbone']} alone: FiCLIP only (no text alignment, no SeCLIP); the "
          "map is the feature-matching score and the image score its maximum")
  return Model(params, spec.cfg, fi_params, spec.fi_cfg)


def model_on(spec: ModelSpec, mesh):
  """load_model, its params replicated on every device of the mesh (once, outside the loop)."""
  from fiseclip_jax import sharding
  model = load_model(spec)
  fi = None if model.fi_params is None else sharding.replicate(model.fi_params, mesh)
  return model._replace(params=sharding.replicate(model.params, mesh), fi_params=fi)


def text_features(model, class_name: str, conf):
  """F_t (2, D) of a class for the text tower; None when FiCLIP runs alone."""
  import fiseclip_jax as fj
  return fj.text_features(model.params, model.cfg, class_name, conf) if model.has_text else None


def bank_on(model, conf, samples, mesh):
  """A known-good bank from samples, built once and replicated on the mesh."""
  import fiseclip_jax as fj
  from fiseclip_jax import scoring, sharding
  images = scoring.load_images(samples, conf.image_size)
  return sharding.replicate(fj.build_bank(model.params, model.cfg, conf, images, **model.kwargs()),
                            mesh)


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
