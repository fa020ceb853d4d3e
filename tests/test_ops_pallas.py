"""The fused Pallas MTA op equals the "xla" reference: forward and every gradient, all features.

On CPU the kernel runs in Pallas interpret mode (slow to compile, ~10-40 s per feature set),
so the default run covers a few feature sets and the rest is marked slow. Blocks are 8 x 8 so
that every case crosses several query and key blocks (and skips future key blocks), with odd
lengths and documents shorter than the kernels. A TPU ahead-of-time compile (Mosaic, inside
`jax.shard_map` on a multi-chip mesh) checks that the kernel lowers for real hardware and that
no [T, T] buffer appears.
"""

import dataclasses
import functools
import re
import zlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import implementations, ops_pallas
from mta_jax.implementations import multi_token_attention
from mta_numpy import mta_numpy
from test_ops_chunked import (FWD_TOL, GRAD_TOL, H, _assert_close, _fwd_and_grads, _inputs,
                              _segments)


@functools.lru_cache(maxsize=None)
def _register(block_q, block_k):
  name = f"pallas_test_{block_q}x{block_k}"
  implementations.IMPLEMENTATIONS[name] = ops_pallas.make_pallas(block_q=block_q, block_k=block_k)
  return name


CASES = [
    # (b, t, pre (c_q, c_k), post, c_h, mix, segments). Every gradient comes from the Pallas
    # backward kernels (with post ops: the dpost pass too).
    (2, 19, (3, 5), (2, 3), 2, "both", True),       # every stage, two passes, packed docs
    (1, 21, (6, 11), None, H, "pre", True),         # paper-size pre conv, online softmax,
                                                    # backward kernels (conv, mixing, packed)
    (1, 17, None, (2, 3), 1, "post", True),         # post only (c_h = 1: identity-size mix)
    pytest.param((2, 19, (3, 5), None, 2, "pre", True), marks=pytest.mark.slow),
    pytest.param((1, 21, (6, 11), None, H, "pre", False), marks=pytest.mark.slow),
    pytest.param((1, 23, (6, 11), None, None, None, True), marks=pytest.mark.slow),
    pytest.param((2, 26, (4, 7), None, 4, "pre", True), marks=pytest.mark.slow),
    pytest.param((2, 23, (6, 11), (6, 11), H, "both", True), marks=pytest.mark.slow),
    pytest.param((1, 13, (1, 11), (6, 1), None, None, True), marks=pytest.mark.slow),
    pytest.param((1, 16, (2, 3), None, 2, "pre", True), marks=pytest.mark.slow),
    pytest.param((1, 11, None, None, H, "both", True), marks=pytest.mark.slow),  # talking heads
    pytest.param((1, 10, None, None, None, None, True), marks=pytest.mark.slow),  # plain softmax
    pytest.param((2, 9, (2, 3), (2, 3), None, "post", False), marks=pytest.mark.slow),
]


def _case_id(c):
  if not isinstance(c, tuple):
    return None
  b, t, pre, post, c_h, mix, seg = c
  return f"t{t}-pre{pre}-post{post}-ch{c_h}{mix}-{'packed' if seg else 'onedoc'}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pallas_matches_xla_forward_and_gradients(case):
  b, t, pre, post, c_h, mix, segments = case
  (q, k, v), weights, rng = _inputs(zlib.crc32(repr(case).encode()), b, t, pre, post, c_h or 1, mix)
  seg = _segments(rng, b, t) if segments else None
  args = (q, k, v, *weights)
  cot = rng.normal(size=q.shape).astype(np.float32)
  out_ref, g_ref = _fwd_and_grads("xla", seg, args, cot)
  out, g = _fwd_and_grads(_register(8, 8), seg, args, cot)
  _assert_close(out, out_ref, FWD_TOL)
  assert len(g) == len(g_ref) == sum(a is not None for a in args)
  for got, want in zip(g, g_ref):
    _assert_close(got, want, GRAD_TOL)


