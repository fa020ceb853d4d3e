"""The reference MTA op against a float64 NumPy loop written from docs/MTA.md (Sec. 2-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mta_jax import ops
from mta_jax.implementations import multi_token_attention
from mta_numpy import mta_numpy

B, T, H, D = 2, 12, 4, 8
# Two rows: one with three documents (one shorter than the 6-row kernel), one a single document.
SEGMENTS = np.array([[1] * 5 + [2] * 2 + [3] * 5, [7] * 12], np.int32)


def _qkv(rng, b=B, t=T, h=H, d=D):
  return [rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3)]


def _kernel(rng, c_q, c_k, h=H):
  return rng.normal(size=(h, c_q, c_k)).astype(np.float32)


def _mix(rng, c_h, h=H):
  return rng.normal(size=(h // c_h, c_h, c_h)).astype(np.float32)


def _assert_close(actual, expected):
  expected = np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("pre,post", [((6, 11), None), (None, (6, 11)), ((6, 11), (2, 9)),
                                      ((2, 9), (1, 1)), ((1, 1), (6, 11)), ((3, 1), (1, 3))])
def test_kq_convs_match_numpy_loop(pre, post, segments):
  rng = np.random.default_rng(hash((pre, post, segments)) % 2**32)
  q, k, v = _qkv(rng)
  kp = _kernel(rng, *pre) if pre else None
  kpo = _kernel(rng, *post) if post else None
  seg = SEGMENTS if segments else None
  got = multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, segment_ids=seg)
  _assert_close(got, mta_numpy(q, k, v, kp, kpo, seg=seg))


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("c_h", [1, 2, H])
@pytest.mark.parametrize("where", ["pre", "post", "both"])
def test_head_mixing_matches_numpy_loop(c_h, where, segments):
  rng = np.random.default_rng(c_h * 10 + len(where) + segments)
  q, k, v = _qkv(rng)
  mp = _mix(rng, c_h) if where in ("pre", "both") else None
  mpo = _mix(rng, c_h) if where in ("post", "both") else None
  seg = SEGMENTS if segments else None
  got = multi_token_attention(q, k, v, head_mix_pre=mp, head_mix_post=mpo, segment_ids=seg)
  _assert_close(got, mta_numpy(q, k, v, mix_pre=mp, mix_post=mpo, seg=seg))


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "packed"])
def test_all_stages_match_numpy_loop(segments):
  rng = np.random.default_rng(7)
  q, k, v = _qkv(rng)
  args = dict(kq_pre=_kernel(rng, 6, 11), kq_post=_kernel(rng, 2, 9), mix_pre=_mix(rng, 2),
              mix_post=_mix(rng, H))
  seg = SEGMENTS if segments else None
  got = multi_token_attention(q, k, v, kq_kernel_pre=args["kq_pre"],
                              kq_kernel_post=args["kq_post"], head_mix_pre=args["mix_pre"],
                              head_mix_post=args["mix_post"], segment_ids=seg)
  _assert_close(got, mta_numpy(q, k, v, **args, seg=seg))


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "packed"])
def test_identity_weights_give_softmax_attention(segments):
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng)
  seg = SEGMENTS if segments else None
  got = multi_token_attention(
      q, k, v, kq_kernel_pre=ops.identity_kq_kernel(H, 6, 11),
      kq_kernel_post=ops.identity_kq_kernel(H, 2, 3), head_mix_pre=ops.identity_head_mix(H, 2),
      head_mix_post=ops.identity_head_mix(H, H), segment_ids=seg)
  plain = multi_token_attention(q, k, v, segment_ids=seg)
  library = ops.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      segment_ids=seg)
  _assert_close(plain, mta_numpy(q, k, v, seg=seg))
  _assert_close(got, plain)
  _assert_close(library, plain)


def test_output_dtype_and_bfloat16_inputs():
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(rng))
  out = multi_token_attention(q, k, v, kq_kernel_pre=_kernel(rng, 2, 3))
  assert out.dtype == jnp.bfloat16 and out.shape == (B, T, H, D)
  assert np.isfinite(np.asarray(out, np.float32)).all()


def _random_mta_weights(rng):
  return dict(kq_kernel_pre=_kernel(rng, 3, 5), kq_kernel_post=_kernel(rng, 2, 3),
              head_mix_pre=_mix(rng, 2), head_mix_post=_mix(rng, 2))


def _full_mta(rng, seg=None):
  weights = _random_mta_weights(rng)
  return lambda q, k, v: multi_token_attention(q, k, v, segment_ids=seg, **weights)


@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["q", "k", "v"])
def test_causal_by_gradient(argnum):
  """d out[i] / d input[j] == 0 for every future position j > i (and != 0 for some j <= i)."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(x) for x in _qkv(rng, b=1, t=9))
  f = _full_mta(rng)
  jac = jax.jacrev(f, argnums=argnum)(q, k, v)  # [1, T, H, D, 1, T, H, D]
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [T_out, T_in]
  i, j = np.indices(dep.shape)
  assert np.all(dep[j > i] == 0.0), "an output depends on a future position"
  # The first query sees only itself: softmax over one key is constant in q_0 and k_0.
  if argnum == 0:  # a query reaches other rows only through the convs' c_q - 1 row halo
    assert np.all(dep[(j <= i) & (j >= i - 1) & (i > 0)] > 0.0)
  elif argnum == 1:  # every past key changes the logits
    assert np.all(dep[(j <= i) & (i > 0)] > 0.0)
  else:  # every past value is attended
    assert np.all(dep[j <= i] > 0.0)


