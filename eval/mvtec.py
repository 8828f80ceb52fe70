"""MVTec AD evaluation (the paper's Table 1 protocol).

  python -m eval.mvtec --platform gpu --data_root DIR --weights FILE [--batch_size 16]
      [--categories bottle,screw] [--out results/] [--resume] [--save_maps]
"""
from absl import app, flags

from eval import common

common.define_flags("MVTec AD")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from fiseclip_jax import data
  common.run_dataset(FLAGS, "MVTec AD", data.mvtec_categories, data.mvtec_samples, data.class_name)


if __name__ == "__main__":
  app.run(common.clean_errors(main))
