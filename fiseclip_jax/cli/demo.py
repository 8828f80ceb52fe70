"""The whole pipeline on the embedded demo set, no download: real images, RANDOM weights.

  fiseclip-demo [--out results/demo]        (python -m eval.demo in a checkout)

Runs the MVTec AD evaluation on the 23 hazelnut test images shipped in the package (Apache-2.0,
see fiseclip_jax/data/demo/NOTICE.txt) with a small random CLIP (24 blocks, width 64), so the
metrics show the machinery works, not how good FiSeCLIP is. For real numbers convert ViT-L/14-336
(README) and run `fiseclip-mvtec --weights ...`.
"""
from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app, evaluate
from fiseclip_jax.data.tables import DATASETS

FLAGS = flags.FLAGS
BANNER = ("=" * 78 + "\nDEMO WITH RANDOM WEIGHTS: real images, untrained model. The numbers are MEANINGLESS\n"
          "as a measure of FiSeCLIP (random patch features alone separate this set's colour\n"
          "stains); they show that the pipeline runs end to end. Real numbers need the real\n"
          "ViT-L/14-336 weights (README).\n" + "=" * 78)


def _run() -> None:
  FLAGS.data_root = FLAGS.data_root or data.demo_root()
  if not FLAGS.weights:
    FLAGS.random_weights, FLAGS.model = True, "demo"
  print(BANNER)
  evaluate.run(DATASETS["mvtec"]._replace(name="demo (embedded hazelnut set)"))
  if not FLAGS.weights:
    print(BANNER)


def main(argv=None) -> None:
  evaluate.define_flags("mvtec")
  FLAGS.set_default("batch_size", 8)
  FLAGS.set_default("out", "results/demo")
  FLAGS.set_default("overwrite", True)          # rerunning the demo replaces the last one
  app.run(_run, __doc__, argv)
