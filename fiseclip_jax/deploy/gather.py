"""Concurrent requests gathered into the compiled batch, one worker thread (DESIGN.md §15).

A request is an item with a key (its production line in rolling mode, None otherwise). The worker
takes the oldest waiting item, waits until its key has a full batch or until `max_wait` has
passed since that item arrived, and scores up to one batch of that key's items in arrival order:
a line's parts are never reordered nor mixed with another line's. One thread calls the scorer, so
the device sees one batch at a time and a line's ring is only touched by its own batches.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable, List, NamedTuple, Optional, Sequence


class Full(Exception):
  """More items wait than the gatherer holds (the caller answers 503)."""


class TooManyKeys(Exception):
  """A new key beyond the number of keys the gatherer keeps (the caller answers 429)."""


class _Item(NamedTuple):
  key: Hashable
  value: object
  arrived: float
  future: Future


class Gatherer:
  """`submit(key, value)` -> Future of `score(key, values)[i]`, batched by key.

  score: (key, values of one key, at most batch_size) -> one result per value; an exception it
  raises is set on each of that batch's futures and the worker goes on.
  """

  def __init__(self, score: Callable[[Hashable, Sequence], Sequence], batch_size: int,
               max_wait_s: float, max_waiting: int = 1024, max_keys: Optional[int] = None):
    self._score, self.batch_size, self.max_wait_s = score, int(batch_size), float(max_wait_s)
    self.max_waiting, self.max_keys = int(max_waiting), max_keys
    self._waiting: collections.deque = collections.deque()
    self._keys: set = set()
    self._cond = threading.Condition()
    self._closed = False
    self.batches = 0                      # batches scored, and their sizes: what the log reports
    self.items = 0
    self._thread = threading.Thread(target=self._run, name="fiseclip-gather", daemon=True)
    self._thread.start()

  def submit(self, key: Hashable, value) -> Future:
    fut: Future = Future()
    with self._cond:
      if self._closed:
        raise RuntimeError("the gatherer is closed")
      if len(self._waiting) >= self.max_waiting:
        raise Full(f"{len(self._waiting)} requests are waiting (at most {self.max_waiting})")
      if self.max_keys is not None and key not in self._keys and len(self._keys) >= self.max_keys:
        raise TooManyKeys(f"{len(self._keys)} lines are kept (at most {self.max_keys})")
      self._keys.add(key)
      self._waiting.append(_Item(key, value, time.monotonic(), fut))
      self._cond.notify_all()
    return fut

  @property
  def waiting(self) -> int:
    with self._cond:
      return len(self._waiting)

  def close(self, timeout: float = 10.0) -> None:
    """Score what waits, then stop the worker."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout)

  def _take(self) -> Optional[List[_Item]]:
    """The next batch: the oldest item's key, up to batch_size of its items (None: closed)."""
    with self._cond:
      while True:
        if not self._waiting:
          if self._closed:
            return None
          self._cond.wait()
          continue
        first = self._waiting[0]
        same = sum(1 for it in self._waiting if it.key == first.key)
        left = first.arrived + self.max_wait_s - time.monotonic()
        if same >= self.batch_size or left <= 0 or self._closed:
          break
        self._cond.wait(left)
      batch, rest = [], collections.deque()
      for it in self._waiting:
        (batch if it.key == first.key and len(batch) < self.batch_size else rest).append(it)
      self._waiting = rest
      return batch

  def _run(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      try:
        results = list(self._score(batch[0].key, [it.value for it in batch]))
        if len(results) != len(batch):
          raise RuntimeError(f"the scorer gave {len(results)} results for {len(batch)} items")
      except BaseException as e:  # pylint: disable=broad-except  (each request hears of it)
        for it in batch:
          it.future.set_exception(e)
        continue
      self.batches += 1
      self.items += len(batch)
      for it, r in zip(batch, results):
        it.future.set_result(r)