@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["q", "k", "v"])
def test_no_dependence_across_documents(argnum):
  rng = np.random.default_rng(6)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 3]], jnp.int32)
  q, k, v = (jnp.asarray(x) for x in _qkv(rng, b=1, t=9))
  jac = jax.jacrev(_full_mta(rng, seg), argnums=argnum)(q, k, v)
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))
  s = np.asarray(seg[0])
  i, j = np.indices(dep.shape)
  assert np.all(dep[s[i] != s[j]] == 0.0), "an output depends on another document"
  assert np.all(dep[(s[i] == s[j]) & (j > i)] == 0.0)
  first = np.r_[True, s[1:] != s[:-1]][i]  # a document's first query sees only itself
  near = (s[i] == s[j]) & (j <= i) & (j >= i - 1)
  assert np.all(dep[near & ~first] > 0.0) if argnum < 2 else np.all(dep[near] > 0.0)


def test_packed_row_equals_separate_sequences():
  """docs/MTA.md Sec. 4: every document of a packed row is computed as if it were alone."""
  rng = np.random.default_rng(8)
  q, k, v = _qkv(rng, b=1)
  weights = _random_mta_weights(rng)
  packed = multi_token_attention(q, k, v, segment_ids=SEGMENTS[:1], **weights)
  start = 0
  for n in (5, 2, 5):
    sl = slice(start, start + n)
    alone = multi_token_attention(q[:, sl], k[:, sl], v[:, sl], **weights)
    _assert_close(np.asarray(packed)[:, sl], alone)
    start += n


def test_jit_and_eager_agree():
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(x) for x in _qkv(rng))
  kernels = dict(kq_kernel_pre=jnp.asarray(_kernel(rng, 6, 11)),
                 kq_kernel_post=jnp.asarray(_kernel(rng, 2, 9)),
                 head_mix_pre=jnp.asarray(_mix(rng, 2)), head_mix_post=jnp.asarray(_mix(rng, 4)),
                 segment_ids=jnp.asarray(SEGMENTS))
  jitted = multi_token_attention(q, k, v, **kernels)
  with jax.disable_jit():
    eager = multi_token_attention(q, k, v, **kernels)
  _assert_close(eager, jitted)


def test_dropout_is_inverted_and_seeded():
  rng = np.random.default_rng(10)
  q, k, v = (jnp.asarray(x) for x in _qkv(rng))
  key = jax.random.key(0)
  a = multi_token_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  b = multi_token_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  c = multi_token_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  plain = multi_token_attention(q, k, v)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert not np.allclose(a, plain)


