"""Parity of the Flax DINOv2 with transformers' `Dinov2Model` (random weights, converted files).

Tolerance: max abs error < 1e-4 in float32 (both sides float32, XLA at "highest" matmul precision,
see conftest); what is left is float32 summation order: measured up to ~6e-6 on streams of max
abs ~10 at the tiny size, ~3e-5 after 24 ViT-L blocks. Wrong details land well above it (tanh
instead of exact GELU: 5e-4 after one block; PyTorch's antialiased or DINOv2's +0.1-offset
resample: >0.1). Besides the trained size (56: a 4x4 grid) the inputs resample the position
embedding up (98x70 -> 7x5, 98x98 -> 7x7), down (42x42 -> 3x3), and to 28x112 (2x8: as many
patches as the trained grid, but not square, which transformers still resamples).
"""
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.convert.dinov2 import config_from_hf, hf_to_params, is_dinov2_config
from fiseclip_jax.models.dinov2.config import Dinov2Config
from fiseclip_jax.models.dinov2.model import (final_layer_norm, hidden_states, init_params,
                                              param_shapes)

torch = pytest.importorskip("torch")
TOL = 1e-4


def make_hf_dinov2(width=48, layers=4, heads=4, image_size=56, patch_size=14, swiglu=False, seed=0,
                   full=False):
  """A random transformers Dinov2Model with no weight at a constant or at transformers' init.

  transformers' init (std 0.02 matrices) leaves a 48-wide block nearly the identity, which would
  let a wrong block (tanh GELU, swapped SwiGLU halves) pass at 1e-4. So the matrices are drawn
  lecun-normal (std fan_in^-1/2: every block moves the stream by O(1)), the cls / position / mask
  embeddings 0.5-normal (a resampling error shows), biases 0.1-normal, and LayerNorm weights and
  layer scales 1 + 0.1-normal. The model is built without transformers' own init (a full-size one
  would spend ~25 s of CPU on truncated normals that are overwritten). full: DINOv2 ViT-L/14 at 518.
  """
  from transformers import Dinov2Config as HFConfig, Dinov2Model
  from transformers.initialization import no_init_weights
  torch.manual_seed(seed)
  if full:
    kw = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518,
              patch_size=14)
  else:
    kw = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
              image_size=image_size, patch_size=patch_size, use_swiglu_ffn=swiglu)
  with no_init_weights():
    model = Dinov2Model(HFConfig(**kw)).eval()
  model.set_attn_implementation("sdpa" if full else "eager")    # ViT-L: sdpa 35 s, eager 55 s
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("position_embeddings", "cls_token", "mask_token")):
        p.normal_(0.0, 0.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:                                # LayerNorm weights, layer scales
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0.0, p[0].numel() ** -0.5)
  return model


def hf_hidden_states(model, pixels):
  """transformers' hidden_states (embeddings, then each block) and last_hidden_state, NHWC in."""
  x = torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2).contiguous()   # (B, 3, H, W)
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def convert_dir(d):
  """Converter path of a save_pretrained folder: config.json + model.safetensors (numpy)."""
  from safetensors.numpy import load_file
  cfg = config_from_hf(json.loads((d / "config.json").read_text()), str(d / "config.json"))
  where = str(d / "model.safetensors")
  return hf_to_params(load_file(where), cfg, where), cfg


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """gelu / swiglu: (params, cfg, transformers model, save_pretrained folder)."""
  out = {}
  for variant in ("gelu", "swiglu"):
    d = tmp_path_factory.mktemp(f"hf_dinov2_{variant}")
    model = make_hf_dinov2(swiglu=variant == "swiglu")
    model.save_pretrained(str(d))
    out[variant] = (*convert_dir(d), model, d)
  return out


@pytest.fixture(params=["gelu", "swiglu"])
def converted(request, hf_models):
  return hf_models[request.param]


SIZES = [(98, 70), (98, 98), (42, 42), (28, 112), (56, 56)]


@pytest.mark.parametrize("variant,hw", [("gelu", hw) for hw in SIZES]
                         + [("swiglu", (98, 70)), ("swiglu", (42, 42))])
