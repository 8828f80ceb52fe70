"""Entry point in a checkout: `python -m eval.btad` runs `fiseclip-btad` (fiseclip_jax.cli.evaluate --dataset btad)."""
from fiseclip_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.btad_main()
