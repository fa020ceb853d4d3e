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
  """(state, shardings) with state = {'params', 'opt_state', 'step'} sharded on `mesh`."""
  abstract, shardings = abstract_state(cfg, mesh)
  with jax.set_mesh(mesh):
    model, opt = _build(cfg.model, seed)
    state = {"params": nnx.state(model, nnx.Param), "opt_state": nnx.state(opt),
             "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, shardings)
  return state, shardings


def abstract_state(cfg: config_lib.TrainConfig, mesh):
  with jax.set_mesh(mesh):
    model, opt = nnx.eval_shape(lambda: _build(cfg.model, 0))
  abstract = {"params": nnx.state(model, nnx.Param), "opt_state": nnx.state(opt),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  shardings = {"params": sharding.state_shardings(abstract["params"], mesh),
               "opt_state": sharding.state_shardings(abstract["opt_state"], mesh),
               "step": sharding.replicated(mesh)}
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
