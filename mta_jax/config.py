"""Typed configuration: one dataclass per concern, nested in `TrainConfig`.

Experiment files in `configs/` build a `TrainConfig` in `get_config(arg)`; the command line
overrides fields (`--config.model.n_layers=4`). `validate(cfg)` rejects unknown values and
inconsistent settings with a message naming the field, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionConfig:
  """What each layer's attention does (MTA_SPEC Sec. 1-6). All off = a plain Transformer."""
  # Key-query convolutions (only on `kq_layers`, see `ModelConfig.kq_layer_indices`).
  pre_conv: bool = False           # Eq. 5, on logits before softmax
  post_conv: bool = False          # Eq. 6, on weights after softmax
  c_q: int = 6                     # query-axis size of the pre-softmax kernel (causal)
  c_k: int = 11                    # key-axis size of the pre-softmax kernel (odd, centred)
  post_c_q: int = 6
  post_c_k: int = 11
  kq_layers: Optional[tuple] = None  # explicit 0-based layers; None -> every/offset below
  kq_every: int = 4                # paper: every 4th layer ...
  kq_offset: int = 2               # ... starting at layer 2 (2, 6, 10, ...)
  # Head mixing (Eq. 7) and the gated group norm: on every layer.
  head_mix_pre: bool = False
  head_mix_post: bool = False
  c_h: int = 0                     # heads per mixing group; 0 = all heads
  group_norm: bool = False
  norm_scaling: str = "gate"       # "gate" (v2 default) | "depth" (v1) | "none"
  # Initialisation of the MTA weights: "identity" (paper), "zero" or "const" (ablation).
  init: str = "identity"
  init_const: float = 0.1
  dropout: float = 0.0             # attention-weight dropout, training only
  implementation: str = "xla"      # see mta_jax.ops.implementations()

  @property
  def uses_mta_op(self) -> bool:
    return self.pre_conv or self.post_conv or self.head_mix_pre or self.head_mix_post


@dataclasses.dataclass
class ModelConfig:
  vocab_size: int = 128256
  d_model: int = 1024
  n_layers: int = 20
  n_heads: int = 16
  head_dim: int = 0                # 0 -> d_model // n_heads
  ffn_hidden: int = 0              # 0 -> 256 * ceil(8/3 * d_model / 256) (the paper's rule)
  rope_theta: float = 1e5
  norm_eps: float = 1e-5
  max_len: int = 2048
  dtype: str = "float32"           # activation / compute dtype ("bfloat16" for mixed precision)
  param_dtype: str = "float32"
  remat: bool = False              # rematerialise each block in the backward pass
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_ffn_hidden(self) -> int:
    return self.ffn_hidden or 256 * math.ceil((8 / 3 * self.d_model) / 256)

  @property
  def resolved_c_h(self) -> int:
    return self.attention.c_h or self.n_heads

  def kq_layer_indices(self) -> tuple[int, ...]:
    """0-based layers that get the key-query convolutions."""
    a = self.attention
    if not (a.pre_conv or a.post_conv):
      return ()
    if a.kq_layers is not None:
      return tuple(sorted(int(i) for i in a.kq_layers))
    return tuple(range(a.kq_offset, self.n_layers, a.kq_every))


# ---------------------------------------------------------------------------------------------
# Data, optimisation, mesh, checkpoints, training loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToyConfig:
  """The motivating toy task (MTA_SPEC Sec. 10)."""
  block_len: int = 5               # N letters per block
  n_query: int = 2                 # L query letters
  n_blocks: int = 52
  variant: str = "all"             # "all" | "first" | "last"
  n_train: int = 1_000_000
  n_test: int = 1_000
  seed: int = 0
  answer_sep: bool = False         # put '=' between query and answer (the released format has none)


@dataclasses.dataclass
class DataConfig:
  source: str = "toy"              # "toy" | "tfds" | "text" (prepared array_record) | "synthetic"
  seq_len: int = 2048
  batch_size: int = 128            # global batch (rows per step, before gradient accumulation)
  eval_batch_size: int = 0         # 0 -> batch_size
  toy: ToyConfig = dataclasses.field(default_factory=ToyConfig)
  tfds_name: str = ""              # e.g. "lm1b"; prepared in array_record format
  tfds_data_dir: str = ""          # "" -> TFDS default
  train_split: str = "train"
  eval_split: str = "validation"
  text_key: str = "text"
  tokenizer: str = ""              # path to a sentencepiece .model
  packing: str = "concat"          # "concat" (concat-then-split) | "first_fit"
  shuffle: bool = True
  seed: int = 0
  workers: int = 0                 # grain worker processes; 0 = in-process
  prefetch: int = 2
  path: str = ""                   # source "text": directory written by mta_jax.data.prepare
  add_bos: bool = True             # real text: BOS before each document
  add_eos: bool = True             # real text: EOS after each document
  pack_bins: int = 0               # first_fit: documents packed per bin group; 0 -> 4 x rows/batch
  long_docs: str = "split"         # first_fit: documents longer than seq_len: "split" | "error"
  synthetic_vocab_size: int = 0    # source "synthetic": token range; 0 -> model.vocab_size


