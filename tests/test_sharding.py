"""Golden shardings of every parameter on a (data, fsdp, tensor) = (2, 2, 2) mesh, optimizer state
sharded like its parameters, state created sharded, batch and activation shardings.

If a golden spec changes on purpose (a new rule in sharding.LOGICAL_RULES, a new parameter),
update GOLDEN below in the same commit and say why in the message."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mta_jax import sharding, train_lib
from train_util import random_batch, tiny_config

# parameter path -> PartitionSpec on the (2, 2, 2) mesh for tests.test_train.tiny_config()
# (d_model 32, 4 heads of 8, SwiGLU hidden 256, vocab 32, head-mixing groups of 2, convs on layer 1).
_LAYER = {
    "attn.wq": P("fsdp", "tensor", None),     # [embed, heads, head_dim]
    "attn.wk": P("fsdp", "tensor", None),
    "attn.wv": P("fsdp", "tensor", None),
    "attn.wo": P("tensor", None, "fsdp"),     # [heads, head_dim, embed]
    "attn.mix_pre": P("tensor", None, None),  # [head_groups, c_h, c_h]: whole groups per shard
    "attn.mix_post": P("tensor", None, None),
    "attn.norm_scale": P(None),
    "attn.gate_w": P(None),
    "attn.gate_b": P(),
    "attn_norm.scale": P(None),
    "mlp.w1": P("fsdp", "tensor"),            # [embed, mlp]
    "mlp.w3": P("fsdp", "tensor"),
    "mlp.w2": P("tensor", "fsdp"),            # [mlp, embed]
    "mlp_norm.scale": P(None),
}
GOLDEN = {
    "embed.embedding": P("tensor", "fsdp"),   # [vocab, embed]
    "final_norm.scale": P(None),
    **{f"blocks.0.{k}": v for k, v in _LAYER.items()},
    **{f"blocks.1.{k}": v for k, v in _LAYER.items()},
    "blocks.1.attn.kq_pre": P("tensor", None, None),   # [heads, c_q, c_k]
    "blocks.1.attn.kq_post": P("tensor", None, None),
}


def _name(path) -> str:
  keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
  return ".".join(str(k) for k in keys if k is not None and k != "value")


def _specs(tree) -> dict:
  return {_name(p): leaf.sharding.spec for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(2, 2, 2)


def test_golden_parameter_shardings(mesh):
  abstract = train_lib.abstract_train_state(tiny_config(), mesh)
  assert _specs(abstract.params) == GOLDEN


def test_optimizer_moments_sharded_like_params(mesh):
  abstract = train_lib.abstract_train_state(tiny_config(), mesh)
  opt = _specs(abstract.opt_state)
  for moment in ("mu", "nu"):
    got = {k.split(f".{moment}.", 1)[1]: v for k, v in opt.items() if f".{moment}." in k}
    assert got == GOLDEN, moment
  # Scalars (Adam's count, the optimizer step) are replicated.
  assert all(v == P() for k, v in opt.items() if ".mu." not in k and ".nu." not in k)
  assert abstract.step.sharding.spec == P()


def test_state_is_created_sharded(mesh):
  _, state, shardings = train_lib.init_train_state(tiny_config(), mesh)
  assert _specs(state.params) == GOLDEN
  w1 = state.params["blocks"][0]["mlp"]["w1"][...]
  assert {s.data.shape for s in w1.addressable_shards} == {(16, 128)}  # 32/fsdp x 256/tensor
  moments = {k: v for k, v in _specs(state.opt_state).items() if ".mu." in k or ".nu." in k}
  assert len(moments) == 2 * len(GOLDEN)
  assert all(v == GOLDEN[k.split(".mu.", 1)[-1].split(".nu.", 1)[-1]] for k, v in moments.items())
  del shardings


def test_batch_and_accumulation_shardings(mesh):
  assert train_lib.batch_shardings(mesh, accum=False).spec == P(("data", "fsdp"), None)
  assert train_lib.batch_shardings(mesh, accum=True).spec == P(None, ("data", "fsdp"), None)


def test_activations_constrained_at_block_boundaries(mesh):
  cfg = tiny_config()
  defs, state, shardings = train_lib.init_train_state(cfg, mesh)
  step = train_lib.jit_train_step(cfg, defs, shardings, mesh)
  b = {k: jax.device_put(v, train_lib.batch_shardings(mesh, True))
       for k, v in random_batch(0).items()}
  with jax.set_mesh(mesh):
    text = step.lower(state, b).as_text()
  n = text.count("sharding_constraint")
  # embeddings + every block output + every attention output + q/k/v + logits, fwd and bwd
  assert n >= 2 * cfg.model.n_layers, n


def test_make_mesh_fill_and_mismatch():
  m = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=3, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="-1"):
    sharding.make_mesh(data=-1, fsdp=-1, tensor=1)


def test_odd_vocab_is_replicated_not_rejected(mesh):
  # 29 rows cannot split over tensor=2: that dimension falls back to replication.
  spec = sharding.logical_to_spec(("vocab", "embed"), (29, 32), mesh)
  assert spec == P(None, "fsdp")
  assert np.prod([mesh.shape[a] for a in ("fsdp",)]) == 2
