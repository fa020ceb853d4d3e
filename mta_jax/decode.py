"""Exact incremental decoding: per-layer caches, prompt prefill and one-token steps.

The attention weights of query row i depend on earlier rows only through the key-query
convolutions (see docs/MTA.md or the paper, Eq. 5-6); because both are causal along queries,
every row is FINAL once computed: a later token never changes an earlier row. So the next row
needs, per layer, besides the keys and values of every earlier token:

  * pre-softmax conv (kernel [H, c_q, c_k]): the Mask_0'd logit rows of the last c_q - 1 queries
    against all keys. Row i - s has zeros at every column j > i - s, so these rows never change
    after their own step; the new row's conv reads them at columns j - c_k//2 .. j + c_k//2.
    They are cached as rows ([B, H, c_q - 1, T] floats), not recomputed from cached queries:
    recomputing costs (c_q - 1) extra q.k passes over the keys per step (5x the logits work at
    c_q = 6), while the rows take (c_q - 1) / (2 head_dim) of the K/V cache's memory.
  * post-softmax conv (kernel [H, c_q', c_k']): the softmax rows of the last c_q' - 1 queries,
    final for the same reason ([B, H, c_q' - 1, T]).
  * head mixing, the gated group norm and the output projection act on the new row only.

Every step costs O(T) per layer (T = cache length): one q.k pass, the convolutions on
c_q x T and c_q' x T slabs, one weights.v pass. The prompt is prefilled with the model's own
attention op (the chunked exact op by default, linear memory); the caches' extra rows are then
computed for the last (c_q - 1) + (c_q' - 1) prompt rows only.

Layout: a `Cache` holds one `LayerCache` per layer plus, per slot of the fixed-size cache, the
document id of its token. Prompts of different lengths are LEFT-padded: the padding is its own
document (id `PAD_SEGMENT`), which the attention mask and every convolution tap already
ignore, so a padded row computes exactly what the unpadded prompt would, and all rows share one
write index. Packed prompts (several documents per row, `segment_ids`) decode as the
continuation of their last document.

    logits, cache = prefill(model, tokens_BxP, cache_len=P + new)   # logits [B, V] (last)
    logits, cache = decode_step(model, cache, next_tokens_B)       # one token per row
    logits, cache = extend(model, cache, tokens_BxR)               # R tokens per row at once

All three are plain functions of an nnx model; `make_decoder(model)` returns jitted versions
(parameters passed as state, the cache donated so its update is in place).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mta_jax import ops_chunked
from mta_jax.sharding import constrain

Array = jax.Array

PAD_SEGMENT = -1      # document id of left padding and of empty slots
_NO_ROW = -2          # document id of rows above the sequence (never equals a slot's id)
_NEG = ops_chunked._NEG
_CACHE_NAMES = ("act_batch", "act_heads", "act_length", None)


class DecodeError(ValueError):
  """A request the decoder cannot serve (too long for the cache, bad ids); says the fix."""


@struct.dataclass
class LayerCache:
  k: Array                     # [B, H, T, hd] RoPE'd keys
  v: Array                     # [B, H, T, hd]
  pre: Optional[Array] = None  # [B, H, c_q - 1, T] Mask_0'd logits of the last c_q - 1 rows
  post: Optional[Array] = None  # [B, H, c_q' - 1, T] softmax rows of the last c_q' - 1 rows


@struct.dataclass
class Cache:
  layers: tuple                # one LayerCache per layer
  segment_ids: Array           # [B, T] int32 document id of each slot (PAD_SEGMENT if unused)
  index: Array                 # [] int32: slots filled; the next token is written at `index`
  next_position: Array         # [B] int32 RoPE position of the next token
  next_segment: Array          # [B] int32 document id of the next token

  @property
  def length(self) -> int:
    return self.segment_ids.shape[1]

  @property
  def batch(self) -> int:
    return self.segment_ids.shape[0]


def _halos(attn) -> tuple[int, int]:
  """(c_q - 1, c_q' - 1) of this layer's key-query kernels (0 when it has none)."""
  hp = attn.kq_pre.shape[1] - 1 if attn.kq_pre is not None else 0
  hq = attn.kq_post.shape[1] - 1 if attn.kq_post is not None else 0
  return hp, hq


def cache_bytes(cache: Cache) -> dict[str, int]:
  """Bytes held by the cache: K/V, and the extra MTA rows."""
  kv = sum(l.k.nbytes + l.v.nbytes for l in cache.layers)
  rows = sum((l.pre.nbytes if l.pre is not None else 0) + (l.post.nbytes if l.post is not None
                                                           else 0) for l in cache.layers)
  return {"kv": int(kv), "mta_rows": int(rows), "total": int(kv + rows)}


def init_cache(model, batch: int, cache_len: int, dtype=None) -> Cache:
  """An empty cache of `cache_len` slots per row (decoding then starts at position 0)."""
  cfg = model.cfg
  if cache_len < 1:
    raise DecodeError(f"cache_len must be >= 1; got {cache_len}.")
  if cache_len > cfg.max_len:
    raise DecodeError(f"cache_len={cache_len} exceeds the model's max_len={cfg.max_len} (the "
                      "longest context it was built for); shorten the prompt or the number of "
                      "new tokens.")
  dtype = jnp.dtype(dtype or cfg.dtype)
  h, hd = cfg.n_heads, cfg.resolved_head_dim
  layers = []
  for block in model.blocks:
    hp, hq = _halos(block.attn)
    kv = lambda: constrain(jnp.zeros((batch, h, cache_len, hd), dtype), _CACHE_NAMES)
    rows = lambda n: (None if n == 0 else
                      constrain(jnp.zeros((batch, h, n, cache_len), jnp.float32), _CACHE_NAMES))
    layers.append(LayerCache(k=kv(), v=kv(), pre=rows(hp), post=rows(hq)))
  return Cache(layers=tuple(layers),
               segment_ids=jnp.full((batch, cache_len), PAD_SEGMENT, jnp.int32),
               index=jnp.zeros((), jnp.int32),
               next_position=jnp.zeros((batch,), jnp.int32),
               next_segment=jnp.zeros((batch,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# One layer's attention for a block of R consecutive rows against the cache.
# ---------------------------------------------------------------------------------------------


def _row_info(seg_BxT: Array, row0, rows: int):
  """Absolute row indices [R], document ids [B, R] (_NO_ROW above the sequence)."""
  r = row0 + jnp.arange(rows)
  seg = jnp.take(seg_BxT, jnp.clip(r, 0, seg_BxT.shape[1] - 1), axis=1)
  return r, jnp.where(r[None, :] >= 0, seg, _NO_ROW)


def _conv_row_mask(seg_BxT: Array, row0, rows: int, c_q: int) -> Array:
  """[B, c_q, R] floats: 1 iff row r - s exists and is in row r's document (ops.row_masks)."""
  r, seg_r = _row_info(seg_BxT, row0, rows)
  out = []
  for s in range(c_q):
    _, seg_src = _row_info(seg_BxT, row0 - s, rows)
    out.append(((seg_src == seg_r) & (seg_r != _NO_ROW)).astype(jnp.float32))
  del r
  return jnp.stack(out, axis=1)


def attend_rows(attn, q_BxHxRxD: Array, layer: LayerCache, seg_BxT: Array, row0
                ) -> tuple[Array, LayerCache]:
  """MTA for query rows row0 .. row0 + R - 1 against every slot of the cache.

  `layer.k / v` must already hold these rows' keys and values, `seg_BxT` their document ids;
  `layer.pre / post` hold the rows row0 - (c_q - 1) .. row0 - 1 (resp. c_q' - 1). Follows the
  order of ops._weights_xla line by line, on R rows. Returns the attention output
  [B, H, R, hd] (float32) and the layer cache with `pre` / `post` advanced past these rows.
  Rows whose conv reads a row above row0 that the cache does not hold (prefill's tail) get a
  wrong output, but the rows they leave in `pre` / `post` are right.
  """
  f32 = jnp.float32
  _, _, rows, head_dim = q_BxHxRxD.shape
  cols = layer.k.shape[2]
  get = lambda w: None if w is None else w[...].astype(f32)
  kq_pre, kq_post = get(attn.kq_pre), get(attn.kq_post)
  mix_pre, mix_post = get(attn.mix_pre), get(attn.mix_post)
  r, seg_r = _row_info(seg_BxT, row0, rows)
  j = jnp.arange(cols)
  mask = ((j[None, :] <= r[:, None])[None] & (seg_BxT[:, None, :] == seg_r[:, :, None]))[:, None]

  s = jnp.einsum("bhqd,bhkd->bhqk", q_BxHxRxD, layer.k, preferred_element_type=f32,
                 precision=jax.lax.Precision.HIGHEST) / math.sqrt(head_dim)
  pre, post = layer.pre, layer.post
  if kq_pre is not None or mix_pre is not None:
    s = jnp.where(mask, s, 0.0)  # Mask_0
  if kq_pre is not None:
    c_q = kq_pre.shape[1]
    slab = jnp.concatenate([pre, s], axis=2)  # rows row0 - (c_q - 1) .. row0 + R - 1
    pre = slab[:, :, -(c_q - 1):] if c_q > 1 else pre
    s = ops_chunked.shift_conv(slab, kq_pre, _conv_row_mask(seg_BxT, row0, rows, c_q))
  if mix_pre is not None:
    s = ops_chunked.head_mix_2d(s, mix_pre)
  p = jax.nn.softmax(jnp.where(mask, s, _NEG), axis=-1)
  p = jnp.where(mask, p, 0.0)
  if kq_post is not None:
    c_qp = kq_post.shape[1]
    slab = jnp.concatenate([post, p], axis=2)
    post = slab[:, :, -(c_qp - 1):] if c_qp > 1 else post
    p = ops_chunked.shift_conv(slab, kq_post, _conv_row_mask(seg_BxT, row0, rows, c_qp))
  if kq_post is not None or mix_post is not None:
    p = jnp.where(mask, p, 0.0)  # Mask_0
  if mix_post is not None:
    p = ops_chunked.head_mix_2d(p, mix_post)
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(layer.v.dtype), layer.v,
                   preferred_element_type=f32, precision=jax.lax.Precision.HIGHEST)
  if pre is not None:
    pre = constrain(pre, _CACHE_NAMES)
  if post is not None:
    post = constrain(post, _CACHE_NAMES)
  return out, layer.replace(pre=pre, post=post)


