"""Typed configuration: one dataclass per concern, nested in `TrainConfig`.

Experiment files in `configs/` build a `TrainConfig` in `get_config(arg)`; the command line
overrides fields (`--config.model.n_layers=4`). `validate(cfg)` rejects unknown values and
inconsistent settings with a message naming the field, before anything is compiled.
"""

import dataclasses
import math
import typing
from typing import Any, Iterable, Mapping, Optional


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionConfig:
  """What each layer's attention does (docs/MTA.md Sec. 2-8). All off = a plain Transformer."""
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
  # "gate" (v2 default) | "depth" (v1, 1 - lambda(l)) | "none" | "inv_sqrt_layer" (1/sqrt(l+1),
  # "LayerNorm scaling" of Sun et al. 2025 applied to the group norm's output; l 0-based)
  norm_scaling: str = "gate"
  # Gate weight w_g: "normal" = truncated normal (+-3 sigma), std d_model^-0.5, as the released
  # model initialises it; "zero" = every gate starts at exactly sigmoid(0) = 0.5.
  gate_init: str = "normal"
  # Initialisation of the MTA weights: "identity" (paper), "zero" or "const" (ablation).
  init: str = "identity"
  init_const: float = 0.1
  dropout: float = 0.0             # attention-weight dropout, training only
  # DIFF Transformer (differential attention): each head's q / k split into two halves of
  # head_dim / 2 whose softmax maps are subtracted (lambda per layer); v keeps head_dim. The
  # "diff" family halves n_heads and doubles head_dim, so the weights keep the baseline's shapes.
  diff: bool = False
  implementation: str = "chunked"  # "chunked" (exact, O(block x T) memory) | "xla" (reference)
  #                                  | "pallas" (fused forward kernel; interpret mode off TPU)


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
  # Rematerialisation of each block in the backward pass (jax.checkpoint policy), see REMAT:
  # "none" | "full" | "dots" | "save_out_proj" | "offload_dots".
  remat: str = "none"
  # Scan over one repeating period of layers with nnx.scan (compile time flat in depth); the
  # parameters then have a different layout (see model.py: to_scanned_params / to_unrolled_params).
  scan_layers: bool = False
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
  """The motivating toy task (docs/MTA.md Sec. 11; paper Sec. 4.1)."""
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
  tokenizer: str = ""              # sentencepiece .model, tiktoken BPE file or tokenizer.json
  packing: str = "concat"          # "concat" (concat-then-split) | "first_fit"
  shuffle: bool = True
  seed: int = 0
  workers: int = 0                 # grain worker processes; 0 = in-process
  prefetch: int = 2
  path: str = ""                   # source "text": directory written by mta_jax.data.prepare
  # source "text": a weighted mixture of prepared datasets instead of `path`, as
  # "PATH:WEIGHT,PATH:WEIGHT,..." (weights > 0, normalised), e.g. "data/arxiv:0.3,data/books:0.7"
  mixture: str = ""
  add_bos: bool = True             # real text: BOS before each document
  add_eos: bool = True             # real text: EOS after each document
  pack_bins: int = 0               # first_fit: rows filled at once; 0 -> rows per process batch
  long_docs: str = "split"         # first_fit: documents longer than seq_len: "split" | "error"
  synthetic_vocab_size: int = 0    # source "synthetic": token range; 0 -> model.vocab_size
  shuffle_window: int = 0          # real text: shuffle packed training rows in windows of this
                                   # many rows (mixes long documents; memory grows with it); 0 = off


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
  grad_accum: int = 1              # micro-batches (of data.batch_size rows) per optimizer step
  z_loss: float = 0.0              # weight of the log(Z)^2 auxiliary loss
  decay_mask: str = "matrices"     # weight decay on "matrices" (ndim >= 2) or "all" parameters


@dataclasses.dataclass
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (fill with the rest)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class CheckpointConfig:
  every_steps: int = 1000          # 0 disables periodic saves
  keep_last: int = 3               # latest checkpoints kept; 0 = keep all
  keep_every: int = 0              # additionally keep every m-th step forever; 0 = none
  async_save: bool = True
  # Start a fresh workdir from another run's weights (ignored once the workdir has a checkpoint):
  # a workdir, a checkpoint step directory or an export. MTA weights the source lacks start at
  # identity (the paper's App. I retrofit); every other weight must match.
  init_from: str = ""
  export_dir: str = ""             # --mode=export output; "" -> <workdir>/export
  export_dtype: str = ""           # "" keeps the parameter dtype; "bfloat16" casts
  export_step: int = -1            # -1 -> the latest checkpoint
  # Resume even though the data (tokenizer file, source, packing) differs from the checkpoint's.
  allow_data_change: bool = False


