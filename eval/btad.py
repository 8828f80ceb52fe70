"""Entry point in a checkout: `python -m eval.btad` runs `fiseclip-btad` (fiseclip_jax.cli.btad)."""
from fiseclip_jax.cli import btad

if __name__ == "__main__":
  btad.main()