@dataclasses.dataclass
class OptimConfig:
  lr: float = 1.5e-4
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.05
  clip_norm: float = 1.0           # 0 disables clipping
  schedule: str = "linear"         # "linear" (warmup then linear decay to 0) | "cosine" | "constant"
  warmup_steps: int = 375
  decay_steps: int = 0             # 0 -> total training steps
  min_lr_ratio: float = 0.0
  grad_accum: int = 1              # micro-batches per optimizer step
  z_loss: float = 0.0              # weight of the log(Z)^2 auxiliary loss


@dataclasses.dataclass
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (fill with the rest)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class CheckpointConfig:
  every_steps: int = 1000          # 0 disables periodic saves
  keep_last: int = 3
  keep_every: int = 0              # additionally keep every m-th step forever; 0 = none
  async_save: bool = True


@dataclasses.dataclass
class TrainConfig:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  steps: int = 10_000
  eval_every: int = 1000
  eval_steps: int = 0              # 0 -> the whole eval split
  log_every: int = 50
  seed: int = 0
  name: str = ""


# ---------------------------------------------------------------------------------------------
# Paper presets (MTA_SPEC Sec. 9, Table 7)
# ---------------------------------------------------------------------------------------------

PAPER_SIZES = {
    # name: (d_model, n_layers, n_heads, head_dim)
    "300m": (1024, 20, 16, 64),
    "550m": (1280, 24, 10, 128),
    "880m": (1536, 24, 16, 96),
    "1b": (2048, 24, 16, 128),
}
FAMILIES = ("baseline", "talking_heads", "mta")


def attention_family(family: str) -> AttentionConfig:
  """The attention settings of one model family, as in the paper and the released configs."""
  if family == "baseline":
    return AttentionConfig()
  if family == "talking_heads":
    return AttentionConfig(head_mix_pre=True, head_mix_post=True)
  if family == "mta":
    return AttentionConfig(pre_conv=True, post_conv=True, c_q=6, c_k=11, post_c_q=6,
                           post_c_k=11, kq_every=4, kq_offset=2, head_mix_pre=True,
                           head_mix_post=True, group_norm=True, norm_scaling="gate")
  raise ConfigError(f"unknown model family {family!r}; choose one of {FAMILIES}.")


def paper_model(size: str, family: str) -> ModelConfig:
  """The paper's `size` model ("300m" ... "1b") in `family` ("baseline" | "talking_heads" | "mta")."""
  if size not in PAPER_SIZES:
    raise ConfigError(f"unknown paper size {size!r}; choose one of {tuple(PAPER_SIZES)}.")
  d_model, n_layers, n_heads, head_dim = PAPER_SIZES[size]
  return ModelConfig(vocab_size=128256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     head_dim=head_dim, rope_theta=1e5, norm_eps=1e-5, max_len=2048,
                     attention=attention_family(family))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not allowed; choose one of {tuple(choices)}.")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
  a = m.attention
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
    if getattr(m, field) <= 0:
      raise ConfigError(f"{prefix}.{field} must be positive; got {getattr(m, field)}.")
  if m.head_dim == 0 and m.d_model % m.n_heads:
    raise ConfigError(f"{prefix}.d_model={m.d_model} is not divisible by {prefix}.n_heads="
                      f"{m.n_heads}; set {prefix}.head_dim explicitly or change the head count.")
  if m.resolved_head_dim % 2:
    raise ConfigError(f"head_dim={m.resolved_head_dim} must be even for RoPE "
                      f"({prefix}.head_dim / {prefix}.d_model / {prefix}.n_heads).")
  _choice(f"{prefix}.dtype", m.dtype, ("float32", "bfloat16"))
  _choice(f"{prefix}.param_dtype", m.param_dtype, ("float32", "bfloat16"))
  _choice(f"{prefix}.attention.norm_scaling", a.norm_scaling, ("gate", "depth", "none"))
  _choice(f"{prefix}.attention.init", a.init, ("identity", "zero", "const"))
  for field in ("c_q", "c_k", "post_c_q", "post_c_k"):
    if getattr(a, field) < 1:
      raise ConfigError(f"{prefix}.attention.{field} must be >= 1; got {getattr(a, field)}.")
  for field in ("c_k", "post_c_k"):
    if getattr(a, field) % 2 == 0:
      raise ConfigError(f"{prefix}.attention.{field}={getattr(a, field)} must be odd (the key "
                        "axis of the convolution is centred).")
  if a.c_h < 0 or m.n_heads % m.resolved_c_h:
    raise ConfigError(f"{prefix}.attention.c_h={a.c_h} must divide {prefix}.n_heads="
                      f"{m.n_heads} (0 means all heads).")
  if a.kq_every < 1 or a.kq_offset < 0:
    raise ConfigError(f"{prefix}.attention.kq_every must be >= 1 and kq_offset >= 0; got "
                      f"{a.kq_every}, {a.kq_offset}.")
  for i in m.kq_layer_indices():
    if not 0 <= i < m.n_layers:
      raise ConfigError(f"{prefix}.attention.kq_layers has layer {i}, outside 0..{m.n_layers - 1}.")
  if not 0.0 <= a.dropout < 1.0:
    raise ConfigError(f"{prefix}.attention.dropout must be in [0, 1); got {a.dropout}.")
  from mta_jax import ops  # local import: config stays importable without jax work
  if a.implementation not in ops.implementations():
    raise ConfigError(f"{prefix}.attention.implementation={a.implementation!r} is unknown; "
                      f"choose one of {ops.implementations()}.")


