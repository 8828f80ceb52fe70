"""Parity at the real size: a random ViT-L/14-336 CLIP, converted, on one 518x518 image (37x37 grid).

The tiny-size parity tests (test_clip.py) cannot see bugs that only show at 16 heads, 1370 tokens or
a 24x24 -> 37x37 position-embedding resample. Random weights (none can be downloaded); max abs
error < 1e-4 in float32. Needs ~8 GB of memory and a few minutes of CPU.
"""
import gc
import time

import numpy as np
import pytest

import fiseclip_jax as fj
from conftest import make_hf_clip
from test_clip import hf_reference, max_err, unit_pixels
from fiseclip_jax.convert import sources as conv

torch = pytest.importorskip("torch")
TOL = 1e-4
LAYERS = (6, 12, 18, 24)
PROXY_LAYER = 12
PROMPTS = ["a photo of a flawless hazelnut.", "a photo of a damaged hazelnut with a crack."]


@pytest.mark.slow
def test_vit_l14_336_parity_at_518(tmp_path):
  t0 = time.time()
  model = make_hf_clip(full=True)
  model.set_attn_implementation("eager")          # output_attentions for the proxy layer
  model.save_pretrained(str(tmp_path))
  t_build = time.time() - t0

  # Reference first, then free the torch model (and its 3 GB of attentions) before JAX runs.
  pixels = np.random.RandomState(0).randn(1, 518, 518, 3).astype(np.float32)
  ids = fj.tokenize(PROMPTS)
  t0 = time.time()
  ref_layers, ref_cls, ref_proxy = hf_reference(model, pixels, LAYERS, PROXY_LAYER)
  with torch.no_grad():
    ref_text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
  t_torch = time.time() - t0
  del model
  gc.collect()

  t0 = time.time()
  params, cfg, _ = conv.convert(str(tmp_path))
  assert cfg == fj.CLIPConfig.vit_l14_336()
  t_convert = time.time() - t0
  t0 = time.time()
  out = fj.encode_image(params, cfg, unit_pixels(pixels), feature_layers=LAYERS, proxy_layer=PROXY_LAYER)
  text = fj.encode_text(params, cfg, ids)
  layer_tokens, cls_embed, proxy = (np.asarray(a) for a in (out.layer_tokens, out.cls_embed,
                                                             out.proxy_patch_embed))
  text = np.asarray(text)
  t_jax = time.time() - t0
  del params, out
  gc.collect()

  assert layer_tokens.shape == (4, 1, 1 + 37 * 37, 1024)
  assert cls_embed.shape == (1, 768) and proxy.shape == (1, 37 * 37, 768) and text.shape == (2, 768)
  errors = {f"layer {n}": max_err(layer_tokens[i], ref_layers[i]) for i, n in enumerate(LAYERS)}
  errors.update({"cls_embed": max_err(cls_embed, ref_cls), "proxy_patch_embed": max_err(proxy, ref_proxy),
                 "text": max_err(text, ref_text)})
  scale = {f"layer {n}": float(np.abs(ref_layers[i]).max()) for i, n in enumerate(LAYERS)}
  scale.update({"cls_embed": float(np.abs(ref_cls).max()), "proxy_patch_embed": float(np.abs(ref_proxy).max()),
                "text": float(np.abs(ref_text).max())})
  print(f"\nViT-L/14-336 at 518x518: build+save {t_build:.1f}s, torch {t_torch:.1f}s, "
        f"convert {t_convert:.1f}s, jax {t_jax:.1f}s")
  for name, e in errors.items():
    print(f"  {name:18s} max abs error {e:.2e} (max abs value {scale[name]:.3g})")
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, f"max abs error >= {TOL}: {bad}"
