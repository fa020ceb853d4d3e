"""prepare at pretraining scale: compressed .jsonl.zst / .gz inputs, Hugging Face `datasets`
directories, worker processes; and training on a weighted mixture of prepared datasets."""

import gzip
import json

import numpy as np
import pytest

from mta_jax import config
from mta_jax.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from mta_jax.data import make_eval_batches, make_train_iterator, prepare, sources, text_pipeline
from mta_jax.data import tokenizer

from test_tokenizers import write_tiktoken


def _texts(path, split):
  src = sources.open_prepared(path, split)
  return [src[i]["text"].decode() for i in range(len(src))]


def _zst(path, data: bytes):
  import zstandard
  path.write_bytes(zstandard.ZstdCompressor().compress(data))


def _jsonl(docs, key="text"):
  return "".join(json.dumps({key: d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs))


def test_compressed_inputs_read_like_plain_ones(tmp_path):
  docs = [f"document {i} with some words" for i in range(60)]
  (tmp_path / "in").mkdir()
  _zst(tmp_path / "in" / "a.jsonl.zst", _jsonl(docs[:20]).encode())
  (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[20:40]).encode()))
  (tmp_path / "in" / "c.txt.gz").write_bytes(gzip.compress("\n".join(docs[40:]).encode()))
  (tmp_path / "in" / "ignored.csv").write_text("x,y\n")
  p = prepare.prepare([str(tmp_path / "in")], str(tmp_path / "d"), "mixed",
                      validation_fraction=0.1, seed=2)
  train, val = _texts(p, "train"), _texts(p, "validation")
  assert len(val) == 6 and sorted(train + val) == sorted(docs)
  order = {d: i for i, d in enumerate(docs)}
  assert [order[d] for d in train] == sorted(order[d] for d in train)  # file order kept
  # The same text uncompressed gives the same dataset.
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "a.jsonl").write_text(_jsonl(docs[:20]))
  (tmp_path / "plain" / "b.jsonl").write_text(_jsonl(docs[20:40]))
  (tmp_path / "plain" / "c.txt").write_text("\n".join(docs[40:]))
  q = prepare.prepare([str(tmp_path / "plain")], str(tmp_path / "d"), "plain",
                      validation_fraction=0.1, seed=2)
  assert _texts(q, "train") == train and _texts(q, "validation") == val


def test_broken_compressed_file_is_one_clear_error(tmp_path):
  (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
  with pytest.raises(prepare.PrepareError, match=r"bad.jsonl.zst: not a valid zstd file"):
    prepare.prepare([str(tmp_path / "bad.jsonl.zst")], str(tmp_path / "d"), "x")
  (tmp_path / "bad.txt.gz").write_bytes(b"not gzip")
  with pytest.raises(prepare.PrepareError, match=r"bad.txt.gz: cannot be read"):
    prepare.prepare([str(tmp_path / "bad.txt.gz")], str(tmp_path / "d"), "x")
  _zst(tmp_path / "nokey.jsonl.zst", _jsonl(["a", "b"], key="content").encode())
  with pytest.raises(prepare.PrepareError, match=r"nokey.jsonl.zst:1: no field --text_key"):
    prepare.prepare([str(tmp_path / "nokey.jsonl.zst")], str(tmp_path / "d"), "x")


def test_huggingface_save_to_disk_inputs(tmp_path):
  datasets = pytest.importorskip("datasets")
  docs = [f"row {i} of the hub" for i in range(30)]
  datasets.Dataset.from_dict({"content": docs, "n": list(range(30))}).save_to_disk(
      str(tmp_path / "ds"))
  p = prepare.prepare([str(tmp_path / "ds")], str(tmp_path / "d"), "hub", text_key="content",
                      validation_fraction=0)
  assert _texts(p, "train") == docs
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:10]}),
                        "test": datasets.Dataset.from_dict({"text": docs[10:]})}).save_to_disk(
                            str(tmp_path / "dd"))
  p = prepare.prepare([str(tmp_path / "dd")], str(tmp_path / "d"), "hub_test", hf_split="test",
                      validation_fraction=0)
  assert _texts(p, "train") == docs[10:]
  with pytest.raises(prepare.PrepareError, match=r"--hf_split='dev' is not a split .*'test', "
                                                 r"'train'"):
    prepare.prepare([str(tmp_path / "dd")], str(tmp_path / "d"), "x", hf_split="dev")
  with pytest.raises(prepare.PrepareError, match=r"no column --text_key='text'"):
    prepare.prepare([str(tmp_path / "ds")], str(tmp_path / "d"), "x")


