"""VisA evaluation (as distributed: split_csv/1cls.csv; or an APRIL-GAN / MuSc meta.json).

  fiseclip-visa --platform gpu --data_root DIR --weights FILE [--k_shot 4] [--out results/]

(`python -m eval.visa ...` in a checkout.) --k_shot draws the bank from the split's normal
training images.
"""
from fiseclip_jax.cli import app, dataset_run


def dataset() -> dataset_run.Dataset:
  from fiseclip_jax import data
  return dataset_run.Dataset("VisA", data.visa_categories, data.visa_samples,
                             data.visa_train_samples, data.class_name)


def main(argv=None) -> None:
  dataset_run.define_flags("VisA")
  app.run(lambda: dataset_run.run(dataset()), __doc__, argv)
