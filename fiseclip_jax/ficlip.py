"""FiCLIP-AD (paper section 3.3): LNAMD aggregation, masked mutual scoring, mutual filtering.

Distances between unit vectors come from one matmul: d^2 = 2 - 2 F_u . F_v. Each unordered pair
(u, v) is computed once and reduced both ways (rows: u against v's kept patches; columns: v
against u's kept patches). Pairs are `vmap`ed in chunks under `lax.map`, so memory stays bounded
for large batches.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

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


def pair_min_distances(feats: Array, exclude: Array, pair_chunk: int = 8) -> Array:
  """All-pairs masked nearest-patch distances.

  feats (G, B, N, C) unit vectors (G feature maps scored together), exclude (B, N) bool.
  Returns d (G, B, B, N): d[g, u, v, p] = min over q with not exclude[v, q] of
  ||F_u(p) - F_v(q)||; inf on the diagonal and where v keeps no patch.
  """
  g, b, n, _ = feats.shape
  d = jnp.full((g, b, b, n), jnp.inf, jnp.float32)
  if b < 2:
    return d
  iu, iv = np.triu_indices(b, 1)                           # each unordered pair once
  p = len(iu)
  chunk = max(c for c in range(1, min(pair_chunk, p) + 1) if p % c == 0)   # divides p: no padding
  n_chunks = p // chunk
  pu, pv = iu.reshape(n_chunks, chunk), iv.reshape(n_chunks, chunk)

  def one_pair(u, v):
    fu, fv = feats[:, u], feats[:, v]                                       # (G, N, C)
    sim = jnp.einsum("gnc,gmc->gnm", fu, fv, preferred_element_type=jnp.float32)
    d2 = 2.0 - 2.0 * sim                                                    # (G, N, N)
    rows = jnp.min(jnp.where(exclude[v][None, None, :], jnp.inf, d2), axis=2)   # u vs v's kept
    cols = jnp.min(jnp.where(exclude[u][None, :, None], jnp.inf, d2), axis=1)   # v vs u's kept
    return jnp.sqrt(jnp.maximum(rows, 0.0)), jnp.sqrt(jnp.maximum(cols, 0.0))

  rows, cols = jax.lax.map(lambda uv: jax.vmap(one_pair)(*uv), (jnp.asarray(pu), jnp.asarray(pv)))
  rows = rows.reshape(p, g, n).transpose(1, 0, 2)                           # (G, P, N)
  cols = cols.reshape(p, g, n).transpose(1, 0, 2)
  d = d.at[:, iu, iv].set(rows)
  return d.at[:, iv, iu].set(cols)


def references(exclude: Array, valid: Array) -> Array:
  """(B, B) bool: v is a reference of u (v != u, v valid, v keeps at least one patch)."""
  b = valid.shape[0]
  usable = valid & ~jnp.all(exclude, axis=-1)
  return usable[None, :] & ~jnp.eye(b, dtype=bool)


def aggregate(d: Array, refs: Array, topk_frac: float, agg: str) -> Tuple[Array, Array]:
  """Per-layer scores over references: d (G, B, B, N), refs (B, B) -> ((G, B, N), n_ref (B,)).

  "interval" (MuSc): mean of the k smallest d_uv(p) over references, k = max(1, floor(frac * n_ref));
  "min": the smallest. Images with no reference score 0.
  """
  n_ref = refs.sum(axis=1)                                                   # (B,)
  d = jnp.where(refs[None, :, :, None], d, jnp.inf)
  if agg == "min":
    s = d.min(axis=2)
  else:
    k = jnp.maximum(1, jnp.floor(topk_frac * n_ref.astype(jnp.float32) + 1e-6).astype(jnp.int32))
    ds = jnp.sort(d, axis=2)                                                 # refs ascending
    first_k = jnp.arange(d.shape[2])[None, :, None] < k[:, None, None]      # (B, B, 1)
    s = jnp.where(first_k[None], ds, 0.0).sum(axis=2) / k[None, :, None]
  return jnp.where(n_ref[None, :, None] > 0, s, 0.0), n_ref


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


class FilterResult(NamedTuple):
  step_scores: Array   # (n_steps, B, N) mean masked score of each step's feature maps
  masks: Array         # (n_steps, B, N) exclusion mask used by each step
  final_mask: Array    # (B, N) mask after the last vote
  n_ref: Array         # (n_steps, B) references per image at each step


def vote(votes: Array, voters: Array, mask0: Array, rule: str) -> Array:
  """The refined exclusion mask from vote counts (B, N) and the number of voters."""
  if rule == "majority":
    return votes * 2 > voters            # strict: ties count as normal
  if rule == "and":
    return votes == voters
  if rule == "or":
    return votes > 0
  if rule == "text":
    return mask0
  return jnp.zeros_like(mask0)           # "off"


def mutual_filtering(steps: Array, mask0: Array, valid: Array, *, mu: float, rule: str,
                     topk_frac: float, agg: str, pair_chunk: int = 8) -> FilterResult:
  """Algorithm 1 as a `lax.scan` over filtering steps.

  steps (S, G, B, N, C): the feature maps of each step (G maps averaged per step). The mask used
  by a step is the one before its vote; the step's mean score, thresholded at mu, is one more
  vote. An image without references scores 0 and casts no vote.
  """
  m_start = jnp.zeros_like(mask0) if rule == "off" else mask0

  def step(carry, group):
    mask, votes, voters = carry
    refs = references(mask, valid)
    s, n_ref = aggregate(pair_min_distances(group, mask, pair_chunk), refs, topk_frac, agg)
    a = s.mean(axis=0)                                                       # (B, N)
    inter = (a > mu) & (n_ref > 0)[:, None]
    votes, voters = votes + inter.astype(jnp.int32), voters + 1
    new_mask = vote(votes, voters, mask0, rule)
    return (new_mask, votes, voters), (a, mask, n_ref)

  init = (m_start, mask0.astype(jnp.int32), jnp.int32(1))
  (final, _, _), (scores, masks, n_ref) = jax.lax.scan(step, init, steps)
  return FilterResult(scores, masks, final, n_ref)


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