@dataclasses.dataclass
class CompileConfig:
  """--mode=compile: ahead-of-time compilation of the train / eval steps (see mta_jax/aot.py)."""
  topology: str = ""               # e.g. "v5e:16x16", "v5p:4x4x4", "v4:2x2x1"; "" = this host
  num_slices: int = 1              # multislice: copies of the topology joined over DCN
  hbm_gib: float = 0.0             # per-chip memory to fit in; 0 -> the chip's HBM (aot.CHIPS)
  eval_step: bool = True           # also compile the eval step
  save_dir: str = ""               # write the optimized HLO and the serialized executable here


@dataclasses.dataclass
class TrainConfig:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)
  steps: int = 10_000
  eval_every: int = 1000
  eval_steps: int = 0              # 0 -> the whole eval split
  log_every: int = 50
  seed: int = 0
  name: str = ""
  peak_tflops: float = 0.0         # per-device peak for MFU; 0 -> look up by device kind
  # Tracking and profiling (metrics.jsonl and TensorBoard are always written).
  wandb_project: str = ""          # Weights & Biases project; "" = no W&B
  wandb_run: str = ""              # W&B run name; "" -> the workdir's name
  wandb_entity: str = ""           # W&B user or team; "" -> your default
  profile_steps: str = ""          # "START,END": jax.profiler trace of steps START..END
                                   # into <workdir>/profile (TensorBoard / Perfetto); "" = off


# ---------------------------------------------------------------------------------------------
# Paper presets (docs/MTA.md Sec. 10; paper Table 7)
# ---------------------------------------------------------------------------------------------

PAPER_SIZES = {
    # name: (d_model, n_layers, n_heads, head_dim)
    "300m": (1024, 20, 16, 64),
    "550m": (1280, 24, 10, 128),
    "880m": (1536, 24, 16, 96),
    "1b": (2048, 24, 16, 128),
}
FAMILIES = ("baseline", "talking_heads", "mta", "diff")


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
  if family == "diff":  # use `family_model`: the DIFF family also halves the heads
    return AttentionConfig(diff=True, group_norm=True, norm_scaling="depth")
  raise ConfigError(f"unknown model family {family!r}; choose one of {FAMILIES}.")


def family_model(model: ModelConfig, family: str) -> ModelConfig:
  """`model` (a baseline shape) turned into `family`. DIFF: half as many heads of twice the
  width (the DIFF paper's rule), so every projection keeps its shape and parameter count."""
  out = dataclasses.replace(model, attention=attention_family(family))
  if family == "diff":
    if model.n_heads % 2:
      raise ConfigError(f"the diff family halves model.n_heads={model.n_heads}; use an even "
                        "head count.")
    out.head_dim = 2 * model.resolved_head_dim
    out.n_heads = model.n_heads // 2
  return out


