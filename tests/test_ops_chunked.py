"""The chunked MTA op equals the "xla" reference: forward and every gradient, all features.

Block sizes here are tiny (3-8 rows) so that every case crosses several blocks and several
bands, with lengths that are not multiples of the block, and documents shorter than the kernels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import implementations, ops, ops_chunked
from mta_jax.implementations import multi_token_attention
from mta_numpy import mta_numpy

H, D = 4, 8


def _segments(rng, b, t):
  """Several documents per row, lengths 1..7 (many shorter than a 6-row / 11-column kernel)."""
  rows = []
  for _ in range(b):
    ids, doc = [], 3
    while len(ids) < t:
      ids += [doc] * int(rng.integers(1, 8))
      doc += 1
    rows.append(ids[:t])
  return np.asarray(rows, np.int32)


def _inputs(seed, b, t, pre, post, c_h, mix):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, t, H, D)).astype(np.float32) for _ in range(3))
  kern = lambda c: None if c is None else rng.normal(size=(H, *c)).astype(np.float32)
  mixw = lambda on: rng.normal(size=(H // c_h, c_h, c_h)).astype(np.float32) if on else None
  weights = (kern(pre), kern(post), mixw(mix in ("pre", "both")), mixw(mix in ("post", "both")))
  return (q, k, v), weights, rng


def _op(implementation, segment_ids):
  def f(q, k, v, kp, kpo, mp, mpo):
    return multi_token_attention(
        q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp, head_mix_post=mpo,
        segment_ids=segment_ids, implementation=implementation)
  return f


@functools.lru_cache(maxsize=None)
def _register(block, bands):
  name = f"chunked_test_b{block}_n{bands}"
  implementations.IMPLEMENTATIONS[name] = ops_chunked.make_chunked(block=block, bands=bands)
  return name


def _fwd_and_grads(implementation, segment_ids, args, cotangent):
  f = _op(implementation, segment_ids)
  live = tuple(i for i, a in enumerate(args) if a is not None)

  @jax.jit
  def run(*xs):
    full = list(args)
    for i, x in zip(live, xs):
      full[i] = x
    out, vjp = jax.vjp(lambda *ys: f(*[ys[live.index(i)] if i in live else None
                                       for i in range(len(full))]), *xs)
    return out, vjp(cotangent)

  return run(*(args[i] for i in live))


def _assert_close(actual, expected, tol):
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=tol * scale)


FWD_TOL, GRAD_TOL = 5e-6, 1e-5

CASES = [
    # (b, t, pre (c_q, c_k), post, c_h, mix, block, bands)
    (2, 23, (6, 11), (6, 11), H, "both", 5, 2),    # paper default, full head mixing
    pytest.param((1, 19, (6, 11), (6, 11), 2, "both", 4, 8),  # one block per band
                 marks=pytest.mark.slow),
    (2, 17, (2, 3), None, 1, "pre", 6, 2),
    (1, 21, None, (2, 3), 2, "post", 5, 3),
    (2, 13, (1, 11), (6, 1), None, None, 3, 2),
    (1, 16, (6, 3), (1, 11), H, "pre", 8, 2),      # length a multiple of the block
    (2, 11, (1, 1), (2, 11), 2, "both", 4, 2),
    (1, 9, None, None, H, "both", 4, 2),           # head mixing only (talking heads)
    (1, 10, None, None, None, None, 3, 2),         # plain causal softmax attention
]


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c[1]}-pre{c[2]}-post{c[3]}-ch{c[4]}"
                         f"{c[5]}-blk{c[6]}x{c[7]}".replace(" ", "") if isinstance(c, tuple)
                         else None)
def test_chunked_matches_xla_forward_and_gradients(case, segments):
  b, t, pre, post, c_h, mix, block, bands = case
  (q, k, v), weights, rng = _inputs(hash((case, segments)) % 2**32, b, t, pre, post, c_h or 1,
                                    mix)
  seg = _segments(rng, b, t) if segments else None
  args = (q, k, v, *weights)
  cot = rng.normal(size=q.shape).astype(np.float32)
  out_ref, g_ref = _fwd_and_grads("xla", seg, args, cot)
  out, g = _fwd_and_grads(_register(block, bands), seg, args, cot)
  _assert_close(out, out_ref, FWD_TOL)
  assert len(g) == len(g_ref)
  for got, want in zip(g, g_ref):
    _assert_close(got, want, GRAD_TOL)


@pytest.mark.parametrize("name", ["chunked", "chunked_convxla"])
def test_named_implementations_match_numpy_loop(name):
  """The named implementations (default block > T here: one block) vs the float64 loop."""
  (q, k, v), (kp, kpo, mp, mpo), rng = _inputs(7, 2, 12, (6, 11), (2, 3), 2, "both")
  seg = np.array([[1] * 5 + [2] * 2 + [3] * 5, [7] * 12], np.int32)
  got = _op(name, seg)(q, k, v, kp, kpo, mp, mpo)
  _assert_close(got, mta_numpy(q, k, v, kp, kpo, mp, mpo, seg=seg), FWD_TOL)


def test_xla_conv_variant_matches_reference_gradients():
  """The conv_general_dilated block conv (used on backends where it is fast) is exact too."""
  name = "chunked_convxla_test"
  implementations.IMPLEMENTATIONS[name] = ops_chunked.make_chunked(block=4, bands=2, conv="xla")
  _assert_matches_xla(name, 3, 2, 14, (3, 5), (2, 3), H, "post")


def _assert_matches_xla(name, seed, b, t, pre, post, c_h, mix):
  """Implementation `name` equals "xla" (forward, every gradient) on random packed inputs."""
  (q, k, v), weights, rng = _inputs(seed, b, t, pre, post, c_h, mix)
  seg = _segments(rng, b, t)
  cot = rng.normal(size=q.shape).astype(np.float32)
  out_ref, g_ref = _fwd_and_grads("xla", seg, (q, k, v, *weights), cot)
  out, g = _fwd_and_grads(name, seg, (q, k, v, *weights), cot)
  _assert_close(out, out_ref, FWD_TOL)
  for got, want in zip(g, g_ref):
    _assert_close(got, want, GRAD_TOL)


def test_shift_conv_vjp_matches_autodiff_with_row_masks():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 9, 7)).astype(np.float32)      # 5 output rows + 4 halo rows
  w = rng.normal(size=(3, 5, 3)).astype(np.float32)
  m = (rng.random(size=(2, 5, 5)) < 0.7).astype(np.float32)
  g = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
  _, vjp = jax.vjp(ops_chunked.shift_conv, x, w, m)
  _, vjp_ref = jax.vjp(ops_chunked.shift_conv_autodiff, x, w, m)
  for got, want in zip(vjp(g)[:2], vjp_ref(g)[:2]):
    _assert_close(got, want, GRAD_TOL)
  _assert_close(ops_chunked.xla_conv(x, w, m), ops_chunked.shift_conv(x, w, m), FWD_TOL)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "row-masks"])
def test_looped_shift_conv_matches_shift_conv(masked):
  """shift_conv_looped (the TPU path) = shift_conv: values and both gradients."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 10, 9)).astype(np.float32)     # 5 output rows + 5 halo rows
  w = rng.normal(size=(3, 6, 5)).astype(np.float32)
  m = (rng.random(size=(2, 6, 5)) < 0.7).astype(np.float32) if masked else None
  g = rng.normal(size=(2, 3, 5, 9)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: ops_chunked.shift_conv_looped(x, w, m), x, w)
  y_ref, vjp_ref = jax.vjp(lambda x, w: ops_chunked.shift_conv_autodiff(x, w, m), x, w)
  _assert_close(y, y_ref, FWD_TOL)
  for got, want in zip(vjp(g), vjp_ref(g)):
    _assert_close(got, want, GRAD_TOL)


