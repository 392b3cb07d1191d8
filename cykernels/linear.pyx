# cython: language_level=3
"""Fully connected layer, forward and backward side by side: out = x @ weight.T + bias.

The matrix products go to the sgemm of cykernels/gemm.pyx (MKL, without the GIL) when
one is loaded, else to BLAS through numpy (np.matmul with out=); either way no copy of
x, the weight or the result. The bias add and the bias-gradient column sums are the
Cython loops here, run without the GIL. weight is (O, I), PyTorch's nn.Linear layout, so
checkpoints load into the equivalent torch module.
Parameter gradients (dweight, dbias) ACCUMULATE (+=, so tied weights such as an
embedding shared with the output head work) unless accumulate=False, which overwrites
them: the first write of a backward pass needs no zeroed buffer. dx OVERWRITES and may
be None to skip it (the first layer needs no input gradient).

Allocation: none with sgemm (beta = 1 accumulates in place). numpy's matmul has no
"C += A @ B" form, so on the numpy path an accumulating dweight product goes through one
temporary of dweight's size; nothing else allocates.

References: llm.c matmul_forward / matmul_backward; torch.nn.Linear and its autograd
formulas. The numpy twin is cykernels/linear_ref.py.

Shape legend: N rows (B*T), I input features, O output features.
  x, dx (N, I)    weight, dweight (O, I)    bias, dbias (O,)    out, dout (N, O)
"""

import numpy as np

from cykernels._checks import check_array, check_no_alias
from cykernels.gemm cimport sgemm, sgemm_fits

from cykernels import gemm as _gemm


# ---- argument checks -----------------------------------------------------------------


def _dims(x, weight):
    """(N, I, O) from x (N, I) and weight (O, I), both float32 C-contiguous matrices."""
    check_array("x", x, ndim=2)
    check_array("weight", weight, ndim=2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight: expected shape (O, {x.shape[1]}) to match x's {x.shape[1]} input "
            f"features, got {weight.shape}"
        )
    return x.shape[0], x.shape[1], weight.shape[0]


# ---- linear --------------------------------------------------------------------------


cdef void _add_bias(float[:, ::1] out, const float[::1] bias) noexcept nogil:
    """out[n] += bias"""
    cdef Py_ssize_t n, o
    for n in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[n, o] += bias[o]


cdef void _bias_grad(float[::1] dbias, const float[:, ::1] dout) noexcept nogil:
    """dbias += sum_n dout[n]   (rows in order n = 0..N-1: fixed bits)"""
    cdef Py_ssize_t n, o
    for n in range(dout.shape[0]):
        for o in range(dout.shape[1]):
            dbias[o] += dout[n, o]


def linear_forward(out, x, weight, bias):
    """out = x @ weight.T + bias   (bias may be None)"""
    n, i, o = _dims(x, weight)
    check_array("out", out, shape=(n, o), writable=True)
    if bias is not None:
        check_array("bias", bias, shape=(o,))
    check_no_alias({"out": out}, {"x": x, "weight": weight, "bias": bias})
    cdef float[:, ::1] ov = out
    cdef const float[:, ::1] xv, wv
    cdef const float[::1] b
    cdef int rows, ins, outs
    _gemm.library()
    if sgemm_fits(n, o, i):
        rows, ins, outs = n, i, o
        xv, wv = x, weight
        with nogil:
            sgemm(False, True, rows, outs, ins, &xv[0, 0], ins, &wv[0, 0], ins,
                  0.0, &ov[0, 0], outs)
    else:
        np.matmul(x, weight.T, out=out)
    if bias is not None and n > 0:
        b = bias
        with nogil:
            _add_bias(ov, b)


def linear_backward(dx, dweight, dbias, dout, x, weight, accumulate=True):
    """dx = dout @ weight; dweight += dout.T @ x; dbias += sum_n dout[n]
    (dx and dbias may be None). accumulate=False overwrites dweight and dbias instead:
    no zeroing pass and no temporary for the first write of a pass."""
    n, i, o = _dims(x, weight)
    check_array("dout", dout, shape=(n, o))
    check_array("dweight", dweight, shape=(o, i), writable=True)
    if dx is not None:
        check_array("dx", dx, shape=(n, i), writable=True)
    if dbias is not None:
        check_array("dbias", dbias, shape=(o,), writable=True)
    check_no_alias({"dx": dx, "dweight": dweight, "dbias": dbias},
                   {"dout": dout, "x": x, "weight": weight})
    # forward: out = x @ weight.T + bias
    cdef const float[:, ::1] g = dout
    cdef const float[:, ::1] xv, wv
    cdef float[:, ::1] dxv, dwv
    cdef int rows, ins, outs
    cdef float beta = 1.0 if accumulate else 0.0
    _gemm.library()
    if sgemm_fits(n, i, o):
        rows, ins, outs = n, i, o
        xv, wv, dwv = x, weight, dweight
        if dx is not None:
            dxv = dx
            with nogil:
                sgemm(False, False, rows, ins, outs, &g[0, 0], outs, &wv[0, 0], ins,
                      0.0, &dxv[0, 0], ins)
        with nogil:
            sgemm(True, False, outs, ins, rows, &g[0, 0], outs, &xv[0, 0], ins,
                  beta, &dwv[0, 0], ins)
    else:
        if dx is not None:
            np.matmul(dout, weight, out=dx)
        if accumulate:
            dweight += np.matmul(dout.T, x)
        else:
            np.matmul(dout.T, x, out=dweight)
    cdef float[::1] db
    if dbias is not None:
        if not accumulate:
            dbias.fill(0)
        db = dbias
        with nogil:
            _bias_grad(db, g)