def paper_model(size: str, family: str) -> ModelConfig:
  """The paper's `size` model ("300m" ... "1b") in `family` (one of FAMILIES)."""
  if size not in PAPER_SIZES:
    raise ConfigError(f"unknown paper size {size!r}; choose one of {tuple(PAPER_SIZES)}.")
  d_model, n_layers, n_heads, head_dim = PAPER_SIZES[size]
  base = ModelConfig(vocab_size=128256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     head_dim=head_dim, rope_theta=1e5, norm_eps=1e-5, max_len=2048)
  return family_model(base, family)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def check_choice(field: str, value, choices) -> None:
  """ConfigError naming `field` unless `value` is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not allowed; choose one of {tuple(choices)}.")


# model.remat -> what the backward pass keeps of each block (the rest is recomputed).
REMAT = {
    "none": "no rematerialisation: every intermediate is kept",
    "full": "nothing kept but the block inputs (least memory, one extra forward)",
    "dots": "keeps the outputs of the weight matmuls (dots without batch dims)",
    "save_out_proj": "keeps each block's attention and MLP outputs (checkpoint_name)",
    "offload_dots": "as 'dots', but offloaded to host memory (TPU/GPU backends)",
}


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
  a = m.attention
  if isinstance(m.remat, bool):
    raise ConfigError(f"{prefix}.remat={m.remat!r}: remat takes a policy name; use 'full' for "
                      f"True and 'none' for False (choices {tuple(REMAT)}).")
  check_choice(f"{prefix}.remat", m.remat, tuple(REMAT))
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
    if getattr(m, field) <= 0:
      raise ConfigError(f"{prefix}.{field} must be positive; got {getattr(m, field)}.")
  if m.head_dim == 0 and m.d_model % m.n_heads:
    raise ConfigError(f"{prefix}.d_model={m.d_model} is not divisible by {prefix}.n_heads="
                      f"{m.n_heads}; set {prefix}.head_dim explicitly or change the head count.")
  if m.resolved_head_dim % 2:
    raise ConfigError(f"head_dim={m.resolved_head_dim} must be even for RoPE "
                      f"({prefix}.head_dim / {prefix}.d_model / {prefix}.n_heads).")
  check_choice(f"{prefix}.dtype", m.dtype, ("float32", "bfloat16"))
  check_choice(f"{prefix}.param_dtype", m.param_dtype, ("float32", "bfloat16"))
  check_choice(f"{prefix}.attention.norm_scaling", a.norm_scaling,
               ("gate", "depth", "none", "inv_sqrt_layer"))
  if a.diff and (a.pre_conv or a.post_conv or a.head_mix_pre or a.head_mix_post):
    raise ConfigError(f"{prefix}.attention.diff=True cannot be combined with key-query "
                      "convolutions or head mixing (pre_conv / post_conv / head_mix_pre / "
                      "head_mix_post); turn those off or diff off.")
  if a.diff and m.resolved_head_dim % 4:
    raise ConfigError(f"{prefix}.attention.diff=True splits head_dim={m.resolved_head_dim} into "
                      "two halves that each need an even width for RoPE; use a head_dim "
                      "divisible by 4.")
  check_choice(f"{prefix}.attention.init", a.init, ("identity", "zero", "const"))
  check_choice(f"{prefix}.attention.gate_init", a.gate_init, ("normal", "zero"))
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
  if m.scan_layers and a.group_norm and a.norm_scaling == "depth":
    raise ConfigError(f"{prefix}.scan_layers=True cannot scan attention.norm_scaling='depth' (a "
                      "different constant in every layer); use norm_scaling='gate' or "
                      "scan_layers=False.")
  from mta_jax import implementations  # local import: config stays importable without jax
  check_choice(f"{prefix}.attention.implementation", a.implementation, implementations.names())
  if a.implementation == "pallas" and a.dropout > 0.0:
    raise ConfigError(f"{prefix}.attention.implementation='pallas' has no attention dropout; "
                      f"set {prefix}.attention.dropout=0 or use implementation='chunked'.")


def to_dict(cfg) -> dict:
  """The resolved config as plain JSON-able data."""
  return dataclasses.asdict(cfg)


def from_dict(cls, d: Mapping, where: str = "config"):
  """The inverse of `to_dict` for the config dataclass `cls` (JSON lists become tuples).

  Unknown fields are a ConfigError naming them (a config written by another version)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f"{where}: unknown config fields {unknown} for {cls.__name__} (written by "
                      "a different version of mta_jax?).")
  kwargs = {}
  for name, value in d.items():
    factory = fields[name].default_factory
    default = factory() if factory is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      kwargs[name] = from_dict(type(default), value, f"{where}.{name}")
    elif isinstance(value, list):
      kwargs[name] = tuple(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Model compatibility: which stored parameters a model config can use
# ---------------------------------------------------------------------------------------------

# Model-config fields that do not change the parameters: a checkpoint restores across them.
RESTORE_COMPATIBLE_FIELDS = frozenset({
    "dtype", "param_dtype", "remat", "max_len", "attention.implementation", "attention.dropout",
    "attention.init", "attention.init_const", "attention.gate_init"})


def _flat_dict(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat_dict(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def resolved_model_fields(m: ModelConfig) -> dict[str, Any]:
  """The model config as flat 'a.b' fields, with derived sizes resolved and the sizes of
  features that are off left out."""
  out = _flat_dict(dataclasses.asdict(m))
  out["head_dim"] = m.resolved_head_dim
  out["ffn_hidden"] = m.resolved_ffn_hidden
  out["attention.c_h"] = m.resolved_c_h
  out["attention.kq_layers"] = list(m.kq_layer_indices())
  for k in ("attention.kq_every", "attention.kq_offset"):  # folded into kq_layers
    out.pop(k)
  a = m.attention
  unused = []
  if not a.pre_conv:
    unused += ["attention.c_q", "attention.c_k"]
  if not a.post_conv:
    unused += ["attention.post_c_q", "attention.post_c_k"]
  if not (a.head_mix_pre or a.head_mix_post):
    unused += ["attention.c_h"]
  if not a.group_norm:
    unused += ["attention.norm_scaling"]
  for k in unused:
    out.pop(k)
  return out


def model_config_diff(stored: ModelConfig, current: ModelConfig,
                      ignore: Iterable[str] = RESTORE_COMPATIBLE_FIELDS) -> list[str]:
  """['model.attention.pre_conv: checkpoint False, current True', ...]"""
  a, b = resolved_model_fields(stored), resolved_model_fields(current)
  ignore = set(ignore)
  diffs = []
  for k in sorted(set(a) & set(b)):  # a size only one side uses shows up as its feature flag
    if k not in ignore and a[k] != b[k]:
      diffs.append(f"model.{k}: checkpoint {a[k]!r}, current {b[k]!r}")
  return diffs


# ---------------------------------------------------------------------------------------------
# Whole-config validation (types, choices, cross-field consistency, mesh vs devices)
# ---------------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool", str: "a string"}


def check_types(cfg, prefix: str = "") -> None:
  """Every field of every nested dataclass holds a value of its declared type.

  Config files assign plain Python values; a wrong type (a string where an int belongs, a float
  where an int belongs) fails here, naming the field. Ints are accepted for float fields.
  """
  if isinstance(cfg, ModelConfig) and isinstance(cfg.remat, bool):
    validate_model(cfg, prefix.rstrip(".") or "model")  # the remat-specific message
  hints = typing.get_type_hints(type(cfg))
  for f in dataclasses.fields(cfg):
    name = f"{prefix}{f.name}"
    value = getattr(cfg, f.name)
    want = hints[f.name]
    if dataclasses.is_dataclass(want):
      if not isinstance(value, want):
        raise ConfigError(f"{name} must be a {want.__name__}; got {type(value).__name__}.")
      check_types(value, name + ".")
      continue
    optional = typing.get_origin(want) is typing.Union and type(None) in typing.get_args(want)
    if optional:
      if value is None:
        continue
      want = next(t for t in typing.get_args(want) if t is not type(None))
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, int) and not isinstance(value, bool) if want is int else
          isinstance(value, (tuple, list)) if want in (tuple, list) else
          isinstance(value, want))
    if not ok:
      raise ConfigError(f"{name}={value!r} has the wrong type: expected "
                        f"{_TYPE_NAMES.get(want, getattr(want, '__name__', str(want)))}"
                        f"{' or None' if optional else ''}, got {type(value).__name__}.")
  if isinstance(cfg, AttentionConfig) and cfg.kq_layers is not None:
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in cfg.kq_layers):
      raise ConfigError(f"{prefix}kq_layers={cfg.kq_layers!r} must be a tuple of ints, "
                        "e.g. --config.model.attention.kq_layers='(2, 6)'.")


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 filled in; ConfigError unless it multiplies to `n_devices`."""
  shape = [mesh.data, mesh.fsdp, mesh.tensor]
  names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
  for name, s in zip(names, shape):
    if s == 0 or s < -1:
      raise ConfigError(f"{name}={s} must be a positive size or -1 (fill with the remaining "
                        "devices).")
  if shape.count(-1) > 1:
    raise ConfigError(f"at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1; got "
                      f"{mesh.data}, {mesh.fsdp}, {mesh.tensor}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    i = shape.index(-1)
    if n_devices % known:
      raise ConfigError(f"{names[i]}=-1 cannot be filled: {n_devices} devices are not divisible "
                        f"by the other mesh axes (product {known}).")
    shape[i] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ConfigError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = "
                      f"{math.prod(shape)} devices, but {n_devices} are available; set "
                      "mesh.data / mesh.fsdp / mesh.tensor so the product matches, or make one "
                      "of them -1.")
  return tuple(shape)


def _validate_optim(o: OptimConfig, steps: int) -> None:
  if o.lr < 0:
    raise ConfigError(f"optim.lr must be >= 0; got {o.lr}.")
  for field in ("b1", "b2"):
    if not 0.0 <= getattr(o, field) < 1.0:
      raise ConfigError(f"optim.{field} must be in [0, 1); got {getattr(o, field)}.")
  if o.eps <= 0:
    raise ConfigError(f"optim.eps must be > 0; got {o.eps}.")
  for field in ("weight_decay", "clip_norm", "z_loss", "warmup_steps", "decay_steps"):
    if getattr(o, field) < 0:
      raise ConfigError(f"optim.{field} must be >= 0; got {getattr(o, field)}.")
  check_choice("optim.schedule", o.schedule, ("linear", "cosine", "constant"))
  check_choice("optim.decay_mask", o.decay_mask, ("matrices", "all"))
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    raise ConfigError(f"optim.min_lr_ratio must be in [0, 1]; got {o.min_lr_ratio}.")
  if o.grad_accum < 1:
    raise ConfigError(f"optim.grad_accum must be >= 1; got {o.grad_accum}.")
  total = o.decay_steps or steps
  if o.schedule != "constant" and o.warmup_steps > total:
    raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds the schedule length "
                      f"{total} (optim.decay_steps, or steps when it is 0); lower the warmup.")


def per_process_rows(global_rows: int, process_count: int, setting: str) -> int:
  """Rows one process loads; ConfigError unless the global batch splits evenly."""
  if global_rows < 1 or global_rows % process_count:
    raise ConfigError(f"{setting}={global_rows} is not a positive multiple of the "
                      f"{process_count} processes; each process loads an equal share of the "
                      "global batch.")
  return global_rows // process_count


def validate(cfg: "TrainConfig", n_devices: Optional[int] = None,
             process_count: int = 1) -> None:
  """Rejects a bad TrainConfig before anything is built; every message names the field.

  What needs the data itself (the toy task's sample length, the tokenizer's vocabulary) is
  checked by `mta_jax.data.validate_data(cfg)`, which `train_lib.setup` runs right after.

  Args:
    cfg: the whole configuration.
    n_devices: devices the mesh must cover (None skips the mesh / batch / tensor checks).
    process_count: JAX processes; the global batch is split evenly over them.
  """
  if not isinstance(cfg, TrainConfig):
    raise ConfigError(f"the config must be a TrainConfig; got {type(cfg).__name__} (does "
                      "get_config() return mta_jax.config.TrainConfig?).")
  check_types(cfg)
  validate_model(cfg.model)
  for field in ("steps", "log_every"):
    if getattr(cfg, field) < 1:
      raise ConfigError(f"{field} must be >= 1; got {getattr(cfg, field)}.")
  for field in ("eval_every", "eval_steps", "peak_tflops"):
    if getattr(cfg, field) < 0:
      raise ConfigError(f"{field} must be >= 0 (0 = off / whole split / look up); got "
                        f"{getattr(cfg, field)}.")
  _validate_optim(cfg.optim, cfg.steps)
  if cfg.compile.num_slices < 1 or cfg.compile.hbm_gib < 0:
    raise ConfigError(f"compile.num_slices must be >= 1 and compile.hbm_gib >= 0; got "
                      f"{cfg.compile.num_slices}, {cfg.compile.hbm_gib}.")
  from mta_jax import profiling
  profiling.parse_steps(cfg.profile_steps, cfg.steps)
  d = cfg.data
  if d.batch_size < 1 or d.eval_batch_size < 0:
    raise ConfigError(f"data.batch_size must be >= 1 and data.eval_batch_size >= 0; got "
                      f"{d.batch_size}, {d.eval_batch_size}.")
  if d.seq_len < 1 or d.seq_len > cfg.model.max_len:
    raise ConfigError(f"data.seq_len={d.seq_len} must be in 1..model.max_len="
                      f"{cfg.model.max_len}; raise model.max_len or shorten data.seq_len.")
  c = cfg.checkpoint
  for field in ("every_steps", "keep_last", "keep_every"):
    if getattr(c, field) < 0:
      raise ConfigError(f"checkpoint.{field} must be >= 0; got {getattr(c, field)}.")
  validate_data(d)
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1; got {process_count}.")
  for name, rows in (("data.batch_size", d.batch_size),
                     ("data.eval_batch_size", d.eval_batch_size or d.batch_size)):
    per_process_rows(rows, process_count, name)
  if n_devices is not None:
    _validate_mesh(cfg, n_devices)


def _validate_mesh(cfg: "TrainConfig", n_devices: int) -> None:
  """The mesh covers `n_devices`, and batches and heads split evenly over its axes."""
  d = cfg.data
  data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, n_devices)
  dp = data * fsdp
  for name, rows in (("data.batch_size", d.batch_size),
                     ("data.eval_batch_size", d.eval_batch_size or d.batch_size)):
    if rows % dp:
      raise ConfigError(f"{name}={rows} is not divisible by the data-parallel size "
                        f"mesh.data x mesh.fsdp = {data} x {fsdp} = {dp}; make the batch a "
                        "multiple of it or change the mesh.")
  m = cfg.model
  if m.n_heads % tensor:
    raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tensor}; "
                      "heads are split over the tensor axis.")
  a = m.attention
  if (a.head_mix_pre or a.head_mix_post) and (m.n_heads // m.resolved_c_h) % tensor:
    groups = m.n_heads // m.resolved_c_h
    raise ConfigError(
        f"model.attention.c_h={a.c_h} gives {groups} head-mixing group(s) of "
        f"{m.resolved_c_h} heads, which cannot be split over mesh.tensor={tensor} without a "
        "group straddling two shards; use a c_h with (n_heads // c_h) divisible by "
        "mesh.tensor, or a smaller mesh.tensor.")


# ---------------------------------------------------------------------------------------------
# Data settings (static checks; `mta_jax.data.validate_data(cfg)` adds the toy task and the
# vocabulary)
# ---------------------------------------------------------------------------------------------


def validate_data(d: DataConfig, prefix: str = "data") -> None:
  """Rejects bad data settings without touching files; every message names the field."""
  check_choice(f"{prefix}.source", d.source, ("toy", "synthetic", "tfds", "text"))
  check_choice(f"{prefix}.packing", d.packing, ("concat", "first_fit"))
  check_choice(f"{prefix}.long_docs", d.long_docs, ("split", "error"))
  for field in ("workers", "prefetch", "pack_bins", "synthetic_vocab_size", "shuffle_window"):
    if getattr(d, field) < 0:
      raise ConfigError(f"{prefix}.{field} must be >= 0; got {getattr(d, field)}.")
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError(f"{prefix}.source='tfds' needs {prefix}.tfds_name (e.g. 'lm1b', prepared "
                      "in array_record format).")
  if d.source == "text" and not (d.path or d.mixture):
    raise ConfigError(f"{prefix}.source='text' needs {prefix}.path: the directory written by "
                      "`python -m mta_jax.data.prepare` (or data.mixture: several of them).")
  if d.mixture:
    if d.source != "text" or d.path:
      raise ConfigError(f"{prefix}.mixture is set: it needs {prefix}.source='text' and an empty "
                        f"{prefix}.path (got source={d.source!r}, path={d.path!r}).")
    parse_mixture(d.mixture, f"{prefix}.mixture")
  if d.source in ("tfds", "text") and not d.tokenizer:
    raise ConfigError(f"{prefix}.source={d.source!r} needs {prefix}.tokenizer: a sentencepiece "
                      ".model, a tiktoken BPE file (Llama 3's tokenizer.model) or a Hugging Face "
                      "tokenizer.json (train one with `python -m mta_jax.data.tokenizer`).")
  if d.source in ("tfds", "text") and d.seq_len < 2:
    raise ConfigError(f"{prefix}.seq_len must be >= 2 for text; got {d.seq_len}.")


def parse_mixture(value: str, setting: str = "data.mixture") -> list[tuple[str, float]]:
  """"PATH:WEIGHT,PATH:WEIGHT" -> [(path, weight / sum)]; ConfigError naming `setting`.
  The weight follows the last ':' so URIs (gs://...) keep theirs."""
  out = []
  for item in (x.strip() for x in value.split(",")):
    path, sep, w = item.rpartition(":")
    try:
      weight = float(w)
    except ValueError:
      weight = None
    if not item or not sep or not path or weight is None:
      raise ConfigError(f"{setting}={value!r}: {item!r} is not PATH:WEIGHT; write e.g. "
                        "'data/arxiv:0.3,data/books:0.7'.")
    if not (weight > 0 and math.isfinite(weight)):
      raise ConfigError(f"{setting}={value!r}: the weight of {path!r} is {w}; weights must be "
                        "positive (leave a dataset out instead of giving it weight 0).")
    out.append((path, weight))
  paths = [p for p, _ in out]
  if len(set(paths)) != len(paths):
    raise ConfigError(f"{setting}={value!r} names a dataset twice; give each one weight.")
  total = sum(w for _, w in out)
  return [(p, w / total) for p, w in out]
