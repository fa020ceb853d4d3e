"""Params-only exports and loading them back.

Export layout (one self-contained directory; nothing refers back to the training workdir):

    <export_dir>/
      export.json         manifest: format, version, source step, dtype, parameter count,
                          tokenizer file (or null), sha256 of every other file
      config.json         the resolved TrainConfig (`model` is what `load_exported` builds)
      params/             Orbax PyTree checkpoint of the parameters (nested dict, no optimizer)
      model.safetensors   the same tensors, flat names such as "blocks.0.attn.wq", for use
                          outside JAX (PyTorch, NumPy); metadata carries the config JSON
      tokenizer.model     copy of data.tokenizer (any kind: told apart by content) when the
                          run used one, with tokenizer_config.json if one lay beside it

Written into a temporary sibling directory and renamed when complete, so a killed export never
leaves a directory that looks finished (a bucket `export_dir`, gs://..., is built locally and
uploaded with the manifest last). Every file is read through etils.epath. Create one with

    python train.py --mode=export --workdir=<run> [--config.checkpoint.export_dir=<dir>]
                    [--config.checkpoint.export_dtype=bfloat16]

and load it with `load_exported(<dir>)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mta_jax import checkpoint as ckpt_lib
from mta_jax import config as config_lib
from mta_jax import faults, paths, sharding, storage, tree_io
from mta_jax.model import TransformerLM

log = logging.getLogger(__name__)

EXPORT_FORMAT = "mta_jax.export"
EXPORT_VERSION = 1
MANIFEST = "export.json"
SAFETENSORS = "model.safetensors"
TOKENIZER = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"

class ExportError(RuntimeError):
  """A missing, incomplete or corrupt export; the message names the path."""


@dataclasses.dataclass
class Exported:
  """What `load_exported` returns: a ready `TransformerLM` and what describes it."""
  model: TransformerLM
  config: config_lib.TrainConfig
  step: int
  tokenizer: Optional[str]      # absolute path of the exported tokenizer file, or None
  manifest: dict


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _sha256(path) -> str:
  h = hashlib.sha256()
  with storage.path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _file_hashes(root: str) -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(root):
    for f in sorted(files):
      full = os.path.join(d, f)
      rel = os.path.relpath(full, root)
      if rel != MANIFEST:
        out[rel] = _sha256(full)
  return dict(sorted(out.items()))


def _export_dtypes(model_cfg: config_lib.ModelConfig) -> dict[tuple[str, ...], Any]:
  """Leaf dtypes of the model `model_cfg` describes (MTA weights stay float32)."""
  abstract = nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0)))
  return {p: v.dtype for p, v in tree_io.flatten(nnx.state(abstract, nnx.Param)).items()}


def write_export(out_dir: str, params_flat: Mapping[tuple[str, ...], np.ndarray],
                 cfg: config_lib.TrainConfig, *, step: int, tokenizer: Optional[str],
                 overwrite: bool = True) -> str:
  """Write the export layout (see module docstring) atomically. Returns `out_dir`."""
  out_dir = paths.resolve(out_dir)
  out = storage.path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise ExportError(f"{out_dir} is a file, not a directory; choose another export "
                        "directory (--config.checkpoint.export_dir).")
    if not (out / MANIFEST).exists():
      raise ExportError(f"{out_dir} exists and is not an export; choose another export "
                        "directory (--config.checkpoint.export_dir) or remove it.")
    if not overwrite:
      raise ExportError(f"{out_dir} already holds an export; pass overwrite=True to replace it.")
  if tokenizer and not storage.path(tokenizer).is_file():
    raise ExportError(f"tokenizer {tokenizer!r} (data.tokenizer) does not exist; the export "
                      "would not be self-contained. Fix the path or clear data.tokenizer.")
  if paths.is_uri(out_dir):  # built on local disk, then uploaded with the manifest last
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, "export")
      _write_files(local, params_flat, cfg, step, tokenizer)
      _upload(local, out)
    return out_dir
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{int(time.time())}")
  try:
    _write_files(tmp, params_flat, cfg, step, tokenizer)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _write_files(tmp: str, params_flat, cfg, step: int, tokenizer: Optional[str]) -> None:
  """The export layout in the local directory `tmp`, manifest included."""
  os.makedirs(tmp)
  tree_io.save_tree(os.path.join(tmp, "params"), tree_io.nest(params_flat))
  cfg_dict = config_lib.to_dict(cfg)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    f.write(json.dumps(cfg_dict, indent=2, sort_keys=True))
  from safetensors.numpy import save_file
  save_file({tree_io.path_str(p): np.array(v, order="C") for p, v in params_flat.items()},
            os.path.join(tmp, SAFETENSORS),
            metadata={"format": EXPORT_FORMAT, "config": json.dumps(cfg_dict["model"]),
                      "step": str(step)})
  if tokenizer:
    src = storage.path(tokenizer)
    with open(os.path.join(tmp, TOKENIZER), "wb") as f:
      f.write(src.read_bytes())
    beside = src.parent / TOKENIZER_CONFIG  # HF special tokens, read by data.tokenizer
    if beside.is_file():
      with open(os.path.join(tmp, TOKENIZER_CONFIG), "wb") as f:
        f.write(beside.read_bytes())
  dtypes = sorted({str(v.dtype) for v in params_flat.values()})
  manifest = {
      "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "step": int(step),
      "param_dtypes": dtypes, "n_params": int(sum(v.size for v in params_flat.values())),
      "tokenizer": TOKENIZER if tokenizer else None,
      "tokenizer_source": tokenizer or None,
      "files": _file_hashes(tmp),
  }
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def _upload(local: str, out) -> None:
  """Copies a finished local export to a bucket: an old export's manifest goes first and the
  new one comes last, so an interrupted upload never looks like a complete export."""
  if (out / MANIFEST).exists():
    (out / MANIFEST).unlink()
  if out.exists():
    out.rmtree()
  for d, _, files in os.walk(local):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), local)
      if rel != MANIFEST:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(d, f), "rb") as fh:
          dst.write_bytes(fh.read())
  with open(os.path.join(local, MANIFEST), "rb") as fh:
    (out / MANIFEST).write_bytes(fh.read())


def export_checkpoint(workdir: str, out_dir: str, *, dtype: str = "", step: Optional[int] = None,
                      cfg: Optional[config_lib.TrainConfig] = None) -> str:
  """Export the parameters of checkpoint `step` (None: latest) of the run in `workdir`.

  The checkpoint's own stored config defines the model; `cfg` (the command line's) only adds a
  warning when its model differs. dtype "bfloat16" casts every parameter that a
  `param_dtype=bfloat16` model keeps in bf16 (the MTA kernels stay float32).
  """
  config_lib.check_choice("checkpoint.export_dtype", dtype, ("", "float32", "bfloat16"))
  if jax.process_count() > 1:
    raise ExportError("export gathers every parameter on one host: run --mode=export as a "
                      "single process (any device count; the checkpoint is resharded).")
  if not ckpt_lib.checkpoint_dir(workdir).exists():
    raise ExportError(f"no checkpoints in {workdir} (expected {ckpt_lib.checkpoint_dir(workdir)}"
                      "); train first, or pass the run's --workdir.")
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    if step is None or step < 0:  # the newest checkpoint that reads back and verifies
      candidates = sorted(ck.all_steps(), reverse=True)
    else:
      candidates = [int(step)]
      if step not in ck.all_steps():
        raise ExportError(f"checkpoint step {step} not found in {ck.directory}; available: "
                          f"{ck.all_steps()}.")
    errors = []
    for step in candidates:
      try:
        step, meta, stored, params = _read_checkpoint(ck, step, cfg)
        break
      except (ExportError, config_lib.ConfigError):
        raise
      except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: try the previous one
        errors.append(f"step {step}: {faults.one_line(e)}")
        if len(candidates) > 1:
          log.warning("checkpoint %s/%d cannot be exported (%s); trying the previous one.",
                      ck.directory, step, errors[-1])
    else:
      raise ExportError(f"no checkpoint in {ck.directory} can be exported:\n  " +
                        "\n  ".join(errors))
  finally:
    ck.close()
  if dtype:
    stored.model.param_dtype = dtype
    want = _export_dtypes(stored.model)
    params = {p: v.astype(want.get(p, v.dtype)) if np.issubdtype(v.dtype, np.floating) or
              v.dtype == jnp.bfloat16 else v for p, v in params.items()}
  tokenizer = meta.get("tokenizer") or None
  out = write_export(out_dir, params, stored, step=step, tokenizer=tokenizer)
  log.info("exported step %d of %s to %s", step, workdir, out)
  return out


def _read_checkpoint(ck, step: int, cfg: Optional[config_lib.TrainConfig]):
  """(step, meta, stored config, flat params) of one verified checkpoint."""
  ck.verify_step(step)
  meta = ck.read_meta(step)
  stored = config_lib.from_dict(config_lib.TrainConfig, meta["config"],
                                f"{ck.directory}/{step}/meta")
  if cfg is not None:
    diffs = config_lib.model_config_diff(stored.model, cfg.model, ignore=())
    if diffs:
      log.warning("exporting with the checkpoint's own model config, which differs from the "
                  "command line's: %s", "; ".join(diffs))
  shapes = ck.stored_shapes(step, "params")
  target = tree_io.nest({p: np.zeros(m.shape, m.dtype) for p, m in shapes.items()})
  params = tree_io.flatten(ck.restore_item(step, "params", target))
  return step, meta, stored, params


def export_main(cfg: config_lib.TrainConfig, workdir: str) -> str:
  """`python train.py --mode=export`: export the run in `workdir` per cfg.checkpoint."""
  c = cfg.checkpoint
  out = c.export_dir or os.path.join(workdir, "export")
  path = export_checkpoint(workdir, out, dtype=c.export_dtype,
                           step=None if c.export_step < 0 else c.export_step, cfg=cfg)
  if jax.process_index() == 0:
    manifest = read_manifest(path, verify=False)
    print(f"exported step {manifest['step']} ({manifest['n_params']:,} parameters, "
          f"{'/'.join(manifest['param_dtypes'])}) to {path}")
  return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_manifest(path: str, verify: bool = True) -> dict:
  """The export's manifest; with `verify`, every file is checked against its sha256."""
  root = storage.path(path)
  if not root.is_dir():
    raise ExportError(f"no exported model at {path!r}: the directory does not exist. Create one "
                      "with `python train.py --mode=export --workdir=<run>`.")
  mpath = root / MANIFEST
  if not mpath.is_file():
    raise ExportError(f"{path!r} is not a complete export: {MANIFEST} is missing (an export "
                      "interrupted before it finished, or another kind of directory).")
  try:
    manifest = json.loads(mpath.read_text())
  except (OSError, ValueError) as e:
    raise ExportError(f"{mpath} is unreadable or corrupt: {e}") from e
  if not isinstance(manifest, dict):
    raise ExportError(f"{mpath} is not a JSON object (got {type(manifest).__name__}).")
  if manifest.get("format") != EXPORT_FORMAT or manifest.get("version") != EXPORT_VERSION:
    raise ExportError(f"{mpath}: format {manifest.get('format')!r} version "
                      f"{manifest.get('version')!r}; this code reads {EXPORT_FORMAT!r} version "
                      f"{EXPORT_VERSION}.")
  _check_manifest(path, mpath, manifest)
  if verify:
    for rel, digest in manifest["files"].items():
      full = root / rel
      if not full.is_file():
        raise ExportError(f"export {path!r} is incomplete: {rel} is missing.")
      if _sha256(full) != digest:
        raise ExportError(f"export {path!r} is corrupt: {rel} does not match its checksum in "
                          f"{MANIFEST}. Re-export from the training checkpoint.")
  return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _inside(root: str, rel) -> bool:
  """`rel` is a plain relative path that stays inside `root` (symlinks resolved)."""
  if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
    return False
  if any(part in ("", ".", "..") for part in rel.split("/")):
    return False
  if storage.is_remote(root):  # object stores have no symlinks: the parts above decide
    return True
  real_root = os.path.realpath(root)
  return os.path.realpath(os.path.join(root, rel)).startswith(real_root + os.sep)


