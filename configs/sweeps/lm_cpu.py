"""Language modelling at a CPU scale on Python standard-library docstrings: the four families of
the paper (Transformer, DIFF Transformer, talking heads, MTA), a slice of the paper's Table 5
(no post-softmax conv, no head mixing, no group norm, kernel sizes 4x9 / 8x13; "mta" is the full
model with 6x11) and the gate initialisation (normal, the default, vs zero). 2 seeds.

Data (see mta_jax/data/stdlib_docs.py for exactly which files):
    python -m mta_jax.data.stdlib_docs --output=data/stdlib_docs.jsonl
    python -m mta_jax.data.prepare --input=data/stdlib_docs.jsonl --output=data \
        --name=stdlib_docs --validation_fraction=0.05
    python -m mta_jax.data.tokenizer --data=data/stdlib_docs --output=data/stdlib_sp \
        --vocab_size=2000
Then:
    python -m mta_jax.sweep configs/sweeps/lm_cpu.py --launch=local

Model: configs/lm_tiny.py (d_model 64, 4 layers, 4 heads; DIFF: 2 heads of 32; MTA: key-query
convs on layer 2, head mixing and gated group norm on all layers), vocabulary 2000, 64-token
rows, batch 16, 300 steps (~300k tokens) at lr 3e-3; validation perplexity on 10 batches
(10,240 tokens) of the held-out 5% of modules.
"""

from mta_jax.sweep import Run, Sweep

STEPS = 300
TEXT = {"data.source": "text", "data.path": "data/stdlib_docs/1.0.0",
        "data.tokenizer": "data/stdlib_sp.model", "model.vocab_size": 2000, "data.seq_len": 64,
        "data.batch_size": 16, "data.workers": 0, "steps": STEPS, "optim.lr": 3e-3,
        "optim.warmup_steps": 30, "eval_every": STEPS, "eval_steps": 10, "log_every": 25,
        "checkpoint.every_steps": 100}
FAMILIES = ("baseline", "diff", "talking_heads", "mta")
ABLATIONS = ("gate_zero", "no_post_conv", "no_head_mix", "no_group_norm", "kernel_4x9",
             "kernel_8x13")


def get_sweep() -> Sweep:
  runs = [Run(name=f, config=f"configs/lm_tiny.py:{f}") for f in FAMILIES]
  runs += [Run(name=f"mta_{a}", config=f"configs/ablations.py:cpu_{a}") for a in ABLATIONS]
  return Sweep(name="lm_cpu", runs=runs, metric="ppl", seeds=2, overrides=TEXT,
               description=__doc__)
