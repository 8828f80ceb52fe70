"""bfloat16 against float32 on the embedded demo set: metrics barely move; and bfloat16 is bfloat16.

The issue's bound: image and pixel AUROC change by < 0.002. Maps: bfloat16 keeps 8 mantissa bits
(~4e-3 relative) through the tower; the maps are probabilities and distances of order 1.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.data import demo_root, iter_batches, mvtec_samples
from fiseclip_jax.data.order import shuffled
from fiseclip_jax.models.clip import model as clip_model
from fiseclip_jax.models.clip.config import VARIANTS
from fiseclip_jax.models.dinov2 import model as dinov2_model
from fiseclip_jax.outputs import metrics


def test_bfloat16_matches_float32_on_demo_set():
  cfg = VARIANTS["demo"].config
  params = fj.init_params(cfg, seed=0)
  samples = shuffled(mvtec_samples(demo_root(), "hazelnut"), 0)
  batches = list(iter_batches(samples, 12, 224, with_masks=True))
  out = {}
  for dtype in ("float32", "bfloat16"):
    conf = fj.FiSeConfig(image_size=224, compute_dtype=dtype)
    text = fj.text_features(params, cfg, "hazelnut", conf)
    res = [fj.detect(params, cfg, conf, b.images, b.valid, text) for b in batches]
    keep = lambda x, b: np.asarray(x)[b.valid]
    out[dtype] = dict(scores=np.concatenate([keep(r.image_scores, b) for r, b in zip(res, batches)]),
                      maps=np.concatenate([keep(r.anomaly_maps, b) for r, b in zip(res, batches)]))
  labels = np.concatenate([b.labels[b.valid] for b in batches])
  masks = np.concatenate([b.masks[b.valid] for b in batches])
  f32, bf16 = out["float32"], out["bfloat16"]
  map_err = np.abs(f32["maps"] - bf16["maps"]).max()
  assert map_err < 2e-2, map_err
  im = [metrics.image_metrics(labels, o["scores"])["auroc"] for o in (f32, bf16)]
  px = [metrics.pixel_metrics(masks, o["maps"])["auroc"] for o in (f32, bf16)]
  print(f"max map diff {map_err:.2e}; image AUROC {im}; pixel AUROC {px}")
  assert abs(im[0] - im[1]) < 0.002
  assert abs(px[0] - px[1]) < 0.002


def _dense_dots(hlo: str, rows: int, widths) -> list:
  """(a, b) operand dtypes of every dot in optimized HLO whose output is (rows, width in widths)."""
  types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
  found = re.findall(r"= \w+\[(\d+),(\d+)\]\{[\d,]*\} dot\(%([^,\s)]+), %([^,\s)]+)\)", hlo)
  return [(types[a], types[b]) for m, n, a, b in found if int(m) == rows and int(n) in widths]


@pytest.mark.parametrize("block", [clip_model.Block, dinov2_model.Block], ids=["clip", "dinov2"])
def test_bfloat16_dense_layers_are_bfloat16_matmuls_on_cpu(block):
  """With the CPU kernels a bfloat16 tower's six dense layers multiply bf16 operands. XLA CPU
  rewrote bf16-output dots as float32 matmuls on the unrounded inputs (a float32 tower's cost,
  silently more precise); `vit.wide_dot_general` asks for the form its bf16 kernels take."""
  if jax.default_backend() != "cpu":
    pytest.skip("XLA CPU's rewrite")
  width, mlp, t = 128, 256, 50
  blk = block(width, 2, mlp, dtype=jnp.bfloat16, attention_impl="blocked")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, t, width)), jnp.float32)
  params = blk.init(jax.random.PRNGKey(0), x)
  dots = _dense_dots(jax.jit(blk.apply).lower(params, x).compile().as_text(), 2 * t, (width, mlp))
  assert len(dots) == 6 and all(d == ("bf16", "bf16") for d in dots), dots
