"""Evaluation: log-likelihood scoring, the lm_eval adapter on local tasks, needles, perplexity."""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local tasks below need no network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import ckpt_util as cu  # noqa: E402
from mta_jax import generate  # noqa: E402
from mta_jax.evaluation import needle, perplexity, scoring  # noqa: E402
from mta_jax.model import TransformerLM  # noqa: E402

ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.?"  # ids 3..41; pad 0, eos 1, bos 2
VOCAB = 3 + len(ALPHABET)


class SmallTokenizer:
  """Character tokenizer over ALPHABET (unknown characters become '?')."""
  bos_id, eos_id, vocab_size = 2, 1, VOCAB

  def encode(self, text):
    return np.asarray([3 + ALPHABET.index(c if c in ALPHABET else "?") for c in text.lower()],
                      np.int32)

  def decode(self, ids):
    return "".join(ALPHABET[int(i) - 3] for i in ids if int(i) >= 3)


def _model(max_len=16, seed=0):
  cfg = cu.tiny_config().model
  cfg.max_len, cfg.vocab_size = max_len, VOCAB
  model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post"):
      p = getattr(block.attn, name)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype)
  model.embed.embedding[...] = model.embed.embedding[...] * 40
  return model


def _direct_loglik(model, ctx, cont):
  """Independent of the Scorer: one unpadded forward, log_softmax, gather."""
  ids = np.asarray(list(ctx) + list(cont), np.int32)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, jnp.asarray(ids[None, :-1]))
  logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
  tgt = ids[1:]
  lp = logp[np.arange(len(tgt)), tgt][-len(cont):]
  greedy = logp.argmax(-1)[-len(cont):] == tgt[-len(cont):]
  return float(lp.sum()), bool(greedy.all())


