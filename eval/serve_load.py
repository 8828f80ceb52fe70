"""Entry point in a checkout: `python -m eval.serve_load` runs `fiseclip-serve-load`
(fiseclip_jax.cli.serve_load)."""
from fiseclip_jax.cli import serve_load

if __name__ == "__main__":
  serve_load.main()
