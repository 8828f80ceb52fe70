"""Where a program crosses into JAX, and what it checks before: the towers from checkpoint headers.

Everything above `start` reads files and flags only (light modules). `start` sets the platform
and connects the processes, and `engine` imports the JAX side (`fiseclip_jax.run`): the programs
import no JAX module anywhere else.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import NamedTuple, Optional

from absl import flags

from fiseclip_jax.cli.errors import EnvironmentProblem, UsageError
from fiseclip_jax.convert import header
from fiseclip_jax.core.config import ConfigError
from fiseclip_jax.method.prompt_text import prompts
from fiseclip_jax.models.clip.config import VARIANTS, CLIPConfig
from fiseclip_jax.models.clip.tokenizer import n_tokens

FLAGS = flags.FLAGS
INSTALL = {"gpu": 'pip install -U "jax[cuda12]" (or "jax[cuda13]")', "tpu": 'pip install -U "jax[tpu]"'}
# --platform values left to JAX's own choice (then checked): JAX 0.11 reads jax_platforms="gpu" as
# cuda and rocm together and fails on a CUDA machine without ROCm, and a failed start cannot be
# retried with another name in the same process.
CHOSEN_BY_JAX = ("gpu",)


class Checkpoints(NamedTuple):
  """The towers' architectures and identities, read from checkpoint headers (no tensor loaded)."""
  cfg: object                # --weights' config (CLIP; or DINOv2 alone: FiCLIP only)
  checkpoint: dict           # {"weights": ..., "sha256": ..., "backbone": ..., "source_sha256": ...}
  fi_cfg: object = None      # --fi_weights' config (FiCLIP's tower), None: cfg's tower
  fi_checkpoint: Optional[dict] = None

  @property
  def has_text(self) -> bool:
    return bool(getattr(self.cfg, "text_aligned", False))

  @property
  def random(self) -> bool:
    return not self.checkpoint["sha256"]

  def identity(self) -> dict:
    ident = {"checkpoint_sha256": self.checkpoint["sha256"] or self.checkpoint["weights"],
             "model_config": dataclasses.asdict(self.cfg)}
    if self.fi_cfg is not None:
      ident.update(fi_checkpoint_sha256=self.fi_checkpoint["sha256"],
                   fi_model_config=dataclasses.asdict(self.fi_cfg))
    return ident


def _checkpoint(path: str) -> dict:
  meta = header.read_metadata(path)
  return {"weights": os.path.abspath(path), "sha256": header.sha256_file(path),
          "backbone": header.read_backbone(path), "source_sha256": meta.get("source_sha256", "")}


def read_checkpoints() -> Checkpoints:
  """--weights' (and --fi_weights') architecture from headers, or the --random_weights one."""
  fi_cfg = fi_ckpt = None
  if FLAGS.fi_weights:
    fi_cfg, fi_ckpt = header.read_config(FLAGS.fi_weights), _checkpoint(FLAGS.fi_weights)
  if FLAGS.weights:
    cfg, ckpt = header.read_config(FLAGS.weights), _checkpoint(FLAGS.weights)
  else:
    cfg = VARIANTS[FLAGS.model].config
    ckpt = {"weights": f"random:{FLAGS.model}:seed0", "sha256": None, "backbone": "clip"}
  ckpts = Checkpoints(cfg, ckpt, fi_cfg, fi_ckpt)
  if not ckpts.has_text and fi_cfg is not None:
    raise UsageError(f"--weights {FLAGS.weights} is a {ckpt['backbone']} tower without text: "
                     "pass a CLIP checkpoint as --weights and the FiCLIP tower as --fi_weights")
  return ckpts


def check_model(conf, ckpts: Checkpoints) -> None:
  """The method's knobs against the towers' depths and patch sizes (usage errors if they do not
  fit), from their configs alone."""
  fi_cfg = ckpts.fi_cfg if ckpts.fi_cfg is not None else ckpts.cfg
  try:
    conf.check_model(fi_cfg.depth, fi_cfg.patch_size,
                     proxy_layer=ckpts.has_text and ckpts.fi_cfg is None)
    if ckpts.has_text:
      conf.check_model(ckpts.cfg.depth, ckpts.cfg.patch_size, feature_layers=ckpts.fi_cfg is None)
  except ConfigError as e:
    raise UsageError(f"--{e.field} {e.detail}") from None
  if ckpts.has_text and ckpts.fi_cfg is not None:
    try:
      conf.check_grids(ckpts.cfg.patch_size, ckpts.fi_cfg.patch_size)
    except ValueError as e:
      raise UsageError(f"--fi_weights: {e}") from None


def check_class_name(name: str, ckpts: Checkpoints, flag: str = "--class_name") -> None:
  """A class name whose prompts fit CLIP's text context (77 tokens): a longer one would be cut
  without a word. Towers other than CLIP tokenize as they like and are not checked here."""
  if not ckpts.has_text or not isinstance(ckpts.cfg, CLIPConfig):
    return
  longest = max(n_tokens(s) for s in sum(prompts(name), []))
  if longest > ckpts.cfg.context_length:
    raise UsageError(f"{flag} {name[:40]!r}{'...' if len(name) > 40 else ''} ({len(name)} "
                     f"characters): its longest prompt takes {longest} tokens, more than the "
                     f"text encoder's {ckpts.cfg.context_length}, so the name would be cut; "
                     "expected a shorter name")


