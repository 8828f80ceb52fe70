"""outputs.run_folder: the checks every program runs on its --out before it loads a model."""
import threading

from fiseclip_jax.outputs import run_folder


def test_out_dir_check_is_safe_for_processes_sharing_the_folder(tmp_path):
  """Every process of a multi-host run checks the same --out: their write probes must not collide
  (one removing the probe another just wrote made the other fail with 'No such file')."""
  errors = []

  def check():
    for _ in range(200):
      try:
        run_folder.check_writable(str(tmp_path / "out"))
      except Exception as e:   # noqa: BLE001 - any failure is the bug
        errors.append(e)

  threads = [threading.Thread(target=check) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
  assert list((tmp_path / "out").iterdir()) == []       # no probe left behind


def test_resume_with_nothing_to_resume_says_it_starts_anew(tmp_path, capsys):
  """A --resume into a folder holding no run (a mistyped --out, say) starts a new run, and says so,
  rather than silently scoring everything again."""
  out = str(tmp_path / "typo")
  assert run_folder.prepare_out(out, {"a": 1}, resume=True, overwrite=False,
                                record="run.json") is None
  err = capsys.readouterr().err
  assert "--resume" in err and out in err and "new run" in err, err
