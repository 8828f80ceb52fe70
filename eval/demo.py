"""Entry point in a checkout: `python -m eval.demo` runs `fiseclip-demo` (fiseclip_jax.cli.demo)."""
from fiseclip_jax.cli import demo

if __name__ == "__main__":
  demo.main()
