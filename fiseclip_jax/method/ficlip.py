"""FiCLIP-AD (paper section 3.3): LNAMD aggregation, masked mutual scoring, mutual filtering.

Distances come from one matmul per pair: d^2 = |F_u|^2 + |F_v|^2 - 2 F_u . F_v (DESIGN.md §4).
Each unordered pair (u, v) of a batch is computed once and reduced both ways (rows: u against v's
kept patches; columns: v against u's kept patches); external references (a bank, a ring buffer)
are reduced one way. Pairs are `vmap`ed in chunks under `lax.map`, so memory stays bounded for
large batches. Who is a reference of whom is data (DESIGN.md §5).
"""
from __future__ import annotations

import fractions

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax.core.rules import VOTE_RULES
from fiseclip_jax.method import window as window_lib
from fiseclip_jax.method.references import External

Array = jax.Array


def lnamd(tokens: Array, r: int) -> Array:
  """(B, h, w, C) patch tokens -> (B, h*w, C) unit vectors, as MuSc's LNAMD.

  Per image LayerNorm over (h, w, C) jointly (no affine, eps 1e-5); r x r mean, stride 1, zero
  padding counted in the mean; L2 per patch.
  """
  x = tokens.astype(jnp.float32)
  b, h, w, c = x.shape
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(var + 1e-5)
  if r > 1:   # separable r x r box sum (two 1-D windows: same sums, cheaper than one 2-D window)
    pad = (r - 1) // 2
    for window, padding in (((1, r, 1, 1), ((0, 0), (pad, pad), (0, 0), (0, 0))),
                            ((1, 1, r, 1), ((0, 0), (0, 0), (pad, pad), (0, 0)))):
      x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), padding)
    x = x / (r * r)
  x = x.reshape(b, h * w, c)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sq_norms(x: Array) -> Array:
  """Squared L2 norms in float32 of the vectors as they enter the matmul (bf16-rounded ones in bf16)."""
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=-1)


def _sq_dists(fu: Array, fv: Array, nu: Array, nv: Array) -> Array:
  """(G, N, C), (G, M, C) with their squared norms (G, N), (G, M) -> (G, N, M) squared distances.

  |a|^2 + |b|^2 - 2 a.b (DESIGN.md §4): exact for the vectors the matmul sees, where 2 - 2 a.b
  would assume exact unit vectors and err by up to 0.06 between identical bf16 vectors.
  """
  sim = jnp.einsum("gnc,gmc->gnm", fu, fv, preferred_element_type=jnp.float32)
  return nu[:, :, None] + nv[:, None, :] - 2.0 * sim


def _divisor_chunk(n: int, most: int) -> int:
  """The largest chunk <= most that divides n: whole chunks, no padded work."""
  return max(c for c in range(1, min(most, n) + 1) if n % c == 0)


def windowed(grid: Optional[Tuple[int, int]], match_window: Optional[int]) -> bool:
  """Whether matching is restricted: a window that does not cover the whole grid."""
  return window_lib.strategy(grid, match_window) != "all"


def _far(how: str, grid, match_window) -> Optional[Array]:
  """(N, N) bool of the pairs a "masked" window leaves out; None otherwise."""
  if how != "masked":
    return None
  return jnp.asarray(~window_lib.near_matrix(tuple(grid), int(match_window)))


