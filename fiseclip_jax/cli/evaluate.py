"""Benchmark evaluation (MVTec AD, VisA, BTAD: the paper's Table 1 protocol, DESIGN.md §12).

  fiseclip-evaluate --dataset mvtec --platform gpu --data_root DIR --weights FILE
      [--batch_size 16] [--categories bottle,screw] [--k_shot 4] [--out results/] [--resume]

`fiseclip-mvtec`, `fiseclip-visa` and `fiseclip-btad` (`python -m eval.mvtec` ... in a checkout)
are this program with --dataset set. Layouts: MVTec AD <root>/<category>/test/<defect>/<image>,
masks in <root>/<category>/ground_truth/<defect>/<stem>_mask.png, known-good images for --k_shot
in <root>/<category>/train/good/; VisA as distributed (split_csv/1cls.csv) or an APRIL-GAN / MuSc
meta.json; BTAD <category>/test/{ok,ko}, known-good train/ok, named 01-03 (the prompts use
--class_name, "product" by default).

Order of work: flags and config ranges, the output folder and an earlier run in it, the data
(layout, categories, every image header, every mask's size, the bank's images), the model's
shape against the knobs; only then JAX, the devices and the weights. Results are written after
each category, so an error or a kill loses nothing finished.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np
from absl import flags

from fiseclip_jax import data
from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.cli.progress import COMPILING, Progress
from fiseclip_jax.outputs.page import plural
from fiseclip_jax.data.order import draw, shuffled
from fiseclip_jax.data.tables import DATASETS, Dataset
from fiseclip_jax.data.tiles import frame_size
from fiseclip_jax.outputs import category as category_outputs
from fiseclip_jax.outputs import results
from fiseclip_jax.outputs.provenance import versions
from fiseclip_jax.outputs.run_folder import prepare_out

FLAGS = flags.FLAGS
RSCIN_KS = (1, 2, 3)   # RsCIN's window sizes, MuSc's on MVTec AD and BTAD (DESIGN.md §18)


def define_flags(dataset: Optional[str] = None) -> None:
  """The program's flags; dataset: the benchmark an alias fixes (None: --dataset chooses)."""
  flags.DEFINE_enum("dataset", dataset, list(DATASETS), "The benchmark's file layout.")
  options.define_run_flags("the benchmark's")
  options.define_bank_flags()
  options.define_method_flags(("batch", "bank", "both", options.CATEGORY),
                              exclude=("stream_window",))
  options.define_tile_flags()
  flags.DEFINE_bool("top_up", True, "Fill a category's short last batch with already-scored images "
                    "as references only, so every image has B - 1 (--notop_up: the paper's batching).")
  flags.DEFINE_enum("rescore", None, ["rscin"], "Re-score each category's image scores after "
                    "scoring: rscin, MuSc's RsCIN (each image with its most similar images of the "
                    f"category by CLS embedding, windows k = {', '.join(map(str, RSCIN_KS))}; "
                    "DESIGN.md §18). Maps are unchanged.")
  flags.DEFINE_string("class_name", None, "One object name in every category's prompts (default: "
                      "the category's name; BTAD: 'product').")
  flags.DEFINE_bool("save_maps", False, "Write every image's overlay (PNG at its own size) to maps/.")
  options.define_overlay_flags()
  flags.DEFINE_float("report_fpr", 0.05, "The image false-positive rate whose threshold on normal "
                     "images results.json records beside the F1-max thresholds.")
  flags.DEFINE_bool("report", True, "Write report.html, rebuilt after every category.")
  options.check("report_fpr", options.fraction, "a share in [0, 1)")
  options.check("class_name", lambda v: bool(v.strip()), "a non-empty object name")


def dataset() -> Dataset:
  if not FLAGS.dataset:
    raise UsageError(f"--dataset is required (one of {', '.join(DATASETS)})")
  ds = DATASETS[FLAGS.dataset]
  return ds.with_class_name(FLAGS.class_name) if FLAGS.class_name else ds


def _categories(ds: Dataset) -> List[str]:
  found = ds.categories(FLAGS.data_root)
  if FLAGS.categories is None:
    return found
  asked = [c.strip() for c in FLAGS.categories]     # none empty: checked when parsed
  twice = sorted({c for c in asked if asked.count(c) > 1})
  if twice:
    raise UsageError(f"--categories names {', '.join(twice)} more than once")
  unknown = [c for c in asked if c not in found]
  if unknown:
    raise UsageError(f"--categories: {', '.join(unknown)} not found in {FLAGS.data_root}; "
                     f"found {', '.join(found)}")
  return asked


