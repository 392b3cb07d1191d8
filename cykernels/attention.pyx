# cython: language_level=3
"""Causal multi-head self-attention core (after the qkv projection), forward and
backward side by side, as in llm.c.

Per batch row b and head h, with q, k, v the head's (T, hs) slices of qkv:

    preatt = q k^T * scale            scale = 1 / sqrt(hs)
    att    = softmax(preatt) over each row, future positions (t2 > t) masked out
    out    = att v                    heads concatenated back into (T, C)

Each head's (T, hs) slice of qkv / out / dqkv is a BLAS matrix with leading dimension
3C or C, so no product copies anything. With the sgemm of cykernels/gemm.pyx (MKL) one
loop without the GIL walks the (b, h) tiles and does a tile's products and softmax
together while its (T, T) block is in cache; without it the products go to numpy's
batched np.matmul on strided views, then the softmax runs over all tiles. BLAS also
computes the masked upper triangle: measured faster here than skipping it by hand.
The masked softmax and its backward are the Cython loops below (exp and the row reductions from cykernels/_simd.pxd, as softmax in
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
from cykernels.gemm cimport sgemm, sgemm_fits

import numpy as np

from cykernels import gemm as _gemm
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


# ---- causal softmax of one (T, T) tile -----------------------------------------------


cdef void _causal_softmax_forward(float* att, Py_ssize_t T, float scale) noexcept nogil:
    """att[t, :t+1] = softmax(att[t, :t+1] * scale); att[t, t+1:] = 0   (in place)"""
    cdef Py_ssize_t t, t2
    cdef float m, inv
    cdef float* row
    for t in range(T):
        row = att + t * T
        # scale > 0, so max(scale x) = scale max(x): the scaling folds into the exp
        m = zt_max(row, t + 1)
        for t2 in range(t + 1):
            row[t2] = zt_expf((row[t2] - m) * scale)
        inv = 1.0 / zt_sum(row, t + 1)
        for t2 in range(t + 1):
            row[t2] = row[t2] * inv
        for t2 in range(t + 1, T):
            row[t2] = 0.0


cdef void _causal_softmax_backward(float* dpreatt, const float* datt, const float* att,
                                   Py_ssize_t T, float scale) noexcept nogil:
    """dpreatt[t, :t+1] = scale att (datt - <datt, att>); dpreatt[t, t+1:] = 0"""
    cdef Py_ssize_t t, t2, r
    cdef float d
    for t in range(T):
        r = t * T
        # forward: att = softmax(preatt) on the visible row, preatt = q k^T scale
        d = zt_dot(datt + r, att + r, t + 1)
        for t2 in range(t + 1):
            dpreatt[r + t2] = scale * att[r + t2] * (datt[r + t2] - d)
        for t2 in range(t + 1, T):
            dpreatt[r + t2] = 0.0


# ---- attention, tile by tile with sgemm ------------------------------------------------


cdef void _forward_tiles(float* out, float* att, const float* qkv, int B, int T, int C,
                         int H, float scale) noexcept nogil:
    """out, att of every (b, h) tile: preatt = q k^T, softmax, out = att v"""
    cdef int b, h, hs = C // H, ld = 3 * C
    cdef const float* q
    cdef float* a
    for b in range(B):
        for h in range(H):
            q = qkv + <Py_ssize_t>b * T * ld + h * hs
            a = att + (<Py_ssize_t>b * H + h) * T * T
            sgemm(False, True, T, T, hs, q, ld, q + C, ld, 0.0, a, T)
            _causal_softmax_forward(a, T, scale)
            sgemm(False, False, T, hs, T, a, T, q + 2 * C, ld,
                  0.0, out + <Py_ssize_t>b * T * C + h * hs, C)


cdef void _backward_tiles(float* dqkv, float* dpreatt, float* datt, const float* dout,
                          const float* qkv, const float* att, int B, int T, int C,
                          int H, float scale) noexcept nogil:
    """dqkv of every (b, h) tile (see attention_backward)"""
    cdef int b, h, hs = C // H, ld = 3 * C
    cdef Py_ssize_t tile, head
    cdef const float* q
    cdef const float* do
    cdef float* dq
    for b in range(B):
        for h in range(H):
            head = <Py_ssize_t>b * T * ld + h * hs
            q, dq = qkv + head, dqkv + head
            do = dout + <Py_ssize_t>b * T * C + h * hs
            tile = (<Py_ssize_t>b * H + h) * T * T
            # forward: out = att v
            sgemm(False, True, T, T, hs, do, C, q + 2 * C, ld, 0.0, datt + tile, T)
            sgemm(True, False, T, hs, T, att + tile, T, do, C, 0.0, dq + 2 * C, ld)
            _causal_softmax_backward(dpreatt + tile, datt + tile, att + tile, T, scale)
            # forward: preatt = q k^T scale (scale already folded into dpreatt)
            sgemm(False, False, T, hs, T, dpreatt + tile, T, q + C, ld, 0.0, dq, ld)
            sgemm(True, False, T, hs, T, dpreatt + tile, T, q, ld, 0.0, dq + C, ld)


# ---- attention -----------------------------------------------------------------------


def attention_forward(out, att, qkv, n_head):
    """att = softmax(causal(q k^T / sqrt(hs))); out = att v, per batch row and head"""
    b, t, c, hs = _dims(qkv, n_head)
    check_array("out", out, shape=(b, t, c), writable=True)
    check_array("att", att, shape=(b, n_head, t, t), writable=True)
    check_no_alias({"out": out, "att": att}, {"qkv": qkv})
    if out.size == 0:
        return
    cdef float[:, :, ::1] o = out
    cdef float[:, :, :, ::1] a = att
    cdef const float[:, :, ::1] x = qkv
    cdef int B = b, T = t, C = c, H = n_head
    cdef Py_ssize_t bh
    cdef float scale = 1.0 / np.sqrt(hs)
    _gemm.library()
    if sgemm_fits(t, t, 3 * c):
        with nogil:
            _forward_tiles(&o[0, 0, 0], &a[0, 0, 0, 0], &x[0, 0, 0], B, T, C, H, scale)
        return
    q, k, v = _heads(qkv, n_head)
    np.matmul(q, k.transpose(0, 1, 3, 2), out=att)
    with nogil:
        for bh in range(<Py_ssize_t>B * H):
            _causal_softmax_forward(&a[0, 0, 0, 0] + bh * T * T, T, scale)
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
    cdef float[:, :, ::1] dx = dqkv
    cdef float[:, :, :, ::1] dp = dpreatt
    cdef float[:, :, :, ::1] da = datt
    cdef const float[:, :, ::1] do = dout
    cdef const float[:, :, ::1] x = qkv
    cdef const float[:, :, :, ::1] a = att
    cdef int B = b, T = t, C = c, H = n_head
    cdef Py_ssize_t bh, tile
    cdef float scale = 1.0 / np.sqrt(hs)
    _gemm.library()
    if sgemm_fits(t, t, 3 * c):
        with nogil:
            _backward_tiles(&dx[0, 0, 0], &dp[0, 0, 0, 0], &da[0, 0, 0, 0], &do[0, 0, 0],
                            &x[0, 0, 0], &a[0, 0, 0, 0], B, T, C, H, scale)
        return
    q, k, v = _heads(qkv, n_head)
    dq, dk, dv = _heads(dqkv, n_head)
    dom = _merged(dout, n_head)
    # forward: out = att v
    np.matmul(dom, v.transpose(0, 1, 3, 2), out=datt)
    np.matmul(att.transpose(0, 1, 3, 2), dom, out=dv)
    with nogil:
        for bh in range(<Py_ssize_t>B * H):
            tile = bh * T * T
            _causal_softmax_backward(&dp[0, 0, 0, 0] + tile, &da[0, 0, 0, 0] + tile,
                                     &a[0, 0, 0, 0] + tile, T, scale)
    # forward: preatt = q k^T scale (scale already folded into dpreatt)
    np.matmul(dpreatt, k, out=dq)
    np.matmul(dpreatt.transpose(0, 1, 3, 2), q, out=dk)
