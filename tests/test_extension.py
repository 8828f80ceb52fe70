"""Towers from outside the package: defined here, registered through the public call, run by the
method unchanged (detect, build_bank, streams, the sharded round), editing no file of the package.

Two toy towers, written for this test (not copies of the package's):
  * `PatchMLP`: patches -> tokens, then residual tanh-MLP blocks; no text (a FiCLIP tower, like
    DINOv2).
  * `ToyCLIP`: a text-aligned tower: patch tokens through single-head-per-split attention blocks
    whose q/k/v and output projection it exposes as SeCLIP's hooks, a bag-of-bytes text encoder,
    its own tokenizer and logit scale.
The method's results on them must equal the independent NumPy reference (tests/numpy_reference.py)
fed with the towers' own outputs (tolerance 1e-4 as in test_pipeline.py: float32 against float64).
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
import numpy_reference as ref
from fiseclip_jax.run import sharding

TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class PatchMLPConfig:
  patch_size: int = 8
  width: int = 16
  depth: int = 3
  text_aligned: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class PatchMLP(fj.Tower):
  cfg: PatchMLPConfig
  name = "test_patch_mlp"
  config_type = PatchMLPConfig
  mean = (0.5, 0.5, 0.5)
  std = (0.25, 0.25, 0.25)

  def init_params(self, seed=0):
    c = self.cfg
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"embed": jax.random.normal(k1, (c.patch_size ** 2 * 3, c.width)) * 0.2,
            "blocks": jax.random.normal(k2, (c.depth, c.width, c.width)) * c.width ** -0.5}

  def forward(self, params, x, layers, compute_dtype, attention_impl):
    b, h, w, _ = x.shape
    p = self.patch_size
    x = x.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * 3)
    t = x @ params["embed"]                                       # (B, N, W)
    t = jnp.concatenate([t.mean(1, keepdims=True), t], axis=1)    # a CLS-like first token
    seen = {0: t}
    for i in range(self.depth):
      t = t + jnp.tanh(t @ params["blocks"][i])
      seen[i + 1] = t
    return fj.Encoded({i: seen[i] for i in layers}, None)

  def flops(self, image_size):
    n = (image_size // self.patch_size) ** 2
    return 2.0 * n * (self.patch_size ** 2 * 3 + self.depth * self.width) * self.width


@dataclasses.dataclass(frozen=True)
class ToyCLIPConfig:
  patch_size: int = 8
  width: int = 16
  depth: int = 3
  heads: int = 2
  embed_dim: int = 8
  text_aligned: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class ToyCLIP(fj.TextAlignedTower):
  cfg: ToyCLIPConfig
  name = "test_toy_clip"
  config_type = ToyCLIPConfig
  mean = (0.4, 0.45, 0.5)
  std = (0.3, 0.3, 0.3)

  def init_params(self, seed=0):
    c = self.cfg
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    n = lambda shape, s: jax.random.normal(next(ks), shape) * s
    return {"embed": n((c.patch_size ** 2 * 3, c.width), 0.2),
            "qkv": n((c.depth, 3, c.width, c.width), c.width ** -0.5),
            "out": n((c.depth, c.width, c.width), c.width ** -0.5),
            "proj": n((c.width, c.embed_dim), c.width ** -0.5),
            "bytes": n((256, c.embed_dim), 1.0), "scale": jnp.asarray(50.0)}

  def _split(self, y):
    return y.reshape(*y.shape[:-1], self.cfg.heads, self.width // self.cfg.heads)

  def block_qkv(self, params, block, x, compute_dtype="float32"):
    w = params["qkv"][block - 1]
    return tuple(self._split(x @ w[j]) for j in range(3))

  def block_out(self, params, block, heads, compute_dtype="float32"):
    return heads.reshape(*heads.shape[:-2], self.width) @ params["out"][block - 1]

  def embed_tokens(self, params, tokens, compute_dtype="float32"):
    return tokens @ params["proj"]

  def forward(self, params, x, layers, compute_dtype, attention_impl):
    b, h, w, _ = x.shape
    p = self.patch_size
    x = x.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * 3)
    t = x @ params["embed"]
    t = jnp.concatenate([t.mean(1, keepdims=True), t], axis=1)    # (B, 1 + N, W)
    seen = {0: t}
    for i in range(1, self.depth + 1):
      q, k, v = self.block_qkv(params, i, t)
      a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]), axis=-1)
      t = t + self.block_out(params, i, jnp.einsum("bhts,bshd->bthd", a, v))
      seen[i] = t
    return fj.Encoded({i: seen[i] for i in layers}, self.embed_tokens(params, t[:, 0]))

  def flops(self, image_size):
    return 1.0

  def tokenize(self, texts):
    ids = np.zeros((len(texts), 24), np.int32)
    for i, s in enumerate(texts):
      raw = s.encode()[:24]
      ids[i, :len(raw)] = list(raw)
    return ids

  def encode_text(self, params, ids, compute_dtype="float32"):
    ids = jnp.asarray(ids)
    mask = (ids > 0)[..., None]
    return (params["bytes"][ids] * mask).sum(1) / jnp.maximum(mask.sum(1), 1)

  def logit_scale(self, params):
    return params["scale"]


fj.register_tower(PatchMLP)
fj.register_tower(ToyCLIP)

S = 48                                               # a 6 x 6 patch grid
CONF = fj.FiSeConfig(image_size=S, feature_layers=(1, 2, 3), proxy_layer=2, lam=1.0, mu=0.3)
TEXT_CFG, FI_CFG = ToyCLIPConfig(), PatchMLPConfig()


@pytest.fixture(scope="module")
def setup():
  rng = np.random.RandomState(0)
  images = rng.rand(5, S, S, 3).astype(np.float32)
  images[1] = np.clip(images[0] + 0.05 * rng.randn(S, S, 3), 0, 1)
  params, fi_params = fj.init_params(TEXT_CFG, 1), fj.init_params(FI_CFG, 2)
  text = fj.text_features(params, TEXT_CFG, "widget", CONF)
  return images, params, fi_params, text


def numpy_reference(params, images, text, conf, valid, fi=None, **kw):
  """The reference fed with the towers' own outputs (fi: FiCLIP's tower and params)."""
  feats = fj.encode_image(params, TEXT_CFG, images, conf.feature_layers, conf.proxy_layer)
  tokens = feats.layer_tokens
  if fi is not None:
    tokens = fj.encode_image(fi[1], fi[0], images, conf.feature_layers).layer_tokens
  return ref.detect_from_tower(np.asarray(feats.cls_embed), np.asarray(tokens),
                               np.asarray(feats.proxy_patch_embed), np.asarray(text), valid, conf,
                               50.0, S, **kw)


def assert_close(out, want, keys=("image_scores", "anomaly_maps", "patch_map", "step_scores")):
  np.testing.assert_array_equal(np.asarray(out.masks), want["masks"])
  for key in keys:
    err = np.abs(np.asarray(getattr(out, key), np.float64) - want[key]).max()
    assert err < TOL, (key, err)


def test_registered_configs_build_the_towers():
  assert isinstance(fj.tower_for(TEXT_CFG), ToyCLIP) and isinstance(fj.tower_for(FI_CFG), PatchMLP)
  spec = fj.make_spec(TEXT_CFG, CONF, FI_CFG)
  assert spec.text == ToyCLIP(TEXT_CFG) and spec.fi == PatchMLP(FI_CFG)


def test_detect_with_a_text_aligned_tower_of_our_own(setup):
  images, params, _, text = setup
  valid = np.ones(5, bool)
  out = fj.detect(params, TEXT_CFG, CONF, images, valid, text)
  assert_close(out, numpy_reference(params, images, text, CONF, valid))
  assert np.asarray(out.mask0).any() and not np.asarray(out.mask0).all()   # M0 matters


def test_detect_with_a_fiCLIP_tower_of_our_own_beside_it(setup):
  images, params, fi_params, text = setup
  valid = np.ones(5, bool)
  out = fj.detect(params, TEXT_CFG, CONF, images, valid, text, fi_params=fi_params, fi_cfg=FI_CFG)
  assert_close(out, numpy_reference(params, images, text, CONF, valid, (FI_CFG, fi_params)))
  alone = fj.detect(fi_params, FI_CFG, CONF, images, valid, None)          # FiCLIP only
  assert np.isfinite(np.asarray(alone.image_scores)).all() and not np.asarray(alone.cls_score).any()


def bank_case(setup, conf):
  """(detect, the reference) of images[:3] against a bank of images[3:] under conf (references
  "both"), FiCLIP's tower beside CLIP."""
  images, params, fi_params, text = setup
  bank = fj.build_bank(params, TEXT_CFG, conf, images[3:], fi_params=fi_params, fi_cfg=FI_CFG)
  out = fj.detect(params, TEXT_CFG, conf, images[:3], np.ones(3, bool), text, bank,
                  fi_params=fi_params, fi_cfg=FI_CFG)
  bank_tokens = fj.encode_image(fi_params, FI_CFG, images[3:], conf.feature_layers).layer_tokens
  want = numpy_reference(params, images[:3], text, conf, np.ones(3, bool), (FI_CFG, fi_params),
                         mode="both", bank_tokens=np.asarray(bank_tokens))
  return out, want