def _check_files(samples, what: str, min_side: int) -> List[str]:
  """File checks; returns the unreadable images to skip (--skip_bad_images) or raises the first
  problem. A wrong mask is never skipped: it would bias the metrics."""
  problems = data.check_files(samples, min_side)
  fatal = [p for p in problems if p.in_mask or not FLAGS.skip_bad_images]
  if fatal:
    more = f" (and {len(fatal) - 1} more problem(s) in {what})" if len(fatal) > 1 else ""
    raise type(fatal[0].error)(f"{fatal[0].error}{more}")
  return [p.sample.path for p in problems]


class Plan(NamedTuple):
  samples: list       # the category's test samples in scoring order
  bank: list          # the drawn known-good samples ([] without --k_shot)
  unreadable: list    # paths found unreadable by the header check (skipped)


def plan(ds: Dataset, ckpts: runtime.Checkpoints, tiling=None) -> Dict[str, Plan]:
  """Every category's samples and bank, every file and class name checked (no pixel decoded);
  with tiles, every category's frames of one size."""
  out = {}
  min_side = runtime.min_image_side(ckpts)
  for cat in _categories(ds):
    runtime.check_class_name(ds.class_name(cat), ckpts,
                             "--class_name" if FLAGS.class_name else f"category {cat}'s name")
    samples = shuffled(ds.samples(FLAGS.data_root, cat), FLAGS.seed)
    bad = _check_files(samples, f"category {cat}", min_side)
    for path in bad:
      warn_skip(path, "its header cannot be read")
    bank = []
    if FLAGS.k_shot:
      bank = draw(ds.train_samples(FLAGS.data_root, cat), FLAGS.k_shot, FLAGS.seed)
      problems = data.check_files(bank, min_side)
      if problems:
        raise problems[0].error
    readable = [s for s in samples if s.path not in bad]
    if tiling is not None and readable:   # one frame size per category, the bank's too (§17)
      hw = frame_size(readable, f"category {cat}")
      if bank and frame_size(bank, f"category {cat}'s known-good images") != hw:
        raise data.BadInputError(f"--tile: category {cat}'s known-good image {bank[0].path} is "
                                 f"not the size of its test images ({hw[1]}x{hw[0]}, WxH)")
    out[cat] = Plan(samples, bank, bad)
  return out


def identity(ds: Dataset, conf, ckpts: runtime.Checkpoints) -> dict:
  """The settings a run's numbers depend on (a resumed run must have the same)."""
  config = conf.to_dict()
  if not conf.whole_category:        # as before the setting existed: earlier runs resume
    del config["reference_scope"]
  ident = {"dataset": ds.name, "data_root": os.path.abspath(FLAGS.data_root),
           "config": config, **ckpts.identity(), "seed": FLAGS.seed,
           "batch_size": FLAGS.batch_size, "k_shot": FLAGS.k_shot, "top_up": FLAGS.top_up}
  if FLAGS.tile is not None:         # only then: an untiled run keeps the identity it had
    ident["tiles"] = {"tile": FLAGS.tile, "overlap": FLAGS.tile_overlap}
  if FLAGS.rescore:
    ident["rescore"] = rescore_record()
  return ident


def run(ds: Optional[Dataset] = None) -> Dict[str, dict]:
  """The program's main (ds: a dataset to evaluate instead of --dataset's, e.g. the demo)."""
  ds = ds or dataset()
  has_bank = FLAGS.k_shot > 0
  options.check_run_flags(has_bank, FLAGS.references)
  tiling = options.tiling()
  if not FLAGS.data_root:
    raise UsageError(f"--data_root is required (the {ds.name} folder)")
  conf = options.fise_config(FLAGS.platform or "cpu", has_bank)     # ranges first; dtype once JAX is up
  ckpts = runtime.read_checkpoints()
  runtime.check_model(conf, ckpts)
  plans = plan(ds, ckpts, tiling)
  backend = runtime.start()
  if conf.whole_category and runtime.engine().jax.process_count() > 1:
    raise UsageError("--references category compares every image of a category with every "
                     "other on one process's devices; run it as one process (--num_devices "
                     "spreads it over this host's devices)")
  conf = options.fise_config(backend, has_bank)
  ident = identity(ds, conf, ckpts)
  done = prepare_out(FLAGS.out, ident, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                     record=results.RESULTS_JSON, needs="categories",
                     exclusive=runtime.engine().jax.process_index() == 0)
  return score_categories(ds, conf, ckpts, plans, ident, dict(done["categories"]) if done else {},
                          tiling)


