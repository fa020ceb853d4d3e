"""Sweeps: run a list (or grid) of configurations x seeds, then tabulate and plot the results.

    python -m mta_jax.sweep configs/sweeps/<name>.py [--launch=local|print|collect] [--seeds=3]
        [--out=runs/sweeps] [--only=<run name substring>]

A sweep file defines `get_sweep() -> Sweep`: named runs, each a config file (with its variant)
plus field overrides, and the metric to report. `grid(...)` builds runs from a product of field
values. Every run is validated (config file, variant, override fields and their types) BEFORE
anything is launched; a bad sweep is one SweepError line and exit status 2.

  --launch=local    runs every unfinished (run, seed) in turn, each in a fresh `python train.py`
                    subprocess (log: <workdir>/train.log). A finished run (done.json) is skipped;
                    an interrupted one resumes from its last checkpoint (train.py's own resume).
                    Seeds go in the outer loop, so a sweep cut short still has every run once.
                    Several runners may work on one sweep at once (a lock file per run).
  --launch=print    prints one train.py command per unfinished run (for a cluster launcher).
  --launch=collect  only tabulates what has finished.

Outputs in <out>/<sweep name>/: results.csv (one row per run and seed), summary.csv and
summary.md (mean ± std over seeds, with the number of seeds), loss_curves.png (training loss of
every run, seeds averaged) and final_metric.png (bar chart with the standard deviation).
Seeds set `seed` (initialisation) and `data.seed` (data order); a toy task's data set
(data.toy.seed) stays the same.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from absl import flags

from mta_jax import cli, lease

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {  # name -> (how to read it from the final eval record, label, lower is better)
    "seq_error": (lambda r: 100.0 * r["seq_error"], "sequence error (%)"),
    "ppl": (lambda r: math.exp(min(r["loss"], 50.0)), "validation perplexity"),
    "loss": (lambda r: r["loss"], "validation loss"),
    "token_acc": (lambda r: 100.0 * r["token_acc"], "token accuracy (%)"),
}


class SweepError(ValueError):
  """A bad sweep file or sweep option; the message names the run and the fix."""


@dataclasses.dataclass
class Run:
  name: str                        # unique within the sweep; also the workdir name
  config: str                      # "configs/<file>.py[:variant]", relative to the repository
  overrides: dict = dataclasses.field(default_factory=dict)  # "model.n_layers" -> 4


@dataclasses.dataclass
class Sweep:
  name: str
  runs: list
  metric: str = "loss"             # one of METRICS
  seeds: int = 1                   # default number of seeds (--seeds overrides)
  overrides: dict = dataclasses.field(default_factory=dict)  # applied to every run first
  description: str = ""


def grid(prefix: str, config: str, axes: dict, overrides: Optional[dict] = None) -> list[Run]:
  """One Run per point of the product of `axes` ({"model.attention.c_k": [5, 9], ...})."""
  keys = list(axes)
  runs = []
  for values in itertools.product(*(axes[k] for k in keys)):
    parts = [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in zip(keys, values)]
    runs.append(Run(name="_".join([prefix] + parts).replace(" ", ""), config=config,
                    overrides={**(overrides or {}), **dict(zip(keys, values))}))
  return runs


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def _import_file(path: str, what: str):
  if not os.path.isfile(path):
    raise SweepError(f"{what} {path!r} does not exist.")
  if REPO not in sys.path:  # config files import each other as `configs.<name>`
    sys.path.insert(0, REPO)
  name = "_sweep_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  module = _import_file(path, "sweep file")
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path!r} has no get_sweep() returning mta_jax.sweep.Sweep.")
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep.")
  if sweep.metric not in METRICS:
    raise SweepError(f"{path}: metric={sweep.metric!r} is unknown; choose one of "
                     f"{tuple(METRICS)}.")
  names = [r.name for r in sweep.runs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if not sweep.runs or dup:
    raise SweepError(f"{path}: runs must be a non-empty list with unique names; repeated: {dup}.")
  return sweep


def _set_field(cfg, dotted: str, value, run: str) -> None:
  obj, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    fields = {f.name for f in dataclasses.fields(obj)}
    if part not in fields:
      where = ".".join(parts[:i]) or "the TrainConfig"
      raise SweepError(f"run {run!r}: unknown field {dotted!r} ({part!r} is not a field of "
                       f"{where}; see mta_jax/config.py).")
    if i == len(parts) - 1:
      if dataclasses.is_dataclass(getattr(obj, part)):
        raise SweepError(f"run {run!r}: {dotted!r} is a group of fields; set its fields "
                         f"({dotted}.<field>) instead.")
      setattr(obj, part, value)
    else:
      obj = getattr(obj, part)


def run_overrides(sweep: Sweep, run: Run, seed: int) -> dict:
  return {**sweep.overrides, **run.overrides, "seed": seed, "data.seed": seed}


def build_config(sweep: Sweep, run: Run, seed: int):
  """The run's TrainConfig, exactly as train.py will see it; SweepError when it is bad."""
  from mta_jax import config as config_lib
  file, _, variant = run.config.partition(":")
  module = _import_file(os.path.join(REPO, file), f"run {run.name!r}: config file")
  try:
    cfg = module.get_config(variant or None)
  except (ValueError, KeyError) as e:  # ConfigError is a ValueError
    raise SweepError(f"run {run.name!r}: {run.config!r} is not a valid config / variant: {e}")
  for dotted, value in run_overrides(sweep, run, seed).items():
    _set_field(cfg, dotted, value, run.name)
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise SweepError(f"run {run.name!r}: {e}")
  return cfg


