"""How many copies of one defect a batch survives: the repeated-defect stress benchmark.

  fiseclip-stress --category_dir ../shared/data/otx_hazelnut_colour/hazelnut --random_weights \
      --model demo --image_size 112 --out results/stress

(`python -m eval.stress ...` in a checkout.) One real defect (a ground-truth region of the
category's test images, --defect_index) is pasted into k of --batch_size known-good images
(train/good, MVTec layout), at its own place or at random places; the batch is scored with each
reference mode (batch, bank of --bank_size other good images, both) and aggregation (interval,
min). Written to --out: stress.json (every cell, its per-image scores) and stress.md (the table:
pixel AUROC of the pasted region / image AUROC of its images, per k). docs/STRESS.md reads it.
"""
from __future__ import annotations

import dataclasses
import os

from absl import flags

from fiseclip_jax import data
from fiseclip_jax.bench.stress_config import StressConfig
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.core.files import atomic_write
from fiseclip_jax.outputs.files import write_json
from fiseclip_jax.outputs.provenance import versions

FLAGS = flags.FLAGS


def define_flags() -> None:
  options.define_tower_flags()
  flags.DEFINE_string("category_dir", None, "Required: a category folder in MVTec layout "
                      "(train/good, test/<defect>, ground_truth/<defect>).")
  flags.DEFINE_string("class_name", None, "The class name of the prompts (default: the "
                      "folder's name).")
  flags.DEFINE_string("out", "results/stress", "Output folder.")
  options.define_method_flags(exclude=("references", "ref_agg", "stream_window", "resize",
                                       "reference_scope"))
  for f in dataclasses.fields(StressConfig):
    options.define_field_flag(f)


def inputs(sc: StressConfig):
  """(good samples of the batch, of the bank, the defective sample) from --category_dir."""
  root = FLAGS.category_dir
  if not root or not os.path.isdir(os.path.join(root, "train", "good")):
    raise UsageError(f"--category_dir {root}: expected a category folder with train/good/")
  parent, category = os.path.split(os.path.abspath(root))
  goods = data.mvtec_train_samples(parent, category)
  need = sc.batch_size + (sc.bank_size if {"bank", "both"} & set(sc.references) else 0)
  if len(goods) < need:
    raise UsageError(f"--category_dir {root}: train/good has {len(goods)} images; --batch_size "
                     f"{sc.batch_size} and --bank_size {sc.bank_size} need {need}")
  defects = [s for s in data.mvtec_samples(parent, category) if s.label == 1 and s.mask_path]
  if sc.defect_index >= len(defects):
    raise UsageError(f"--defect_index {sc.defect_index}: {root} has {len(defects)} defective "
                     "test images with masks")
  return goods[:sc.batch_size], goods[sc.batch_size:need], defects[sc.defect_index]


def run() -> None:
  sc = options.build(StressConfig, options.field_values(StressConfig))
  options.check_weight_flags()
  batch, bank, defect = inputs(sc)
  conf = options.fise_config(FLAGS.platform or "cpu", False)
  ckpts = runtime.read_checkpoints()
  runtime.check_model(conf, ckpts)
  os.makedirs(FLAGS.out, exist_ok=True)
  runtime.start()
  e = runtime.stress_engine()
  mesh = e.sharding.make_mesh(e.jax.local_devices()[:1])
  model = runtime.model_on(ckpts, mesh)
  name = FLAGS.class_name or data.class_name(os.path.basename(os.path.abspath(FLAGS.category_dir)))
  text = e.towers.text_features(model, name, conf)
  size = conf.image_size
  img = e.preprocess.read_rgb(defect.path)
  pasted = e.stress.Defect(e.preprocess.preprocess_image(img, size),
                           e.preprocess.load_mask(defect.mask_path, size, defect.path,
                                                  (img.height, img.width)))
  print(f"defect {defect.path} ({int(pasted.mask.sum())} of {size * size} pixels at {size} px) "
        f"into k of {sc.batch_size} images of {FLAGS.category_dir}/train/good")
  rows = e.stress.run(model, conf, text, e.towers.load_images(batch, size),
                      e.towers.load_images(bank, size) if bank else None, pasted, sc)
  write_json(os.path.join(FLAGS.out, "stress.json"), {
      "stress": dataclasses.asdict(sc), "method": dataclasses.asdict(conf),
      "model": ckpts.identity(), "defect": defect.path, "defect_pixels": int(pasted.mask.sum()),
      "batch": [s.path for s in batch], "bank": [s.path for s in bank], "rows": rows,
      "random_weights": ckpts.random, "versions": versions()})
  table = e.stress.markdown(rows)
  atomic_write(os.path.join(FLAGS.out, "stress.md"), table)
  print(table + f"pixel AUROC / image AUROC; written to {FLAGS.out}/stress.json and stress.md")


def main(argv=None) -> None:
  define_flags()
  app.run(run, __doc__, argv)