def _check_manifest(path: str, mpath: str, manifest: dict) -> None:
  """ExportError unless the manifest lists every file the export needs, with a sha256 each,
  every path inside the export directory, and well-typed fields."""
  def bad(msg):
    raise ExportError(f"{mpath} is malformed: {msg}. Re-export from the training checkpoint.")
  files = manifest.get("files")
  if not isinstance(files, dict) or not files:
    bad("'files' must be a non-empty object {relative path: sha256}")
  for rel, digest in files.items():
    if not _inside(path, rel):
      bad(f"file {rel!r} is not a relative path inside the export directory")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
      bad(f"file {rel!r} has no sha256 (got {digest!r})")
  if not isinstance(manifest.get("step"), int) or manifest["step"] < 0:
    bad(f"'step' must be a non-negative integer (got {manifest.get('step')!r})")
  tok = manifest.get("tokenizer")
  if tok is not None and (not _inside(path, tok) or tok not in files):
    bad(f"'tokenizer' {tok!r} must be one of the listed files inside the export directory")
  needed = ["config.json", SAFETENSORS]
  missing = [n for n in needed if n not in files]
  if not any(rel.startswith("params/") for rel in files):
    missing.append("params/...")
  if missing:
    bad(f"it does not list {missing}")
  root = storage.path(path)
  if (root / "params").is_dir():
    on_disk = {(d / f).relative_to(root).as_posix()
               for d, _, fs in (root / "params").walk() for f in fs}
    unlisted = sorted(on_disk - set(files))
    if unlisted:
      bad(f"files of params/ are not listed: {unlisted[:5]}")


