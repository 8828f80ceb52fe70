"""Entry point in a checkout: `python -m eval.bench` runs `fiseclip-bench` (fiseclip_jax.cli.bench)."""
from fiseclip_jax.cli import bench

if __name__ == "__main__":
  bench.main()
