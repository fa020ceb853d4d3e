"""FLOPs of one training step, for MFU.

Counted per token of a sequence of length T, forward pass, multiply-add = 2 FLOPs:

    dense     2 * (L * (4 * D * H * d + 3 * D * F) + V * D)       projections, SwiGLU, output
    attention 2 * 2 * T * H * d                  per layer         q.k^T and A.v over all T keys
    pre conv  2 * T * H * c_q * c_k              per key-query layer with the pre-softmax conv
    post conv 2 * T * H * c_q' * c_k'            per key-query layer with the post-softmax conv
    head mix  2 * T * H * c_h                    per layer, for each of pre / post mixing

Training = 3 x forward (the backward pass costs two forwards). The attention terms count the
full T x T square, as the materialised-logits implementation computes it (PaLM's convention,
which also ignores causal skipping); norms, softmax, RoPE and the embedding lookup are left out.
MFU = counted FLOPs per second / (devices x peak FLOPs per device).
"""

from mta_jax.config import ModelConfig, TrainConfig

# Peak dense bf16 FLOPs per device (per chip), by `jax.devices()[0].device_kind` substring.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
  """The forward FLOPs per token, split by term (see the module docstring)."""
  a = m.attention
  d_model, heads, hd, layers = m.d_model, m.n_heads, m.resolved_head_dim, m.n_layers
  t = seq_len
  terms = {
      "dense": 2.0 * (layers * (4 * d_model * heads * hd + 3 * d_model * m.resolved_ffn_hidden)
                      + m.vocab_size * d_model),
      "attention": layers * 4.0 * t * heads * hd,
      "mta_conv": 0.0,
      "head_mix": 0.0,
  }
  n_kq = len(m.kq_layer_indices())
  if a.pre_conv:
    terms["mta_conv"] += n_kq * 2.0 * t * heads * a.c_q * a.c_k
  if a.post_conv:
    terms["mta_conv"] += n_kq * 2.0 * t * heads * a.post_c_q * a.post_c_k
  n_mix = int(a.head_mix_pre) + int(a.head_mix_post)
  terms["head_mix"] = layers * n_mix * 2.0 * t * heads * m.resolved_c_h
  return terms


def train_flops_per_step(cfg: TrainConfig) -> float:
  """FLOPs of one optimizer step (all micro-batches, all devices)."""
  tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum
  return 3.0 * tokens * sum(forward_flops_per_token(cfg.model, cfg.data.seq_len).values())


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOPs of one device: `override_tflops` * 1e12 if set, else the table; None = unknown
  (CPUs), in which case MFU is not reported."""
  if override_tflops > 0:
    return override_tflops * 1e12
  for key, peak in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None
