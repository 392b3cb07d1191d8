"""Plain-numpy twin of cykernels.attention: same names, same argument order.

Causal multi-head self-attention after the qkv projection, as in llm.c.
Shape legend: B batch, T time, C channels, H heads, hs = C / H head size.
qkv (B, T, 3C) is laid out [q | k | v], each split into H heads of hs channels;
att (B, H, T, T) holds the softmax probabilities (upper triangle zero), saved for the
backward; out (B, T, C) has the heads concatenated again. scale = 1 / sqrt(hs).
Equals torch F.scaled_dot_product_attention(q, k, v, is_causal=True).
"""

import numpy as np


def _heads(qkv, n_head):
    """Split qkv (B, T, 3C) into q, k, v views of shape (B, H, T, hs)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    hs = c // n_head
    split = qkv.reshape(b, t, 3, n_head, hs)
    return (split[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def attention_forward(out, att, qkv, n_head):
    """att = softmax(mask(q k^T * scale)); out = att v   (per batch and head)"""
    b, t, c3 = qkv.shape
    q, k, v = _heads(qkv, n_head)
    scale = 1.0 / np.sqrt(c3 // 3 // n_head)
    preatt = (q @ k.transpose(0, 1, 3, 2)) * scale
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    preatt[..., future] = -np.inf
    e = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att[...] = e / e.sum(axis=-1, keepdims=True)
    out[...] = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, c3 // 3)


def attention_backward(dqkv, dpreatt, datt, dout, qkv, att, n_head):
    """dv = att^T dout; datt = dout v^T; dpreatt = att (datt - rowsum(datt att)); dq, dk"""
    b, t, c3 = qkv.shape
    c = c3 // 3
    hs = c // n_head
    q, k, v = _heads(qkv, n_head)
    dq, dk, dv = _heads(dqkv, n_head)
    do = dout.reshape(b, t, n_head, hs).transpose(0, 2, 1, 3)
    scale = 1.0 / np.sqrt(hs)
    # forward: out = att @ v
    datt[...] = do @ v.transpose(0, 1, 3, 2)
    dv[...] = att.transpose(0, 1, 3, 2) @ do
    # forward: att = softmax(preatt) over the last axis (masked entries have att = 0)
    dpreatt[...] = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    # forward: preatt = q @ k^T * scale
    dq[...] = (dpreatt @ k) * scale
    dk[...] = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale
