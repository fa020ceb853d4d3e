"""DIFF Transformer (differential attention): the op and the layer against plain NumPy,
causality (future tokens never change past logits), the paper presets and parameter-count parity with the baseline."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import ops_diff
from mta_jax.config import (PAPER_SIZES, AttentionConfig, ConfigError, ModelConfig,
                            attention_family, family_model, paper_model, validate_model)
from mta_jax.model import TransformerLM, count_params

VOCAB = 53


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def diff_numpy(q, k, v, lam, seg=None):
  """Plain float64 NumPy, straight from the DIFF paper: head h uses q/k halves 2h and 2h+1."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h2, d = q.shape
  out = np.zeros(v.shape)
  for bi in range(b):
    for h in range(h2 // 2):
      maps = []
      for c in range(2):
        s = q[bi, :, 2 * h + c] @ k[bi, :, 2 * h + c].T / math.sqrt(d)
        for i in range(t):
          for j in range(t):
            if j > i or (seg is not None and seg[bi, i] != seg[bi, j]):
              s[i, j] = -np.inf
        maps.append(_softmax(s))
      out[bi, :, h] = (maps[0] - lam * maps[1]) @ v[bi, :, h]
  return out


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
def test_differential_attention_equals_numpy(implementation):
  b, t, h, d = 2, 11, 3, 4
  q, k = _rand((b, t, 2 * h, d), 0), _rand((b, t, 2 * h, d), 1)
  v = _rand((b, t, h, 2 * d), 2)
  seg = jnp.asarray(np.repeat([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]], b, 0), jnp.int32)
  for segment_ids in (None, seg):
    got = ops_diff.differential_attention(q, k, v, jnp.float32(0.37), segment_ids=segment_ids,
                                          implementation=implementation)
    want = diff_numpy(q, k, v, 0.37, None if segment_ids is None else np.asarray(seg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lambda_reparameterisation():
  lq1, lk1, lq2, lk2 = (_rand((8,), s) * 0.3 for s in range(4))
  want = (np.exp(np.dot(lq1, lk1)) - np.exp(np.dot(lq2, lk2)) + 0.8 - 0.6 * np.exp(-0.3 * 5))
  np.testing.assert_allclose(ops_diff.diff_lambda(lq1, lk1, lq2, lk2, 5), want, rtol=1e-6)
  assert ops_diff.lambda_init(0) == pytest.approx(0.2)


def _rope_numpy(x, pos, theta):
  d = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = pos[:, :, None, None] * freqs
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(ang) - odd * np.sin(ang)
  out[..., 1::2] = even * np.sin(ang) + odd * np.cos(ang)
  return out


def _diff_cfg(**kw):
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=32, rope_theta=1e4)
  base.update(kw)
  return family_model(ModelConfig(**base), "diff")


def test_diff_attention_layer_equals_numpy():
  """The whole layer: projections, RoPE on each half, differential map, RMSNorm, (1 - l_init)."""
  cfg = _diff_cfg()
  assert (cfg.n_heads, cfg.resolved_head_dim) == (2, 16)
  attn = TransformerLM(cfg, rngs=nnx.Rngs(0)).blocks[1].attn
  attn.norm_scale[...] = _rand((16,), 7) * 0.5 + 1
  x = _rand((2, 9, 32), 3)
  pos = np.broadcast_to(np.arange(9), (2, 9)).astype(np.float64)
  w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("wq", "wk", "wv", "wo",
       "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "norm_scale")}
  xn = np.asarray(x, np.float64)
  halves = lambda t: t.reshape(2, 9, 4, 8)  # [B, T, H, 16] -> [B, T, 2H, 8]
  q = _rope_numpy(halves(np.einsum("btd,dhk->bthk", xn, w["wq"])), pos, 1e4)
  k = _rope_numpy(halves(np.einsum("btd,dhk->bthk", xn, w["wk"])), pos, 1e4)
  v = np.einsum("btd,dhk->bthk", xn, w["wv"])
  lam_init = 0.8 - 0.6 * np.exp(-0.3 * 1)
  lam = (np.exp(w["lambda_q1"] @ w["lambda_k1"]) - np.exp(w["lambda_q2"] @ w["lambda_k2"])
         + lam_init)
  o = diff_numpy(q, k, v, lam)
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-5) * w["norm_scale"] * (1 - lam_init)
  want = np.einsum("bthk,hkd->btd", o, w["wo"])
  got = attn(x, jnp.asarray(pos, jnp.int32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  maps = attn.weights(x, jnp.asarray(pos, jnp.int32))
  assert maps.shape == (2, 2, 9, 9)
  np.testing.assert_allclose(maps.sum(-1), 1 - lam, rtol=1e-5)  # each softmax row sums to 1


def test_diff_model_is_causal_and_implementations_agree():
  cfg = _diff_cfg()
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  xla_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention,
                                                                   implementation="xla"))
  ref = TransformerLM(xla_cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, 10)), jnp.int32)
  np.testing.assert_allclose(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
  ref_out = np.asarray(model(tokens))
  for j in (3, 7):  # changing token j leaves every earlier position's logits bitwise unchanged
    out = np.asarray(model(tokens.at[0, j].set((tokens[0, j] + 1) % VOCAB)))
    np.testing.assert_array_equal(out[:, :j], ref_out[:, :j])
    assert np.abs(out[:, j] - ref_out[:, j]).max() > 0


@pytest.mark.parametrize("size", [
    s if s == "300m" else pytest.param(s, marks=pytest.mark.slow) for s in PAPER_SIZES])
def test_diff_param_count_parity_at_every_paper_size(size):
  d_model, n_layers, n_heads, head_dim = PAPER_SIZES[size]
  diff, base = paper_model(size, "diff"), paper_model(size, "baseline")
  assert diff.n_heads == n_heads // 2 and diff.resolved_head_dim == 2 * head_dim
  # Same projections; per layer 4 lambda vectors of head_dim and one norm weight of 2*head_dim.
  extra = n_layers * (4 * head_dim + 2 * head_dim)
  assert count_params(diff) - count_params(base) == extra, size
  assert extra / count_params(base) < 3e-5


def test_diff_family_config_errors():
  with pytest.raises(ConfigError, match="diff=True cannot be combined"):
    validate_model(ModelConfig(d_model=32, n_heads=2, attention=AttentionConfig(
        diff=True, pre_conv=True)))
  with pytest.raises(ConfigError, match="divisible by 4"):
    validate_model(ModelConfig(d_model=36, n_heads=6, attention=AttentionConfig(diff=True)))
  with pytest.raises(ConfigError, match="even head count"):
    family_model(ModelConfig(d_model=30, n_heads=5), "diff")
  assert attention_family("diff").norm_scaling == "depth"
