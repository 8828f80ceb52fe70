"""Independent NumPy (float64) reference of FiSeCLIP after the CLIP tower.

Written from DESIGN.md sections 3-5 and the paper's Algorithm 1, for parity tests of the JAX code.
Clarity over speed: plain loops over images, pairs and patches. Nothing here imports the JAX
implementation; `conf` is only read through its attributes (a `fiseclip_jax.config.FiSeConfig`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

LN_EPS = 1e-5


def _grid(n, grid=None):
  """(h, w) of a row-major patch grid of n patches (square unless given)."""
  if grid is not None:
    h, w = int(grid[0]), int(grid[1])
    if h * w != n:
      raise ValueError(f"grid {grid} does not hold {n} patches")
    return h, w
  side = int(round(math.sqrt(n)))
  if side * side != n:
    raise ValueError(f"{n} patches are not a square grid; pass grid=(h, w)")
  return side, side


def _l2n(x):
  """L2-normalize along the last axis (float64)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def lnamd(tokens, r, grid=None):
  """MuSc's LNAMD: LayerNorm over (h, w, C), r x r mean (zero pad counts), L2-normalize.

  tokens (B, 1 + h*w, C), CLS first; patch index = row * w + col. Returns (B, h*w, C) float64.
  """
  x = np.asarray(tokens, np.float64)[:, 1:, :]  # (B, N, C)
  b, n, c = x.shape
  h, w = _grid(n, grid)
  x = x.reshape(b, h, w, c)  # (B, h, w, C)
  # LayerNorm per image over (h, w, C) jointly, biased variance, no affine.
  out = np.empty_like(x)
  for i in range(b):
    mean = x[i].mean()
    var = ((x[i] - mean) ** 2).mean()
    out[i] = (x[i] - mean) / np.sqrt(var + LN_EPS)
  # Unfold-style patchify: zero-pad, take every r x r window (stride 1), mean over its r*r cells.
  p = (r - 1) // 2
  padded = np.zeros((b, h + 2 * p, w + 2 * p, c))  # (B, h+2p, w+2p, C)
  padded[:, p:p + h, p:p + w, :] = out
  agg = np.empty((b, h * w, c))  # (B, N, C)
  for row in range(h):
    for col in range(w):
      window = padded[:, row:row + r, col:col + r, :].reshape(b, r * r, c)  # (B, r*r, C)
      agg[:, row * w + col, :] = window.sum(axis=1) / (r * r)  # padded zeros count
  return _l2n(agg)