def test_dropout_is_deterministic_per_key_and_unbiased():
  (q, k, v), (kp, kpo, mp, mpo), _ = _inputs(5, 1, 8, None, (2, 3), 2, "post")
  name = _register(3, 2)

  def f(rng, rate):
    return multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo,
                                     head_mix_pre=mp, head_mix_post=mpo, implementation=name,
                                     dropout_rate=rate, dropout_rng=rng)

  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(f(key, 0.3), f(key, 0.3))
  assert not np.allclose(f(key, 0.3), f(jax.random.PRNGKey(1), 0.3))
  # E[dropout(A) v] = A v: the mean over many keys converges to the deterministic output.
  samples = np.asarray(jax.jit(jax.vmap(lambda r: f(r, 0.3)))(jax.random.split(key, 2000)))
  exact = np.asarray(f(None, 0.0))
  stderr = samples.std(0) / np.sqrt(len(samples)) + 1e-6
  assert np.all(np.abs(samples.mean(0) - exact) < 6 * stderr)


def test_temp_memory_grows_linearly_in_length():
  """Compiled fwd+bwd temp memory: chunked ~ T (one block x T slab), reference ~ T^2."""
  def temp(implementation, t):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 8)), jnp.float32) for _ in range(3))
    kp = jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)
    loss = lambda q, k, v, kp: multi_token_attention(
        q, k, v, kq_kernel_pre=kp, kq_kernel_post=kp, implementation=implementation).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, kp).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  name = _register(64, 4)
  small, large = temp(name, 256), temp(name, 1024)
  assert large / small < 5.0, (small, large)           # linear: ~4x for 4x T (quadratic: 16x)
  assert temp("xla", 1024) > 4 * large


def test_elementwise_head_mix_matches_gemm_and_its_gradients():
  """head_mix_elementwise (the TPU path) = head_mix_2d and ops.head_mix, values and VJP."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(2, H, 5, 7)).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  for c_h in (1, 2, H):
    w = rng.normal(size=(H // c_h, c_h, c_h)).astype(np.float32)
    y, vjp = jax.vjp(ops_chunked.head_mix_elementwise, x, w)
    y_ref, vjp_ref = jax.vjp(ops_chunked.head_mix_2d, x, w)
    _assert_close(y, y_ref, FWD_TOL)
    _assert_close(y, ops.head_mix(jnp.asarray(x), jnp.asarray(w)), FWD_TOL)
    for got, want in zip(vjp(g), vjp_ref(g)):
      _assert_close(got, want, GRAD_TOL)


def test_chunked_with_the_tpu_head_mix_matches_xla(monkeypatch):
  """The chunked op with the conv and head mixing it uses on TPU, forced here on CPU, is exact."""
  monkeypatch.setattr(ops_chunked, "head_mix_block", ops_chunked.head_mix_elementwise)
  monkeypatch.setattr(ops_chunked, "shift_conv_block", ops_chunked.shift_conv_looped)
  name = "chunked_tpu_mix_test"
  implementations.IMPLEMENTATIONS[name] = ops_chunked.make_chunked(block=4, bands=2)
  _assert_matches_xla(name, 13, 2, 13, (3, 5), (2, 3), 2, "both")
