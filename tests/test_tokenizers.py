"""data.tokenizer accepts sentencepiece, tiktoken (Llama-3 format) and Hugging Face tokenizer.json
files, told apart by content; every kind round-trips text through the training pipeline.

All tokenizers are built here, offline: a tiktoken rank file written from a small dict, a BPE
trained with the `tokenizers` library, a sentencepiece model trained on a few sentences.
"""

import base64
import json
import pickle

import numpy as np
import pytest

from mta_jax import config
from mta_jax.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from mta_jax.data import make_eval_batches, prepare, tokenizer

WORDS = ("the cat sat on a mat and dog ran far away from home while birds sang over tall "
         "trees in spring rain").split()
T = 64


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, rng.integers(2, 9))) + f" {i}." for i in range(n)]


def write_tiktoken(path, extra_words=WORDS, n_filler=0):
  """A tiktoken BPE file: the 256 single bytes, every prefix of ' word' (so BPE can merge up to
  whole words), then `n_filler` unused tokens to reach a chosen size."""
  ranks = {bytes([b]): b for b in range(256)}
  for w in extra_words:
    w = (" " + w).encode()
    for k in range(2, len(w) + 1):
      ranks.setdefault(w[:k], len(ranks))
  for i in range(n_filler):
    ranks[b"~f%d" % i] = len(ranks)
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
  return ranks


def write_hf(path, docs, specials=("<pad>", "<s>", "</s>"), template=None):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(docs, trainer)
  if template:
    b, e = template
    tok.post_processor = processors.TemplateProcessing(
        single=f"{b} $A {e}", special_tokens=[(b, tok.token_to_id(b)), (e, tok.token_to_id(e))])
  tok.save(str(path))
  return tok


