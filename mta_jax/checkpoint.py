"""Checkpoints of a training run: an Orbax CheckpointManager (plain PyTree files: tree_io.py).

A run's workdir holds `checkpoints/<step>/` directories written by an Orbax CheckpointManager,
each with four items:

    params/      TrainState.params: the model parameters (Orbax PyTree, sharded arrays)
    opt_state/   {'step': TrainState.step, 'opt_state': TrainState.opt_state} (the optimizer
                 moments and its own count)
    data_iter/   the data iterator's state, one JSON file per process (process_<i>-of-<n>.json)
    meta/        JSON: step, tokens seen, the resolved config, tokenizer, process/device counts

Trees are stored as nested dicts keyed by their pytree path (nnx Variables unwrapped).
Restoring goes against the CURRENT run's abstract TrainState, whose ShapeDtypeStruct leaves carry
the current mesh's shardings: that is how a checkpoint written on one mesh / device count is read
onto another.

Typical use in a training loop (train_lib.py):

    ckpt = Checkpointer(workdir, cfg)
    restored = ckpt.restore_latest(abstract_state, data_iter)   # None in a fresh workdir
    if restored is not None:
      state, step, meta = restored
    while step < cfg.steps:
      state = train_step(state, next(data_iter)); step += 1
      if ckpt.wants_save(step):         # the interval policy, or SIGTERM / preemption
        ckpt.save(step, state, data_iter, {"tokens_seen": ...})
      if ckpt.should_stop(step):
        break
    ckpt.save(step, state, data_iter, meta)
    ckpt.close()                        # waits for async saves
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mta_jax import ckpt_integrity
from mta_jax import config as config_lib
from mta_jax import faults, paths, tree_io
from mta_jax.train_state import TrainState

log = logging.getLogger(__name__)


class _QuietOrbax(logging.Filter):
  """Orbax logs every save step at INFO through absl; keep its warnings and errors only (and
  not the notes a deliberate read-only manager produces)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= logging.WARNING and "read only" not in record.getMessage() and \
        "read_only=True" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOrbax())
# A failed background save is re-raised to the caller: log it as one line, not a traceback.
logging.getLogger("absl").addFilter(faults.LibraryFaults("orbax", "checkpoint save"))

FORMAT_VERSION = 1
ITEMS = ("params", "opt_state", "data_iter", "meta")
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint could not be used; the message names the path and what to do."""


class IncompatibleCheckpointError(config_lib.ConfigError):
  """The checkpoint was written for a different model; the message lists the differences.
  (A ConfigError: the entry point reports it as one line and exits with status 2.)"""


# ---------------------------------------------------------------------------------------------
# Train states
# ---------------------------------------------------------------------------------------------


def _items(state: TrainState) -> dict[str, Any]:
  """The two array items a TrainState is stored as (the layout in the module docstring)."""
  if not isinstance(state, TrainState):
    raise TypeError(f"checkpoint: expected a mta_jax.train_state.TrainState, got "
                    f"{type(state).__name__}.")
  return {"params": state.params, "opt_state": {"step": state.step, "opt_state": state.opt_state}}


def _from_items(abstract: TrainState, restored: Mapping[str, Any]) -> TrainState:
  """The TrainState of `abstract`'s structure (nnx Variables included) holding `restored`."""
  items = _items(abstract)
  params, rest = (tree_io.fill(items[k], tree_io.flatten(restored[k]))
                  for k in ("params", "opt_state"))
  return TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"])


# ---------------------------------------------------------------------------------------------
# Data iterator state: one JSON file per process
# ---------------------------------------------------------------------------------------------


def _process_file(directory: epath.Path, index: int, count: int) -> epath.Path:
  return directory / f"process_{index}-of-{count}.json"


