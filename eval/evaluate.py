"""Entry point in a checkout: `python -m eval.evaluate --dataset ...` runs `fiseclip-evaluate` (fiseclip_jax.cli.evaluate)."""
from fiseclip_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.main()