def test_uneven_blocks_and_default_name_match_numpy_loop():
  """block_q != block_k (16 x 8), and the registered default (one block) vs the float64 loop."""
  (q, k, v), (kp, kpo, mp, mpo), rng = _inputs(11, 2, 20, (3, 3), (2, 5), 2, "post")
  seg = np.array([[1] * 6 + [2] * 3 + [3] * 11, [5] * 20], np.int32)
  want = mta_numpy(q, k, v, kp, kpo, mp, mpo, seg=seg)
  for name in (_register(16, 8), "pallas"):
    got = multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo,
                                head_mix_post=mpo, head_mix_pre=mp, segment_ids=seg,
                                implementation=name)
    _assert_close(got, want, FWD_TOL)
  assert "pallas" in implementations.names()


def test_bfloat16_inputs_as_accurate_as_the_reference():
  """bf16 q, k, v: the kernel's error against float64 is no worse than the xla path's own.

  Both paths round the weights to bf16 before A V (as the op contract says); the comparison
  is against the float64 loop on the same bf16-rounded inputs.
  """
  (q, k, v), (kp, kpo, mp, mpo), rng = _inputs(5, 1, 18, (3, 5), (2, 3), 4, "both")
  seg = _segments(rng, 1, 18)
  qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  want = mta_numpy(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), kp, kpo, mp, mpo, seg=seg)
  run = lambda name: np.asarray(multi_token_attention(
      qb, kb, vb, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp, head_mix_post=mpo,
      segment_ids=seg, implementation=name), np.float64)
  got, ref = run(_register(8, 8)), run("xla")
  assert got.dtype == ref.dtype
  err, ref_err = np.abs(got - want).max(), np.abs(ref - want).max()
  assert err <= 1.5 * ref_err + 1e-6, (err, ref_err)
  assert ref_err > 0  # the comparison is meaningful: bf16 rounding is visible


def _pallas_calls(fn, *args):
  """Names of the Pallas kernels in fn's jaxpr (each appears once per platform branch)."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(eqn.params["name"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sorted(set(names))


@pytest.mark.parametrize("post,want", [
    (False, ["mta_dkv", "mta_dq", "mta_output"]),
    (True, ["mta_dkv", "mta_dpost", "mta_dq", "mta_lse", "mta_output"]),
])
def test_gradient_runs_as_pallas_kernels(post, want):
  """The whole gradient is Pallas kernels: no XLA recompute of the op (no chunked VJP)."""
  (q, k, v), (kp, kpo, mp, _), _ = _inputs(3, 1, 12, (2, 3), (2, 3) if post else None, 2, "pre")

  def loss(q, kp, mp):
    return multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo,
                                 head_mix_pre=mp, implementation="pallas").sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  assert _pallas_calls(grad, q, kp, mp) == want
  # No [T, T]-shaped value anywhere in the gradient's program (T = 12).
  text = str(jax.make_jaxpr(grad)(q, kp, mp))
  assert not re.search(r"\[[0-9,]*\b12,12\b", text), "a [T, T] array in the gradient"


@pytest.mark.parametrize("case", [
    (1, 14, (2, 3), None, 2, "pre"),
    pytest.param((1, 14, (2, 3), (2, 3), 2, "both"), marks=pytest.mark.slow),
], ids=["pre", "pre-and-post"])
def test_bfloat16_gradients_as_accurate_as_the_reference(case):
  """bf16 q, k, v through the backward kernels: every gradient's error against the float32
  reference (on the same bf16-rounded inputs) is no worse than the xla path's own."""
  (q, k, v), weights, rng = _inputs(7, *case)
  seg = _segments(rng, 1, 14)
  cot = rng.normal(size=q.shape).astype(np.float32)
  as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  q, k, v, cot = (as_bf16(x) for x in (q, k, v, cot))
  _, want = _fwd_and_grads("xla", seg, (q, k, v, *weights), cot)
  bf16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  cot_b = jnp.asarray(cot, jnp.bfloat16)
  _, ref = _fwd_and_grads("xla", seg, (*bf16, *weights), cot_b)
  _, got = _fwd_and_grads(_register(8, 8), seg, (*bf16, *weights), cot_b)
  names = ("q", "k", "v") + tuple(f"weight{i}" for i, w in enumerate(weights) if w is not None)
  assert len(got) == len(ref) == len(want) == len(names)
  for name, g, r, w in zip(names, got, ref, want):
    assert g.dtype == r.dtype, name
    w = np.asarray(w, np.float64)
    err = np.abs(np.asarray(g, np.float64) - w).max()
    ref_err = np.abs(np.asarray(r, np.float64) - w).max()
    assert ref_err > 0, name  # bf16 rounding is visible: the comparison means something
    assert err <= 1.5 * ref_err + 1e-6, (name, err, ref_err)