def test_worker_processes_give_the_same_dataset(tmp_path, capsys):
  rng = np.random.default_rng(0)
  docs = [f"doc {i} " + "word " * int(rng.integers(1, 20)) for i in range(200)]
  for k in range(5):
    _zst(tmp_path / f"part{k}.jsonl.zst", _jsonl(docs[40 * k:40 * (k + 1)]).encode())
  a = prepare.prepare([str(tmp_path / "*.zst")], str(tmp_path / "d"), "serial", seed=1,
                      validation_fraction=0.05)
  capsys.readouterr()
  b = prepare.main([f"--input={tmp_path}/*.zst", f"--output={tmp_path}/d", "--name=parallel",
                    "--seed=1", "--validation_fraction=0.05", "--workers=2"])
  out = capsys.readouterr()
  assert b == 0 and "with 2 workers" in out.out and "counting" in out.err  # the progress bar
  b = str(tmp_path / "d" / "parallel" / "1.0.0")
  for split in ("train", "validation"):
    assert _texts(a, split) == _texts(b, split)


# --- mixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  out = {}
  for name, n in (("alpha", 80), ("beta", 50)):
    (root / f"{name}.txt").write_text("".join(f"{name} {i}\n" for i in range(n)))
    out[name] = prepare.prepare([str(root / f"{name}.txt")], str(root / "data"), name,
                                validation_fraction=0.1)
  write_tiktoken(root / "tok.tiktoken", extra_words=("alpha", "beta"))
  out["tokenizer"] = str(root / "tok.tiktoken")
  return out


def _mix_cfg(ds, mixture, **kw):
  tok = tokenizer.Tokenizer(ds["tokenizer"])
  d = dict(source="text", mixture=mixture, tokenizer=ds["tokenizer"], seq_len=16, batch_size=4)
  d.update(kw)
  return TrainConfig(model=ModelConfig(vocab_size=-(-tok.vocab_size // 128) * 128, d_model=32,
                                       n_layers=1, n_heads=2, max_len=16),
                     data=DataConfig(**d)), tok


def test_mixture_draws_by_weight_and_is_deterministic(two_datasets):
  ds = two_datasets
  cfg, tok = _mix_cfg(ds, f"{ds['alpha']}:1,{ds['beta']}:3")
  config.validate(cfg)
  docs = text_pipeline.train_documents(cfg, 0, 1)
  names = [tok.decode(docs[i]["inputs"]).split()[0] for i in range(400)]
  assert abs(names.count("beta") - 300) <= 2, names.count("beta")
  # Every dataset is shuffled on its own, and repeats after its last document.
  alpha = [tok.decode(docs[i]["inputs"]) for i in range(400) if names[i] == "alpha"]
  assert len(set(alpha[:72])) == 72 and alpha[:72] != sorted(alpha[:72])
  assert [docs[i]["inputs"].tolist() for i in range(50)] == [
      text_pipeline.train_documents(cfg, 0, 1)[i]["inputs"].tolist() for i in range(50)]
  # Eval: the datasets' validation splits one after the other.
  eval_docs = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in make_eval_batches(
      dataclasses_replace(cfg, packing="first_fit", long_docs="error"), process_index=0,
      process_count=1)) > 0
  assert eval_docs
  assert len(sources.open_source(cfg, "validation", "x")) == 8 + 5


def dataclasses_replace(cfg, **data_kw):
  import dataclasses
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_kw))


def test_mixture_iterator_resumes_exactly(two_datasets):
  ds = two_datasets
  cfg, _ = _mix_cfg(ds, f"{ds['alpha']}:0.5,{ds['beta']}:0.5")
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it)["inputs"] for _ in range(2)]
  it2 = make_train_iterator(cfg, process_index=0, process_count=1)
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["inputs"], w)


def test_bad_mixtures_name_the_setting(two_datasets, tmp_path):
  ds = two_datasets
  for mixture, msg in (
      (f"{ds['alpha']}:-0.5,{ds['beta']}:1", r"the weight of '.*alpha.*' is -0.5; weights must "
                                            r"be positive"),
      (f"{ds['alpha']}:0,{ds['beta']}:1", r"is 0; weights must be positive"),
      (f"{ds['alpha']}", r"is not PATH:WEIGHT"),
      (f"{ds['alpha']}:x", r"is not PATH:WEIGHT"),
      (f"{ds['alpha']}:1,{ds['alpha']}:2", r"names a dataset twice")):
    cfg, _ = _mix_cfg(ds, mixture)
    with pytest.raises(ConfigError, match=r"^data.mixture=.*" + msg):
      config.validate(cfg)
  cfg, _ = _mix_cfg(ds, f"{ds['alpha']}:1", path=ds["beta"])
  with pytest.raises(ConfigError, match=r"data.mixture is set: it needs .* an empty data.path"):
    config.validate(cfg)
  cfg, _ = _mix_cfg(ds, f"{ds['alpha']}:1,{tmp_path / 'never_prepared'}:1")
  with pytest.raises(ConfigError, match=r"^data.mixture=.*never_prepared': no such directory; "
                                        r"create it with"):
    make_train_iterator(cfg, process_index=0, process_count=1)
