"""weights.convert: every supported source layout gives the same params; bad files fail clearly.

One random transformers CLIPModel (vision width 128 / 2 heads, text width 64 / 1 head, so the
OpenAI layout's inferred heads = width // 64 agree) is written in every layout the converter reads.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fiseclip_jax as fj
from conftest import make_hf_clip
from fiseclip_jax.convert.header import flatten, read_metadata, sha256_file
from fiseclip_jax.convert import sources as conv

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Writing the same weights in every layout.


def hf_to_flax_tree(sd) -> dict:
  """transformers-Flax (`FlaxCLIPModel`) params tree from a torch CLIPModel state dict."""
  tree: dict = {}
  for key, t in sd.items():
    if key.endswith("position_ids"):
      continue
    a = t.detach().numpy()
    *path, leaf = key.split(".")
    if leaf == "weight":
      if a.ndim == 4:                                       # conv OIHW -> HWIO
        leaf, a = "kernel", a.transpose(2, 3, 1, 0)
      elif path[-1].endswith("embedding"):                  # nn.Embed
        leaf = "embedding"
      elif a.ndim == 2:                                     # Dense (out, in) -> (in, out)
        leaf, a = "kernel", a.T
      else:                                                 # LayerNorm
        leaf = "scale"
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(a)
  return tree


def hf_to_openai(sd, extras=True) -> dict:
  """OpenAI CLIP state dict (torch tensors) holding the same weights as a HF CLIPModel's."""
  sd = {k: v.detach().clone() for k, v in sd.items() if not k.endswith("position_ids")}
  vm, tm = "vision_model", "text_model"
  o = {"visual.conv1.weight": sd.pop(f"{vm}.embeddings.patch_embedding.weight"),
       "visual.class_embedding": sd.pop(f"{vm}.embeddings.class_embedding"),
       "visual.positional_embedding": sd.pop(f"{vm}.embeddings.position_embedding.weight"),
       "visual.proj": sd.pop("visual_projection.weight").T.contiguous(),
       "token_embedding.weight": sd.pop(f"{tm}.embeddings.token_embedding.weight"),
       "positional_embedding": sd.pop(f"{tm}.embeddings.position_embedding.weight"),
       "text_projection": sd.pop("text_projection.weight").T.contiguous(),
       "logit_scale": sd.pop("logit_scale")}
  for hf, oa in ((f"{vm}.pre_layrnorm", "visual.ln_pre"), (f"{vm}.post_layernorm", "visual.ln_post"),
                 (f"{tm}.final_layer_norm", "ln_final")):
    for leaf in ("weight", "bias"):
      o[f"{oa}.{leaf}"] = sd.pop(f"{hf}.{leaf}")
  for hf_tower, oa_tower in ((f"{vm}.encoder.layers", "visual.transformer.resblocks"),
                             (f"{tm}.encoder.layers", "transformer.resblocks")):
    i = 0
    while f"{hf_tower}.{i}.layer_norm1.weight" in sd:
      h, a = f"{hf_tower}.{i}", f"{oa_tower}.{i}"
      for leaf in ("weight", "bias"):
        o[f"{a}.attn.in_proj_{leaf}"] = torch.cat([sd.pop(f"{h}.self_attn.{n}_proj.{leaf}") for n in "qkv"])
        for hn, an in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                       ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
          o[f"{a}.{an}.{leaf}"] = sd.pop(f"{h}.{hn}.{leaf}")
      i += 1
  assert not sd, sorted(sd)
  if extras:   # open_clip's text causal-mask buffer (persistent in some versions)
    n = o["positional_embedding"].shape[0]
    o["attn_mask"] = torch.full((n, n), float("-inf")).triu_(1)
  return o