# ------------------------------------------------------------------------------ errors


def _call(**kw):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng)
  args = dict(q=q, k=k, v=v)
  args.update({key: kw.pop(key) for key in ("q", "k", "v") if key in kw})
  return multi_token_attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kq_kernel_pre=np.ones((H, 2, 4), np.float32)), "even key width c_k=4.*must be odd"),
    (dict(kq_kernel_post=np.ones((H, 2, 2), np.float32)), "kq_kernel_post has even key width"),
    (dict(kq_kernel_pre=np.ones((H + 1, 2, 3), np.float32)), "5 head kernels .* 4 heads"),
    (dict(kq_kernel_pre=np.ones((H, 3), np.float32)), r"\[heads, c_q, c_k\]"),
    (dict(head_mix_pre=np.ones((1, 3, 3), np.float32)), "c_h=3 does not divide the 4 heads"),
    (dict(head_mix_post=np.ones((1, 2, 2), np.float32)), "use 2 groups"),
    (dict(head_mix_pre=np.ones((2, 2, 3), np.float32)), r"\[groups, c_h, c_h\]"),
    (dict(segment_ids=np.zeros((B, T + 1), np.int32)), "segment_ids must be"),
    (dict(segment_ids=np.zeros((B, T), np.float32)), "segment_ids must be integers"),
    (dict(k=np.ones((B, T, H, D + 1), np.float32), v=np.ones((B, T, H, D + 1), np.float32)),
     "must agree in batch, heads and head_dim"),
    (dict(v=np.ones((B, T, H, D + 1), np.float32)), "k and v must have the same shape"),
    (dict(v=np.ones((B, T, H), np.float32)), "rank 4"),
    (dict(q=np.ones((B, T, H, D), np.float16)), "share one dtype"),
    (dict(k=np.ones((B, T - 1, H, D), np.float32), v=np.ones((B, T - 1, H, D), np.float32)),
     "q length 12 != k length 11"),
    (dict(implementation="nope"), "unknown implementation 'nope'"),
    (dict(dropout_rate=0.1), "needs dropout_rng"),
])
def test_errors_name_the_problem(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call(**kwargs)


# ------------------------------------------------------------------------------ properties


@settings(max_examples=12, deadline=None)
@given(t=st.integers(1, 9), h=st.sampled_from([1, 2, 4]), c_q=st.integers(1, 4),
       half=st.integers(0, 3), c_h=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16),
       cut=st.integers(0, 9))
def test_property_matches_numpy_loop(t, h, c_q, half, c_h, seed, cut):
  c_h = min(c_h, h)
  rng = np.random.default_rng(seed)
  q, k, v = _qkv(rng, b=1, t=t, h=h, d=4)
  kp, kpo = _kernel(rng, c_q, 2 * half + 1, h), _kernel(rng, max(1, c_q - 1), 2 * half + 1, h)
  mp, mpo = _mix(rng, c_h, h), _mix(rng, c_h, h)
  seg = (np.arange(t) >= min(cut, t)).astype(np.int32)[None]
  got = multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp,
                                  head_mix_post=mpo, segment_ids=seg)
  _assert_close(got, mta_numpy(q, k, v, kp, kpo, mp, mpo, seg))


def test_attention_weights_times_v_is_the_op():
  rng = np.random.default_rng(11)
  q, k, v = _qkv(rng)
  weights = dict(kq_kernel_pre=_kernel(rng, 6, 11), kq_kernel_post=_kernel(rng, 2, 9),
                 head_mix_pre=_mix(rng, 2), head_mix_post=_mix(rng, 4), segment_ids=SEGMENTS)
  a = ops.attention_weights(q, k, **weights)
  assert a.shape == (B, H, T, T) and a.dtype == jnp.float32
  _assert_close(np.einsum("bhqk,bkhd->bqhd", np.asarray(a, np.float64), v),
                multi_token_attention(q, k, v, **weights))
