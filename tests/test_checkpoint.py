"""Checkpointer: round trip, retention, resharding, data iterator, refusals, faults (in-process).

The kill / SIGTERM / resume-equals-uninterrupted cases run the real training entry point in
subprocesses: see tests/test_checkpoint_train.py.
"""

import logging
import os
import signal
import time

import grain
import jax
import numpy as np
import pytest

from mta_jax import checkpoint, ckpt_integrity, sharding, tree_io
import ckpt_util as cu


def _mesh(data, fsdp, tensor):
  n = data * fsdp * tensor
  return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])


def _assert_equal(a, b):
  la, lb = cu.leaves(a), cu.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _save_steps(workdir, cfg, state, steps, data_iter=None):
  ck = checkpoint.Checkpointer(workdir, cfg)
  for s in steps:
    state = cu.perturb(state, 0.25)
    if ck.wants_save(s):
      ck.save(s, state, data_iter, {"tokens_seen": 100 * s})
  ck.close()
  return state


def test_round_trip_is_bitwise_and_meta_is_complete(tmp_path):
  cfg = cu.tiny_config()
  mesh = _mesh(2, 2, 2)
  state, _ = cu.make_state(cfg, mesh)
  final = _save_steps(tmp_path, cfg, state, range(1, 5))
  abstract, _ = cu.abstract_state(cfg, mesh)
  ck = checkpoint.Checkpointer(tmp_path, cfg)
  restored, step, meta = ck.restore_latest(abstract)
  ck.close()
  assert step == 4
  # Adam count, mu, nu and the optimizer step all come back
  assert len(jax.tree.leaves(restored.opt_state)) == 2 * len(
      jax.tree.leaves(restored.params)) + 2
  _assert_equal(restored, final)
  assert meta["tokens_seen"] == 400 and meta["step"] == 4
  assert meta["config"]["model"]["attention"]["pre_conv"] is True
  assert meta["process_count"] == 1 and meta["device_count"] == 8
  assert "tokenizer" in meta
  leaf = restored.params["blocks"][0]["attn"]["wq"]
  assert leaf.get_value().sharding.spec == sharding.logical_to_spec(
      ("embed", "heads", "head_dim"), leaf.get_value().shape, mesh)


def test_fresh_workdir_restores_none(tmp_path):
  cfg = cu.tiny_config()
  abstract, _ = cu.abstract_state(cfg, _mesh(8, 1, 1))
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    assert ck.restore_latest(abstract) is None


def test_retention_keeps_latest_k_plus_every_mth(tmp_path):
  cfg = cu.with_checkpoint(cu.tiny_config(), every_steps=1, keep_last=2, keep_every=4)
  state, _ = cu.make_state(cfg, _mesh(8, 1, 1))
  _save_steps(tmp_path, cfg, state, range(1, 11))
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept == [4, 8, 9, 10]


def test_keep_last_zero_keeps_everything(tmp_path):
  cfg = cu.with_checkpoint(cu.tiny_config(), every_steps=1, keep_last=0)
  state, _ = cu.make_state(cfg, _mesh(8, 1, 1))
  _save_steps(tmp_path, cfg, state, range(1, 6))
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept == [1, 2, 3, 4, 5]


def test_interval_policy_skips_off_interval_steps(tmp_path):
  cfg = cu.with_checkpoint(cu.tiny_config(), every_steps=3, keep_last=10)
  state, _ = cu.make_state(cfg, _mesh(8, 1, 1))
  _save_steps(tmp_path, cfg, state, range(1, 8))
  kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert kept == [3, 6]


@pytest.mark.parametrize("src,dst", [((8, 1, 1), (1, 1, 1)), ((2, 2, 2), (1, 4, 2)),
                                     ((1, 1, 1), (2, 2, 2))])
def test_restore_onto_another_mesh(tmp_path, src, dst):
  cfg = cu.tiny_config()
  state, _ = cu.make_state(cfg, _mesh(*src))
  final = _save_steps(tmp_path, cfg, state, [2])
  mesh = _mesh(*dst)
  abstract, shardings = cu.abstract_state(cfg, mesh)
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    restored, step, _ = ck.restore_latest(abstract)
  assert step == 2
  _assert_equal(restored, final)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert got.sharding == want  # laid out for the new mesh, not the one it was written on


def _grain_iter(seed=0):
  return iter(grain.MapDataset.range(1000).shuffle(seed=seed).to_iter_dataset())


