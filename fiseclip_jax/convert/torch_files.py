"""Read the tensors of a PyTorch `.pt` / `.bin` file without running anything stored in it.

`torch.load(weights_only=False)` and `torch.jit.load` execute code from the file (pickle REDUCE
of any global; a TorchScript class's `__setstate__`). This module reads PyTorch's zip format
itself, for both kinds of zip it writes:

  * `torch.save` (state dicts, open_clip checkpoints, Hugging Face `pytorch_model.bin`):
    `<dir>/data.pkl` plus one `<dir>/data/<key>` entry of raw bytes per storage;
  * TorchScript archives (`torch.jit.save`, OpenAI's `ViT-L-14-336px.pt`): the same, plus
    `<dir>/code/` (the TorchScript source of every class) and `constants.pkl`.

`data.pkl` is read by a `pickle.Unpickler` whose `find_class` returns stand-ins from an explicit
allow-list (`_ALLOWED`, torch `*Storage` types and dtypes; nothing is imported), and whose
`persistent_load` maps `('storage', <Storage type>, key, location, numel)` to a NumPy array read
from `data/<key>` (bfloat16 / float8 via ml_dtypes). Tensors are rebuilt from (storage, offset,
size, stride) with bounds checked, then copied. Any other global ends the read with a
`CheckpointError` naming it.

A TorchScript archive's module tree is walked by `torchscript.py`, the way
`torch.jit.load(path).state_dict()` names it, from the classes' source read as text; a class that
defines `__setstate__` or a custom C++ class (`torch.classes`) is refused, and
`trust_torchscript=True` (`--trust_torchscript`) loads such archives with `torch.jit.load`, which
runs code from the file. `constants.pkl` (constants baked into traced code) is never read.

Files in the legacy (pre-1.6, not zip) format are read with `torch.load(weights_only=True)`,
which runs nothing but needs PyTorch.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import sys
import zipfile
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from fiseclip_jax.convert.torchscript import TRUST_HINT, ScriptClasses
from fiseclip_jax.core.errors import CheckpointError

StateDict = Dict[str, np.ndarray]

UNREADABLE = "not a readable PyTorch checkpoint (truncated or another format?)"
NEED_TORCH = "pip install 'fiseclip-jax[torch]'"
# A rebuilt tensor may hold more elements than its storage only by repeating them (stride 0);
# such views are copied, so cap them (a crafted file could otherwise ask for terabytes).
MAX_EXPANDED_ELEMENTS = 1 << 28


# ------------------------------------------------------------------------------------------------
# dtypes.

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UInt16Storage": "uint16", "UInt32Storage": "uint32", "UInt64Storage": "uint64",
}
_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "complex64", "complex128", "uint16", "uint32", "uint64",
                 "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _np_dtype(name: str) -> np.dtype:
  if name.startswith(("bfloat16", "float8")):
    import ml_dtypes
    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


class _StorageType:
  """Stands for `torch.FloatStorage` & co. (dtype) or `torch.UntypedStorage` (dtype None)."""

  def __init__(self, dtype: Optional[str]):
    self.dtype = dtype

  def __repr__(self):
    return f"<storage type {self.dtype or 'untyped'}>"


class _DType:
  """Stands for a torch dtype global such as `torch.float16`."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """The bytes of one `data/<key>` entry, viewed as a flat array of its dtype (uint8 if untyped)."""

  def __init__(self, array: np.ndarray, typed: bool, big_endian: bool = False):
    self.array, self.typed, self.big_endian = array, typed, big_endian


def _frombuffer(raw, dt: np.dtype, count: int, big_endian: bool) -> np.ndarray:
  """`count` items of dtype `dt` from bytes written little- or big-endian, in native order."""
  if not big_endian or dt.itemsize == 1:
    return np.frombuffer(raw, dt, count)
  if dt.kind in "biufc":                                             # numpy's own types
    return np.frombuffer(raw, dt.newbyteorder(">"), count).astype(dt)
  swapped = np.frombuffer(raw, np.dtype(f">u{dt.itemsize}"), count).astype(f"<u{dt.itemsize}")
  return swapped.view(dt)                                            # bfloat16 (ml_dtypes)


# ------------------------------------------------------------------------------------------------
# Rebuilding tensors: pure functions of their arguments.


def _int_tuple(x, what: str) -> Tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(type(v) is int and v >= 0 for v in x):  # noqa: E721
    raise ValueError(f"tensor {what} must be non-negative ints, found {x!r}")
  return tuple(x)


def _view(storage, offset, size, stride) -> np.ndarray:
  """A copy of the tensor (offset, size, stride) of a flat storage, bounds checked."""
  if not isinstance(storage, _Storage):
    raise ValueError(f"tensor storage expected, found {type(storage).__name__}")
  flat = storage.array
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if type(offset) is not int or offset < 0 or len(size) != len(stride):  # noqa: E721
    raise ValueError(f"bad tensor geometry: offset {offset!r}, size {size}, stride {stride}")
  count = math.prod(size)
  if count == 0:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset} reads past its "
                     f"storage of {flat.size} elements")
  if count > flat.size and count > MAX_EXPANDED_ELEMENTS:
    raise ValueError(f"tensor of size {size} repeats its {flat.size}-element storage too often")
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=[s * item for s in stride], writeable=False)
  return np.array(view, copy=True, order="C")


def _apply_metadata(a: np.ndarray, metadata) -> np.ndarray:
  """Tensor metadata: the conj / neg bits of lazily conjugated / negated tensors."""
  if not metadata:
    return a
  if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
    raise ValueError(f"unsupported tensor metadata {metadata!r}")
  if metadata.get("neg"):
    a = -a
  if metadata.get("conj"):
    a = np.conj(a)
  return a


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  if isinstance(storage, _Storage) and not storage.typed:
    raise ValueError("_rebuild_tensor_v2 of an untyped storage")
  return _apply_metadata(_view(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  """torch.save's form for dtypes without a typed storage (uint16, float8...): untyped bytes."""
  if not isinstance(storage, _Storage) or storage.typed or not isinstance(dtype, _DType):
    raise ValueError("_rebuild_tensor_v3 expects an untyped storage and a dtype")
  dt = _np_dtype(dtype.name)
  raw = storage.array
  typed = _Storage(_frombuffer(raw, dt, raw.size // dt.itemsize, storage.big_endian), typed=True)
  return _apply_metadata(_view(typed, storage_offset, size, stride), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _identity(value, *unused):
  return value


def _torch_size(seq=()):
  return tuple(seq)


def _codecs_encode(text, encoding="utf-8"):
  """protocol-2 pickles write bytes as `_codecs.encode(str, 'latin1')`."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
  return text.encode("latin1")


def _device(*args):
  return ":".join(str(a) for a in args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _device,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    # TorchScript's pickler tags typed lists and containers; Python's own versions return them.
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


# ------------------------------------------------------------------------------------------------
# TorchScript objects.


# ------------------------------------------------------------------------------------------------
# The zip reader.


class _Refused(Exception):
  """A global outside the allow-list (kept apart from corrupt-file errors)."""


class _Reader:
  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, torchscript: bool):
    self.path, self.zf, self.prefix, self.torchscript = path, zf, prefix, torchscript
    names = set(zf.namelist())
    self.names = names
    order = zf.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in names else "little"
    if order not in ("little", "big"):
      raise ValueError(f"byteorder {order!r}")
    self.big_endian = order == "big"
    self.raw: Dict[str, bytes] = {}
    self.storages: Dict[Tuple[str, Optional[str]], _Storage] = {}
    self.script = ScriptClasses(path, zf, prefix) if torchscript else None

  # -- pickle hooks ----------------------------------------------------------------------------

  def find_class(self, module: str, name: str):
    if not f"{module}{name}".isprintable() or " " in f"{module}{name}":
      raise _Refused(ascii(f"{module}.{name}"))
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
      return _StorageType(None)
    if module == "torch" and name in _TORCH_DTYPES:
      return _DType(name)
    if (self.torchscript and (module == "__torch__" or module.startswith("__torch__."))
        and not (module + ".").startswith("__torch__.torch.classes.")):
      return self.script.type_of(f"{module}.{name}")
    raise _Refused(f"{module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:  # noqa: E721
      raise ValueError(f"unsupported storage reference {pid!r}")
    if (key, stype.dtype) not in self.storages:
      entry = f"{self.prefix}/data/{key}"
      if entry not in self.raw:
        if entry not in self.names:
          raise ValueError(f"no entry {entry} for storage {key}")
        self.raw[entry] = self.zf.read(entry)
      dt = _np_dtype(stype.dtype) if stype.dtype else np.dtype(np.uint8)
      raw = self.raw[entry]
      if numel < 0 or numel * dt.itemsize > len(raw):
        raise ValueError(f"storage {key} holds {len(raw)} bytes, {numel} x {dt.itemsize} needed")
      self.storages[(key, stype.dtype)] = _Storage(_frombuffer(raw, dt, numel, self.big_endian),
                                                   stype.dtype is not None, self.big_endian)
    return self.storages[(key, stype.dtype)]

class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, reader: _Reader):
    super().__init__(io.BytesIO(data))
    self._reader = reader

  def find_class(self, module, name):
    return self._reader.find_class(module, name)

  def persistent_load(self, pid):
    return self._reader.persistent_load(pid)


# ------------------------------------------------------------------------------------------------
# Public API.


def _state_dict_of(obj, path: str) -> StateDict:
  """The tensors of a loaded object: a state dict, maybe under "state_dict" (open_clip)."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}


def _upcast(sd: StateDict) -> StateDict:
  """Floating point arrays (fp16, bf16, fp64, float8) as float32, the others as they are."""
  return {k: a.astype(np.float32, copy=False) if a.dtype.name.startswith(("float", "bfloat")) else a
          for k, a in sd.items()}


def _torch_to_numpy(sd, path: str) -> StateDict:
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
  out = {}
  for k, v in sd.items():
    if isinstance(k, str) and hasattr(v, "detach"):
      v = v.detach().cpu().resolve_conj().resolve_neg()
      out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return _upcast(out)


def _one_line(e: BaseException, limit: int = 300) -> str:
  """An exception's message on one line (the command line ends with a single `error:` line)."""
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _layout(zf: zipfile.ZipFile) -> Tuple[str, bool]:
  """(the archive's top folder, whether it is TorchScript)."""
  names = zf.namelist()
  tops = [n[:-len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(tops) != 1:
    raise ValueError("no <folder>/data.pkl: not a PyTorch zip checkpoint")
  prefix = tops[0]
  script = any(n == f"{prefix}/constants.pkl" or n.startswith(f"{prefix}/code/") for n in names)
  return prefix, script


def _read_zip(path: str, trust_torchscript: bool) -> StateDict:
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise CheckpointError(f"{path}: {UNREADABLE}: {_one_line(e)}") from e
  with zf:
    try:
      prefix, script = _layout(zf)
    except ValueError as e:
      raise CheckpointError(f"{path}: {UNREADABLE}: {_one_line(e)}") from e
    if script and trust_torchscript:
      return _jit_load(path)
    entry = f"{prefix}/data.pkl"
    try:
      reader = _Reader(path, zf, prefix, script)
      obj = _Unpickler(zf.read(entry), reader).load()
      if script:
        return _upcast(reader.script.module_state_dict(obj))
      return _upcast(_state_dict_of(obj, path))
    except CheckpointError:
      raise
    except _Refused as e:
      hint = TRUST_HINT if script else ("only tensors and plain containers are read from .pt/.bin "
                                        "state dicts; re-save it as a plain state dict or as "
                                        "safetensors")
      raise CheckpointError(f"{path}: refused to load the global {e} (in {entry}): nothing stored in "
                            f"the file is run; {hint}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError,
            ValueError, TypeError, IndexError, AttributeError, RecursionError, UnicodeDecodeError,
            SyntaxError, MemoryError) as e:
      raise CheckpointError(f"{path}: {UNREADABLE}: {type(e).__name__}: {_one_line(e)}") from e


def _jit_load(path: str) -> StateDict:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: --trust_torchscript loads with torch.jit.load, which needs PyTorch "
                          f"({NEED_TORCH})") from e
  sys.stderr.write(f"warning: --trust_torchscript: loading {path} with torch.jit.load, which runs "
                   "code stored in the file; use it only for archives from a trusted source\n")
  sys.stderr.flush()
  import warnings
  try:
    with warnings.catch_warnings():                       # torch.jit is deprecated, still loads
      warnings.simplefilter("ignore", DeprecationWarning)
      module = torch.jit.load(path, map_location="cpu")
    return _torch_to_numpy(module.state_dict(), path)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - torch raises RuntimeError and others
    raise CheckpointError(f"{path}: not a readable TorchScript archive: {_one_line(e)}") from e


def _read_legacy(path: str) -> StateDict:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: not a zip-format PyTorch checkpoint; reading the legacy format "
                          f"(PyTorch < 1.6) needs PyTorch ({NEED_TORCH})") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)    # weights_only: never runs code
  except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
    raise CheckpointError(f"{path}: {UNREADABLE}: {_one_line(e)}") from e
  return _torch_to_numpy(sd, path)


def read_state_dict(path: str, trust_torchscript: bool = False) -> StateDict:
  """The tensors of a `.pt` / `.bin` file by name, floating point ones as float32.

  A `{"state_dict": {...}}` wrapper (open_clip) is unwrapped; entries that are not tensors
  (epoch numbers, names) are left out. Nothing stored in the file is run unless
  `trust_torchscript` is set and the file is a TorchScript archive (then `torch.jit.load`).
  """
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read: {e.strerror or _one_line(e)}") from e
  if head.startswith(b"PK") or zipfile.is_zipfile(path):
    return _read_zip(path, trust_torchscript)
  if head.startswith(b"\x80"):                    # a pickle: torch.save's legacy format
    return _read_legacy(path)
  raise CheckpointError(f"{path}: {UNREADABLE}: neither a zip nor a pickle")
