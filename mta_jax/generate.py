"""Text generation from a training workdir or an export: greedy, temperature, top-k, top-p.

    python -m mta_jax.generate --model=runs/lm_tiny --prompt="Once upon a time" \
        --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --stop="\\n\\n"

`--model` is a training workdir (its latest checkpoint) or an export directory
(`python train.py --mode=export`). Prompts of different lengths are decoded together
(left-padded, see mta_jax/decode.py); each row stops at EOS, at one of the stop strings, or
after `max_new_tokens`. In Python:

    lm = load("runs/lm_tiny")
    gen = Generator(lm.model, lm.tokenizer)
    out = gen.generate_text(["Once upon a time"], max_new_tokens=32, temperature=0.0)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from mta_jax import cli, decode
from mta_jax.config import ConfigError, TrainConfig

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0.0:
    raise ConfigError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
  if top_k < 0:
    raise ConfigError(f"top_k must be >= 0 (0 = off); got {top_k}.")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p must be in (0, 1] (1 = off); got {top_p}.")


def sample_logits(logits_BxV: Array, key: Array, temperature, top_p, *, top_k: int = 0,
                  use_top_p: bool = False) -> Array:
  """Next token ids [B]: argmax when temperature == 0, else a draw from the softmax of
  logits / temperature restricted to the top_k largest (top_k > 0) and to the smallest set whose
  probability reaches top_p (use_top_p; at least one token is always kept)."""
  logits = logits_BxV.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  if top_k > 0 or use_top_p:
    k = min(top_k, logits.shape[-1]) if top_k > 0 else logits.shape[-1]
    vals, idx = jax.lax.top_k(scaled, k)  # sorted descending
    if use_top_p:
      probs = jax.nn.softmax(vals, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly larger tokens
      vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    drawn = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  else:
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Completion:
  tokens: list[int]        # generated ids (the stop token or string included, see `text`)
  text: Optional[str]      # decoded, cut before the first stop string (None without tokenizer)
  finish_reason: str       # "eos" | "stop" | "length"


def encode_prompt(tokenizer, text: str, add_bos: bool = True) -> list[int]:
  """Token ids of `text`, BOS first when `add_bos` and the tokenizer has one (as in training)."""
  ids = [int(i) for i in tokenizer.encode(text)]
  bos = getattr(tokenizer, "bos_id", -1)
  if add_bos and bos is not None and bos >= 0 and (not ids or ids[0] != bos):
    ids = [int(bos)] + ids
  return ids


class Generator:
  """Batched generation for one model (compiled once per prompt length and cache size)."""

  def __init__(self, model, tokenizer=None, *, add_bos: bool = True):
    self.decoder = decode.Decoder(model)
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.add_bos = add_bos
    if tokenizer is not None:
      check_tokenizer(tokenizer, model.cfg.vocab_size)
    graphdef = self.decoder.graphdef

    @functools.partial(jax.jit, static_argnames=("top_k", "use_top_p"), donate_argnums=(1,))
    def _step(state, cache, tokens, key, temperature, top_p, top_k, use_top_p):
      logits, cache = decode.decode_step(nnx.merge(graphdef, state), cache, tokens)
      return sample_logits(logits, key, temperature, top_p, top_k=top_k,
                           use_top_p=use_top_p), cache

    @functools.partial(jax.jit, static_argnames=("top_k", "use_top_p"))
    def _sample(logits, key, temperature, top_p, top_k, use_top_p):
      return sample_logits(logits, key, temperature, top_p, top_k=top_k, use_top_p=use_top_p)

    self._step, self._sample = _step, _sample

  def encode(self, text: str) -> list[int]:
    return encode_prompt(self.tokenizer, text, self.add_bos)

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               eos_id: Optional[int] = None, stop: Sequence[str] = (), seed: int = 0,
               cache_len: Optional[int] = None) -> list[Completion]:
    """Generates up to `max_new_tokens` per prompt (token id lists of any lengths)."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
    if stop and self.tokenizer is None:
      raise ConfigError("stop strings need a tokenizer (to turn tokens into text).")
    for p in prompts:
      bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
      if bad:
        raise ConfigError(f"prompt token ids {bad[:5]} are outside the model's vocabulary "
                          f"0..{self.cfg.vocab_size - 1}.")
    tokens, seg = decode.pad_prompts(list(prompts))
    need = tokens.shape[1] + max_new_tokens
    cache_len = cache_len or need
    if cache_len < need:
      raise decode.DecodeError(f"cache_len={cache_len} is too small for a {tokens.shape[1]}-"
                               f"token prompt plus {max_new_tokens} new tokens ({need}).")
    if need > self.cfg.max_len:
      raise decode.DecodeError(
          f"the longest prompt has {tokens.shape[1]} tokens; with max_new_tokens="
          f"{max_new_tokens} that is {need} positions, more than the model's max_len="
          f"{self.cfg.max_len}. Shorten the prompt or ask for fewer new tokens.")
    logits, cache = self.decoder.prefill(tokens, cache_len, seg)
    key = jax.random.PRNGKey(seed)
    args = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), top_k=top_k,
                use_top_p=top_p < 1.0)
    key, sub = jax.random.split(key)
    nxt = self._sample(logits, sub, **args)
    batch = len(prompts)
    out = [[] for _ in range(batch)]
    reason = [None] * batch
    texts = [None] * batch
    for step in range(max_new_tokens):
      host = np.asarray(nxt)
      for b in range(batch):
        if reason[b] is None:
          out[b].append(int(host[b]))
          reason[b] = self._finished(out[b], eos_id, stop, texts, b)
      if all(r is not None for r in reason) or step == max_new_tokens - 1:
        break
      key, sub = jax.random.split(key)
      nxt, cache = self._step(self.decoder.state, cache, nxt, sub, **args)
    return [Completion(out[b], self._text(out[b], texts[b], eos_id), reason[b] or "length")
            for b in range(batch)]

  def _finished(self, ids, eos_id, stop, texts, b) -> Optional[str]:
    if eos_id is not None and ids[-1] == eos_id:
      return "eos"
    if stop:
      text = self.tokenizer.decode(ids)
      cut = [text.index(s) for s in stop if s in text]
      if cut:
        texts[b] = text[:min(cut)]
        return "stop"
    return None

  def _text(self, ids, text, eos_id):
    if self.tokenizer is None:
      return None
    if text is not None:
      return text
    return self.tokenizer.decode([i for i in ids if i != eos_id])

  def generate_text(self, prompts: Sequence[str], **kw) -> list[Completion]:
    """`generate` on text prompts (encoded with the tokenizer, BOS first when it has one)."""
    if self.tokenizer is None:
      raise ConfigError("generate_text needs a tokenizer; pass one to Generator(...).")
    kw.setdefault("eos_id", getattr(self.tokenizer, "eos_id", None))
    if kw["eos_id"] is not None and kw["eos_id"] < 0:
      kw["eos_id"] = None
    return self.generate([self.encode(p) for p in prompts], **kw)


