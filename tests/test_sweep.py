"""The sweep runner: validation before anything runs, skip / resume / collect on a trivial sweep
(train.py replaced by a fake that writes what train.py writes), and one real run (slow)."""

import csv
import json
import os
import subprocess
import textwrap

import pytest

from mta_jax import sweep as sweep_lib

SWEEP = """
from mta_jax.sweep import Run, Sweep

def get_sweep():
  tiny = {{"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "data.seq_len": 16,
           "data.batch_size": 4, "steps": 2, "eval_every": 2, "eval_steps": 1, "log_every": 1,
           "optim.warmup_steps": 1, "checkpoint.every_steps": 1}}
  return Sweep(name="trivial", metric="ppl", seeds=2, overrides=tiny, runs=[
      Run(name="mta", config="configs/lm_tiny.py:mta"),
      Run(name="base", config="configs/lm_tiny.py:baseline",
          overrides={{"model.attention.kq_layers": (0,), {extra}}})])
"""


def _write(tmp_path, extra='"optim.lr": 1e-3', name="sweep.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(SWEEP.format(extra=extra)))
  return str(path)


class FakeTrain:
  """Stands in for `python train.py`: writes metrics.jsonl (train + eval records) into the
  workdir; `fail_once` names workdirs whose first attempt dies after a checkpoint."""

  def __init__(self, fail_once=()):
    self.calls, self.fail_once = [], set(fail_once)

  def __call__(self, args, stdout=None, stderr=None, cwd=None, env=None):
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
    wd, seed = opts["workdir"], int(opts["config.seed"])
    self.calls.append(wd)
    run = os.path.basename(os.path.dirname(wd))
    loss = {"mta": 1.0, "base": 2.0}[run] + 0.1 * seed
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": 1, "split": "train", "loss": loss + 1}) + "\n")
      if wd in self.fail_once:
        self.fail_once.remove(wd)
        os.makedirs(os.path.join(wd, "checkpoints", "1"))
        return 1
      f.write(json.dumps({"step": 2, "split": "train", "loss": loss + 0.5}) + "\n")
      f.write(json.dumps({"step": 2, "split": "eval", "loss": loss, "token_acc": 0.5,
                          "seq_error": 0.5, "seqs": 4}) + "\n")
    return 0


def test_skip_resume_and_collect(tmp_path, monkeypatch, capsys):
  path, out = _write(tmp_path), str(tmp_path / "out")
  broken = os.path.join(out, "trivial", "base", "seed1")
  fake = FakeTrain(fail_once=[broken])
  monkeypatch.setattr(sweep_lib.subprocess, "call", fake)
  assert sweep_lib.main([path, f"--out={out}"]) == 1  # one run failed
  assert len(fake.calls) == 4 and not os.path.exists(os.path.join(broken, "done.json"))
  printed = capsys.readouterr().out
  assert "base seed 1: FAILED: exit status 1" in printed
  # The commands carry the overrides, the seed and the workdir; tuples in command-line form.
  assert sweep_lib.main([path, f"--out={out}", "--launch=print"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "train.py" in l]
  assert len(lines) == 1 and "--config.model.attention.kq_layers=(0,)" in lines[0]
  assert f"--workdir={broken}" in lines[0] and "--config.data.seed=1" in lines[0]

  assert sweep_lib.main([path, f"--out={out}"]) == 0  # rerun: only the broken run, resumed
  assert fake.calls[4:] == [broken]
  printed = capsys.readouterr().out
  assert printed.count("done already, skipped") == 3 and "base seed 1: running (resuming)" in printed

  root = os.path.join(out, "trivial")
  rows = list(csv.DictReader(open(os.path.join(root, "summary.csv"))))
  got = {r["run"]: (float(r["mean"]), float(r["std"]), int(r["seeds"])) for r in rows}
  e = 2.718281828
  assert got["mta"] == pytest.approx(((e ** 1.0 + e ** 1.1) / 2, abs(e ** 1.1 - e ** 1.0) / 2 ** .5, 2))
  assert got["base"][0] == pytest.approx((e ** 2.0 + e ** 2.1) / 2)
  assert len(list(csv.DictReader(open(os.path.join(root, "results.csv"))))) == 4
  assert "| mta | 2.861 ± 0.2 | 2 |" in open(os.path.join(root, "summary.md")).read()
  for png in ("loss_curves.png", "final_metric.png"):
    assert os.path.getsize(os.path.join(root, png)) > 1000
  assert sweep_lib.main([path, f"--out={out}", "--launch=collect"]) == 0
  assert len(fake.calls) == 5  # collect runs nothing


def test_runs_locked_by_another_live_runner_are_skipped(tmp_path, monkeypatch, capsys):
  path, out = _write(tmp_path), str(tmp_path / "out")
  held = os.path.join(out, "trivial", "mta", "seed0")
  stale = os.path.join(out, "trivial", "base", "seed0")
  for wd, pid in ((held, os.getppid()), (stale, 2 ** 22 + 7919)):  # live / no such process
    os.makedirs(wd)
    open(os.path.join(wd, "running.lock"), "w").write(str(pid))
  fake = FakeTrain()
  monkeypatch.setattr(sweep_lib.subprocess, "call", fake)
  assert sweep_lib.main([path, f"--out={out}", "--seeds=1"]) == 0
  assert fake.calls == [stale]  # the stale lock was taken over, then released
  assert "mta seed 0: being run by another runner, skipped" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(stale, "running.lock"))
  assert os.path.exists(os.path.join(held, "running.lock"))


@pytest.mark.parametrize("extra,message", [
    ('"model.n_layer": 2', r"unknown field 'model.n_layer' \('n_layer' is not a field of model"),
    ('"model.attention": 2', "is a group of fields"),
    ('"model.attention.c_h": 3', r"run 'base': .*c_h=3 must divide"),
    ('"steps": "ten"', "steps='ten' has the wrong type"),
])
def test_bad_sweep_is_one_clear_error_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                            extra, message):
  fake = FakeTrain()
  monkeypatch.setattr(sweep_lib.subprocess, "call", fake)
  assert sweep_lib.main([_write(tmp_path, extra), f"--out={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("sweep error:") and len(err.strip().splitlines()) == 1
  assert __import__("re").search(message, err), err
  assert not fake.calls


def test_unknown_variant_and_bad_files(tmp_path, monkeypatch, capsys):
  fake = FakeTrain()
  monkeypatch.setattr(sweep_lib.subprocess, "call", fake)
  bad = tmp_path / "bad.py"
  bad.write_text(open(_write(tmp_path)).read().replace(
      "configs/lm_tiny.py:mta", "configs/ablations.py:cpu_no_such_thing"))
  assert sweep_lib.main([str(bad), f"--out={tmp_path}"]) == 2
  assert "run 'mta': 'configs/ablations.py:cpu_no_such_thing' is not a valid config / variant" \
      in capsys.readouterr().err
  assert sweep_lib.main([str(tmp_path / "missing.py")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not fake.calls


def test_grid_builds_one_run_per_point():
  runs = sweep_lib.grid("k", "configs/ablations.py:cpu_full",
                        {"model.attention.c_k": [5, 9], "model.attention.c_q": [2, 4]})
  assert [r.name for r in runs] == ["k_c_k=5_c_q=2", "k_c_k=5_c_q=4", "k_c_k=9_c_q=2",
                                    "k_c_k=9_c_q=4"]
  assert runs[3].overrides == {"model.attention.c_k": 9, "model.attention.c_q": 4}


@pytest.mark.slow
def test_real_run_through_train_py(tmp_path):
  """One (run, seed) through the real train.py subprocess, then skipped on a second call."""
  path = tmp_path / "one.py"
  path.write_text(open(_write(tmp_path)).read().replace("seeds=2", "seeds=1"))
  out = str(tmp_path / "out")
  assert sweep_lib.main([str(path), f"--out={out}", "--only=base"]) == 0
  done = json.load(open(os.path.join(out, "trivial", "base", "seed0", "done.json")))
  assert done["step"] == 2 and done["eval"]["loss"] > 0
  assert sweep_lib.main([str(path), f"--out={out}", "--only=base"]) == 0