def test_dropout_and_bad_blocks_raise():
  (q, k, v), _, _ = _inputs(1, 1, 8, None, None, 1, None)
  with pytest.raises(ValueError, match="no attention dropout"):
    multi_token_attention(q, k, v, implementation="pallas", dropout_rate=0.1,
                              dropout_rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="multiple of 8"):
    ops_pallas.make_pallas(block_q=12)


# ---------------------------------------------------------------------------------------------
# TPU ahead-of-time compile (Mosaic) from this host.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
  """One MTA attention for the TPU compile: shapes and which ops are on."""
  heads: int = 4
  head_dim: int = 128
  length: int = 4096
  pre: tuple | None = (2, 3)
  post: tuple | None = (2, 3)
  c_h: int = 2


# The paper's 880M MTA layer: 16 heads of 96, 6 x 11 pre and post convs, all 16 heads mixed.
PAPER_880M = Layer(heads=16, head_dim=96, length=2048, pre=(6, 11), post=(6, 11), c_h=16)


def _tpu_compile(topology: str, layer: Layer, with_grad: bool):
  """Compiles MTA (or grad(sum(MTA))) under shard_map for a TPU topology, ahead of time."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = Mesh(np.array(devices), ("data",))
  heads = layer.heads
  sds = lambda shape, spec, dt=jnp.float32: jax.ShapeDtypeStruct(
      shape, dt, sharding=NamedSharding(mesh, spec))
  x = sds((len(devices), layer.length, heads, layer.head_dim), P("data"), jnp.bfloat16)
  kern = lambda c: None if c is None else sds((heads, *c), P())
  mix = sds((heads // layer.c_h, layer.c_h, layer.c_h), P())
  weights = (kern(layer.pre), kern(layer.post), mix, mix if layer.post else None)
  live = tuple(w for w in weights if w is not None)
  seg = sds((len(devices), layer.length), P("data"), jnp.int32)

  def local(q, k, v, seg, *ws):
    it = iter(ws)
    kp, kpo, mp, mpo = (None if w is None else next(it) for w in weights)
    return multi_token_attention(q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo,
                                 head_mix_pre=mp, head_mix_post=mpo, segment_ids=seg,
                                 implementation="pallas")

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4 + (P(),) * len(live),
                          out_specs=P("data"), check_vma=False)
  fn = sharded
  if with_grad:  # value and gradient: a bare gradient of a sum would not need the forward
    grad_args = (0, 1, 2) + tuple(range(4, 4 + len(live)))
    fn = jax.value_and_grad(lambda *a: sharded(*a).astype(jnp.float32).sum(), argnums=grad_args)
  return jax.jit(fn).lower(x, x, x, seg, *live).compile()


def _assert_mosaic_and_no_txt_buffer(compiled, layer: Layer, n_kernels: int):
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') >= n_kernels
  # No array in the compiled program has two dimensions of length >= T ...
  shapes = re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([0-9,]+)\]", text)
  assert shapes
  square = [s for s in shapes if sum(int(d) >= layer.length for d in s.split(",")) >= 2]
  assert not square, square[:5]
  # ... and the scratch is below one shard's [B, H, T, T] float32 logits (local batch 1).
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < layer.heads * layer.length * layer.length * 4, temp


NO_POST = Layer(post=None)  # no post-softmax ops: online forward, no dpost pass


@pytest.mark.parametrize("topology,layer,with_grad,n_kernels", [
    ("v5e:2x2", Layer(), False, 2),           # lse pass + output pass
    pytest.param("v5p:2x2x1", Layer(), False, 2, marks=pytest.mark.slow),
    pytest.param("v5e:2x2", Layer(), True, 5, marks=pytest.mark.slow),  # + dpost, dq, dkv
    pytest.param("v5p:2x2x1", Layer(), True, 5, marks=pytest.mark.slow),
    pytest.param("v5e:2x2", NO_POST, True, 3, marks=pytest.mark.slow),  # output, dq, dkv
    pytest.param("v5e:2x2", PAPER_880M, False, 2, marks=pytest.mark.slow),
    pytest.param("v5e:2x2", PAPER_880M, True, 5, marks=pytest.mark.slow),
    pytest.param("v5e:2x2", dataclasses.replace(PAPER_880M, post=None), True, 3,
                 marks=pytest.mark.slow),
], ids=["v5e-fwd", "v5p-fwd", "v5e-kernelbwd", "v5p-kernelbwd", "v5e-nopost-kernelbwd",
        "v5e-880m-fwd", "v5e-880m-kernelbwd", "v5e-880m-nopost-kernelbwd"])
def test_tpu_aot_compile_has_mosaic_kernel_and_no_txt_buffer(topology, layer, with_grad,
                                                            n_kernels):
  compiled = _tpu_compile(topology, layer, with_grad)
  _assert_mosaic_and_no_txt_buffer(compiled, layer, n_kernels)
  # The kernels tell XLA their work (cost estimates): its count for one chip's shard (batch 1)
  # is theirs plus the little XLA work around them (window gathers, reductions).
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  h = layer.heads
  kern = lambda c: None if c is None else sds(h, *c)
  mix = sds(h // layer.c_h, layer.c_h, layer.c_h)
  want = ops_pallas.kernel_flops(sds(1, layer.length, h, layer.head_dim), kern(layer.pre),
                                 kern(layer.post), mix, mix if layer.post else None,
                                 backward=with_grad)
  assert want <= compiled.cost_analysis()["flops"] < 1.1 * want


# ---------------------------------------------------------------------------------------------
# The model with implementation="pallas" (under shard_map over batch and heads).
# ---------------------------------------------------------------------------------------------


def test_model_with_pallas_equals_chunked_on_a_mesh():
  """One MTA layer (every stage, c_h = 2, heads split over tensor = 2), logits and gradients."""
  from flax import nnx

  from mta_jax import sharding
  from mta_jax.config import AttentionConfig, ModelConfig
  from mta_jax.model import TransformerLM

  attn = AttentionConfig(pre_conv=True, post_conv=True, c_q=3, c_k=5, post_c_q=2, post_c_k=3,
                         kq_layers=(0,), head_mix_pre=True, head_mix_post=True, c_h=2,
                         group_norm=True)
  cfg = lambda impl: ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_len=32,
                                 attention=dataclasses.replace(attn, implementation=impl))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 61, (4, 13)), jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 8] * 2 + [[3] * 13] * 2, jnp.int32)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])

  def loss_and_grads(impl):
    model = TransformerLM(cfg(impl), rngs=nnx.Rngs(0))
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post"):
      p = getattr(model.blocks[0].attn, name)
      p[...] = jnp.asarray(rng_w.normal(size=p.shape) * 0.5, p[...].dtype)
    loss = lambda m: m(tokens, segment_ids=seg).astype(jnp.float32).std()
    with jax.set_mesh(mesh):
      return nnx.jit(nnx.value_and_grad(loss))(model)

  rng_w = np.random.default_rng(1)
  want_loss, want_grads = loss_and_grads("chunked")
  rng_w = np.random.default_rng(1)
  got_loss, got_grads = loss_and_grads("pallas")
  _assert_close(got_loss, want_loss, FWD_TOL)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    _assert_close(got, want, GRAD_TOL)