def test_parity_all_layers(hf_models, variant, hw):
  params, cfg, model, _ = hf_models[variant]
  assert cfg.image_size == 56 and cfg.width == 48 and cfg.grid == 4
  assert cfg.use_swiglu_ffn == (variant == "swiglu")
  pixels = np.random.RandomState(0).randn(2, *hw, 3).astype(np.float32)
  ref, ref_last = hf_hidden_states(model, pixels)
  layers = tuple(range(cfg.layers + 1))            # the embeddings and every block
  out = hidden_states(params, cfg, pixels, layers)
  t = 1 + (hw[0] // 14) * (hw[1] // 14)
  assert out.shape == (len(layers), 2, t, 48) and len(ref) == len(layers)
  errs = [max_err(out[i], ref[i]) for i in layers]
  assert max(errs) < TOL, f"max abs error per layer {errs}"
  assert max_err(final_layer_norm(params, cfg, out[-1]), ref_last) < TOL


def test_layer_order_and_subsets(converted):
  params, cfg, model, _ = converted
  pixels = np.random.RandomState(1).randn(1, 70, 42, 3).astype(np.float32)
  ref, _ = hf_hidden_states(model, pixels)
  out = hidden_states(params, cfg, pixels, (3, 1, 3))
  for i, layer in enumerate((3, 1, 3)):
    assert max_err(out[i], ref[layer]) < TOL


# The checkpoint names and transformers 5's in-memory module names (the converter's docstring).
IN_MEMORY = {".attention.attention.query.": ".attention.q_proj.",
             ".attention.attention.key.": ".attention.k_proj.",
             ".attention.attention.value.": ".attention.v_proj.",
             ".attention.output.dense.": ".attention.o_proj.", ".mlp.weights_out.": ".mlp.down_proj."}


def in_memory_names(sd):
  """sd under the in-memory names; the packed SwiGLU weights_in (2M, W) is [gate; up]."""
  out = {}
  for k, v in sd.items():
    if ".mlp.weights_in." in k:
      out[k.replace("weights_in", "gate_proj")], out[k.replace("weights_in", "up_proj")] = (
          np.split(v, 2, axis=0))
      continue
    for old, new in IN_MEMORY.items():
      k = k.replace(old, new)
    out[k] = v
  return out


def test_converter_reads_in_memory_names(converted):
  """Some transformers 5 releases name the modules q_proj / o_proj / gate_proj... in memory (5.25),
  others keep the checkpoint's names (5.17); save_pretrained writes the checkpoint's."""
  params, cfg, model, _ = converted
  sd = in_memory_names({k: v.detach().numpy() for k, v in model.state_dict().items()})
  assert any(".q_proj." in k for k in sd) and not any(".attention.attention." in k for k in sd)
  again = hf_to_params(sd, cfg, "state_dict")
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_config_round_trip():
  for cfg in (Dinov2Config.vit_s14(), Dinov2Config.vit_b14(), Dinov2Config.vit_l14(),
              Dinov2Config.vit_g14(), Dinov2Config.tiny(use_swiglu_ffn=True)):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Dinov2Config.from_dict(d) == cfg and hash(Dinov2Config.from_dict(d)) == hash(cfg)
  g = Dinov2Config.vit_g14()
  assert (g.width, g.layers, g.heads, g.mlp, g.use_swiglu_ffn, g.grid) == (1536, 40, 24, 4096, True,
                                                                         37)
  with pytest.raises(ValueError, match=r"unknown Dinov2Config fields \['bogus', 'registers'\]"):
    Dinov2Config.from_dict({**Dinov2Config().to_dict(), "bogus": 1, "registers": 4})
  with pytest.raises(ValueError, match="hidden_act"):
    Dinov2Config(hidden_act="relu")


def test_hf_config_shapes_match_presets():
  """The presets are what transformers builds for the facebook/dinov2-* configs."""
  from transformers import Dinov2Config as HFConfig
  hub = {"vit_s14": dict(hidden_size=384, num_attention_heads=6),
         "vit_b14": dict(hidden_size=768, num_attention_heads=12),
         "vit_l14": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24),
         "vit_g14": dict(hidden_size=1536, num_attention_heads=24, num_hidden_layers=40,
                         use_swiglu_ffn=True)}
  for name, kw in hub.items():
    hf = HFConfig(image_size=518, patch_size=14, **kw).to_dict()
    assert is_dinov2_config(hf)
    assert config_from_hf(hf, name) == getattr(Dinov2Config, name)(), name


