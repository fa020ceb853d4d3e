"""Bad input to the main command: one clear line naming the setting, exit status 2, and nothing
written (the workdir is not even created)."""

import os
import subprocess
import sys

import pytest

from test_tokenizers import write_tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_py(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["workdir_is_a_file", "unreachable_bucket", "unknown_tokenizer",
                                  "negative_weight", "unprepared_mixture"])
def test_one_line_exit_2_nothing_written(tmp_path, case):
  write_tiktoken(tmp_path / "tok.tiktoken")
  (tmp_path / "notes.txt").write_text("just some notes, not a tokenizer\n")
  (tmp_path / "afile").write_text("x")
  text = ["--config=configs/lm_text.py", "--config.model.vocab_size=1024"]
  tok = f"--config.data.tokenizer={tmp_path / 'tok.tiktoken'}"
  args, want = {
      "workdir_is_a_file": ([f"--workdir={tmp_path / 'afile'}"],
                            "--workdir='{t}/afile' is a file, not a directory"),
      "unreachable_bucket": (["--workdir=s3://no-such-bucket/run"],
                             "--workdir='s3://no-such-bucket/run' cannot be reached"),
      "unknown_tokenizer": (text + ["--config.data.path=data/x",
                                    f"--config.data.tokenizer={tmp_path / 'notes.txt'}"],
                            "data.tokenizer='{t}/notes.txt' is a tokenizer of an unknown kind"),
      "negative_weight": (text + [tok, "--config.data.mixture=data/a:0.5,data/b:-0.5"],
                          "data.mixture='{t}/data/a:0.5,{t}/data/b:-0.5': the weight of "
                          "'{t}/data/b' is -0.5; weights must be positive"),
      "unprepared_mixture": (text + [tok, "--config.data.mixture=data/never:1"],
                             "data.mixture='{t}/data/never': no such directory"),
  }[case]
  if case not in ("workdir_is_a_file", "unreachable_bucket"):
    args.append("--workdir=run")
  r = _train_py(*args, cwd=tmp_path)
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("config error: "), r.stderr[-3000:]
  assert want.format(t=tmp_path) in lines[0], lines[0]
  assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
  assert r.stdout == ""
