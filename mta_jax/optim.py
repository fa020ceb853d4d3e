"""The optimizer: optax AdamW with the paper's schedule, weight decay mask and gradient clipping.

    lr(step) = lr * step / warmup                                  step < warmup
             = lr * (min + (1 - min) * decay(progress))            afterwards
    decay    = 1 - progress (linear, the paper) | (1 + cos(pi * progress)) / 2 (cosine) | 1

where progress = (step - warmup) / (total - warmup), total = optim.decay_steps or cfg.steps and
min = optim.min_lr_ratio. Paper (Table 7; docs/MTA.md Sec. 10): lr 1.5e-4, betas (0.9, 0.98),
wd 0.05, clip 1.0, warmup 375 then linear decay to 0.

Gradient accumulation and the loss live in `train_lib` (the accumulated gradient is exactly the
big-batch gradient); this module only turns a gradient into an update.
"""

import jax
import jax.numpy as jnp
import optax

from mta_jax.config import OptimConfig, TrainConfig


def schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based)."""
  warmup = o.warmup_steps
  decay_len = max((o.decay_steps or total_steps) - warmup, 1)
  if o.schedule == "constant":
    after = optax.constant_schedule(o.lr)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.lr, o.lr * o.min_lr_ratio, decay_len)
  else:  # cosine
    after = optax.cosine_decay_schedule(o.lr, decay_len, alpha=o.min_lr_ratio)
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)), after],
                              [warmup])


def decay_mask(o: OptimConfig):
  """Which parameters get weight decay: matrices (ndim >= 2: projections, embeddings, MTA
  kernels and mixing matrices) and not the norm scales / gates, or all of them."""
  if o.decay_mask == "all":
    return None
  return lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (if clip_norm > 0) -> AdamW(schedule, decoupled weight decay)."""
  o = cfg.optim
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(schedule(o, cfg.steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask(o)))
  return optax.chain(*parts)