# ---------------------------------------------------------------------------------------------
# Loading a model and its tokenizer
# ---------------------------------------------------------------------------------------------


class ToyTokenizer:
  """The toy task's character vocabulary behind the tokenizer interface. Toy sequences start
  without BOS, so `bos_id` is -1 (none is prepended)."""

  def __init__(self):
    from mta_jax.data import toy
    self._toy = toy
    self.bos_id, self.eos_id = -1, toy.EOS_ID
    self.vocab_size = toy.TOY_VOCAB_SIZE

  def encode(self, text: str):
    return self._toy.encode(text)

  def decode(self, ids) -> str:
    return self._toy.decode([i for i in ids if i != self.eos_id])


def check_tokenizer(tokenizer, model_vocab: int) -> None:
  """ConfigError if the tokenizer can produce ids the model has no embedding for."""
  v = int(tokenizer.vocab_size)
  if v > model_vocab:
    raise ConfigError(f"the tokenizer has {v} tokens but the model's vocabulary has only "
                      f"{model_vocab}: it is not the tokenizer this model was trained with. Pass "
                      "the run's tokenizer (--tokenizer) or the matching model.")


def open_tokenizer(path: str):
  """The project's tokenizer for a file path (BOS / EOS are added by the caller)."""
  from mta_jax.data.tokenizer import Tokenizer
  return Tokenizer(path, add_bos=False, add_eos=False)


@dataclasses.dataclass
class Loaded:
  model: object              # TransformerLM with the restored parameters
  config: TrainConfig
  step: int
  tokenizer: object | None   # encode / decode / bos_id / eos_id / vocab_size, or None
  source: str                # "export" | "workdir"


