"""Small train states for the checkpoint tests (independent of the training loop)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tiny_mta
from mta_jax import config as config_lib
from mta_jax import sharding
from mta_jax.model import TransformerLM
from mta_jax.train_state import TrainState


def tiny_config(**attention) -> config_lib.TrainConfig:
  """tiny_mta.attention with one mixing group of all 4 heads (c_h=0), overridable."""
  cfg = config_lib.TrainConfig()
  cfg.model = config_lib.ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4,
                                     max_len=16, attention=tiny_mta.attention(**{"c_h": 0,
                                                                                 **attention}))
  cfg.checkpoint = config_lib.CheckpointConfig(every_steps=2, keep_last=2, keep_every=0,
                                               async_save=True)
  return cfg


def baseline_config() -> config_lib.TrainConfig:
  cfg = tiny_config()
  cfg.model.attention = config_lib.AttentionConfig()
  return cfg


def _build(model_cfg, seed):
  model = TransformerLM(model_cfg, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  return model, opt


def make_state(cfg: config_lib.TrainConfig, mesh, seed: int = 0):
  """(state, shardings): a TrainState sharded on `mesh` and its tree of shardings."""
  _, shardings = abstract_state(cfg, mesh)
  with jax.set_mesh(mesh):
    model, opt = _build(cfg.model, seed)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=nnx.state(model, nnx.Param),
                       opt_state=nnx.state(opt))
    state = jax.device_put(state, shardings)
  return state, shardings


def abstract_state(cfg: config_lib.TrainConfig, mesh):
  """(abstract, shardings): the TrainState as ShapeDtypeStructs carrying their shardings on
  `mesh` (what Checkpointer.restore_latest restores into), and the tree of shardings."""
  with jax.set_mesh(mesh):
    model, opt = nnx.eval_shape(lambda: _build(cfg.model, 0))
  params, opt_state = nnx.state(model, nnx.Param), nnx.state(opt)
  shardings = TrainState(step=sharding.replicated(mesh),
                         params=sharding.state_shardings(params, mesh),
                         opt_state=sharding.state_shardings(opt_state, mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state)
  abstract = jax.tree.map(lambda sh, sub: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub), shardings, abstract)
  return abstract, shardings


def perturb(state, scale: float = 1.0):
  """A state that differs from `state` in every leaf (stands in for training progress)."""
  return jax.tree.map(lambda x: x + jnp.asarray(scale, x.dtype), state)


def leaves(state):
  return [jax.device_get(x) for x in jax.tree.leaves(state)]


def with_checkpoint(cfg, **kw):
  cfg = dataclasses.replace(cfg)
  cfg.checkpoint = dataclasses.replace(cfg.checkpoint, **kw)
  return cfg
