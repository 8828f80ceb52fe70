"""VisA evaluation: `split_csv/1cls.csv` as distributed, or the APRIL-GAN / MuSc `meta.json`.

  python -m eval.visa --platform gpu --data_root DIR --weights FILE
"""
from absl import app, flags

from eval import common

common.define_flags("VisA")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from fiseclip_jax import data
  common.run_dataset(FLAGS, "VisA", data.visa_categories, data.visa_samples, data.class_name)


if __name__ == "__main__":
  app.run(common.clean_errors(main))
