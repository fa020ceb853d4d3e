"""The README's main command as a new user runs it: `python train.py` from a fresh copy of the
repository, with the default RELATIVE workdir (runs/<config name>), then a resume of it.

Every other subprocess test passes an absolute temporary workdir; this one exists because a
relative workdir once crashed at the final checkpoint save (Orbax needs absolute paths)."""

import os
import shutil
import subprocess

import train_cli

ROOT = train_cli.ROOT

# The default config (configs/toy.py: MTA, N=5, "first") shrunk to a few seconds.
SMALL = ["--config.data.toy.n_blocks=3", "--config.data.seq_len=22", "--config.model.max_len=22",
         "--config.model.d_model=32", "--config.model.n_layers=2", "--config.data.batch_size=16",
         "--config.data.eval_batch_size=16", "--config.data.toy.n_test=32",
         "--config.log_every=2", "--config.eval_every=0", "--config.optim.warmup_steps=1",
         "--config.checkpoint.every_steps=2"]


def _checkout(dest) -> str:
  """A copy of the repository's tracked files (what a fresh clone holds)."""
  try:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy the sources
    files = None
  if files:
    for f in files:
      src = os.path.join(ROOT, f)
      if os.path.isfile(src):
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, f))
  else:
    os.makedirs(dest, exist_ok=True)
    for f in ("train.py", "configs", "mta_jax"):
      src = os.path.join(ROOT, f)
      (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dest, f))
  return dest


def _train(cwd, *args):
  return train_cli.run(*SMALL, *args, cwd=cwd)


def test_default_command_with_relative_workdir_and_resume(tmp_path):
  repo = _checkout(str(tmp_path / "repo"))
  r = _train(repo, "--config.steps=4")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "final sequence error rate" in r.stdout.strip().splitlines()[-1] or \
      "final sequence error rate" in r.stdout
  workdir = os.path.join(repo, "runs", "toy_mta_n5_first")
  ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "4" in ckpts, ckpts
  assert not [c for c in ckpts if "tmp" in c], ckpts  # every save finished
  for png in ("loss_curve.png", "kernels.png", "attention.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000, png

  # The same command with more steps resumes from the finished checkpoint.
  r = _train(repo, "--config.steps=6")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "resumed from step 4" in r.stdout
  assert "final sequence error rate" in r.stdout
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