def write_sp(prefix, docs):
  return tokenizer.train([{"text": d} for d in docs], str(prefix), vocab_size=120,
                         byte_fallback=False, model_type="bpe", quiet=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  docs = _docs()
  (root / "corpus.txt").write_text("\n".join(docs) + "\n")
  data = prepare.prepare([str(root / "corpus.txt")], str(root / "data"), "words",
                         validation_fraction=0.25, seed=1)
  tt = root / "llama_like.tiktoken"
  ranks = write_tiktoken(tt)
  (root / "hf").mkdir()
  write_hf(root / "hf" / "tokenizer.json", docs)
  sp = write_sp(root / "sp", docs)
  return dict(root=root, data=data, docs=docs, tiktoken=str(tt), n_ranks=len(ranks),
              hf=str(root / "hf" / "tokenizer.json"), sp=sp)


# --- each kind on its own -----------------------------------------------------------------------


def test_tiktoken_file_in_the_llama3_format(files):
  import tiktoken
  tok = tokenizer.Tokenizer(files["tiktoken"])
  n = files["n_ranks"]
  assert tok.kind == "tiktoken"
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (n + 256, n, n + 1, n + 4)
  text = "the cat sat on a mat, 2025 ü!"
  ids = tok.encode(text)
  # Same ids as tiktoken itself with the ranks and Llama 3's split pattern.
  ref = tiktoken.Encoding("ref", pat_str=tokenizer.LLAMA3_PATTERN,
                          mergeable_ranks=tokenizer.parse_tiktoken_ranks(
                              open(files["tiktoken"], "rb").read()),
                          special_tokens={})
  assert ids.tolist() == [n] + ref.encode_ordinary(text) + [n + 1]
  assert len(ids) < len(text.encode()) + 2, "merges were used"
  assert tok.decode(ids) == text
  # Special-token text inside a document stays ordinary text.
  assert n not in tok.encode("<|begin_of_text|>")[1:].tolist()


def test_llama3_sized_tiktoken_file_fits_the_paper_presets(tmp_path):
  """128,000 ranks + 256 specials = 128,256 ids, the paper presets' model.vocab_size."""
  path = tmp_path / "tokenizer.model"
  write_tiktoken(path, extra_words=(), n_filler=128_000 - 256)
  tok = tokenizer.Tokenizer(str(path))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (128_256, 128_000, 128_001,
                                                                  128_004)
  cfg = config.TrainConfig(model=config.paper_model("300m", "mta"),
                           data=DataConfig(source="text", path="x", tokenizer=str(path)))
  from mta_jax.data import check_vocab
  check_vocab(cfg)  # no error: 128,256 == model.vocab_size
  cfg.model.vocab_size = 128_000
  with pytest.raises(ConfigError, match=r"128256 tokens"):
    check_vocab(cfg)


def test_huggingface_tokenizer_json(files, tmp_path):
  tok = tokenizer.Tokenizer(files["hf"])
  assert tok.kind == "huggingface" and tok.vocab_size == 320
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # <pad>, <s>, </s> by name
  text = "the cat sat on a mat, 2025 ü!"
  ids = tok.encode(text)
  assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
  # Unusual names: the post-processor template says which token is BOS / EOS ...
  write_hf(tmp_path / "tokenizer.json", _docs(), specials=("[A]", "[B]", "[C]"),
           template=("[B]", "[C]"))
  tok = tokenizer.Tokenizer(str(tmp_path / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
  # ... and a tokenizer_config.json beside it overrides both.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "[C]"}, "eos_token": "[A]", "pad_token": None}))
  tokenizer._load.cache_clear()
  tok = tokenizer.Tokenizer(str(tmp_path / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 0, -1)
  tokenizer._load.cache_clear()
  with pytest.raises(ConfigError, match=r"\(huggingface\) has no BOS token; set data.add_bos"):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    tokenizer.Tokenizer(str(tmp_path / "tokenizer.json"))
  tokenizer._load.cache_clear()


def test_sentencepiece_and_detection_by_content(files, tmp_path):
  tok = tokenizer.Tokenizer(files["sp"])
  assert tok.kind == "sentencepiece" and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  # The name does not matter: each kind is recognised under any file name.
  for kind in ("sp", "tiktoken", "hf"):
    blob = open(files[kind], "rb").read()
    (tmp_path / f"{kind}.bin").write_bytes(blob)
    assert tokenizer.load(str(tmp_path / f"{kind}.bin")).kind == tokenizer.load(
        files[kind]).kind
  # Handles pickle as a path only (grain workers load the file themselves).
  for kind in ("sp", "tiktoken", "hf"):
    t = tokenizer.Tokenizer(files[kind])
    clone = pickle.loads(pickle.dumps(t))
    assert set(vars(clone)) == {"path", "add_bos", "add_eos", "kind", "bos_id", "eos_id",
                                "pad_id", "vocab_size"}
    assert clone.encode("the cat").tolist() == t.encode("the cat").tolist()


@pytest.mark.parametrize("content", [b"hello world\n", b"\x00\x01\x02garbage",
                                     b'{"not": "a tokenizer"}', b""])
def test_unknown_kind_is_one_clear_error(tmp_path, content):
  path = tmp_path / "weird.model"
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=r"data.tokenizer=.*weird.model' is a tokenizer of an "
                                        r"unknown kind: not a sentencepiece"):
    tokenizer.Tokenizer(str(path))


def test_inspect_command(files, capsys):
  assert tokenizer.main([f"--inspect={files['tiktoken']}"]) == 0
  out = capsys.readouterr().out
  assert f"tiktoken, vocabulary {files['n_ranks'] + 256}" in out and "decodes back: True" in out
  assert tokenizer.main([f"--inspect={files['root']}/nope"]) == 2
  assert "--inspect=" in capsys.readouterr().err


# --- through the pipeline -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sp", "tiktoken", "hf"])
def test_text_round_trips_through_the_pipeline(files, kind):
  """prepare -> tokenizer of each kind -> packed eval rows -> decode: the validation split."""
  tok = tokenizer.Tokenizer(files[kind])
  cfg = TrainConfig(
      model=ModelConfig(vocab_size=-(-tok.vocab_size // 128) * 128, d_model=32, n_layers=1,
                        n_heads=2, max_len=T),
      data=DataConfig(source="text", path=files["data"], tokenizer=files[kind], seq_len=T,
                      batch_size=4, packing="first_fit", long_docs="error"))
  config.validate(cfg)
  texts = []
  for batch in make_eval_batches(cfg, process_index=0, process_count=1):
    for r in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        ids = np.concatenate([batch["inputs"][r][m], batch["targets"][r][m][-1:]])
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        texts.append(tok.decode(ids))
  from mta_jax.data import sources
  src = sources.open_prepared(files["data"], "validation")
  want = [src[i]["text"].decode() for i in range(len(src))]
  assert len(want) == 10 and sorted(texts) == sorted(want)
