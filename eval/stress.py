"""Entry point in a checkout: `python -m eval.stress` runs `fiseclip-stress` (fiseclip_jax.cli.stress)."""
from fiseclip_jax.cli import stress

if __name__ == "__main__":
  stress.main()
