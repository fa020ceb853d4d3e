"""Params-only export: layout, bf16 cast, safetensors copy, load_exported, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import ckpt_util as cu
import train_cli
from mta_jax import checkpoint, export, sharding, tree_io


def _trained_run(tmp_path, cfg=None, tokenizer=None):
  cfg = cfg or cu.tiny_config()
  if tokenizer:
    cfg.data.tokenizer = str(tokenizer)
  mesh = sharding.make_mesh(2, 2, 2)
  state, _ = cu.make_state(cfg, mesh)
  state = cu.perturb(state, 0.125)
  workdir = tmp_path / "run"
  with checkpoint.Checkpointer(workdir, cfg) as ck:
    ck.save(3, cu.perturb(state, 1.0))
    ck.save(6, state, meta={"tokens_seen": 6})
  return cfg, workdir, state


def _tokens():
  return jax.random.randint(jax.random.key(1), (2, 8), 0, 32)


def test_export_layout_and_load_exported(tmp_path):
  tok = tmp_path / "spm.model"
  tok.write_bytes(b"fake sentencepiece model")
  cfg, workdir, state = _trained_run(tmp_path, tokenizer=tok)
  out = export.export_checkpoint(str(workdir), str(tmp_path / "exp"), cfg=cfg)
  names = sorted(os.listdir(out))
  assert names == ["config.json", "export.json", "model.safetensors", "params",
                   "tokenizer.model"]
  manifest = json.load(open(os.path.join(out, "export.json")))
  assert manifest["step"] == 6 and manifest["param_dtypes"] == ["float32"]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".exp.tmp")]
  ex = export.load_exported(out)
  assert ex.step == 6 and ex.tokenizer == os.path.join(out, "tokenizer.model")
  assert ex.config.model == cfg.model
  # Same parameters as the checkpoint, and a model that runs.
  want = tree_io.flatten(state.params)
  from flax import nnx
  got = tree_io.flatten(nnx.state(ex.model, nnx.Param))
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_array_equal(jax.device_get(got[p]), jax.device_get(want[p]))
  logits = ex.model(_tokens())
  assert logits.shape == (2, 8, 32) and bool(jnp.all(jnp.isfinite(logits)))
  # The safetensors copy holds the same tensors under flat names.
  st = load_file(os.path.join(out, "model.safetensors"))
  assert "blocks.1.attn.kq_pre" in st
  for p in want:
    np.testing.assert_array_equal(st[".".join(p)], jax.device_get(want[p]))
  ex2 = export.load_exported(out, from_safetensors=True)
  np.testing.assert_array_equal(ex2.model(_tokens()), logits)


def test_export_bf16_keeps_mta_weights_float32(tmp_path):
  cfg, workdir, state = _trained_run(tmp_path)
  out = export.export_checkpoint(str(workdir), str(tmp_path / "exp"), dtype="bfloat16", step=3)
  st = load_file(os.path.join(out, "model.safetensors"))
  assert st["blocks.0.attn.wq"].dtype == ml_dtypes.bfloat16
  assert st["blocks.1.attn.kq_pre"].dtype == np.float32
  ex = export.load_exported(out)
  assert ex.step == 3 and ex.config.model.param_dtype == "bfloat16"
  assert ex.model.blocks[0].attn.wq[...].dtype == jnp.bfloat16
  assert ex.model.blocks[1].attn.kq_pre[...].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(ex.model(_tokens()))))


def test_load_exported_onto_a_mesh(tmp_path):
  cfg, workdir, state = _trained_run(tmp_path)
  out = export.export_checkpoint(str(workdir), str(tmp_path / "exp"))
  mesh = sharding.make_mesh(1, 4, 2)
  ex = export.load_exported(out, mesh=mesh)
  w = ex.model.blocks[0].attn.wq[...]
  assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_array_equal(jax.device_get(w),
                                jax.device_get(state.params["blocks"][0]["attn"]["wq"][...]))


def test_missing_export_path_is_a_clear_error(tmp_path):
  with pytest.raises(export.ExportError, match="does not exist"):
    export.load_exported(str(tmp_path / "nowhere"))
  (tmp_path / "half").mkdir()
  with pytest.raises(export.ExportError, match="export.json is missing"):
    export.load_exported(str(tmp_path / "half"))


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "params"])
def test_corrupt_export_file_is_a_clear_error(tmp_path, victim):
  _, workdir, _ = _trained_run(tmp_path)
  out = export.export_checkpoint(str(workdir), str(tmp_path / "exp"))
  path = os.path.join(out, victim)
  if os.path.isdir(path):
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\x00garbage\x00")
  with pytest.raises(export.ExportError, match="corrupt: .* does not match its checksum"):
    export.load_exported(out)


def test_export_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(export.ExportError, match="no checkpoints in"):
    export.export_checkpoint(str(tmp_path), str(tmp_path / "exp"))
  _, workdir, _ = _trained_run(tmp_path)
  with pytest.raises(export.ExportError, match="step 5 not found"):
    export.export_checkpoint(str(workdir), str(tmp_path / "exp"), step=5)


def test_export_refuses_to_overwrite_a_non_export(tmp_path):
  _, workdir, _ = _trained_run(tmp_path)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="is not an export"):
    export.export_checkpoint(str(workdir), str(tmp_path / "busy"))
  out = export.export_checkpoint(str(workdir), str(tmp_path / "exp"))
  assert export.export_checkpoint(str(workdir), out, step=3) == out  # re-export replaces
  assert export.read_manifest(out)["step"] == 3


def test_export_through_train_py(tmp_path):
  _, workdir, state = _trained_run(tmp_path)
  out_dir = tmp_path / "exported"
  p = train_cli.run("--mode=export", f"--workdir={workdir}",
                    f"--config.checkpoint.export_dir={out_dir}",
                    "--config.checkpoint.export_dtype=bfloat16", devices=1, check=True)
  assert "exported step 6" in p.stdout and str(out_dir) in p.stdout
  ex = export.load_exported(str(out_dir))
  assert ex.step == 6 and ex.config.model.param_dtype == "bfloat16"
  np.testing.assert_array_equal(
      np.asarray(ex.model.embed.embedding[...], np.float32),
      np.asarray(jnp.asarray(state.params["embed"]["embedding"][...]).astype(jnp.bfloat16),
                 np.float32))
