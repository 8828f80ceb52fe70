"""Data-parallel scoring over simulated devices and processes equals the single-device run."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from fiseclip_jax.run import sharding
from fiseclip_jax.data import demo_root

ROOT = Path(__file__).resolve().parents[1]
HAZELNUT = SHARED_DATA / "otx_hazelnut_colour"
DATA = HAZELNUT if HAZELNUT.exists() else Path(demo_root())      # a fresh clone has only the demo
FAST = ["--random_weights", "--model=demo", "--image_size=112", "--noprogress", "--platform=cpu"]


def run_eval(out, devices, *extra, env_extra=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  return subprocess.Popen([sys.executable, "-m", "eval.mvtec", f"--data_root={DATA}", f"--out={out}", *FAST, *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_all(procs, timeout=600):
  """Each process's stdout once all have exited (a straggler is killed); asserts all exited 0."""
  results = []
  for p in procs:
    try:
      results.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
      p.kill()
      results.append(p.communicate())
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), "\n".join(
      f"process {i}: exit {c}\n{out}\n{err[-4000:]}" for i, (c, (out, err)) in enumerate(zip(codes, results)))
  return [out for out, _ in results]


def read(out):
  doc = json.loads((out / "results.json").read_text())
  with open(out / "scores" / "hazelnut.csv") as f:
    rows = list(csv.DictReader(f))
  return doc, {r["path"]: float(r["score"]) for r in rows}


def assert_same(a, b):
  (doc_a, scores_a), (doc_b, scores_b) = read(a), read(b)
  assert scores_a.keys() == scores_b.keys() and len(scores_a) == 23
  assert max(abs(scores_a[k] - scores_b[k]) for k in scores_a) <= 1e-6
  ma, mb = doc_a["categories"]["hazelnut"]["metrics"], doc_b["categories"]["hazelnut"]["metrics"]
  for level in ma:
    for key in ma[level]:
      assert ma[level][key] == pytest.approx(mb[level][key], abs=1e-6), (level, key)


@pytest.mark.parametrize("batch_size", [3, 2])   # 8 batches (one whole round of 8) / 12 (8 + 4)
def test_eight_devices_equal_one(tmp_path, batch_size):
  one = run_eval(tmp_path / "one", 1, f"--batch_size={batch_size}")
  eight = run_eval(tmp_path / "eight", 8, f"--batch_size={batch_size}")
  _, out = finish_all([one, eight])
  assert "8 cpu devices x 1 process," in out
  assert_same(tmp_path / "one", tmp_path / "eight")


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port = free_port()
  procs = [run_eval(tmp_path / "multi", 4, "--batch_size=4", "--multihost", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}") for i in range(2)]
  outs = finish_all(procs)
  # The reference run after the pair: a third process on the 2 cores only widens the pair's drift
  # (test_gather_rows_after_processes_drift_apart pins that drift is survived).
  finish_all([run_eval(tmp_path / "single", 1, "--batch_size=4")])
  assert "x 2 processes," in outs[0]
  assert "wrote" in outs[0] and "wrote" not in outs[1]          # process 0 alone writes files
  assert_same(tmp_path / "single", tmp_path / "multi")


# Process 1 reaches its first gather 35 s after process 0: longer than the 30 s that JAX's CPU
# (gloo) collectives wait for their peers while they first connect. Scoring shares drift that far
# apart on a loaded machine; the gather must still meet.
DRIFTING_GATHER = """
import sys, time
import jax
import numpy as np
from fiseclip_jax.run import sharding
pid = int(sys.argv[2])
sharding.initialize(sys.argv[1], 2, pid)
jax.local_devices()                      # the backend starts (a programme then loads its model)
if pid == 1:
  time.sleep(35)
print(sharding.gather_rows(np.arange(pid + 1)).tolist())
"""


def test_gather_rows_after_processes_drift_apart():
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", DRIFTING_GATHER, f"localhost:{port}", str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = finish_all(procs, timeout=120)
  assert [out.splitlines()[-1] for out in outs] == ["[0, 0, 1]"] * 2     # unequal shares, process order


def test_pad_round_and_process_share():
  images, valid = np.ones((3, 2, 4, 4, 3), np.float32), np.ones((3, 2), bool)
  pi, pv = sharding.pad_round(images, valid, 8)
  assert pi.shape == (8, 2, 4, 4, 3) and pv[:3].all() and not pv[3:].any()
  assert sharding.process_share(range(10), 1, 3) == [1, 4, 7]
  rows = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(sharding.gather_rows(rows), rows)   # one process: unchanged


def test_a_round_compiles_to_no_collective():
  """Each device scores its own batch against replicated params (shard_map): the compiled round
  holds no all-reduce, all-gather, all-to-all, reduce-scatter or collective-permute."""
  code = """
import numpy as np, jax, fiseclip_jax as fj
from fiseclip_jax.method.spec import Params
from fiseclip_jax.run import sharding
cfg = fj.CLIPConfig.tiny()
conf = fj.FiSeConfig(image_size=56, feature_layers=(1, 2, 3, 4), proxy_layer=2)
mesh = sharding.make_mesh()
spec = fj.make_spec(cfg, conf)
p = Params(sharding.replicate(fj.init_params(cfg, 0), mesh), None)
n = mesh.devices.size
ones = np.ones((n, 3), bool)
roles = fj.Roles(ones, ones, np.zeros((n, 3), np.int32))
hlo = sharding.round_fn(mesh, spec).lower(p, np.zeros((n, 3, 56, 56, 3), np.float32), roles,
                                          np.zeros((2, cfg.embed_dim), np.float32), None).compile().as_text()
print(n, [c for c in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute") if c in hlo])
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.split() == ["4", "[]"], p.stdout