def _write(buf_BxHxTxD: Array, new_BxRxHxD: Array, index) -> Array:
  new = jnp.swapaxes(new_BxRxHxD, 1, 2).astype(buf_BxHxTxD.dtype)
  out = jax.lax.dynamic_update_slice(buf_BxHxTxD, new, (0, 0, index, 0))
  return constrain(out, _CACHE_NAMES)


def _attn_out(attn, o_BxTxHxD: Array) -> Array:
  """Gated group norm and output projection (the tail of Attention.__call__)."""
  o = attn.group_norm(o_BxTxHxD)
  y = jnp.einsum("bthk,hkd->btd", o, attn.wo[...].astype(o.dtype))
  return constrain(y, ("act_batch", "act_length", "act_embed"))


def _mlp(block, x):
  return constrain(x + block.mlp(block.mlp_norm(x)), ("act_batch", "act_length", "act_embed"))


def _logits(model, x_BxRxD: Array) -> Array:
  return model.embed.attend(model.final_norm(x_BxRxD))


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def extend(model, cache: Cache, tokens_BxR: Array) -> tuple[Array, Cache]:
  """Appends R tokens to every row (continuing each row's last document). Logits [B, R, V].

  Memory is O(R x T) per layer: use it for single steps (`decode_step`) and short chunks; a
  long prompt goes through `prefill`.
  """
  batch, rows = tokens_BxR.shape
  check_room(cache, rows)
  t0 = cache.index
  positions = cache.next_position[:, None] + jnp.arange(rows, dtype=jnp.int32)[None]
  seg_new = jnp.broadcast_to(cache.next_segment[:, None], (batch, rows))
  seg = jax.lax.dynamic_update_slice(cache.segment_ids, seg_new, (0, t0))
  x = model.embed(tokens_BxR, jnp.dtype(model.cfg.dtype))
  layers = []
  for block, lc in zip(model.blocks, cache.layers):
    attn = block.attn
    q, k, v = attn.project(block.attn_norm(x), positions)
    lc = lc.replace(k=_write(lc.k, k, t0), v=_write(lc.v, v, t0))
    o, lc = attend_rows(attn, jnp.swapaxes(q, 1, 2), lc, seg, t0)
    x = x + _attn_out(attn, jnp.swapaxes(o, 1, 2).astype(x.dtype))
    x = _mlp(block, x)
    layers.append(lc)
  cache = cache.replace(layers=tuple(layers), segment_ids=seg, index=t0 + rows,
                        next_position=positions[:, -1] + 1)
  return _logits(model, x), cache


