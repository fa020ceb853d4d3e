"""Shared helpers of the training tests: a tiny config using every MTA part, random packed
batches, a few-step runner on any mesh, and a seconds-long toy-task config."""

import jax
import numpy as np

import tiny_mta
from mta_jax import sharding, train_lib
from mta_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, ToyConfig, TrainConfig

VOCAB, T, B = 32, 16, 8


def tiny_config(**optim_kw) -> TrainConfig:
  """A 2-layer MTA model using every MTA part: pre/post convs (layer 1), head mixing in groups
  of 2 of 4 heads (2 groups: splits evenly over tensor=2), gated group norm."""
  attention = tiny_mta.attention(init="const", init_const=0.2)
  model = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=T,
                      attention=attention)
  o = dict(lr=3e-3, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)
  o.update(optim_kw)
  return TrainConfig(model=model, data=DataConfig(source="toy", seq_len=T, batch_size=B),
                     optim=OptimConfig(**o), steps=10, seed=0)


def random_batch(seed: int, rows: int = B, accum: int = 1) -> dict:
  """[accum, rows, T] batch: two packed documents per row, loss on ~70% of positions."""
  r = np.random.RandomState(seed)
  tok = r.randint(1, VOCAB, (accum, rows, T + 1)).astype(np.int32)
  cut = T // 2 + 1
  seg = np.where(np.arange(T) < cut, 1, 2).astype(np.int32)
  pos = np.where(np.arange(T) < cut, np.arange(T), np.arange(T) - cut).astype(np.int32)
  return {"inputs": tok[..., :-1], "targets": tok[..., 1:],
          "segment_ids": np.broadcast_to(seg, (accum, rows, T)).copy(),
          "positions": np.broadcast_to(pos, (accum, rows, T)).copy(),
          "loss_mask": (r.rand(accum, rows, T) > 0.3).astype(np.float32)}


def run_steps(cfg: TrainConfig, mesh_shape, batches) -> tuple[list[dict], train_lib.TrainState]:
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
  defs, state, shardings = train_lib.init_train_state(cfg, mesh)
  step = train_lib.jit_train_step(cfg, defs, shardings, mesh)
  batch_sh = train_lib.batch_shardings(mesh, accum=True)
  out = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, m = step(state, {k: jax.device_put(v, batch_sh) for k, v in b.items()})
      out.append(jax.device_get(m))
  return out, state


def toy_run_config(steps: int) -> TrainConfig:
  """A seconds-long toy-task run: 3 blocks of 3 letters, 2-layer MTA model."""
  from configs import toy
  cfg = toy.get_config("mta_n3_all")
  cfg.data.toy = ToyConfig(block_len=3, n_query=2, n_blocks=3, variant="all", n_train=512,
                           n_test=24)
  cfg.data.seq_len = toy.sample_length(3, 2, 3, "all")
  cfg.model.max_len = cfg.data.seq_len
  cfg.model.d_model, cfg.model.n_layers = 32, 2
  cfg.data.batch_size, cfg.data.eval_batch_size = 16, 16
  cfg.steps, cfg.log_every, cfg.eval_every = steps, 2, 0
  cfg.optim.warmup_steps = 1
  cfg.mesh = MeshConfig(data=-1, fsdp=1, tensor=1)  # all 8 test devices
  return cfg
