"""Training state, loss, the jitted train / eval steps and the training loop.

The state is a small pytree that orbax saves as it is:

    TrainState(step, params, opt_state)
      step       int32 []   optimizer updates applied so far
      params     nnx.State  the model's nnx.Param variables (with `logical_axes` metadata)
      opt_state  nnx.State  nnx.state(nnx.Optimizer): optax moments shaped like `params` and
                            carrying the same metadata, plus the optimizer's own step counter

The static halves (`GraphDefs`: the model's and the optimizer's nnx graphdefs) stay out of the
state. The step is functional: `nnx.merge` the graphdefs with the state inside `jax.jit`, run,
`nnx.state` the result back out. State is created directly sharded (MaxText style):

    abstract state (jax.eval_shape)  ->  shardings from logical axes  ->  jit(init, out_shardings)

and the train step is `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)`.

Loss: cross entropy summed over positions with loss_mask > 0 (the answer tokens of the toy task)
divided by their count, + z_loss * mean(log Z ^ 2). With gradient accumulation the micro-batch
sums are added before dividing, so the gradient equals the big-batch gradient exactly.
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mta_jax import checkpoint
from mta_jax import config as config_lib
from mta_jax import data as data_lib
from mta_jax import flops as flops_lib
from mta_jax import metrics as metrics_lib
from mta_jax import optim, profiling, retrofit
from mta_jax import sharding
from mta_jax import storage
from mta_jax.config import TrainConfig
from mta_jax.data.rows import ROW_KEYS
from mta_jax.model import TransformerLM
from mta_jax.train_state import TrainState


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphDefs:
  """The static structure `nnx.merge` needs to rebuild the model and the optimizer."""
  model: Any
  optimizer: Any


def _build(cfg: TrainConfig, seed) -> tuple[GraphDefs, TrainState]:
  model = TransformerLM(cfg.model, rngs=nnx.Rngs(jax.random.key(seed)))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg), wrt=nnx.Param)
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError("TransformerLM holds non-Param state; TrainState only carries nnx.Param.")
  opt_def, opt_state = nnx.split(optimizer)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  return GraphDefs(model_def, opt_def), state


def abstract_defs_and_state(cfg: TrainConfig) -> tuple[GraphDefs, TrainState]:
  """The graph definitions and the TrainState as ShapeDtypeStructs (nothing allocated)."""
  box = {}

  def init(seed):
    box["defs"], state = _build(cfg, seed)
    return state

  abstract = jax.eval_shape(init, 0)
  return box["defs"], abstract


def train_state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
  """NamedShardings for a TrainState (a prefix tree: one sharding per nnx Variable)."""
  return TrainState(step=sharding.replicated(mesh),
                    params=sharding.state_shardings(abstract.params, mesh),
                    opt_state=sharding.state_shardings(abstract.opt_state, mesh))


def with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
  """`abstract` with each leaf's NamedSharding from `shardings` (a prefix tree of it)."""
  return jax.tree.map(
      lambda sh, sub: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub),
      shardings, abstract)


def abstract_train_state(cfg: TrainConfig, mesh: Mesh | None = None) -> TrainState:
  """The TrainState as ShapeDtypeStructs (with their NamedShardings when `mesh` is given).

  Nothing is allocated; this is what a checkpoint restores into.
  """
  _, abstract = abstract_defs_and_state(cfg)
  if mesh is None:
    return abstract
  return with_shardings(abstract, train_state_shardings(abstract, mesh))


def create_state(cfg: TrainConfig, shardings: TrainState) -> TrainState:
  """The initial state (from cfg.seed), made by a jitted init whose outputs are already sharded,
  so no parameter is ever materialised whole on one device. Call under `jax.set_mesh`."""
  return jax.jit(lambda seed: _build(cfg, seed)[1], out_shardings=shardings)(cfg.seed)


def init_train_state(cfg: TrainConfig, mesh: Mesh) -> tuple[GraphDefs, TrainState, TrainState]:
  """(graphdefs, state, shardings) on `mesh` (see `create_state`)."""
  defs, abstract = abstract_defs_and_state(cfg)
  shardings = train_state_shardings(abstract, mesh)
  with jax.set_mesh(mesh):
    state = create_state(cfg, shardings)
  return defs, state, shardings