def decode_step(model, cache: Cache, tokens_B: Array) -> tuple[Array, Cache]:
  """One new token per row. Returns logits [B, V] of the next token and the advanced cache."""
  logits, cache = extend(model, cache, tokens_B[:, None])
  return logits[:, 0], cache


def positions_from_segments(segment_ids_BxP: Array) -> Array:
  """Position of every token inside its document (a run of equal ids restarts at 0)."""
  batch, length = segment_ids_BxP.shape
  idx = jnp.arange(length)
  starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                            segment_ids_BxP[:, 1:] != segment_ids_BxP[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, idx[None], 0), axis=1)
  return (idx[None] - first).astype(jnp.int32)


def _prefill_layer(block, x, lc: LayerCache, positions, seg_model, seg_cache, length: int):
  """One block over the whole prompt with the model's own op; fills K/V and the MTA rows."""
  attn = block.attn
  q, k, v = attn.project(block.attn_norm(x), positions)
  o = attn.attend(q, k, v, seg_model, None)
  lc = lc.replace(k=_write(lc.k, k, 0), v=_write(lc.v, v, 0))
  hp, hq = _halos(attn)
  if hp + hq:
    # The cached rows: logits of the last hp rows and softmax rows of the last hq rows; the
    # latter need the pre conv of their rows, which reads hp rows further up.
    n = hp + hq
    q_tail = jnp.swapaxes(q, 1, 2)[:, :, max(0, length - n):]
    q_tail = jnp.pad(q_tail, ((0, 0), (0, 0), (n - q_tail.shape[2], 0), (0, 0)))
    _, lc = attend_rows(attn, q_tail, lc, seg_cache, length - n)
  x = x + _attn_out(attn, o)
  return _mlp(block, x), lc


