"""TorchScript archives read by their tensors: the module tree of `data.pkl` as inert objects,
and which attributes are parameters and buffers from the classes' source, read as text.

A TorchScript `data.pkl` holds the module tree as objects of `__torch__.*` classes, each built
from the dict of its attributes. Those classes become inert `ScriptObject`s that only record that
dict. Which attributes are parameters and buffers is declared in the class's source,
`code/<qualified path>.py` (`__parameters__ = [...]`, `__buffers__ = [...]`), read with
`ast.literal_eval` of the list: nothing compiled or run. A class that defines `__setstate__` is
refused (its state can only be restored by running its code). See `torch_files.py`.
"""
from __future__ import annotations

import ast
import re
import zipfile
from typing import Dict, List, Tuple

import numpy as np

from fiseclip_jax.core.errors import CheckpointError

TRUST_HINT = ("if the archive comes from a source you trust, --trust_torchscript (trust_torchscript="
              "True) loads it with torch.jit.load, which runs code stored in the file")


class ScriptObject:
  """An object of a `__torch__.*` class, as pickled: only its state (a dict of attributes) kept."""
  qualname = "?"

  def __setstate__(self, state):
    self.__dict__["_state"] = state

  @property
  def state(self):
    return self.__dict__.get("_state")


class ClassDecl:
  def __init__(self, bases: str):
    self.is_module = bases.strip() == "Module"
    self.parameters: List[str] = []
    self.buffers: List[str] = []
    self.has_setstate = False


CLASS_RE = re.compile(r"class\s+([A-Za-z_]\w*)\s*(?:\(([^)]*)\))?\s*:")
LIST_RE = re.compile(r"(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")
SETSTATE_RE = re.compile(r"def\s+__setstate__\s*\(")


def parse_classes(source: str) -> Dict[str, ClassDecl]:
  """The class declarations of one TorchScript source file, read as text (nothing compiled)."""
  classes: Dict[str, ClassDecl] = {}
  decl, indent = None, None
  for line in source.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if not line[0].isspace():                                      # top level: a new statement
      m = CLASS_RE.match(line)
      decl = classes[m.group(1)] = ClassDecl(m.group(2) or "") if m else None
      indent = None
      continue
    if decl is None:
      continue
    here = len(line) - len(line.lstrip())
    if indent is None:
      indent = here
    if here != indent:                                             # inside a method body
      continue
    body = line.strip()
    m = LIST_RE.match(body)
    if m:
      names = ast.literal_eval(m.group(2))
      if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"malformed {m.group(1)} declaration {body!r}")
      setattr(decl, "parameters" if m.group(1) == "__parameters__" else "buffers", names)
    elif SETSTATE_RE.match(body):
      decl.has_setstate = True
  return classes



class ScriptClasses:
  """The `__torch__.*` classes of one archive: stand-ins for unpickling, declarations from code/."""

  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str):
    self.path, self.zf, self.prefix = path, zf, prefix
    self.names = set(zf.namelist())
    self.parsed_files: Dict[str, Dict[str, ClassDecl]] = {}
    self.script_types: Dict[str, type] = {}

  def type_of(self, qualname: str) -> type:
    """The inert stand-in class of a `__torch__.*` class (one per name)."""
    if qualname not in self.script_types:
      self.script_types[qualname] = type("ScriptObject", (ScriptObject,), {"qualname": qualname})
    return self.script_types[qualname]

  def class_decl(self, qualname: str) -> ClassDecl:
    module, _, name = qualname.rpartition(".")
    entry = f"{self.prefix}/code/{module.replace('.', '/')}.py"
    if entry not in self.parsed_files:
      if entry not in self.names:
        raise CheckpointError(f"{self.path}: TorchScript class {qualname} has no source ({entry}); "
                              f"{TRUST_HINT}")
      self.parsed_files[entry] = parse_classes(self.zf.read(entry).decode("utf-8"))
    decl = self.parsed_files[entry].get(name)
    if decl is None:
      raise CheckpointError(f"{self.path}: TorchScript class {qualname} is not declared in {entry}; "
                            f"{TRUST_HINT}")
    return decl

  def module_state_dict(self, root) -> Dict[str, np.ndarray]:
    """Parameters and buffers by dotted name, in the order `torch.jit.load(...).state_dict()` has."""
    if not isinstance(root, ScriptObject):
      raise CheckpointError(f"{self.path}: the TorchScript archive's data.pkl holds a "
                            f"{type(root).__name__}, not a module")
    out: Dict[str, np.ndarray] = {}

    def walk(obj: ScriptObject, prefix: str, path: Tuple[int, ...]):
      decl = self.class_decl(obj.qualname)
      if not decl.is_module:
        return
      if decl.has_setstate:
        raise CheckpointError(f"{self.path}: TorchScript class {obj.qualname} restores its state "
                              f"with its own __setstate__ code, which is not run here; {TRUST_HINT}")
      state = obj.state
      if not isinstance(state, dict):
        raise CheckpointError(f"{self.path}: TorchScript module {obj.qualname} has no attribute "
                              f"dict (found {type(state).__name__}); {TRUST_HINT}")
      for name in decl.parameters + decl.buffers:
        value = state.get(name)
        if value is None:                                            # e.g. Linear(bias=False)
          continue
        if not isinstance(value, np.ndarray):
          raise CheckpointError(f"{self.path}: {prefix}{name} of {obj.qualname} is a "
                                f"{type(value).__name__}, not a tensor")
        out[prefix + name] = value
      for name, value in state.items():
        if isinstance(value, ScriptObject):
          if id(value) in path:
            raise CheckpointError(f"{self.path}: module {prefix}{name} contains itself")
          walk(value, f"{prefix}{name}.", path + (id(value),))

    walk(root, "", (id(root),))
    return out


