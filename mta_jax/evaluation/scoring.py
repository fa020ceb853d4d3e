"""Log-likelihood scoring with one jitted forward per padded batch shape.

Rows are right-padded to a length bucket (a multiple of `bucket`, so few shapes compile); the
model is causal, so padding after a row's tokens cannot change their scores.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def _token_logprobs(graphdef, state, inputs_BxT, targets_BxT):
  """log p(target_t | inputs_<=t) [B, T] and whether each target is the argmax [B, T]."""
  logits = nnx.merge(graphdef, state)(inputs_BxT)
  logp = jax.nn.log_softmax(logits, axis=-1)
  tok = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return tok, jnp.argmax(logits, axis=-1) == targets_BxT


class Scorer:
  """Scores token sequences with a model (batched, bucketed)."""

  def __init__(self, model, *, batch_size: int = 8, bucket: int = 64):
    self.graphdef, self.state = nnx.split(model)
    self.max_len = model.cfg.max_len
    self.batch_size, self.bucket = batch_size, bucket
    self._fn = jax.jit(functools.partial(_token_logprobs, self.graphdef))

  def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray,
                                                                            np.ndarray]]:
    """For each sequence s (length >= 2, at most max_len + 1): (log p(s[t+1] | s[:t+1]),
    is_argmax) for t = 0 .. len(s) - 2."""
    for s in sequences:
      if not 2 <= len(s) <= self.max_len + 1:
        raise ValueError(f"a scored sequence needs 2..{self.max_len + 1} tokens (the model's "
                         f"max_len + 1); got {len(s)}. Truncate or split it first.")
    out = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    fn = self._fn
    for lo in range(0, len(order), self.batch_size):
      idx = order[lo:lo + self.batch_size]
      longest = max(len(sequences[i]) - 1 for i in idx)
      length = min(self.max_len, -(-longest // self.bucket) * self.bucket)
      rows = self.batch_size if len(order) > self.batch_size else len(idx)
      inputs = np.zeros((rows, length), np.int32)
      targets = np.zeros((rows, length), np.int32)
      for r, i in enumerate(idx):
        s = np.asarray(sequences[i], np.int32)
        inputs[r, :len(s) - 1], targets[r, :len(s) - 1] = s[:-1], s[1:]
      logp, greedy = fn(self.state, jnp.asarray(inputs), jnp.asarray(targets))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for r, i in enumerate(idx):
        n = len(sequences[i]) - 1
        out[i] = (logp[r, :n], greedy[r, :n])
    return out

  def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[tuple[float, bool]]:
    """sum log p(continuation | context) and whether greedy decoding would produce it.

    Context + continuation longer than max_len + 1 are cut from the left (the continuation is
    always kept whole; it must be shorter than max_len + 1).
    """
    seqs, conts = [], []
    for ctx, cont in pairs:
      if len(cont) == 0 or len(cont) > self.max_len:
        raise ValueError(f"a continuation needs 1..{self.max_len} tokens; got {len(cont)}.")
      if len(ctx) == 0:
        raise ValueError("an empty context: give at least one token (e.g. BOS).")
      seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
      seqs.append(seq)
      conts.append(len(cont))
    res = []
    for (lp, gr), n in zip(self.token_logprobs(seqs), conts):
      res.append((float(lp[-n:].sum()), bool(gr[-n:].all())))
    return res
