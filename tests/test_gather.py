"""The gatherer behind the service (DESIGN.md §15): concurrent items batched by key, a key's items
in arrival order and never mixed with another key's, a lone item waiting no longer than
max_wait, and a failing batch failing its own items only."""
import threading
import time

import pytest

from fiseclip_jax.deploy import gather


def test_items_are_batched_by_key_in_arrival_order():
  seen = []
  g = gather.Gatherer(lambda key, values: seen.append((key, list(values))) or
                      [f"{key}:{v}" for v in values], batch_size=3, max_wait_s=0.2)
  futures = [g.submit("ab"[i % 2], i) for i in range(10)]
  assert [f.result(5) for f in futures] == [f"{'ab'[i % 2]}:{i}" for i in range(10)]
  g.close()
  for key, values in seen:
    assert len(values) <= 3 and all("ab"[v % 2] == key for v in values)
  for key in "ab":
    order = [v for k, vs in seen if k == key for v in vs]
    assert order == sorted(order) == [i for i in range(10) if "ab"[i % 2] == key]
  assert len(seen) < 10                           # gathered: fewer batches than items


def test_a_lone_item_waits_at_most_max_wait():
  g = gather.Gatherer(lambda key, values: list(values), batch_size=8, max_wait_s=0.05)
  t0 = time.monotonic()
  assert g.submit(None, 1).result(5) == 1
  assert time.monotonic() - t0 < 2.0              # generous: a loaded CI machine
  g.close()


def test_a_failing_batch_fails_its_items_and_the_next_batch_is_scored():
  def score(key, values):
    if "bad" in values:
      raise ValueError("cannot score")
    return list(values)

  g = gather.Gatherer(score, batch_size=1, max_wait_s=0.0)
  bad, good = g.submit(None, "bad"), g.submit(None, "good")
  with pytest.raises(ValueError, match="cannot score"):
    bad.result(5)
  assert good.result(5) == "good"
  g.close()


def test_limits_refuse_before_queueing():
  release = threading.Event()
  g = gather.Gatherer(lambda key, values: release.wait(5) and list(values), batch_size=1,
                      max_wait_s=0.0, max_waiting=2, max_keys=2)
  first = g.submit("a", 0)
  time.sleep(0.2)                                 # the worker holds the first item
  g.submit("a", 1)
  g.submit("b", 2)
  with pytest.raises(gather.Full):
    g.submit("a", 3)
  release.set()
  assert first.result(5) == 0
  time.sleep(0.3)
  with pytest.raises(gather.TooManyKeys):
    g.submit("c", 4)
  g.close()
