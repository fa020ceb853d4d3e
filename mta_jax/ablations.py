"""The paper's ablation grid (Table 5 and the MTA design sweeps) as named variants of ONE base.

Every variant is a function ModelConfig -> ModelConfig applied to the MTA family at a size
("300m" / "550m" / "880m" / "1b", or "cpu", the tiny model of configs/lm_tiny.py); nothing is
copied. `configs/ablations.py:<size>_<variant>` turns one into a TrainConfig:

    python train.py --config=configs/ablations.py:880m_no_post_conv --mode=count_params
    python train.py --config=configs/ablations.py:cpu_kernel_4x9 --config.steps=50

Variants (`VARIANTS`):
  full                         the MTA family itself (pre + post key-query conv 6x11 on every 4th
                               layer, pre + post head mixing over all heads, gated group norm)
  no_pre_conv / no_post_conv / no_kq_conv        drop the pre / post / both key-query convs
  no_head_mix_pre / no_head_mix_post / no_head_mix
  no_group_norm                group norm off (and with it the gate)
  norm_depth                   group norm scaled by 1 - lambda(l) (v1) instead of the gate
  norm_none                    group norm without any scaling
  norm_inv_sqrt_layer          group norm scaled by 1/sqrt(l + 1) ("LayerNorm scaling")
  gate_zero                    the gate's weight starts at zero instead of truncated normal
  kernel_4x9 / kernel_6x11 / kernel_8x13         c_q x c_k of both key-query convs
  kq_layers_2 / _4 / _6 / _12  the convs on that many layers, spread evenly (of 24: 6 is the
                               default placement 2, 6, ..., 22); needs k <= n_layers
  c_h_1 / _2 / _4 / _8 / _16   head-mixing group size; needs c_h to divide n_heads
  init_zero / init_const       MTA weights start at 0 / at 0.3 instead of identity

`variants_for(size)` lists those that are valid at a size (kq_layers_k and c_h_n depend on the
depth and the head count); the others raise ConfigError naming the reason.
"""

import dataclasses
from typing import Callable

from mta_jax.config import (ConfigError, ModelConfig, PAPER_SIZES, attention_family, paper_model,
                            validate_model)

SIZES = ("cpu",) + tuple(PAPER_SIZES)


def _attn(**changes) -> Callable[[ModelConfig], ModelConfig]:
  def apply(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, attention=dataclasses.replace(m.attention, **changes))
  return apply


def _kq_layers(k: int) -> Callable[[ModelConfig], ModelConfig]:
  def apply(m: ModelConfig) -> ModelConfig:
    if k > m.n_layers:
      raise ConfigError(f"ablation kq_layers_{k}: {k} key-query-conv layers do not fit in "
                        f"model.n_layers={m.n_layers}.")
    # k layers spread evenly, at the centre of each of k equal spans (24 layers, k = 6: layer
    # 2, 6, ..., 22, the paper's default placement).
    layers = tuple(int((i + 0.5) * m.n_layers / k) for i in range(k))
    return _attn(kq_layers=layers)(m)
  return apply


def _c_h(c: int) -> Callable[[ModelConfig], ModelConfig]:
  def apply(m: ModelConfig) -> ModelConfig:
    if m.n_heads % c:
      raise ConfigError(f"ablation c_h_{c}: head-mixing groups of {c} do not divide "
                        f"model.n_heads={m.n_heads}.")
    return _attn(c_h=c)(m)
  return apply


def _kernel(c_q: int, c_k: int) -> Callable[[ModelConfig], ModelConfig]:
  return _attn(c_q=c_q, c_k=c_k, post_c_q=c_q, post_c_k=c_k)


VARIANTS: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "full": lambda m: m,
    "no_pre_conv": _attn(pre_conv=False),
    "no_post_conv": _attn(post_conv=False),
    "no_kq_conv": _attn(pre_conv=False, post_conv=False),
    "no_head_mix_pre": _attn(head_mix_pre=False),
    "no_head_mix_post": _attn(head_mix_post=False),
    "no_head_mix": _attn(head_mix_pre=False, head_mix_post=False),
    "no_group_norm": _attn(group_norm=False),
    "norm_depth": _attn(norm_scaling="depth"),
    "norm_none": _attn(norm_scaling="none"),
    "norm_inv_sqrt_layer": _attn(norm_scaling="inv_sqrt_layer"),
    "gate_zero": _attn(gate_init="zero"),
    "kernel_4x9": _kernel(4, 9),
    "kernel_6x11": _kernel(6, 11),
    "kernel_8x13": _kernel(8, 13),
    **{f"kq_layers_{k}": _kq_layers(k) for k in (2, 4, 6, 12)},
    **{f"c_h_{c}": _c_h(c) for c in (1, 2, 4, 8, 16)},
    "init_zero": _attn(init="zero"),
    "init_const": _attn(init="const", init_const=0.3),
}


def cpu_model() -> ModelConfig:
  """The CPU-size base: configs/lm_tiny.py's model (d_model 64, 4 layers, 4 heads) as MTA."""
  return ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, max_len=128,
                     rope_theta=1e4, attention=attention_family("mta"))


def base_model(size: str) -> ModelConfig:
  if size == "cpu":
    return cpu_model()
  if size not in PAPER_SIZES:
    raise ConfigError(f"unknown ablation size {size!r}; choose one of {SIZES}.")
  return paper_model(size, "mta")


def apply_variant(model: ModelConfig, variant: str) -> ModelConfig:
  """`model` (an MTA ModelConfig) with `variant` applied; ConfigError if unknown / invalid."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown ablation variant {variant!r}; choose one of "
                      f"{', '.join(VARIANTS)}.")
  out = VARIANTS[variant](dataclasses.replace(model, attention=dataclasses.replace(
      model.attention)))
  validate_model(out)
  return out


def variant_model(size: str, variant: str) -> ModelConfig:
  return apply_variant(base_model(size), variant)


def variants_for(size: str) -> tuple[str, ...]:
  """The variants that are valid at `size`."""
  valid = []
  for v in VARIANTS:
    try:
      variant_model(size, v)
    except ConfigError:
      continue
    valid.append(v)
  return tuple(valid)


def parse(arg: str) -> tuple[str, str]:
  """'880m_no_post_conv' -> ('880m', 'no_post_conv'); the size comes first."""
  size, _, variant = str(arg or "").partition("_")
  if size not in SIZES or not variant:
    raise ConfigError(f"ablation {arg!r}: use <size>_<variant> with size one of {SIZES} and "
                      f"variant one of {', '.join(VARIANTS)} (e.g. cpu_no_post_conv).")
  return size, variant