def _min_dist(query, refs, max_elems=1 << 22):
  """For each query row, the min Euclidean distance to the rows of refs: (Nq,)."""
  nq, c = query.shape
  chunk = max(1, max_elems // max(1, refs.shape[0] * c))
  out = np.empty(nq)
  for s in range(0, nq, chunk):
    diff = query[s:s + chunk, None, :] - refs[None, :, :]  # (chunk, Nr, C)
    out[s:s + chunk] = np.sqrt((diff * diff).sum(axis=-1)).min(axis=1)
  return out


def mutual_scores(feats, exclude, valid, topk_frac=0.3, agg="interval"):
  """Masked mutual scoring of a batch.

  feats (B, N, C) unit vectors, exclude (B, N) bool (reference patches left out), valid (B,) bool.
  v is a reference of u iff v != u, valid[v] and not exclude[v].all(). d_uv(p) = min over kept q
  of ||F_u(p) - F_v(q)||_2. "interval": mean of the k smallest d_uv(p) over references,
  k = max(1, floor(topk_frac * n_ref)); "min": min over references.
  Returns (scores (B, N), n_ref (B,)); scores are 0 where n_ref == 0.
  """
  f = np.asarray(feats, np.float64)  # (B, N, C)
  exclude = np.asarray(exclude, bool)  # (B, N)
  valid = np.asarray(valid, bool)  # (B,)
  b, n, _ = f.shape
  is_ref = valid & ~exclude.all(axis=1)  # (B,)
  scores = np.zeros((b, n))
  n_ref = np.zeros(b, np.int64)
  for u in range(b):
    refs = [v for v in range(b) if v != u and is_ref[v]]
    n_ref[u] = len(refs)
    if not refs:
      continue
    d = np.stack([_min_dist(f[u], f[v][~exclude[v]]) for v in refs])  # (n_ref, N)
    if agg == "interval":
      k = max(1, math.floor(topk_frac * len(refs)))
      scores[u] = np.sort(d, axis=0)[:k].mean(axis=0)
    elif agg == "min":
      scores[u] = d.min(axis=0)
    else:
      raise ValueError(f"agg={agg!r}")
  return scores, n_ref


def bilinear_matrix(n_in, n_out):
  """(n_out, n_in) weights of 1-D bilinear resize, half-pixel centres (torch align_corners=False)."""
  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for o in range(n_out):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  return m


def _steps(conf):
  """The groups of (layer index, r) of each filtering step, in order."""
  layers = range(len(conf.feature_layers))
  if conf.filter_loop == "r":
    return [[(i, r) for i in layers] for r in conf.r_list]
  if conf.filter_loop == "layer":
    return [[(i, r) for r in conf.r_list] for i in layers]
  if conf.filter_loop == "flat":
    return [[(i, r)] for r in conf.r_list for i in layers]
  raise ValueError(f"filter_loop={conf.filter_loop!r}")


def _vote(conf, mask0, votes, n_voters):
  """The exclusion mask after a step."""
  if conf.vote == "majority":
    return votes > n_voters / 2
  if conf.vote == "and":
    return votes == n_voters
  if conf.vote == "or":
    return votes > 0
  if conf.vote == "text":
    return mask0.copy()
  if conf.vote == "off":
    return np.zeros_like(mask0)
  raise ValueError(f"vote={conf.vote!r}")


def detect_from_tower(cls_embed, layer_tokens, proxy_patch_embed, text, valid, conf,
                      logit_scale, image_size, grid=None):
  """FiSeCLIP after the CLIP tower (SeCLIP-AD, FiCLIP-AD with mutual filtering, fusion, maps).

  cls_embed (B, D); layer_tokens (n_layers, B, 1+h*w, C) in conf.feature_layers order;
  proxy_patch_embed (B, h*w, D); text (2, D) rows normal, abnormal; valid (B,) bool.
  Returns a dict: cls_score (B,), seg_prob (B, N, 2), mask0 (B, N), step_scores (n_steps, B, N),
  masks (n_steps, B, N) (the mask each step used), final_mask (B, N), n_ref (B,) (first step),
  patch_map (B, h, w), anomaly_maps (B, S, S), image_scores (B,). Outputs of invalid (padded)
  slots are computed but meaningless: ignore them.
  """
  valid = np.asarray(valid, bool)  # (B,)
  t = _l2n(text)  # (2, D)
  fc = _l2n(cls_embed)  # (B, D)
  cls_score = _softmax(logit_scale * fc @ t.T)[:, 1]  # (B,)
  fs = _l2n(proxy_patch_embed)  # (B, N, D)
  seg_prob = _softmax(logit_scale * fs @ t.T)  # (B, N, 2)
  p_n, p_a = seg_prob[..., 0], seg_prob[..., 1]  # (B, N)
  mask0 = p_a > conf.lam * p_n  # (B, N)
  b, n = mask0.shape
  h, w = _grid(n, grid)

  layer_tokens = np.asarray(layer_tokens, np.float64)
  if layer_tokens.shape[0] != len(conf.feature_layers):
    raise ValueError("layer_tokens must hold one entry per conf.feature_layers")
  feats = {(i, r): lnamd(layer_tokens[i], r, (h, w))
           for i in range(len(conf.feature_layers)) for r in conf.r_list}  # each (B, N, C)

  # Mutual filtering (Algorithm 1 with this project's vote rules).
  mask = np.zeros_like(mask0) if conf.vote == "off" else mask0.copy()  # (B, N)
  votes = mask0.astype(np.int64)  # (B, N)
  n_voters = 1
  step_scores, masks, step_nref = [], [], []
  for group in _steps(conf):
    masks.append(mask.copy())
    outs = [mutual_scores(feats[key], mask, valid, conf.topk_frac, conf.ref_agg) for key in group]
    a = np.mean([s for s, _ in outs], axis=0)  # (B, N)
    nr = outs[0][1]  # (B,), the same for the whole group (same mask)
    a[nr == 0] = 0.0
    step_scores.append(a)
    step_nref.append(nr)
    inter = (a > conf.mu) & (nr > 0)[:, None]  # (B, N)
    votes += inter
    n_voters += 1
    mask = _vote(conf, mask0, votes, n_voters)
  step_scores = np.stack(step_scores)  # (n_steps, B, N)
  masks = np.stack(masks)  # (n_steps, B, N)
  n_ref = step_nref[0]  # (B,)

  # Fusion; SeCLIP alone where the image had no reference.
  wt = conf.fusion_weight
  fused = wt * p_a + (1.0 - wt) * step_scores.mean(axis=0)  # (B, N)
  fused = np.where((n_ref == 0)[:, None], p_a, fused)
  patch_map = fused.reshape(b, h, w)  # (B, h, w)

  # Upsample (bilinear, half-pixel centres) and smooth.
  s = int(image_size)
  wy, wx = bilinear_matrix(h, s), bilinear_matrix(w, s)  # (S, h), (S, w)
  maps = np.empty((b, s, s))
  for i in range(b):
    up = wy @ patch_map[i] @ wx.T  # (S, S)
    maps[i] = ndimage.gaussian_filter(up, sigma=conf.sigma, truncate=4.0, mode="reflect")

  peak = maps.reshape(b, -1).max(axis=1)  # (B,)
  if conf.image_score == "mean":
    image_scores = (cls_score + peak) / 2
  elif conf.image_score == "max":
    image_scores = peak
  elif conf.image_score == "cls":
    image_scores = cls_score.copy()
  else:
    raise ValueError(f"image_score={conf.image_score!r}")

  return dict(cls_score=cls_score, seg_prob=seg_prob, mask0=mask0, step_scores=step_scores,
              masks=masks, final_mask=mask, n_ref=n_ref, patch_map=patch_map,
              anomaly_maps=maps, image_scores=image_scores)
