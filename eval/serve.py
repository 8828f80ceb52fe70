"""Entry point in a checkout: `python -m eval.serve` runs `fiseclip-serve` (fiseclip_jax.cli.serve)."""
from fiseclip_jax.cli import serve

if __name__ == "__main__":
  serve.main()
