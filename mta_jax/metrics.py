"""Where training numbers go: a progress line on stdout, metrics.jsonl, TensorBoard, W&B, a PNG.

Only process 0 writes files. Every record is `{"step": int, "split": "train"|"eval", ...}`, one
JSON object per line in `<workdir>/metrics.jsonl`; the same scalars go to TensorBoard event files
in `<workdir>/tensorboard` (`tensorboard --logdir <workdir>`), tagged `<split>/<name>`, and, when
`wandb_project` is set, to a Weights & Biases run (same tags; its id is kept in
`<workdir>/wandb_run_id` so a resumed run continues the same W&B run). A resumed run keeps each
step once in metrics.jsonl and TensorBoard (see `MetricsWriter.open`). The workdir may be local or
a bucket (`mta_jax.storage`).
"""

import json
import math
import os
import sys
import time
import uuid

import jax
from absl import flags

from mta_jax import cli, storage


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _TensorBoard:
  """Scalars into one TensorBoard run, written synchronously on the caller's thread.

  tensorboardX's SummaryWriter writes from a background thread: when the disk fills up, that
  thread dies with a traceback and later writes block or flood the output. Writing the records
  here (tensorboardX's own event-file writer and summary protos, no thread) makes a failure an
  ordinary exception that the caller turns into one warning. A resumed run passes
  `purge_step`: TensorBoard then drops the steps >= purge_step of the earlier event files, so a
  resumed run reads as one run without replayed steps.
  """

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventsWriter(os.path.join(logdir, "events"))
    if purge_step is not None:
      self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    for tag, v in scalars.items():
      self._writer.write_event(Event(wall_time=time.time(), step=int(step),
                                     summary=scalar(tag, v)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_records(path) -> list[dict]:
  """The records of a metrics.jsonl, local or remote (a torn last line, e.g. from a kill, is
  skipped)."""
  target = storage.path(path)
  if not target.exists():
    return []
  out = []
  for line in target.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


class MetricsWriter:
  """Progress lines, JSONL, TensorBoard and the loss curve for one run.

  Nothing is written until `open(start_step)`: a resumed run first keeps the records up to the
  step it resumed from (the later ones are replayed), so metrics.jsonl holds every step once,
  TensorBoard continues one run and the loss curve covers the whole run.
  """

  def __init__(self, workdir: str, total_steps: int, *, enabled: bool | None = None,
               wandb_project: str = "", wandb_run: str = "", wandb_entity: str = "",
               config: dict | None = None):
    self.workdir = workdir
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.history: list[dict] = []
    self._tb = None
    self._tb_dir = None
    self._tb_synced = 0.0
    self._jsonl = None
    self._wandb = None
    self._wandb_args = (wandb_project, wandb_run, wandb_entity, config)
    if self.enabled:  # a file, or a bucket out of reach, is said now (nothing is written yet)
      storage.check_dir(workdir, "--workdir")

  def open(self, start_step: int = 0) -> None:
    """Start writing at `start_step` (0: a fresh run); drops earlier records of later steps."""
    if not self.enabled:
      return
    storage.ensure_dir(self.workdir, "--workdir")
    path = storage.path(self.workdir) / "metrics.jsonl"
    records = read_records(path)
    self.history = [r for r in records if int(r.get("step", 0)) <= start_step]
    if path.exists():
      dropped = len(records) - len(self.history)
      _rewrite(path, "".join(json.dumps(r) + "\n" for r in self.history))
      if dropped:
        self.log(f"metrics.jsonl: dropped {dropped} record(s) after step {start_step} "
                 "(they are replayed from the checkpoint)")
    self._jsonl = storage.AppendFile(path)
    project, run, entity, config = self._wandb_args
    if project:
      self._wandb = _wandb_run(self.workdir, project, run, entity, config)
    try:
      # Event files are written locally; a remote workdir gets copies (storage.LocalMirror).
      self._tb_dir = storage.LocalMirror(storage.path(self.workdir) / "tensorboard")
      self._tb = _TensorBoard(self._tb_dir.local,
                              purge_step=start_step + 1 if start_step else None)
    except ImportError:  # TensorBoard files are a convenience, not a requirement
      self._tb = None
    except OSError as e:
      self._tb_failed(e)

  def _tb_failed(self, e: Exception) -> None:
    self._tb = None
    print(f"warning: TensorBoard logging stopped: {type(e).__name__}: {e}", file=sys.stderr,
          flush=True)

  def write(self, step: int, split: str, scalars: dict) -> None:
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: (float(v) if v is not None else None) for k, v in scalars.items()})
    self.history.append(record)
    if not self.enabled or self._jsonl is None:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      try:
        self._tb.write(step, {f"{split}/{k}": float(v) for k, v in scalars.items()
                              if v is not None and math.isfinite(float(v))})
        if time.time() - self._tb_synced > 30:
          self._tb_dir.sync()
          self._tb_synced = time.time()
      except OSError as e:  # e.g. disk full: metrics.jsonl (above) reports it first
        self._tb_failed(e)
    if self._wandb is not None:
      self._wandb.log({f"{split}/{k}": float(v) for k, v in scalars.items()
                       if v is not None and math.isfinite(float(v))}, step=int(step))

  def progress(self, step: int, scalars: dict, elapsed: float, steps_done: int) -> str:
    """`step 200/1500 | loss 1.2345 | 52.1k tok/s | MFU 31.0% | lr 1.0e-03 | ETA 3m10s`."""
    rate = steps_done / elapsed if elapsed > 0 else float("nan")
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    parts = [f"step {step}/{self.total_steps}", f"loss {scalars['loss']:.4f}"]
    tps = scalars.get("tokens_per_s")
    if tps is not None:
      parts.append(f"{tps / 1e3:.1f}k tok/s")
    if scalars.get("mfu") is not None:
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if "lr" in scalars:
      parts.append(f"lr {scalars['lr']:.2e}")
    if "grad_norm" in scalars:
      parts.append(f"gnorm {scalars['grad_norm']:.3f}")
    parts.append(f"ETA {_fmt_duration(eta)}")
    line = " | ".join(parts)
    if self.enabled:
      print(line, flush=True)
    return line

  def log(self, message: str) -> None:
    if self.enabled:
      print(message, flush=True)

  def plot(self, filename: str = "loss_curve.png") -> str | None:
    """Training loss (and eval loss / error when present) against step, as a PNG."""
    if not self.enabled:
      return None
    train = [r for r in self.history if r["split"] == "train" and r.get("loss") is not None]
    evals = [r for r in self.history if r["split"] == "eval" and r.get("loss") is not None]
    if not train and not evals:
      return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_err = any(r.get("seq_error") is not None for r in evals)
    fig, axes = plt.subplots(1, 2 if has_err else 1, figsize=(11 if has_err else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    if train:
      ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
      ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_err:
      ax = axes[0, 1]
      pts = [r for r in evals if r.get("seq_error") is not None]
      ax.plot([r["step"] for r in pts], [100 * r["seq_error"] for r in pts], "o-", color="C3")
      ax.set_xlabel("step")
      ax.set_ylabel("eval error rate (%)")
      ax.set_ylim(bottom=0)
      ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(self.workdir)))
    fig.tight_layout()
    path = storage.save_figure(fig, os.path.join(self.workdir, filename))
    plt.close(fig)
    return path

  def close(self) -> None:
    """Close the files; errors while closing (e.g. a full disk) are not raised again."""
    jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
    for f in (jsonl, tb, self._tb_dir if tb is not None else None):
      if f is not None:
        try:
          f.close()
        except OSError:
          pass
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _rewrite(path, text: str) -> None:
  """Replace a file's contents so that a kill leaves the old or the new file, never half of one:
  locally through a renamed temporary file; an object store replaces objects whole anyway."""
  if storage.is_remote(path):
    path.write_text(text)
    return
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.fspath(path))


