"""What produced an output: the versions of the packages that matter, recorded with every result."""
from __future__ import annotations

import platform as py_platform
from importlib import metadata
from typing import Dict, Optional

from fiseclip_jax.core.version import __version__

PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")


def versions() -> Dict[str, Optional[str]]:
  """Installed versions of the packages that matter (None: not installed)."""
  out = {"python": py_platform.python_version(), "fiseclip_jax": __version__}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out

