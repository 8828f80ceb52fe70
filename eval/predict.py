"""Entry point in a checkout: `python -m eval.predict` runs `fiseclip-predict` (fiseclip_jax.cli.predict)."""
from fiseclip_jax.cli import predict

if __name__ == "__main__":
  predict.main()
