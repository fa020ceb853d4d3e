"""Every exact implementation of Multi-Token Attention, by name, and the entry point that
dispatches on the name.

Each implementation is a function with the keyword arguments of `ops.mta_xla` and must compute
exactly what that reference computes (tests/test_ops*.py hold every entry to it). Adding one is
one line in `IMPLEMENTATIONS`; `model.attention.implementation` then accepts its name.
"""

from __future__ import annotations

import functools

import jax

from mta_jax import ops, ops_chunked, ops_pallas

Array = jax.Array

IMPLEMENTATIONS = {
    "xla": ops.mta_xla,                                       # the reference
    "chunked": ops_chunked.make_chunked(),                    # exact, O(block x T) memory
    "chunked_convxla": ops_chunked.make_chunked(conv="xla"),  # same, conv_general_dilated
    "pallas": ops_pallas.make_pallas(),  # fused Pallas forward (TPU; interpreted elsewhere)
}


def names() -> tuple[str, ...]:
  return tuple(IMPLEMENTATIONS)


@functools.partial(jax.jit, static_argnames=("implementation", "dropout_rate"))
def _mta_jit(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, segment_ids,
             dropout_rng, *, implementation, dropout_rate):
  return IMPLEMENTATIONS[implementation](
      q, k, v, kq_kernel_pre=kq_kernel_pre, kq_kernel_post=kq_kernel_post,
      head_mix_pre=head_mix_pre, head_mix_post=head_mix_post, segment_ids=segment_ids,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def multi_token_attention(q: Array, k: Array, v: Array, *,
                          kq_kernel_pre: Array | None = None,
                          kq_kernel_post: Array | None = None,
                          head_mix_pre: Array | None = None,
                          head_mix_post: Array | None = None,
                          segment_ids: Array | None = None,
                          implementation: str = "xla",
                          dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None) -> Array:
  """Causal Multi-Token Attention (docs/MTA.md). Returns [batch, length, heads, head_dim].

  Args:
    q, k, v: [batch, length, heads, head_dim], one dtype. The op scales by 1/sqrt(head_dim).
      Grouped-query K/V must be repeated to `heads` by the caller.
    kq_kernel_pre: [heads, c_q, c_k] (c_k odd) key-query conv on the logits before softmax
      (Eq. 5). Tap [h, a, b] reads query i-(c_q-1)+a, key j-(c_k-1)//2+b; the identity kernel
      has a single 1 at [h, c_q-1, c_k//2].
    kq_kernel_post: the same on the attention weights after softmax (Eq. 6).
    head_mix_pre, head_mix_post: [groups, c_h, c_h]; new head g*c_h+o = sum_i W[g,o,i] *
      old head g*c_h+i (Eq. 7), on logits (pre) or weights (post).
    segment_ids: [batch, length] ints; each contiguous run of equal ids is an independent
      sequence: no attention and no convolution tap crosses a boundary.
    implementation: a name in `IMPLEMENTATIONS` ("xla": the reference, `conv_general_dilated`
      on materialised logits); all are exact.
    dropout_rate, dropout_rng: attention-weight dropout (training only); 0 disables it.

  Any MTA argument left None skips its stage; with all four None this is causal softmax
  attention. Logits, convolutions and softmax run in float32; the output has q's dtype.
  """
  ops.check_mta_args(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                     segment_ids)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; choose one of "
                     f"{sorted(IMPLEMENTATIONS)}.")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs dropout_rng; pass dropout_rate=0 at evaluation.")
  return _mta_jit(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                  segment_ids, dropout_rng, implementation=implementation,
                  dropout_rate=float(dropout_rate))
