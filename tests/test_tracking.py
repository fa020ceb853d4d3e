"""Tracking and profiling: the optional W&B writer (offline mode, no network) beside metrics.jsonl
and TensorBoard, and `profile_steps` writing a jax.profiler trace into the workdir on CPU."""

import json

import pytest

from mta_jax import config, metrics, profiling, train_lib
from mta_jax.config import ConfigError

from train_util import toy_run_config


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
  """W&B in offline mode, with every `run.log` call recorded."""
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  logged, inits = [], []
  real_init = wandb.init

  def init(**kw):
    run = real_init(**kw)
    inits.append(dict(kw, run=run))
    real_log = run.log
    def log(data, step=None, **k):
      logged.append((step, dict(data)))
      return real_log(data, step=step, **k)
    run.log = log
    return run

  monkeypatch.setattr(wandb, "init", init)
  return logged, inits


def test_profile_steps_are_validated():
  for bad in ("5", "a,b", "1,2,3"):
    with pytest.raises(ConfigError, match=f"profile_steps='{bad}' must be 'START,END'"):
      profiling.parse_steps(bad, 10)
  for bad in ("0,3", "4,3", "3,11"):
    with pytest.raises(ConfigError, match=f"profile_steps='{bad}' must satisfy 1 <= START <= "
                                          "END <= steps=10"):
      profiling.parse_steps(bad, 10)
  assert profiling.parse_steps("", 10) is None
  assert profiling.parse_steps("2, 5", 10) == (2, 5)
  cfg = toy_run_config(4)
  cfg.profile_steps = "3,9"
  with pytest.raises(ConfigError, match="profile_steps="):
    config.validate(cfg)


def test_step_profiler_traces_its_window(tmp_path):
  """START..END of a loop of jitted steps on CPU -> one trace in <workdir>/profile."""
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  lines = []
  prof = profiling.StepProfiler("2,3", 5, str(tmp_path), first_step=0, log=lines.append)
  x = jnp.ones((64, 64))
  for step in range(1, 6):
    prof.before(step)
    assert prof.active == (2 <= step <= 3)
    x = f(x)
    prof.after(step, x)
  prof.stop()
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000
  assert list((tmp_path / "profile").rglob("*.trace.json.gz"))
  assert lines == [f"profile of steps 2..3: {tmp_path / 'profile'}"]
  # A run resumed past START skips the profile and says so.
  prof = profiling.StepProfiler("2,3", 5, str(tmp_path), first_step=2, log=lines.append)
  prof.before(3)
  assert not prof.active and "no profile this time" in lines[-1]


@pytest.mark.slow
def test_run_with_wandb_and_a_profile(tmp_path, wandb_offline):
  """One short training run: the W&B run gets the same scalars as metrics.jsonl, and steps 2..3
  leave a trace (xplane + Perfetto) in <workdir>/profile."""
  logged, inits = wandb_offline
  cfg = toy_run_config(4)
  cfg.profile_steps = "2,3"
  cfg.wandb_project, cfg.wandb_run = "mta-test", "tiny"
  cfg.eval_every = 2
  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(cfg, str(workdir))

  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000
  assert list((workdir / "profile").rglob("*.trace.json.gz"))

  (init,) = inits
  assert init["project"] == "mta-test" and init["name"] == "tiny"
  assert init["config"]["profile_steps"] == "2,3" and init["config"]["model"]["d_model"] == 32
  run_id = (workdir / "wandb_run_id").read_text().strip()
  assert init["id"] == run_id
  offline = list((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  assert len(offline) == 1 and b"train/loss" in offline[0].read_bytes()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  want = [(r["step"], {f"{r['split']}/{k}": v for k, v in r.items()
                       if k not in ("step", "split", "time") and v is not None})
          for r in records]
  assert [(s, {k: pytest.approx(v) for k, v in d.items()}) for s, d in want] == logged
  assert {s for s, _ in logged} == {2, 4}


def test_wandb_run_resumes_under_the_same_id(tmp_path, wandb_offline):
  logged, inits = wandb_offline
  w = metrics.MetricsWriter(str(tmp_path), 10, enabled=True, wandb_project="p")
  w.open(0)
  w.write(1, "train", {"loss": 2.0, "mfu": None})
  w.close()
  w = metrics.MetricsWriter(str(tmp_path), 10, enabled=True, wandb_project="p")
  w.open(1)
  w.write(2, "train", {"loss": 1.5, "x": float("nan")})
  w.close()
  assert inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
  assert inits[0]["name"] == tmp_path.name  # default run name: the workdir's
  assert logged == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5})]
  # Without a project, nothing touches W&B.
  w = metrics.MetricsWriter(str(tmp_path / "b"), 10, enabled=True)
  w.open(0)
  w.close()
  assert len(inits) == 2
