"""The whole pipeline on the embedded demo set, no download: real images, RANDOM weights.

  python -m eval.demo [--out results/demo]

Runs `eval.mvtec` on the 23 hazelnut test images shipped in the package (Apache-2.0, see
fiseclip_jax/data/demo/NOTICE.txt) with a small random CLIP (24 blocks, width 64), so the metrics
show the machinery works, not how good FiSeCLIP is. For real numbers convert ViT-L/14-336
(README) and run `python -m eval.mvtec --weights ...`.
"""
from absl import app, flags

from eval import common

common.define_flags("demo")
FLAGS = flags.FLAGS
BANNER = ("=" * 78 + "\nDEMO WITH RANDOM WEIGHTS: real images, untrained model. The numbers are MEANINGLESS\n"
          "as a measure of FiSeCLIP (random patch features alone separate this set's colour\n"
          "stains); they show that the pipeline runs end to end. Real numbers need the real\n"
          "ViT-L/14-336 weights (README).\n" + "=" * 78)


def main(argv):
  del argv
  from fiseclip_jax import data
  FLAGS.data_root = FLAGS.data_root or data.demo_root()
  if not FLAGS.weights:
    FLAGS.random_weights, FLAGS.model = True, "demo"
  print(BANNER)
  common.run_dataset(FLAGS, "demo (embedded hazelnut set)", data.mvtec_categories, data.mvtec_samples,
                     data.class_name)
  if not FLAGS.weights:
    print(BANNER)


if __name__ == "__main__":
  flags.FLAGS.set_default("batch_size", 8)
  flags.FLAGS.set_default("out", "results/demo")
  app.run(common.clean_errors(main))
