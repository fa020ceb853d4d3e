"""Entry point: train / eval / count_params / export / compile one configuration.

    python train.py                                     # MTA on the toy task, reports its error
    python train.py --config=configs/toy.py:baseline    # the Transformer baseline, same task
    python train.py --config=configs/lm_tiny.py:mta --config.steps=200 --workdir=runs/tiny
    python train.py --config=configs/paper_880m_mta.py --mode=count_params
    python train.py --config=configs/paper_880m_mta.py --mode=compile \
        --config.compile.topology=v5e:16x16 --config.model.scan_layers=true

The same command is installed as `mta-train` (`pip install .`); the code is mta_jax/main.py.
`--config.<field>=<value>` overrides any field of the TrainConfig (see mta_jax/config.py).
"""

import os
import sys

if __name__ == "__main__":
  _HERE = os.path.dirname(os.path.abspath(__file__))
  if _HERE not in sys.path:  # this checkout's mta_jax, not another one installed elsewhere
    sys.path.insert(0, _HERE)
  from mta_jax import main
  main.run()
