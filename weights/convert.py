"""Entry point in a checkout: `python -m weights.convert` runs `fiseclip-convert` (fiseclip_jax.cli.convert)."""
from fiseclip_jax.cli import convert

if __name__ == "__main__":
  convert.main()
