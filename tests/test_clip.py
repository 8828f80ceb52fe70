"""Parity of the Flax CLIP with transformers' PyTorch CLIP (random weights, converted checkpoints).

Tolerance: max abs error < 1e-4 in float32 (both sides float32, XLA at "highest" matmul precision);
what is left is float32 summation order, ~1e-6 relative.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.method import pipeline
from fiseclip_jax.method.spec import Params

torch = pytest.importorskip("torch")
TOL = 1e-4


def unit_pixels(normalized):
  """The RGB in [0, 1] that OpenAI's normalization maps to `normalized` (what fj takes; the
  transformers reference is fed `normalized` itself)."""
  from fiseclip_jax.models.clip.config import OPENAI_MEAN, OPENAI_STD
  return (normalized * np.asarray(OPENAI_STD, np.float32) + np.asarray(OPENAI_MEAN, np.float32))


def hf_reference(model, pixels, feature_layers, proxy_layer, proxy_heads="mean", proxy_attention="layer"):
  """Hidden states, image_embeds and SeCLIP patch embeddings from the transformers modules."""
  vm = model.vision_model
  x = torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = vm(pixel_values=x, output_hidden_states=True, output_attentions=True, interpolate_pos_encoding=True)
    hs = out.hidden_states
    n = len(vm.encoder.layers)
    last = vm.encoder.layers[-1]
    h = last.layer_norm1(hs[n - 1])
    b, t, w = h.shape
    heads = last.self_attn.num_heads
    split = lambda y: y.view(b, t, heads, w // heads).transpose(1, 2)                 # (B, H, T, Dh)
    q, k, v = split(last.self_attn.q_proj(h)), split(last.self_attn.k_proj(h)), split(last.self_attn.v_proj(h))
    if proxy_attention == "layer":
      probs = out.attentions[proxy_layer - 1]
    else:
      a, c = {"vv": (v, v), "qq": (q, q), "kk": (k, k)}[proxy_attention]
      probs = torch.softmax(a @ c.transpose(-1, -2) * (w // heads) ** -0.5, dim=-1)
    if proxy_heads == "mean":
      probs = probs.mean(1, keepdim=True)
    o = (probs @ v).transpose(1, 2).reshape(b, t, w)
    x_final = last.self_attn.out_proj(o)
    proxy = model.visual_projection(vm.post_layernorm(x_final[:, 1:]))
    cls = model.visual_projection(out.pooler_output)
  return ([hs[i].numpy() for i in feature_layers], cls.numpy(), proxy.numpy())


@pytest.fixture(scope="module")
def converted(hf_clip_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "clip.safetensors"
  subprocess.run([sys.executable, "-m", "weights.convert", f"--src={hf_clip_dir}", f"--out={out}"],
                 check=True, capture_output=True)
  params, cfg = fj.load_checkpoint(str(out))
  from transformers import CLIPModel
  model = CLIPModel.from_pretrained(str(hf_clip_dir), attn_implementation="eager").eval()
  return params, cfg, model


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("proxy_heads,proxy_attention,proxy_layer", [
    ("mean", "layer", 2), ("per_head", "layer", 3), ("mean", "vv", 4), ("per_head", "qq", 4),
    ("mean", "kk", 4), ("mean", "layer", 4), ("mean", "layer", 1)])
def test_image_parity_at_larger_size(converted, proxy_heads, proxy_attention, proxy_layer):
  params, cfg, model = converted
  assert cfg.image_size == 56 and cfg.vision_width == 48
  pixels = np.random.RandomState(0).randn(2, 98, 98, 3).astype(np.float32)   # 7x7 grid, trained 4x4
  layers = (1, 2, 4)
  ref_layers, ref_cls, ref_proxy = hf_reference(model, pixels, layers, proxy_layer, proxy_heads, proxy_attention)
  out = fj.encode_image(params, cfg, unit_pixels(pixels), feature_layers=layers, proxy_layer=proxy_layer,
                        proxy_heads=proxy_heads, proxy_attention=proxy_attention)
  assert out.layer_tokens.shape == (3, 2, 50, 48)
  for i, ref in enumerate(ref_layers):
    assert max_err(out.layer_tokens[i], ref) < TOL, f"layer {layers[i]}"
  assert max_err(out.cls_embed, ref_cls) < TOL
  assert max_err(out.proxy_patch_embed, ref_proxy) < TOL


def test_image_parity_at_trained_size(converted):
  params, cfg, model = converted
  pixels = np.random.RandomState(1).randn(3, 56, 56, 3).astype(np.float32)
  ref_layers, ref_cls, ref_proxy = hf_reference(model, pixels, (3,), 2)
  out = fj.encode_image(params, cfg, unit_pixels(pixels), feature_layers=(3,), proxy_layer=2)
  assert max_err(out.layer_tokens[0], ref_layers[0]) < TOL
  assert max_err(out.cls_embed, ref_cls) < TOL
  assert max_err(out.proxy_patch_embed, ref_proxy) < TOL


def test_text_parity(converted):
  params, cfg, model = converted
  ids = fj.tokenize(["a photo of a screw.", "damaged metal nut with flaw", "x" * 300, "Ünïcode 123 !?"])
  with torch.no_grad():
    ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
  assert max_err(fj.encode_text(params, cfg, ids), ref) < TOL


def test_logit_scale_read_from_checkpoint(converted):
  params, _, model = converted
  assert abs(float(fj.logit_scale(params)) - float(model.logit_scale.detach().exp())) < 1e-4


def count_traces(monkeypatch):
  """Calls of the tower's patch embedding while tracing: one per compile of anything using it."""
  from fiseclip_jax.models.clip import model
  traces = []
  embed = model.embed_patches
  monkeypatch.setattr(model, "embed_patches", lambda *a: (traces.append(1), embed(*a))[1])
  return traces


