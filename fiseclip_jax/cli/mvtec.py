"""MVTec AD evaluation (the paper's Table 1 protocol).

  fiseclip-mvtec --platform gpu --data_root DIR --weights FILE [--batch_size 16]
      [--categories bottle,screw] [--k_shot 4] [--out results/] [--resume] [--save_maps]

(`python -m eval.mvtec ...` in a checkout.) Layout: <root>/<category>/test/<defect>/<image>,
masks in <root>/<category>/ground_truth/<defect>/<stem>_mask.png, known-good images for --k_shot
in <root>/<category>/train/good/.
"""
from fiseclip_jax.cli import app, dataset_run


def dataset() -> dataset_run.Dataset:
  from fiseclip_jax import data
  return dataset_run.Dataset("MVTec AD", data.mvtec_categories, data.mvtec_samples,
                             data.mvtec_train_samples, data.class_name)


def main(argv=None) -> None:
  dataset_run.define_flags("MVTec AD")
  app.run(lambda: dataset_run.run(dataset()), __doc__, argv)
