"""The attention layer: projections, RoPE, the (multi-token) attention op, gated group norm.

One module covers the three families of the paper, switched by `AttentionConfig`:
  * baseline softmax attention     (no MTA flags)
  * talking heads                  (head_mix_pre / head_mix_post only)
  * MTA                            (key-query convs on some layers, head mixing, group norm)

    q, k, v = x Wq, x Wk, x Wv; RoPE(q), RoPE(k)              per document positions
    o       = multi_token_attention(q, k, v, conv/mix weights)  Eq. 5-7 (see ops.py)
    o       = RMSNorm_head(o) * sigmoid(o . w_g + b_g)          gated group norm (v2), or
              RMSNorm_head(o) * (1 - lambda(layer))             depth scaling (v1)
    y       = o Wo
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax import implementations, ops
from mta_jax.config import ModelConfig
from mta_jax.layers import INIT_STD, normal, ones, param, rms_norm, zeros, apply_rope
from mta_jax.sharding import constrain, logical_to_spec

Array = jax.Array

GROUP_NORM_EPS = 1e-5


def _kq_kernel_init(kind: str, const: float):
  """Initialiser for a [heads, c_q, c_k] key-query kernel."""
  def init(key, shape, dtype):
    del key
    heads, c_q, c_k = shape
    if kind == "identity":
      return ops.identity_kq_kernel(heads, c_q, c_k, dtype)
    if kind == "zero":
      return jnp.zeros(shape, dtype)
    return jnp.full(shape, const, dtype)
  return init


def _head_mix_init(kind: str, const: float):
  """Initialiser for a [groups, c_h, c_h] head-mixing weight."""
  def init(key, shape, dtype):
    del key
    groups, c_h, _ = shape
    if kind == "identity":
      return ops.identity_head_mix(groups * c_h, c_h, dtype)
    if kind == "zero":
      return jnp.zeros(shape, dtype)
    return jnp.full(shape, const, dtype)
  return init


def depth_scale(layer: int) -> float:
  """v1 group-norm scaling 1 - lambda(l), lambda(l) = 0.8 - 0.6 exp(-0.3 l) (Diff Transformer)."""
  return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer))


def _per_shard(op):
  """Runs `op` under `jax.shard_map` over the mesh in context (a Pallas call cannot be
  partitioned by XLA): each shard gets its batch rows and its heads / head groups, with the
  same logical-axis rules as the activations and parameters. Without a mesh: `op` itself."""
  def wrapped(q, k, v, kq_pre, kq_post, mix_pre, mix_post, seg):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return op(q, k, v, kq_pre, kq_post, mix_pre, mix_post, seg)
    qkv = ("act_batch", "act_length", "act_heads", None)
    names = (qkv, qkv, qkv, ("heads", None, None), ("heads", None, None),
             ("head_groups", None, None), ("head_groups", None, None), ("act_batch", None))
    args = (q, k, v, kq_pre, kq_post, mix_pre, mix_post, seg)
    specs = tuple(None if x is None else logical_to_spec(n, x.shape, mesh)
                  for n, x in zip(names, args))
    heads_axes = specs[0][2]
    for name, spec in zip(("kq_pre", "kq_post", "mix_pre", "mix_post"), specs[3:7]):
      if spec is not None and spec[0] != heads_axes:
        raise ValueError(f"the Pallas MTA op needs {name} split like the heads ({heads_axes}); "
                         f"got {spec[0]} (make n_heads / c_h divide the tensor axis evenly).")
    return jax.shard_map(op, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
  return wrapped


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    a = cfg.attention
    self.cfg = cfg
    self.layer = layer
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.wq = param(rngs, normal(INIT_STD), (d, h, hd), ("embed", "heads", "head_dim"), pdt)
    self.wk = param(rngs, normal(INIT_STD), (d, h, hd), ("embed", "heads", "head_dim"), pdt)
    self.wv = param(rngs, normal(INIT_STD), (d, h, hd), ("embed", "heads", "head_dim"), pdt)
    self.wo = param(rngs, normal(INIT_STD), (h, hd, d), ("heads", "head_dim", "embed"), pdt)

    # MTA weights are kept in float32 whatever the parameter dtype: they act on fp32 logits.
    has_kq = layer in cfg.kq_layer_indices()
    kq_init = _kq_kernel_init(a.init, a.init_const)
    kq_axes = ("heads", "kernel", "kernel")
    self.kq_pre = (param(rngs, kq_init, (h, a.c_q, a.c_k), kq_axes)
                   if has_kq and a.pre_conv else None)
    self.kq_post = (param(rngs, kq_init, (h, a.post_c_q, a.post_c_k), kq_axes)
                    if has_kq and a.post_conv else None)
    c_h = cfg.resolved_c_h
    mix_init = _head_mix_init(a.init, a.init_const)
    mix_axes = ("head_groups", "kernel", "kernel")
    self.mix_pre = param(rngs, mix_init, (h // c_h, c_h, c_h), mix_axes) if a.head_mix_pre else None
    self.mix_post = (param(rngs, mix_init, (h // c_h, c_h, c_h), mix_axes)
                     if a.head_mix_post else None)

    if a.group_norm:
      # ONE RMSNorm weight [head_dim] shared by all heads (as the released model).
      self.norm_scale = param(rngs, ones, (hd,), ("norm",))
      if a.norm_scaling == "gate":
        # w_g = 0 and b_g = 0: every gate starts at sigmoid(0) = 0.5.
        self.gate_w = param(rngs, zeros, (hd,), ("norm",))
        self.gate_b = param(rngs, zeros, (), ())

  @property
  def uses_mta_op(self) -> bool:
    return any(w is not None for w in (self.kq_pre, self.kq_post, self.mix_pre, self.mix_post))

  def project(self, x_BxTxD: Array, positions_BxT: Array) -> tuple[Array, Array, Array]:
    """q, k, v [B, T, H, hd] with RoPE applied."""
    dt = x_BxTxD.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv[...].astype(dt))
    theta = self.cfg.rope_theta
    q = apply_rope(q, positions_BxT, theta)
    k = apply_rope(k, positions_BxT, theta)
    names = ("act_batch", "act_length", "act_heads", None)
    return constrain(q, names), constrain(k, names), constrain(v, names)

  def attend(self, q: Array, k: Array, v: Array, segment_ids_BxT: Array | None,
             dropout_rng: Array | None) -> Array:
    """The attention op proper: [B, T, H, hd] -> [B, T, H, hd]."""
    a = self.cfg.attention
    rate = a.dropout if dropout_rng is not None else 0.0
    if not self.uses_mta_op and rate == 0.0:
      return ops.dot_product_attention(q, k, v, segment_ids=segment_ids_BxT)
    get = lambda w: None if w is None else w[...]
    weights = (get(self.kq_pre), get(self.kq_post), get(self.mix_pre), get(self.mix_post))

    def op(q, k, v, kq_pre, kq_post, mix_pre, mix_post, seg):
      return implementations.multi_token_attention(
          q, k, v, kq_kernel_pre=kq_pre, kq_kernel_post=kq_post, head_mix_pre=mix_pre,
          head_mix_post=mix_post, segment_ids=seg, implementation=a.implementation,
          dropout_rate=rate, dropout_rng=dropout_rng)

    if a.implementation == "pallas":
      op = _per_shard(op)
    return op(q, k, v, *weights, segment_ids_BxT)

  def weights(self, x_BxTxD: Array, positions_BxT: Array,
              segment_ids_BxT: Array | None = None) -> Array:
    """This layer's attention weights A [B, H, T, T] (float32), for analysis and plots."""
    q, k, _ = self.project(x_BxTxD, positions_BxT)
    get = lambda w: None if w is None else w[...]
    return ops.attention_weights(q, k, kq_kernel_pre=get(self.kq_pre),
                                 kq_kernel_post=get(self.kq_post), head_mix_pre=get(self.mix_pre),
                                 head_mix_post=get(self.mix_post), segment_ids=segment_ids_BxT)

  def group_norm(self, o_BxTxHxK: Array) -> Array:
    """Per-head RMSNorm over head_dim, then the sigmoid gate (v2) or depth scaling (v1)."""
    a = self.cfg.attention
    if not a.group_norm:
      return o_BxTxHxK
    y = rms_norm(o_BxTxHxK, self.norm_scale[...], GROUP_NORM_EPS)
    if a.norm_scaling == "gate":
      logit = jnp.einsum("bthk,k->bth", y.astype(jnp.float32), self.gate_w[...]) + self.gate_b[...]
      y = y * jax.nn.sigmoid(logit)[..., None].astype(y.dtype)
    elif a.norm_scaling == "depth":
      y = y * depth_scale(self.layer)
    return y

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None = None,
               dropout_rng: Array | None = None) -> Array:
    q, k, v = self.project(x_BxTxD, positions_BxT)
    o = self.attend(q, k, v, segment_ids_BxT, dropout_rng)
    o = self.group_norm(o)
    y = jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))
    return constrain(y, ("act_batch", "act_length", "act_embed"))