def test_encode_image_compiles_once_per_shape(monkeypatch):
  cfg = fj.CLIPConfig.tiny()
  params = fj.init_params(cfg, 0)
  traces = count_traces(monkeypatch)
  enc = lambda x: fj.encode_image(params, cfg, x, feature_layers=(1, 2, 4), proxy_layer=2)
  for seed in range(3):
    enc(jnp.full((2, 56, 56, 3), float(seed)))
  assert len(traces) == 1                      # same shape, new values: cached
  enc(jnp.zeros((2, 70, 70, 3)))
  assert len(traces) == 2                      # a new shape compiles once more


def test_block_stack_traced_once_per_segment():
  """The 24-block stack is a few scans, not 24 unrolled blocks."""
  cfg = fj.CLIPConfig.tiny(vision_layers=24)
  params = fj.init_params(cfg, 0)
  # XLA's attention: the blocked CPU kernel (models/attention.py) adds its own scan over heads per block.
  conf = fj.FiSeConfig(image_size=56, feature_layers=(6, 12, 18, 24), proxy_layer=12,
                       attention_impl="xla")
  spec = fj.make_spec(cfg, conf)
  jaxpr = jax.make_jaxpr(lambda p, x: pipeline.encode(spec, Params(p, None), x))(
      params, jnp.zeros((1, 56, 56, 3)))
  text = str(jaxpr)
  assert text.count("scan[") <= 6    # block segments ending at 6, 11, 12, 18, 23, 24
  # One dot_general per q/k/v/out/fc1/fc2 inside each scan body; nowhere near 24 * 6 in total.
  assert text.count("dot_general") < 80


def test_bad_image_size_is_a_clear_error():
  cfg = fj.CLIPConfig.tiny()
  with pytest.raises(ValueError, match="multiple of the patch size"):
    fj.encode_image(fj.init_params(cfg), cfg, jnp.zeros((1, 50, 50, 3)), feature_layers=(1,), proxy_layer=1)
