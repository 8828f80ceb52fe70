"""BTAD evaluation (`<category>/test/{ok,ko}`, masks matched by stem, known-good `train/ok`).

BTAD names its categories 01, 02, 03: the prompts use --class_name (default "product").

  fiseclip-btad --platform gpu --data_root DIR --weights FILE [--k_shot 4]

(`python -m eval.btad ...` in a checkout.)
"""
from absl import flags

from fiseclip_jax.cli import app, dataset_run

FLAGS = flags.FLAGS


def dataset() -> dataset_run.Dataset:
  from fiseclip_jax import data
  return dataset_run.Dataset("BTAD", data.btad_categories, data.btad_samples,
                             data.btad_train_samples, lambda _: FLAGS.class_name)


def main(argv=None) -> None:
  dataset_run.define_flags("BTAD")
  flags.DEFINE_string("class_name", "product", "Object name in the prompts (BTAD names its "
                      "categories 01-03).")
  app.run(lambda: dataset_run.run(dataset()), __doc__, argv)
