"""lm-evaluation-harness adapter: any lm_eval task on an mta_jax checkpoint or export.

    python -m mta_jax.evaluation.harness --model=runs/lm_tiny --tasks=lambada_openai,hellaswag

or from Python:

    import lm_eval
    lm = MTALM.from_path("runs/lm_tiny")
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

`MTALM` is an `lm_eval.api.model.TemplateLM`: lm_eval tokenizes each (context, continuation)
pair with our tokenizer (`tok_encode`) and we score the token lists (`scoring.Scorer`);
`loglikelihood_rolling` uses lm_eval's own rolling windows of max_len tokens; `generate_until`
runs `generate.Generator` (exact incremental decoding) with the request's stop strings.
Context that does not fit is cut from the left, as lm_eval's Hugging Face adapter does.
"""

from __future__ import annotations

from typing import Optional

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from mta_jax import generate
from mta_jax.evaluation import scoring


class MTALM(TemplateLM):
  """An mta_jax TransformerLM with the project's tokenizer, as an lm_eval model."""

  def __init__(self, model, tokenizer, *, batch_size: int = 8, max_gen_toks: int = 256,
               add_bos: bool = True):
    super().__init__()
    if tokenizer is None:
      raise ValueError("lm_eval needs a tokenizer; the model recorded none (pass one).")
    generate.check_tokenizer(tokenizer, model.cfg.vocab_size)
    self.model, self.tok = model, tokenizer
    self.max_len = model.cfg.max_len
    self.batch_size = batch_size
    self.max_gen_toks = max_gen_toks
    self.add_bos = add_bos
    self.scorer = scoring.Scorer(model, batch_size=batch_size)
    self._generator: Optional[generate.Generator] = None

  @classmethod
  def from_path(cls, path: str, *, tokenizer: str = "", **kw) -> "MTALM":
    lm = generate.load(path, tokenizer=tokenizer)
    kw.setdefault("add_bos", lm.config.data.add_bos)
    return cls(lm.model, lm.tokenizer, **kw)

  # -- tokens -----------------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    eos = getattr(self.tok, "eos_id", -1)
    return int(eos) if eos is not None and eos >= 0 else 0

  @property
  def prefix_token_id(self) -> int:
    bos = getattr(self.tok, "bos_id", -1)
    return int(bos) if bos is not None and bos >= 0 else self.eot_token_id

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tok, "path", type(self.tok).__name__))

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
    return [int(t) for t in self.tok.encode(string)]

  def tok_decode(self, ids) -> str:
    return self.tok.decode(list(ids))

  def _with_prefix(self, ids: list[int]) -> list[int]:
    """The model was trained on documents that start with BOS: contexts start with it too."""
    if self.add_bos and (not ids or ids[0] != self.prefix_token_id):
      return [self.prefix_token_id] + ids
    return ids

  # -- requests ---------------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
    pairs = [(self._with_prefix(list(ctx)), list(cont)) for _, ctx, cont in requests]
    out = []
    for lo in tqdm(range(0, len(pairs), 64 * self.batch_size), disable=disable_tqdm,
                   desc="loglikelihood"):
      out += self.scorer.loglikelihood(pairs[lo:lo + 64 * self.batch_size])
    for (key, _, _), res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", key, res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
      (text,) = req.args
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_len, context_len=1)]
      total = sum(lp for lp, _ in self.scorer.loglikelihood(windows)) if windows else 0.0
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
      out.append(total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    if self._generator is None:
      self._generator = generate.Generator(self.model, self.tok, add_bos=self.add_bos)
    out = []
    for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
      context, gen_kwargs = req.args
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      do_sample = bool(gen_kwargs.pop("do_sample", False))
      temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
      top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
      top_k = int(gen_kwargs.pop("top_k", 0) or 0) if do_sample else 0
      if gen_kwargs:
        raise ValueError(f"generate_until: unsupported generation settings {sorted(gen_kwargs)}"
                         " (supported: until, max_gen_toks, do_sample, temperature, top_p, "
                         "top_k).")
      ids = self._with_prefix(self.tok_encode(context))
      max_new = max(1, min(max_new, self.max_len - 1))
      ids = ids[-(self.max_len - max_new):]  # left truncation keeps the end of the context
      (c,) = self._generator.generate(
          [ids], max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
          stop=until,
          eos_id=self.eot_token_id if getattr(self.tok, "eos_id", -1) >= 0 else None)
      self.cache_hook.add_partial("generate_until", (context, req.args[1]), c.text)
      out.append(c.text)
    return out
