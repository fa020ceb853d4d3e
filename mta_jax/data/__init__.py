"""Data: grain pipelines for the toy task, synthetic tokens and real text (TFDS / own files).

Public API (all take the whole `TrainConfig`; `cfg.data.source` picks the source):
  make_train_iterator(cfg, *, process_index=None, process_count=None)
      infinite grain DatasetIterator (get_state / set_state) of per-process batches
  make_eval_batches(cfg, *, process_index=None, process_count=None)
      the eval split once, unshuffled, last batch padded (loss_mask 0 on padding rows)
  vocab_size(cfg), check_vocab(cfg)
  validate_data(cfg)     config.validate_data plus the toy task's rules and check_vocab
  toy_vocab_size()       the toy task's vocabulary

Batches: dict of numpy arrays, `inputs`, `targets`, `segment_ids`, `positions` int32 [b, T] and
`loss_mask` float32 [b, T], b = global batch // process_count.
"""

from mta_jax import config
from mta_jax.data import sources
from mta_jax.data.pipeline import check_vocab, make_eval_batches, make_train_iterator, vocab_size
from mta_jax.data.toy import check_toy_config, toy_vocab_size


def validate_data(cfg) -> None:
  """The data checks that need the data's own rules (run after `config.validate(cfg)`): static
  settings, the toy task's rules, that the model's vocabulary covers the data's tokens, and for
  real text that every configured dataset and split opens (metadata only), so a bad path fails
  before a run writes anything."""
  config.validate_data(cfg.data)
  if cfg.data.source == "toy":
    check_toy_config(cfg.data.toy, cfg.data.seq_len)
  check_vocab(cfg)
  d = cfg.data
  if d.source in ("tfds", "text"):
    sources.open_source(cfg, d.train_split, "data.train_split")
    sources.open_source(cfg, d.eval_split, "data.eval_split")


__all__ = ["make_train_iterator", "make_eval_batches", "vocab_size", "check_vocab",
           "validate_data", "check_toy_config", "toy_vocab_size"]
