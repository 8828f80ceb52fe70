"""weights.convert --hf: a Hub repo gives the same file as --src on its folder; errors are one line.

Offline, with no mock: HF_HUB_OFFLINE=1 and HF_HOME at a temporary folder whose hub cache is
written the way huggingface_hub writes it (its docs "Understand caching"): blobs named by their
git blob sha1 (small files) or sha256 (LFS files), snapshots/<commit>/<file> relative symlinks to
them, refs/main holding the commit. huggingface_hub has no public call that writes this cache
without the network, so it is written by hand and its own scan_cache_dir and
try_to_load_from_cache must see it before anything else is tested.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_convert import hf_to_openai

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]
CLIP_REPO, OPEN_CLIP_REPO = "testorg/tiny-clip", "testorg/tiny-open-clip"
NO_WEIGHTS_REPO = "testorg/cfg-only"
LFS_SUFFIXES = (".safetensors", ".bin", ".msgpack")


def commit_of(repo_id: str) -> str:
  return hashlib.sha1(repo_id.encode()).hexdigest()


def blob_name(name: str, data: bytes) -> str:
  """The name huggingface_hub gives a blob: its ETag, an LFS file's sha256, else git's blob sha1."""
  if name.endswith(LFS_SUFFIXES):
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache: Path, repo_id: str, files: dict) -> str:
  """Write a model repo at one commit (the main branch) into a hub cache; files: name -> bytes."""
  commit = commit_of(repo_id)
  root = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = root / "snapshots" / commit
  for d in (root / "blobs", root / "refs", snapshot):
    d.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    blob = root / "blobs" / blob_name(name, data)
    blob.write_bytes(data)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
  (root / "refs" / "main").write_text(commit)            # no newline, as huggingface_hub writes it
  return commit


def open_clip_config() -> dict:
  """open_clip_config.json of conftest's tiny CLIP; head counts that width // 64 would get wrong."""
  return {"model_cfg": {"embed_dim": 24,
                        "vision_cfg": {"image_size": 56, "layers": 4, "width": 48, "head_width": 12,
                                       "patch_size": 14},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                     "heads": 4, "layers": 2}},
          "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                             "std": [0.26862954, 0.26130258, 0.27577711]}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, hf_clip_dir):
  """The environment of an offline machine whose hub cache holds the tiny CLIP as a transformers
  repo and as an open_clip repo, and a repo with config.json but no weights."""
  from safetensors.torch import load_file, save_file
  home = tmp_path_factory.mktemp("hf_home")
  cache = home / "hub"                                   # HF_HOME's default cache
  hf_files = {n: (hf_clip_dir / n).read_bytes() for n in ("config.json", "model.safetensors")}
  cache_repo(cache, CLIP_REPO, dict(hf_files, **{"README.md": b"# tiny clip\n"}))
  oc_dir = tmp_path_factory.mktemp("open_clip")
  oc_weights = oc_dir / "open_clip_model.safetensors"
  oa = hf_to_openai(load_file(str(hf_clip_dir / "model.safetensors")), extras=False)
  save_file({k: v.contiguous() for k, v in oa.items()}, str(oc_weights))
  cache_repo(cache, OPEN_CLIP_REPO,
             {"open_clip_config.json": json.dumps(open_clip_config()).encode(),
              "open_clip_model.safetensors": oc_weights.read_bytes()})
  cache_repo(cache, NO_WEIGHTS_REPO, {"config.json": hf_files["config.json"]})
  env = {k: v for k, v in os.environ.items()
         if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT")}
  env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
  return {"env": env, "cache": cache, "hf_dir": hf_clip_dir, "open_clip_file": oc_weights}


def parts(path):
  """A safetensors file's whole bytes: `save_checkpoint` writes the header with sorted keys (the
  safetensors library's own order changes from one process to the next), so equal conversions
  are equal files."""
  return Path(path).read_bytes()


def cli(hub, *args):
  return subprocess.run([sys.executable, "-m", "weights.convert", *map(str, args)], cwd=REPO,
                        env=hub["env"], capture_output=True, text=True, timeout=300)


def test_huggingface_hub_sees_the_cache(hub):
  from huggingface_hub import scan_cache_dir, try_to_load_from_cache
  info = scan_cache_dir(hub["cache"])
  assert not info.warnings, info.warnings
  repos = {r.repo_id: r for r in info.repos}
  assert sorted(repos) == sorted([CLIP_REPO, OPEN_CLIP_REPO, NO_WEIGHTS_REPO])
  for repo_id, repo in repos.items():
    (rev,) = repo.revisions
    assert rev.commit_hash == commit_of(repo_id) and rev.refs == {"main"}
  assert {f.file_name for f in next(iter(repos[CLIP_REPO].revisions)).files} == {
      "config.json", "model.safetensors", "README.md"}
  got = try_to_load_from_cache(CLIP_REPO, "model.safetensors", cache_dir=hub["cache"])
  assert got == str(hub["cache"] / f"models--testorg--tiny-clip/snapshots/{commit_of(CLIP_REPO)}"
                    / "model.safetensors")


def test_hf_repo_same_file_as_src_folder(hub, tmp_path):
  a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
  r = cli(hub, f"--hf={CLIP_REPO}", f"--out={a}")
  assert r.returncode == 0, r.stderr
  assert (f"source {CLIP_REPO} revision main (commit {commit_of(CLIP_REPO)}) file "
          "model.safetensors sha256 ") in r.stdout
  r = cli(hub, f"--src={hub['hf_dir']}", f"--out={b}")
  assert r.returncode == 0, r.stderr
  assert parts(a) == parts(b)            # the source is recorded by its file name and sha256


def test_open_clip_repo_same_file_as_src_file(hub, tmp_path):
  """The weights file is converted, with open_clip_config.json's heads (48 // 64 would be 0)."""
  a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
  r = cli(hub, f"--hf={OPEN_CLIP_REPO}", f"--revision={commit_of(OPEN_CLIP_REPO)}", f"--out={a}")
  assert r.returncode == 0, r.stderr
  assert (f"{OPEN_CLIP_REPO} revision {commit_of(OPEN_CLIP_REPO)} (commit "
          f"{commit_of(OPEN_CLIP_REPO)}) file open_clip_model.safetensors sha256") in r.stdout
  r = cli(hub, f"--src={hub['open_clip_file']}", "--vision_heads=4", "--text_heads=4",
          f"--out={b}")
  assert r.returncode == 0, r.stderr
  assert parts(a) == parts(b)


def fetch_errors(hub, *calls):
  """hub.fetch's path, or 'error: ' and its message, for each (repo_id, revision); one process."""
  code = ("import json, sys\nfrom fiseclip_jax.convert import hub\nfrom fiseclip_jax.core.errors import "
          "CheckpointError\nout = []\nfor repo, rev in json.loads(sys.argv[1]):\n  try:\n"
          "    out.append(hub.fetch(repo, rev))\n  except CheckpointError as e:\n"
          "    out.append('error: ' + str(e))\nprint(json.dumps(out))\n")
  r = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], cwd=REPO, env=hub["env"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.splitlines()[-1])


