"""Entry point in a checkout: `python -m eval.mvtec` runs `fiseclip-mvtec` (fiseclip_jax.cli.mvtec)."""
from fiseclip_jax.cli import mvtec

if __name__ == "__main__":
  mvtec.main()