def test_scorer_equals_direct_log_softmax():
  model = _model()
  sc = scoring.Scorer(model, batch_size=3, bucket=8)
  pairs = [([2, 5], [7, 9, 3]), ([2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [5]), ([2], [8, 8]),
           (list(range(3, 20)), [6, 7])]  # the last is cut from the left to max_len + 1
  got = sc.loglikelihood(pairs)
  for (ctx, cont), (lp, greedy) in zip(pairs, got):
    ctx = (list(ctx) + list(cont))[-17:][:-len(cont)]
    want_lp, want_greedy = _direct_loglik(model, ctx, cont)
    assert abs(lp - want_lp) < 1e-4 * max(1.0, abs(want_lp)) and greedy == want_greedy
  # A continuation the model's argmax produces is "greedy".
  ctx = [2, 5, 6]
  best = int(jnp.argmax(model(jnp.asarray([ctx]))[0, -1]))
  assert sc.loglikelihood([(ctx, [best])])[0][1]
  with pytest.raises(ValueError, match="continuation needs 1..16"):
    sc.loglikelihood([([2], [3] * 17)])


def _write_tasks(tmp_path):
  mc = [{"question": "the cat sat on the", "choices": [" mat", " sky", " zoo"], "answer": 0},
        {"question": "one two", "choices": [" three", " four"], "answer": 1},
        {"question": "abc", "choices": [" d", " e", " f", " g"], "answer": 2}]
  text = [{"text": "the quick brown fox jumps over the lazy dog. it was a sunny day."},
          {"text": "hello world."}]
  gen = [{"question": "say a", "answer": "b"}, {"question": "say x", "answer": "y"}]
  for name, rows in (("mc", mc), ("text", text), ("gen", gen)):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  common = "dataset_path: json\ntest_split: test\n"
  (tmp_path / "local_mc.yaml").write_text(
      f"task: local_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/mc.jsonl\n"
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n")
  (tmp_path / "local_ppl.yaml").write_text(
      f"task: local_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/text.jsonl"
      "\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n")
  (tmp_path / "local_gen.yaml").write_text(
      f"task: local_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/gen.jsonl"
      "\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
      "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 3\n"
      "metric_list:\n  - metric: exact_match\n")
  return mc, text, gen


def test_lm_eval_adapter_on_local_tasks(tmp_path):
  """lm_eval runs three local tasks (one per request type) through MTALM; every reported
  metric equals what our own scoring / generation gives for the same examples."""
  from mta_jax.evaluation import harness
  from mta_jax.evaluation.lm_eval_adapter import MTALM
  mc, text, gen = _write_tasks(tmp_path)
  model, tok = _model(), SmallTokenizer()
  lm = MTALM(model, tok, batch_size=4)
  res = harness.run("", ["local_mc", "local_ppl", "local_gen"], include_path=str(tmp_path),
                    lm=lm)["results"]

  sc = scoring.Scorer(model)
  enc = lambda s: [int(t) for t in tok.encode(s)]
  correct = []
  for ex in mc:
    scores = [sc.loglikelihood([([2] + enc(ex["question"]), enc(c))])[0][0]
              for c in ex["choices"]]
    correct.append(int(np.argmax(scores)) == ex["answer"])
  assert res["local_mc"]["acc,none"] == pytest.approx(np.mean(correct))

  total, words = 0.0, 0
  for ex in text:  # lm_eval's windows of max_len tokens, each predicted once
    ids = enc(ex["text"])
    prev = [2] + ids
    total += float(sum(lp.sum() for lp, _ in sc.token_logprobs(
        [prev[max(0, s - 1):s + 16] for s in range(1, len(prev), 16)])))
    words += len(ex["text"].split())
  assert res["local_ppl"]["word_perplexity,none"] == pytest.approx(np.exp(-total / words),
                                                                    rel=1e-4)

  g = generate.Generator(model, tok)
  outs = [g.generate_text([ex["question"]], max_new_tokens=3, stop=["."])[0].text for ex in gen]
  want = np.mean([o.strip() == ex["answer"] for o, ex in zip(outs, gen)])
  assert res["local_gen"]["exact_match,none"] == pytest.approx(want)


def test_needle_samples_and_grid(tmp_path):
  tok = SmallTokenizer()
  rng = np.random.default_rng(0)
  ctx, ans, info = needle.make_sample(tok, rng, context_len=400, n_needles=4, depth=0.5,
                                      digits=3, filler="the sky is blue. the grass is green.")
  text = tok.decode(ctx)
  assert len(ctx) <= 400 and text.count("the magic number of") == 4 + 2  # needles, question
  assert tok.decode(ans) == " " + info["number"] and len(info["number"]) == 3
  # The queried needle follows round(depth x filler sentences) filler sentences.
  sents = [x.rstrip(".") for x in text[:text.index(" what is")].split(". ")]
  at = sents.index(f"the magic number of {info['city'].lower()} is {info['number']}")
  filler = [x for x in sents if not x.startswith("the magic number")]
  assert sum(not x.startswith("the magic") for x in sents[:at]) == round(0.5 * len(filler))
  with pytest.raises(ValueError, match="too short"):
    needle.make_sample(tok, rng, context_len=40, n_needles=6, depth=0.0)

  model = _model(max_len=240)
  res = needle.evaluate(scoring.Scorer(model, batch_size=2), tok, context_len=240,
                        needles=[2, 4], depths=[0.0, 1.0], samples=2, digits=2,
                        filler="the sky is blue.", progress=False)
  assert len(res["cells"]) == 4 and set(res["by_needles"]) == {"2", "4"}
  assert os.path.isfile(needle.plot(res, str(tmp_path / "needle.png")))


def test_perplexity_by_position(tmp_path):
  model = _model(max_len=32)
  sc = scoring.Scorer(model, batch_size=2, bucket=8)
  docs = [[2] + list(range(3, 30)) + [5, 6, 7, 8], [2, 9, 9, 9, 9]]  # 31 and 4 targets
  res = perplexity.by_position(sc, docs, bucket=8)
  assert [b["tokens"] for b in res["buckets"]] == [8 + 4, 8, 8, 7]  # doc 0 has 31 targets
  lp0, _ = sc.token_logprobs([docs[0]])[0]
  np.testing.assert_allclose(res["buckets"][-1]["nll"], -lp0[24:].mean(), rtol=1e-5)
  assert os.path.isfile(perplexity.plot(res, str(tmp_path / "ppl.png")))
  (tmp_path / "d.txt").write_text("first doc\n\nsecond doc\n\n\n")
  assert perplexity.read_documents(str(tmp_path / "d.txt")) == ["first doc", "second doc"]