def min_image_side(ckpts: Checkpoints) -> int:
  """The smallest image side that holds one patch of every tower of the run."""
  return max(c.patch_size for c in (ckpts.cfg, ckpts.fi_cfg) if c is not None)


def no_backend(platform: str, why: str) -> EnvironmentProblem:
  """The one error of a --platform this JAX cannot start, with the line that installs it."""
  return EnvironmentProblem(f"--platform {platform}: this JAX has no working {platform.upper()} "
                            f"backend ({why}); install it with {INSTALL[platform]}, or run with "
                            "--platform cpu")


def start() -> str:
  """--platform and --multihost before any device use; the backend's name ('cpu', 'gpu', 'tpu').

  The programs' first JAX import is here.
  """
  import jax  # pylint: disable=import-outside-toplevel  (the crossing)
  if FLAGS.platform and FLAGS.platform not in CHOSEN_BY_JAX:
    jax.config.update("jax_platforms", FLAGS.platform)
  try:
    if "multihost" in FLAGS and FLAGS.multihost:
      engine().sharding.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    jax.local_devices()
  except RuntimeError as e:
    if not FLAGS.platform or FLAGS.platform == "cpu":
      raise EnvironmentProblem(f"JAX could not start: {e}") from None
    raise no_backend(FLAGS.platform, str(e).splitlines()[0]) from None
  backend = jax.default_backend()
  if FLAGS.platform and backend != FLAGS.platform:
    raise no_backend(FLAGS.platform, f"it found {backend} only")
  return backend


def engine() -> types.SimpleNamespace:
  """The JAX side of the scoring programs: jax itself, and `run`'s towers, scoring (whole images,
  tiles, whole categories), sharding and re-scoring."""
  import jax  # pylint: disable=import-outside-toplevel  (the crossing)
  from fiseclip_jax.method import rescore  # pylint: disable=import-outside-toplevel
  from fiseclip_jax.run import category, scoring, sharding, tiled, towers  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(jax=jax, scoring=scoring, sharding=sharding, tiled=tiled,
                               towers=towers, category=category, rescore=rescore)


def convert_engine() -> types.SimpleNamespace:
  """The JAX side of the converter: reading sources as a tower's params, writing checkpoints."""
  from fiseclip_jax.convert import checkpoint, sources  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(sources=sources, checkpoint=checkpoint)


def deploy_engine() -> types.SimpleNamespace:
  """The JAX side of the deployment programs: the bundle file, the predictor, the compile cache."""
  from fiseclip_jax.deploy import bundle, compile_cache, predictor  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(bundle=bundle, predictor=predictor, compile_cache=compile_cache)


def bench_engine() -> types.ModuleType:
  """The JAX side of the benchmark program: the harness."""
  from fiseclip_jax.bench import harness  # pylint: disable=import-outside-toplevel  (the crossing)
  return harness


def devices():
  """The local devices to use (--num_devices of them)."""
  available = engine().jax.local_devices()
  n = FLAGS.num_devices
  if n is not None and n > len(available):
    raise UsageError(f"--num_devices {n}: this process sees {len(available)} "
                     f"{available[0].platform} device(s)")
  return available[:n] if n else available


def model_on(ckpts: Checkpoints, mesh):
  """The towers with their params (--weights, checked key by key, or random), on the mesh."""
  e = engine()
  if ckpts.random:
    print(f"RANDOM WEIGHTS ({FLAGS.model}): the pipeline runs end to end but the numbers are "
          "meaningless")
  model = e.towers.load_model(ckpts.cfg, FLAGS.weights, ckpts.fi_cfg, FLAGS.fi_weights)
  if not ckpts.has_text:
    print(f"{ckpts.checkpoint['backbone']} alone: FiCLIP only (no text alignment, no SeCLIP); the "
          "map is the feature-matching score and the image score its maximum")
  return e.towers.on_mesh(model, mesh)


def export_engine() -> types.SimpleNamespace:
  """The JAX side of the export program: the predictor (which reads the bundle) and the export."""
  from fiseclip_jax.deploy import export, predictor  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(predictor=predictor, export=export)


def serve_engine() -> types.SimpleNamespace:
  """The JAX side of the service: the predictor and the HTTP app (FastAPI, uvicorn: the extra
  "serve")."""
  try:
    from fiseclip_jax.deploy import predictor, service  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    if e.name not in ("fastapi", "starlette", "uvicorn"):
      raise
    raise EnvironmentProblem(f"fiseclip-serve needs {e.name}: pip install "
                             '"fiseclip-jax[serve]" (fastapi, uvicorn)') from None
  return types.SimpleNamespace(predictor=predictor, service=service, warm_up=service.warm_up,
                               uvicorn_serve=service.serve)


def stress_engine() -> types.SimpleNamespace:
  """The JAX side of the stress benchmark: the scorer's towers and mesh, the stress cells."""
  import jax  # pylint: disable=import-outside-toplevel  (the crossing)
  from fiseclip_jax.bench import stress  # pylint: disable=import-outside-toplevel
  from fiseclip_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  from fiseclip_jax.run import sharding, towers  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(jax=jax, stress=stress, preprocess=preprocess, sharding=sharding,
                               towers=towers)