def score_categories(ds: Dataset, conf, ckpts, plans: Dict[str, Plan], ident: dict,
                     done: Dict[str, dict], tiling=None) -> Dict[str, dict]:
  e = runtime.engine()
  devices = runtime.devices()
  mesh = e.sharding.make_mesh(devices)
  model = runtime.model_on(ckpts, mesh)
  is_main = e.jax.process_index() == 0
  print(f"{ds.name}: {plural(len(plans), 'category', 'categories')}, "
        f"{plural(len(devices), devices[0].platform + ' device')} x "
        f"{plural(e.jax.process_count(), 'process', 'processes')}, batch {FLAGS.batch_size}, "
        f"{conf.image_size}px, "
        f"{conf.compute_dtype}, references {conf.references}"
        + (" over the whole category" if conf.whole_category else "")
        + (f" (k_shot {FLAGS.k_shot})" if FLAGS.k_shot else "")
        + (f", tiles of {tiling.tile}px (overlap {tiling.overlap}) at each image's own size"
           if tiling else ""))
  header = {"identity": ident, "dataset": ds.name, "data_root": ident["data_root"],
            "config": conf.to_dict(), "model_config": dataclasses.asdict(ckpts.cfg),
            "checkpoint": ckpts.checkpoint, "fi_checkpoint": ckpts.fi_checkpoint,
            "batch_size": FLAGS.batch_size, "seed": FLAGS.seed, "versions": versions(),
            "rescore": rescore_record() if FLAGS.rescore else None,
            "devices": {"platform": devices[0].platform, "per_process": len(devices),
                        "processes": e.jax.process_count()}}
  where = category_outputs.CategoryOutputs(FLAGS.out, FLAGS.data_root, FLAGS.map_range,
                                           FLAGS.report_fpr, FLAGS.save_maps, FLAGS.overlay_legend)
  report_warned, compiled = False, False
  for cat, p in plans.items():
    if cat in done:
      print(f"  {cat}: done earlier (--resume), skipped")
      continue
    t0 = time.time()
    text = e.towers.text_features(model, ds.class_name(cat), conf)
    bad = set(p.unreadable)
    samples = [s for s in p.samples if s.path not in bad]
    # Multi-host: whole batches are dealt to processes, so every batch keeps its images together.
    starts = e.sharding.process_share(range(0, len(samples), FLAGS.batch_size))
    mine_index = [i for st in starts for i in range(st, min(st + FLAGS.batch_size, len(samples)))]
    progress = Progress(len(samples), f"  {cat}", enabled=FLAGS.progress and is_main,
                        waiting=None if compiled else COMPILING)
    compiled = True
    common = dict(indices=mine_index, model=model, conf=conf, text=text, mesh=mesh,
                  batch_size=FLAGS.batch_size, top_up_pool=samples if FLAGS.top_up else None,
                  with_masks=True, keep_maps=True, skip_bad_images=FLAGS.skip_bad_images,
                  on_progress=progress.update, on_skip=warn_skip)
    mine = [samples[i] for i in mine_index]
    if tiling is None:
      bank = e.towers.bank_on(model, conf, p.bank, mesh) if p.bank else None
      if conf.whole_category:
        del common["top_up_pool"]              # moot: every image is a reference of every other
        scored = e.category.score_category(mine, bank=bank, **common)
      else:
        scored = e.scoring.score_samples(mine, bank=bank, **common)
    else:
      hw = frame_size(samples, f"category {cat}") if samples else None
      banks = e.tiled.banks_on(model, conf, p.bank, tiling, hw, mesh) if p.bank else None
      scored = e.tiled.score_tiled(mine, tiling=tiling, banks=banks, **common)
    progress.close()
    scored = scored.gather().sorted()
    if FLAGS.rescore and len(scored.scores):
      scored = dataclasses.replace(scored, scores=np.asarray(
          e.rescore.rscin(scored.scores, scored.embeds, ks=RSCIN_KS), np.float32))
    if not is_main:
      continue
    if FLAGS.progress:
      print(f"  {cat}: computing the metrics and writing the outputs"
            + (" and the report" if FLAGS.report else ""), flush=True)
    result = category_outputs.category_result(cat, scored, p, time.time() - t0, FLAGS.report_fpr)
    print(category_outputs.summary_line(cat, result))
    done[cat] = category_outputs.write_category(where, cat, result, scored, samples)
    results.write_results(FLAGS.out, header, done)
    if FLAGS.report:
      warning = category_outputs.write_report(FLAGS.out)
      if warning and not report_warned:
        print(warning)
        report_warned = True
  if is_main:
    print(results.table({**done, "mean": {"metrics": results.mean_metrics(done)}}))
    print(f"wrote {os.path.join(FLAGS.out, results.RESULTS_JSON)}, results.csv and scores/ per category")
  return done


def rescore_record() -> dict:
  """How image scores were re-scored, as results.json records it."""
  return {"method": FLAGS.rescore, "ks": list(RSCIN_KS)}


def warn_skip(path: str, err: Exception) -> None:
  sys.stderr.write(f"warning: skipping unreadable image {path}: {err}\n")


def main(argv=None, dataset: Optional[str] = None) -> None:
  """The program; dataset: fixed by the fiseclip-mvtec / -visa / -btad aliases."""
  define_flags(dataset)
  app.run(run, __doc__, argv)


mvtec_main = functools.partial(main, dataset="mvtec")
visa_main = functools.partial(main, dataset="visa")
btad_main = functools.partial(main, dataset="btad")