def validate_sweep(sweep: Sweep, seeds: int) -> None:
  for run in sweep.runs:
    for seed in range(seeds):
      build_config(sweep, run, seed)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _fmt(value) -> str:
  """A Python value as ml_collections parses it on the command line."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_fmt(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def workdir(out: str, sweep: Sweep, run: Run, seed: int) -> str:
  return os.path.join(out, sweep.name, run.name, f"seed{seed}")


def command(sweep: Sweep, run: Run, seed: int, out: str) -> list[str]:
  args = [sys.executable, os.path.join(REPO, "train.py"),
          f"--config={os.path.join(REPO, run.config)}",
          f"--workdir={workdir(out, sweep, run, seed)}"]
  args += [f"--config.{k}={_fmt(v)}" for k, v in run_overrides(sweep, run, seed).items()]
  return args


def final_eval(wd: str) -> Optional[dict]:
  """The last eval record of a run's metrics.jsonl (None when there is none)."""
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  last = None
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("split") == "eval":
        last = rec
  return last


def is_done(wd: str) -> bool:
  return os.path.isfile(os.path.join(wd, "done.json"))


def try_lock(wd: str) -> bool:
  """Claims a run for this runner (several `--launch=local` runners may share one sweep on one
  machine). False when another live runner holds it; a stale lock is taken over."""
  os.makedirs(wd, exist_ok=True)
  path = os.path.join(wd, "running.lock")
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(open(path).read().strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and lease.pid_alive(pid):
        return False
      os.remove(path)  # stale: its runner is gone
      continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True
  return False


def unlock(wd: str) -> None:
  path = os.path.join(wd, "running.lock")
  if os.path.isfile(path):
    os.remove(path)


def run_local(sweep: Sweep, run: Run, seed: int, out: str, env: dict) -> dict:
  """Runs one (run, seed) to completion in a fresh process; writes and returns done.json."""
  wd = workdir(out, sweep, run, seed)
  os.makedirs(wd, exist_ok=True)
  t0 = time.time()
  with open(os.path.join(wd, "train.log"), "a") as log:
    log.write(f"\n$ {shlex.join(command(sweep, run, seed, out))}\n")
    log.flush()
    rc = subprocess.call(command(sweep, run, seed, out), stdout=log, stderr=subprocess.STDOUT,
                         cwd=REPO, env=env)
  wall = time.time() - t0
  if rc != 0:
    raise RuntimeError(f"exit status {rc} after {wall:.0f}s; see {wd}/train.log")
  rec = final_eval(wd)
  if rec is None:
    raise RuntimeError(f"finished without an eval record in {wd}/metrics.jsonl")
  prev = os.path.join(wd, "wall_s")  # an interrupted attempt's time counts too
  wall_total = wall + (float(open(prev).read()) if os.path.isfile(prev) else 0.0)
  done = {"run": run.name, "seed": seed, "config": run.config, "step": rec["step"],
          "eval": rec, "wall_s": wall_total}
  with open(os.path.join(wd, "done.json"), "w") as f:
    json.dump(done, f, indent=2)
  return done


def _launch_local(sweep: Sweep, seeds: int, out: str, only: str) -> int:
  env = dict(os.environ)
  # Seeds of one run compile the same program: a persistent cache skips the repeats.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, sweep.name, ".jax_cache"))
  todo = [(seed, run) for seed in range(seeds) for run in sweep.runs if only in run.name]
  failures = 0
  t_sweep = time.time()
  for i, (seed, run) in enumerate(todo):
    wd = workdir(out, sweep, run, seed)
    tag = f"[{i + 1}/{len(todo)}] {run.name} seed {seed}"
    if is_done(wd):
      print(f"{tag}: done already, skipped", flush=True)
      continue
    if not try_lock(wd):
      print(f"{tag}: being run by another runner, skipped", flush=True)
      continue
    resumed = " (resuming)" if os.path.isdir(os.path.join(wd, "checkpoints")) else ""
    print(f"{tag}: running{resumed}, log {wd}/train.log", flush=True)
    t0 = time.time()
    try:
      done = run_local(sweep, run, seed, out, env)
    except BaseException as e:  # an interrupted attempt's time still counts
      prev = os.path.join(wd, "wall_s")
      before = float(open(prev).read()) if os.path.isfile(prev) else 0.0
      with open(prev, "w") as f:
        f.write(str(before + time.time() - t0))
      if not isinstance(e, RuntimeError):
        raise
      failures += 1
      print(f"{tag}: FAILED: {e}", flush=True)
      continue
    finally:
      unlock(wd)
    value = METRICS[sweep.metric][0](done["eval"])
    print(f"{tag}: {sweep.metric} {value:.4g} in {time.time() - t0:.0f}s "
          f"(sweep {time.time() - t_sweep:.0f}s)", flush=True)
  return failures


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
  mean = sum(xs) / len(xs)
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return mean, std


def collect(sweep: Sweep, seeds: int, out: str) -> list[dict]:
  """results.csv, summary.csv / .md, loss_curves.png, final_metric.png; returns the summary."""
  root = os.path.join(out, sweep.name)
  os.makedirs(root, exist_ok=True)
  get, label = METRICS[sweep.metric]
  rows, summary = [], []
  for run in sweep.runs:
    values, walls = [], []
    for seed in range(seeds):
      wd = workdir(out, sweep, run, seed)
      if not is_done(wd):
        continue
      done = json.load(open(os.path.join(wd, "done.json")))
      value = get(done["eval"])
      values.append(value)
      walls.append(done["wall_s"])
      rows.append({"run": run.name, "seed": seed, sweep.metric: value,
                   "eval_loss": done["eval"]["loss"], "step": done["step"],
                   "wall_s": round(done["wall_s"], 1), "config": run.config})
    if values:
      mean, std = _mean_std(values)
      summary.append({"run": run.name, "seeds": len(values), "mean": mean, "std": std,
                      "wall_s": sum(walls)})
  _write_csv(os.path.join(root, "results.csv"), rows)
  _write_csv(os.path.join(root, "summary.csv"), summary)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(markdown_table(sweep, summary, label))
  if summary:
    _plot(sweep, seeds, out, summary, label)
  return summary


def markdown_table(sweep: Sweep, summary: list[dict], label: str) -> str:
  lines = [f"| run | {label} (mean ± std) | seeds | wall time (s, all seeds) |",
           "|---|---|---|---|"]
  for s in summary:
    lines.append(f"| {s['run']} | {s['mean']:.4g} ± {s['std']:.2g} | {s['seeds']} | "
                 f"{s['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    if rows:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)


def _train_curve(wd: str) -> dict[int, float]:
  curve = {}
  path = os.path.join(wd, "metrics.jsonl")
  if os.path.isfile(path):
    for line in open(path):
      rec = json.loads(line)
      if rec.get("split") == "train" and rec.get("loss") is not None:
        curve[rec["step"]] = rec["loss"]  # a resumed run rewrites steps: the last one wins
  return curve


def _plot(sweep: Sweep, seeds: int, out: str, summary: list[dict], label: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  root = os.path.join(out, sweep.name)
  by_name = {r.name: r for r in sweep.runs}
  fig, ax = plt.subplots(figsize=(8, 5))
  # tab20 and a second line style: more than ten runs keep distinct colours.
  ax.set_prop_cycle(plt.cycler(color=plt.cm.tab20.colors[:len(summary) or 1]))
  for i, s in enumerate(summary):
    curves = [_train_curve(workdir(out, sweep, by_name[s["run"]], seed)) for seed in range(seeds)
              if is_done(workdir(out, sweep, by_name[s["run"]], seed))]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    ax.plot(steps, [sum(c[t] for c in curves) / len(curves) for t in steps], label=s["run"],
            linestyle="-" if i % 2 == 0 else "--")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (mean over seeds)")
  ax.set_title(sweep.name)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(root, "loss_curves.png"), dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(summary) + 2), 4.5))
  ax.bar(range(len(summary)), [s["mean"] for s in summary], yerr=[s["std"] for s in summary],
         capsize=3)
  ax.set_xticks(range(len(summary)), [s["run"] for s in summary], rotation=60, ha="right",
                fontsize=7)
  ax.set_ylabel(f"{label}, mean ± std over seeds")
  ax.set_title(sweep.name)
  fig.tight_layout()
  fig.savefig(os.path.join(root, "final_metric.png"), dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


_PROG = "python -m mta_jax.sweep"
_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_enum("launch", "local", ["local", "print", "collect"],
                  "local: run here, one at a time; print: one command per run; collect: tables "
                  "only", flag_values=_FLAGS)
flags.DEFINE_integer("seeds", 0, "seeds per run (0: the sweep's default)", flag_values=_FLAGS)
flags.DEFINE_string("out", "runs/sweeps", "root directory of sweep outputs", flag_values=_FLAGS)
flags.DEFINE_string("only", "", "only runs whose name contains this string", flag_values=_FLAGS)


def _sigterm(signum, frame):
  # Stops like Ctrl-C: subprocess.call kills the running train.py (which resumes from its last
  # checkpoint next time) and the attempt's time is recorded.
  raise KeyboardInterrupt(f"signal {signum}")


def _main(rest: list[str]) -> int:
  if len(rest) != 1:
    raise cli.UsageError(f"give one sweep file (python -m mta_jax.sweep SWEEP_FILE [--flags]); "
                         f"got {rest}")
  args = _FLAGS
  try:
    sweep = load_sweep(rest[0])
    seeds = args.seeds or sweep.seeds
    if seeds < 1:
      raise SweepError(f"--seeds={args.seeds} must be >= 1.")
    out = os.path.abspath(args.out)
    os.chdir(REPO)  # relative paths in sweeps (data, tokenizer) are relative to the repository
    validate_sweep(sweep, seeds)  # before anything runs
  except SweepError as e:
    print(f"sweep error: {e}", file=sys.stderr)
    return 2
  n = len([r for r in sweep.runs if args.only in r.name]) * seeds
  print(f"sweep {sweep.name}: {n} runs ({len(sweep.runs)} configurations x {seeds} seeds), "
        f"output {os.path.join(out, sweep.name)}", flush=True)
  failures = 0
  if args.launch == "print":
    for seed in range(seeds):
      for run in sweep.runs:
        if args.only in run.name and not is_done(workdir(out, sweep, run, seed)):
          print(f"cd {shlex.quote(REPO)} && {shlex.join(command(sweep, run, seed, out))}")
    return 0
  t0 = time.time()
  if args.launch == "local":
    failures = _launch_local(sweep, seeds, out, args.only)
  summary = collect(sweep, seeds, out)
  label = METRICS[sweep.metric][1]
  print(markdown_table(sweep, summary, label), end="")
  print(f"sweep {sweep.name}: {len(summary)} configurations with results, {failures} failed "
        f"runs, {time.time() - t0:.0f}s; tables and PNGs in {os.path.join(out, sweep.name)}")
  return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
  """`mta-sweep` / `python -m mta_jax.sweep SWEEP_FILE`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, _PROG, __doc__, positional=True)


if __name__ == "__main__":
  # Run the imported module's main: sweep files build `mta_jax.sweep.Sweep`, which is not this
  # `__main__` module's class.
  from mta_jax import sweep as _sweep
  signal.signal(signal.SIGTERM, _sigterm)
  sys.exit(_sweep.main())