def prefill(model, tokens_BxP: Array, cache_len: int, *, segment_ids: Array | None = None,
            positions: Array | None = None, all_logits: bool = False) -> tuple[Array, Cache]:
  """Runs the prompt through the model and returns (logits, cache of `cache_len` slots).

  Args:
    tokens_BxP: prompt ids; rows of different lengths are left-padded, with segment id
      PAD_SEGMENT on the padding (`pad_prompts` builds this).
    cache_len: slots in the cache (prompt + tokens to generate), at most model.max_len.
    segment_ids: [B, P] document ids (>= 0, PAD_SEGMENT on padding); None: one document.
    positions: [B, P] RoPE positions; None: computed per document from `segment_ids`.
    all_logits: return [B, P, V] instead of the last position's [B, V].
  """
  batch, length = tokens_BxP.shape
  if length > cache_len:
    raise DecodeError(f"the prompt has {length} tokens but the cache only {cache_len} slots; "
                      "raise cache_len (or max_new_tokens) or shorten the prompt.")
  cache = init_cache(model, batch, cache_len)
  seg_model = segment_ids
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, length), jnp.int32)
  if positions is None:
    positions = positions_from_segments(segment_ids)
  seg_cache = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                           (0, 0))
  x = constrain(model.embed(tokens_BxP, jnp.dtype(model.cfg.dtype)),
                ("act_batch", "act_length", "act_embed"))
  layers = []
  for block, lc in zip(model.blocks, cache.layers):
    x, lc = _prefill_layer(block, x, lc, positions, seg_model, seg_cache, length)
    layers.append(lc)
  cache = cache.replace(layers=tuple(layers), segment_ids=seg_cache,
                        index=jnp.asarray(length, jnp.int32),
                        next_position=positions[:, -1].astype(jnp.int32) + 1,
                        next_segment=segment_ids[:, -1].astype(jnp.int32))
  logits = _logits(model, x if all_logits else x[:, -1:])
  return (logits if all_logits else logits[:, 0]), cache


