"""Entry point in a checkout: `python -m eval.export` runs `fiseclip-export` (fiseclip_jax.cli.export)."""
from fiseclip_jax.cli import export

if __name__ == "__main__":
  export.main()
