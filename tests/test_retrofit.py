"""Retrofit (paper App. I): an MTA model initialised from a baseline, MTA weights at identity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ckpt_util as cu
import train_cli
from mta_jax import checkpoint, export, retrofit, sharding, tree_io
from mta_jax.model import TransformerLM


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))


def _tokens():
  return jax.random.randint(jax.random.key(3), (4, 12), 0, 32)


def _baseline_run(tmp_path, mesh):
  cfg = cu.baseline_config()
  state, _ = cu.make_state(cfg, mesh, seed=5)
  state = cu.perturb(state, 0.01)  # "trained": not the fresh initialisation
  workdir = tmp_path / "baseline"
  with checkpoint.Checkpointer(workdir, cfg) as ck:
    ck.save(10, state)
  return cfg, workdir, state


def _retrofit_model(source, mta_cfg, mesh):
  abstract, shardings = cu.abstract_state(mta_cfg, mesh)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: TransformerLM(mta_cfg.model, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model, nnx.Param)
    params = retrofit.retrofit(str(source), mta_cfg, abstract["params"], shardings["params"])
  return nnx.merge(graphdef, params), params


def _baseline_model(cfg, state):
  model = nnx.eval_shape(lambda: TransformerLM(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(model, nnx.Param)
  return nnx.merge(graphdef, state["params"])


@pytest.mark.parametrize("from_export", [False, True])
def test_retrofit_first_step_loss_equals_baseline(tmp_path, from_export):
  mesh = sharding.make_mesh(2, 2, 2)
  cfg, workdir, state = _baseline_run(tmp_path, mesh)
  source = workdir
  if from_export:
    source = export.export_checkpoint(str(workdir), str(tmp_path / "exp"))
  mta_cfg = cu.tiny_config(group_norm=False)  # pre/post conv + pre/post head mixing
  model, params = _retrofit_model(source, mta_cfg, mesh)
  base = _baseline_model(cfg, state)
  tokens = _tokens()
  with jax.set_mesh(mesh):
    want, got = float(_loss(base, tokens)), float(_loss(model, tokens))
  # Identity kernels multiply by exactly 1 and add exact zeros: the loss is bitwise the same.
  assert got == want, (got, want)
  # Every baseline weight is carried over bitwise, every MTA weight is identity.
  flat = tree_io.flatten(params)
  for p, v in tree_io.flatten(state["params"]).items():
    np.testing.assert_array_equal(jax.device_get(flat[p]), jax.device_get(v))
  kq = jax.device_get(flat[("blocks", "1", "attn", "kq_pre")])
  assert kq.shape == (4, 2, 3) and kq.sum() == 4 and np.all(kq[:, 1, 1] == 1)
  mix = jax.device_get(flat[("blocks", "0", "attn", "mix_post")])
  np.testing.assert_array_equal(mix, np.eye(4)[None])
  assert flat[("blocks", "0", "attn", "wq")].sharding == jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(("embed", "heads", "head_dim"), (16, 4, 4), mesh))


def test_retrofit_with_gated_group_norm_starts_at_identity_gate(tmp_path):
  mesh = sharding.make_mesh(8, 1, 1)
  _, workdir, _ = _baseline_run(tmp_path, mesh)
  mta_cfg = cu.tiny_config()  # group norm + gate on: not loss-preserving, but identity-initialised
  _, params = _retrofit_model(workdir, mta_cfg, mesh)
  flat = tree_io.flatten(params)
  np.testing.assert_array_equal(jax.device_get(flat[("blocks", "0", "attn", "norm_scale")]),
                                np.ones(4))
  assert float(flat[("blocks", "1", "attn", "gate_b")]) == 0.0


def test_retrofit_refuses_a_different_base_model(tmp_path):
  mesh = sharding.make_mesh(8, 1, 1)
  _, workdir, _ = _baseline_run(tmp_path, mesh)
  mta_cfg = cu.tiny_config()
  mta_cfg.model.n_heads = 2
  abstract, shardings = cu.abstract_state(mta_cfg, mesh)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="model.n_heads: checkpoint 4"):
    retrofit.retrofit(str(workdir), mta_cfg, abstract["params"], shardings["params"])


def test_retrofit_refuses_to_drop_weights(tmp_path):
  """MTA -> baseline would silently drop the MTA weights: refused, naming them."""
  mesh = sharding.make_mesh(8, 1, 1)
  cfg = cu.tiny_config()
  state, _ = cu.make_state(cfg, mesh)
  with checkpoint.Checkpointer(tmp_path / "mta", cfg) as ck:
    ck.save(1, state)
  base = cu.baseline_config()
  abstract, shardings = cu.abstract_state(base, mesh)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"blocks.0.attn.gate_b: in checkpoint \(shape \(\)\) but not in the current model"):
    retrofit.retrofit(str(tmp_path / "mta" / "checkpoints" / "1"), base, abstract["params"],
                    shardings["params"])


def test_retrofit_bad_source_is_a_clear_error(tmp_path):
  cfg = cu.tiny_config()
  abstract, shardings = cu.abstract_state(cfg, sharding.make_mesh(8, 1, 1))
  with pytest.raises(export.ExportError, match="does not exist"):
    retrofit.retrofit(str(tmp_path / "missing"), cfg, abstract["params"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(export.ExportError, match="neither an export"):
    retrofit.retrofit(str(tmp_path / "empty"), cfg, abstract["params"])


@pytest.mark.slow  # two train.py runs; the in-process retrofit tests above cover the logic
def test_retrofit_through_train_py(tmp_path):
  """`--config.checkpoint.init_from=<baseline run>`: the MTA run's first training loss equals
  that of the baseline model continuing from the same weights on the same first batch."""
  common = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.n_heads=2",
            "--config.data.source=synthetic", "--config.data.seq_len=16",
            "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
            "--config.eval_every=0", "--config.eval_steps=1", "--config.log_every=1",
            "--config.optim.warmup_steps=1"]

  def run(workdir, variant, *extra):
    p = train_cli.run(f"--config={os.path.join(train_cli.ROOT, 'configs', 'toy.py')}:{variant}",
                      f"--workdir={workdir}", *common, *extra, devices=1, check=True)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"], p.stdout + p.stderr

  base = str(tmp_path / "baseline")
  fresh, _ = run(base, "baseline", "--config.steps=3")
  warm, _ = run(str(tmp_path / "warm"), "baseline", "--config.steps=1",
                f"--config.checkpoint.init_from={base}")
  mta, out = run(str(tmp_path / "mta"), "mta", "--config.steps=1",
                 "--config.model.attention.kq_layers=(1,)",
                 "--config.model.attention.post_conv=True",
                 "--config.model.attention.head_mix_pre=True",
                 "--config.model.attention.head_mix_post=True",
                 f"--config.checkpoint.init_from={base}")
  assert f"initialised parameters from {base}" in out
  assert warm[0] != fresh[0]  # the warm start really starts from the baseline's weights
  assert mta[0] == warm[0], (mta[0], warm[0])
