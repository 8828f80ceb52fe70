"""Entry point in a checkout: `python -m eval.bundle` runs `fiseclip-bundle` (fiseclip_jax.cli.bundle)."""
from fiseclip_jax.cli import bundle

if __name__ == "__main__":
  bundle.main()
