"""Entry point in a checkout: `python -m eval.visa` runs `fiseclip-visa` (fiseclip_jax.cli.evaluate --dataset visa)."""
from fiseclip_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.visa_main()
