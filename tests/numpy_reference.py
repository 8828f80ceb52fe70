"""Independent NumPy (float64) reference of FiSeCLIP after the CLIP tower.

Written from DESIGN.md sections 3-7 (the written rules) and the paper's Algorithm 1, for parity
tests of the JAX code. Clarity over speed: plain loops over images, pairs, steps and patches.
Nothing here imports the JAX implementation; `conf` is only read through its attributes (a
`fiseclip_jax.config.FiSeConfig`: feature_layers, r_list, lam, mu, vote, filter_loop, ref_agg,
topk_frac, fusion_weight, image_score, sigma).

Entry points:
  detect_from_tower(...)  one batch: roles (query / reference flags), reference modes "batch",
                          "bank", "both", "rolling", external entries (a bank or a ring buffer).
  rolling_stream(...)     a whole stream scored ONE image at a time, each image against the
                          `window` images before it with the masks they had when they were scored.
  mutual_scores(...)      plain masked mutual scoring of one feature map over a batch ("batch" mode).
  topk_count(frac, n)     the integer k of "interval" aggregation.
  top_up_batches(n, b)    how the programs cut a category of n images into batches of b slots.
  seclip_only_counts(...) the per-category count of images scored by SeCLIP alone, by reason.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy import ndimage

LN_EPS = 1e-5
MODES = ("batch", "bank", "both", "rolling")
NO_CANDIDATES = "no_candidates"
ALL_MASKED = "all_masked"


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


def topk_count(topk_frac, n_ref):
  """k of "interval" aggregation (DESIGN.md §4), in integers.

  topk_frac is read as the decimal fraction it is written as (0.3 = 3/10, 0.7 = 7/10):
  k = max(1, (num * n_ref) // den). topk_count(0.7, 90) = 63 (floor(0.7 * 90) would give 62).
  """
  frac = Fraction(str(float(topk_frac)))  # str() of a float is its shortest decimal form
  return max(1, (frac.numerator * int(n_ref)) // frac.denominator)


def _aggregate(d, topk_frac, agg):
  """Aggregate d (n_ref, N), the per-reference distances d_uv(p), over the references: (N,)."""
  if agg == "interval":
    k = topk_count(topk_frac, d.shape[0])
    return np.sort(d, axis=0)[:k].mean(axis=0)
  if agg == "min":
    return d.min(axis=0)
  raise ValueError(f"agg={agg!r}")


def _score_against(f_u, refs, topk_frac, agg, grid=None, match_window=None):
  """Score of query patches f_u (N, C) against refs, a non-empty list of (feats (N, C), exclude (N,))
  whose exclude keeps at least one patch. d_uv(p) = min over kept q of ||F_u(p) - F_v(q)||_2.

  match_window w (DESIGN.md §4, aligned matching): q ranges over v's kept patches with
  |q_y - p_y| <= w and |q_x - p_x| <= w on the (h, w) grid; at p only the references keeping a
  patch there count (k from their number), and p scores 0 where none does."""
  if match_window is None:
    d = np.stack([_min_dist(f_u, f_v[~ex_v]) for f_v, ex_v in refs])  # (n_ref, N)
    return _aggregate(d, topk_frac, agg)
  n = f_u.shape[0]
  h, w = _grid(n, grid)
  ys, xs = np.divmod(np.arange(n), w)
  out = np.zeros(n)
  for p in range(n):
    near = (np.abs(ys - ys[p]) <= match_window) & (np.abs(xs - xs[p]) <= match_window)
    d = [_min_dist(f_u[p:p + 1], f_v[near & ~ex_v])[0] for f_v, ex_v in refs
         if (near & ~ex_v).any()]
    if d:
      out[p] = _aggregate(np.array(d)[:, None], topk_frac, agg)[0]
  return out


def mutual_scores(feats, exclude, valid, topk_frac=0.3, agg="interval"):
  """Masked mutual scoring of a batch ("batch" mode, one feature map).

  feats (B, N, C) unit vectors, exclude (B, N) bool (reference patches left out), valid (B,) bool.
  v is a reference of u iff v != u, valid[v] and not exclude[v].all(). d_uv(p) = min over kept q
  of ||F_u(p) - F_v(q)||_2. "interval": mean of the k smallest d_uv(p) over references,
  k = topk_count(topk_frac, n_ref); "min": min over references.
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
    if refs:
      scores[u] = _score_against(f[u], [(f[v], exclude[v]) for v in refs], topk_frac, agg)
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
  """The groups of (layer index, r) of each filtering step, in order (DESIGN.md §6)."""
  layers = range(len(conf.feature_layers))
  if conf.filter_loop == "r":
    return [[(i, r) for i in layers] for r in conf.r_list]
  if conf.filter_loop == "layer":
    return [[(i, r) for r in conf.r_list] for i in layers]
  if conf.filter_loop == "flat":
    return [[(i, r)] for r in conf.r_list for i in layers]
  raise ValueError(f"filter_loop={conf.filter_loop!r}")


def n_steps(conf):
  """Number of filtering steps of conf."""
  return len(_steps(conf))


def _vote(conf, mask0, votes, voters):
  """The exclusion mask of ONE image after a step: mask0, votes (N,) bool/int, voters an int."""
  if conf.vote == "majority":
    return votes * 2 > voters  # ties count as normal
  if conf.vote == "and":
    return votes == voters
  if conf.vote == "or":
    return votes > 0
  if conf.vote == "text":
    return mask0.copy()
  if conf.vote == "off":
    return np.zeros_like(mask0)
  raise ValueError(f"vote={conf.vote!r}")


def detect_from_tower(cls_embed, layer_tokens, proxy_patch_embed, text, valid, conf,
                      logit_scale, image_size, grid=None, *, query=None, reference=None,
                      mode="batch", bank_tokens=None, bank_valid=None, bank_masks=None,
                      positions=None, bank_positions=None, window=None, content=None):
  """FiSeCLIP after the CLIP tower (SeCLIP-AD, FiCLIP-AD with mutual filtering, fusion, maps).

  Batch (B slots, N = h*w patches):
    cls_embed (B, D); layer_tokens (n_layers, B, 1+N, C) in conf.feature_layers order, CLS first;
    proxy_patch_embed (B, N, D); text (2, D) rows normal, abnormal; logit_scale float;
    image_size S (int); grid (h, w) or None (square).
  Roles (DESIGN.md §5):
    valid (B,) bool or None: the default of both flags. query (B,) bool, reference (B,) bool: when
    given they replace valid for that flag. A slot with neither flag is padding: it has no
    candidate and takes no part (its outputs are meaningless: ignore them).
  Reference mode: mode in "batch" | "bank" | "both" | "rolling".
    batch:   candidates of u = slots v != u with reference[v].
    bank:    every external entry e with bank_valid[e]; no batch slot.
    both:    the union.
    rolling: slots v != u with reference[v] and pos(u) - window <= positions[v] < pos(u), and
             external entries e with bank_valid[e] and pos(u) - window <= bank_positions[e] < pos(u).
  External entries (K of them; K = 0 when bank_tokens is None):
    bank_tokens (n_layers, K, 1+N, C) raw tower tokens (their LNAMD maps are computed here);
    bank_valid (K,) bool (default all True); bank_masks (n_steps, K, N) bool, the exclusion mask of
    each entry at each step (default all False: a known-good bank); bank_positions (K,) int and
    positions (B,) int (default arange(B)), window int: used by "rolling" only.
  Letterboxed images (DESIGN.md §2): content (B, S, S) bool, each image's own pixels. A patch
  with none of them is padding: it is in the mask every step uses (never a reference), whatever
  the votes, and the image score's peak is the maximum over the image's own pixels.

  Returns a dict (float64 unless said):
    cls_score (B,), seg_prob (B, N, 2) [P_n, P_a], mask0 (B, N) bool,
    step_scores (n_steps, B, N): a_s, 0 where the slot had no reference at step s,
    masks (n_steps, B, N) bool: the mask each step used (before its own vote),
    final_mask (B, N) bool: the mask after the last step, votes (B, N) int64, voters (B,) int64,
    n_candidates (B,) int64, step_n_ref (n_steps, B) int64, n_ref (B,) int64 (= step_n_ref[0]),
    seclip_only (B,) bool (references at no step), reason (B,) str ('<U13'): "no_candidates",
    "all_masked" or "",
    patch_map (B, h, w), anomaly_maps (B, S, S), image_scores (B,).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  t = _l2n(text)  # (2, D)
  fc = _l2n(cls_embed)  # (B, D)
  cls_score = _softmax(logit_scale * fc @ t.T)[:, 1]  # (B,)
  fs = _l2n(proxy_patch_embed)  # (B, N, D)
  seg_prob = _softmax(logit_scale * fs @ t.T)  # (B, N, 2)
  p_n, p_a = seg_prob[..., 0], seg_prob[..., 1]  # (B, N)
  mask0 = p_a > conf.lam * p_n  # (B, N)
  b, n = mask0.shape
  h, w = _grid(n, grid)

  # Roles.
  if query is None or reference is None:
    if valid is None:
      raise ValueError("pass valid, or both query and reference")
    valid = np.asarray(valid, bool)
  query = (valid if query is None else np.asarray(query, bool)).reshape(b)  # (B,)
  reference = (valid if reference is None else np.asarray(reference, bool)).reshape(b)  # (B,)
  steps = _steps(conf)
  n_st = len(steps)

  layer_tokens = np.asarray(layer_tokens, np.float64)
  n_layers = len(conf.feature_layers)
  if layer_tokens.shape[0] != n_layers:
    raise ValueError("layer_tokens must hold one entry per conf.feature_layers")
  feats = {(i, r): lnamd(layer_tokens[i], r, (h, w))
           for i in range(n_layers) for r in conf.r_list}  # each (B, N, C)

  # External entries (bank or ring buffer).
  if bank_tokens is None:
    k_ext = 0
    bank_feats = {}
  else:
    bank_tokens = np.asarray(bank_tokens, np.float64)
    if bank_tokens.shape[0] != n_layers or bank_tokens.shape[2] != n + 1:
      raise ValueError(f"bank_tokens {bank_tokens.shape}: expected (n_layers, K, 1+N, C)")
    k_ext = bank_tokens.shape[1]
    bank_feats = ({(i, r): lnamd(bank_tokens[i], r, (h, w))
                   for i in range(n_layers) for r in conf.r_list} if k_ext else {})  # (K, N, C)
  bank_valid = (np.ones(k_ext, bool) if bank_valid is None
                else np.asarray(bank_valid, bool).reshape(k_ext))  # (K,)
  if bank_masks is None:
    bank_masks = np.zeros((n_st, k_ext, n), bool)
  bank_masks = np.asarray(bank_masks, bool)
  if bank_masks.shape != (n_st, k_ext, n):
    raise ValueError(f"bank_masks {bank_masks.shape}: expected (n_steps, K, N) = "
                     f"{(n_st, k_ext, n)}")

  # Candidates of each slot: ("b", v) a batch slot, ("e", e) an external entry.
  if mode == "rolling":
    if window is None:
      raise ValueError('mode="rolling" needs window')
    pos = np.arange(b) if positions is None else np.asarray(positions, np.int64).reshape(b)
    if k_ext and bank_positions is None:
      raise ValueError('mode="rolling" with external entries needs bank_positions')
    bpos = (np.zeros(0, np.int64) if bank_positions is None
            else np.asarray(bank_positions, np.int64).reshape(k_ext))
  cands = []
  for u in range(b):
    c = []
    if query[u] or reference[u]:  # padding takes no part
      if mode in ("batch", "both"):
        c += [("b", v) for v in range(b) if v != u and reference[v]]
      if mode in ("bank", "both"):
        c += [("e", e) for e in range(k_ext) if bank_valid[e]]
      if mode == "rolling":
        lo, hi = pos[u] - int(window), pos[u]
        c += [("b", v) for v in range(b) if v != u and reference[v] and lo <= pos[v] < hi]
        c += [("e", e) for e in range(k_ext) if bank_valid[e] and lo <= bpos[e] < hi]
    cands.append(c)
  n_candidates = np.array([len(c) for c in cands], np.int64)  # (B,)

  # Mutual filtering (Algorithm 1 with this project's vote rules), per image votes and voters.
  padding = np.zeros((b, n), bool)
  if content is not None:
    content = np.asarray(content, bool)
    ph, pw = content.shape[1] // h, content.shape[2] // w
    for u in range(b):
      for i in range(h):
        for j in range(w):
          padding[u, i * w + j] = not content[u, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].any()
  mask = np.zeros_like(mask0) if conf.vote == "off" else mask0.copy()  # (B, N)
  votes = mask0.astype(np.int64)  # (B, N)
  voters = np.ones(b, np.int64)  # (B,)
  step_scores = np.zeros((n_st, b, n))
  masks = np.zeros((n_st, b, n), bool)
  step_n_ref = np.zeros((n_st, b), np.int64)
  for s, group in enumerate(steps):
    mask = mask | padding
    masks[s] = mask  # the mask step s uses: before its own vote

    def exclusion(c):
      kind, j = c
      return masks[s, j] if kind == "b" else bank_masks[s, j]  # (N,)

    def features(c, key):
      kind, j = c
      return feats[key][j] if kind == "b" else bank_feats[key][j]  # (N, C)

    for u in range(b):
      refs = [c for c in cands[u] if not exclusion(c).all()]  # keeps >= 1 patch at step s
      step_n_ref[s, u] = len(refs)
      if not refs:
        continue  # no score at step s
      step_scores[s, u] = np.mean(
          [_score_against(feats[key][u], [(features(c, key), exclusion(c)) for c in refs],
                          conf.topk_frac, conf.ref_agg, (h, w),
                          getattr(conf, "match_window", None)) for key in group], axis=0)
    new_mask = mask.copy()
    for u in range(b):
      if step_n_ref[s, u] > 0:  # a slot without references adds neither a vote nor a voter
        votes[u] += step_scores[s, u] > conf.mu
        voters[u] += 1
      new_mask[u] = _vote(conf, mask0[u], votes[u], voters[u])
    mask = new_mask
  mask = mask | padding

  # Fusion over the steps where the image had references; SeCLIP alone where it had none.
  wt = conf.fusion_weight
  has_ref = step_n_ref > 0  # (n_steps, B)
  seclip_only = ~has_ref.any(axis=0)  # (B,)
  fused = p_a.copy()  # (B, N)
  for u in range(b):
    used = [s for s in range(n_st) if has_ref[s, u]]
    if used:
      fused[u] = wt * p_a[u] + (1.0 - wt) * np.mean([step_scores[s, u] for s in used], axis=0)
  patch_map = fused.reshape(b, h, w)  # (B, h, w)
  reason = np.array([NO_CANDIDATES if n_candidates[u] == 0 else ALL_MASKED if seclip_only[u]
                     else "" for u in range(b)], dtype="<U13")  # (B,)

  # Upsample (bilinear, half-pixel centres) and smooth.
  size = int(image_size)
  wy, wx = bilinear_matrix(h, size), bilinear_matrix(w, size)  # (S, h), (S, w)
  maps = np.empty((b, size, size))
  for i in range(b):
    up = wy @ patch_map[i] @ wx.T  # (S, S)
    maps[i] = ndimage.gaussian_filter(up, sigma=conf.sigma, truncate=4.0, mode="reflect")

  peak = np.array([maps[u][content[u]].max() if content is not None else maps[u].max()
                   for u in range(b)])  # (B,)
  if conf.image_score == "mean":
    image_scores = (cls_score + peak) / 2
  elif conf.image_score == "max":
    image_scores = peak
  elif conf.image_score == "cls":
    image_scores = cls_score.copy()
  else:
    raise ValueError(f"image_score={conf.image_score!r}")

  return dict(cls_score=cls_score, seg_prob=seg_prob, mask0=mask0, step_scores=step_scores,
              masks=masks, final_mask=mask, votes=votes, voters=voters,
              n_candidates=n_candidates, step_n_ref=step_n_ref, n_ref=step_n_ref[0].copy(),
              seclip_only=seclip_only, reason=reason, patch_map=patch_map,
              anomaly_maps=maps, image_scores=image_scores)


STEP_AXIS_KEYS = ("step_scores", "masks", "step_n_ref")  # outputs whose image axis is axis 1


def rolling_stream(cls_embed, layer_tokens, proxy_patch_embed, text, conf, logit_scale,
                   image_size, window, grid=None):
  """Line streaming, scored naively ONE image at a time in stream order (DESIGN.md §5, rolling).

  cls_embed (T, D), layer_tokens (n_layers, T, 1+N, C), proxy_patch_embed (T, N, D) of a stream
  of T images; text (2, D); window K >= 0. Image t is scored alone (a batch of one) with candidates
  exactly images max(0, t-K) .. t-1, passed as valid external entries ("bank" mode) carrying the
  per-step masks each of them used when it was itself scored (stored here), nothing else.
  Returns the dict of detect_from_tower stacked over the stream: per-image keys (T, ...);
  step_scores, masks (n_steps, T, N) and step_n_ref (n_steps, T).
  """
  cls_embed = np.asarray(cls_embed, np.float64)
  layer_tokens = np.asarray(layer_tokens, np.float64)
  proxy_patch_embed = np.asarray(proxy_patch_embed, np.float64)
  n_t = cls_embed.shape[0]
  if n_t < 1 or int(window) < 0:
    raise ValueError(f"rolling_stream needs T >= 1 images and window >= 0 (T={n_t}, window={window})")
  n = layer_tokens.shape[2] - 1
  n_st = n_steps(conf)
  stored = []  # stored[j]: (n_steps, N) masks image j used at each step when it was scored
  outs = []
  for t in range(n_t):
    prev = list(range(max(0, t - int(window)), t))
    ext_masks = (np.stack([stored[j] for j in prev], axis=1) if prev
                 else np.zeros((n_st, 0, n), bool))  # (n_steps, len(prev), N)
    out = detect_from_tower(cls_embed[t:t + 1], layer_tokens[:, t:t + 1],
                            proxy_patch_embed[t:t + 1], text, np.ones(1, bool), conf,
                            logit_scale, image_size, grid, mode="bank",
                            bank_tokens=layer_tokens[:, prev], bank_valid=np.ones(len(prev), bool),
                            bank_masks=ext_masks)
    stored.append(out["masks"][:, 0].copy())
    outs.append(out)
  return {key: np.concatenate([o[key] for o in outs], axis=1 if key in STEP_AXIS_KEYS else 0)
          for key in outs[0]}


def top_up_batches(n, b, top_up=True):
  """A category of n images (positions 0..n-1 in scoring order) cut into batches of b slots
  (DESIGN.md §5, full benchmark batches): consecutive images; the short last batch's empty slots
  take, as reference-only slots, the first images of the category that are not in that batch
  (already scored), as many as there are; the rest is padding. top_up=False: padding only.

  Returns a list of (index (b,) int, -1 for padding; query (b,) bool; reference (b,) bool).
  """
  out = []
  for start in range(0, n, b):
    members = list(range(start, min(start + b, n)))
    index = members + [-1] * (b - len(members))
    query = [True] * len(members) + [False] * (b - len(members))
    reference = list(query)
    if top_up:
      others = [i for i in range(n) if i not in members]
      for slot in range(len(members), b):
        if others:
          index[slot], reference[slot] = others.pop(0), True
    out.append((np.array(index), np.array(query), np.array(reference)))
  return out


def seclip_only_counts(reasons):
  """Images scored by SeCLIP alone, by reason (DESIGN.md §5, no reference): reasons are the
  `reason` strings of detect_from_tower for the queries of a category."""
  reasons = list(reasons)
  return {"total": sum(r != "" for r in reasons), NO_CANDIDATES: reasons.count(NO_CANDIDATES),
          ALL_MASKED: reasons.count(ALL_MASKED)}