def load(path: str, *, tokenizer: str = "", mesh=None) -> Loaded:
  """A model from an export directory or a training workdir (latest checkpoint).

  The tokenizer is `tokenizer` if given, else the one the export / run recorded (the toy
  vocabulary for toy runs); it must fit the model's vocabulary.
  """
  from mta_jax import checkpoint as ckpt_lib
  from mta_jax import config as config_lib
  from mta_jax import export as export_lib
  from mta_jax import sharding, tree_io
  from mta_jax.model import TransformerLM
  if not path or not os.path.isdir(path):
    raise ConfigError(f"--model={path!r}: no such directory; give a training workdir (with "
                      "checkpoints/) or an export directory (python train.py --mode=export).")
  if os.path.isfile(os.path.join(path, export_lib.MANIFEST)):
    ex = export_lib.load_exported(path, mesh=mesh)
    model, cfg, step, tok_path, source = ex.model, ex.config, ex.step, ex.tokenizer, "export"
  elif ckpt_lib.checkpoint_dir(path).exists():
    ck = ckpt_lib.Checkpointer(path, read_only=True)
    try:
      step = ck.latest_step()
      if step is None:
        raise ConfigError(f"--model={path!r}: {ck.directory} holds no complete checkpoint; "
                          "train first.")
      cfg = config_lib.from_dict(TrainConfig, ck.read_meta(step)["config"],
                                 f"{ck.directory}/{step}/meta")
      abstract = nnx.eval_shape(lambda: TransformerLM(cfg.model, rngs=nnx.Rngs(0)))
      graphdef, abs_params = nnx.split(abstract, nnx.Param)
      shard = sharding.state_shardings(abs_params, mesh) if mesh is not None else None
      target = tree_io.abstract_storable(abs_params, shard)
      params = tree_io.fill(abs_params, tree_io.flatten(ck.restore_item(step, "params", target)))
    finally:
      ck.close()
    model = nnx.merge(graphdef, params)
    tok_path, source = cfg.data.tokenizer or None, "workdir"
  else:
    raise ConfigError(f"--model={path!r} is neither an export (no {export_lib.MANIFEST}) nor a "
                      f"training workdir (no {ckpt_lib.CHECKPOINT_SUBDIR}/).")
  if tokenizer:
    tok = open_tokenizer(tokenizer)
  elif tok_path:
    tok = open_tokenizer(tok_path)
  elif cfg.data.source == "toy":
    tok = ToyTokenizer()
  else:
    tok = None
  if tok is not None:
    check_tokenizer(tok, cfg.model.vocab_size)
  return Loaded(model=model, config=cfg, step=int(step), tokenizer=tok, source=source)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


_PROG = "python -m mta_jax.generate"
_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_string("model", None, "training workdir or export directory", flag_values=_FLAGS)
flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch); '' starts from BOS only",
                          flag_values=_FLAGS)
flags.DEFINE_string("prompt_file", "", "one prompt per line", flag_values=_FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt", flag_values=_FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy (default)", flag_values=_FLAGS)
flags.DEFINE_integer("top_k", 0, "0 = off", flag_values=_FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling; 1 = off", flag_values=_FLAGS)
flags.DEFINE_multi_string("stop", [], "stop string (repeatable)", flag_values=_FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=_FLAGS)
flags.DEFINE_string("tokenizer", "", "override the recorded tokenizer file", flag_values=_FLAGS)
flags.DEFINE_bool("json", False, "print one JSON object per completion", flag_values=_FLAGS)
flags.mark_flag_as_required("model", flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
  try:
    check_sampling(args.temperature, args.top_k, args.top_p)
    prompts = list(args.prompt)
    if args.prompt_file:
      with open(args.prompt_file) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
      raise ConfigError("give at least one --prompt (or --prompt_file).")
    stop = [s.encode().decode("unicode_escape") for s in args.stop]
    lm = load(args.model, tokenizer=args.tokenizer)
    if lm.tokenizer is None:
      raise ConfigError(f"{args.model!r} recorded no tokenizer; pass --tokenizer=FILE.")
    gen = Generator(lm.model, lm.tokenizer, add_bos=lm.config.data.add_bos)
    t0 = time.time()
    outs = gen.generate_text(prompts, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             stop=stop, seed=args.seed)
    dt = time.time() - t0
  except (ConfigError, decode.DecodeError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for prompt, c in zip(prompts, outs):
    if args.json:
      print(json.dumps({"prompt": prompt, "completion": c.text, "finish_reason":
                        c.finish_reason, "tokens": c.tokens}))
    else:
      print(f"{prompt}{c.text}    [{c.finish_reason}, {len(c.tokens)} tokens]")
  n = sum(len(c.tokens) for c in outs)
  print(f"# {lm.source} step {lm.step}: {n} tokens in {dt:.1f}s (compilation included)",
        file=sys.stderr)
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  """`mta-generate` / `python -m mta_jax.generate`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, _PROG, __doc__)


if __name__ == "__main__":
  sys.exit(main())
