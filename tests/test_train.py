"""The functional train step: sharded == single device, accumulation == big batch, loss masking,
z-loss, schedules, weight-decay mask, mixed precision, NaN halting, eval metric."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import optim, sharding, train_lib
from mta_jax.config import OptimConfig

from train_util import B, VOCAB, random_batch, run_steps, tiny_config, toy_run_config


def test_sharded_2x2x2_matches_single_device():
  cfg = tiny_config()
  batches = [random_batch(i) for i in range(4)]
  single, s1 = run_steps(cfg, (1, 1, 1), batches)
  sharded, s8 = run_steps(cfg, (2, 2, 2), batches)
  for key in ("loss", "grad_norm", "token_acc"):
    np.testing.assert_allclose([m[key] for m in sharded], [m[key] for m in single], rtol=1e-5,
                               err_msg=key)
  assert single[-1]["loss"] < single[0]["loss"]  # it trained
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The 8-device state really is sharded: wq is split over fsdp (embed) and tensor (heads).
  wq = s8.params["blocks"][0]["attn"]["wq"][...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (16, 2, 8)


def test_grad_accumulation_equals_big_batch():
  big = random_batch(7, rows=2 * B)
  halves = {k: np.stack([v[0, :B], v[0, B:]]) for k, v in big.items()}  # [2, B, T]
  one, s_one = run_steps(tiny_config(), (1, 1, 1), [big])
  acc, s_acc = run_steps(tiny_config(grad_accum=2), (1, 1, 1), [halves])
  np.testing.assert_allclose(acc[0]["loss"], one[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc[0]["grad_norm"], one[0]["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_acc.params), jax.tree.leaves(s_one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _model(cfg):
  from mta_jax.model import TransformerLM
  return TransformerLM(cfg.model, rngs=nnx.Rngs(0))


def test_loss_covers_masked_positions_only_and_z_loss():
  cfg = tiny_config()
  model = _model(cfg)
  b = {k: jnp.asarray(v[0]) for k, v in random_batch(3).items()}
  obj, sums = train_lib.loss_sums(model, b)
  # Manual masked cross entropy.
  logits = model(b["inputs"], b["segment_ids"], b["positions"])
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(sums["loss"], jnp.sum(nll * b["loss_mask"]), rtol=1e-5)
  np.testing.assert_allclose(sums["weight"], b["loss_mask"].sum())
  # Targets where loss_mask == 0 do not matter.
  b2 = dict(b, targets=jnp.where(b["loss_mask"] > 0, b["targets"], 0))
  np.testing.assert_allclose(train_lib.loss_sums(model, b2)[1]["loss"], sums["loss"], rtol=1e-6)
  # z-loss adds z_loss * sum(mask * logZ^2) to the objective.
  obj_z, _ = train_lib.loss_sums(model, b, z_loss=1e-2)
  log_z = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(obj_z - obj, 1e-2 * jnp.sum(log_z**2 * b["loss_mask"]), rtol=1e-4)


def test_schedules():
  o = OptimConfig(lr=1.0, warmup_steps=10, schedule="linear")
  lin = optim.schedule(o, 110)
  np.testing.assert_allclose([lin(0), lin(5), lin(10), lin(60), lin(110), lin(200)],
                             [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
  cos = optim.schedule(dataclasses.replace(o, schedule="cosine", min_lr_ratio=0.1), 110)
  np.testing.assert_allclose([cos(10), cos(60), cos(110)], [1.0, 0.55, 0.1], atol=1e-6)
  const = optim.schedule(dataclasses.replace(o, schedule="constant"), 110)
  np.testing.assert_allclose([const(5), const(100)], [0.5, 1.0], atol=1e-6)


def test_weight_decay_skips_norms_and_clipping_bounds_update():
  cfg = tiny_config(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # decayed
  np.testing.assert_allclose(upd["scale"], 0.0)  # not decayed
  cfg_all = tiny_config(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
                        decay_mask="all")
  tx = optim.make_optimizer(cfg_all)
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["scale"], -0.05 * np.ones(2), rtol=1e-6)


def test_mixed_precision_keeps_fp32_params_and_moments():
  cfg = tiny_config()
  cfg.model.dtype = "bfloat16"
  ms, state = run_steps(cfg, (1, 1, 1), [random_batch(i) for i in range(3)])
  assert all(np.isfinite(m["loss"]) for m in ms)
  assert ms[-1]["loss"] < ms[0]["loss"] + 0.05
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  dtypes |= {x.dtype for x in jax.tree.leaves(state.opt_state["opt_state"])
             if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype("float32")}
  assert int(state.step) == 3


def test_nonfinite_loss_halts_with_step(monkeypatch, tmp_path):
  real = train_lib.make_train_step

  def poisoned(cfg, defs):
    step = real(cfg, defs)

    def wrapped(state, batch):
      new, m = step(state, batch)
      m["loss"] = jnp.where(state.step >= 2, jnp.nan, m["loss"])
      return new, m
    return wrapped

  monkeypatch.setattr(train_lib, "make_train_step", poisoned)
  cfg = toy_run_config(steps=6)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 3.*optim.lr"):
    train_lib.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_eval_step_matches_train_metrics_on_same_batch():
  cfg = tiny_config()
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  defs, state, shardings = train_lib.init_train_state(cfg, mesh)
  eval_step = train_lib.jit_eval_step(cfg, defs, shardings, mesh)
  b = {k: v[0] for k, v in random_batch(1).items()}
  with jax.set_mesh(mesh):
    sums = eval_step(state.params, b)
    _, m = train_lib.jit_train_step(cfg, defs, shardings, mesh)(
        state, {k: v[None] for k, v in b.items()})
  np.testing.assert_allclose(sums["loss"] / sums["weight"], m["loss"], rtol=1e-6)


def test_flops_count_attention_and_mta_terms():
  from mta_jax import flops
  cfg = tiny_config()  # D 32, 4 heads of 8, F 256, V 32, 2 layers; convs (2x3) on layer 1
  m, t = cfg.model, cfg.data.seq_len
  terms = flops.forward_flops_per_token(m, t)
  assert terms["dense"] == 2 * (2 * (4 * 32 * 4 * 8 + 3 * 32 * 256) + 32 * 32)
  assert terms["attention"] == 2 * 4 * t * 4 * 8
  assert terms["mta_conv"] == 2 * t * 4 * (2 * 3) * 2  # pre + post, one layer
  assert terms["head_mix"] == 2 * 2 * (2 * t * 4 * 2)  # 2 layers x (pre + post), c_h = 2
  assert flops.train_flops_per_step(cfg) == 3 * B * t * sum(terms.values())
  assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops.peak_flops_per_device("cpu") is None
  assert flops.peak_flops_per_device("cpu", override_tflops=1.5) == 1.5e12
