"""The benchmark programs (MVTec AD, VisA, BTAD): check everything, then score category by category.

Order of work: flags and config ranges, the output folder and an earlier run in it, the data
(layout, categories, every image header, every mask's size, the bank's images), the model's
shape against the knobs; only then JAX, the devices and the weights. Results are written after
each category, so an error or a kill loses nothing finished.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple

import numpy as np
from absl import flags

from fiseclip_jax import reports
from fiseclip_jax.cli import options, outputs, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.cli.progress import Progress

FLAGS = flags.FLAGS


class Dataset(NamedTuple):
  """How a benchmark lays out its files."""
  name: str
  categories: Callable            # (root) -> [category]
  samples: Callable               # (root, category) -> [Sample] test split
  train_samples: Callable         # (root, category) -> [Sample] known-good training images
  class_name: Callable            # (category) -> the object's name in the prompts


def define_flags(what: str) -> None:
  options.define_run_flags(what)
  options.define_bank_flags()
  options.define_method_flags(("batch", "bank", "both"))
  flags.DEFINE_bool("top_up", True, "Fill a category's short last batch with already-scored images "
                    "as references only, so every image has B - 1 (--notop_up: the paper's batching).")
  outputs.define_flags()


def shuffled(samples, seed: int) -> list:
  """A fixed shuffled order: batches mix good and defective images reproducibly."""
  order = np.random.RandomState(seed).permutation(len(samples))
  return [samples[i] for i in order]


def _categories(ds: Dataset) -> List[str]:
  found = ds.categories(FLAGS.data_root)
  if FLAGS.categories is None:
    return found
  asked = [c.strip() for c in FLAGS.categories]
  if any(not c for c in asked):
    raise UsageError(f"--categories {','.join(FLAGS.categories)}: an empty name; expected "
                     f"comma-separated names from {', '.join(found)}")
  unknown = [c for c in asked if c not in found]
  if unknown:
    raise UsageError(f"--categories: {', '.join(unknown)} not found in {FLAGS.data_root}; "
                     f"found {', '.join(found)}")
  return asked


def _check_files(samples, what: str) -> List[str]:
  """Header checks; returns the unreadable images to skip (--skip_bad_images) or raises the first
  problem. A wrong mask is never skipped: it would bias the metrics."""
  from fiseclip_jax import data
  problems = data.check_files(samples)
  fatal = [p for p in problems if p.in_mask or not FLAGS.skip_bad_images]
  if fatal:
    more = f" (and {len(fatal) - 1} more problem(s) in {what})" if len(fatal) > 1 else ""
    raise type(fatal[0].error)(f"{fatal[0].error}{more}")
  return [p.sample.path for p in problems]


class Plan(NamedTuple):
  samples: list       # the category's test samples in scoring order
  bank: list          # the drawn known-good samples ([] without --k_shot)
  unreadable: list    # paths found unreadable by the header check (skipped)


def plan(ds: Dataset) -> Dict[str, Plan]:
  """Every category's samples and bank, every file checked (nothing decoded)."""
  out = {}
  for cat in _categories(ds):
    samples = shuffled(ds.samples(FLAGS.data_root, cat), FLAGS.seed)
    bad = _check_files(samples, f"category {cat}")
    for path in bad:
      warn_skip(path, "its header cannot be read")
    bank = []
    if FLAGS.k_shot:
      from fiseclip_jax import scoring
      bank = scoring.draw(ds.train_samples(FLAGS.data_root, cat), FLAGS.k_shot, FLAGS.seed)
      from fiseclip_jax import data
      problems = data.check_files(bank)
      if problems:
        raise problems[0].error
    out[cat] = Plan(samples, bank, bad)
  return out


def identity(ds: Dataset, conf, spec: runtime.ModelSpec) -> dict:
  """The settings a run's numbers depend on (a resumed run must have the same)."""
  return {"dataset": ds.name, "data_root": os.path.abspath(FLAGS.data_root),
          "config": conf.to_dict(), **spec.identity(), "seed": FLAGS.seed, "batch_size": FLAGS.batch_size, "k_shot": FLAGS.k_shot,
          "top_up": FLAGS.top_up}