def test_fetch_offline(hub):
  cache = str(hub["cache"])
  snapshot = os.path.join(cache, "models--testorg--tiny-clip", "snapshots", commit_of(CLIP_REPO))
  got = fetch_errors(hub, (CLIP_REPO, None), (CLIP_REPO, commit_of(CLIP_REPO)), (CLIP_REPO, "v9"),
                     (NO_WEIGHTS_REPO, None), ("not a repo", None))
  assert got[0] == got[1] == snapshot
  assert got[2].startswith(f"error: {CLIP_REPO}@v9: not in the local cache ({cache}) and "
                           "HF_HUB_OFFLINE is set"), got[2]
  assert got[3].startswith(f"error: {NO_WEIGHTS_REPO}: not in the local cache"), got[3]
  assert "holds no config.json with model.safetensors" in got[3], got[3]
  assert got[4].startswith("error: 'not a repo': not a Hub repo id"), got[4]
  assert all("\n" not in g for g in got)


def test_uncached_repo_offline(hub, tmp_path):
  out = tmp_path / "out.safetensors"
  r = cli(hub, "--hf=testorg/absent", f"--out={out}")
  assert r.returncode == 1
  assert r.stderr.startswith("error: testorg/absent: not in the local cache"), r.stderr
  assert "HF_HUB_OFFLINE is set: run once online" in r.stderr and "--src" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
  assert not out.exists()


@pytest.mark.parametrize("args", [[f"--hf={CLIP_REPO}", "--src=x"], [],
                                  ["--revision=main", "--src=x"]])
def test_usage_errors(hub, tmp_path, args):
  r = cli(hub, *args, f"--out={tmp_path / 'out.safetensors'}")
  assert r.returncode == 2 and r.stderr.startswith("error: --"), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