def test_bank_and_stream_with_our_towers(setup):
  images, params, _, text = setup
  out, want = bank_case(setup, CONF.replace(references="both"))
  assert_close(out, want)
  np.testing.assert_array_equal(np.asarray(out.n_candidates), [4, 4, 4])
  stream = CONF.replace(stream_window=2)
  ring = fj.empty_stream(TEXT_CFG, stream)
  roles = fj.make_roles(np.ones(3, bool), np.ones(3, bool), np.arange(3))
  res, ring = fj.score_stream(params, TEXT_CFG, stream, images[:3], roles, text, ring)
  np.testing.assert_array_equal(np.asarray(res.n_candidates), [0, 1, 2])


def test_sharded_round_with_our_towers(setup):
  images, params, fi_params, text = setup
  mesh = sharding.make_mesh()
  n = mesh.devices.size
  model = fj.Model.of(sharding.replicate(params, mesh), TEXT_CFG,
                      sharding.replicate(fi_params, mesh), FI_CFG)
  batch = np.stack([images[:4]] * n)
  out = sharding.detect_round(mesh, model, CONF, batch, np.ones((n, 4), bool), text)
  alone = fj.detect(params, TEXT_CFG, CONF, images[:4], np.ones(4, bool), text, fi_params=fi_params,
                    fi_cfg=FI_CFG)
  np.testing.assert_allclose(np.asarray(out.image_scores)[0], np.asarray(alone.image_scores),
                             atol=1e-6)


def test_a_bank_is_bound_to_its_tower(setup):
  """A bank of FiCLIP's PatchMLP features cannot serve a scorer that matches ToyCLIP's."""
  images, params, fi_params, text = setup
  conf = CONF.replace(references="bank")
  bank = fj.build_bank(params, TEXT_CFG, conf, images[3:], fi_params=fi_params, fi_cfg=FI_CFG)
  with pytest.raises(ValueError, match="tower"):
    fj.detect(params, TEXT_CFG, conf, images[:3], np.ones(3, bool), text, bank)
