"""The Llama-style Transformer LM whose attention layers may be MTA layers.

    h = Embed(tokens)
    for each layer l:  h = h + Attention_l(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = RMSNorm(h) @ Embed^T                              (tied embeddings)

Which layers get key-query convolutions is `ModelConfig.kq_layer_indices()`; head mixing and the
gated group norm, when on, are on every layer (docs/MTA.md Sec. 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
    x = x + self.attn(self.attn_norm(x), positions, segment_ids, dropout_rng)
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, _ACT)


def _block_apply(block: Block, x, positions, segment_ids, dropout_rng):
  return block(x, positions, segment_ids, dropout_rng)


_block_apply_remat = nnx.remat(_block_apply)


class TransformerLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    validate_model(cfg)
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=pdt)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, param_dtype=pdt)

  def _check_inputs(self, tokens_BxT, segment_ids, positions) -> Array:
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
    positions = self._check_inputs(tokens_BxT, segment_ids, positions)
    dtype = jnp.dtype(self.cfg.dtype)
    x = constrain(self.embed(tokens_BxT, dtype), _ACT)
    apply = _block_apply_remat if self.cfg.remat else _block_apply
    for i, block in enumerate(self.blocks):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      x = apply(block, x, positions, segment_ids, rng)
    x = self.final_norm(x)
    return constrain(self.embed.attend(x), ("act_batch", "act_length", "act_vocab"))

  def attention_maps(self, tokens_BxT: Array, segment_ids: Array | None = None,
                     positions: Array | None = None) -> list[Array]:
    """Every layer's attention weights [B, H, T, T] (float32), from one forward pass."""
    positions = self._check_inputs(tokens_BxT, segment_ids, positions)
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