def test_converter_errors(converted):
  params, cfg, _, d = converted
  from safetensors.numpy import load_file
  sd = load_file(str(d / "model.safetensors"))
  assert "embeddings.mask_token" in sd               # dropped silently
  bad = {k: v for k, v in sd.items() if k != "encoder.layer.1.norm2.weight"}
  with pytest.raises(CheckpointError,
                     match=r"here\.st: missing key 'encoder\.layer\.1\.norm2\.weight'"):
    hf_to_params(bad, cfg, "here.st")
  extra = {**sd, "encoder.layer.4.norm1.weight": sd["layernorm.weight"],
           "pooler.dense.bias": sd["layernorm.bias"]}
  with pytest.raises(CheckpointError,
                     match=r"unexpected keys \['encoder\.layer\.4\.norm1\.weight', 'pooler"):
    hf_to_params(extra, cfg, "here.st")
  with pytest.raises(CheckpointError, match="mis-shaped"):
    hf_to_params(sd, dataclasses.replace(cfg, image_size=70), "here.st")   # 5x5 grid, file has 4x4
  with pytest.raises(CheckpointError, match=r"keys start with 'dinov2\.'"):
    hf_to_params({f"dinov2.{k}": v for k, v in sd.items()}, cfg, "here.st")

  hf = json.loads((d / "config.json").read_text())
  for change, key in [({"num_register_tokens": 4}, "num_register_tokens=4"),
                      ({"model_type": "dinov2_with_registers"},
                       "model_type='dinov2_with_registers'"),
                      ({"hidden_act": "relu", "use_swiglu_ffn": False}, "hidden_act='relu'"),
                      ({"num_channels": 1}, "num_channels=1"),
                      ({"qkv_bias": False}, "qkv_bias=False"),
                      ({"image_size": [56, 70]}, r"image_size=\[56, 70\]")]:
    with pytest.raises(CheckpointError, match=f"cfg.json: {key}"):
      config_from_hf({**hf, **change}, "cfg.json")
  assert config_from_hf({**hf, "image_size": [56, 56], "patch_size": [14, 14]}, "x") == cfg
  # SwiGLU ignores hidden_act, as transformers does.
  assert config_from_hf({**hf, "use_swiglu_ffn": True, "hidden_act": "relu"}, "x").use_swiglu_ffn


def test_bf16_close_to_f32():
  """bfloat16 compute: finite, float32 out, within 5% of the float32 stream's scale (bf16 keeps 8
  mantissa bits; measured ~0.3% after 4 random blocks)."""
  cfg = Dinov2Config.tiny()
  params = init_params(cfg, 0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 70, 98, 3))
  f32 = np.asarray(hidden_states(params, cfg, x, (4,)))
  bf16 = np.asarray(hidden_states(params, cfg, x, (4,), compute_dtype="bfloat16"))
  assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
  assert max_err(bf16, f32) < 0.05 * np.abs(f32).max()


def test_random_tower_stays_informative():
  """40 random blocks neither collapse the patch tokens together nor do nothing."""
  cfg = Dinov2Config.tiny(layers=40, use_swiglu_ffn=True)
  params = init_params(cfg, 0)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 84, 84, 3))
  first, last = np.asarray(hidden_states(params, cfg, x, (0, 40)))[:, 0, 1:]       # (T, W) each
  unit = last / np.linalg.norm(last, axis=-1, keepdims=True)
  off = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
  assert off.mean() < 0.5, off.mean()
  assert np.linalg.norm(last - first) > 0.3 * np.linalg.norm(first)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  assert shapes(param_shapes(cfg)) == shapes(params)


