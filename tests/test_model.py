"""The NNX attention module and the Transformer LM: equivalences, placement, presets, counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_mta
from mta_jax import attention as attention_lib
from mta_jax.config import (AttentionConfig, ConfigError, ModelConfig, attention_family,
                            paper_model)
from mta_jax.model import TransformerLM, count_params

VOCAB = 61


FULL_MTA = tiny_mta.attention(c_q=3, c_k=5, kq_layers=(0, 2))


def tiny(attention: AttentionConfig = FULL_MTA, **kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, max_len=64,
              attention=attention)
  base.update(kw)
  return ModelConfig(**base)


def _tokens(b=2, t=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def _randomise_mta(model, seed=1):
  """Random (non-identity) MTA weights, so that equivalence tests cannot pass by accident."""
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post", "gate_w"):
      p = getattr(block.attn, name, None)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5, p[...].dtype)
  return model


def test_identity_mta_model_equals_baseline():
  """All MTA weights at identity (group norm off): the MTA model IS its Transformer."""
  mta_attn = dataclasses.replace(FULL_MTA, group_norm=False)
  base = TransformerLM(tiny(AttentionConfig()), rngs=nnx.Rngs(0))
  mta = TransformerLM(tiny(mta_attn), rngs=nnx.Rngs(1))
  nnx.update(mta, nnx.state(base, nnx.Param))  # same non-MTA weights
  tokens = _tokens()
  want = base(tokens)
  np.testing.assert_allclose(mta(tokens), want, rtol=1e-5, atol=1e-5)
  # ... and the equality is not vacuous: perturbing one conv tap changes the output.
  mta.blocks[0].attn.kq_pre[...] = mta.blocks[0].attn.kq_pre[...].at[0, 0, 0].set(0.5)
  assert np.abs(np.asarray(mta(tokens) - want)).max() > 1e-4  # 10x the tolerance above


def test_group_norm_gate_starts_at_one_half_and_depth_scaling():
  cfg = tiny(dataclasses.replace(FULL_MTA, group_norm=True, norm_scaling="gate"))
  attn = TransformerLM(cfg, rngs=nnx.Rngs(0)).blocks[1].attn
  o = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4, 8)), jnp.float32)
  rms = o / np.sqrt(np.mean(np.square(o), axis=-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(attn.group_norm(o), 0.5 * rms, rtol=1e-5, atol=1e-6)
  attn.gate_w[...] = jnp.arange(8.0) / 8
  attn.gate_b[...] = jnp.asarray(0.3)
  gate = 1 / (1 + np.exp(-(np.einsum("bthk,k->bth", rms, np.arange(8.0) / 8) + 0.3)))
  np.testing.assert_allclose(attn.group_norm(o), rms * gate[..., None], rtol=1e-5, atol=1e-6)

  cfg = tiny(dataclasses.replace(FULL_MTA, norm_scaling="depth"))
  attn = TransformerLM(cfg, rngs=nnx.Rngs(0)).blocks[2].attn
  lam = 0.8 - 0.6 * np.exp(-0.3 * 2)
  np.testing.assert_allclose(attn.group_norm(o), rms * (1 - lam), rtol=1e-5, atol=1e-6)
  assert not hasattr(attn, "gate_w")


def test_future_tokens_do_not_change_past_logits():
  model = _randomise_mta(TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0)))
  tokens = _tokens(b=1, t=12)
  ref = np.asarray(model(tokens))
  for j in (3, 7, 11):
    changed = tokens.at[0, j].set((tokens[0, j] + 1) % VOCAB)
    out = np.asarray(model(changed))
    np.testing.assert_array_equal(out[:, :j], ref[:, :j])
    assert np.abs(out[:, j] - ref[:, j]).max() > 0


def test_packed_documents_equal_separate_forwards():
  model = _randomise_mta(TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0)))
  lengths = (5, 2, 9)
  tokens = _tokens(b=1, t=sum(lengths))
  seg = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None], jnp.int32)
  pos = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None], jnp.int32)
  packed = np.asarray(model(tokens, segment_ids=seg, positions=pos))
  start = 0
  for n in lengths:
    alone = np.asarray(model(tokens[:, start:start + n]))
    np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
    start += n


def test_kq_conv_placement_and_families():
  cfg = paper_model("300m", "mta")
  assert cfg.kq_layer_indices() == (2, 6, 10, 14, 18)
  cfg = tiny(dataclasses.replace(FULL_MTA, kq_layers=None, kq_every=2, kq_offset=1), n_layers=5)
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  has = [b.attn.kq_pre is not None for b in model.blocks]
  assert has == [False, True, False, True, False]
  assert all(b.attn.mix_pre is not None and b.attn.mix_post is not None for b in model.blocks)

  th = nnx.eval_shape(lambda: TransformerLM(tiny(attention_family("talking_heads")),
                                            rngs=nnx.Rngs(0)))
  assert all(b.attn.kq_pre is None and b.attn.kq_post is None for b in th.blocks)
  assert all(b.attn.mix_pre.shape == (1, 4, 4) for b in th.blocks)
  assert not hasattr(th.blocks[0].attn, "norm_scale")


@pytest.mark.parametrize("init,expect", [("zero", 0.0), ("const", 0.25)])
def test_ablation_inits(init, expect):
  cfg = tiny(dataclasses.replace(FULL_MTA, init=init, init_const=0.25))
  attn = TransformerLM(cfg, rngs=nnx.Rngs(0)).blocks[0].attn
  for p in (attn.kq_pre, attn.kq_post, attn.mix_pre, attn.mix_post):
    np.testing.assert_array_equal(p[...], np.full(p.shape, expect, np.float32))
  assert float(attn.gate_b[...]) == 0.0


def test_every_parameter_has_logical_axes():
  model = nnx.eval_shape(lambda: TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.shape), path


def test_paper_880m_parameter_counts_are_exact():
  assert count_params(paper_model("880m", "baseline")) == 876_553_728
  assert count_params(paper_model("880m", "mta")) == 876_583_320


@pytest.mark.parametrize("size", ["300m", "550m", "1b"])
def test_paper_mta_overhead_matches_formula(size):
  base, mta = paper_model(size, "baseline"), paper_model(size, "mta")
  h, hd, n = base.n_heads, base.resolved_head_dim, base.n_layers
  conv_layers = len(mta.kq_layer_indices())
  extra = conv_layers * 2 * h * 6 * 11 + n * 2 * h * h + n * (hd + hd + 1)
  assert count_params(mta) - count_params(base) == extra


def test_remat_bf16_and_dropout():
  tokens = _tokens()
  model = _randomise_mta(TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0)))
  remat = _randomise_mta(TransformerLM(tiny(FULL_MTA, remat=True), rngs=nnx.Rngs(0)))

  def loss(m):
    return jnp.mean(m(tokens) ** 2)

  g1 = nnx.grad(loss)(model)
  g2 = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  bf16 = TransformerLM(tiny(FULL_MTA, dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = bf16(tokens)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()

  drop = TransformerLM(tiny(dataclasses.replace(FULL_MTA, dropout=0.3)), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(drop(tokens), drop(tokens))  # no rng: deterministic
  assert np.abs(np.asarray(drop(tokens, dropout_rng=jax.random.key(0)) - drop(tokens))).max() > 0


@pytest.mark.parametrize("change,field", [
    (dict(attention=dataclasses.replace(FULL_MTA, c_k=4)), "model.attention.c_k"),
    (dict(attention=dataclasses.replace(FULL_MTA, c_h=3)), "model.attention.c_h"),
    (dict(attention=dataclasses.replace(FULL_MTA, kq_layers=(5,))), "kq_layers"),
    (dict(attention=dataclasses.replace(FULL_MTA, norm_scaling="soft")), "norm_scaling"),
    (dict(attention=dataclasses.replace(FULL_MTA, implementation="cuda")), "implementation"),
    (dict(attention=dataclasses.replace(FULL_MTA, implementation="pallas", dropout=0.1)),
     "model.attention.dropout"),
    (dict(d_model=30), "model.d_model"),
    (dict(dtype="float16"), "model.dtype"),
])
def test_bad_model_config_names_the_field(change, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    TransformerLM(tiny(**{"attention": FULL_MTA, **change}), rngs=nnx.Rngs(0))


def test_bad_call_arguments():
  model = TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len=64"):
    model(_tokens(t=65))
  with pytest.raises(ValueError, match="segment_ids must have the tokens' shape"):
    model(_tokens(), segment_ids=jnp.zeros((2, 3), jnp.int32))


def test_depth_scale_values():
  assert attention_lib.depth_scale(0) == pytest.approx(1 - 0.2)
  assert attention_lib.depth_scale(10) == pytest.approx(1 - (0.8 - 0.6 * np.exp(-3.0)))


def test_attention_maps_and_pictures(tmp_path):
  from mta_jax import viz
  model = _randomise_mta(TransformerLM(tiny(FULL_MTA), rngs=nnx.Rngs(0)))
  tokens = _tokens(b=1, t=10)
  maps = model.attention_maps(tokens)
  assert len(maps) == 3 and maps[0].shape == (1, 4, 10, 10)
  # Weights are causal; with post-softmax ops rows need not sum to one, without them they do.
  assert np.all(np.triu(np.asarray(maps[0][0, 0]), 1) == 0)
  base = TransformerLM(tiny(AttentionConfig()), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(base.attention_maps(tokens)[1]).sum(-1), 1.0, rtol=1e-6)
  png = viz.plot_attention_maps(maps, str(tmp_path / "maps.png"), labels=list("abcdefghij"))
  kernels = viz.plot_kernels(model, str(tmp_path / "kernels.png"))
  for path in (png, kernels):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert viz.plot_kernels(base, str(tmp_path / "none.png")) is None