# ---------------------------------------------------------------------------------------------
# Loss and steps
# ---------------------------------------------------------------------------------------------


def loss_sums(model: TransformerLM, batch: dict, z_loss: float = 0.0,
              dropout_rng=None) -> tuple[jax.Array, dict]:
  """(objective, sums) for one [b, T] batch; everything is a SUM over the batch.

  sums: loss (masked cross entropy), z (masked log Z^2), weight (sum of loss_mask), correct
  (masked argmax hits), seq_wrong (rows with any wrong masked argmax: the toy task's error),
  seqs (rows with any masked position).
  """
  logits = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                 dropout_rng=dropout_rng)
  targets = batch["targets"]
  w = batch["loss_mask"].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  pred = jnp.argmax(logits, axis=-1)
  hit = (pred == targets)
  on = w > 0
  sums = {
      "loss": jnp.sum(nll * w),
      "z": jnp.sum(jnp.square(log_z) * w),
      "weight": jnp.sum(w),
      "correct": jnp.sum(hit * w),
      "seq_wrong": jnp.sum(jnp.any(on & ~hit, axis=1)).astype(jnp.float32),
      "seqs": jnp.sum(jnp.any(on, axis=1)).astype(jnp.float32),
  }
  objective = sums["loss"] + z_loss * sums["z"]
  return objective, sums


def make_train_step(cfg: TrainConfig, defs: GraphDefs) -> Callable:
  """The pure step(state, batch) -> (state, metrics). batch arrays are [accum, rows, T]."""
  z_loss = cfg.optim.z_loss
  use_dropout = cfg.model.attention.dropout > 0
  lr_fn = optim.schedule(cfg.optim, cfg.steps)
  base_key = jax.random.key(cfg.seed + 1)

  def objective(params, micro, rng):
    model = nnx.merge(defs.model, params)
    return loss_sums(model, micro, z_loss, rng)

  grad_fn = jax.grad(objective, has_aux=True)

  def step(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(base_key, state.step) if use_dropout else None
    n_micro = batch["inputs"].shape[0]

    def micro_grads(i, micro):
      rng = None if step_key is None else jax.random.fold_in(step_key, i)
      return grad_fn(state.params, micro, rng)

    if n_micro == 1:
      grads, sums = micro_grads(0, jax.tree.map(lambda x: x[0], batch))
    else:
      def body(carry, xs):
        i, micro = xs
        g, s = micro_grads(i, micro)
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.eval_shape(micro_grads, 0, jax.tree.map(lambda x: x[0], batch))
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(n_micro), batch))

    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    model = nnx.merge(defs.model, state.params)
    optimizer = nnx.merge(defs.optimizer, state.opt_state)
    optimizer.update(model, grads)
    new_state = TrainState(step=state.step + 1, params=nnx.state(model, nnx.Param),
                           opt_state=nnx.state(optimizer))
    metrics = {
        "loss": sums["loss"] / weight,
        "z_loss": sums["z"] / weight,
        "token_acc": sums["correct"] / weight,
        "seq_error": sums["seq_wrong"] / jnp.maximum(sums["seqs"], 1.0),
        "grad_norm": grad_norm,
        "lr": lr_fn(state.step),
        "loss_tokens": sums["weight"],
    }
    return new_state, metrics

  return step


def make_eval_step(cfg: TrainConfig, defs: GraphDefs) -> Callable:
  """The pure eval_step(params, batch) -> sums (see `loss_sums`), batch arrays [rows, T]."""

  def step(params, batch):
    model = nnx.merge(defs.model, params)
    return loss_sums(model, batch, cfg.optim.z_loss)[1]

  return step


def batch_shardings(mesh: Mesh, accum: bool) -> NamedSharding:
  """Rows over every data-parallel axis; a leading micro-batch axis (accum=True) is not split."""
  spec = sharding.logical_to_spec(("act_batch", "act_length"), None, mesh)
  return NamedSharding(mesh, P(None, *spec) if accum else spec)