def test_blocks_traced_once_per_segment():
  cfg = Dinov2Config.tiny(layers=24)
  params = init_params(cfg, 0)
  from fiseclip_jax.models.dinov2.model import encode
  jaxpr = str(jax.make_jaxpr(lambda p, x: encode(p, cfg, x, (6, 12, 18, 24), "float32", None))(
      params, jnp.zeros((1, 56, 56, 3))))
  assert jaxpr.count("scan[") == 4
  assert jaxpr.count("dot_general") < 40


def test_bad_inputs_are_clear_errors():
  cfg = Dinov2Config.tiny()
  params = init_params(cfg)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    hidden_states(params, cfg, jnp.zeros((1, 50, 56, 3)), (1,))
  with pytest.raises(ValueError, match="must lie in"):
    hidden_states(params, cfg, jnp.zeros((1, 56, 56, 3)), (5,))


@pytest.mark.slow
def test_vit_l14_parity_at_518():
  """DINOv2 ViT-L/14 shapes (16 heads of 64, 1370 tokens, 4096-wide MLP) on one 518x518 image.

  The trained size, so no resampling: at 448 (37x37 -> 32x32) it would take another minute of
  CPU; the resample itself is checked at the tiny size, up and down. ~1.5 min of CPU, 6 GB.
  """
  t0 = time.time()
  model = make_hf_dinov2(full=True)
  cfg = config_from_hf(model.config.to_dict(), "vit-l")
  assert cfg == Dinov2Config.vit_l14()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}    # in-memory names
  params = hf_to_params(sd, cfg, "vit-l")
  t_build = time.time() - t0
  layers = (1, 6, 12, 18, 24)
  pixels = np.random.RandomState(0).randn(1, 518, 518, 3).astype(np.float32)
  t0 = time.time()
  ref, _ = hf_hidden_states(model, pixels)
  t_torch = time.time() - t0
  del model
  t0 = time.time()
  out = np.asarray(hidden_states(params, cfg, pixels, layers))
  t_jax = time.time() - t0
  assert out.shape == (len(layers), 1, 1370, 1024)
  errs = [max_err(out[i], ref[layer]) for i, layer in enumerate(layers)]
  print(f"\nbuild {t_build:.1f}s torch {t_torch:.1f}s jax {t_jax:.1f}s max abs err per layer "
        f"{dict(zip(layers, ['%.1e' % e for e in errs]))}")
  assert max(errs) < TOL, errs


def test_parity_through_the_converter_program_and_the_pipeline(hf_models, tmp_path):
  """The user's path: `python -m weights.convert` on the save_pretrained folder, fj.load_checkpoint
  (which returns a Dinov2Config), then fj.encode_image on RGB in [0, 1] (the loader's), which the
  DINOv2 tower normalizes with ImageNet's statistics. Non-native size 98x70."""
  import subprocess
  import sys
  from pathlib import Path
  import fiseclip_jax as fj
  from fiseclip_jax.models.dinov2.config import IMAGENET_MEAN, IMAGENET_STD
  _, _, model, folder = hf_models["gelu"]
  out = tmp_path / "dinov2.safetensors"
  p = subprocess.run([sys.executable, "-m", "weights.convert", f"--src={folder}", f"--out={out}"],
                     cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  params, cfg = fj.load_checkpoint(str(out))
  assert isinstance(cfg, Dinov2Config) and cfg.layers == 4
  pixels = np.random.RandomState(3).rand(2, 98, 70, 3)                      # RGB in [0, 1]
  imagenet = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  ref, _ = hf_hidden_states(model, imagenet)
  layers = (1, 2, 3, 4)
  feats = fj.encode_image(params, cfg, pixels.astype(np.float32), feature_layers=layers)
  assert feats.cls_embed is None and feats.proxy_patch_embed is None
  errs = [max_err(feats.layer_tokens[i], ref[layer]) for i, layer in enumerate(layers)]
  assert max(errs) < TOL, errs
