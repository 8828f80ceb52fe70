"""JAX's persistent compilation cache for deployed predictors: a restarted process compiles nothing.

A predictor compiles one program per compiled batch (and the text encoder when it builds a bundle);
with the cache on disk a second process loads them instead of running XLA again (DESIGN.md §15).
It must be set before the process's first compilation: `Predictor.load` / `build` call this first.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

ENV = "FISECLIP_CACHE_DIR"


def default_cache_dir() -> str:
  """$FISECLIP_CACHE_DIR, else $XDG_CACHE_HOME/fiseclip_jax/xla (~/.cache/fiseclip_jax/xla)."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fiseclip_jax", "xla")


def enable_compilation_cache(cache_dir: Optional[str] = None) -> Optional[str]:
  """Point JAX's persistent cache at cache_dir (None: the default; "": leave it off) unless the
  process already set one (JAX_COMPILATION_CACHE_DIR wins); every program is cached, however short
  its compile. Returns the folder in use (None: off)."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if cache_dir == "":
    return None
  folder = cache_dir or default_cache_dir()
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