def prepare_out(ident: dict) -> Dict[str, dict]:
  """The categories already done (--resume), after checking the folder and the run in it."""
  options.check_out_dir(FLAGS.out)
  done = reports.load_run(FLAGS.out) if FLAGS.resume else None
  if done is not None:
    try:
      reports.check_resume(done, ident, FLAGS.out)
    except reports.RunMismatch as e:
      raise UsageError(str(e)) from None
    return done["categories"]
  earlier = reports.earlier_outputs(FLAGS.out)
  if earlier and not FLAGS.resume:
    if not FLAGS.overwrite:
      raise UsageError(f"--out {FLAGS.out} holds an earlier run ({', '.join(earlier)}): pass "
                       "--resume to continue it, --overwrite to replace it, or another --out")
    reports.remove_outputs(FLAGS.out)
  return {}


def run(ds: Dataset) -> Dict[str, dict]:
  """The main of eval.mvtec / eval.visa / eval.btad."""
  has_bank = FLAGS.k_shot > 0
  options.check_run_flags(has_bank, FLAGS.references)
  if not FLAGS.data_root:
    raise UsageError(f"--data_root is required (the {ds.name} folder)")
  conf = options.fise_config(FLAGS.platform or "cpu", has_bank)     # ranges first; dtype once JAX is up
  spec = runtime.model_spec()
  runtime.check_model(conf, spec)
  plans = plan(ds)
  backend = runtime.setup_backend()
  conf = options.fise_config(backend, has_bank)
  ident = identity(ds, conf, spec)
  results = prepare_out(ident)
  return score_categories(ds, conf, spec, plans, ident, results)


def score_categories(ds: Dataset, conf, spec, plans: Dict[str, Plan], ident: dict,
                     results: Dict[str, dict]) -> Dict[str, dict]:
  import jax
  from fiseclip_jax import scoring, sharding
  devices = runtime.devices()
  mesh = sharding.make_mesh(devices)
  model = runtime.model_on(spec, mesh)
  is_main = jax.process_index() == 0
  print(f"{ds.name}: {len(plans)} categories, {len(devices)} {devices[0].platform} device(s) x "
        f"{jax.process_count()} process(es), batch {FLAGS.batch_size}, {conf.image_size}px, "
        f"{conf.compute_dtype}, references {conf.references}"
        + (f" (k_shot {FLAGS.k_shot})" if FLAGS.k_shot else ""))
  header = {"identity": ident, "dataset": ds.name, "data_root": ident["data_root"],
            "config": conf.to_dict(), "model_config": dataclasses.asdict(spec.cfg),
            "checkpoint": spec.checkpoint, "fi_checkpoint": spec.fi_checkpoint,
            "batch_size": FLAGS.batch_size, "seed": FLAGS.seed, "versions": runtime.versions(),
            "devices": {"platform": devices[0].platform, "per_process": len(devices),
                        "processes": jax.process_count()}}
  for cat, p in plans.items():
    if cat in results:
      print(f"  {cat}: done earlier (--resume), skipped")
      continue
    t0 = time.time()
    text = runtime.text_features(model, ds.class_name(cat), conf)
    bank = runtime.bank_on(model, conf, p.bank, mesh) if p.bank else None
    bad = set(p.unreadable)
    samples = [s for s in p.samples if s.path not in bad]
    # Multi-host: whole batches are dealt to processes, so every batch keeps its images together.
    starts = sharding.process_share(range(0, len(samples), FLAGS.batch_size))
    mine_index = [i for st in starts for i in range(st, min(st + FLAGS.batch_size, len(samples)))]
    progress = Progress(len(samples), f"  {cat}", enabled=FLAGS.progress and is_main)
    scored = scoring.score_samples(
        [samples[i] for i in mine_index], indices=mine_index, model=model, conf=conf,
        text=text, mesh=mesh, batch_size=FLAGS.batch_size, bank=bank,
        top_up_pool=samples if FLAGS.top_up else None, with_masks=True, keep_maps=True,
        skip_bad_images=FLAGS.skip_bad_images, on_progress=progress.update, on_skip=warn_skip)
    progress.close()
    scored = scored.gather().sorted()
    if not is_main:
      continue
    result = outputs.category_result(cat, scored, p, time.time() - t0)
    outputs.print_summary(cat, result)
    results[cat] = outputs.write_category(cat, result, scored, samples)
    reports.write_results(FLAGS.out, header, results)
    outputs.write_report()
  if is_main:
    print(reports.table({**results, "mean": {"metrics": reports.mean_metrics(results)}}))
    print(f"wrote {os.path.join(FLAGS.out, reports.RESULTS_JSON)}, results.csv and scores/ per category")
  return results


def warn_skip(path: str, err: Exception) -> None:
  sys.stderr.write(f"warning: skipping unreadable image {path}: {err}\n")