def to_dict(cfg) -> dict:
  """The resolved config as plain JSON-able data."""
  return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Data settings (static checks; `mta_jax.data.validate_data(cfg)` adds the vocabulary check)
# ---------------------------------------------------------------------------------------------


def validate_data(d: DataConfig, prefix: str = "data") -> None:
  """Rejects bad data settings without touching files; every message names the field."""
  _choice(f"{prefix}.source", d.source, ("toy", "synthetic", "tfds", "text"))
  _choice(f"{prefix}.packing", d.packing, ("concat", "first_fit"))
  _choice(f"{prefix}.long_docs", d.long_docs, ("split", "error"))
  for field in ("workers", "prefetch", "pack_bins", "synthetic_vocab_size"):
    if getattr(d, field) < 0:
      raise ConfigError(f"{prefix}.{field} must be >= 0; got {getattr(d, field)}.")
  if d.source == "toy":
    t = d.toy
    _choice(f"{prefix}.toy.variant", t.variant, ("all", "first", "last"))
    if not 1 <= t.block_len <= 25:
      raise ConfigError(f"{prefix}.toy.block_len={t.block_len} must be in 1..25 (distinct "
                        "lowercase letters, and blocks must be able to miss a query letter).")
    if not 1 <= t.n_query <= t.block_len:
      raise ConfigError(f"{prefix}.toy.n_query={t.n_query} must be in 1..{prefix}.toy.block_len"
                        f"={t.block_len}.")
    for field in ("n_blocks", "n_train", "n_test"):
      if getattr(t, field) < 1:
        raise ConfigError(f"{prefix}.toy.{field} must be >= 1; got {getattr(t, field)}.")
    need = (t.n_blocks * (t.block_len + 1) + t.n_query + int(t.answer_sep)
            + (t.block_len if t.variant == "all" else 1))
    if d.seq_len < need:
      raise ConfigError(f"{prefix}.seq_len={d.seq_len} is too short for the toy task: one sample "
                        f"needs {need} positions; set {prefix}.seq_len >= {need} (or shrink "
                        f"{prefix}.toy.n_blocks / block_len).")
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError(f"{prefix}.source='tfds' needs {prefix}.tfds_name (e.g. 'lm1b', prepared "
                      "in array_record format).")
  if d.source == "text" and not d.path:
    raise ConfigError(f"{prefix}.source='text' needs {prefix}.path: the directory written by "
                      "`python -m mta_jax.data.prepare`.")
  if d.source in ("tfds", "text") and not d.tokenizer:
    raise ConfigError(f"{prefix}.source={d.source!r} needs {prefix}.tokenizer: a sentencepiece "
                      ".model file (train one with `python -m mta_jax.data.tokenizer`).")
  if d.source in ("tfds", "text") and d.seq_len < 2:
    raise ConfigError(f"{prefix}.seq_len must be >= 2 for text; got {d.seq_len}.")
