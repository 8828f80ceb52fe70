"""How a program ends: one `error: ...` line and an exit code, a traceback only when asked.

Exit 2: a usage error (a flag out of range, flags that exclude each other, an unwritable --out).
Exit 1: the data, a checkpoint or the machine (a missing mask, a truncated file, a full disk, a
missing JAX backend). Work finished before the error is already on disk.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Callable, NoReturn


class UsageError(ValueError):
  """A flag or a combination of flags that cannot work; the message names the flag."""


class EnvironmentProblem(RuntimeError):
  """The machine cannot do what was asked (a JAX backend, a device count); the message says how
  to fix it."""


def fail(code: int, message: str) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def exit_code(e: BaseException) -> int:
  """2 for usage errors, 1 for data, checkpoint and machine problems."""
  from absl import flags
  return 2 if isinstance(e, (UsageError, flags.Error)) else 1


def expected_errors() -> tuple:
  """The exceptions that end a program with one line (anything else is a bug: traceback)."""
  from fiseclip_jax.checkpoint import CheckpointError
  from fiseclip_jax.data import BadInputError
  return (UsageError, EnvironmentProblem, BadInputError, CheckpointError, OSError,
          json.JSONDecodeError, FloatingPointError)


def describe(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return str(e) or type(e).__name__


def guarded(main: Callable[[], None], verbose: Callable[[], bool]) -> None:
  """Run main(); an expected error ends the process with one line (and the traceback if verbose)."""
  try:
    main()
  except KeyboardInterrupt:
    fail(130, "interrupted; results written so far are kept (rerun with --resume)")
  except expected_errors() as e:   # pylint: disable=catching-non-exception
    if verbose():
      traceback.print_exc()
    logging.shutdown()
    fail(exit_code(e), describe(e))
