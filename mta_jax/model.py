"""The Llama-style Transformer LM whose attention layers may be MTA layers.

    h = Embed(tokens)
    for each layer l:  h = h + Attention_l(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = RMSNorm(h) @ Embed^T                              (tied embeddings)

Which layers get key-query convolutions is `ModelConfig.kq_layer_indices()`; head mixing and the
gated group norm, when on, are on every layer (docs/MTA.md Sec. 8).

Layer layouts (`ModelConfig.scan_layers`):
  unrolled  blocks[l] for l in 0..L-1: one compiled copy per layer (compile time grows with L).
  scanned   the layers repeat with a period P (key-query convs every 4th layer -> P = 4), so
            layers [s, s + R*P) are R repeats of one P-layer `Period` whose parameters are stacked
            on a leading "layers" axis and run by `nnx.scan` (compiled once); the layers before
            (head_blocks) and after (tail_blocks) are unrolled. `scan_plan` picks s, P, R;
            `to_scanned_params` / `to_unrolled_params` convert parameters between the layouts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mta_jax.attention import Attention
from mta_jax.config import ModelConfig, validate_model
from mta_jax.layers import Embed, RMSNorm, SwiGLU
from mta_jax.sharding import constrain

Array = jax.Array

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    self.mlp = SwiGLU(cfg.d_model, cfg.resolved_ffn_hidden, rngs=rngs, param_dtype=pdt)

  def __call__(self, x, positions, segment_ids, dropout_rng):
    # The names are what model.remat="save_out_proj" keeps for the backward pass.
    x = x + checkpoint_name(self.attn(self.attn_norm(x), positions, segment_ids, dropout_rng),
                            "attn_out")
    x = x + checkpoint_name(self.mlp(self.mlp_norm(x)), "mlp_out")
    return constrain(x, _ACT)


def _block_apply(block: Block, x, positions, segment_ids, dropout_rng):
  return block(x, positions, segment_ids, dropout_rng)


_POLICIES = jax.checkpoint_policies
# model.remat -> how a block is applied (see config.REMAT for what each keeps).
_BLOCK_APPLY = {
    "none": _block_apply,
    "full": nnx.remat(_block_apply),
    "dots": nnx.remat(_block_apply, policy=_POLICIES.dots_with_no_batch_dims_saveable),
    "save_out_proj": nnx.remat(_block_apply, policy=_POLICIES.save_only_these_names(
        "attn_out", "mlp_out")),
    "offload_dots": nnx.remat(_block_apply, policy=_POLICIES.offload_dot_with_no_batch_dims(
        "device", "pinned_host")),
}


# ---------------------------------------------------------------------------------------------
# Scanned layers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  """Layers [start, start + repeats * period) are `repeats` copies of one `period`-layer group."""
  start: int
  period: int
  repeats: int
  n_layers: int

  @property
  def stop(self) -> int:
    return self.start + self.repeats * self.period

  def where(self, layer: int) -> tuple:
    """('head_blocks', l) | ('scan_blocks', 'blocks', j, r) | ('tail_blocks', k) for `layer`."""
    if layer < self.start:
      return ("head_blocks", layer)
    if layer < self.stop:
      r, j = divmod(layer - self.start, self.period)
      return ("scan_blocks", "blocks", j, r)
    return ("tail_blocks", layer - self.stop)


def scan_plan(cfg: ModelConfig) -> ScanPlan:
  """The longest run of layers that repeats with the key-query period.

  The period is kq_every (explicit kq_layers: the gcd of their spacings; no convs: 1). Every
  layer of a period must match the same layer of every other period, so only layers [s, s+R*P)
  whose key-query pattern is periodic are scanned; the rest are unrolled.
  """
  n = cfg.n_layers
  kq = set(cfg.kq_layer_indices())
  a = cfg.attention
  if not kq:
    period = 1
  elif a.kq_layers is None:
    period = a.kq_every
  else:
    layers = sorted(kq)
    period = math.gcd(*[b - a_ for a_, b in zip(layers, layers[1:])]) if len(layers) > 1 else n
  pattern = [i in kq for i in range(n)]
  best = ScanPlan(0, period, 0, n)
  for s in range(n):
    r = 0
    while s + (r + 1) * period <= n and all(
        pattern[s + r * period + j] == pattern[s + j] for j in range(period)):
      r += 1
    if r * period > best.repeats * best.period:
      best = ScanPlan(s, period, r, n)
  return best


class Period(nnx.Module):
  """`period` consecutive blocks; stacked `repeats` times by nnx.vmap in the scanned layout."""

  def __init__(self, cfg: ModelConfig, first_layer: int, period: int, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, first_layer + j, rngs=rngs) for j in range(period)])


def _stacked_periods(cfg: ModelConfig, plan: ScanPlan, rngs: nnx.Rngs) -> Period:
  @nnx.split_rngs(splits=plan.repeats)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=plan.repeats)
  def make(rngs):
    return Period(cfg, plan.start, plan.period, rngs=rngs)

  stacked = make(rngs)
  for _, var in nnx.iter_graph(stacked):  # the new leading axis: one slice per repeat
    if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
      var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata("logical_axes")))
  return stacked


class TransformerLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    validate_model(cfg)
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=pdt)
    if cfg.scan_layers:
      plan = scan_plan(cfg)
      self.head_blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(plan.start)])
      self.scan_blocks = _stacked_periods(cfg, plan, rngs) if plan.repeats else None
      self.tail_blocks = nnx.List([Block(cfg, i, rngs=rngs)
                                   for i in range(plan.stop, cfg.n_layers)])
    else:
      self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, param_dtype=pdt)

  def check_inputs(self, tokens_BxT, segment_ids, positions) -> Array:
    """Validates the call's arrays; returns positions (0..T-1 when None)."""
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens must be [batch, length]; got shape {tokens_BxT.shape}.")
    batch, length = tokens_BxT.shape
    if length > self.cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds model.max_len={self.cfg.max_len}.")
    for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
      if arr is not None and arr.shape != tokens_BxT.shape:
        raise ValueError(f"{name} must have the tokens' shape {tokens_BxT.shape}; "
                         f"got {arr.shape}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return positions

  def __call__(self, tokens_BxT: Array, segment_ids: Array | None = None,
               positions: Array | None = None, *, dropout_rng: Array | None = None) -> Array:
    """Float32 logits [B, T, V].

    Args:
      tokens_BxT: int token ids.
      segment_ids: [B, T] document ids of packed rows (None: one document per row). Attention,
        every MTA convolution and RoPE stay inside a document.
      positions: [B, T] per-document positions (None: 0..T-1).
      dropout_rng: a PRNG key enables attention dropout (training); None is deterministic.
    """
    positions = self.check_inputs(tokens_BxT, segment_ids, positions)
    dtype = jnp.dtype(self.cfg.dtype)
    x = constrain(self.embed(tokens_BxT, dtype), _ACT)
    apply = _BLOCK_APPLY[self.cfg.remat]
    layer_rng = lambda i: None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    if not self.cfg.scan_layers:
      for i, block in enumerate(self.blocks):
        x = apply(block, x, positions, segment_ids, layer_rng(i))
    else:
      plan = scan_plan(self.cfg)
      for i, block in enumerate(self.head_blocks):
        x = apply(block, x, positions, segment_ids, layer_rng(i))
      if plan.repeats:
        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
        def run(period: Period, x, first_layer):
          for j, block in enumerate(period.blocks):
            x = apply(block, x, positions, segment_ids, layer_rng(first_layer + j))
          return x
        x = run(self.scan_blocks, x, plan.start + plan.period * jnp.arange(plan.repeats))
      for k, block in enumerate(self.tail_blocks):
        x = apply(block, x, positions, segment_ids, layer_rng(plan.stop + k))
    x = self.final_norm(x)
    return constrain(self.embed.attend(x), ("act_batch", "act_length", "act_vocab"))

  def attention_maps(self, tokens_BxT: Array, segment_ids: Array | None = None,
                     positions: Array | None = None) -> list[Array]:
    """Every layer's attention weights [B, H, T, T] (float32), from one forward pass."""
    if self.cfg.scan_layers:
      return unrolled_model(self).attention_maps(tokens_BxT, segment_ids, positions)
    positions = self.check_inputs(tokens_BxT, segment_ids, positions)
    x = self.embed(tokens_BxT, jnp.dtype(self.cfg.dtype))
    maps = []
    for block in self.blocks:
      maps.append(block.attn.weights(block.attn_norm(x), positions, segment_ids))
      x = block(x, positions, segment_ids, None)
    return maps


def abstract_model(cfg: ModelConfig) -> TransformerLM:
  """The model with ShapeDtypeStruct leaves: nothing is allocated."""
  return nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count from abstract shapes."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------
# Parameter layout conversion (unrolled <-> scanned)
# ---------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _convert(params: nnx.State, cfg: ModelConfig, to_scan: bool) -> nnx.State:
  """Parameters of one layout as the other's nnx.State (values moved, nothing initialised)."""
  plan = scan_plan(cfg)
  src = _flatten(nnx.to_pure_dict(params))
  dst_cfg = dataclasses.replace(cfg, scan_layers=to_scan)
  target = nnx.state(abstract_model(dst_cfg), nnx.Param)
  out = {}
  for path in _flatten(nnx.to_pure_dict(target)):
    if to_scan and path[0] == "scan_blocks":   # ('scan_blocks', 'blocks', j, *rest)
      j, rest = path[2], path[3:]
      out[path] = jnp.stack([src[("blocks", plan.start + r * plan.period + j) + rest]
                             for r in range(plan.repeats)])
    elif to_scan and path[0] in ("head_blocks", "tail_blocks"):
      layer = path[1] + (plan.stop if path[0] == "tail_blocks" else 0)
      out[path] = src[("blocks", layer) + path[2:]]
    elif not to_scan and path[0] == "blocks":
      where, rest = plan.where(path[1]), path[2:]
      if where[0] == "scan_blocks":
        out[path] = src[where[:3] + rest][where[3]]
      else:
        out[path] = src[where + rest]
    else:
      out[path] = src[path]
  nnx.replace_by_pure_dict(target, _unflatten(out))
  return target


def to_scanned_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """Unrolled-layout parameters (`blocks.<l>...`) in the scanned layout of `cfg`."""
  return _convert(params, cfg, to_scan=True)


def to_unrolled_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """Scanned-layout parameters in the unrolled layout (`blocks.<l>...`)."""
  return _convert(params, cfg, to_scan=False)


def unrolled_model(model: TransformerLM) -> TransformerLM:
  """The same model in the unrolled layout (for per-layer analysis: attention maps, kernels)."""
  if not model.cfg.scan_layers:
    return model
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  graphdef, _ = nnx.split(abstract_model(cfg), nnx.Param)
  return nnx.merge(graphdef, to_unrolled_params(nnx.state(model, nnx.Param), model.cfg))
