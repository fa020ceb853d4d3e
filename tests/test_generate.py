"""Generation: greedy equals the full forward's argmax, sampling filters, stops, loading, errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ckpt_util as cu
from mta_jax import checkpoint, decode, export, generate, sharding
from mta_jax.config import ConfigError
from mta_jax.model import TransformerLM


class CharTokenizer:
  """ids 3.. <-> letters; bos 2, eos 1 (the shape of the project's tokenizers)."""
  bos_id, eos_id = 2, 1

  def __init__(self, vocab_size=32):
    self.vocab_size = vocab_size

  def encode(self, text):
    return np.asarray([3 + (ord(c) - 97) % 26 for c in text], np.int32)

  def decode(self, ids):
    return "".join(chr(97 + (int(i) - 3) % 26) for i in ids if int(i) >= 3)


def _model(seed=0):
  cfg = cu.tiny_config().model
  model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post", "gate_w"):
      p = getattr(block.attn, name, None)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype)
  # Larger embeddings: greedy choices that are not near-ties.
  model.embed.embedding[...] = model.embed.embedding[...] * 50
  return model


def _greedy_by_full_forward(model, prompt, n, length=16):
  """Recomputes the full forward for every new token (right-padded to one jitted shape)."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
  ids = list(prompt)
  for _ in range(n):
    logits = fwd(state, jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids[len(prompt):]


def test_greedy_batch_of_different_lengths_equals_full_forward():
  model = _model()
  gen = generate.Generator(model)
  prompts = [[2, 5, 9, 4], [2, 7]]
  outs = gen.generate(prompts, max_new_tokens=6)
  for p, c in zip(prompts, outs):
    assert c.tokens == _greedy_by_full_forward(model, p, 6)
    assert c.finish_reason == "length"


def test_eos_and_stop_strings_end_each_row():
  model = _model()
  tok = CharTokenizer()
  gen = generate.Generator(model, tok)
  free = gen.generate_text(["abc", "hello"], max_new_tokens=6, eos_id=None)
  # EOS: pretend the last generated token of row 0 is the end-of-sequence id.
  eos = free[0].tokens[-1]
  first = free[0].tokens.index(eos)
  outs = gen.generate([gen.encode("abc"), gen.encode("hello")], max_new_tokens=6, eos_id=eos)
  assert outs[0].finish_reason == "eos" and outs[0].tokens == free[0].tokens[:first + 1]
  # Stop string: the text is cut before it, and the row stops generating.
  stop = free[1].text[2:4]
  outs = gen.generate_text(["abc", "hello"], max_new_tokens=6, eos_id=None, stop=[stop])
  assert outs[1].finish_reason == "stop"
  assert outs[1].text == free[1].text[:free[1].text.index(stop)]
  assert len(outs[1].tokens) < 6


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]] * 4000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  draw = lambda **kw: np.asarray(generate.sample_logits(logits, keys, jnp.float32(
      kw.pop("t", 1.0)), jnp.float32(kw.pop("p", 1.0)), **kw))
  freq = np.bincount(draw(), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.05, 0.5, 0.3, 0.15], atol=0.03)
  assert set(draw(top_k=2)) == {1, 2}
  # top_p 0.75: 0.5 + 0.3 reach it, so only tokens 1 and 2 (0.15 and 0.05 are cut).
  top_p = draw(p=0.75, use_top_p=True)
  assert set(top_p) == {1, 2}
  assert set(draw(p=0.2, use_top_p=True)) == {1}    # at least the most likely token
  assert set(draw(t=0.0)) == {1}                     # greedy
  hot = np.bincount(draw(t=3.0), minlength=4) / 4000  # flatter than t = 1
  assert hot[0] > 0.12 and hot[1] < 0.4


def test_bad_sampling_and_lengths_are_clear_errors():
  gen = generate.Generator(_model())
  for kw, msg in ((dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
                  (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k")):
    with pytest.raises(ConfigError, match=msg):
      gen.generate([[2, 3]], **kw)
  with pytest.raises(decode.DecodeError, match="max_len=16"):
    gen.generate([[2] * 12], max_new_tokens=8)
  with pytest.raises(ConfigError, match="outside the model's vocabulary"):
    gen.generate([[2, 99]])
  with pytest.raises(ConfigError, match="tokenizer has 100 tokens"):
    generate.Generator(_model(), CharTokenizer(vocab_size=100))


def _workdir(tmp_path):
  cfg = cu.tiny_config()
  mesh = sharding.make_mesh(8, 1, 1)
  state, _ = cu.make_state(cfg, mesh)
  state = cu.perturb(state, 0.5)
  workdir = tmp_path / "run"
  with checkpoint.Checkpointer(workdir, cfg) as ck:
    ck.save(4, state)
  return cfg, workdir


def test_generate_command_from_workdir_and_export(tmp_path, capsys):
  cfg, workdir = _workdir(tmp_path)
  args = ["--prompt=abc", "--prompt=ab.cd#", "--max_new_tokens=4", "--json"]
  assert generate.main([f"--model={workdir}"] + args) == 0
  from_run = capsys.readouterr().out
  exp = export.export_checkpoint(str(workdir), str(tmp_path / "exp"), cfg=cfg)
  assert generate.main([f"--model={exp}"] + args) == 0
  assert capsys.readouterr().out == from_run  # same weights, same greedy text
  lm = generate.load(str(workdir))
  assert lm.step == 4 and isinstance(lm.tokenizer, generate.ToyTokenizer)
  assert len(from_run.strip().splitlines()) == 2


def test_generate_command_bad_input(tmp_path, capsys):
  assert generate.main([f"--model={tmp_path / 'nope'}", "--prompt=a"]) == 2
  assert "no such directory" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert generate.main([f"--model={tmp_path / 'empty'}", "--prompt=a"]) == 2
  assert "neither an export" in capsys.readouterr().err
  assert generate.main([f"--model={tmp_path}", "--prompt=a", "--top_p=0"]) == 2
  assert "top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_viz_command_from_workdir(tmp_path):
  from mta_jax import viz
  _, workdir = _workdir(tmp_path)
  out = tmp_path / "viz"
  assert viz.main([f"--model={workdir}", "--text=ab.cd#a", f"--out={out}"]) == 0
  names = sorted(p.name for p in out.iterdir())
  assert names == ["attention_L0.png", "attention_L1.png", "head_mix.png", "kernels.png"]


def test_viz_attention_stages_and_pictures(tmp_path):
  """Plain softmax rows sum to 1; the final stage is the model's own weights; PNGs written."""
  from mta_jax import viz
  model = _model(seed=3)
  tokens = jnp.asarray([[2, 5, 9, 4, 7, 3]], jnp.int32)
  stages = viz.attention_stages(model, tokens)
  maps = model.attention_maps(tokens)
  for st, m in zip(stages, maps):
    np.testing.assert_allclose(st[0].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(st[2], np.asarray(m), rtol=1e-5, atol=1e-6)
  assert np.abs(stages[1][1] - stages[1][0]).max() > 1e-3  # layer 1 has the pre conv
  paths = [viz.plot_attention_stages(stages[1], str(tmp_path / "a.png"), layer=1),
           viz.plot_head_mix(model, str(tmp_path / "mix.png")),
           viz.plot_kernels(model, str(tmp_path / "k.png"))]
  assert all(os.path.getsize(p) > 1000 for p in paths)
