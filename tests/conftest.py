"""Shared test set-up: float32 matmuls at full precision, a compilation cache shared by the
programs the tests start, the shared data folder, a random HF CLIP."""
import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

# Many tests run the programs as a user does, each a new process compiling the same small models:
# JAX's persistent compilation cache (one per test process: xdist workers each have their own, so
# no two processes write one entry at once) lets the later ones skip XLA.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="fiseclip-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)   # ours: gone with the session
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the cache variables, which JAX reads when it starts)
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# The cache is for the programs the tests start, not for this process (its entries would be
# serialized executables this process already holds). Off here; the processes it starts inherit
# the variables above and keep it.
jax.config.update("jax_enable_compilation_cache", False)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def memory_mappings() -> int:
  """This process's memory mappings (lines of /proc/self/maps); 0 where there is no /proc."""
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def mapping_limit() -> int:
  """The kernel's vm.max_map_count (0 where it cannot be read)."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 0


@pytest.fixture(autouse=True)
def release_compiled_programs(request):
  """Every program XLA compiles on CPU holds about 8 memory mappings of this process for as long
  as a jit cache keeps it, and the suite compiles thousands in one process: the full suite reached
  vm.max_map_count (65530 here) near its end, and the next mmap failed inside XLA's compile or
  serialize (the segfaults and aborts of the full runs, never of a part). After any test that
  leaves the process above a quarter of the limit, the compiled programs are dropped (the next
  test compiles what it needs again); a process still above half of it after that fails here, by
  test, not as a crash later."""
  yield
  limit = mapping_limit()
  if not limit or memory_mappings() < limit // 4:
    return
  jax.clear_caches()
  gc.collect()
  n = memory_mappings()
  if n > limit // 2:
    pytest.fail(f"{request.node.nodeid} left this process with {n} memory mappings after its "
                f"compiled programs were dropped (vm.max_map_count {limit})")


def shared_data(*parts) -> Path:
  """A path under ../shared/data, or skip the test where a fresh clone has none."""
  p = SHARED_DATA.joinpath(*parts)
  if not p.exists():
    pytest.skip(f"{p} is absent (only this project's workspace has ../shared)")
  return p


def make_hf_clip(vision_width=48, vision_layers=4, vision_heads=4, image_size=56, patch_size=14,
                 text_width=32, text_layers=2, text_heads=4, projection_dim=24, seed=0,
                 full=False):
  """A random transformers CLIPModel with every weight perturbed (LayerNorms included)."""
  import torch
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(seed)
  if full:   # OpenAI ViT-L/14-336
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    projection_dim = 768
  else:
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width + 8,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                  image_size=image_size, patch_size=patch_size)
    text = dict(hidden_size=text_width, intermediate_size=3 * text_width, num_hidden_layers=text_layers,
                num_attention_heads=text_heads)
  text.update(vocab_size=49408, max_position_embeddings=77)
  config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                      logit_scale_init_value=float(np.log(50.0)))
  model = CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "logit_scale":
        p.add_(0.02 * torch.randn_like(p))
  return model


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory):
  """A random small CLIPModel saved with save_pretrained (model.safetensors + config.json)."""
  d = tmp_path_factory.mktemp("hf_clip")
  model = make_hf_clip()
  model.save_pretrained(str(d))
  return d