def jit_train_step(cfg: TrainConfig, defs: GraphDefs, shardings: TrainState, mesh: Mesh):
  return jax.jit(make_train_step(cfg, defs),
                 in_shardings=(shardings, batch_shardings(mesh, accum=True)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def jit_eval_step(cfg: TrainConfig, defs: GraphDefs, shardings: TrainState, mesh: Mesh):
  return jax.jit(make_eval_step(cfg, defs),
                 in_shardings=(shardings.params, batch_shardings(mesh, accum=False)),
                 out_shardings=sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Host side: batches, evaluation, the loop
# ---------------------------------------------------------------------------------------------


def to_global(local: dict, sharding_: NamedSharding) -> dict:
  """Per-process numpy rows -> global jax.Arrays (rows concatenated over processes)."""
  out = {}
  for k in ROW_KEYS:
    x = np.asarray(local[k])
    out[k] = jax.make_array_from_process_local_data(sharding_, x)
  return out


def next_train_batch(it: Iterator, accum: int, sharding_: NamedSharding) -> dict:
  """`accum` batches from the iterator stacked to [accum, rows, T], as global arrays."""
  micro = [next(it) for _ in range(accum)]
  local = {k: np.stack([np.asarray(m[k]) for m in micro]) for k in ROW_KEYS}
  return to_global(local, sharding_)


def evaluate(cfg: TrainConfig, eval_step: Callable, params, mesh: Mesh) -> dict:
  """Loss, token accuracy and sequence error over the eval split (or cfg.eval_steps batches)."""
  totals: dict[str, float] = {}
  batch_sh = batch_shardings(mesh, accum=False)
  for i, local in enumerate(data_lib.make_eval_batches(cfg)):
    if cfg.eval_steps and i >= cfg.eval_steps:
      break
    sums = jax.device_get(eval_step(params, to_global(local, batch_sh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals:
    return {}
  weight = max(totals["weight"], 1.0)
  return {"loss": totals["loss"] / weight, "token_acc": totals["correct"] / weight,
          "seq_error": totals["seq_wrong"] / max(totals["seqs"], 1.0), "seqs": totals["seqs"]}


def eval_summary(cfg: TrainConfig, r: dict) -> str:
  """`loss 0.1234 | token acc 97.50% | sequence error 2.10% (1000 seqs)` (toy task) or
  `loss 3.2100 | ppl 24.78 | token acc 41.20%` (language modelling)."""
  if cfg.data.source == "toy":
    return (f"loss {r['loss']:.4f} | token acc {100 * r['token_acc']:.2f}% | sequence error "
            f"{100 * r['seq_error']:.2f}% ({int(r['seqs'])} seqs)")
  return (f"loss {r['loss']:.4f} | ppl {math.exp(min(r['loss'], 50.0)):.2f} | token acc "
          f"{100 * r['token_acc']:.2f}%")


def write_config(cfg: TrainConfig, workdir: str) -> str:
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    target = storage.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(config_lib.to_dict(cfg), indent=2, sort_keys=True))
  return path


def setup(cfg: TrainConfig) -> Mesh:
  """Validates the config against the devices and processes, then builds the mesh."""
  config_lib.validate(cfg, jax.device_count(), jax.process_count())
  data_lib.validate_data(cfg)
  return sharding.make_mesh(**dataclasses.asdict(cfg.mesh))


def _check_finite(step: int, m: dict, cfg: TrainConfig) -> None:
  """NonFiniteLossError unless the step's loss and gradient norm are finite (a NaN gradient
  makes the new parameters NaN, so nothing after this step may be saved)."""
  bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(float(m[k]))]
  if bad:
    raise NonFiniteLossError(
        f"training {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
        f"{', '.join(str(float(m[k])) for k in bad)} at step {step}; halting without saving "
        f"this step. Try a lower optim.lr (now {cfg.optim.lr}), a longer optim.warmup_steps, "
        "optim.clip_norm > 0, model.dtype=float32, or optim.z_loss=1e-4.")


@jax.jit
def _all_finite(params) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _check_params_finite(step: int, state: TrainState, cfg: TrainConfig) -> None:
  """Called before every save: a checkpoint never holds NaN / inf parameters."""
  if not bool(_all_finite(state.params)):
    raise NonFiniteLossError(
        f"the parameters hold NaN or inf after step {step}; halting without saving them (the "
        f"previous checkpoint is kept). Try a lower optim.lr (now {cfg.optim.lr}) or "
        "optim.clip_norm > 0.")


@dataclasses.dataclass
class _Run:
  """What the training loop carries between its parts."""
  cfg: TrainConfig
  workdir: str
  mesh: Mesh
  writer: metrics_lib.MetricsWriter
  ckpt: checkpoint.Checkpointer
  lease: Any
  data_iter: Any
  defs: GraphDefs = None
  state: TrainState = None
  start: int = 0
  fresh: bool = True
  meta: dict = dataclasses.field(default_factory=dict)
  final_eval: dict = dataclasses.field(default_factory=dict)
  final_eval_step: int = -1
  step: int = 0


def _restore_or_init(run: _Run, abstract: TrainState, shardings: TrainState) -> None:
  cfg = run.cfg
  restored = run.ckpt.restore_latest(with_shardings(abstract, shardings), run.data_iter)
  if restored is None:
    run.state = create_state(cfg, shardings)
    run.start, run.fresh = 0, True
    if cfg.checkpoint.init_from:  # warm start / MTA retrofit (paper App. I)
      run.state = run.state.replace(params=retrofit.retrofit(
          cfg.checkpoint.init_from, cfg, run.state.params, shardings.params))
  else:
    run.state, run.start, meta = restored
    run.meta, run.fresh = dict(meta or {}), False
  run.step = run.start


def _log_start(run: _Run) -> None:
  w, cfg = run.writer, run.cfg
  w.log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, processes: "
        f"{jax.process_count()}, mesh: {dict(run.mesh.shape)}")
  from mta_jax.model import count_params
  w.log(f"model: {count_params(cfg.model):,} parameters")
  if not run.fresh:
    w.log(f"resumed from step {run.start} in {run.workdir}")
  elif cfg.checkpoint.init_from:
    w.log(f"initialised parameters from {cfg.checkpoint.init_from}")


def _save(run: _Run, force: bool) -> bool:
  """A periodic (force=False) or final save, after checking the parameters are finite."""
  if not force and not run.ckpt.wants_save(run.step):
    return False
  _check_params_finite(run.step, run.state, run.cfg)
  return run.ckpt.save(run.step, run.state, run.data_iter, run.meta)


def _train_loop(run: _Run, compiled, batch, eval_step, profiler: profiling.StepProfiler) -> None:
  cfg, writer = run.cfg, run.writer
  accum = cfg.optim.grad_accum
  batch_sh = batch_shardings(run.mesh, accum=True)
  n_dev = jax.device_count()
  step_flops = flops_lib.train_flops_per_step(cfg)
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.peak_tflops)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * accum
  tokens_seen = int(run.meta.get("tokens_seen", run.start * tokens_per_step))
  window: dict[str, float] = {}
  window_steps, window_t0, run_t0, run_steps = 0, time.time(), time.time(), 0
  while run.step < cfg.steps:
    if run.lease is not None:
      run.lease.check()
    run.ckpt.check_for_errors()  # a failed background save stops the run now
    profiler.before(run.step + 1)
    run.state, m = compiled(run.state, batch)
    m = jax.device_get(m)  # waits for this step: the loss is checked before anything else
    run.step += 1
    step = run.step
    profiler.after(step, run.state)
    run_steps += 1
    window_steps += 1
    tokens_seen += tokens_per_step
    _check_finite(step, m, cfg)
    for k, v in m.items():
      window[k] = window.get(k, 0.0) + float(v)
    if step % cfg.log_every == 0 or step == cfg.steps:
      dt = time.time() - window_t0
      scalars = {k: v / window_steps for k, v in window.items() if k != "loss_tokens"}
      scalars["lr"] = float(m["lr"])
      scalars["tokens_per_s"] = tokens_per_step * window_steps / dt
      scalars["steps_per_s"] = window_steps / dt
      scalars["mfu"] = (step_flops * window_steps / dt / (n_dev * peak)) if peak else None
      scalars["tokens_seen"] = tokens_seen
      writer.write(step, "train", scalars)
      writer.progress(step, scalars, time.time() - run_t0, run_steps)
      window, window_steps, window_t0 = {}, 0, time.time()
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
      t_eval = time.time()
      _evaluate_now(run, eval_step)
      window_t0 += time.time() - t_eval  # tokens/s counts training time only
    run.meta = {"tokens_seen": tokens_seen}
    if step < cfg.steps:
      _save(run, force=False)
      if run.ckpt.should_stop(step):
        writer.log(f"stop requested: saving step {step} and exiting")
        _save(run, force=True)
        return
      batch = next_train_batch(run.data_iter, accum, batch_sh)
  if run.step > run.start or run.fresh:
    _save(run, force=True)
  else:  # the workdir already holds the finished run
    writer.log(f"{run.workdir} already holds step {run.start} >= steps={cfg.steps}; "
               "evaluating only")
    _evaluate_now(run, eval_step)


def _evaluate_now(run: _Run, eval_step) -> None:
  result = evaluate(run.cfg, eval_step, run.state.params, run.mesh)
  if result:
    run.final_eval, run.final_eval_step = result, run.step
    if run.step > run.start:
      run.writer.write(run.step, "eval", result)
    run.writer.log(f"eval @ step {run.step}: {eval_summary(run.cfg, result)}")


def _report_end(run: _Run) -> None:
  cfg, writer, r = run.cfg, run.writer, run.final_eval
  png = writer.plot()
  if png:
    writer.log(f"loss curve: {png}")
  for png in save_pictures(cfg, run.defs, run.state, run.workdir):
    writer.log(f"picture: {png}")
  if not r:
    return
  if run.final_eval_step != run.step:  # stopped early: the last eval is of an earlier step
    writer.log(f"last eval was at step {run.final_eval_step} (the run stopped at step "
               f"{run.step}): {eval_summary(cfg, r)}")
  elif cfg.data.source == "toy":
    writer.log(f"final sequence error rate: {100 * r['seq_error']:.2f}% "
               f"(loss {r['loss']:.4f}, {int(r['seqs'])} held-out sequences, step {run.step})")
  else:
    writer.log(f"final eval (step {run.step}): {eval_summary(cfg, r)}")


def train_and_evaluate(cfg: TrainConfig, workdir: str) -> dict:
  """Trains `cfg.steps` optimizer steps (resuming from `workdir` if it holds a checkpoint),
  evaluates every `eval_every` steps and at the end. Returns the final eval metrics.

  The workdir's lease (`mta_jax.lease`) is taken before anything is written: a second run on
  the same workdir raises `lease.WorkdirBusyError`. Any error ends the run quietly: in-flight
  saves are waited for, files closed, the lease released, and the error re-raised once.
  """
  from mta_jax import lease as lease_lib
  mesh = setup(cfg)
  lease = lease_lib.acquire_for_run(workdir, command=" ".join(sys.argv)[:300])
  writer = metrics_lib.MetricsWriter(workdir, cfg.steps, wandb_project=cfg.wandb_project,
                                     wandb_run=cfg.wandb_run, wandb_entity=cfg.wandb_entity,
                                     config=config_lib.to_dict(cfg))
  ckpt = None
  try:
    data_iter = data_lib.make_train_iterator(cfg)
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    run = _Run(cfg, workdir, mesh, writer, ckpt, lease, data_iter)
    _run_training(run)
    ckpt.close()
    _report_end(run)
    return run.final_eval
  except BaseException:
    _quiet_close(ckpt)
    raise
  finally:
    writer.close()
    if lease is not None:
      lease.release()


def _quiet_close(ckpt) -> None:
  """Close the checkpointer after an error without a second traceback (Orbax re-raises the
  failure of a background save here, and logs it: the caller reports the first error)."""
  if ckpt is None:
    return
  import logging
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    ckpt.close()
  except BaseException:  # noqa: BLE001 - the original error is the one to report
    pass
  finally:
    absl_logger.setLevel(level)


def _run_training(run: _Run) -> None:
  cfg = run.cfg
  run.defs, abstract = abstract_defs_and_state(cfg)
  shardings = train_state_shardings(abstract, run.mesh)
  with jax.set_mesh(run.mesh):
    _restore_or_init(run, abstract, shardings)
    # Written only now: a resume refused as incompatible must not overwrite the run's files.
    run.writer.open(run.start)
    _log_start(run)
    write_config(cfg, run.workdir)
    train_step = jit_train_step(cfg, run.defs, shardings, run.mesh)
    eval_step = jit_eval_step(cfg, run.defs, shardings, run.mesh)
    t0 = time.time()
    batch = next_train_batch(run.data_iter, cfg.optim.grad_accum,
                             batch_shardings(run.mesh, accum=True))
    compiled = train_step.lower(run.state, batch).compile()
    run.writer.log(f"train step compiled in {time.time() - t0:.1f}s")
    mem = metrics_lib.memory_summary(compiled)
    if mem:
      run.writer.log(mem)
    profiler = profiling.StepProfiler(cfg.profile_steps, cfg.steps, run.workdir, run.start,
                                      run.writer.log)
    try:
      _train_loop(run, compiled, batch, eval_step, profiler)
    finally:
      profiler.stop()


def save_pictures(cfg: TrainConfig, defs: GraphDefs, state: TrainState, workdir: str,
                  max_seq_len: int = 1024) -> list[str]:
  """PNGs of the learned key-query kernels and of every layer's attention on the first eval
  sequence. Single-process runs only (it gathers the parameters), and only for rows of at most
  `max_seq_len` tokens (the maps are [layers, heads, T, T])."""
  if jax.process_count() > 1 or jax.process_index() != 0:
    return []
  from mta_jax import viz
  from mta_jax.model import unrolled_model  # per-layer pictures need the unrolled layout
  model = unrolled_model(nnx.merge(defs.model, jax.device_get(state.params)))
  out = []
  kernels = viz.plot_kernels(model, os.path.join(workdir, "kernels.png"))
  if kernels:
    out.append(kernels)
  if cfg.data.seq_len <= max_seq_len:
    batch = next(iter(data_lib.make_eval_batches(cfg)), None)
    if batch is not None:
      n = int(np.sum(batch["segment_ids"][0] > 0)) or cfg.data.seq_len
      tokens = jnp.asarray(batch["inputs"][:1, :n])
      labels = None
      if cfg.data.source == "toy":
        from mta_jax.data import toy
        labels = [toy.decode([t]) or "_" for t in np.asarray(tokens[0])]
      maps = model.attention_maps(tokens, positions=jnp.asarray(batch["positions"][:1, :n]))
      out.append(viz.plot_attention_maps(maps, os.path.join(workdir, "attention.png"),
                                         labels=labels))
  return out


def evaluate_main(cfg: TrainConfig, workdir: str) -> dict:
  """Restores the latest checkpoint in `workdir` and evaluates it."""
  mesh = setup(cfg)
  defs, abstract = abstract_defs_and_state(cfg)
  shardings = train_state_shardings(abstract, mesh)
  ckpt = checkpoint.Checkpointer(workdir, cfg, read_only=True)
  with jax.set_mesh(mesh):
    restored = ckpt.restore_latest(with_shardings(abstract, shardings))
    if restored is None:
      ckpt.close()
      raise checkpoint.CheckpointError(
          f"no checkpoint in {workdir}; train first (--mode=train).")
    state, step, _ = restored
    result = evaluate(cfg, jit_eval_step(cfg, defs, shardings, mesh), state.params, mesh)
  ckpt.close()
  if jax.process_index() == 0:
    print(f"eval @ step {step}: {eval_summary(cfg, result)}")
    print(f"eval @ step {step}: " + ", ".join(f"{k} {v:.6f}" for k, v in result.items()))
  return result
