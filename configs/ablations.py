"""The paper's ablation grid as named variants of the MTA family: `<size>_<variant>`.

    python train.py --config=configs/ablations.py:880m_no_post_conv --mode=count_params
    python train.py --config=configs/ablations.py:cpu_kernel_4x9 --workdir=runs/abl_k49

Sizes: 300m / 550m / 880m / 1b (the paper's training setup, configs/paper.py) and cpu (the tiny
model and training of configs/lm_tiny.py). Variants and what they change: mta_jax/ablations.py
(`python -c "from mta_jax import ablations; print(ablations.variants_for('cpu'))"` lists those
valid at a size).
"""

from configs import lm_tiny, paper
from mta_jax import ablations


def get_config(arg=None):
  size, variant = ablations.parse(arg)
  cfg = lm_tiny.get_config("mta") if size == "cpu" else paper.get(size, "mta")
  cfg.model = ablations.apply_variant(cfg.model, variant)
  cfg.name = f"ablation_{size}_{variant}"
  return cfg
