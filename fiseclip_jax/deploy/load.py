"""A bounded load on a running service: clients posting parts at once, every answer kept.

What `fiseclip-serve-load` runs and what tests/test_service.py checks: `clients` threads each post
`requests` images (round robin over the given ones, from a different start per client) one after
another, each waiting for its answer. Each answer is kept with its latency, so a caller can check
that nothing was lost or failed and that every score is the one the predictor gives. Light: the
standard library only.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class Answer(NamedTuple):
  client: int
  index: int               # the client's request number
  image: int               # which of the images it posted
  status: int              # HTTP status (0: no answer at all)
  body: dict               # the JSON answer ({"error": ...} on a refusal)
  latency_s: float


def post(url: str, data: bytes, content_type: str, token: Optional[str] = None,
         timeout: float = 120.0) -> Tuple[int, dict]:
  """(status, JSON body) of one POST; a refusal's status and body too, a dead server (0, ...)."""
  req = urllib.request.Request(url, data=data, method="POST",
                               headers={"Content-Type": content_type})
  if token:
    req.add_header("Authorization", f"Bearer {token}")
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    raw = e.read()
    try:
      return e.code, json.loads(raw)
    except ValueError:
      return e.code, {"error": raw.decode("utf-8", "replace")}
  except (urllib.error.URLError, OSError) as e:
    return 0, {"error": f"no answer: {e}"}


def run(base_url: str, images: Sequence[Tuple[bytes, str]], clients: int = 8, requests: int = 25,
        token: Optional[str] = None, line_of: Optional[Callable[[int], str]] = None) -> dict:
  """Post `clients` x `requests` images; the answers and the figures (latency p50 / p90 / p99 in
  ms, images per second over the whole load). images: (bytes, content type) each; line_of: the
  line id of a client's parts (rolling services), None: no line."""
  answers: List[Answer] = []
  lock = threading.Lock()

  def client(c: int) -> None:
    url = base_url.rstrip("/") + "/v1/score"
    if line_of is not None:
      url += f"?line={line_of(c)}"
    for i in range(requests):
      k = (c + i) % len(images)
      t0 = time.perf_counter()
      status, body = post(url, images[k][0], images[k][1], token)
      a = Answer(c, i, k, status, body, time.perf_counter() - t0)
      with lock:
        answers.append(a)

  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  t0 = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  ok = [a for a in answers if a.status == 200]
  lat = np.array([a.latency_s for a in ok]) * 1000.0
  pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
  return {"answers": answers, "clients": clients, "requests_each": requests,
          "sent": clients * requests, "answered": len(answers), "ok": len(ok),
          "failed": len(answers) - len(ok), "wall_s": wall,
          "images_per_s": len(ok) / wall if wall > 0 else float("nan"),
          "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                         "max": float(lat.max()) if len(lat) else float("nan")}}


def figures(result: dict) -> dict:
  """The load's figures without the answers (what a report keeps)."""
  return {k: v for k, v in result.items() if k != "answers"}
