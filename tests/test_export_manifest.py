"""Export manifests: every needed file listed with a sha256, every path inside the export
directory, every malformed manifest an ExportError; export skips a corrupt latest checkpoint."""

import json
import logging
import os
import shutil

import pytest

from mta_jax import export
from test_export import _trained_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("exp")
  tok = root / "tok.model"
  tok.write_bytes(b"not really a sentencepiece model")
  _, workdir, _ = _trained_run(root, tokenizer=tok)
  return export.export_checkpoint(str(workdir), str(root / "exp")), workdir


def _edit(exported, tmp_path, change):
  out = str(tmp_path / "exp")
  shutil.copytree(exported[0], out)
  mpath = os.path.join(out, export.MANIFEST)
  with open(mpath) as f:
    manifest = json.load(f)
  change(manifest, out)
  with open(mpath, "w") as f:
    json.dump(manifest, f)
  return out


def test_a_good_manifest_lists_every_needed_file(exported):
  m = export.read_manifest(exported[0])
  assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(m["files"])
  assert m["tokenizer"] == "tokenizer.model"


def _drop(name):
  def change(m, out):
    del m["files"][name]
  return change


def _drop_params(m, out):
  m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("params/")}


def _add_outside(m, out):
  m["files"]["../escape.txt"] = "0" * 64


@pytest.mark.parametrize("change,message", [
    (lambda m, out: m.update(files={}), "non-empty"),
    (lambda m, out: m.pop("files"), "non-empty"),
    (lambda m, out: m.update(files=["config.json"]), "non-empty"),
    (lambda m, out: m.update(tokenizer="/etc/passwd"), "'tokenizer' '/etc/passwd'"),
    (lambda m, out: m.update(tokenizer="../tok.model"), "'tokenizer' '../tok.model'"),
    (_add_outside, "'../escape.txt' is not a relative path inside"),
    (lambda m, out: m["files"].update({"/etc/passwd": "0" * 64}), "'/etc/passwd' is not"),
    (lambda m, out: m["files"].update({"config.json": "abc"}), "has no sha256"),
    (lambda m, out: m.update(step="6"), "'step'"),
    (lambda m, out: m.pop("step"), "'step'"),
    (_drop("config.json"), "does not list \\['config.json'\\]"),
    (_drop("model.safetensors"), "does not list \\['model.safetensors'\\]"),
    (_drop_params, "does not list \\['params/...'\\]"),
], ids=["empty", "no-files", "list", "abs-tokenizer", "rel-tokenizer", "dotdot", "abs-file",
        "bad-sha", "str-step", "no-step", "no-config", "no-safetensors", "no-params"])
def test_every_malformed_manifest_is_an_export_error(exported, tmp_path, change, message):
  out = _edit(exported, tmp_path, change)
  with pytest.raises(export.ExportError, match=message):
    export.read_manifest(out, verify=False)


def test_an_unlisted_params_file_is_an_error(exported, tmp_path):
  def change(m, out):
    rel = next(k for k in m["files"] if k.startswith("params/"))
    del m["files"][rel]
  out = _edit(exported, tmp_path, change)
  with pytest.raises(export.ExportError, match="not listed"):
    export.read_manifest(out, verify=False)


def test_a_symlink_out_of_the_export_is_refused(exported, tmp_path):
  def change(m, out):
    os.remove(os.path.join(out, "tokenizer.model"))
    os.symlink("/etc/hostname", os.path.join(out, "tokenizer.model"))
  out = _edit(exported, tmp_path, change)
  with pytest.raises(export.ExportError, match="tokenizer.model"):
    export.read_manifest(out, verify=False)


def test_export_skips_a_corrupt_latest_checkpoint(exported, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(exported[1], workdir)
  d = workdir / "checkpoints" / "6" / "params"
  victim = max((p for p in d.rglob("*") if p.is_file() and p.name not in (
      "_CHECKPOINT_METADATA", "commit_success.txt")), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 1
  victim.write_bytes(bytes(data))
  before = sorted(os.listdir(workdir / "checkpoints"))
  with caplog.at_level(logging.WARNING):
    out = export.export_checkpoint(str(workdir), str(tmp_path / "exp2"))
  assert export.read_manifest(out)["step"] == 3
  assert "does not match its checksums" in caplog.text
  assert sorted(os.listdir(workdir / "checkpoints")) == before
