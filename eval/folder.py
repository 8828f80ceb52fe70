"""Score unlabeled images from a line: per-image scores (CSV) and heat-map overlays (PNG).

  python -m eval.folder --images DIR --class_name "metal nut" --weights FILE --out DIR

No ground truth is needed. Images are scored against each other in batches of --batch_size; a
single image (or a last batch of one) gets SeCLIP's result alone, and the program says so.
"""
import os

import numpy as np
from absl import app, flags, logging

from eval import common

common.define_flags("folder", with_data_root=False)
flags.DEFINE_string("images", None, "Folder of images to score.")
flags.DEFINE_string("class_name", None, "What the images show, as in the prompts (e.g. 'metal nut').")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  from fiseclip_jax import data, sharding
  common.setup_platform(FLAGS)
  if not FLAGS.images or not FLAGS.class_name:
    raise flags.ValidationError("--images DIR and --class_name NAME are required")
  params, cfg, _ = common.load_model(FLAGS)
  conf = common.fise_config(FLAGS)
  devices = jax.local_devices()[:FLAGS.num_devices] if FLAGS.num_devices else jax.local_devices()
  mesh = sharding.make_mesh(devices)
  params = sharding.replicate(params, mesh)
  samples = data.folder_samples(FLAGS.images)
  if len(samples) == 1:
    print("one image: no reference for feature matching, scoring with SeCLIP alone")
  os.makedirs(FLAGS.out, exist_ok=True)

  def on_batch(b, maps, _scores):
    for s, v, m in zip(b.samples, b.valid, maps):
      if v:
        stem = os.path.splitext(os.path.basename(s.path))[0]
        common.save_overlay(os.path.join(FLAGS.out, "maps", stem + ".png"), s.path, m)
        np.save(os.path.join(FLAGS.out, "maps", stem + ".npy"), m.astype(np.float16))

  r = common.run_category("images", samples, FLAGS.class_name, params, cfg, conf, mesh, FLAGS.batch_size,
                          with_masks=False, skip_bad_images=FLAGS.skip_bad_images,
                          progress=FLAGS.progress, on_batch=on_batch)
  order = np.argsort(r.index, kind="stable")
  path = os.path.join(FLAGS.out, "scores.csv")
  common.write_scores(path, [samples[i].path for i in r.index[order]], r.labels[order], r.scores[order])
  print(f"scored {len(r.scores)} images ({len(r.scores) / max(r.seconds, 1e-9):.2f} img/s): {path}, "
        f"overlays and maps in {os.path.join(FLAGS.out, 'maps')}")
  logging.info("done")


if __name__ == "__main__":
  app.run(common.clean_errors(main))
