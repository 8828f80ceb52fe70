"""Fetch a checkpoint from the Hugging Face Hub for `fiseclip-convert --hf REPO_ID`.

Only what the converter reads is downloaded: config.json and ONE weights file, model.safetensors
first (nothing in it can run code), else pytorch_model.bin, else flax_model.msgpack (the order
sources.read_source reads a folder in); or, for an open_clip repo without that pair,
open_clip_config.json and open_clip_model.safetensors, else open_clip_pytorch_model.bin.
huggingface_hub does the rest as it does for transformers: its cache (HF_HOME, HF_HUB_CACHE),
HF_HUB_OFFLINE, the token (HF_TOKEN, `hf auth login`), HF_ENDPOINT. Offline, or with the Hub out
of reach, the cached snapshot of the revision is used if it holds such a pair.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence, Tuple

from fiseclip_jax.core.errors import CheckpointError

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# (config, weights) pairs, best first: a Hugging Face config before open_clip's, safetensors first.
CHOICES = (tuple(("config.json", w) for w in HF_WEIGHTS)
           + tuple((OPEN_CLIP_CONFIG, w) for w in OPEN_CLIP_WEIGHTS))
WANTED = (f"config.json with {', '.join(HF_WEIGHTS)}, nor {OPEN_CLIP_CONFIG} with "
          f"{' or '.join(OPEN_CLIP_WEIGHTS)}")
SRC_INSTEAD = "or download the folder yourself and pass --src"


class Fetched(NamedTuple):
  """A checkpoint in the local Hub cache and where it came from."""
  path: str                  # what sources.convert reads: the snapshot folder, or open_clip's file
  weights: str               # the weights file in it (the source whose sha256 is recorded)
  repo_id: str
  revision: str              # as asked ("main" by default)
  commit: str                # the commit that revision resolved to
  heads: Tuple[Optional[int], Optional[int]]   # open_clip's (vision, text) heads, else Nones


def fetch(repo_id: str, revision: Optional[str] = None) -> str:
  """A local path sources.convert accepts for a Hub repo at a revision (a branch, tag or commit;
  default main), downloading only the files it reads; CheckpointError if that cannot be done."""
  return fetch_checkpoint(repo_id, revision).path


def fetch_checkpoint(repo_id: str, revision: Optional[str] = None) -> Fetched:
  """fetch(), with the file, the commit and open_clip's head counts (for the record and the
  converter: open_clip state dicts do not store heads)."""
  where = f"{repo_id}@{revision}" if revision else repo_id
  try:
    from huggingface_hub import HfApi, errors, snapshot_download
  except ImportError as e:
    raise CheckpointError(f"{where}: --hf needs huggingface_hub (pip install huggingface_hub), "
                          f"{SRC_INSTEAD}") from e
  http_error = getattr(errors, "HTTPError", OSError)   # the HTTP client's base error
  try:
    try:
      names = HfApi().list_repo_files(repo_id, revision=revision)
    except errors.RevisionNotFoundError:
      raise
    except (OSError, http_error) as e:   # offline, no network, gated, private, Hub down: the cache
      folder, pair = _from_cache(repo_id, revision, where, e)
    else:
      pair = _choose(names, where)
      folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(pair))
      missing = [n for n in pair if not os.path.isfile(os.path.join(folder, n))]
      if missing:
        raise CheckpointError(f"{where}: {', '.join(missing)} missing from {folder} after the "
                              f"download; run again, {SRC_INSTEAD}")
  except CheckpointError:
    raise
  except errors.HFValidationError as e:
    raise CheckpointError(f"{repo_id!r}: not a Hub repo id (ORG/NAME): {_line(e)}") from e
  except (OSError, http_error) as e:
    raise CheckpointError(_explain(e, repo_id, where)) from e
  weights = os.path.join(folder, pair[1])
  is_open_clip = pair[0] == OPEN_CLIP_CONFIG
  return Fetched(path=weights if is_open_clip else folder, weights=weights, repo_id=repo_id,
                 revision=revision or "main", commit=os.path.basename(os.path.normpath(folder)),
                 heads=open_clip_heads(os.path.join(folder, OPEN_CLIP_CONFIG)) if is_open_clip
                 else (None, None))


def _choose(names: Sequence[str], where: str) -> Tuple[str, str]:
  """The best (config, weights) pair a repo's file list holds."""
  have = set(names)
  for pair in CHOICES:
    if set(pair) <= have:
      return pair
  sharded = any(n.endswith(".index.json") for n in names)
  raise CheckpointError(f"{where}: the repo holds no {WANTED}" + (
      " (sharded weights, *.index.json, are not read: merge the shards and pass --src)"
      if sharded else ""))


