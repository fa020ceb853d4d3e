"""The training state: what one train step maps to the next and what a checkpoint holds.

Its own small module so that both the training loop (train_lib.py) and the checkpointer
(checkpoint.py) use it without importing each other.
"""

import flax
import jax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 [], the optimizer steps taken
  params: nnx.State    # the model's nnx.Param variables
  opt_state: nnx.State  # the nnx.Optimizer's state (moments, its own step count)
