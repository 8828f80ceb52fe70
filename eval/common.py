"""What every evaluation program shares: flags, model set-up, the category loop, tables and files.

Per category: samples in a fixed shuffled order, batches of B slots (the last padded), rounds of one
batch per device, metrics, then results.json / results.csv / scores/<category>.csv rewritten at
once, so a crash loses nothing already finished and `--resume` skips finished categories.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform as pyplatform
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from absl import flags, logging

METRIC_COLUMNS = (("pixel", "auroc"), ("pixel", "f1_max"), ("pixel", "ap"), ("pixel", "aupro"),
                  ("image", "auroc"), ("image", "f1_max"), ("image", "ap"))
HEADERS = ("px-AUROC", "px-F1max", "px-AP", "AU-PRO", "im-AUROC", "im-F1max", "im-AP")


def define_flags(dataset: str, with_data_root: bool = True) -> None:
  """The flags of the evaluation programs (absl), FiSeConfig knobs included."""
  f = flags
  f.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "JAX platform (set before any device use).")
  if with_data_root:
    f.DEFINE_string("data_root", None, f"{dataset} root folder.")
    f.DEFINE_list("categories", None, "Categories to run (default: all found).")
  f.DEFINE_string("weights", None, "Converted checkpoint (python -m weights.convert).")
  f.DEFINE_bool("random_weights", False, "Random weights instead of --weights (numbers are meaningless).")
  f.DEFINE_enum("model", "vit_l14_336", ["vit_l14_336", "demo"], "Architecture for --random_weights.")
  f.DEFINE_integer("batch_size", 16, "Images per batch (B): each image is scored against the others.")
  f.DEFINE_integer("seed", 0, "Seed of the fixed shuffled image order.")
  f.DEFINE_string("out", "results", "Output folder.")
  f.DEFINE_bool("resume", False, "Skip categories already in OUT/results.json.")
  f.DEFINE_bool("save_maps", False, "Write heat-map overlays (PNG) per image.")
  f.DEFINE_bool("skip_bad_images", False, "Skip unreadable images with a warning instead of failing.")
  f.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, multi-node).")
  f.DEFINE_string("coordinator_address", None, "With --multihost off TPU: host:port of process 0.")
  f.DEFINE_integer("num_processes", None, "With --multihost off TPU: number of processes.")
  f.DEFINE_integer("process_id", None, "With --multihost off TPU: this process's index.")
  f.DEFINE_integer("num_devices", None, "Use only the first N local devices (default: all).")
  f.DEFINE_bool("progress", True, "Progress line with images/s on stderr.")
  # FiSeConfig knobs (paper defaults).
  d = _default_conf()
  f.DEFINE_integer("image_size", d.image_size, "Input side S (multiple of the patch size).")
  f.DEFINE_list("feature_layers", [str(i) for i in d.feature_layers], "1-based feature blocks.")
  f.DEFINE_list("r_list", [str(r) for r in d.r_list], "LNAMD neighbourhoods, in filtering order.")
  f.DEFINE_integer("proxy_layer", d.proxy_layer, "Block whose attention SeCLIP borrows.")
  f.DEFINE_enum("proxy_heads", d.proxy_heads, ["mean", "per_head"], "Proxy attention over heads.")
  f.DEFINE_enum("proxy_attention", d.proxy_attention, ["layer", "vv", "qq", "kk"], "Proxy attention kind.")
  f.DEFINE_float("lam", d.lam, "Initial mask threshold: P_a > lam * P_n.")
  f.DEFINE_float("mu", d.mu, "Intermediate mask threshold on FiCLIP scores.")
  f.DEFINE_enum("vote", d.vote, ["majority", "and", "or", "text", "off"], "Mask refinement rule.")
  f.DEFINE_enum("filter_loop", d.filter_loop, ["r", "layer", "flat"], "Filtering steps (Table 2).")
  f.DEFINE_enum("ref_agg", d.ref_agg, ["interval", "min"], "Aggregation over references.")
  f.DEFINE_float("topk_frac", d.topk_frac, "Interval mean over the k = frac * n_ref closest references.")
  f.DEFINE_float("se_weight", None, "Share of SeCLIP's P_a in the map (default 1 / (1 + len(r_list))).")
  f.DEFINE_enum("image_score", d.image_score, ["mean", "max", "cls"], "Image score rule.")
  f.DEFINE_float("sigma", d.sigma, "Gaussian smoothing of the maps.")
  f.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "Default: bfloat16 on GPU/TPU, float32 on CPU.")
  f.DEFINE_integer("pair_chunk", d.pair_chunk, "Image pairs per step of the matching loop.")
  f.DEFINE_enum("attention_impl", None, ["xla", "cudnn"],
                "Attention kernel (default: cuDNN on GPU in bfloat16, XLA elsewhere).")


def clean_errors(main):
  """Wrap an absl main: bad input (data, checkpoint, flags) ends with one clear line, exit 1.

  Categories finished before the error are already on disk (results are written one by one).
  """
  def wrapped(argv):
    from fiseclip_jax.checkpoint import CheckpointError
    from fiseclip_jax.data import BadInputError
    try:
      return main(argv)
    except (BadInputError, CheckpointError, flags.ValidationError) as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(1)
  return wrapped


def _default_conf():
  from fiseclip_jax.config import FiSeConfig  # kept lazy: no jax import before --platform
  return FiSeConfig()


def setup_platform(FLAGS) -> None:
  """--platform and --multihost, before anything touches a device."""
  import jax
  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.multihost:
    from fiseclip_jax import sharding
    sharding.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def fise_config(FLAGS):
  """FiSeConfig from the flags; compute dtype by platform unless --compute_dtype is given."""
  import jax
  dtype = FLAGS.compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  return _default_conf().replace(
      image_size=FLAGS.image_size, feature_layers=tuple(int(i) for i in FLAGS.feature_layers),
      r_list=tuple(int(r) for r in FLAGS.r_list), proxy_layer=FLAGS.proxy_layer,
      proxy_heads=FLAGS.proxy_heads, proxy_attention=FLAGS.proxy_attention, lam=FLAGS.lam, mu=FLAGS.mu,
      vote=FLAGS.vote, filter_loop=FLAGS.filter_loop, ref_agg=FLAGS.ref_agg, topk_frac=FLAGS.topk_frac,
      se_weight=FLAGS.se_weight, image_score=FLAGS.image_score, sigma=FLAGS.sigma,
      compute_dtype=dtype, pair_chunk=FLAGS.pair_chunk, attention_impl=FLAGS.attention_impl)


DEMO_CONFIG = dict(vision_layers=24, image_size=224, patch_size=14, width=64)


def load_model(FLAGS):
  """(params, cfg, checkpoint description) from --weights or --random_weights."""
  import fiseclip_jax as fj
  if FLAGS.weights:
    params, cfg = fj.load_checkpoint(FLAGS.weights)
    from fiseclip_jax.checkpoint import read_metadata, sha256_file
    meta = read_metadata(FLAGS.weights)
    return params, cfg, {"weights": os.path.abspath(FLAGS.weights), "sha256": sha256_file(FLAGS.weights),
                         "source_sha256": meta.get("source_sha256", "")}
  if not FLAGS.random_weights:
    raise flags.ValidationError("pass --weights FILE (convert one with `python -m weights.convert`) "
                                "or --random_weights")
  cfg = fj.CLIPConfig.tiny(**DEMO_CONFIG) if FLAGS.model == "demo" else fj.CLIPConfig.vit_l14_336()
  logging.warning("RANDOM WEIGHTS (%s): the pipeline runs end to end but the numbers are meaningless.", FLAGS.model)
  return fj.init_params(cfg, seed=0), cfg, {"weights": f"random:{FLAGS.model}:seed0", "sha256": None}


def versions() -> Dict[str, Optional[str]]:
  """Installed versions of the packages that matter (None: not installed)."""
  from importlib import metadata
  import fiseclip_jax
  out = {"python": pyplatform.python_version(), "fiseclip_jax": fiseclip_jax.__version__}
  for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


@dataclasses.dataclass
class CategoryResult:
  """Per-image outputs of one category (this process's share until `gather`ed)."""
  index: np.ndarray            # (n,) position of each scored image in the category's sample list
  labels: np.ndarray           # (n,)
  scores: np.ndarray           # (n,)
  maps: Optional[np.ndarray]   # (n, S, S) float32, only where metrics need them
  masks: Optional[np.ndarray]  # (n, S, S) bool
  seconds: float
  seclip_only: int

  def gather(self) -> "CategoryResult":
    """Multi-host: every process's images, on every process (single process: unchanged)."""
    from fiseclip_jax.sharding import gather_rows
    g = lambda x: None if x is None else gather_rows(x)
    return dataclasses.replace(self, index=g(self.index), labels=g(self.labels), scores=g(self.scores),
                               maps=g(self.maps), masks=g(self.masks))

  def metrics(self, category: str) -> Dict[str, Dict[str, float]]:
    import fiseclip_jax as fj
    if self.maps is None or not len(self.scores):
      return {}
    if not np.isfinite(self.maps).all() or not np.isfinite(self.scores).all():
      raise FloatingPointError(f"{category}: non-finite scores or maps")
    return {"image": fj.metrics.image_metrics(self.labels, self.scores),
            "pixel": fj.metrics.pixel_metrics(self.masks, self.maps)}


def warn_lonely(category: str, n: int, batch_size: int, log=logging.warning) -> int:
  """Warn on the host when an image would have no reference; returns how many such images."""
  if n == 1:
    log("%s: a single image: no reference for feature matching, scored with SeCLIP alone", category)
    return 1
  if n % batch_size == 1:
    log("%s: the last batch holds one image (%d images, batch %d): it is scored with SeCLIP alone; "
        "pick another --batch_size to avoid it", category, n, batch_size)
    return 1
  return 0


def run_category(category: str, samples, class_name: str, params, cfg, conf, mesh, batch_size: int,
                 *, with_masks: bool, skip_bad_images: bool, progress: bool,
                 on_batch: Optional[Callable] = None,
                 sample_index: Optional[Sequence[int]] = None) -> CategoryResult:
  """Score one category's samples: rounds of one batch per device.

  sample_index: each sample's position in the whole category (multi-host shares), default 0..n-1.
  """
  import fiseclip_jax as fj
  from fiseclip_jax import sharding
  from fiseclip_jax.data import iter_batches
  t0 = time.time()
  n_dev = mesh.devices.size
  text = fj.text_features(params, cfg, class_name, conf)
  size = conf.image_size
  sample_index = range(len(samples)) if sample_index is None else sample_index
  index_of = {id(x): i for x, i in zip(samples, sample_index)}
  index, labels, scores, maps, masks = [], [], [], [], []
  lonely = warn_lonely(category, len(samples), batch_size)
  batches = iter_batches(samples, batch_size, size, with_masks=with_masks, skip_bad_images=skip_bad_images)
  done, pending = 0, []

  def flush(round_batches):
    images = np.stack([b.images for b in round_batches])
    valid = np.stack([b.valid for b in round_batches])
    images, valid = sharding.pad_round(images, valid, n_dev)
    out = sharding.detect_round(mesh, params, cfg, conf, images, valid, text)
    host = sharding.unshard_outputs(out)
    for j, b in enumerate(round_batches):
      sl = slice(j * batch_size, (j + 1) * batch_size)
      keep = b.valid
      index.extend(index_of[id(s)] for s, v in zip(b.samples, keep) if v)
      labels.append(b.labels[keep])
      scores.append(host["image_scores"][sl][keep])
      maps.append(host["anomaly_maps"][sl][keep])
      if b.masks is not None:
        masks.append(b.masks[keep])
      if on_batch is not None:
        on_batch(b, host["anomaly_maps"][sl], host["image_scores"][sl])
    return sum(int(b.valid.sum()) for b in round_batches)

  for batch in batches:
    pending.append(batch)
    if len(pending) == n_dev:
      done += flush(pending)
      pending = []
      if progress:
        rate = done / max(time.time() - t0, 1e-9)
        sys.stderr.write(f"\r  {category}: {done}/{len(samples)} images, {rate:.1f} img/s ")
        sys.stderr.flush()
  if pending:
    done += flush(pending)
  if progress:
    sys.stderr.write(f"\r  {category}: {done}/{len(samples)} images, {done / max(time.time() - t0, 1e-9):.1f} img/s\n")
  cat = lambda xs, shape, dtype: np.concatenate(xs) if xs else np.zeros(shape, dtype)
  return CategoryResult(
      index=np.asarray(index, np.int64), labels=cat(labels, (0,), np.int32),
      scores=cat(scores, (0,), np.float32),
      maps=cat(maps, (0, size, size), np.float32) if with_masks else None,
      masks=cat(masks, (0, size, size), bool) if with_masks else None,
      seconds=time.time() - t0, seclip_only=lonely)


def shuffled(samples: Sequence, seed: int) -> list:
  """A fixed shuffled order: batches mix good and defective images reproducibly."""
  order = np.random.RandomState(seed).permutation(len(samples))
  return [samples[i] for i in order]


def _fmt(x) -> str:
  return "   -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:6.1f}"


def table(results: Dict[str, dict]) -> str:
  """The paper's Table 1 columns, per category and mean, in percent."""
  width = max([len("category")] + [len(c) for c in results] + [len("mean")])
  lines = [f"{'category':<{width}}  " + "  ".join(f"{h:>8}" for h in HEADERS)]
  for cat, r in results.items():
    m = r["metrics"]
    row = [m.get(level, {}).get(key) for level, key in METRIC_COLUMNS]
    lines.append(f"{cat:<{width}}  " + "  ".join(f"{_fmt(v):>8}" for v in row))
  return "\n".join(lines)


def mean_metrics(results: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
  """Mean over categories of each metric (nan-skipping: undefined metrics do not count)."""
  out: Dict[str, Dict[str, float]] = {}
  for level, key in METRIC_COLUMNS:
    vals = [r["metrics"].get(level, {}).get(key) for r in results.values()]
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    out.setdefault(level, {})[key] = float(np.mean(vals)) if vals else None
  return out


def _json_safe(x):
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return None if np.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(out_dir: str, header: dict, results: Dict[str, dict]) -> None:
  """results.json (config, versions, per category and mean) and results.csv, rewritten whole."""
  doc = dict(header)
  doc["categories"] = results
  doc["mean"] = mean_metrics(results) if results else {}
  _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(_json_safe(doc), indent=2, sort_keys=True))
  rows = [["category"] + [f"{lvl}_{key}" for lvl, key in METRIC_COLUMNS] + ["n_images", "images_per_s"]]
  for cat, r in list(results.items()) + [("mean", {"metrics": doc["mean"]})]:
    vals = [r["metrics"].get(lvl, {}).get(key) for lvl, key in METRIC_COLUMNS]
    rows.append([cat] + ["" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.6f}" for v in vals]
                + [r.get("n_images", ""), f"{r['timing']['images_per_s']:.3f}" if "timing" in r else ""])
  tmp = os.path.join(out_dir, "results.csv.tmp")
  with open(tmp, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  os.replace(tmp, os.path.join(out_dir, "results.csv"))


def write_scores(path: str, paths: Sequence[str], labels, scores) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label", "score"])
    for p, l, s in zip(paths, labels, scores):
      w.writerow([p, int(l), f"{float(s):.8f}"])
  os.replace(tmp, path)


def save_overlay(path: str, image_path: str, anomaly_map: np.ndarray) -> None:
  """Heat map (jet-like, min-max normalized per image) blended over the input image."""
  from PIL import Image
  from fiseclip_jax.data import to_uint8_rgb
  size = anomaly_map.shape[0]
  rgb = to_uint8_rgb(image_path, size).astype(np.float32)
  m = anomaly_map - anomaly_map.min()
  m = m / max(float(m.max()), 1e-12)
  heat = np.stack([np.clip(1.5 - np.abs(4 * m - 3), 0, 1), np.clip(1.5 - np.abs(4 * m - 2), 0, 1),
                   np.clip(1.5 - np.abs(4 * m - 1), 0, 1)], -1) * 255
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray((0.5 * rgb + 0.5 * heat).astype(np.uint8)).save(path)


def overlay_writer(out_dir: str, data_root: str) -> Callable:
  """A run_category callback writing each valid image's overlay (every process its own share)."""
  def write(batch, maps, _scores):
    for s, v, m in zip(batch.samples, batch.valid, maps):
      if v:
        name = os.path.splitext(os.path.relpath(s.path, data_root).replace(os.sep, "__"))[0] + ".png"
        save_overlay(os.path.join(out_dir, name), s.path, m)
  return write


def run_dataset(FLAGS, dataset: str, list_categories: Callable, list_samples: Callable,
                class_name: Callable[[str], str]) -> Dict[str, dict]:
  """The main loop of eval.mvtec / eval.visa / eval.btad."""
  import jax
  from fiseclip_jax import sharding
  setup_platform(FLAGS)
  if not FLAGS.data_root:
    raise flags.ValidationError(f"--data_root is required (the {dataset} folder)")
  params, cfg, ckpt = load_model(FLAGS)
  conf = fise_config(FLAGS)
  cats = FLAGS.categories or list_categories(FLAGS.data_root)
  devices = jax.local_devices()[:FLAGS.num_devices] if FLAGS.num_devices else jax.local_devices()
  mesh = sharding.make_mesh(devices)
  params = sharding.replicate(params, mesh)
  is_main = jax.process_index() == 0
  logging.info("%s: %d categories on %d device(s) (%s) per process, %d process(es), B=%d, S=%d, %s",
               dataset, len(cats), len(devices), devices[0].platform, jax.process_count(),
               FLAGS.batch_size, conf.image_size, conf.compute_dtype)
  print(f"{dataset}: {len(cats)} categories, {len(devices)} {devices[0].platform} device(s) x "
        f"{jax.process_count()} process(es), batch {FLAGS.batch_size}, {conf.image_size}px, {conf.compute_dtype}")
  os.makedirs(FLAGS.out, exist_ok=True)
  results: Dict[str, dict] = {}
  json_path = os.path.join(FLAGS.out, "results.json")
  if FLAGS.resume and os.path.isfile(json_path):
    with open(json_path) as f:
      results = json.load(f).get("categories", {})
    logging.info("resuming: %d categories already done (%s)", len(results), ", ".join(results))
  header = {"dataset": dataset, "data_root": os.path.abspath(FLAGS.data_root), "config": conf.to_dict(),
            "clip_config": cfg.to_dict(), "checkpoint": ckpt, "batch_size": FLAGS.batch_size,
            "seed": FLAGS.seed, "versions": versions(),
            "devices": {"platform": devices[0].platform, "per_process": len(devices),
                        "processes": jax.process_count()}}
  for cat in cats:
    if cat in results:
      print(f"  {cat}: done earlier (--resume), skipped")
      continue
    samples = shuffled(list_samples(FLAGS.data_root, cat), FLAGS.seed)
    # Multi-host: whole batches are dealt to processes, so every batch keeps its images together.
    starts = sharding.process_share(range(0, len(samples), FLAGS.batch_size))
    mine_index = [i for st in starts for i in range(st, min(st + FLAGS.batch_size, len(samples)))]
    mine = [samples[i] for i in mine_index]
    on_batch = (overlay_writer(os.path.join(FLAGS.out, "maps", cat), os.path.join(FLAGS.data_root, cat))
                if FLAGS.save_maps else None)
    r = run_category(cat, mine, class_name(cat), params, cfg, conf, mesh, FLAGS.batch_size,
                     with_masks=True, skip_bad_images=FLAGS.skip_bad_images,
                     progress=FLAGS.progress and is_main, on_batch=on_batch, sample_index=mine_index)
    r = r.gather()
    if not is_main:
      continue
    n = len(r.scores)
    results[cat] = {"metrics": r.metrics(cat), "n_images": n, "seclip_only_images": r.seclip_only,
                    "timing": {"seconds": r.seconds, "images_per_s": n / max(r.seconds, 1e-9)}}
    order = np.argsort(r.index, kind="stable")
    write_scores(os.path.join(FLAGS.out, "scores", f"{cat}.csv"), [samples[i].path for i in r.index[order]],
                 r.labels[order], r.scores[order])
    write_results(FLAGS.out, header, results)
  if is_main:
    print(table({**results, "mean": {"metrics": mean_metrics(results)}}))
    print(f"wrote {json_path}, {os.path.join(FLAGS.out, 'results.csv')} and scores/ per category")
  return results

