"""`profile_steps="START,END"`: a jax.profiler trace of training steps START..END (1-based,
inclusive) into `<workdir>/profile`, readable with TensorBoard's profile plugin
(`tensorboard --logdir <workdir>/profile`) or Perfetto (the `.trace.json.gz` beside it).

Like MaxText's profiler window, the first steps (compilation, warm-up) are best left out:
e.g. `--config.profile_steps=10,15`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def parse_steps(value: str, steps: int) -> Optional[tuple[int, int]]:
  """"START,END" -> (START, END), or None for ""; ConfigError naming profile_steps."""
  if not value:
    return None
  from mta_jax.config import ConfigError
  parts = value.replace(" ", "").split(",")
  try:
    start, end = (int(p) for p in parts)
  except ValueError:
    raise ConfigError(f"profile_steps={value!r} must be 'START,END' (two step numbers, e.g. "
                      "'10,15'), or '' for no profile.") from None
  if not 1 <= start <= end <= steps:
    raise ConfigError(f"profile_steps={value!r} must satisfy 1 <= START <= END <= steps={steps}.")
  return start, end


class StepProfiler:
  """Starts a trace before step START runs and stops it once step END has finished."""

  def __init__(self, value: str, steps: int, workdir: str, first_step: int, log=print):
    self.window = parse_steps(value, steps)
    self.dir = os.path.join(workdir, "profile")
    self._mirror = None  # the profiler writes local files; copied to a remote workdir
    self.active = False
    self.log = log
    if self.window and first_step >= self.window[0]:
      log(f"profile_steps={value!r}: the run resumes at step {first_step}, after START; "
          "no profile this time.")
      self.window = None

  def before(self, step: int) -> None:
    """Call before running `step` (1-based)."""
    if self.window and step == self.window[0] and not self.active:
      from mta_jax import storage
      self._mirror = storage.LocalMirror(self.dir)
      jax.profiler.start_trace(self._mirror.local, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, result=None) -> None:
    """Call once `step` is done (`result` is blocked on first)."""
    if self.active and step >= self.window[1]:
      if result is not None:
        jax.block_until_ready(result)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self._mirror.close()
      self.active = False
      self.log(f"profile of steps {self.window[0]}..{self.window[1]}: {self.dir}")
