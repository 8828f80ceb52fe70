"""Entry point in a checkout: `python -m eval.visa` runs `fiseclip-visa` (fiseclip_jax.cli.visa)."""
from fiseclip_jax.cli import visa

if __name__ == "__main__":
  visa.main()