def _wandb_run(workdir: str, project: str, name: str, entity: str, config: dict | None):
  """A W&B run for `workdir`: created on the first start, resumed (same id) afterwards.
  WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later)."""
  try:
    import wandb
  except ImportError:
    from mta_jax.config import ConfigError
    raise ConfigError(f"wandb_project={project!r} needs the wandb package: "
                      "`pip install wandb` (or `pip install mta_jax[wandb]`), or unset "
                      "wandb_project.") from None
  id_file = storage.path(workdir) / "wandb_run_id"
  if id_file.is_file():
    run_id = id_file.read_text().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
  local = None if storage.is_remote(workdir) else workdir  # W&B keeps its files on local disk
  return wandb.init(project=project, name=name or os.path.basename(os.path.normpath(workdir)),
                    entity=entity or None, id=run_id, resume="allow", dir=local, config=config)


def memory_summary(compiled) -> str:
  """One line from `compiled.memory_analysis()` (per device), or '' when unavailable."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return ""
  if m is None:
    return ""
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  fields = [("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
            ("temporaries", "temp_size_in_bytes"), ("code", "generated_code_size_in_bytes"),
            ("aliased", "alias_size_in_bytes")]
  parts = [f"{label} {mib(getattr(m, attr))}" for label, attr in fields if hasattr(m, attr)]
  return "compiled memory per device: " + ", ".join(parts)


def compare(workdirs: list[str], out: str, labels: list[str] | None = None) -> str:
  """One figure of several runs: training loss and eval error rate against step.

      python -m mta_jax.metrics runs/toy_mta_n5_first runs/toy_baseline_n5_first --out cmp.png
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (w, label) in enumerate(zip(workdirs, labels)):
    records = read_records(storage.path(w) / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval" and r.get("seq_error") is not None]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=f"C{i}",
                 label=label)
    ax_err.plot([r["step"] for r in evals], [100 * r["seq_error"] for r in evals], "o-",
                color=f"C{i}", label=label)
  ax_loss.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log")
  ax_err.set(xlabel="step", ylabel="held-out error rate (%)", ylim=(0, 100))
  for ax in (ax_loss, ax_err):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  storage.save_figure(fig, out)
  plt.close(fig)
  return out


# ---------------------------------------------------------------------------------------------
# Command line: python -m mta_jax.metrics WORKDIR [WORKDIR ...] --out=cmp.png [--labels=a,b]
# (absl flags on this command's own FlagValues: see mta_jax/cli.py)
# ---------------------------------------------------------------------------------------------

_FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "the PNG to write", flag_values=_FLAGS)
flags.DEFINE_list("labels", None, "comma-separated legend labels, one per workdir "
                  "(default: the workdirs' names)", flag_values=_FLAGS)
flags.mark_flag_as_required("out", flag_values=_FLAGS)


def _main(workdirs: list[str]) -> int:
  if not workdirs:
    raise cli.UsageError("name the run directories to plot side by side")
  print(compare(workdirs, _FLAGS.out, _FLAGS.labels))
  return 0


def main(argv=None) -> int:
  """`python -m mta_jax.metrics WORKDIR ... --out=cmp.png`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.metrics",
                 "Plot runs side by side: python -m mta_jax.metrics WORKDIR [WORKDIR ...] "
                 "--out=cmp.png [--labels=a,b]", positional=True)


if __name__ == "__main__":
  sys.exit(main())
