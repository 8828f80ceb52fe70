"""bfloat16 against float32 on the embedded demo set: metrics barely move.

The issue's bound: image and pixel AUROC change by < 0.002. Maps: bfloat16 keeps 8 mantissa bits
(~4e-3 relative) through the tower; the maps are probabilities and distances of order 1.
"""
import numpy as np

import fiseclip_jax as fj
from fiseclip_jax.data import demo_root, iter_batches, mvtec_samples
from fiseclip_jax.data.order import shuffled
from fiseclip_jax.models.clip.config import VARIANTS
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
