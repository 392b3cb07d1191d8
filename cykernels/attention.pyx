# cython: language_level=3
"""Causal multi-head self-attention core (after the qkv projection), forward and
backward side by side, as in llm.c.

Per batch row b and head h, with q, k, v the head's (T, hs) slices of qkv:

    preatt = q k^T * scale            scale = 1 / sqrt(hs)
    att    = softmax(preatt) over each row, future positions (t2 > t) masked out
    out    = att v                    heads concatenated back into (T, C)

The four per-head products go to BLAS through numpy's batched np.matmul on strided
views of qkv / out / dqkv (no copies: each head's (T, hs) slice is a BLAS matrix with
leading dimension 3C or C). Measured faster here than nested loops even though BLAS
also computes the masked upper triangle. The masked softmax and its backward are the
Cython loops below (exp and the row reductions from cykernels/_simd.pxd, as softmax in
activations.pyx), run without the GIL; they only touch the causal lower triangle and
write exact zeros above it. The forward saves att (the probabilities) for the backward;
the backward takes datt and dpreatt as caller-provided scratch. dqkv OVERWRITES.
Nothing allocates (numpy's matmul writes straight into the given views).

Equal to torch F.scaled_dot_product_attention(q, k, v, is_causal=True) after splitting
heads. References: llm.c attention_forward / attention_backward; the torch SDPA docs.
The numpy twin is cykernels/attention_ref.py.

Shape legend: B batch, T time, C channels, H heads (n_head), hs = C / H head size.
  qkv, dqkv (B, T, 3C) laid out [q | k | v], each split into H heads of hs channels
  out, dout (B, T, C)      att, datt, dpreatt (B, H, T, T)
"""

from cykernels._simd cimport zt_dot, zt_expf, zt_max, zt_sum

import numpy as np

from cykernels._checks import check_array, check_no_alias


# ---- argument checks -----------------------------------------------------------------