def test_data_iterator_resumes_where_it_was(tmp_path):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  it = _grain_iter()
  seen = [next(it) for _ in range(5)]
  _save_steps(tmp_path, cfg, state, [2], data_iter=it)
  expected = [next(it) for _ in range(3)]
  fresh = _grain_iter()
  abstract, _ = cu.abstract_state(cfg, mesh)
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    _, _, meta = ck.restore_latest(abstract, fresh)
  assert meta["data_restarted"] is False
  assert [next(fresh) for _ in range(3)] == expected
  assert seen[0] != expected[0]


def test_data_iterator_from_other_process_count_restarts_with_warning(tmp_path, caplog):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  it = _grain_iter()
  for _ in range(5):
    next(it)
  _save_steps(tmp_path, cfg, state, [2], data_iter=it)
  # Rewrite the checkpoint as if two processes had written it.
  step_dir = tmp_path / "checkpoints" / "2"
  meta_file = step_dir / "meta" / "metadata"
  meta_file.write_text(meta_file.read_text().replace('"process_count": 1', '"process_count": 2'))
  os.rename(step_dir / "data_iter" / "process_0-of-1.json",
            step_dir / "data_iter" / "process_0-of-2.json")
  ckpt_integrity.write(step_dir)  # as that run would have written them
  fresh = _grain_iter()
  abstract, _ = cu.abstract_state(cfg, mesh)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path, cfg) as ck:
    _, step, meta = ck.restore_latest(abstract, fresh)
  assert step == 2 and meta["data_restarted"] is True
  assert "cannot follow" in caplog.text and "2 process" in caplog.text
  assert next(fresh) == next(_grain_iter())  # restarted from the beginning, deterministically


@pytest.mark.parametrize("change,message", [
    (dict(pre_conv=False), "model.attention.pre_conv: checkpoint True, current False"),
    (dict(c_k=5), "model.attention.c_k: checkpoint 3, current 5"),
    (dict(kq_layers=(0,)), "model.attention.kq_layers: checkpoint [1], current [0]"),
])
def test_incompatible_config_is_refused_naming_the_field(tmp_path, change, message):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  _save_steps(tmp_path, cfg, state, [2])
  other = cu.tiny_config(**change)
  abstract, _ = cu.abstract_state(other, mesh)
  with checkpoint.Checkpointer(tmp_path, other) as ck:
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=message.replace(
        "[", r"\[").replace("]", r"\]")):
      ck.restore_latest(abstract)
  assert (tmp_path / "checkpoints" / "2").exists()  # refused, not quarantined


def test_shape_mismatch_without_config_is_refused(tmp_path):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  _save_steps(tmp_path, cfg, state, [2])
  other = cu.tiny_config()
  other.model.d_model = 32
  abstract, _ = cu.abstract_state(other, mesh)
  with checkpoint.Checkpointer(tmp_path, other) as ck:
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="model.d_model: checkpoint 16"):
      ck.restore_latest(abstract)


def test_restore_compatible_across_dtype_and_implementation(tmp_path):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  final = _save_steps(tmp_path, cfg, state, [2])
  other = cu.tiny_config(dropout=0.1)
  other.model.dtype = "bfloat16"
  other.model.remat = "full"
  abstract, _ = cu.abstract_state(other, mesh)
  with checkpoint.Checkpointer(tmp_path, other) as ck:
    restored, _, _ = ck.restore_latest(abstract)
  _assert_equal(restored, final)


def _largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  cfg = cu.with_checkpoint(cu.tiny_config(), keep_last=3)
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  ck = checkpoint.Checkpointer(tmp_path, cfg)
  good = None
  for s in (2, 4):
    state = cu.perturb(state)
    ck.save(s, state)
    if s == 2:
      good = state
  ck.close()
  victim = _largest_file(tmp_path / "checkpoints" / "4" / "params")
  with open(victim, "r+b") as f:  # truncate the array data, as a kill mid-write would
    f.truncate(os.path.getsize(victim) // 2)
  abstract, _ = cu.abstract_state(cfg, mesh)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path, cfg) as ck:
    restored, step, _ = ck.restore_latest(abstract)
    assert step == 2
    _assert_equal(restored, good)
    assert ck.all_steps() == [2]
    ck.save(4, cu.perturb(restored))  # the step can be written again after the fallback
  assert "unreadable" in caplog.text and "falling back" in caplog.text
  assert any(p.startswith("unreadable.4.") for p in os.listdir(tmp_path / "checkpoints"))


