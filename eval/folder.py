"""Entry point in a checkout: `python -m eval.folder` runs `fiseclip-folder` (fiseclip_jax.cli.folder)."""
from fiseclip_jax.cli import folder

if __name__ == "__main__":
  folder.main()
