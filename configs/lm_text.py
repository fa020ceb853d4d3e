"""A small language model on real text: your own corpus prepared with `mta_jax.data.prepare`, or a
TFDS dataset in array_record format. The data path, tokenizer and vocabulary come from the
command line (README, "Training on your own text / on a TFDS dataset"):

    python train.py --config=configs/lm_text.py:mta --workdir=runs/my_corpus \
        --config.data.path=data/my_corpus --config.data.tokenizer=tok/my_sp.model \
        --config.model.vocab_size=32000

Variants: `baseline`, `talking_heads`, `mta` (default), `diff` (DIFF Transformer: half the
heads at twice the width). The model is a ~20M-parameter-class
Transformer (d_model 384, 6 layers, 6 heads) with the paper's MTA placement (key-query convs on
layer 2, head mixing and gated group norm on all layers); scale it with --config.model.* or use
a `configs/paper_<size>_<family>.py` preset with the same data flags.
"""

from mta_jax.config import (CheckpointConfig, DataConfig, FAMILIES, ModelConfig, OptimConfig,
                            TrainConfig, family_model)


def get_config(arg=None) -> TrainConfig:
  family = arg or "mta"
  if family not in FAMILIES:
    raise ValueError(f"configs/lm_text.py:{family} is unknown; choose one of {FAMILIES}.")
  model = family_model(ModelConfig(vocab_size=32000, d_model=384, n_layers=6, n_heads=6,
                                   max_len=512, rope_theta=1e5), family)
  return TrainConfig(
      model=model,
      data=DataConfig(source="text", path="", tokenizer="", seq_len=512, batch_size=32,
                      train_split="train", eval_split="validation", text_key="text",
                      packing="concat", shuffle=True, seed=0, workers=2, prefetch=2),
      optim=OptimConfig(lr=1e-3, warmup_steps=375, weight_decay=0.05, clip_norm=1.0),
      checkpoint=CheckpointConfig(every_steps=1000),
      steps=20_000, eval_every=1000, eval_steps=50, log_every=50,
      name=f"lm_text_{family}",
  )
