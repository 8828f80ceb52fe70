"""Progress that suits where it goes: a bar with ETA on a terminal, whole lines in a log file."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


COMPILING = "compiling the model (the first batch only)"   # what a first batch waits on


class Progress:
  """update(done) with the images done so far; close() once.

  On a terminal: a tqdm bar (rate and ETA). Otherwise (stderr redirected to a file, a batch
  scheduler's log): one whole line every `every_s` seconds and a last one at close, never a '\\r'.
  waiting: what happens before the first image is done (e.g. "compiling"), said at once and
  until then, so a long first batch is not silence.
  """

  def __init__(self, total: int, desc: str, enabled: bool = True, stream: Optional[TextIO] = None,
               every_s: float = 30.0, waiting: Optional[str] = None):
    self.total, self.desc, self.every_s = total, desc, every_s
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.t0 = self.last = time.monotonic()
    self.done = 0
    self.printed = None         # `done` of the last line written to a log
    self.bar = None
    if enabled and self.stream.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit="img", file=self.stream, leave=True,
                      dynamic_ncols=True)
    self.waiting = waiting if enabled else None
    if self.waiting and self.bar is not None:
      self.bar.set_postfix_str(self.waiting)
    elif self.waiting:
      self.stream.write(f"{desc}: 0/{total} images, {self.waiting}\n")
      self.stream.flush()

  def _line(self) -> str:
    elapsed = time.monotonic() - self.t0
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    eta_s = f", ETA {eta:.0f} s" if self.done < self.total and eta == eta else ""
    return (f"{self.desc}: {self.done}/{self.total} images, {rate:.2f} img/s, "
            f"{elapsed:.0f} s{eta_s}\n")

  def update(self, done: int) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      if self.waiting and done:
        self.bar.set_postfix_str("", refresh=False)
        self.waiting = None
      self.bar.update(done - self.done)
      self.done = done
      return
    self.done = done
    now = time.monotonic()
    if now - self.last >= self.every_s:
      self.last = now
      self._write()

  def _write(self) -> None:
    self.stream.write(self._line())
    self.stream.flush()
    self.printed = self.done

  def close(self) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.close()
      return
    if self.printed != self.done:            # the last line once, not again
      self._write()
