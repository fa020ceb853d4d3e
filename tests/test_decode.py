"""Incremental decoding equals the full forward at every position (float32, tight tolerance).

Reference: the model's full forward with the "xla" reference op over the same tokens. Decoding:
prefill (chunked op) of various lengths, then one token per step, for baseline, talking-heads
and full MTA models with random (non-identity) MTA weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import decode
from mta_jax.config import AttentionConfig, ModelConfig
from mta_jax.model import TransformerLM

VOCAB = 53
TOL = dict(rtol=2e-5, atol=2e-5)

FULL_MTA = AttentionConfig(pre_conv=True, post_conv=True, c_q=4, c_k=5, post_c_q=3, post_c_k=3,
                           kq_layers=(1,), head_mix_pre=True, head_mix_post=True, c_h=2,
                           group_norm=True, norm_scaling="gate")
FAMILIES = {
    "baseline": AttentionConfig(),
    "talking_heads": AttentionConfig(head_mix_pre=True, head_mix_post=True),
    "mta": FULL_MTA,
    "mta_pre_only": dataclasses.replace(FULL_MTA, post_conv=False, head_mix_post=False,
                                        c_q=3, c_k=7, norm_scaling="depth"),
}


def _model(attention: AttentionConfig, implementation: str = "chunked", seed: int = 0):
  cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=48,
                    attention=dataclasses.replace(attention, implementation=implementation))
  model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  for block in model.blocks:  # random MTA weights, so no equality can hold by accident
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post", "gate_w", "gate_b", "norm_scale"):
      p = getattr(block.attn, name, None)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5 + (name == "norm_scale"), p.dtype)
  return model


CACHE = 24  # one cache length everywhere: tests share compiled functions
_REF_JIT = {}


def _reference(model, tokens, segment_ids=None, positions=None):
  """Full forward with the reference op ("xla"), same parameters (jitted once per config)."""
  cfg = dataclasses.replace(model.cfg, attention=dataclasses.replace(
      model.cfg.attention, implementation="xla"))
  key = repr(cfg)
  if key not in _REF_JIT:
    graphdef, _ = nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(0)))
    _REF_JIT[key] = (graphdef, jax.jit(lambda st, t, s, p: nnx.merge(graphdef, st)(t, s, p)))
  graphdef, fn = _REF_JIT[key]
  _, state = nnx.split(model)
  return np.asarray(fn(state, tokens, segment_ids, positions))


def _tokens(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def _decode_all(dec, tokens, prompt_len, cache_len, segment_ids=None):
  """Logits at every position: prefill of `prompt_len` (0: empty cache), then single steps."""
  batch, total = tokens.shape
  if prompt_len == 0:
    cache = decode.init_cache(nnx.merge(dec.graphdef, dec.state), batch, cache_len)
    outs = []
  else:
    seg = None if segment_ids is None else segment_ids[:, :prompt_len]
    logits, cache = dec.prefill(tokens[:, :prompt_len], cache_len, seg, all_logits=True)
    outs = [np.asarray(logits)]
  for t in range(prompt_len, total):
    logits, cache = dec.step(cache, tokens[:, t])
    outs.append(np.asarray(logits)[:, None])
  return np.concatenate(outs, axis=1), cache


# Prompt lengths: 0 decodes every position by steps (rows above the sequence included); 1 and
# 2 < c_q - 1; 3 = c_q - 1 of FULL_MTA; 7 odd. The cache is longer than needed (empty slots are
# masked). Each length costs one compilation, so the cheaper families get two.
PREFILLS = {"baseline": (0, 5), "talking_heads": (0,), "mta": (0, 3, 7),
            "mta_pre_only": (0, 2)}
SWEEP = (0, 1, 2, 3, 4, 7, 8)


@pytest.mark.parametrize("family", ["baseline", "talking_heads", "mta"])
def test_decode_equals_full_forward_every_position(family):
  _check_family(family, PREFILLS[family])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mta_pre_only"])
def test_decode_equals_full_forward_other_families(family):
  _check_family(family, PREFILLS[family])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_equals_full_forward_prefill_sweep(family):
  _check_family(family, SWEEP)


def _check_family(family, prefills):
  model = _model(FAMILIES[family])
  tokens = _tokens(2, 19)
  want = _reference(model, tokens)
  dec = decode.Decoder(model)
  for prompt_len in prefills:
    got, _ = _decode_all(dec, tokens, prompt_len, cache_len=CACHE)
    np.testing.assert_allclose(got, want, **TOL, err_msg=f"{family} prefill {prompt_len}")


def test_mta_decode_needs_the_cached_rows():
  """The check above cannot pass without the MTA rows: dropping them breaks equality."""
  model = _model(FULL_MTA)
  tokens = _tokens(2, 19, seed=3)
  want = _reference(model, tokens)
  dec = decode.Decoder(model)
  for field in ("pre", "post"):
    _, cache = dec.prefill(tokens[:, :7], CACHE)
    layers = tuple(l.replace(**{field: jnp.zeros_like(getattr(l, field))})
                   if getattr(l, field) is not None else l for l in cache.layers)
    logits, _ = dec.step(cache.replace(layers=layers), tokens[:, 7])
    err = np.abs(np.asarray(logits) - want[:, 7]).max()
    assert err > 20 * TOL["atol"], (field, err)


def test_packed_prompt_with_segment_ids():
  """A prompt of three documents: decoding continues the last one, exactly."""
  model = _model(FULL_MTA, seed=4)
  total, prompt_len = 22, 13
  seg = np.zeros((2, total), np.int32)
  seg[0, 5:] = 1
  seg[0, 9:] = 2       # documents [0, 5), [5, 9), [9, ...)
  seg[1, 2:] = 7       # row 1: [0, 2), then document 7 (ids need not be consecutive)
  seg = jnp.asarray(seg)
  tokens = _tokens(2, total, seed=5)
  want = _reference(model, tokens, seg, decode.positions_from_segments(seg))
  dec = decode.Decoder(model)
  got, _ = _decode_all(dec, tokens, prompt_len, cache_len=CACHE, segment_ids=seg)
  np.testing.assert_allclose(got, want, **TOL)


def test_left_padded_batch_equals_each_prompt_alone():
  model = _model(FULL_MTA, seed=6)
  prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2]]
  cont = _tokens(2, 6, seed=7)
  tokens, seg = decode.pad_prompts(prompts)
  dec = decode.Decoder(model)
  logits, cache = dec.prefill(tokens, CACHE, seg, all_logits=True)
  steps = []
  for t in range(cont.shape[1]):
    out, cache = dec.step(cache, cont[:, t])
    steps.append(np.asarray(out))
  for b, p in enumerate(prompts):
    full = jnp.concatenate([jnp.asarray([p], jnp.int32), cont[b:b + 1]], axis=1)
    want = _reference(model, full)[0]
    np.testing.assert_allclose(np.asarray(logits)[b, -len(p):], want[:len(p)], **TOL)
    np.testing.assert_allclose(np.stack(steps, 0)[:, b], want[len(p):], **TOL)


@pytest.mark.slow
def test_extend_chunks_equal_steps():
  """Several tokens per call (a chunked prefill) give the same logits as one per call."""
  model = _model(FULL_MTA, seed=8)
  tokens = _tokens(2, 19, seed=9)
  want = _reference(model, tokens)
  dec = decode.Decoder(model)
  cache = decode.init_cache(model, 2, CACHE)
  outs = []
  for lo, hi in ((0, 5), (5, 6), (6, 19)):
    logits, cache = dec.extend(cache, tokens[:, lo:hi])
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, 1), want, **TOL)


def test_decode_under_the_training_mesh():
  """Sharded parameters and cache on a (data, fsdp, tensor) = (2, 2, 2) mesh: same logits."""
  from mta_jax import sharding
  model = _model(FULL_MTA, seed=10)
  tokens = _tokens(4, 7, seed=11)
  want = _reference(model, tokens)
  mesh = sharding.make_mesh(2, 2, 2)
  with jax.set_mesh(mesh):
    specs = sharding.state_shardings(nnx.state(model, nnx.Param), mesh)
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), specs))
    decode._JITTED.clear()  # compile for the mesh
    dec = decode.Decoder(model)
    got, cache = _decode_all(dec, tokens, 4, cache_len=8)
  decode._JITTED.clear()
  np.testing.assert_allclose(got, want, **TOL)
  assert len(cache.layers[0].k.sharding.device_set) == 8


def test_bad_requests_are_clear_errors():
  model = _model(FULL_MTA)
  dec = decode.Decoder(model)
  tokens = _tokens(2, 10)
  with pytest.raises(decode.DecodeError, match="cache only 8 slots"):
    dec.prefill(tokens, 8)
  with pytest.raises(decode.DecodeError, match="max_len=48"):
    dec.prefill(tokens, 64)
  cache = decode.init_cache(model, 2, 10).replace(index=jnp.asarray(9, jnp.int32))
  with pytest.raises(decode.DecodeError, match="cache is full"):
    dec.extend(cache, tokens[:, :2])
  with pytest.raises(decode.DecodeError, match="at least one token"):
    decode.pad_prompts([[1, 2], []])


def test_cache_bytes_counts_the_mta_rows():
  model = _model(FULL_MTA)
  cache = decode.init_cache(model, 2, 16)
  b = decode.cache_bytes(cache)
  assert b["kv"] == 2 * 2 * (2 * 4 * 16 * 8) * 4
  # kq layer 1: (c_q - 1) + (c_q' - 1) = 3 + 2 rows of 16 floats per head.
  assert b["mta_rows"] == (2 * 4 * 5 * 16) * 4
