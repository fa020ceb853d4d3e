"""Tiny language-model runs that fit a laptop CPU: the four families of the paper at toy size
(`baseline`, `talking_heads`, `mta`, `diff`).

    python train.py --config=configs/lm_tiny.py:mta            # or :baseline / :talking_heads
    python train.py --config=configs/lm_tiny.py:mta --config.data.source=text \
        --config.data.tokenizer=<spm.model> ...                # real text (see README)

Default data is the synthetic source (uniform random tokens): it exercises the whole pipeline
offline, but there is nothing to learn beyond log(vocab). The MTA family follows the paper's
layout at 4 layers: key-query convs (c_q=6, c_k=11, pre and post) on layer 2, head mixing
(c_h = all heads) and the gated group norm on every layer.
"""

from mta_jax.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig,
                            family_model, FAMILIES)


def get_config(arg=None) -> TrainConfig:
  family = arg or "mta"
  if family not in FAMILIES:
    raise ValueError(f"configs/lm_tiny.py:{family} is unknown; choose one of {FAMILIES}.")
  model = family_model(ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4,
                                   max_len=128, rope_theta=1e4), family)
  return TrainConfig(
      model=model,
      data=DataConfig(source="synthetic", seq_len=128, batch_size=16, seed=0),
      optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.05, clip_norm=1.0),
      checkpoint=CheckpointConfig(every_steps=100),
      steps=200, eval_every=100, eval_steps=4, log_every=20,
      name=f"lm_tiny_{family}",
  )