def load_exported(path: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                  from_safetensors: bool = False, verify: bool = True,
                  dtype: Optional[str] = None) -> Exported:
  """Load an export into a ready `TransformerLM` (evaluation / generation).

    ex = load_exported("runs/tiny/export")
    logits = ex.model(tokens_BxT)              # float32 [B, T, V]
    ex.config.model, ex.step, ex.tokenizer     # what the model is, which step, tokenizer file

  Args:
    path: an export directory (see the module docstring for its layout).
    mesh: place the parameters sharded on this mesh (logical-axis rules, as in training);
      None puts them on the default device.
    from_safetensors: read model.safetensors instead of the Orbax params (same values).
    verify: check every file against the manifest's sha256 first (a corrupt or truncated
      file is an ExportError naming it).
    dtype: override the model's compute dtype ("float32" | "bfloat16").
  Raises:
    ExportError: missing / incomplete / corrupt export, or parameters that do not fit the
      stored config.
  """
  manifest = read_manifest(path, verify=verify)
  cfg = config_lib.from_dict(config_lib.TrainConfig,
                             json.loads((storage.path(path) / "config.json").read_text()),
                             os.path.join(path, "config.json"))
  if dtype:
    cfg.model.dtype = dtype
  abstract = nnx.eval_shape(lambda: TransformerLM(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abs_params = nnx.split(abstract, nnx.Param)
  shardings = sharding.state_shardings(abs_params, mesh) if mesh is not None else None
  want = tree_io.flatten(abs_params)
  if from_safetensors:
    from safetensors.numpy import load
    blob = (storage.path(path) / SAFETENSORS).read_bytes()
    flat = {tuple(k.split(".")): v for k, v in load(blob).items()}
    _check_tree(path, SAFETENSORS, flat, want)
    sh = tree_io.flatten(shardings) if shardings is not None else {}
    flat = {p: jax.device_put(jnp.asarray(v, want[p].dtype), sh.get(p)) for p, v in flat.items()}
  else:
    stored = tree_io.tree_metadata(os.path.join(path, "params"))
    _check_tree(path, "params", stored, want)
    target = tree_io.abstract_storable(abs_params, shardings)
    flat = tree_io.flatten(tree_io.restore_tree(os.path.join(path, "params"), target))
  params = tree_io.fill(abs_params, flat)
  model = nnx.merge(graphdef, params)
  tok = os.path.join(paths.resolve(path), manifest["tokenizer"]) if manifest.get(
      "tokenizer") else None
  return Exported(model=model, config=cfg, step=int(manifest["step"]), tokenizer=tok,
                  manifest=manifest)


def _check_tree(path, what, stored, want) -> None:
  diffs = tree_io.tree_shape_diff(stored, want, "params")
  if diffs:
    raise ExportError(f"export {path!r}: {what} does not fit its config.json:\n  " +
                      "\n  ".join(diffs[:20]))
