"""Progress in a terminal (a bar) and in a log file (whole lines only)."""
import io
import subprocess
import sys
from pathlib import Path

from fiseclip_jax.cli.progress import Progress
from fiseclip_jax.data import demo_root

ROOT = Path(__file__).resolve().parents[1]


class FakeTTY(io.StringIO):
  def isatty(self):
    return True


def test_log_gets_whole_lines_and_a_last_one():
  log = io.StringIO()
  p = Progress(10, "cat", stream=log, every_s=0.0)
  for done in (2, 5, 10):
    p.update(done)
  p.close()
  text = log.getvalue()
  assert "\r" not in text and text.endswith("\n")
  lines = text.splitlines()
  # The last line once: close() does not repeat the 10/10 line update() just wrote.
  assert len(lines) == 3 and lines[-1].startswith("cat: 10/10 images")
  assert "ETA" in lines[0] and "ETA" not in lines[-1]
  quiet = io.StringIO()
  p = Progress(10, "cat", stream=quiet, every_s=3600.0)
  p.update(10)
  p.close()                                  # nothing written yet: close writes the last line
  assert quiet.getvalue().count("10/10") == 1


def test_the_wait_before_the_first_batch_is_named():
  """A first batch that compiles for a minute says so at once, in a log and on a terminal."""
  log = io.StringIO()
  p = Progress(10, "cat", stream=log, every_s=3600.0, waiting="compiling the model")
  assert log.getvalue() == "cat: 0/10 images, compiling the model\n"
  p.update(10)
  p.close()
  assert log.getvalue().count("\n") == 2
  tty = FakeTTY()
  p = Progress(4, "cat", stream=tty, waiting="compiling the model")
  assert "compiling the model" in tty.getvalue()
  p.update(4)
  p.close()
  assert "compiling" not in tty.getvalue().split("\r")[-1]       # gone once images are done


def test_terminal_gets_a_bar():
  tty = FakeTTY()
  p = Progress(4, "cat", stream=tty)
  p.update(4)
  p.close()
  assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()


def test_a_program_writing_to_a_file_writes_whole_lines(tmp_path):
  err = tmp_path / "stderr.log"
  with open(err, "w") as f:
    p = subprocess.run([sys.executable, "-m", "eval.mvtec", f"--data_root={demo_root()}",
                        f"--out={tmp_path / 'out'}", "--random_weights", "--model=demo",
                        "--image_size=112", "--batch_size=8", "--platform=cpu", "--progress"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, timeout=600)
  assert p.returncode == 0
  text = err.read_text()
  assert "\r" not in text and (text == "" or text.endswith("\n"))
  assert "hazelnut: 23/23 images" in text
