"""The paper's Table 1 (toy task) at a CPU scale: Transformer vs MTA, N = 5 / 8, All / First /
Last, 3 seeds.

    python -m mta_jax.sweep configs/sweeps/table1_toy.py --launch=local

CPU scale (the toy task unchanged otherwise: same generator, 2 query letters, loss on the answer
only, MTA = pre-softmax key-query conv c_q=2, c_k=2N-1 on every layer, no head mixing, no group
norm): 4 blocks per sample (paper: 52 at N=5), d_model 32 (paper 256), 2 layers (paper 4),
2 heads, batch 64, 300 steps (paper 100k) at lr 5e-3 (warmup 30, linear decay), held-out error
on 500 sequences.
"""

from configs.toy import sample_length
from mta_jax.sweep import Run, Sweep

N_BLOCKS, STEPS = 4, 300


def get_sweep() -> Sweep:
  runs = []
  for n in (5, 8):
    for variant in ("all", "first", "last"):
      seq_len = sample_length(n, 2, N_BLOCKS, variant)
      for family in ("baseline", "mta"):
        runs.append(Run(
            name=f"{family}_n{n}_{variant}", config=f"configs/toy.py:{family}_n{n}_{variant}",
            overrides={"data.toy.n_blocks": N_BLOCKS, "data.seq_len": seq_len,
                       "model.max_len": seq_len}))
  common = {"model.d_model": 32, "model.n_layers": 2, "data.batch_size": 64,
            "data.eval_batch_size": 250, "data.toy.n_test": 500, "steps": STEPS,
            "optim.lr": 5e-3, "optim.warmup_steps": 30, "eval_every": STEPS, "log_every": 25,
            "checkpoint.every_steps": 100}
  return Sweep(name="table1_toy", runs=runs, metric="seq_error", seeds=3, overrides=common,
               description=__doc__)