def test_corrupt_meta_falls_back(tmp_path, caplog):
  cfg = cu.with_checkpoint(cu.tiny_config(), keep_last=3)
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  _save_steps(tmp_path, cfg, state, [2, 4])
  (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text('{"step": 4, "conf')
  abstract, _ = cu.abstract_state(cfg, mesh)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path, cfg) as ck:
    _, step, _ = ck.restore_latest(abstract)
  assert step == 2 and "falling back" in caplog.text


def test_no_readable_checkpoint_is_an_error(tmp_path):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  _save_steps(tmp_path, cfg, state, [2])
  (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("not json")
  abstract, _ = cu.abstract_state(cfg, mesh)
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
      ck.restore_latest(abstract)
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # nothing moved: a rerun fails the same


def test_checkpoint_without_iterator_state_restarts_the_stream_with_warning(tmp_path, caplog):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  _save_steps(tmp_path, cfg, state, [2], data_iter=None)
  fresh = _grain_iter()
  abstract, _ = cu.abstract_state(cfg, mesh)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path, cfg) as ck:
    _, step, meta = ck.restore_latest(abstract, fresh)
  assert step == 2 and meta["data_restarted"] is True
  assert "holds no data-iterator state" in caplog.text
  assert next(fresh) == next(_grain_iter())


def test_half_written_tmp_directory_is_ignored(tmp_path, caplog):
  cfg = cu.tiny_config()
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  final = _save_steps(tmp_path, cfg, state, [2])
  # What a kill during the save of step 4 leaves behind (Orbax commits by renaming).
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  (tmp / "params").mkdir(parents=True)
  (tmp / "params" / "_METADATA").write_text("{")
  abstract, _ = cu.abstract_state(cfg, mesh)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(tmp_path, cfg) as ck:
    restored, step, _ = ck.restore_latest(abstract)
  assert step == 2
  _assert_equal(restored, final)
  assert "incomplete checkpoint" in caplog.text


def test_sigterm_requests_a_save_at_the_next_step_boundary(tmp_path):
  cfg = cu.with_checkpoint(cu.tiny_config(), every_steps=100)
  mesh = _mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  ck = checkpoint.Checkpointer(tmp_path, cfg)
  try:
    assert not ck.wants_save(3) and not ck.should_stop(3)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ck.should_stop(4)
    assert ck.wants_save(4) and ck.save(4, state)
    assert ck.should_stop(5)
  finally:
    ck.close()
  assert signal.getsignal(signal.SIGTERM) is not ck._on_signal
  assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == ["4"]


def test_ctrl_c_saves_like_sigterm_and_a_second_one_aborts(tmp_path, capsys):
  cfg = cu.with_checkpoint(cu.tiny_config(), every_steps=100)
  before = signal.getsignal(signal.SIGINT)
  ck = checkpoint.Checkpointer(tmp_path, cfg)
  try:
    assert not ck.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert ck.should_stop(2)
    assert "Ctrl-C again to abort" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode boundary
  finally:
    ck.close()
  assert signal.getsignal(signal.SIGINT) is before


def test_on_disk_layout_of_the_train_state(tmp_path):
  # The layout old checkpoints have: params/ holds TrainState.params, opt_state/ holds
  # {'step': TrainState.step, 'opt_state': TrainState.opt_state}, keyed by pytree path.
  cfg = cu.tiny_config()
  state, _ = cu.make_state(cfg, _mesh(8, 1, 1))
  with checkpoint.Checkpointer(tmp_path, cfg) as ck:
    ck.save(7, state)
  with checkpoint.Checkpointer(tmp_path, read_only=True) as ck:
    params, rest = ck.stored_shapes(7, "params"), ck.stored_shapes(7, "opt_state")
  assert set(params) == set(tree_io.flatten(state.params))
  assert ("step",) in rest and set(rest) - {("step",)} == {
      ("opt_state",) + p for p in tree_io.flatten(state.opt_state)}
  assert ("blocks", "0", "attn", "wq") in params and rest[("step",)].shape == ()
  with checkpoint.Checkpointer(tmp_path, cfg) as ck, pytest.raises(TypeError, match="TrainState"):
    ck.save(8, {"params": state.params, "opt_state": state.opt_state, "step": state.step})
