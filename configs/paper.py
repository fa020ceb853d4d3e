"""The paper's language-model runs (docs/MTA.md Sec. 10; paper Table 7) as TrainConfigs.

Used by `configs/paper_<size>_<family>.py`; size 300m / 550m / 880m / 1b, family baseline /
talking_heads / mta. Training: context 2048, 128 rows x 2048 = 262,144 tokens per step,
AdamW lr 1.5e-4, betas (0.9, 0.98), wd 0.05, clip 1.0, warmup 375 then linear decay to 0,
105B tokens (~400k steps). bf16 compute with fp32 parameters and optimizer state; parameters and
optimizer state sharded over `fsdp` (all devices by default).

Data: the paper trains on SlimPajama with the Llama-3 tokenizer (vocab 128,256); point
data.source / data.tfds_name or data.source=text / data.tokenizer at your copy (see README).
"""

from mta_jax.config import (CheckpointConfig, DataConfig, MeshConfig, OptimConfig, TrainConfig,
                            paper_model)

TOKENS = 105_000_000_000
SEQ_LEN = 2048
BATCH = 128


def get(size: str, family: str, arg=None) -> TrainConfig:
  del arg
  model = paper_model(size, family)
  model.dtype = "bfloat16"
  model.param_dtype = "float32"
  model.remat = True
  return TrainConfig(
      model=model,
      data=DataConfig(source="text", seq_len=SEQ_LEN, batch_size=BATCH, packing="concat"),
      optim=OptimConfig(lr=1.5e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, clip_norm=1.0,
                        schedule="linear", warmup_steps=375),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      checkpoint=CheckpointConfig(every_steps=2000, keep_last=3, keep_every=50_000),
      steps=TOKENS // (SEQ_LEN * BATCH),
      eval_every=5000, eval_steps=100, log_every=50,
      name=f"paper_{size}_{family}",
  )
