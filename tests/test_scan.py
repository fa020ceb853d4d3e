"""Scanned layers (model.scan_layers) against the unrolled model; remat policies; the embedding
lookup under tensor parallelism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import model as model_lib
from mta_jax import sharding
from mta_jax.config import REMAT, AttentionConfig, ConfigError, ModelConfig, attention_family
from mta_jax.model import TransformerLM, scan_plan, to_scanned_params, to_unrolled_params

VOCAB = 61

# Key-query layers 2 and 4 of 6 -> period 2: layer 0 unrolled before, layers 1-4 scanned
# (2 repeats of 2 layers), layer 5 unrolled after: every part of the scanned layout is used.
MTA = AttentionConfig(pre_conv=True, post_conv=True, c_q=3, c_k=5, post_c_q=2, post_c_k=3,
                      kq_layers=(2, 4), head_mix_pre=True, head_mix_post=True, c_h=2,
                      group_norm=True, dropout=0.2, implementation="xla")


def _cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=16, n_layers=6, n_heads=4, max_len=32, attention=MTA)
  base.update(kw)
  return ModelConfig(**base)


def _random_params(model, seed=1):
  """Every parameter random (MTA kernels away from identity): no equality by accident."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
  nnx.update(model, state)
  return model


def _tokens(b=2, t=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


@pytest.mark.parametrize("n_layers,kw,plan", [
    (24, dict(attention=attention_family("mta")), (0, 4, 6)),       # paper: kq on 2, 6, ..., 22
    (11, dict(attention=attention_family("mta")), (0, 4, 2)),       # layers 8-10 unrolled
    (5, dict(attention=attention_family("baseline")), (0, 1, 5)),   # no convs: period 1
    (6, dict(attention=MTA), (1, 2, 2)),
])
def test_scan_plan(n_layers, kw, plan):
  p = scan_plan(_cfg(n_layers=n_layers, **kw))
  assert (p.start, p.period, p.repeats) == plan
  kq = set(_cfg(n_layers=n_layers, **kw).kq_layer_indices())
  for layer in range(p.start, p.stop):  # every scanned layer matches its period's first copy
    assert (layer in kq) == (p.start + (layer - p.start) % p.period in kq)


def test_scanned_equals_unrolled_loss_grads_and_dropout():
  cfg = _cfg()
  scfg = dataclasses.replace(cfg, scan_layers=True)
  unrolled = _random_params(TransformerLM(cfg, rngs=nnx.Rngs(0)))
  scanned = TransformerLM(scfg, rngs=nnx.Rngs(5))
  nnx.update(scanned, to_scanned_params(nnx.state(unrolled, nnx.Param), scfg))
  assert len(scanned.head_blocks) == 1 and len(scanned.tail_blocks) == 1
  tokens, rng = _tokens(), jax.random.key(3)

  def loss(m, dropout_rng):
    logits = m(tokens, dropout_rng=dropout_rng)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, 1)[..., None], -1)[..., 0])

  # With dropout on (each layer folds in its own index in both layouts): every path is used.
  loss_and_grad = nnx.jit(nnx.value_and_grad(loss))
  lu, gu = loss_and_grad(unrolled, rng)
  ls, gs = loss_and_grad(scanned, rng)
  np.testing.assert_allclose(float(ls), float(lu), rtol=1e-6)
  gs_unrolled = to_unrolled_params(nnx.state(gs, nnx.Param), scfg)
  for a, b in zip(jax.tree.leaves(gs_unrolled), jax.tree.leaves(nnx.state(gu, nnx.Param))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_layout_conversion_round_trip_and_attention_maps():
  cfg = _cfg()
  scfg = dataclasses.replace(cfg, scan_layers=True)
  unrolled = _random_params(TransformerLM(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(unrolled, nnx.Param)
  scanned_params = to_scanned_params(params, scfg)
  wq = nnx.to_pure_dict(scanned_params)["scan_blocks"]["blocks"][1]["attn"]["wq"]
  assert wq.shape == (2, 16, 4, 4)  # [repeats, d, heads, head_dim]: layers 2 and 4
  np.testing.assert_array_equal(wq[1], unrolled.blocks[4].attn.wq[...])
  back = to_unrolled_params(scanned_params, scfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  scanned = TransformerLM(scfg, rngs=nnx.Rngs(0))
  nnx.update(scanned, scanned_params)
  tokens = _tokens(1, 12)
  maps = nnx.jit(lambda m: m.attention_maps(tokens))
  for a, b in zip(maps(scanned), maps(unrolled)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_scanned_parameters_are_sharded_with_a_layers_axis():
  scfg = _cfg(scan_layers=True)
  state = nnx.state(model_lib.abstract_model(scfg), nnx.Param)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  specs = nnx.to_pure_dict(sharding.state_specs(state, mesh))
  assert specs["scan_blocks"]["blocks"][0]["attn"]["wq"] == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  assert specs["head_blocks"][0]["attn"]["wq"] == jax.sharding.PartitionSpec(
      "fsdp", "tensor", None)


def test_scan_rejects_depth_scaling():
  a = dataclasses.replace(attention_family("mta"), norm_scaling="depth")
  with pytest.raises(ConfigError, match="norm_scaling='depth'"):
    TransformerLM(_cfg(attention=a, scan_layers=True), rngs=nnx.Rngs(0))


@pytest.mark.slow  # five compiles (~40 s); `full` remat is also covered by test_model
def test_remat_policies_give_the_same_gradients():
  tokens = _tokens()
  grads = {}
  grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))
  for policy in REMAT:
    cfg = _cfg(n_layers=3, remat=policy, scan_layers=True,
               attention=dataclasses.replace(MTA, kq_layers=(1,)))
    m = _random_params(TransformerLM(cfg, rngs=nnx.Rngs(0)))
    grads[policy] = grad(m)
  for policy, g in grads.items():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["none"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                 err_msg=policy)


def test_remat_bool_gets_a_migration_message():
  with pytest.raises(ConfigError, match="use 'full' for True"):
    TransformerLM(_cfg(remat=True), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="model.remat='some'"):
    TransformerLM(_cfg(remat="some"), rngs=nnx.Rngs(0))


def test_checkpoint_does_not_restore_across_layouts(tmp_path):
  from mta_jax import checkpoint
  import ckpt_util as cu
  cfg = cu.tiny_config()
  mesh = sharding.make_mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    ck.save(1, state)
  scanned = cu.tiny_config()
  scanned.model.scan_layers = True
  abstract, _ = cu.abstract_state(scanned, mesh)
  with checkpoint.Checkpointer(tmp_path, scanned) as ck:
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"(?s)model.scan_layers: checkpoint False, current True.*"
                             r"do not convert between the scanned and unrolled"):
      ck.restore_latest(abstract)
