"""fiseclip-serve as a line and an inspector use it: the server a subprocess on a free localhost
port, called over HTTP. A bounded load loses nothing and fails nothing and gives `predict`'s
scores; bad inputs are 4xx on one line and the server goes on; two rolling lines interleaved
each get the scores of their own stream; the page, in headless Chromium, shows a posted part."""
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax.deploy import load

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "fiseclip_jax" / "data" / "demo" / "hazelnut" / "test"
MODEL = ["--random_weights", "--model=demo", "--image_size=112", "--platform=cpu",
         "--class_name=hazelnut", "--batch_size=4"]
TOKEN = "s3cret-for-tests"
# Scores: the same compiled program on the same machine, the part alone in predict and among
# others in the service's batch (bank references: a part's score does not depend on the others).
SCORE_TOL = 1e-5


def program(name, *args):
  p = subprocess.run([sys.executable, "-m", f"eval.{name}", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, f"eval.{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}"
  return p


class Server:
  """`python -m eval.serve BUNDLE --port 0 ...` and the lines it prints (read as they come)."""

  def __init__(self, bundle, *flags):
    self.proc = subprocess.Popen([sys.executable, "-m", "eval.serve", str(bundle), "--port=0",
                                  "--platform=cpu", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
    self.lines: "queue.Queue[str]" = queue.Queue()
    self.log = []
    threading.Thread(target=self._read, daemon=True).start()
    deadline = time.time() + 300
    while time.time() < deadline:
      try:
        line = self.lines.get(timeout=1)
      except queue.Empty:
        assert self.proc.poll() is None, "the server died:\n" + "".join(self.log)
        continue
      if line.startswith("serving http://"):
        self.url = line.split()[1]
        return
    raise AssertionError("the server did not start in 300 s:\n" + "".join(self.log))

  def _read(self):
    for line in self.proc.stdout:
      self.log.append(line)
      self.lines.put(line)

  def get(self, path, token=None):
    req = urllib.request.Request(self.url.rstrip("/") + path)
    if token:
      req.add_header("Authorization", f"Bearer {token}")
    try:
      with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
      return e.code, e.headers.get("content-type"), e.read()

  def post(self, data, content_type, query="", token=None):
    return load.post(self.url.rstrip("/") + "/v1/score" + query, data, content_type, token)

  def alive(self):
    return self.proc.poll() is None

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(30)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def encoded(path, fmt=None, size=None):
  """(bytes, content type) of an image file, re-encoded as fmt (and resized) if asked."""
  if fmt is None:
    return path.read_bytes(), "image/jpeg"
  with Image.open(path) as img:
    img = img.convert("RGB")
    if size:
      img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
  return buf.getvalue(), f"image/{fmt.lower()}"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A bank bundle (3 known-good demo parts) and a rolling one, and the parts a line posts."""
  d = tmp_path_factory.mktemp("serve")
  good = sorted((DEMO / "good").iterdir())
  (d / "bank").mkdir()
  for p in good[:3]:
    shutil.copy(p, d / "bank" / p.name)
  program("bundle", *MODEL, f"--normal_images={d / 'bank'}", "--references=bank",
          "--threshold=0.3", "--pixel_threshold=0.5", f"--out={d / 'bank.bundle'}")
  program("bundle", *MODEL, "--references=rolling", "--threshold=0.3",
          f"--out={d / 'rolling.bundle'}")
  parts = sorted((DEMO / "colour").iterdir())[:6] + good[3:]
  images = [encoded(p) for p in parts[:4]] + [encoded(parts[4], "PNG", (300, 200)),
                                              encoded(parts[5], "PNG")]
  images += [encoded(p) for p in parts[6:]]
  return d, images


@pytest.fixture(scope="module")
def bank_server(made):
  s = Server(made[0] / "bank.bundle", "--max_bytes=2000000", "--max_pixels=4000000",
             "--max_wait_ms=20", f"--cache_dir={made[0] / 'cache'}")
  yield s
  s.stop()


@pytest.fixture(scope="module")
def rolling_server(made):
  s = Server(made[0] / "rolling.bundle", f"--token={TOKEN}", f"--cache_dir={made[0] / 'cache'}")
  yield s
  s.stop()


def predicted(bundle, images, line=None):
  from fiseclip_jax.deploy.predictor import Predictor
  p = Predictor.load(str(bundle), cache_dir="")
  return p.predict([Image.open(io.BytesIO(b)) for b, _ in images], line=line)


def test_a_bounded_load_loses_nothing_and_scores_as_predict(made, bank_server):
  d, images = made
  r = load.run(bank_server.url, images, clients=8, requests=25)
  assert r["sent"] == r["answered"] == r["ok"] == 200, sorted(
      {a.body.get("error", "") for a in r["answers"] if a.status != 200})
  alone = predicted(d / "bank.bundle", images)
  for a in r["answers"]:
    want = alone[a.image]
    assert abs(a.body["score"] - want.score) <= SCORE_TOL, (a.image, a.body["score"], want.score)
    assert a.body["label"] == want.label == int(want.score >= 0.3)
    assert a.body["decision"] == ("NG" if want.label else "OK")
    assert a.body["n_ref"] == want.n_ref == 3 and a.body["seclip_only"] is False
    assert a.body["threshold"] == pytest.approx(0.3)
  ids = [a.body["id"] for a in r["answers"]]
  assert len(set(ids)) == 200
  # The batches were gathered (fewer batches than parts) and every request logged one line.
  status, _, body = bank_server.get("/v1/health")
  health = json.loads(body)
  assert status == 200 and health["scored"] >= 200 and health["batches"] < health["scored"]
  time.sleep(0.5)
  assert sum("POST /v1/score 200" in line for line in bank_server.log) >= 200
  # The last part's links: its picture and overlay at the page's size, its mask at its own size.
  last = max((a for a in r["answers"]), key=lambda a: a.body["id"]).body
  for kind, ctype in (("image", "image/jpeg"), ("overlay", "image/jpeg"), ("mask", "image/png")):
    status, got_type, data = bank_server.get(last["links"][kind])
    assert status == 200 and got_type == ctype, (kind, status, data[:200])
    with Image.open(io.BytesIO(data)) as img:
      if kind == "mask":
        assert img.size == tuple(last["size"])
      else:
        assert max(img.size) <= 640
  status, _, data = bank_server.get(f"/v1/parts/{last['id'] - 150}/overlay.jpg")
  assert status == 404 and "--keep" in json.loads(data)["error"]


def _png_header(w, h):
  """A PNG whose header says w x h (its pixels never follow): a decompression bomb's shape."""
  import struct
  import zlib
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  chunk = b"IHDR" + ihdr
  idat = b"IDAT" + zlib.compress(b"\0" * 64)
  return b"\x89PNG\r\n\x1a\n" + b"".join(
      struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in (chunk, idat))


def _multipart(fields, boundary="XyZzy"):
  """A multipart/form-data body of (name, filename or None, bytes) fields."""
  out = b""
  for name, filename, data in fields:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    out += (f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
  return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_bad_inputs_are_4xx_on_one_line_and_the_next_part_is_served(made, bank_server):
  _, images = made
  good, ctype = images[0]
  jpeg = bytearray(good)
  tiny = encoded(DEMO / "good" / "04.jpg", "PNG", (5, 5))[0]
  form_ok, form_type = _multipart([("line", None, b"x"), ("image", "part.jpg", good)])
  form_none, form_none_type = _multipart([("note", None, b"hello")])
  cases = [
      ("not an image", b"this is not an image", "image/png", "", 422, "not a readable image"),
      ("cut short", bytes(jpeg[: len(jpeg) // 3]), "image/jpeg", "", 422, "not a readable image"),
      ("over the size limit", b"\xff" * 2_100_000, "image/jpeg", "", 413, "--max_bytes"),
      ("over the pixel limit", _png_header(4000, 4000), "image/png", "", 413, "--max_pixels"),
      ("wrong content type", good, "text/plain", "", 415, "Content-Type 'text/plain'"),
      ("no content type", good, "", "", 415, "Content-Type"),
      ("empty body", b"", "image/png", "", 400, "empty body"),
      ("a 5 x 5 image", tiny, "image/png", "", 422, "at least 14"),
      ("a form without a file", form_none, form_none_type, "", 400, "expected one image"),
      ("a bad line id", good, ctype, "?line=" + "a/b", 400, "line 'a/b'"),
  ]
  for what, body, content_type, query, status, words in cases:
    got, answer = bank_server.post(body, content_type, query)
    assert got == status, (what, got, answer)
    assert set(answer) == {"error"} and "\n" not in answer["error"] and words in answer["error"], \
        (what, answer)
    ok, answer = bank_server.post(good, ctype)               # the next part is served
    assert ok == 200 and "score" in answer, (what, answer)
  ok, raw = bank_server.post(good, ctype)
  ok2, answer = bank_server.post(form_ok, form_type)         # a multipart upload is the same part
  assert ok == ok2 == 200 and answer["name"] == "part.jpg", answer
  assert abs(answer["score"] - raw["score"]) <= SCORE_TOL
  for path, status in (("/v1/nothing", 404), ("/v1/parts?after=x", 400),
                       ("/v1/parts/1/other.png", 404)):
    got, _, data = bank_server.get(path)
    assert got == status and set(json.loads(data)) == {"error"}, (path, got, data)
  assert bank_server.alive()
  assert not any("Traceback" in line for line in bank_server.log), "".join(bank_server.log)


def test_two_rolling_lines_interleaved_each_get_their_own_streams_scores(made, rolling_server):
  _, images = made
  streams = {"a": images[:5], "b": images[5:] + images[:2]}
  answers = {}

  def post_line(k):
    answers[k] = [rolling_server.post(b, t, f"?line={k}", TOKEN) for b, t in streams[k]]

  threads = [threading.Thread(target=post_line, args=(k,)) for k in streams]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  bundle = made[0] / "rolling.bundle"
  for k, stream in streams.items():
    assert all(s == 200 for s, _ in answers[k]), answers[k]
    alone = predicted(bundle, stream, line=k)
    got = [a["score"] for _, a in answers[k]]
    np.testing.assert_allclose(got, [p.score for p in alone], rtol=0, atol=SCORE_TOL)
    assert [a["n_ref"] for _, a in answers[k]] == [p.n_ref for p in alone]
    assert [a["line"] for _, a in answers[k]] == [k] * len(stream)
  assert answers["a"][0][1]["seclip_only"] and not answers["a"][1][1]["seclip_only"]


def test_a_token_guards_every_route_but_health(made, rolling_server):
  _, images = made
  status, answer = rolling_server.post(*images[0], "?line=t")
  assert status == 401 and "token" in answer["error"]
  status, answer = rolling_server.post(*images[0], "?line=t", token="wrong")
  assert status == 401
  status, answer = rolling_server.post(*images[0], "?line=t", token=TOKEN)
  assert status == 200 and answer["overlay"].endswith(f"?token={TOKEN}")
  assert rolling_server.get(answer["overlay"])[0] == 200      # the link carries the token
  assert rolling_server.get(answer["overlay"].split("?")[0])[0] == 401
  assert rolling_server.get("/")[0] == 401
  assert rolling_server.get("/v1/health")[0] == 200


def test_serving_beyond_this_machine_needs_a_token(made):
  p = subprocess.run([sys.executable, "-m", "eval.serve", str(made[0] / "bank.bundle"),
                      "--host=0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={k: v for k, v in os.environ.items() if k != "FISECLIP_TOKEN"})
  assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
  assert "--host 0.0.0.0" in p.stderr and "--token" in p.stderr
  p = subprocess.run([sys.executable, "-m", "eval.serve", str(made[0] / "nothing.bundle")],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1 and p.stderr.startswith("error: ") and "nothing.bundle" in p.stderr


def chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


def test_the_page_shows_a_posted_part_with_its_score_and_decision(made, bank_server, tmp_path):
  pytest.importorskip("playwright.sync_api")
  browser_path = chromium()
  if browser_path is None:
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's)")
  _, images = made
  files = []
  for i in (1, 2):
    (tmp_path / f"{i}.jpg").write_bytes(images[i][0])
    files.append(str(tmp_path / f"{i}.jpg"))
  # Playwright in a process of its own (tests/page_browser.py): its greenlets and event loop stay
  # out of this one, which goes on compiling for the tests after it.
  p = subprocess.run([sys.executable, str(ROOT / "tests" / "page_browser.py"), bank_server.url,
                      browser_path, *files, *filter(None, [os.environ.get("FISECLIP_SCREENSHOT")])],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  seen = json.loads(p.stdout.strip().splitlines()[-1])
  part, part2 = seen["part"], seen["part2"]
  assert seen["status"] == seen["status2"] == 200
  assert f"{part['score']:.4f}" in seen["text"] and part["decision"] in seen["text"], seen["text"]
  assert part["decision"] in seen["class"]
  assert seen["first"] == str(part2["id"])                     # newest first