def _from_cache(repo_id: str, revision: Optional[str], where: str,
                why: BaseException) -> Tuple[str, Tuple[str, str]]:
  """(snapshot folder, pair) of the best pair cached for the revision, when the Hub cannot say
  which files the repo holds (why: the error that said so)."""
  from huggingface_hub import errors, snapshot_download
  incomplete = getattr(errors, "IncompleteSnapshotError", ())
  folder = None
  for pair in CHOICES:
    try:
      folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(pair),
                                 local_files_only=True)
    except incomplete:       # the cached file list names one of the pair, not on disk: the next
      continue
    except errors.LocalEntryNotFoundError:
      raise CheckpointError(_explain(why, repo_id, where)) from why
    if all(os.path.isfile(os.path.join(folder, n)) for n in pair):
      return folder, pair
  held = f"the cached snapshot {folder}" if folder else "its cached snapshot"
  raise CheckpointError(f"{_explain(why, repo_id, where)} ({held} holds no {WANTED})")


def _explain(e: BaseException, repo_id: str, where: str) -> str:
  """One line: what went wrong with a repo and what to do."""
  from huggingface_hub import constants, errors
  if isinstance(e, errors.RevisionNotFoundError):
    return f"{where}: the repo has no such revision (a branch, tag or commit)"
  login = "log in (`hf auth login` or HF_TOKEN)"
  if isinstance(e, errors.GatedRepoError):
    return (f"{where}: a gated repo: accept its terms on https://huggingface.co/{repo_id} and "
            f"{login}, {SRC_INSTEAD}")
  if isinstance(e, errors.RepositoryNotFoundError):
    return f"{where}: no such repo on the Hub, or a private one: check the name or {login}"
  cache = constants.HF_HUB_CACHE
  if isinstance(e, errors.OfflineModeIsEnabled):
    return (f"{where}: not in the local cache ({cache}) and HF_HUB_OFFLINE is set: run once "
            f"online, {SRC_INSTEAD}")
  if isinstance(e, errors.LocalEntryNotFoundError):
    if e.__cause__ is not None:                        # why the Hub was not asked
      return _explain(e.__cause__, repo_id, where)
    return f"{where}: not in the local cache ({cache}): run once online, {SRC_INSTEAD}"
  if isinstance(e, errors.HfHubHTTPError) or not isinstance(e, OSError):   # server, network
    return (f"{where}: not in the local cache ({cache}) and the Hub cannot be reached "
            f"({type(e).__name__}: {_line(e)}): check the network (HF_ENDPOINT, proxy) and "
            f"retry, {SRC_INSTEAD}")
  return f"{where}: download failed: {type(e).__name__}: {_line(e)}"   # e.g. a full disk


def _line(e: BaseException) -> str:
  """An exception's first line (huggingface_hub's messages run over several)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def open_clip_heads(config_path: str) -> Tuple[Optional[int], Optional[int]]:
  """(vision heads, text heads) from an open_clip_config.json, with open_clip's defaults
  (head_width 64, 8 text heads); None where it says nothing (e.g. a timm or HF text tower)."""
  try:
    with open(config_path, encoding="utf-8") as f:
      model = json.load(f).get("model_cfg", {})
    vision, text = model.get("vision_cfg", {}), model.get("text_cfg", {})
    v = int(vision["width"]) // int(vision.get("head_width", 64)) if "width" in vision else None
    t = int(text.get("heads", 8)) if "width" in text else None
  except (OSError, ValueError, TypeError, AttributeError, ZeroDivisionError) as e:
    raise CheckpointError(f"{config_path}: not a readable open_clip config: {e}") from e
  return v, t
