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

from absl import flags

from fiseclip_jax.core.config import ConfigError
from fiseclip_jax.core.errors import BadInputError, CheckpointError
from fiseclip_jax.outputs.run_folder import RecordError, RunFolderError


class UsageError(ValueError):
  """A flag or a combination of flags that cannot work; the message names the flag."""


class EnvironmentProblem(RuntimeError):
  """The machine cannot do what was asked (a JAX backend, a device count); the message says how
  to fix it."""


def fail(code: int, message: str) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


USAGE_ERRORS = (UsageError, flags.Error, RunFolderError, ConfigError)
# The exceptions that end a program with one line (anything else is a bug: traceback).
EXPECTED_ERRORS = USAGE_ERRORS + (EnvironmentProblem, BadInputError, CheckpointError, RecordError,
                                  OSError, json.JSONDecodeError, FloatingPointError)


def exit_code(e: BaseException) -> int:
  """2 for usage errors, 1 for data, checkpoint and machine problems."""
  return 2 if isinstance(e, USAGE_ERRORS) else 1


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
  except EXPECTED_ERRORS as e:
    if verbose():
      traceback.print_exc()
    logging.shutdown()
    fail(exit_code(e), describe(e))
