"""A plain float64 NumPy loop of MTA, written straight from docs/MTA.md Sec. 2-5.

Deliberately naive (explicit loops over every index) so that it is easy to check by eye; the
tests hold every JAX implementation to it.
"""
import numpy as np


def mta_numpy(q, k, v, kq_pre=None, kq_post=None, mix_pre=None, mix_post=None, seg=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  seg = np.zeros((B, T), np.int64) if seg is None else np.asarray(seg)
  out = np.zeros((B, T, H, D))
  for b in range(B):
    valid = np.array([[j <= i and seg[b, i] == seg[b, j] for j in range(T)] for i in range(T)])
    s = np.einsum("qhd,khd->hqk", q[b], k[b]) / np.sqrt(D)

    def conv(x, kern):
      _, c_q, c_k = kern.shape
      y = np.zeros_like(x)
      for h in range(H):
        for i in range(T):
          for j in range(T):
            acc = 0.0
            for a in range(c_q):
              ii = i - (c_q - 1) + a
              # a row of another document (or before the start) is zero padding
              if ii < 0 or seg[b, ii] != seg[b, i]:
                continue
              for c in range(c_k):
                jj = j - (c_k - 1) // 2 + c
                if 0 <= jj < T:
                  acc += kern[h, a, c] * x[h, ii, jj]
            y[h, i, j] = acc
      return y

    def mix(x, w):
      G, C, _ = w.shape
      y = np.zeros_like(x)
      for g in range(G):
        for o in range(C):
          for i in range(C):
            y[g * C + o] += w[g, o, i] * x[g * C + i]
      return y

    if kq_pre is not None or mix_pre is not None:
      s = np.where(valid, s, 0.0)
    if kq_pre is not None:
      s = conv(s, np.asarray(kq_pre, np.float64))
    if mix_pre is not None:
      s = mix(s, np.asarray(mix_pre, np.float64))
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    if kq_post is not None:
      p = conv(p, np.asarray(kq_post, np.float64))
    if kq_post is not None or mix_post is not None:
      p = np.where(valid, p, 0.0)
    if mix_post is not None:
      p = mix(p, np.asarray(mix_post, np.float64))
    out[b] = np.einsum("hqk,khd->qhd", p, v[b])
  return out