def pad_prompts(prompts: list, length: int | None = None, pad_id: int = 0
                ) -> tuple[Array, Array]:
  """Left-pads token lists to one length: (tokens [B, P], segment_ids [B, P]).

  Real tokens get document 0, padding PAD_SEGMENT (masked everywhere, see module docstring).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise DecodeError("every prompt needs at least one token (e.g. BOS).")
  longest = max(len(p) for p in prompts)
  length = longest if length is None else length
  if length < longest:
    raise DecodeError(f"pad length {length} is shorter than the longest prompt ({longest}).")
  tokens = [[pad_id] * (length - len(p)) + [int(t) for t in p] for p in prompts]
  seg = [[PAD_SEGMENT] * (length - len(p)) + [0] * len(p) for p in prompts]
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(seg, jnp.int32)


class Decoder:
  """Jitted prefill / decode_step / extend for one model: the parameters travel as state (so a
  sharded model keeps its shardings), the cache is donated (updated in place). Models with equal
  configs share compiled functions."""

  def __init__(self, model):
    self.graphdef, self.state = nnx.split(model)
    self.cfg = model.cfg
    key = json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str)
    if key not in _JITTED:
      _JITTED[key] = _jit_functions(self.graphdef)
    self._prefill, self._step, self._extend = _JITTED[key]

  def prefill(self, tokens, cache_len: int, segment_ids=None, all_logits: bool = False):
    if tokens.shape[1] > cache_len:
      raise DecodeError(f"the prompt has {tokens.shape[1]} tokens but the cache only "
                        f"{cache_len} slots; raise cache_len (or max_new_tokens) or shorten "
                        "the prompt.")
    if cache_len > self.cfg.max_len:
      raise DecodeError(f"prompt + new tokens need {cache_len} positions, more than the model's "
                        f"max_len={self.cfg.max_len}; shorten the prompt or max_new_tokens.")
    return self._prefill(self.state, tokens, segment_ids, cache_len=cache_len,
                         all_logits=all_logits)

  def step(self, cache: Cache, tokens_B):
    check_room(cache, 1)
    return self._step(self.state, cache, tokens_B)

  def extend(self, cache: Cache, tokens_BxR):
    check_room(cache, tokens_BxR.shape[1])
    return self._extend(self.state, cache, tokens_BxR)


_JITTED: dict[str, tuple] = {}


def _jit_functions(graphdef):
  @functools.partial(jax.jit, static_argnames=("cache_len", "all_logits"))
  def _prefill(state, tokens, segment_ids, cache_len, all_logits=False):
    m = nnx.merge(graphdef, state)
    return prefill(m, tokens, cache_len, segment_ids=segment_ids, all_logits=all_logits)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def _step(state, cache, tokens):
    return decode_step(nnx.merge(graphdef, state), cache, tokens)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def _extend(state, cache, tokens):
    return extend(nnx.merge(graphdef, state), cache, tokens)

  return _prefill, _step, _extend


def check_room(cache: Cache, rows: int) -> None:
  """DecodeError unless `rows` more tokens fit (outside jit: reads the cache index)."""
  if isinstance(cache.index, jax.core.Tracer):
    return
  used = int(cache.index)
  if used + rows > cache.length:
    raise DecodeError(f"the cache is full: {used} of {cache.length} slots used, {rows} more "
                      "requested; prefill with a larger cache_len (prompt + max_new_tokens).")
