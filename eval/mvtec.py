"""Entry point in a checkout: `python -m eval.mvtec` runs `fiseclip-mvtec` (fiseclip_jax.cli.evaluate --dataset mvtec)."""
from fiseclip_jax.cli import evaluate

if __name__ == "__main__":
  evaluate.mvtec_main()
