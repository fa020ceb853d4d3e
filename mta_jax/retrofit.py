"""Retrofit (paper App. I): a model initialised from another run's weights.

Every parameter the source has is loaded (shapes must match); the MTA parameters it lacks
(key-query kernels, head-mixing matrices, group-norm scale and gate) start where the attention
layer's own initialisers put them with `attention.init="identity"`, so with group norm and gate
off the new model computes exactly what the source did. Which parameters count as MTA
parameters is read off the model itself: those the configured model has and the same model
with plain attention has not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from flax import nnx

from mta_jax import checkpoint as ckpt_lib
from mta_jax import config as config_lib
from mta_jax import export, tree_io
from mta_jax.model import TransformerLM

log = logging.getLogger(__name__)


def _param_paths(model_cfg: config_lib.ModelConfig) -> set[tuple[str, ...]]:
  abstract = nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0)))
  return set(tree_io.flatten(nnx.state(abstract, nnx.Param)))


def mta_param_names(model_cfg: config_lib.ModelConfig) -> frozenset[str]:
  """Leaf names ("kq_pre", "gate_w", ...) of the parameters `model_cfg` has only because of its
  attention settings (MTA, head mixing, group norm)."""
  plain = dataclasses.replace(model_cfg, attention=config_lib.AttentionConfig())
  return frozenset(p[-1] for p in _param_paths(model_cfg) - _param_paths(plain))


def _identity_init(cfg: config_lib.TrainConfig, wanted: dict) -> dict:
  """{path: array} for `wanted` ({path: ShapeDtypeStruct with sharding}): the values the
  model's initialisers give with attention.init="identity" (only these leaves are computed)."""
  m = cfg.model
  model_cfg = dataclasses.replace(m, attention=dataclasses.replace(m.attention, init="identity"))

  def init():
    model = TransformerLM(model_cfg, rngs=nnx.Rngs(jax.random.key(cfg.seed)))
    flat = tree_io.flatten(nnx.state(model, nnx.Param))
    return {tree_io.path_str(p): flat[p].astype(leaf.dtype) for p, leaf in wanted.items()}

  shardings = {tree_io.path_str(p): leaf.sharding for p, leaf in wanted.items()}
  values = jax.jit(init, out_shardings=shardings)()
  return {p: values[tree_io.path_str(p)] for p in wanted}


def _source(src: str):
  """(kind, location, step) for a workdir / checkpoints dir / step dir / export dir."""
  from mta_jax import storage  # local or remote (gs://...) sources
  root = storage.path(src)
  if not root.exists():
    raise export.ExportError(
        f"checkpoint.init_from={src!r} does not exist; give a training workdir, one of its "
        "checkpoints/<step> directories, or an export directory.")
  if (root / export.MANIFEST).is_file():
    return "export", src, None
  subdir = ckpt_lib.CHECKPOINT_SUBDIR
  if (root / subdir).is_dir():
    return "workdir", src, None
  base = os.path.basename(src.rstrip("/"))  # (not normpath: it breaks gs://)
  parent = os.path.dirname(src.rstrip("/"))
  if base == subdir:
    return "workdir", parent, None
  if base.isdigit() and os.path.basename(parent) == subdir:
    return "workdir", os.path.dirname(parent), int(base)
  raise export.ExportError(f"checkpoint.init_from={src!r} is neither an export (no "
                           f"{export.MANIFEST}) nor a training workdir (no {subdir}/).")


def _read_source(source: str):
  """(stored TrainConfig, flat stored param shapes, load(target) -> nested params, step)."""
  kind, loc, step = _source(source)
  if kind == "export":
    export.read_manifest(loc, verify=True)
    from mta_jax import storage
    stored_cfg = config_lib.from_dict(config_lib.TrainConfig,
                                      json.loads((storage.path(loc) / "config.json").read_text()))
    params_dir = os.path.join(loc, "params")
    return (stored_cfg, tree_io.tree_metadata(params_dir),
            lambda target: tree_io.restore_tree(params_dir, target), None)
  with ckpt_lib.Checkpointer(loc, read_only=True) as ck:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise export.ExportError(f"checkpoint.init_from={source!r}: no checkpoint in "
                               f"{ck.directory}.")
    stored_cfg = config_lib.from_dict(config_lib.TrainConfig, ck.read_meta(step)["config"])
    stored = ck.stored_shapes(step, "params")

  def load(target):
    with ckpt_lib.Checkpointer(loc, read_only=True) as ck:
      return ck.restore_item(step, "params", target)

  return stored_cfg, stored, load, step


def _check_source_fits(source, stored_cfg, stored, cfg, want) -> None:
  """Model fields other than attention.* and every non-MTA parameter shape must match."""
  ignore = set(config_lib.RESTORE_COMPATIBLE_FIELDS) | {
      k for k in config_lib.resolved_model_fields(cfg.model) if k.startswith("attention.")}
  ckpt_lib.raise_incompatible(
      source, config_lib.model_config_diff(stored_cfg.model, cfg.model, ignore=ignore),
      "Retrofit keeps every weight of the source model: only model.attention.* may differ.")
  mta_names = mta_param_names(cfg.model)
  must_match = {p: v for p, v in want.items() if p in stored or p[-1] not in mta_names}
  ckpt_lib.raise_incompatible(
      source, tree_io.tree_shape_diff(stored, must_match, "params"),
      "Retrofit needs a source with the same model except for its attention settings.")


def retrofit(source: str, cfg: config_lib.TrainConfig, abstract_params, shardings=None):
  """Parameters for `cfg.model` initialised from another run's weights (paper App. I).

  Args:
    source: a training workdir (latest checkpoint), a `checkpoints/<step>` directory, or an
      export directory.
    cfg: the new run's config.
    abstract_params: the new model's params state (ShapeDtypeStruct or array leaves).
    shardings: matching shardings for the current mesh (None: from the leaves / one device).
  Returns:
    `abstract_params` filled with arrays (same structure, e.g. an nnx.State of nnx.Param).
  """
  stored_cfg, stored, load, step = _read_source(source)
  want = tree_io.abstract_flat(abstract_params, shardings)
  _check_source_fits(source, stored_cfg, stored, cfg, want)
  flat = tree_io.flatten(load(tree_io.nest({p: want[p] for p in stored})))
  added = {p: want[p] for p in sorted(set(want) - set(stored))}
  flat.update(_identity_init(cfg, added))
  names = [tree_io.path_str(p) for p in added]
  log.info("retrofit from %s%s: loaded %d parameter arrays, %d MTA parameters start at "
           "identity (%s%s)", source, f" (step {step})" if step is not None else "",
           len(stored), len(names), ", ".join(names[:6]), " ..." if len(names) > 6 else "")
  return tree_io.fill(abstract_params, flat)
