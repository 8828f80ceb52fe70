"""The layout rule of docs/DESIGN.md "Layout", read from the code's own imports (ast, nothing run):
layers import only downward, no circle, no file of the library past 500 lines, the package never
imports its own face, the programs cross into JAX in one place, and light modules import no JAX."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fiseclip_jax"
# DESIGN.md "Layout": each folder's floor; a module imports its own folder and lower floors only.
FLOORS = {"core": 0, "data": 1, "models": 2, "method": 3, "convert": 4, "outputs": 4, "run": 5,
          "bench": 6, "deploy": 6, "cli": 7}
CROSSING = "fiseclip_jax.cli.runtime"       # the one module that imports package code in functions
LIGHT = ["fiseclip_jax", "fiseclip_jax.core.config", "fiseclip_jax.core.errors",
         "fiseclip_jax.core.files", "fiseclip_jax.data", "fiseclip_jax.data.tables",
         "fiseclip_jax.data.order", "fiseclip_jax.models.catalog", "fiseclip_jax.models.variants",
         "fiseclip_jax.convert.header", "fiseclip_jax.outputs.run_folder",
         "fiseclip_jax.outputs.category", "fiseclip_jax.bench.config", "fiseclip_jax.cli.evaluate",
         "fiseclip_jax.cli.folder", "fiseclip_jax.cli.demo", "fiseclip_jax.cli.convert",
         "fiseclip_jax.cli.bench", "fiseclip_jax.cli.bundle", "fiseclip_jax.cli.predict",
         "fiseclip_jax.cli.export", "fiseclip_jax.cli.serve", "fiseclip_jax.cli.serve_load",
         "fiseclip_jax.deploy.bundle_header", "fiseclip_jax.deploy.export_format",
         "fiseclip_jax.deploy.gather", "fiseclip_jax.deploy.intake", "fiseclip_jax.deploy.load",
         "fiseclip_jax.deploy.serve_config", "fiseclip_jax.cli.stress",
         "fiseclip_jax.bench.stress_config"]


def modules():
  """module name -> path of every file of the package."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = modules()


def imports(path):
  """(module imported, line, inside a function?) for each import of the package's own modules."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, in_function) for a in child.names
                     if a.name.startswith("fiseclip_jax"))
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module and \
          child.module.startswith("fiseclip_jax"):
        for a in child.names:                    # `from pkg import module` imports the module
          sub = f"{child.module}.{a.name}"
          found.append((sub if sub in MODULES else child.module, child.lineno, in_function))
      visit(child, inner)

  visit(tree, False)
  return found


def floor(module):
  parts = module.split(".")
  return FLOORS.get(parts[1]) if len(parts) > 1 else None


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_imports_go_down_the_floors():
  bad = []
  for m, deps in GRAPH.items():
    if m == "fiseclip_jax":
      continue                                   # the face may name anything (lazily)
    for dep, line, _ in deps:
      if dep == "fiseclip_jax":
        bad.append(f"{m}:{line} imports the package's face")
        continue
      same_folder = dep.split(".")[1] == m.split(".")[1]
      if not same_folder and not floor(dep) < floor(m):
        bad.append(f"{m}:{line} -> {dep} (floor {floor(m)} -> {floor(dep)})")
  assert not bad, "\n".join(bad)


def test_no_circle():
  edges = {m: {d for d, _, _ in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
  seen, stack, cycles = set(), [], []

  def walk(m):
    if m in stack:
      cycles.append(stack[stack.index(m):] + [m])
      return
    if m in seen:
      return
    seen.add(m)
    stack.append(m)
    for d in sorted(edges[m]):
      if not (m.startswith(d + ".") or d == "fiseclip_jax"):   # a package's own __init__
        walk(d)
    stack.pop()

  for m in sorted(edges):
    walk(m)
  assert not cycles, cycles


def test_files_are_one_idea_each():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 500}
  assert not long, long


def test_only_the_crossing_imports_package_code_in_functions():
  hidden = [f"{m}:{line} {dep}" for m, deps in GRAPH.items() for dep, line, inner in deps
            if inner and m not in (CROSSING, "fiseclip_jax")]
  assert not hidden, hidden


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_jax(module):
  code = f"import sys, {module}; print('jax' in sys.modules, 'flax' in sys.modules)"
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["False", "False"], module