class Node(torch.nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def torchscript_archive(flat, path, submodules=None):
  """A TorchScript archive whose state dict has exactly the keys of `flat` (OpenAI's .pt format),
  plus `submodules` ({"dotted.path": module}) that hold no tensors."""
  root = Node()
  for key, t in flat.items():
    *parents, leaf = key.split(".")
    m = root
    for p in parents:
      if p not in m._modules:
        m.add_module(p, Node())
      m = m._modules[p]
    if t.is_floating_point() and leaf != "attn_mask":
      m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    else:
      m.register_buffer(leaf, t.clone())
  for key, module in (submodules or {}).items():
    *parents, leaf = key.split(".")
    root.get_submodule(".".join(parents)).add_module(leaf, module)
  with warnings.catch_warnings():            # torch.jit is deprecated in torch 2.13, still works
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.jit.save(torch.jit.script(root), str(path))
    assert set(torch.jit.load(str(path)).state_dict()) == set(flat)
  return str(path)


def convert_cli(src, out):
  r = subprocess.run([sys.executable, "-m", "weights.convert", f"--src={src}", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  return r


def flat_np(params):
  return {k: np.asarray(v) for k, v in flatten(params).items()}


def assert_params_equal(a, b, rounding=None):
  fa, fb = flat_np(a), flat_np(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    want = fb[k] if rounding is None else fb[k].astype(rounding).astype(np.float32)
    assert fa[k].dtype == np.float32, k
    assert fa[k].shape == want.shape, k
    assert np.array_equal(fa[k], want), f"{k}: max diff {np.max(np.abs(fa[k] - want))}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The same random CLIP in every source layout; values: path of each source."""
  root = tmp_path_factory.mktemp("sources")
  model = make_hf_clip(vision_width=128, vision_heads=2, text_width=64, text_heads=1, seed=3)
  sd = model.state_dict()
  out = {}
  # Hugging Face folders.
  out["hf_safetensors"] = root / "hf_safetensors"
  model.save_pretrained(str(out["hf_safetensors"]))
  config = out["hf_safetensors"] / "config.json"
  out["hf_bin"] = root / "hf_bin"            # transformers 5 always writes safetensors: torch.save
  out["hf_bin"].mkdir()
  shutil.copy(config, out["hf_bin"])
  old_style = dict(sd)                       # transformers 4 files carry position_ids buffers
  old_style["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  old_style["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
  torch.save(old_style, out["hf_bin"] / "pytorch_model.bin")
  out["hf_flax"] = root / "hf_flax"
  out["hf_flax"].mkdir()
  shutil.copy(config, out["hf_flax"])
  from flax import serialization
  (out["hf_flax"] / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(hf_to_flax_tree(sd)))
  out["hf_flax_variables"] = root / "hf_flax_variables"      # the tree under a "params" collection
  out["hf_flax_variables"].mkdir()
  shutil.copy(config, out["hf_flax_variables"])
  (out["hf_flax_variables"] / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize({"params": hf_to_flax_tree(sd)}))
  # OpenAI / open_clip layouts.
  oa = hf_to_openai(sd)
  out["openai_fp16_pt"] = root / "openai_fp16.pt"
  torch.save({k: v.half() if v.is_floating_point() else v for k, v in oa.items()}, out["openai_fp16_pt"])
  jit = {k: v for k, v in oa.items() if k != "attn_mask"}
  jit.update(input_resolution=torch.tensor(56), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
  out["openai_jit"] = root / "openai_jit.pt"
  torchscript_archive(jit, out["openai_jit"])
  out["openai_jit_fp16"] = root / "openai_jit_fp16.pt"
  torchscript_archive({k: v.half() if v.is_floating_point() else v for k, v in jit.items()}, out["openai_jit_fp16"])
  out["open_clip_pt"] = root / "open_clip.pt"
  torch.save({"epoch": 3, "name": "test", "state_dict": {"module." + k: v for k, v in oa.items()}},
             out["open_clip_pt"])
  out["open_clip_safetensors"] = root / "open_clip.safetensors"
  from safetensors.torch import save_file
  save_file({"module." + k: v.contiguous() for k, v in oa.items()}, str(out["open_clip_safetensors"]))
  return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def reference(sources):
  """(params, cfg) of the HF safetensors folder, converted in-process."""
  params, cfg, path = conv.convert(sources["hf_safetensors"])
  assert path == os.path.join(sources["hf_safetensors"], "model.safetensors")
  return params, cfg


@pytest.fixture(scope="module")
def converted_file(sources, tmp_path_factory):
  """The HF safetensors folder converted with the command line."""
  out = tmp_path_factory.mktemp("out") / "clip.safetensors"
  r = convert_cli(sources["hf_safetensors"], out)
  assert r.returncode == 0, r.stderr
  return str(out)


# ------------------------------------------------------------------------------------------------
# Every layout, the same params.


def test_reference_config(reference):
  _, cfg = reference
  assert cfg == fj.CLIPConfig(image_size=56, patch_size=14, vision_width=128, vision_layers=4, vision_heads=2,
                              vision_mlp=264, embed_dim=24, text_width=64, text_layers=2, text_heads=1,
                              text_mlp=192, context_length=77, vocab_size=49408, layer_norm_eps=1e-5)


@pytest.mark.parametrize("name", ["hf_bin", "hf_flax", "hf_flax_variables", "openai_jit", "open_clip_pt", "open_clip_safetensors"])
def test_same_params_from_every_fp32_layout(sources, reference, name):
  params, cfg, _ = conv.convert(sources[name])
  assert cfg == reference[1]
  assert_params_equal(params, reference[0])


@pytest.mark.parametrize("name", ["openai_fp16_pt", "openai_jit_fp16"])
def test_fp16_sources_upcast(sources, reference, name):
  params, cfg, _ = conv.convert(sources[name])
  assert cfg == reference[1]
  assert_params_equal(params, reference[0], rounding=np.float16)
  assert not np.array_equal(params["visual"]["proj"], reference[0]["visual"]["proj"])   # really fp16


def test_cli_on_openai_layout_matches_hf_cli(sources, converted_file, tmp_path):
  out = tmp_path / "openai.safetensors"
  r = convert_cli(sources["openai_jit"], out)
  assert r.returncode == 0, r.stderr
  a, cfg_a = fj.load_checkpoint(str(out))
  b, cfg_b = fj.load_checkpoint(converted_file)
  assert cfg_a == cfg_b
  assert_params_equal(a, b)


def test_cli_output_and_metadata(sources, reference, converted_file):
  meta = read_metadata(converted_file)
  src_file = os.path.join(sources["hf_safetensors"], "model.safetensors")
  assert meta["source_sha256"] == sha256_file(src_file)
  import hashlib
  assert meta["source_sha256"] == hashlib.sha256(Path(src_file).read_bytes()).hexdigest()
  assert meta["source"] == "model.safetensors"
  assert meta["format"] == "fiseclip_jax/2" and meta["backbone"] == "clip"
  assert fj.CLIPConfig.from_dict(json.loads(meta["config"])) == reference[1]
  params, cfg = fj.load_checkpoint(converted_file)
  assert cfg == reference[1]
  assert_params_equal(params, reference[0])


def test_first_format_files_still_load(converted_file, reference, tmp_path):
  """Checkpoints written before backbones were a table (format 1, CLIP only, "clip_config")."""
  from safetensors.numpy import load_file, save_file
  meta = read_metadata(converted_file)
  old = {"format": "fiseclip_jax/1", "clip_config": meta["config"], "source": meta["source"],
         "source_sha256": meta["source_sha256"]}
  path = str(tmp_path / "v1.safetensors")
  save_file(load_file(converted_file), path, metadata=old)
  params, cfg = fj.load_checkpoint(path)
  assert cfg == reference[1]
  assert_params_equal(params, reference[0])


def test_save_load_round_trip(reference, tmp_path):
  params, cfg = reference
  path = str(tmp_path / "rt.safetensors")
  fj.save_checkpoint(path, params, cfg, source_sha256="ab" * 32, source="/x/y/src.pt")
  back, cfg2 = fj.load_checkpoint(path)
  assert cfg2 == cfg
  assert_params_equal(back, params)
  meta = read_metadata(path)
  assert meta["source_sha256"] == "ab" * 32 and meta["source"] == "src.pt"


def test_bf16_safetensors_source(sources, reference, tmp_path):
  from safetensors.torch import load_file, save_file
  sd = load_file(os.path.join(sources["open_clip_safetensors"]))
  path = tmp_path / "bf16.safetensors"
  save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, str(path))
  params, cfg, _ = conv.convert(str(path))
  assert cfg == reference[1]
  want = flat_np(reference[0])
  for k, v in flat_np(params).items():
    assert v.dtype == np.float32
    expect = torch.from_numpy(want[k]).bfloat16().float().numpy()
    assert np.array_equal(v, expect), k


# ------------------------------------------------------------------------------------------------
# Bad checkpoints: a CheckpointError naming the file and the problem.


def rewrite(src, dst, edit):
  """Copy a converted file with its tensors edited (metadata kept)."""
  from safetensors.numpy import load_file, save_file
  flat = load_file(src)
  edit(flat)
  save_file(flat, str(dst), metadata=read_metadata(src))
  return str(dst)


def raises(fn, *args):
  with pytest.raises(fj.CheckpointError) as e:
    fn(*args)
  return str(e.value)


def test_truncated_safetensors(converted_file, tmp_path):
  bad = tmp_path / "truncated.safetensors"
  data = Path(converted_file).read_bytes()
  bad.write_bytes(data[:len(data) // 2])
  msg = raises(fj.load_checkpoint, str(bad))
  assert str(bad) in msg and "truncated" in msg


def test_truncated_safetensors_source(sources, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(sources["hf_safetensors"], d)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  msg = raises(conv.convert, str(d))
  assert str(d / "model.safetensors") in msg and "truncated" in msg


def test_non_clip_safetensors(tmp_path):
  from safetensors.numpy import save_file
  bad = str(tmp_path / "random.safetensors")
  save_file({"encoder.weight": np.ones((3, 4), np.float32), "head.bias": np.zeros(2, np.float32)}, bad)
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "not a FiSeCLIP-JAX checkpoint" in msg
  msg = raises(conv.convert, bad)
  assert bad in msg and "not a CLIP checkpoint" in msg


def test_missing_key(converted_file, tmp_path):
  bad = rewrite(converted_file, tmp_path / "missing.safetensors", lambda f: f.pop("visual/ln_post/bias"))
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "missing" in msg and "visual/ln_post/bias" in msg


def test_extra_key(converted_file, tmp_path):
  def add(flat):
    flat["visual/adapter/kernel"] = np.zeros((2, 2), np.float32)
  bad = rewrite(converted_file, tmp_path / "extra.safetensors", add)
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "unexpected" in msg and "visual/adapter/kernel" in msg


def test_misshaped_key(converted_file, tmp_path):
  def reshape(flat):
    flat["text/proj"] = np.zeros((64, 25), np.float32)
  bad = rewrite(converted_file, tmp_path / "misshaped.safetensors", reshape)
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "text/proj" in msg and "(64, 25)" in msg and "(64, 24)" in msg


def test_config_of_another_architecture(converted_file, tmp_path):
  from safetensors.numpy import load_file, save_file
  meta = read_metadata(converted_file)
  cfg = json.loads(meta["config"])
  cfg.update(vision_layers=6, vision_width=96)
  meta["config"] = json.dumps(cfg)
  bad = str(tmp_path / "wrong_arch.safetensors")
  save_file(load_file(converted_file), bad, metadata=meta)
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "architecture" in msg and "mis-shaped" in msg
  assert "visual/blocks/fc1/kernel: (4, 128, 264), expected (6, 96, 264)" in msg


def test_bad_config_metadata(converted_file, tmp_path):
  from safetensors.numpy import load_file, save_file
  meta = read_metadata(converted_file)
  meta["config"] = json.dumps({"vision_width": 128, "heads": 3})
  bad = str(tmp_path / "bad_meta.safetensors")
  save_file(load_file(converted_file), bad, metadata=meta)
  msg = raises(fj.load_checkpoint, bad)
  assert bad in msg and "config" in msg and "heads" in msg


def test_truncated_msgpack(sources, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(sources["hf_flax"], d)
  data = (d / "flax_model.msgpack").read_bytes()
  (d / "flax_model.msgpack").write_bytes(data[:len(data) // 2])
  msg = raises(conv.convert, str(d))
  assert str(d / "flax_model.msgpack") in msg and "not a readable Flax msgpack" in msg


def test_truncated_pt(sources, tmp_path):
  for name in ("open_clip_pt", "openai_jit"):
    bad = tmp_path / f"truncated_{name}.pt"
    data = Path(sources[name]).read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    msg = raises(conv.convert, str(bad))
    assert str(bad) in msg and "not a readable PyTorch checkpoint" in msg


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nowhere" / "ViT-L-14-336px.pt")
  msg = raises(conv.convert, missing)
  assert missing in msg and "no such file" in msg
  msg = raises(fj.load_checkpoint, missing)
  assert missing in msg and "no such checkpoint file" in msg


def test_missing_path_cli(tmp_path):
  missing = str(tmp_path / "nowhere.pt")
  r = convert_cli(missing, tmp_path / "out.safetensors")
  assert r.returncode != 0
  assert missing in r.stderr and "no such file" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "out.safetensors").exists()


def test_hf_folder_without_config(sources, tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  shutil.copy(os.path.join(sources["hf_safetensors"], "model.safetensors"), d)
  msg = raises(conv.convert, str(d))
  assert str(d) in msg and "config.json" in msg


def test_hf_folder_without_weights(sources, tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  shutil.copy(os.path.join(sources["hf_safetensors"], "config.json"), d)
  msg = raises(conv.convert, str(d))
  assert str(d) in msg and "model.safetensors" in msg


def test_hf_config_gelu(sources, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(sources["hf_safetensors"], d)
  config = json.loads((d / "config.json").read_text())
  config["vision_config"]["hidden_act"] = "gelu"
  (d / "config.json").write_text(json.dumps(config))
  msg = raises(conv.convert, str(d))
  assert str(d / "config.json") in msg and "hidden_act='gelu'" in msg and "quick_gelu" in msg


def test_hf_config_disagrees_with_tensors(sources, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(sources["hf_safetensors"], d)
  config = json.loads((d / "config.json").read_text())
  config["projection_dim"] = 32
  (d / "config.json").write_text(json.dumps(config))
  msg = raises(conv.convert, str(d))
  assert str(d / "model.safetensors") in msg and "visual/proj: (128, 24), expected (128, 32)" in msg


def test_hf_config_not_clip(sources, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(sources["hf_safetensors"], d)
  (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
  msg = raises(conv.convert, str(d))
  assert str(d / "config.json") in msg and "bert" in msg
  (d / "config.json").write_text("{not json")
  msg = raises(conv.convert, str(d))
  assert str(d / "config.json") in msg and "JSON" in msg


def test_hf_weights_passed_as_file(sources):
  path = os.path.join(sources["hf_safetensors"], "model.safetensors")
  msg = raises(conv.convert, path)
  assert path in msg and "config.json" in msg


def test_openai_layout_missing_key(sources, tmp_path):
  sd = torch.load(sources["open_clip_pt"], weights_only=True)["state_dict"]
  del sd["module.visual.transformer.resblocks.2.attn.in_proj_bias"]
  bad = str(tmp_path / "missing.pt")
  torch.save(sd, bad)
  msg = raises(conv.convert, bad)
  assert bad in msg and "visual.transformer.resblocks.2.attn.in_proj_bias" in msg


def test_openai_layout_extra_key(sources, tmp_path):
  sd = torch.load(sources["open_clip_pt"], weights_only=True)["state_dict"]
  sd["module.visual.head.weight"] = torch.zeros(3)
  bad = str(tmp_path / "extra.pt")
  torch.save(sd, bad)
  msg = raises(conv.convert, bad)
  assert bad in msg and "unexpected" in msg and "visual.head.weight" in msg


def test_head_counts_override_for_openai_layout(sources):
  """OpenAI layout stores no head count: width // 64 unless told (open_clip ViT-H/14 has 16 heads)."""
  from fiseclip_jax.convert.sources import convert
  _, guessed, _ = convert(sources["open_clip_pt"])
  assert (guessed.vision_heads, guessed.text_heads) == (2, 1)
  params, told, _ = convert(sources["open_clip_pt"], vision_heads=4, text_heads=2)
  assert (told.vision_heads, told.text_heads) == (4, 2)