def pair_min_distances(feats: Array, exclude: Array, pair_chunk: int = 8,
                       grid: Optional[Tuple[int, int]] = None,
                       match_window: Optional[int] = None) -> Array:
  """All-pairs masked nearest-patch distances within a batch.

  feats (G, B, N, C) (G feature maps scored together), exclude (B, N) bool.
  Returns d (G, B, B, N): d[g, u, v, p] = min over q with not exclude[v, q] of
  ||F_u(p) - F_v(q)||; inf on the diagonal and where v keeps no patch. With match_window w (and
  the (h, w) grid of N), q ranges over v's patches within w cells of p (`method/window.py`).
  """
  g, b, n, _ = feats.shape
  d = jnp.full((g, b, b, n), jnp.inf, jnp.float32)
  if b < 2:
    return d
  norms = sq_norms(feats)                                                   # (G, B, N)
  iu, iv = np.triu_indices(b, 1)                           # each unordered pair once
  p = len(iu)
  chunk = _divisor_chunk(p, pair_chunk)
  pu, pv = iu.reshape(p // chunk, chunk), iv.reshape(p // chunk, chunk)

  how = window_lib.strategy(grid, match_window)
  far = _far(how, grid, match_window)

  def one_pair(u, v):
    if how == "tiled":
      return window_lib.pair_distances(feats[:, u], feats[:, v], norms[:, u], norms[:, v],
                                       exclude[u], exclude[v], grid, match_window)
    d2 = _sq_dists(feats[:, u], feats[:, v], norms[:, u], norms[:, v])      # (G, N, N)
    if far is not None:
      d2 = jnp.where(far[None], jnp.inf, d2)
    rows = jnp.min(jnp.where(exclude[v][None, None, :], jnp.inf, d2), axis=2)   # u vs v's kept
    cols = jnp.min(jnp.where(exclude[u][None, :, None], jnp.inf, d2), axis=1)   # v vs u's kept
    return jnp.sqrt(jnp.maximum(rows, 0.0)), jnp.sqrt(jnp.maximum(cols, 0.0))

  rows, cols = jax.lax.map(lambda uv: jax.vmap(one_pair)(*uv), (jnp.asarray(pu), jnp.asarray(pv)))
  rows = rows.reshape(p, g, n).transpose(1, 0, 2)                           # (G, P, N)
  cols = cols.reshape(p, g, n).transpose(1, 0, 2)
  d = d.at[:, iu, iv].set(rows)
  return d.at[:, iv, iu].set(cols)


def external_min_distances(feats: Array, ext_feats: Array, ext_exclude: Array,
                           pair_chunk: int = 8, grid: Optional[Tuple[int, int]] = None,
                           match_window: Optional[int] = None) -> Array:
  """Masked nearest-patch distances from batch slots to external references (a bank, a ring).

  feats (G, B, N, C), ext_feats (G, K, M, C), ext_exclude (K, M) bool -> d (G, B, K, N):
  d[g, u, k, p] = min over q with not ext_exclude[k, q] of ||F_u(p) - E_k(q)||; inf where k keeps
  nothing. One direction only: external entries are never scored. match_window as in
  `pair_min_distances` (an external entry has the batch's grid).
  """
  g, b, n, _ = feats.shape
  k = ext_feats.shape[1]
  norms, ext_norms = sq_norms(feats), sq_norms(ext_feats)                   # (G, B, N), (G, K, M)
  p = b * k
  chunk = _divisor_chunk(p, pair_chunk)
  pu = np.repeat(np.arange(b), k).reshape(p // chunk, chunk)
  pk = np.tile(np.arange(k), b).reshape(p // chunk, chunk)

  how = window_lib.strategy(grid, match_window)
  far = _far(how, grid, match_window)

  def one_pair(u, e):
    if how == "tiled":
      return window_lib.pair_distances(feats[:, u], ext_feats[:, e], norms[:, u],
                                       ext_norms[:, e], jnp.zeros((n,), bool), ext_exclude[e],
                                       grid, match_window, both=False)
    d2 = _sq_dists(feats[:, u], ext_feats[:, e], norms[:, u], ext_norms[:, e])   # (G, N, M)
    if far is not None:
      d2 = jnp.where(far[None], jnp.inf, d2)
    rows = jnp.min(jnp.where(ext_exclude[e][None, None, :], jnp.inf, d2), axis=2)
    return jnp.sqrt(jnp.maximum(rows, 0.0))

  rows = jax.lax.map(lambda ue: jax.vmap(one_pair)(*ue), (jnp.asarray(pu), jnp.asarray(pk)))
  return rows.reshape(b, k, g, n).transpose(2, 0, 1, 3)                     # (G, B, K, N)


def references(exclude: Array, valid: Array) -> Array:
  """(B, B) bool: v is a reference of u in the paper's batch mode (v != u, v valid, v keeps a patch)."""
  b = valid.shape[0]
  usable = valid & ~jnp.all(exclude, axis=-1)
  return usable[None, :] & ~jnp.eye(b, dtype=bool)


def topk_fraction(topk_frac: float) -> fractions.Fraction:
  """topk_frac as the decimal fraction it is written as (its shortest repr): 0.3 = 3/10,
  1/3 = 3333333333333333/10^16 (DESIGN.md §4)."""
  return fractions.Fraction(str(float(topk_frac)))


def topk_table(topk_frac: float, n_max: int) -> np.ndarray:
  """k for every reference count 0..n_max (n_max + 1,) int32, in exact integers on the host."""
  frac = topk_fraction(topk_frac)
  return np.array([max(1, (frac.numerator * n) // frac.denominator) for n in range(n_max + 1)],
                  np.int32)


def topk_count(n_ref: Array, topk_frac: float, n_max: int) -> Array:
  """k = max(1, floor(topk_frac * n_ref)) for reference counts n_ref in 0..n_max, exact.

  Small fractions (num * n_max fits in int32: 0.3, 0.25) are computed in int32 on the device;
  others (1/3 as a float) are a lookup in the host's exact table, never rounded.
  """
  frac = topk_fraction(topk_frac)
  if frac.numerator * max(n_max, 1) < 2 ** 31:
    return jnp.maximum(1, (n_ref.astype(jnp.int32) * frac.numerator) // frac.denominator)
  return jnp.asarray(topk_table(topk_frac, n_max))[n_ref.astype(jnp.int32)]


def aggregate(d: Array, refs: Array, topk_frac: float, agg: str,
              per_patch: bool = False) -> Tuple[Array, Array]:
  """Per-map scores over references: d (G, B, R, N), refs (B, R) -> ((G, B, N), n_ref (B,)).

  "interval" (MuSc): mean of the k smallest d_uv(p) over references, k = topk_count(n_ref);
  "min": the smallest. Images with no reference score 0 (callers check n_ref). per_patch (a
  match window, DESIGN.md §4): a reference counts at p only where its d is finite (it keeps a
  patch in p's window), k from that count, 0 where none counts.
  """
  n_ref = refs.sum(axis=1).astype(jnp.int32)                                # (B,)
  d = jnp.where(refs[None, :, :, None], d, jnp.inf)
  count = (jnp.isfinite(d).sum(axis=2).astype(jnp.int32) if per_patch       # (G, B, N)
           else n_ref[None, :, None])                                        # (1, B, 1)
  if agg == "min":
    s = d.min(axis=2)
  else:
    k = topk_count(count, topk_frac, d.shape[2])
    ds = jnp.sort(d, axis=2)                                                 # refs ascending
    first_k = jnp.arange(d.shape[2])[None, None, :, None] < k[:, :, None]    # (G|1, B, R, N|1)
    s = jnp.where(first_k, ds, 0.0).sum(axis=2) / k
  return jnp.where(count > 0, s, 0.0), n_ref


def mutual_scores(feats: Array, exclude: Array, valid: Array, topk_frac: float = 0.3,
                  agg: str = "interval", pair_chunk: int = 8) -> Array:
  """Masked mutual scoring of one feature map: (B, N, C), (B, N), (B,) -> (B, N).

  With nothing excluded and every slot valid this is MuSc's MSM (topmin_min=0, topmin_max=0.3).
  """
  exclude = jnp.asarray(exclude, bool)
  valid = jnp.asarray(valid, bool)
  d = pair_min_distances(jnp.asarray(feats)[None], exclude, pair_chunk)
  scores, _ = aggregate(d, references(exclude, valid), topk_frac, agg)
  return scores[0]


def blocked_scores(q_steps: Array, q_step, r_steps: Array, r_step, r_exclude: Array,
                   cands: Array, block: int, *,
                   topk_frac: float, agg: str, pair_chunk: int = 8,
                   grid: Optional[Tuple[int, int]] = None, match_window: Optional[int] = None,
                   ext_feats: Optional[Array] = None, ext_exclude: Optional[Array] = None,
                   ext_cands: Optional[Array] = None) -> Tuple[Array, Array]:
  """`aggregate` over every candidate reference, computed in blocks (DESIGN.md §5, category).

  q_steps (S, G, B, N, C) queries and r_steps (S', G, R, N, C) references at every step, of which
  steps q_step and r_step are scored (sliced block by block, never copied whole); r_exclude (R, N) the
  references' masks; cands (B, R) bool; B and R multiples of `block`. Optional external references
  ext_feats (G, K, M, C), ext_exclude (K, M), ext_cands (B, K). Returns (s (G, B, N), n_ref (B,)),
  the same as `aggregate` over all distances at once: each block of `block` queries gathers its
  distances to every reference, block by block of references, before its exact aggregate, so
  memory holds one query block's (G, block, R + K, N) distances and one reference block's pair
  work, never (B, R) pairs. A reference block with no candidate of the query block is skipped
  (`lax.cond`: padding blocks cost nothing), as is a query block with none at all.
  """
  _, g, b, n, _ = q_steps.shape
  r = r_steps.shape[2]
  if b % block or r % block:
    raise ValueError(f"blocked_scores: {b} queries and {r} references must be multiples of the "
                     f"block {block}")
  per_patch = windowed(grid, match_window)
  slice_ = lambda x, i, axis: jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)
  at_step = lambda x, step, i: jax.lax.dynamic_index_in_dim(slice_(x, i, 2), step, 0,
                                                            keepdims=False)

  def query_block(i):
    qf, qc = at_step(q_steps, q_step, i), slice_(cands, i, 0)                      # (G, bq, N, C), (bq, R)
    qe = None if ext_cands is None else slice_(ext_cands, i, 0)             # (bq, K)

    def ref_block(j):
      c = slice_(qc, j, 1)                                                  # (bq, br)
      return jax.lax.cond(
          c.any(),
          lambda: external_min_distances(qf, at_step(r_steps, r_step, j),
                                         slice_(r_exclude, j, 0),
                                         pair_chunk, grid, match_window),
          lambda: jnp.full((g, block, block, n), jnp.inf, jnp.float32))     # (G, bq, br, N)

    def scores():
      d = jax.lax.map(ref_block, jnp.arange(r // block))                    # (Rb, G, bq, br, N)
      d = d.transpose(1, 2, 0, 3, 4).reshape(g, block, r, n)                # (G, bq, R, N)
      c = qc
      if ext_feats is not None:
        d = jnp.concatenate([d, external_min_distances(qf, ext_feats, ext_exclude, pair_chunk,
                                                       grid, match_window)], axis=2)
        c = jnp.concatenate([qc, qe], axis=1)
      return aggregate(d, c, topk_frac, agg, per_patch)

    anything = qc.any() if qe is None else qc.any() | qe.any()
    return jax.lax.cond(anything, scores, lambda: (jnp.zeros((g, block, n), jnp.float32),
                                                   jnp.zeros((block,), jnp.int32)))

  s, n_ref = jax.lax.map(query_block, jnp.arange(b // block))              # (Qb, G, bq, N), (Qb, bq)
  return s.transpose(1, 0, 2, 3).reshape(g, b, n), n_ref.reshape(b)


class FilterResult(NamedTuple):
  step_scores: Array   # (n_steps, B, N) mean masked score of each step's feature maps (0 without reference)
  masks: Array         # (n_steps, B, N) exclusion mask used by each step
  final_mask: Array    # (B, N) mask after the last vote
  n_ref: Array         # (n_steps, B) references per image at each step


def mutual_filtering(steps: Array, mask0: Array, batch_refs: Array, *, mu: float, rule: str,
                     topk_frac: float, agg: str, pair_chunk: int = 8,
                     external: Optional[External] = None, ext_refs: Optional[Array] = None,
                     batch_pairs: bool = True, grid: Optional[Tuple[int, int]] = None,
                     match_window: Optional[int] = None,
                     padding: Optional[Array] = None, block: Optional[int] = None,
                     gather: Optional[Callable[[Array, int], Array]] = None) -> FilterResult:
  """Algorithm 1 as a `lax.scan` over filtering steps (DESIGN.md §5, §6).

  steps (S, G, B, N, C): the feature maps of each step (G maps averaged per step); mask0 (B, N);
  batch_refs (B, B) bool: v is a candidate reference of u; external (optional) with ext_refs
  (B, K) bool: entry k is a candidate of u. A candidate is a reference at a step when it keeps a
  patch under its mask of that step. The mask a step uses is the one before its own vote; an image
  with references adds one vote (`a > mu`) and one voter, an image without adds neither; `rule`
  names an entry of `rules.VOTE_RULES`.
  batch_pairs=False skips the batch's pair distances (no batch candidates: bank-only scoring).
  match_window (with the (h, w) grid of N): aligned matching, `pair_min_distances`.
  padding (B, N) bool: letterbox padding, excluded from every step's mask whatever the votes.
  block (whole-category references): the batch's pairs in blocks of `block` (`blocked_scores`);
  gather(x, axis), with block, makes the references of every device from this device's slots
  (an all-gather over the mesh; batch_refs is then (B, R), R the slots of all devices).
  """
  vote = VOTE_RULES[rule]
  keep_out = (lambda m: m) if padding is None else (lambda m: m | padding)
  b = mask0.shape[0]
  # In blocks, a step's features are sliced from `steps` block by block (scanning them would copy
  # each step whole); at once, the step's maps are scanned.
  xs = (jnp.arange(steps.shape[0]) if block else steps,)
  if external is not None:
    xs += (external.feats, external.masks)

  per_patch = windowed(grid, match_window)

  def blocked(step_index, mask, x):
    """The step's scores (G, B, N) and n_ref over the whole batch (and the mesh), in blocks."""
    if gather is None:
      r_steps, r_step, r_mask = steps, step_index, mask
    else:   # every device's slots of this step, once
      r_steps, r_step, r_mask = gather(steps[step_index], 1)[None], 0, gather(mask, 0)
    ext = {}
    if external is not None:
      ext = dict(ext_feats=x[1], ext_exclude=x[2],
                 ext_cands=ext_refs & ~jnp.all(x[2], axis=-1)[None, :])
    return blocked_scores(steps, step_index, r_steps, r_step, r_mask,
                          batch_refs & ~jnp.all(r_mask, axis=-1)[None, :], block,
                          topk_frac=topk_frac, agg=agg, pair_chunk=pair_chunk, grid=grid,
                          match_window=match_window, **ext)

  def at_once(group, mask, x):
    """The step's scores (G, B, N) and n_ref from every pair's distances at once."""
    ds, cands = [], []
    if batch_pairs:
      ds.append(pair_min_distances(group, mask, pair_chunk, grid, match_window))  # (G, B, B, N)
      cands.append(batch_refs & ~jnp.all(mask, axis=-1)[None, :])
    if external is not None:
      ext_feats, ext_mask = x[1], x[2]
      ds.append(external_min_distances(group, ext_feats, ext_mask, pair_chunk, grid,
                                       match_window))                        # (G, B, K, N)
      cands.append(ext_refs & ~jnp.all(ext_mask, axis=-1)[None, :])
    if not ds:
      return jnp.zeros((1,) + mask.shape, jnp.float32), jnp.zeros((b,), jnp.int32)
    return aggregate(jnp.concatenate(ds, axis=2), jnp.concatenate(cands, axis=1), topk_frac, agg,
                     per_patch=per_patch)

  def step(carry, x):
    mask, votes, voters = carry
    mask = keep_out(mask)
    s, n_ref = (blocked if block else at_once)(x[0], mask, x)
    a = s.mean(axis=0)                                                       # (B, N)
    has_ref = n_ref > 0
    votes = votes + ((a > mu) & has_ref[:, None]).astype(jnp.int32)
    voters = voters + has_ref.astype(jnp.int32)
    new_mask = vote.refine(votes, voters[:, None], mask0)
    return (new_mask, votes, voters), (a, mask, n_ref)

  init = (vote.start(mask0), mask0.astype(jnp.int32), jnp.ones((b,), jnp.int32))
  (final, _, _), (scores, masks, n_ref) = jax.lax.scan(step, init, xs)
  return FilterResult(scores, masks, keep_out(final), n_ref)


def feature_steps(layer_tokens: Array, grid: Tuple[int, int], r_list: Tuple[int, ...],
                  loop: str) -> Array:
  """LNAMD maps of every (layer, r), arranged as filtering steps (S, G, B, N, C).

  layer_tokens (n_layers, B, 1 + h*w, C), CLS first. loop "r": one step per r (group: layers);
  "layer": one step per layer (group: r values); "flat": one step per (r, layer).
  """
  n_layers, b, _, c = layer_tokens.shape
  h, w = grid
  patches = layer_tokens[:, :, 1:].reshape(n_layers, b, h, w, c)
  maps = jnp.stack([jax.vmap(lnamd, (0, None))(patches, r) for r in r_list])  # (R, L, B, N, C)
  if loop == "r":
    return maps
  if loop == "layer":
    return maps.transpose(1, 0, 2, 3, 4)
  return maps.reshape(len(r_list) * n_layers, 1, b, h * w, c)


def lnamd_flops(b: int, n: int, c: int, r_list, n_layers: int) -> float:
  """Element-wise work of every LNAMD map of a batch (approximate: LayerNorm ~8 per value, the
  r x r window r^2)."""
  return b * n * c * sum(8.0 + r * r for r in r_list) * n_layers


def matching_flops(b: int, n: int, c: int, n_maps: int, n_external: int = 0,
                   batch_pairs: bool = True, grid: Optional[Tuple[int, int]] = None,
                   match_window: Optional[int] = None) -> float:
  """One N x N x C matmul per pair and map: each unordered batch pair once, each (slot, external
  reference) pair once, over all filtering steps. With a match window, each tile's patches
  against its region's (`method/window.py`; the padding of the tiles is computed too)."""
  pairs = (b * (b - 1) / 2 if batch_pairs else 0) + b * n_external
  if window_lib.strategy(grid, match_window) == "tiled":
    return pairs * n_maps * 2.0 * window_lib.compared_positions(grid, match_window) * c
  return pairs * n_maps * 2.0 * n * n * c
