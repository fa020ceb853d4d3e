"""The toy task (docs/MTA.md Sec. 11): sample format, rows, determinism, iterators, error rate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import train_lib
from mta_jax.config import ConfigError, DataConfig, ModelConfig, ToyConfig, TrainConfig
from mta_jax.data import (check_vocab, make_eval_batches, make_train_iterator, toy,
                          validate_data)


def _cfg(seq_len=320, batch_size=8, eval_batch_size=0, **toy_kw):
  toy_cfg = ToyConfig(**{"n_train": 1000, "n_test": 37, **toy_kw})
  return TrainConfig(model=ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2,
                                       max_len=512),
                     data=DataConfig(source="toy", seq_len=seq_len, batch_size=batch_size,
                                     eval_batch_size=eval_batch_size, toy=toy_cfg))


def _sample(i=0, split=0, seed=0, **kw):
  kw = {"block_len": 5, "n_query": 2, "n_blocks": 52, "variant": "all", **kw}
  return toy.generate_sample(seed, split, i, **kw)


# --- format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_len,n_query,variant", [(5, 2, "all"), (8, 2, "first"),
                                                       (8, 3, "last"), (3, 3, "all")])
def test_sample_structure(block_len, n_query, variant):
  for i in range(30):
    s = _sample(i, block_len=block_len, n_query=n_query, variant=variant, n_blocks=40)
    assert len(s.blocks) == 40 and len(set(s.blocks)) == 40
    assert all(len(b) == block_len == len(set(b)) and b.isalpha() and b.islower()
               for b in s.blocks)
    assert len(s.query) == n_query == len(set(s.query))
    holders = [k for k, b in enumerate(s.blocks) if set(s.query) <= set(b)]
    assert holders == [s.target_index]
    target = s.blocks[s.target_index]
    assert s.answer == {"all": target, "first": target[0], "last": target[-1]}[variant]
    assert s.text == ".".join(s.blocks) + "#" + s.query + s.answer


def test_released_length_n5():
  # The released generator: 52 blocks of 5 -> 314 context characters + 5 answer = 319.
  s = _sample(3)
  assert len(s.context) == 314 and len(s.text) == 319
  assert toy.toy_sample_length(5, 2, 52, "all") == 319
  assert len(_sample(3, answer_sep=True).context) == 315


def test_target_position_is_spread_out():
  pos = [_sample(i, n_blocks=10).target_index for i in range(300)]
  assert set(pos) == set(range(10))


def test_determinism_and_split_disjointness():
  assert _sample(5) == _sample(5)
  assert _sample(5) != _sample(6)
  assert _sample(5, seed=1) != _sample(5)
  train = {_sample(i).context for i in range(300)}
  test = {_sample(i, split=toy.TEST_SPLIT).context for i in range(300)}
  assert len(train) == 300 and not train & test


def test_vocab_roundtrip_and_errors():
  assert toy.toy_vocab_size() == 32
  text = "abc.xyz#ay=q"
  ids = toy.encode(text)
  assert ids.dtype == np.int32 and ids.min() > toy.BOS_ID and ids.max() < 32
  assert toy.decode(ids) == text
  assert toy.decode(np.array([0, 0, *ids, toy.EOS_ID, 0])) == text + "<eos>"
  with pytest.raises(ValueError, match="not in the toy vocabulary"):
    toy.encode("aB")


# --- rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["all", "first", "last"])
def test_row_contents(variant):
  src = toy.ToyDataSource(ToyConfig(variant=variant, n_train=10), seq_len=330, split="train")
  s, row = src.sample(4), src[4]
  n = len(s.text)  # positions used: context + answer (the eos is only a target)
  assert {k: (v.shape, v.dtype.name) for k, v in row.items()} == {
      "inputs": ((330,), "int32"), "targets": ((330,), "int32"),
      "segment_ids": ((330,), "int32"), "positions": ((330,), "int32"),
      "loss_mask": ((330,), "float32")}
  assert toy.decode(row["inputs"]) == s.text
  np.testing.assert_array_equal(row["targets"][:n - 1], row["inputs"][1:n])
  assert row["targets"][n - 1] == toy.EOS_ID
  np.testing.assert_array_equal(row["segment_ids"], np.r_[np.ones(n), np.zeros(330 - n)])
  np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
  assert not row["positions"][n:].any() and not row["inputs"][n:].any()
  # The loss covers exactly the answer letters (as targets), not the eos.
  assert toy.decode(row["targets"][row["loss_mask"] > 0]) == s.answer
  assert np.flatnonzero(row["loss_mask"]).tolist() == list(range(n - 1 - len(s.answer), n - 1))


def test_seq_len_too_short_is_a_clear_error():
  with pytest.raises(ValueError, match=r"data.seq_len=300.*at least 319"):
    toy.ToyDataSource(ToyConfig(), seq_len=300)
  with pytest.raises(ConfigError, match=r"data.seq_len=318 .* at least 319"):
    toy.check_toy_config(ToyConfig(), seq_len=318)
  toy.check_toy_config(ToyConfig(), seq_len=319)


def test_config_checks():
  with pytest.raises(ConfigError, match="data.toy.variant"):
    toy.check_toy_config(ToyConfig(variant="middle"), seq_len=512)
  with pytest.raises(ConfigError, match="data.toy.n_query"):
    toy.check_toy_config(ToyConfig(n_query=6), seq_len=512)
  cfg = _cfg()
  validate_data(cfg)
  cfg.model.vocab_size = 31
  with pytest.raises(ConfigError, match=r"model.vocab_size=31 .* 32"):
    check_vocab(cfg)
  cfg.model.vocab_size = 128  # padded up: allowed
  check_vocab(cfg)


# --- iterators ----------------------------------------------------------------------------------


def test_train_iterator_batches_and_state_roundtrip():
  cfg = _cfg()
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  first = [next(it) for _ in range(3)]
  b = first[0]
  assert b["inputs"].shape == (8, 320) and b["loss_mask"].dtype == np.float32
  assert (b["loss_mask"].sum(1) == 5).all()
  state = it.get_state()
  expect = [next(it) for _ in range(2)]
  it2 = make_train_iterator(cfg, process_index=0, process_count=1)
  it2.set_state(state)
  for want in expect:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Same seed -> same stream; another seed -> another order.
  again = next(make_train_iterator(cfg, process_index=0, process_count=1))
  np.testing.assert_array_equal(again["inputs"], first[0]["inputs"])
  cfg.data.seed = 1
  other = next(make_train_iterator(cfg, process_index=0, process_count=1))
  assert not np.array_equal(other["inputs"], first[0]["inputs"])


def test_train_epochs_cover_the_training_set():
  cfg = _cfg(batch_size=10)
  cfg.data.toy.n_train = 30
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  src = toy.ToyDataSource(cfg.data.toy, 320)
  every = {toy.decode(src[i]["inputs"]) for i in range(30)}
  epoch1 = [toy.decode(r) for _ in range(3) for r in next(it)["inputs"]]
  epoch2 = [toy.decode(r) for _ in range(3) for r in next(it)["inputs"]]
  assert sorted(epoch1) == sorted(epoch2) == sorted(every)
  assert epoch1 != epoch2  # reshuffled per epoch


def test_multi_process_slicing_partitions_the_global_batch():
  cfg = _cfg(batch_size=8)
  single = next(make_train_iterator(cfg, process_index=0, process_count=1))
  parts = [next(make_train_iterator(cfg, process_index=p, process_count=4)) for p in range(4)]
  assert all(p["inputs"].shape == (2, 320) for p in parts)
  rows = lambda arr: sorted(map(bytes, arr))  # noqa: E731
  assert rows(np.concatenate([p["inputs"] for p in parts])) == rows(single["inputs"])
  with pytest.raises(ConfigError, match="data.batch_size=8"):
    make_train_iterator(cfg, process_index=0, process_count=3)


@pytest.mark.parametrize("pc", [1, 2])
def test_eval_reads_test_set_once_with_padding(pc):
  cfg = _cfg(batch_size=8, eval_batch_size=10)  # 37 test samples -> 4 global batches of 10
  batches = [list(make_eval_batches(cfg, process_index=p, process_count=pc)) for p in range(pc)]
  assert {len(b) for b in batches} == {4}
  assert all(x["inputs"].shape == (10 // pc, 320) for b in batches for x in b)
  scored = [toy.decode(r) for b in batches for x in b
            for r, m in zip(x["inputs"], x["loss_mask"]) if m.any()]
  src = toy.ToyDataSource(cfg.data.toy, 320, "test")
  assert sorted(scored) == sorted(toy.decode(src[i]["inputs"]) for i in range(37))
  pad = [x for b in batches for x in b for s, m in zip(x["segment_ids"], x["loss_mask"])
         if not s.any()]
  assert len(pad) == 3
  if pc == 1:  # unshuffled: file order
    assert scored == [toy.decode(src[i]["inputs"]) for i in range(37)]
  again = list(make_eval_batches(cfg, process_index=0, process_count=pc))
  np.testing.assert_array_equal(again[0]["inputs"], batches[0][0]["inputs"])


def test_workers_one_matches_in_process():
  cfg = _cfg(batch_size=4)
  want = next(make_train_iterator(cfg, process_index=0, process_count=1))
  cfg.data.workers = 1
  got = next(make_train_iterator(cfg, process_index=0, process_count=1))
  np.testing.assert_array_equal(got["inputs"], want["inputs"])


# --- error rate ---------------------------------------------------------------------------------


def _eval_batch():
  cfg = _cfg(eval_batch_size=6)
  cfg.data.toy.n_test = 4  # 4 real rows + 2 padding rows
  return next(iter(make_eval_batches(cfg, process_index=0, process_count=1)))


def _seq_error(pred, b):
  """(wrong, scored) sequences as the eval step counts them (`train_lib.loss_sums`), for a
  stand-in model that predicts `pred` [B, T]."""
  class Fixed:
    def __call__(self, *a, **k):
      return jax.nn.one_hot(jnp.asarray(pred), toy.TOY_VOCAB_SIZE)
  _, sums = train_lib.loss_sums(Fixed(), {k: jnp.asarray(v) for k, v in b.items()})
  return int(sums["seq_wrong"]), int(sums["seqs"])


def test_error_rate_counts_sequences_not_tokens():
  b = _eval_batch()
  pred = b["targets"].copy()
  assert _seq_error(pred, b) == (0, 4)
  pred[0, np.flatnonzero(b["loss_mask"][0])[2]] += 1  # one wrong answer token in row 0
  pred[1, 3] += 1  # a wrong prediction outside the answer does not count
  pred[5, :] = 7   # padding rows are never scored
  assert _seq_error(pred, b) == (1, 4)
  for r in (2, 3):
    pred[r, np.flatnonzero(b["loss_mask"][r])] = 0
  assert _seq_error(pred, b) == (3, 4)
