"""The motivating toy task (docs/MTA.md Sec. 11; paper Sec. 4.1): find the block holding all query
letters and output it. `python train.py` (no arguments) runs this file's default.

Variant string: `<family>[_n<N>][_<all|first|last>][_paper]`, parts in any order, e.g.

    configs/toy.py                       MTA, N=5, "first", reduced scale (the default run)
    configs/toy.py:baseline              the Transformer, same data and budget
    configs/toy.py:mta_n8_all            MTA, N=8, answer = the whole block
    configs/toy.py:baseline_n5_last_paper    the paper's full scale (52 blocks, 100k steps)

Model (paper): 4 layers, 2 heads, D 256; MTA = key-query conv with c_q=2, c_k=2N-1, pre-softmax
only, on every layer, no head mixing, no group norm; batch 64, 100k steps (the learning rate is
not given; the _paper variants use 1e-4).

The reduced scale (REDUCED below, the default; about 6 minutes on a 2-core CPU) keeps the task
and the MTA settings and shrinks the number of blocks, the width and the number of steps.
README.md lists it with the error rates measured at it. The MTA configs use the exact "chunked"
implementation of the MTA op (the same numbers as the reference, faster on CPU).
"""

from mta_jax.config import (AttentionConfig, CheckpointConfig, DataConfig, ModelConfig,
                            OptimConfig, ToyConfig, TrainConfig)
from mta_jax.data.toy import toy_sample_length

FAMILIES = ("mta", "baseline")
VARIANTS = ("all", "first", "last")

# The reduced scale of the default run (see README "Toy task").
REDUCED = dict(n_blocks=6, d_model=64, n_layers=4, n_heads=2, batch_size=64, steps=3000,
               lr=3e-3, warmup=100)
# The paper's scale (docs/MTA.md Sec. 11; paper Sec. 4.1).
PAPER = dict(n_blocks=52, d_model=256, n_layers=4, n_heads=2, batch_size=64, steps=100_000,
             lr=1e-4, warmup=1000)


def sample_length(block_len: int, n_query: int, n_blocks: int, variant: str) -> int:
  """Positions one sample needs: blocks '.'-joined, '#', query, answer (eos is a target only)."""
  return toy_sample_length(block_len, n_query, n_blocks, variant)


def parse(arg) -> tuple[str, int, str, bool]:
  family, n, variant, paper = "mta", 5, "first", False
  for part in (str(arg).lower().replace(",", "_").split("_") if arg else []):
    if part in FAMILIES:
      family = part
    elif part in VARIANTS:
      variant = part
    elif part == "paper":
      paper = True
    elif part.startswith("n") and part[1:].isdigit():
      n = int(part[1:])
    elif part:
      raise ValueError(f"configs/toy.py: unknown variant part {part!r} in {arg!r}; use "
                       f"<{'|'.join(FAMILIES)}>_n<N>_<{'|'.join(VARIANTS)}>[_paper].")
  return family, n, variant, paper


def get_config(arg=None) -> TrainConfig:
  family, n, variant, paper = parse(arg)
  s = PAPER if paper else REDUCED
  toy = ToyConfig(block_len=n, n_query=2, n_blocks=s["n_blocks"], variant=variant,
                  n_train=1_000_000, n_test=1_000, seed=0)
  if family == "mta":
    # kq_every=1 from layer 0: the conv on every layer (also after --config.model.n_layers=...)
    attention = AttentionConfig(pre_conv=True, c_q=2, c_k=2 * n - 1, kq_every=1, kq_offset=0,
                                implementation="chunked")
  else:
    attention = AttentionConfig()
  seq_len = sample_length(n, 2, s["n_blocks"], variant)
  model = ModelConfig(vocab_size=32, d_model=s["d_model"], n_layers=s["n_layers"],
                      n_heads=s["n_heads"], max_len=seq_len, rope_theta=1e4,
                      attention=attention)
  return TrainConfig(
      model=model,
      data=DataConfig(source="toy", seq_len=seq_len, batch_size=s["batch_size"],
                      eval_batch_size=200, toy=toy, seed=0),
      optim=OptimConfig(lr=s["lr"], b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0,
                        schedule="linear", warmup_steps=s["warmup"]),
      checkpoint=CheckpointConfig(every_steps=0 if not paper else 5000),
      steps=s["steps"],
      eval_every=s["steps"] // 6,
      log_every=100,
      seed=0,
      name=f"toy_{family}_n{n}_{variant}{'_paper' if paper else ''}",
  )
