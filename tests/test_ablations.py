"""The ablation grid: every variant builds (abstract shapes) at the CPU size and a paper size with
the parameter count its settings imply; invalid ones are clear errors; the config file."""

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import ablations
from mta_jax.config import AttentionConfig, ConfigError, ModelConfig
from mta_jax.model import TransformerLM, count_params

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def implied_count(m: ModelConfig, baseline_count: int) -> int:
  """Baseline parameters + the MTA weights the settings switch on (paper Sec. 3)."""
  a, h, hd = m.attention, m.n_heads, m.resolved_head_dim
  conv = len(m.kq_layer_indices()) * h * (a.pre_conv * a.c_q * a.c_k
                                          + a.post_conv * a.post_c_q * a.post_c_k)
  mix = m.n_layers * (a.head_mix_pre + a.head_mix_post) * h * m.resolved_c_h
  norm = m.n_layers * a.group_norm * (hd + (hd + 1) * (a.norm_scaling == "gate"))
  return baseline_count + conv + mix + norm


@pytest.mark.parametrize("size,subset", [
    ("cpu", None),
    ("880m", ("kernel_8x13", "kq_layers_2", "c_h_1")),  # a paper size, a few (fast)
    pytest.param("880m", None, marks=pytest.mark.slow),
    pytest.param("550m", None, marks=pytest.mark.slow),
])
def test_every_variant_builds_with_its_implied_parameter_count(size, subset):
  base = ablations.base_model(size)
  baseline_count = count_params(dataclasses.replace(base, attention=AttentionConfig()))
  valid = ablations.variants_for(size)
  counts = {}
  for v in subset or valid:
    m = ablations.variant_model(size, v)
    counts[v] = count_params(m)
    assert counts[v] == implied_count(m, baseline_count), v
  if subset is None:
    assert counts["no_group_norm"] < counts["full"] < counts["kernel_8x13"]
  if size == "880m":  # 24 layers, 16 heads: every variant fits
    assert len(valid) == len(ablations.VARIANTS)
    assert subset or counts["full"] == 876_583_320
    assert ablations.variant_model(size, "kq_layers_6").kq_layer_indices() == tuple(
        range(2, 24, 4))  # the paper's default placement
    assert ablations.variant_model(size, "kq_layers_2").kq_layer_indices() == (6, 18)
    assert len(ablations.variant_model(size, "kq_layers_12").kq_layer_indices()) == 12


def test_variants_change_what_they_name():
  m = ablations.variant_model("880m", "kernel_4x9").attention
  assert (m.c_q, m.c_k, m.post_c_q, m.post_c_k) == (4, 9, 4, 9)
  assert not ablations.variant_model("880m", "no_post_conv").attention.post_conv
  a = ablations.variant_model("880m", "init_const").attention
  assert (a.init, a.init_const) == ("const", 0.3)
  assert ablations.variant_model("cpu", "gate_zero").attention.gate_init == "zero"
  assert ablations.variant_model("cpu", "full") == ablations.cpu_model()


def test_invalid_variants_are_clear_errors():
  assert "kq_layers_6" not in ablations.variants_for("cpu")  # 4 layers
  with pytest.raises(ConfigError, match="do not fit in model.n_layers=4"):
    ablations.variant_model("cpu", "kq_layers_6")
  with pytest.raises(ConfigError, match="do not divide model.n_heads=10"):
    ablations.variant_model("550m", "c_h_4")
  with pytest.raises(ConfigError, match="unknown ablation variant 'no_conv'"):
    ablations.variant_model("cpu", "no_conv")
  with pytest.raises(ConfigError, match="use <size>_<variant>"):
    ablations.parse("2b_full")


def test_config_file_and_cpu_base_match_lm_tiny():
  from configs import ablations as ablation_configs, lm_tiny
  cfg = ablation_configs.get_config("cpu_no_head_mix")
  assert cfg.name == "ablation_cpu_no_head_mix" and not cfg.model.attention.head_mix_pre
  assert lm_tiny.get_config("mta").model == ablations.cpu_model()
  cfg = ablation_configs.get_config("300m_kernel_8x13")
  assert cfg.model.dtype == "bfloat16" and cfg.model.attention.c_k == 13
  with pytest.raises(ConfigError, match="unknown ablation variant"):
    ablation_configs.get_config("cpu_kernel_3x3")


def test_inv_sqrt_layer_norm_scaling():
  cfg = dataclasses.replace(ablations.variant_model("cpu", "norm_inv_sqrt_layer"),
                            vocab_size=17, d_model=16)
  attn = TransformerLM(cfg, rngs=nnx.Rngs(0)).blocks[3].attn
  o = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 4)), jnp.float32)
  rms = o / np.sqrt(np.mean(np.square(o), axis=-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(attn.group_norm(o), rms / 2.0, rtol=1e-5, atol=1e-6)  # 1/sqrt(4)
