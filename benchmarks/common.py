"""Shared benchmark machinery: one configuration per fresh subprocess, honest time and memory.

Time: compile first, one warm-up call, then the median of `repeats` calls, each ended by
`block_until_ready`. Both wall-clock and process CPU time (all threads) are recorded: CPU time
is what the work costs and is robust to other processes sharing the machine; wall time is what
a user waits for on an otherwise idle machine.

Memory, two views:
  * `peak_rss_mib`: the process's peak resident set during the timed calls only, minus its
    resident set just before them (Linux: peak reset with /proc/self/clear_refs, read VmHWM).
    Inputs, parameters and compiled code are in the baseline; activations, gradients and every
    temporary buffer of the step are in the delta.
  * `xla_temp_mib` etc.: the compiled executable's `memory_analysis()` (XLA's static buffer
    assignment: temp = the scratch space one call needs, argument/output sizes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
import types

import numpy as np


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def reset_peak_rss() -> int:
  """Resets the kernel's peak-RSS mark; returns the current RSS in KiB."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass
  return _status_kib("VmRSS")


def peak_rss_kib() -> int:
  return _status_kib("VmHWM")


class TooBig(RuntimeError):
  pass


def measure(fn, args, repeats: int, mem_budget_gib: float = 0.0) -> dict:
  """Compiles `fn` (a jax.jit function), warms up, times `repeats` calls, measures memory.

  With mem_budget_gib > 0, refuses (TooBig) to run an executable whose XLA temp space exceeds
  it, so a benchmark never pushes a shared machine into the OOM killer.
  """
  import jax
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
  if mem_budget_gib and temp_gib > mem_budget_gib:
    raise TooBig(f"needs {temp_gib:.1f} GiB temp > budget {mem_budget_gib} GiB")
  base_kib = reset_peak_rss()  # before the first (warm-up) call: its allocations count
  jax.block_until_ready(compiled(*args))
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  peak_kib = peak_rss_kib()
  ma = compiled.memory_analysis()
  mib = lambda b: b / 2**20
  return {
      "wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
      "wall_all_s": walls, "cpu_all_s": cpus, "compile_s": compile_s,
      "peak_rss_mib": max(0, peak_kib - base_kib) / 1024,
      "xla_temp_mib": mib(ma.temp_size_in_bytes),
      "xla_argument_mib": mib(ma.argument_size_in_bytes),
      "xla_output_mib": mib(ma.output_size_in_bytes),
  }


@contextlib.contextmanager
def locked(path: str):
  """Holds an exclusive lock on the file `path` (created if missing) for the block; no-op for
  "". Serialises TPU compiles: one process at a time may hold libtpu."""
  if not path:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(script: str, config: dict, timeout_s: float) -> dict:
  """Runs `script --worker JSON` in a fresh process; returns its JSON result (or the failure)."""
  cmd = [sys.executable, script, "--worker", json.dumps(config)]
  env = dict(os.environ)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout after {timeout_s:.0f}s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("TOOBIG "):
      return {"error": line[len("TOOBIG "):]}
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
  return {"error": f"exit {proc.returncode}: {reason}"}


def run_and_report(script: str, config: dict, timeout_s: float, label: str) -> dict:
  """`run_worker`, with the configuration merged into the result and one status line printed."""
  res = run_worker(script, config, timeout_s)
  res.update(config)
  status = res.get("error") or res.get("note") or (
      f"wall {res['wall_s']:.3f}s cpu {res['cpu_s']:.3f}s peak {res['peak_rss_mib']:.0f} MiB")
  print(f"T={config['t']:5d} {label:16s} {status}", flush=True)
  return res


def reference_row(results: list[dict], row: dict, key: str, name: str) -> dict | None:
  """The successful result with row's length whose `key` is `name` (what ratios divide by)."""
  return next((b for b in results if b["t"] == row["t"] and b[key] == name
               and "error" not in b and "note" not in b), None)


def emit_worker(fn, cfg: dict) -> None:
  try:
    result = fn(cfg)
  except TooBig as e:
    print("TOOBIG " + str(e), flush=True)
    return
  emit(result)


def emit(result: dict) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def machine() -> dict:
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = (-1, -1, -1)
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(),
          "load_avg_at_start": load}


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)


def table(rows: list[list], header: list[str]) -> str:
  cells = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


# ---------------------------------------------------------------------------------------------
# Command line: absl flags, as the mta_jax commands (each script defines its flags on absl's
# global FLAGS: a benchmark is one script per process)
# ---------------------------------------------------------------------------------------------


def run(main) -> None:
  """absl.app.run(main) with absl's INFO logs off (as train.py); a bad flag is one line and
  exit status 2. Flags take `--name=value` or `--name value`."""
  from absl import app, flags, logging

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{os.path.basename(argv[0])}: error: {e} (--help lists the flags)", file=sys.stderr)
      sys.exit(2)
    if not flags.FLAGS["verbosity"].present:
      flags.FLAGS.verbosity = logging.WARNING
    return rest

  app.run(main, flags_parser=parse)


def flag_args(argv) -> types.SimpleNamespace:
  """The parsed flags as attributes (`--c-h` as `.c_h`); refuses positional arguments."""
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every argument is a --flag")
  return types.SimpleNamespace(**{k.replace("-", "_"): v
                                  for k, v in flags.FLAGS.flag_values_dict().items()})
