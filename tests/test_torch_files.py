"""torch_files: .pt / .bin tensors read without running anything stored in the file.

A TorchScript archive can carry code that `torch.jit.load` runs (a class's `__setstate__`). The
archives here carry one that prints MARKER: `torch.jit.load` prints it, the converter must not,
unless told to with --trust_torchscript.
"""
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

from conftest import make_hf_clip
from fiseclip_jax.convert import sources as conv
from fiseclip_jax.core.errors import CheckpointError
from fiseclip_jax.convert.torch_files import read_state_dict

torch = pytest.importorskip("torch")
from test_convert import assert_params_equal, hf_to_openai, torchscript_archive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = "FISECLIP-MARKER-code-from-the-checkpoint-ran"


class Marker(torch.nn.Module):
  """No tensors; torch.jit.load runs its __setstate__, which prints the marker."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x

  @torch.jit.export
  def __getstate__(self) -> Tuple[bool, bool]:
    return (self.training, self.training)

  @torch.jit.export
  def __setstate__(self, state: Tuple[bool, bool]) -> None:
    print("FISECLIP-MARKER-code-from-the-checkpoint-ran")
    self.training = state[0]


def script(module, path):
  with warnings.catch_warnings():            # torch.jit is deprecated in torch 2.13, still works
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.jit.save(torch.jit.script(module), str(path))
  return str(path)


def jit_state_dict(path):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return torch.jit.load(str(path)).state_dict()


def marker_clip_archive(flat, path):
  """An OpenAI-layout TorchScript CLIP (the state dict of `flat`) with a Marker submodule."""
  return torchscript_archive(flat, path, {"visual.marker": Marker()})


def as_numpy(sd):
  return {k: (v.float() if v.is_floating_point() else v).detach().resolve_neg().numpy() for k, v in sd.items()}


def assert_same_arrays(got, want):
  assert list(got) == list(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
    assert got[k].shape == want[k].shape, k
    assert np.array_equal(got[k], want[k], equal_nan=want[k].dtype.kind in "fc"), k


def convert_cli(*args):
  return subprocess.run([sys.executable, "-m", "weights.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """One small random CLIP: HF folder, OpenAI TorchScript (fp32, fp16, with a Marker), fp16 state
  dict, and the Marker archive as an HF folder's pytorch_model.bin."""
  root = tmp_path_factory.mktemp("torch_files")
  model = make_hf_clip(vision_width=64, vision_layers=2, vision_heads=1, text_width=64, text_layers=1,
                       text_heads=1, seed=7)
  out = {"hf": root / "hf"}
  model.save_pretrained(str(out["hf"]))
  oa = hf_to_openai(model.state_dict())
  jit = {k: v for k, v in oa.items() if k != "attn_mask"}
  jit.update(input_resolution=torch.tensor(56), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
  out["jit"] = root / "openai_jit.pt"
  torchscript_archive(jit, out["jit"])
  out["jit_fp16"] = root / "openai_jit_fp16.pt"
  torchscript_archive({k: v.half() if v.is_floating_point() else v for k, v in jit.items()}, out["jit_fp16"])
  out["marker"] = Path(marker_clip_archive(jit, root / "marker_clip.pt"))
  out["marker_hf"] = root / "marker_hf"
  out["marker_hf"].mkdir()
  shutil.copy(out["hf"] / "config.json", out["marker_hf"])
  shutil.copy(out["marker"], out["marker_hf"] / "pytorch_model.bin")
  out["fp16_sd"] = root / "openai_fp16.pt"
  torch.save({k: v.half() if v.is_floating_point() else v for k, v in oa.items()}, out["fp16_sd"])
  return {k: str(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Code stored in a file never runs unless asked.


def test_torch_jit_load_runs_the_marker(files):
  """The check below means something: loading the archive with torch really runs its code."""
  r = subprocess.run([sys.executable, "-W", "ignore", "-c",
                      "import sys, torch; torch.jit.load(sys.argv[1])", files["marker"]],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert MARKER in r.stdout


@pytest.mark.parametrize("src", ["marker", "marker_hf"])
def test_cli_never_runs_code_from_the_file(files, src, tmp_path):
  out = tmp_path / "out.safetensors"
  r = convert_cli(f"--src={files[src]}", f"--out={out}")
  assert MARKER not in r.stdout + r.stderr
  assert r.returncode == 1, r.stderr
  assert "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  weights = files[src] if src == "marker" else os.path.join(files[src], "pytorch_model.bin")
  assert weights in lines[0] and "__setstate__" in lines[0] and "--trust_torchscript" in lines[0]
  assert not out.exists()


def test_cli_trust_torchscript_runs_it_and_converts(files, tmp_path):
  import fiseclip_jax as fj
  out = tmp_path / "trusted.safetensors"
  r = convert_cli(f"--src={files['marker']}", f"--out={out}", "--trust_torchscript")
  assert r.returncode == 0, r.stderr
  assert MARKER in r.stdout                                  # the flag does what it says
  assert "--trust_torchscript" in r.stderr and "runs code" in r.stderr
  params, cfg = fj.load_checkpoint(str(out))
  want, want_cfg, _ = conv.convert(files["hf"])
  assert cfg == want_cfg
  assert_params_equal(params, want)


@pytest.mark.parametrize("trust", [False, True])
def test_openai_torchscript_matches_hf(files, trust):
  params, cfg, _ = conv.convert(files["jit"], trust_torchscript=trust)
  want, want_cfg, _ = conv.convert(files["hf"])
  assert cfg == want_cfg
  assert_params_equal(params, want)


# ------------------------------------------------------------------------------------------------
# The reader gives what torch gives, bit for bit.


@pytest.mark.parametrize("name", ["jit", "jit_fp16"])
def test_torchscript_same_as_jit_load(files, name):
  got = read_state_dict(files[name])
  want = as_numpy(jit_state_dict(files[name]))
  assert "visual.transformer.resblocks.1.attn.in_proj_weight" in want and "vocab_size" in want
  assert_same_arrays(got, want)


def test_fp16_state_dict_same_as_torch_load(files):
  got = read_state_dict(files["fp16_sd"])
  want = as_numpy(torch.load(files["fp16_sd"], weights_only=True))
  assert want["attn_mask"][0, 1] == -np.inf
  assert_same_arrays(got, want)


class Block(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.lin = torch.nn.Linear(5, 3)
    self.no_bias = torch.nn.Linear(3, 2, bias=False)
    self.layers = torch.nn.ModuleList([torch.nn.LayerNorm(3), torch.nn.LayerNorm(3)])
    self.plain = torch.ones(3)                               # a tensor attribute, not state
    self.sizes = [1, 2]
    base = torch.randn(4, 6)
    self.t = torch.nn.Parameter(base.t(), requires_grad=False)            # non-contiguous
    self.register_buffer("offset_view", base[1:, 2:4])                    # shares, with an offset
    self.register_buffer("np_buffer", torch.arange(3.0), persistent=False)
    self.register_buffer("bf16", torch.randn(2, 3).bfloat16())
    self.register_buffer("mask", torch.tensor([True, False]))
    self.register_buffer("i8", torch.tensor([-3, 4], dtype=torch.int8))
    self.register_buffer("scalar", torch.tensor(7))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.no_bias(self.layers[1](self.lin(x) * self.plain)) + self.sizes[0]


def test_script_module_details(tmp_path):
  torch.manual_seed(0)
  path = script(Block(), tmp_path / "block.pt")
  want = as_numpy(jit_state_dict(path))
  assert "plain" not in want and "np_buffer" in want                      # what torch does
  assert_same_arrays(read_state_dict(path), want)


class Attention(torch.nn.Module):
  """OpenAI CLIP's residual block, traced the way OpenAI made its .pt files (a mask attribute)."""

  def __init__(self, width=16):
    super().__init__()
    self.attn = torch.nn.MultiheadAttention(width, 2)
    self.ln_1 = torch.nn.LayerNorm(width)
    self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))
    self.attn_mask = torch.full((3, 3), float("-inf")).triu(1)       # a traced constant, not state
    self.class_embedding = torch.nn.Parameter(torch.randn(width))
    self.register_buffer("input_resolution", torch.tensor(224))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.ln_1(x + self.class_embedding)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
    return x + self.mlp(x)


def test_traced_module_details(tmp_path):
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    traced = torch.jit.trace(Attention().eval(), torch.randn(3, 2, 16)).half()   # OpenAI ships fp16
    torch.jit.save(traced, str(tmp_path / "traced.pt"))
  path = str(tmp_path / "traced.pt")
  with zipfile.ZipFile(path) as z:
    assert any("/constants/" in n for n in z.namelist())               # the mask, as a constant
  want = as_numpy(jit_state_dict(path))
  assert "attn.in_proj_weight" in want and "attn_mask" not in want
  assert_same_arrays(read_state_dict(path), want)


def tensors():
  torch.manual_seed(1)
  base = torch.randn(4, 6)
  return {"w": torch.nn.Parameter(torch.randn(3, 2)), "t": base.t(), "view": base[1:, 2:4],
          "bf16": torch.randn(5).bfloat16(), "f64": torch.randn(2).double(), "u16": torch.arange(3).to(torch.uint16),
          "mask": torch.tensor([True, False]), "i64": torch.tensor([1, -2]), "empty": torch.zeros(0, 3),
          "neg": torch.randn(3)._neg_view()}


@pytest.mark.parametrize("zip_format", [True, False])
def test_state_dict_details(tmp_path, zip_format):
  path = tmp_path / "sd.pt"
  sd = {k: v for k, v in tensors().items() if zip_format or k != "u16"}  # torch cannot: legacy uint16
  torch.save({"epoch": 3, "state_dict": sd}, path, _use_new_zipfile_serialization=zip_format)
  want = as_numpy(torch.load(path, weights_only=True)["state_dict"])
  assert_same_arrays(read_state_dict(str(path)), want)


def test_no_torch_needed_for_zip_files(files, tmp_path, monkeypatch):
  legacy = tmp_path / "legacy.pt"
  torch.save(tensors(), legacy, _use_new_zipfile_serialization=False)
  monkeypatch.setitem(sys.modules, "torch", None)           # `import torch` fails from here on
  assert read_state_dict(files["fp16_sd"])["visual.proj"].dtype == np.float32
  assert read_state_dict(files["jit"])["logit_scale"].shape == ()
  with pytest.raises(CheckpointError, match="legacy format .*pip install"):
    read_state_dict(str(legacy))


def rewrite_zip(src, dst, edit):
  """Copy a zip, `edit(name, data) -> data` applied to every entry (None: left out)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      data = edit(name, zin.read(name))
      if data is not None:
        zout.writestr(name, data)
  return str(dst)


def storage_itemsizes(path) -> dict:
  """{storage key: bytes per element} of a torch.save zip, read from its data.pkl by a probe."""
  import io
  import pickle
  item = {"FloatStorage": 4, "DoubleStorage": 8, "BFloat16Storage": 2, "LongStorage": 8, "BoolStorage": 1,
          "UntypedStorage": 1, "uint16": 2}
  sizes = {}

  class Probe(pickle.Unpickler):                            # a file torch.save just wrote
    def find_class(self, module, name):
      if name == "_rebuild_tensor_v3":                      # (storage, offset, size, stride, grad, hooks, dtype)
        return lambda key, *a: sizes.__setitem__(key, item[a[5]])
      return name if name in item else (lambda *a: None)

    def persistent_load(self, pid):
      sizes.setdefault(pid[2], item[pid[1]])
      return pid[2]

  with zipfile.ZipFile(path) as z:
    Probe(io.BytesIO(z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0]))).load()
  return sizes


def test_big_endian_file(tmp_path):
  src = tmp_path / "little.pt"
  torch.save({k: v for k, v in tensors().items() if k != "neg"}, src)
  sizes = storage_itemsizes(src)
  assert sorted(set(sizes.values())) == [1, 2, 4, 8]

  def edit(name, data):
    if name.endswith("/byteorder"):
      return b"big"
    n = sizes.get(name.rsplit("/", 1)[-1], 1) if "/data/" in name else 1
    return np.frombuffer(data, f"<u{n}").astype(f">u{n}").tobytes() if n > 1 else data

  big = rewrite_zip(src, tmp_path / "big.pt", edit)
  assert Path(big).read_bytes() != src.read_bytes()
  assert_same_arrays(read_state_dict(big), as_numpy(torch.load(src, weights_only=True)))


# ------------------------------------------------------------------------------------------------
# Anything else: refused, with the file and the global named.


def zip_with_pickle(path, pickle_bytes, torchscript=False):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", b"little")
    z.writestr("archive/version", b"3\n")
    if torchscript:
      z.writestr("archive/constants.pkl", b"\x80\x02).")
      z.writestr("archive/code/__torch__.py", b"class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
  return str(path)


def global_call(module, name, arg: str) -> bytes:
  """A protocol-2 pickle of `module.name(arg)` (written by hand: nothing here is ever run)."""
  a = arg.encode()
  return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(a)) + a + b"\x85R."


@pytest.mark.parametrize("torchscript", [False, True])
def test_refuses_globals_outside_the_allow_list(tmp_path, torchscript):
  sentinel = tmp_path / "ran"
  bad = zip_with_pickle(tmp_path / "bad.pt", global_call("os", "system", f"touch {sentinel}"), torchscript)
  with pytest.raises(CheckpointError) as e:
    read_state_dict(bad)
  msg = str(e.value)
  assert bad in msg and "os.system" in msg and "refused" in msg
  assert ("--trust_torchscript" in msg) == torchscript
  if not torchscript:                                       # the flag is about TorchScript only
    with pytest.raises(CheckpointError, match="os.system"):
      read_state_dict(bad, trust_torchscript=True)
  assert not sentinel.exists()


def test_refuses_torchscript_custom_classes_and_undeclared_ones(tmp_path):
  custom = b"\x80\x02c__torch__.torch.classes.quantized\nLinearPackedParamsBase\n)\x81."
  bad = zip_with_pickle(tmp_path / "custom.pt", custom, torchscript=True)
  with pytest.raises(CheckpointError, match="__torch__.torch.classes.quantized.LinearPackedParamsBase"):
    read_state_dict(bad)
  undeclared = b"\x80\x02c__torch__\nOther\n)\x81}b."
  bad = zip_with_pickle(tmp_path / "undeclared.pt", undeclared, torchscript=True)
  with pytest.raises(CheckpointError, match="__torch__.Other is not declared"):
    read_state_dict(bad)
  not_a_script = zip_with_pickle(tmp_path / "plain.pt", undeclared)   # a plain zip: no __torch__ at all
  with pytest.raises(CheckpointError, match="refused .*__torch__.Other"):
    read_state_dict(not_a_script)


def test_unreadable_files(files, tmp_path):
  data = Path(files["jit"]).read_bytes()
  cases = {"truncated.pt": data[:len(data) // 2], "garbage.bin": b"\x00not torch at all" * 10,
           "empty.pt": b""}
  for name, content in cases.items():
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
      read_state_dict(str(bad))
    assert str(bad) in str(e.value) and "not a readable PyTorch checkpoint" in str(e.value), name
  good = tmp_path / "good.pt"
  torch.save({"w": torch.ones(4)}, good)                    # storage '0': 4 floats, tensor size (4,)
  missing = rewrite_zip(good, tmp_path / "missing.pt", lambda n, d: None if n.endswith("/data/0") else d)
  short = rewrite_zip(good, tmp_path / "short.pt", lambda n, d: d[:8] if n.endswith("/data/0") else d)

  def two_element_storage(name, data):                     # the pickle says 2 floats, the tensor needs 4
    return data.replace(b"K\x04t", b"K\x02t", 1) if name.endswith("data.pkl") else data[:8]

  lying = rewrite_zip(good, tmp_path / "lying.pt", two_element_storage)
  for bad, why in ((missing, "no entry"), (short, "holds 8 bytes"), (lying, "reads past its storage")):
    with pytest.raises(CheckpointError, match=f"not a readable PyTorch checkpoint.*{why}"):
      read_state_dict(bad)
