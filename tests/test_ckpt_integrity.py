"""Verified checkpoints: every file of a checkpoint has a sha256 in checksums.json; a flipped bit
in any item of the latest checkpoint makes restore fall back to the previous one with a warning
(in read-only use too, without changing anything); a wrong data-iterator state falls back too."""

import json
import logging
import os

import grain
import jax
import numpy as np
import pytest

from mta_jax import checkpoint, ckpt_integrity, sharding
import ckpt_util as cu


def _mesh():
  return sharding.make_mesh(8, 1, 1, devices=jax.devices()[:8])


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


@pytest.fixture(scope="module", params=[True, pytest.param(False, marks=pytest.mark.slow)],
                ids=["async", "sync"])
def saved(request, tmp_path_factory):
  """Steps 2 and 4 of a tiny run (with a data iterator), async or synchronous saves."""
  root = tmp_path_factory.mktemp("ck")
  cfg = cu.with_checkpoint(cu.tiny_config(), keep_last=3, async_save=request.param)
  mesh = _mesh()
  state, _ = cu.make_state(cfg, mesh)
  it = _iterator()
  states = {}
  ck = checkpoint.Checkpointer(root, cfg)
  for s in (2, 4):
    state = cu.perturb(state)
    next(it)
    ck.save(s, state, it)
    states[s] = state
  ck.close()
  return dict(root=root, cfg=cfg, mesh=mesh, states=states)


def _copy(saved, tmp_path):
  import shutil
  shutil.copytree(saved["root"], tmp_path / "w")
  return tmp_path / "w"


def _restore(workdir, saved, read_only=False):
  abstract, _ = cu.abstract_state(saved["cfg"], saved["mesh"])
  it = _iterator()
  with checkpoint.Checkpointer(workdir, saved["cfg"], read_only=read_only) as ck:
    restored, step, _ = ck.restore_latest(abstract, it)
  return restored, step, next(it)


def test_every_file_of_every_checkpoint_is_listed(saved):
  for step in (2, 4):
    d = saved["root"] / "checkpoints" / str(step)
    listed = json.loads((d / ckpt_integrity.CHECKSUMS).read_text())["files"]
    on_disk = {os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs}
    on_disk = {p for p in on_disk if os.path.basename(p) not in (  # Orbax's bookkeeping
        "commit_success.txt", "_CHECKPOINT_METADATA")}
    assert set(listed) == on_disk - {ckpt_integrity.CHECKSUMS}
    assert {p.split("/")[0] for p in listed} >= {"params", "opt_state", "data_iter", "meta"}
    assert ckpt_integrity.verify(d) == len(listed)


def _flip(path, offset_fraction=0.5):
  data = bytearray(path.read_bytes())
  data[int(len(data) * offset_fraction)] ^= 0x01
  path.write_bytes(bytes(data))


def _largest(d):
  """The item's largest data file (Orbax's bookkeeping files are not hashed)."""
  files = [p for p in d.rglob("*") if p.is_file()
           and p.name not in ("_CHECKPOINT_METADATA", "commit_success.txt")]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("item", ["params", "opt_state", "data_iter", "meta"])
def test_one_flipped_bit_in_any_item_falls_back_to_the_previous_checkpoint(
    saved, tmp_path, caplog, item):
  workdir = _copy(saved, tmp_path)
  _flip(_largest(workdir / "checkpoints" / "4" / item))
  with caplog.at_level(logging.WARNING):
    restored, step, next_row = _restore(workdir, saved)
  assert step == 2
  assert "does not match its checksums" in caplog.text and f"{item}/" in caplog.text
  for a, b in zip(cu.leaves(restored), cu.leaves(saved["states"][2])):
    np.testing.assert_array_equal(a, b)
  assert next_row == 1  # the iterator of step 2 (one element consumed)
  assert any(p.startswith("unreadable.4.") for p in os.listdir(workdir / "checkpoints"))


def test_read_only_restore_falls_back_and_changes_nothing(saved, tmp_path, caplog):
  workdir = _copy(saved, tmp_path)
  _flip(_largest(workdir / "checkpoints" / "4" / "params"))
  before = sorted(os.listdir(workdir / "checkpoints"))
  with caplog.at_level(logging.WARNING):
    _, step, _ = _restore(workdir, saved, read_only=True)
  assert step == 2 and "does not match its checksums" in caplog.text
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_a_wrong_iterator_state_falls_back(saved, tmp_path, caplog):
  workdir = _copy(saved, tmp_path)
  d = workdir / "checkpoints" / "4"
  f = next((d / "data_iter").glob("process_*.json"))
  record = json.loads(f.read_text())
  record["state"]["next_index"] = -5
  f.write_text(json.dumps(record))
  ckpt_integrity.write(d)  # a consistent checkpoint whose content is wrong
  with caplog.at_level(logging.WARNING):
    _, step, _ = _restore(workdir, saved)
  assert step == 2 and "next_index=-5" in caplog.text


def test_checkpoint_without_checksums_restores_with_a_warning(saved, tmp_path, caplog):
  workdir = _copy(saved, tmp_path)
  (workdir / "checkpoints" / "4" / ckpt_integrity.CHECKSUMS).unlink()
  with caplog.at_level(logging.WARNING):
    _, step, _ = _restore(workdir, saved)
  assert step == 4 and "no checksums" in caplog.text


def test_malformed_checksum_file_is_corruption(tmp_path):
  (tmp_path / ckpt_integrity.CHECKSUMS).write_text('{"format": "mta_jax.checksums", "files": {}}')
  with pytest.raises(ckpt_integrity.CorruptCheckpointError, match="malformed"):
    ckpt_integrity.verify(tmp_path)


def test_resume_on_other_data_is_refused_listing_differences(saved, tmp_path, caplog):
  import dataclasses
  abstract, _ = cu.abstract_state(saved["cfg"], saved["mesh"])
  other = dataclasses.replace(saved["cfg"])
  other.data = dataclasses.replace(other.data, seed=7, packing="first_fit")
  with checkpoint.Checkpointer(saved["root"], other, read_only=True) as ck:
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
      ck.restore_latest(abstract, _iterator())
    assert "data.seed: checkpoint 0, current 7" in str(e.value)
    assert "data.packing: checkpoint 'concat', current 'first_fit'" in str(e.value)
    assert "allow_data_change" in str(e.value)
    _, step, _ = ck.restore_latest(abstract, None)  # eval: any data is fine
    assert step == 4
  other.checkpoint = dataclasses.replace(other.checkpoint, allow_data_change=True)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(
      saved["root"], other, read_only=True) as ck:
    _, step, _ = ck.restore_latest(abstract, _iterator())
  assert step == 4 and "allow_data_change=True" in caplog.text


def test_data_signature_hashes_the_tokenizer_content(tmp_path):
  import dataclasses
  a, b = tmp_path / "a.model", tmp_path / "b.model"
  a.write_bytes(b"tokenizer one")
  b.write_bytes(b"tokenizer two")  # same size, same name pattern, other content
  cfg = cu.tiny_config()
  sigs = []
  for path in (a, a, b):
    c = dataclasses.replace(cfg)
    c.data = dataclasses.replace(c.data, tokenizer=str(path))
    sigs.append(checkpoint.data_signature(c))
  assert sigs[0] == sigs[1] and sigs[0]["tokenizer sha256"] != sigs[2]["tokenizer sha256"]