def _dims(qkv, n_head):
    """(B, T, C, hs) from qkv (B, T, 3C) and n_head, with C divisible by n_head."""
    check_array("qkv", qkv, ndim=3)
    if not isinstance(n_head, (int, np.integer)) or n_head < 1:
        raise ValueError(f"n_head: expected a positive integer, got {n_head!r}")
    b, t, c3 = qkv.shape
    if c3 % 3 or (c3 // 3) % n_head or c3 == 0:
        raise ValueError(
            f"qkv: expected shape (B, T, 3C) with C > 0 divisible by n_head={n_head}, "
            f"got {qkv.shape}"
        )
    return b, t, c3 // 3, c3 // 3 // n_head


def _heads(qkv, n_head):
    """q, k, v as strided (B, H, T, hs) views of qkv (B, T, 3C): no copies."""
    b, t, c3 = qkv.shape
    split = qkv.reshape(b, t, 3, n_head, c3 // 3 // n_head)
    return [split[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def _merged(arr, n_head):
    """arr (B, T, C) as a strided (B, H, T, hs) view: no copy."""
    b, t, c = arr.shape
    return arr.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)


# ---- causal softmax over (B*H, T, T) -------------------------------------------------


cdef void _causal_softmax_forward(float[:, :, ::1] att, float scale) noexcept nogil:
    """att[t, :t+1] = softmax(att[t, :t+1] * scale); att[t, t+1:] = 0   (in place)"""
    cdef Py_ssize_t bh, t, t2, T = att.shape[1]
    cdef float m, inv
    for bh in range(att.shape[0]):
        for t in range(T):
            # scale > 0, so max(scale x) = scale max(x): the scaling folds into the exp
            m = zt_max(&att[bh, t, 0], t + 1)
            for t2 in range(t + 1):
                att[bh, t, t2] = zt_expf((att[bh, t, t2] - m) * scale)
            inv = 1.0 / zt_sum(&att[bh, t, 0], t + 1)
            for t2 in range(t + 1):
                att[bh, t, t2] = att[bh, t, t2] * inv
            for t2 in range(t + 1, T):
                att[bh, t, t2] = 0.0


cdef void _causal_softmax_backward(float[:, :, ::1] dpreatt, const float[:, :, ::1] datt,
                                   const float[:, :, ::1] att, float scale) noexcept nogil:
    """dpreatt[t, :t+1] = scale att (datt - <datt, att>); dpreatt[t, t+1:] = 0"""
    cdef Py_ssize_t bh, t, t2, T = att.shape[1]
    cdef float d
    for bh in range(att.shape[0]):
        for t in range(T):
            # forward: att = softmax(preatt) on the visible row, preatt = q k^T scale
            d = zt_dot(&datt[bh, t, 0], &att[bh, t, 0], t + 1)
            for t2 in range(t + 1):
                dpreatt[bh, t, t2] = scale * att[bh, t, t2] * (datt[bh, t, t2] - d)
            for t2 in range(t + 1, T):
                dpreatt[bh, t, t2] = 0.0


# ---- attention -----------------------------------------------------------------------


def attention_forward(out, att, qkv, n_head):
    """att = softmax(causal(q k^T / sqrt(hs))); out = att v, per batch row and head"""
    b, t, c, hs = _dims(qkv, n_head)
    check_array("out", out, shape=(b, t, c), writable=True)
    check_array("att", att, shape=(b, n_head, t, t), writable=True)
    check_no_alias({"out": out, "att": att}, {"qkv": qkv})
    if out.size == 0:
        return
    q, k, v = _heads(qkv, n_head)
    np.matmul(q, k.transpose(0, 1, 3, 2), out=att)
    cdef float[:, :, ::1] a = att.reshape(b * n_head, t, t)
    cdef float scale = 1.0 / np.sqrt(hs)
    with nogil:
        _causal_softmax_forward(a, scale)
    np.matmul(att, v, out=_merged(out, n_head))


def attention_backward(dqkv, dpreatt, datt, dout, qkv, att, n_head):
    """dv = att^T dout; datt = dout v^T; dpreatt = att (datt - <datt, att>) / sqrt(hs);
    dq = dpreatt k; dk = dpreatt^T q   (dqkv overwrites; dpreatt, datt are scratch)"""
    b, t, c, hs = _dims(qkv, n_head)
    check_array("dqkv", dqkv, shape=qkv.shape, writable=True)
    check_array("dpreatt", dpreatt, shape=(b, n_head, t, t), writable=True)
    check_array("datt", datt, shape=(b, n_head, t, t), writable=True)
    check_array("dout", dout, shape=(b, t, c))
    check_array("att", att, shape=(b, n_head, t, t))
    check_no_alias({"dqkv": dqkv, "dpreatt": dpreatt, "datt": datt},
                   {"dout": dout, "qkv": qkv, "att": att})
    if dqkv.size == 0:
        return
    q, k, v = _heads(qkv, n_head)
    dq, dk, dv = _heads(dqkv, n_head)
    do = _merged(dout, n_head)
    # forward: out = att v
    np.matmul(do, v.transpose(0, 1, 3, 2), out=datt)
    np.matmul(att.transpose(0, 1, 3, 2), do, out=dv)
    cdef float[:, :, ::1] dp = dpreatt.reshape(b * n_head, t, t)
    cdef const float[:, :, ::1] da = datt.reshape(b * n_head, t, t)
    cdef const float[:, :, ::1] a = att.reshape(b * n_head, t, t)
    cdef float scale = 1.0 / np.sqrt(hs)
    with nogil:
        _causal_softmax_backward(dp, da, a, scale)
    # forward: preatt = q k^T scale (scale already folded into dpreatt)
    np.matmul(dpreatt, k, out=dq)
    np.matmul(dpreatt.transpose(0, 1, 3, 2), q, out=dk)
