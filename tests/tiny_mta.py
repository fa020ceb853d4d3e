"""The one factory for the tiny all-features MTA attention the tests build models with."""

from mta_jax.config import AttentionConfig


def attention(**overrides) -> AttentionConfig:
  """Every MTA part on: pre/post key-query convs (2 x 3 kernels, layer 1), head mixing before
  and after softmax in groups of 2 heads, gated group norm. Tests override what they vary."""
  kw = dict(pre_conv=True, post_conv=True, c_q=2, c_k=3, post_c_q=2, post_c_k=3, kq_layers=(1,),
            head_mix_pre=True, head_mix_post=True, c_h=2, group_norm=True)
  kw.update(overrides)
  return AttentionConfig(**kw)
