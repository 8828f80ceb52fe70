"""A program's life: parse flags, print help, quiet the noise, run, end with one line on error.

absl parses the flags (and `--flagfile FILE`, one flag per line, for ablations kept as files);
this module only adds what absl does differently from what these programs need: `--help` lists
the program's own flags and exits 0, a bad flag is `error: ...` with exit code 2.
"""
from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import re
import sys
import textwrap
from typing import Callable, List, Optional, Sequence

from absl import flags
from absl import logging

from fiseclip_jax.cli import errors
from fiseclip_jax.core.config import FiSeConfig

FLAGS = flags.FLAGS
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def quiet() -> None:
  """Silence lines that read like errors but are not: JAX probing for a TPU, transformers without
  PyTorch (only its tokenizer is used here)."""
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)


def _default(fl: flags.Flag) -> str:
  d = fl.default
  if d is None:
    return "unset"
  if isinstance(d, (list, tuple)):
    return ",".join(map(str, d))
  if isinstance(d, bool):
    return str(d).lower()
  return str(d)


def _flag_help(fl: flags.Flag) -> str:
  text = fl.help
  values = getattr(fl.parser, "enum_values", None)
  if values and text.startswith("<"):
    text = text.split(": ", 1)[-1]            # absl prefixes enum help with its choices
  choices = f" {{{'|'.join(values)}}}" if values else ""
  head = f"  --{fl.name}{choices}  (default: {_default(fl)})"
  body = textwrap.fill(text, width=96, initial_indent="      ", subsequent_indent="      ")
  return head + "\n" + body


def program_flags() -> List[flags.Flag]:
  """The flags this package's program modules defined (not absl's nor other libraries')."""
  out = {}
  for module, fls in FLAGS.flags_by_module_dict().items():
    if module.startswith("fiseclip_jax.cli") or module == sys.argv[0]:
      out.update({fl.name: fl for fl in fls})
  return list(out.values())


def help_text(doc: str) -> str:
  """The program's docstring, then its flags: the method's knobs and the run's own, sorted."""
  knobs = {f.name for f in dataclasses.fields(FiSeConfig)}
  own = sorted(program_flags(), key=lambda f: f.name)
  lines = [textwrap.dedent(doc or "").strip(), "", "flags of this run:"]
  lines += [_flag_help(fl) for fl in own if fl.name not in knobs]
  method = [_flag_help(fl) for fl in own if fl.name in knobs]
  if method:
    lines += ["", "method (FiSeConfig; docs/DESIGN.md says what each one does):"] + method
  lines += ["", "Also: --flagfile FILE (flags one per line, e.g. eval/configs/*.flags); "
            "--verbosity 1 shows tracebacks; --helpfull lists every flag, absl's included."]
  return "\n".join(lines) + "\n"


def flag_message(e: flags.Error) -> str:
  """absl's 'flag --name=value: detail' in this project's words: '--name value: detail'."""
  m = re.match(r"flag --([\w-]+)=(.*?): (.*)$", str(e), re.S)
  return f"--{m.group(1)} {m.group(2)}: {m.group(3)}" if m else str(e)


def check_flagfiles(argv: List[str]) -> None:
  """Each --flagfile readable as UTF-8 text, or one line naming it (absl would raise from deep
  inside its parser)."""
  for i, a in enumerate(argv[1:], 1):
    path = a.split("=", 1)[1] if a.startswith("--flagfile=") else (
        argv[i + 1] if a == "--flagfile" and i + 1 < len(argv) else None)
    if path is None:
      continue
    try:
      with open(path, encoding="utf-8") as f:
        f.read()
    except UnicodeDecodeError as e:
      errors.fail(2, f"--flagfile {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it "
                  "as UTF-8")
    except OSError as e:
      errors.fail(2, f"--flagfile {path}: {e.strerror or e}")


def run(main: Callable[..., None], doc: str, argv: Optional[List[str]] = None,
        positional: Sequence[str] = ()) -> None:
  """Parse flags and run main() with the program's error handling; never returns. positional:
  the names of the arguments the program takes before or among its flags (main(*them))."""
  argv = list(sys.argv if argv is None else argv)
  quiet()
  if any(a in HELP_ARGS for a in argv[1:]):
    sys.stdout.write(help_text(doc))
    sys.exit(0)
  if "--helpfull" in argv[1:]:
    sys.stdout.write(help_text(doc) + "\nall flags:\n" + FLAGS.get_help() + "\n")
    sys.exit(0)
  check_flagfiles(argv)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    errors.fail(2, f"{flag_message(e)} (see --help)")
  except UnicodeDecodeError as e:            # a flagfile named inside another one
    errors.fail(2, f"--flagfile: not UTF-8 text ({e.reason} at byte {e.start})")
  if len(rest) - 1 != len(positional):
    if positional:
      errors.fail(2, f"expected {len(positional)} argument(s), {' '.join(positional)}, got "
                  f"{len(rest) - 1}: {rest[1:]} (see --help)")
    errors.fail(2, f"unexpected arguments {rest[1:]}; flags are written --name=value (see --help)")
  logging.use_absl_handler()
  if FLAGS["verbosity"].present == 0:
    logging.set_verbosity(logging.WARNING)
  errors.guarded(lambda: main(*rest[1:]), verbose=lambda: FLAGS.verbosity >= 1)
  sys.exit(0)