class DataIterHandler(ocp.CheckpointHandler):
  """Writes a state captured at save time (grain `get_state()`: dict or bytes) per process.

  The state is captured synchronously by `Checkpointer`, so an async save never races with the
  iterator moving on.
  """

  def save(self, directory: epath.Path, args: "DataIterSave"):
    state = args.state
    if isinstance(state, (bytes, bytearray)):
      record = {"encoding": "base64", "state": base64.b64encode(bytes(state)).decode()}
    else:
      record = {"encoding": "json", "state": state}
    path = _process_file(directory, jax.process_index(), jax.process_count())
    try:
      path.write_text(json.dumps(record, indent=1))
    except OSError as e:  # name the file: a bare write error (e.g. disk full) carries no path
      raise OSError(e.errno, e.strerror, str(path)) from e

  def restore(self, directory: epath.Path, args: "DataIterRestore" = None):
    path = _process_file(directory, jax.process_index(), jax.process_count())
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise CheckpointError(f"no data-iterator state for this process at {path} (found "
                            f"{found}).")
    record = json.loads(path.read_text())
    if record["encoding"] == "base64":
      return base64.b64decode(record["state"])
    return record["state"]

  def metadata(self, directory: epath.Path):
    del directory
    return None

  def structure(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  pass


def _iter_state(data_iter):
  if data_iter is None:
    return None
  if not hasattr(data_iter, "get_state"):
    raise TypeError(f"checkpoint: the data iterator {type(data_iter).__name__} has no "
                    "get_state(); pass data_iter=None to run without saving its position.")
  return data_iter.get_state()


# ---------------------------------------------------------------------------------------------
# Compatibility with the current model
# ---------------------------------------------------------------------------------------------


def raise_incompatible(where: str, diffs: list[str], hint: str = "",
                       what: str = "the current model") -> None:
  if not diffs:
    return
  shown = "\n  ".join(diffs[:20])
  more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
  raise IncompatibleCheckpointError(
      f"checkpoint at {where} does not fit {what}:\n  {shown}{more}\n"
      f"{hint or 'Use the config the checkpoint was written with, or a fresh workdir.'}")


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


def _is_incomplete(name: str) -> bool:
  return "tmp" in name and not name.isdigit()


class Checkpointer:
  """Orbax CheckpointManager for one run's workdir: periodic async saves, retention, resume,
  SIGTERM / preemption handling."""

  def __init__(self, workdir, cfg: config_lib.TrainConfig | None = None, *,
               read_only: bool = False):
    """`cfg` is the run's config (saved with every step, and what a restore must fit); a
    read-only Checkpointer (export, evaluation of stored steps) may go without one."""
    if cfg is None and not read_only:
      raise TypeError("Checkpointer: a writable checkpointer needs the run's TrainConfig.")
    self.cfg = cfg
    self.ccfg = cfg.checkpoint if cfg is not None else config_lib.CheckpointConfig()
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    if not read_only:
      self._warn_incomplete()
    policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if self.ccfg.every_steps > 0:
      policies.insert(0, ocp.checkpoint_managers.FixedIntervalPolicy(self.ccfg.every_steps))
    # keep_last=0 keeps every checkpoint; keep_every=m also keeps steps divisible by m.
    keep = [ocp.checkpoint_managers.LatestN(self.ccfg.keep_last or None)]
    if self.ccfg.keep_every > 0:
      keep.append(ocp.checkpoint_managers.EveryNSteps(self.ccfg.keep_every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
        enable_async_checkpointing=self.ccfg.async_save,
        # Checksums are written by Orbax's background thread once a save is finalised.
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._after_async_save)
                       if self.ccfg.async_save and not read_only else None),
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "data_iter": DataIterHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._data_sig: dict | None = None
    self._to_hash: list[int] = []  # saved steps whose checksums are not written yet (FIFO)
    self._hash_lock = threading.Lock()
    self._stop_requested = False
    self._stop_at: int | None = None
    self._closed = False
    atexit.register(self._finish_at_exit)  # an exception in the loop still completes saves
    self._prev_handlers: dict = {}
    if (not read_only and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      # Multi-process runs rely on JAX's preemption sync point instead (see should_stop).
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

  # -- signals ----------------------------------------------------------------------------------

  def _on_signal(self, signum, frame):
    """SIGTERM and a first Ctrl-C (SIGINT): save at the next step boundary, then exit.
    A second Ctrl-C aborts at once (KeyboardInterrupt) without saving."""
    del frame
    if signum == signal.SIGINT and self._stop_requested:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
    self._stop_requested = True
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    extra = " Press Ctrl-C again to abort without saving." if signum == signal.SIGINT else ""
    print(f"{name} received: saving at the next step boundary, then exiting.{extra}",
          file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    """True once SIGTERM arrived (single process) or JAX's preemption sync point is reached."""
    if self._stop_at is not None:
      return True
    if self._stop_requested or (jax.process_count() > 1 and self._mngr.reached_preemption(step)):
      self._stop_at = step
      return True
    return False

  # -- saving -----------------------------------------------------------------------------------

  def _warn_incomplete(self) -> None:
    if not self.directory.exists():
      return
    for p in sorted(self.directory.iterdir()):
      if _is_incomplete(p.name):
        log.warning("ignoring incomplete checkpoint %s (a save was interrupted); the latest "
                    "complete checkpoint is used and the incomplete one removed.", p)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def _meta(self, step: int, meta: Mapping | None) -> dict:
    out = dict(meta or {})
    out.update(
        format_version=FORMAT_VERSION, step=int(step),
        config=config_lib.to_dict(self.cfg),
        tokenizer=self.cfg.data.tokenizer or None,
        data_signature=self._data_signature(),
        process_count=jax.process_count(), device_count=jax.device_count(),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return json.loads(json.dumps(out, default=_json_default))

  def save(self, step: int, state: TrainState, data_iter=None,
           meta: Mapping | None = None) -> bool:
    """Save `state` as `step` now (async unless disabled; `wants_save` applies the policy), with
    the data iterator's position and `meta` (JSON). False if `step` is saved already."""
    step = int(step)
    if step in self._mngr.all_steps():
      return False
    items = {k: ocp.args.StandardSave(tree_io.to_storable(v)) for k, v in _items(state).items()}
    items["meta"] = ocp.args.JsonSave(self._meta(step, meta))
    state = _iter_state(data_iter)
    if state is not None:
      items["data_iter"] = DataIterSave(state)
    with self._hash_lock:
      self._to_hash.append(step)  # before the save: its background callback may come at once
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if not saved:
      with self._hash_lock:
        self._to_hash.remove(step)
    else:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
      if not self.ccfg.async_save:
        self._hash_next()
    return saved

  def wants_save(self, step: int) -> bool:
    """True when `step` is due a save: the interval policy, or a requested stop (SIGTERM)."""
    step = int(step)
    if step in self._mngr.all_steps():
      return False
    return self.should_stop(step) or self._mngr.should_save(step)

  def check_for_errors(self) -> None:
    """Raise now the error of a failed background save (e.g. disk full), not at the next save."""
    self._mngr.check_for_errors()

  # -- checksums (mta_jax.ckpt_integrity) -------------------------------------------------------

  def _step_dir_being_saved(self, step: int) -> epath.Path | None:
    final = self.directory / str(step)
    if final.exists():
      return final
    tmp = [p for p in self.directory.iterdir()
           if p.name.startswith(f"{step}.") and _is_incomplete(p.name)]
    return tmp[0] if len(tmp) == 1 else None

  def _hash_next(self) -> None:
    """Write the checksums of the oldest saved step not hashed yet (process 0)."""
    with self._hash_lock:
      if not self._to_hash:
        return
      step = self._to_hash.pop(0)
    if jax.process_index() != 0:
      return
    d = self._step_dir_being_saved(step)
    if d is None:
      log.warning("checkpoint step %d: directory not found, no checksums written", step)
      return
    ckpt_integrity.write(d)

  def _after_async_save(self) -> None:
    """Orbax's post-finalisation callback: the step's files are complete (the step directory
    may still carry its temporary name; checksums.json moves with it)."""
    try:
      self._hash_next()
    except Exception as e:  # noqa: BLE001 - a failure here must not fail the save itself
      # A storage fault names the checkpoint directory (the OSError itself often has no path).
      log.warning("could not write checkpoint checksums: %s",
                  faults.describe(e, str(self.directory)) or faults.one_line(e))

  def verify_step(self, step: int) -> None:
    """CorruptCheckpointError if `step` does not match its checksums; a warning if it has none."""
    n = ckpt_integrity.verify(self.directory / str(step))
    if n is None:
      log.warning("checkpoint %s has no checksums (an older version wrote it, or the run "
                  "stopped before they were written); using it unverified.",
                  self.directory / str(step))

  def _finish_at_exit(self) -> None:
    if not self._closed:
      self.close()

  def close(self) -> None:
    """Wait for in-flight async saves, then release the manager (idempotent)."""
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self._finish_at_exit)
    self._mngr.wait_until_finished()
    self._mngr.close()
    with self._hash_lock:
      left = len(self._to_hash)
    for _ in range(left):  # normally none: each finished save wrote its own
      self._hash_next()
    for sig, handler in self._prev_handlers.items():
      signal.signal(sig, handler)
    self._prev_handlers = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restoring --------------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def stored_shapes(self, step: int, item: str) -> dict[tuple[str, ...], Any]:
    return tree_io.metadata_tree(self._mngr.item_metadata(step)[item])

  def _check_compatible(self, step: int, meta: Mapping, targets: Mapping[str, dict]) -> None:
    """Refuse a checkpoint of another model: config fields first, then leaf shapes."""
    where = str(self.directory / str(step))
    stored_cfg = meta.get("config", {}).get("model")
    if stored_cfg is not None and self.cfg is not None:
      stored_model = config_lib.from_dict(config_lib.ModelConfig, stored_cfg, "meta.model")
      diffs = config_lib.model_config_diff(stored_model, self.cfg.model)
      hint = ("Checkpoints do not convert between the scanned and unrolled layer layouts: "
              "resume with the model.scan_layers the run was started with (parameters convert "
              "with mta_jax.model.to_scanned_params / to_unrolled_params)."
              if any(d.startswith("model.scan_layers:") for d in diffs) else "")
      raise_incompatible(where, diffs, hint)
    for item, target in targets.items():
      raise_incompatible(where, tree_io.tree_shape_diff(self.stored_shapes(step, item),
                                                        tree_io.flatten(target), item))

  def _check_same_data(self, step: int, meta: Mapping) -> None:
    """Refuse to resume onto other data (IncompatibleCheckpointError listing the differences)
    unless checkpoint.allow_data_change, which turns the refusal into a warning."""
    stored = meta.get("data_signature")
    if not isinstance(stored, Mapping) or self.cfg is None:  # written before signatures existed
      return
    current = self._data_signature()
    diffs = [f"{k}: checkpoint {stored.get(k)!r}, current {current.get(k)!r}"
             for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if not diffs:
      return
    where = str(self.directory / str(step))
    if self.ccfg.allow_data_change:
      log.warning("resuming %s on different data (checkpoint.allow_data_change=True): %s",
                  where, "; ".join(diffs))
      return
    raise_incompatible(where, diffs, hint=(
        "The run would continue on other data than it was trained on. Use the data settings "
        "of the checkpoint, a fresh workdir, or --config.checkpoint.allow_data_change=True to "
        "resume anyway."), what="the current data")

  def _data_signature(self) -> dict:
    if self._data_sig is None:
      self._data_sig = data_signature(self.cfg)
    return self._data_sig

  def _quarantine(self, step: int) -> None:
    """Move an unreadable checkpoint aside (training only: eval and export change nothing)."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"unreadable.{step}.{int(time.time())}"
      try:
        src.rename(dst)
        log.warning("moved the unreadable checkpoint %s to %s", src, dst)
      except OSError as e:  # pragma: no cover - e.g. read-only storage
        log.warning("could not move the unreadable checkpoint %s aside: %s", src, e)
    self._mngr.reload()

  def restore_latest(self, abstract: TrainState, data_iter=None
                     ) -> tuple[TrainState, int, dict] | None:
    """Restore the newest readable checkpoint onto the current mesh.

    Args:
      abstract: the run's TrainState with ShapeDtypeStruct (or array) leaves carrying the
        CURRENT mesh's shardings (leaves without one go to a single device).
      data_iter: restored in place with `set_state` when it was saved by the same number of
        processes; otherwise it is left at its start and meta["data_restarted"] is True.

    Returns:
      None when the workdir has no checkpoint, else (train_state, step, meta).
    Raises:
      IncompatibleCheckpointError when the checkpoint belongs to another model.
      CheckpointError when checkpoints exist but none can be read.
    """
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      return None
    targets = {k: tree_io.abstract_storable(v) for k, v in _items(abstract).items()}
    errors: list[str] = []
    bad: list[int] = []
    for step in steps:
      try:
        meta, restored = self._restore_step(step, targets, data_iter)
      except IncompatibleCheckpointError:
        raise  # another model's checkpoint: refuse, never fall back past it
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        errors.append(self._unreadable(step, e))
        bad.append(step)
        continue
      state = _from_items(abstract, restored)
      for b in bad:  # newer than `step` and unreadable: move aside so the step can be re-saved
        self._quarantine(b)
      if errors:
        log.warning("resumed from step %d after skipping %d unreadable newer checkpoint(s).",
                    step, len(errors))
      log.info("checkpoint: restored step %d from %s", step, self.directory)
      return state, step, meta
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}:\n  " + "\n  ".join(errors) +
        "\nNothing was moved or deleted. Move the directory away to start fresh, or restore a "
        "good copy.")

  def _restore_step(self, step: int, targets: Mapping[str, dict], data_iter):
    """(meta, restored items) of `step`, the data iterator moved to its position; raises if it
    is corrupt or unreadable, of another model, or (training) of other data."""
    self.verify_step(step)
    meta = dict(self.read_meta(step))
    self._check_compatible(step, meta, targets)
    if data_iter is not None:  # training continues the data stream: it must be the same
      self._check_same_data(step, meta)
    same_processes = meta.get("process_count", 1) == jax.process_count()
    has_iter = (self.directory / str(step) / "data_iter").exists()
    want_iter = data_iter is not None and same_processes and has_iter
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    if want_iter:
      args["data_iter"] = DataIterRestore()
    restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
    jax.block_until_ready(restored["params"])
    meta["data_restarted"] = data_iter is not None and not want_iter
    _follow_data_iter(step, meta, restored, data_iter)  # a wrong state falls back too
    return meta, restored

  def _unreadable(self, step: int, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    msg = f"step {step}: {type(e).__name__}: {first[:300]}"
    log.warning("checkpoint %s is unreadable (%s); falling back to the previous checkpoint.",
                self.directory / str(step), msg)
    return msg

  def restore_item(self, step: int, item: str, target) -> Any:
    """One array item ('params' / 'opt_state') of `step`, restored into `target` (a nested dict
    of ShapeDtypeStruct with shardings, or of numpy arrays for host copies)."""
    return self._mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(target)}))[item]



def _follow_data_iter(step: int, meta: Mapping, restored: Mapping, data_iter) -> None:
  """Moves `data_iter` to the restored position, or warns that the data stream restarts."""
  if data_iter is None:
    return
  if not meta["data_restarted"]:
    _check_iter_state(restored["data_iter"])
    data_iter.set_state(restored["data_iter"])
    return
  same_processes = meta.get("process_count", 1) == jax.process_count()
  why = (f"was written by {meta.get('process_count')} process(es) and this run has "
         f"{jax.process_count()}" if not same_processes else "holds no data-iterator state")
  log.warning(
      "checkpoint step %d %s: the data iterator position cannot follow. The data stream "
      "restarts from its beginning (deterministically, from the configured seed); "
      "examples seen before the checkpoint may be seen again.", step, why)


# The data settings a resumed run must share with its checkpoint (data.<field>).
_DATA_FIELDS = ("source", "path", "tfds_name", "train_split", "text_key", "add_bos", "add_eos",
                "packing", "seq_len", "batch_size", "pack_bins", "long_docs", "shuffle",
                "shuffle_window", "seed", "synthetic_vocab_size", "toy")


def _file_sha256(path: str) -> str | None:
  import hashlib
  try:
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()
  except OSError:
    return None


def data_signature(cfg: config_lib.TrainConfig) -> dict:
  """What the training data stream depends on: the data settings that matter for the source
  and the sha256 of the tokenizer file (its content, not only its size or path)."""
  d = cfg.data
  sig = {}
  for f in _DATA_FIELDS:
    v = getattr(d, f, None)
    if f == "toy" and d.source != "toy":
      continue
    sig[f"data.{f}"] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
  if d.tokenizer:
    sig["tokenizer sha256"] = _file_sha256(d.tokenizer)
  return json.loads(json.dumps(sig, default=_json_default))


def _check_iter_state(state, where: str = "data_iter") -> None:
  """CheckpointError for an iterator state no iterator could have written: a negative
  position or index (grain's set_state accepts it and fails at the next batch)."""
  if isinstance(state, Mapping):
    for k, v in state.items():
      name = f"{where}.{k}"
      if (isinstance(v, int) and not isinstance(v, bool) and v < 0
          and any(w in str(k) for w in ("index", "pos"))):
        raise CheckpointError(f"the data-iterator state has {name}={v}, which no iterator "
                              "writes.")
      _check_iter_state(v, name)
  elif isinstance(state, (list, tuple)):
    for i, v in enumerate(state):
      _check_iter_state(v, f"{where}[{i}]")


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (set, frozenset, tuple)):
    return list(x)
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def checkpoint_dir(workdir) -> epath.Path:
  """`<workdir>/checkpoints`, absolute (Orbax refuses relative checkpoint paths)."""
  return epath.Path(paths.resolve(workdir)) / CHECKPOINT_SUBDIR

