"""BTAD evaluation (`<category>/test/{ok,ko}`, masks matched by stem).

BTAD's categories are named 01, 02, 03: the prompts use `--class_name` (default "product").

  python -m eval.btad --platform gpu --data_root DIR --weights FILE
"""
from absl import app, flags

from eval import common

common.define_flags("BTAD")
flags.DEFINE_string("class_name", "product", "Object name in the prompts (BTAD names categories 01-03).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from fiseclip_jax import data
  common.run_dataset(FLAGS, "BTAD", data.btad_categories, data.btad_samples, lambda _: FLAGS.class_name)


if __name__ == "__main__":
  app.run(common.clean_errors(main))
