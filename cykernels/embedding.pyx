# cython: language_level=3
"""Embedding lookup, forward and backward side by side: out[n] = weight[ids[n]].

The backward is a scatter-add into dweight that ACCUMULATES (+=, so a weight shared with
the output head collects both gradients) and visits rows in order n = 0..N-1, so
repeated ids sum in a fixed order and the bits are deterministic. Ids are checked
against the vocabulary before any memory is touched: an out-of-range id is a ValueError
naming `ids`, never a stray write. Nothing allocates; the loops run without the GIL.

References: llm.c encoder_forward / encoder_backward; torch.nn.Embedding (weight (V, C)).
The numpy twin is cykernels/embedding_ref.py.

Shape legend: N rows (B*T), V vocabulary, C channels.
  ids int64 (N,)    weight, dweight (V, C)    out, dout (N, C)
"""

import numpy as np

from cykernels._checks import check_array, check_index_range, check_no_alias

from libc.stdint cimport int64_t


def _check(table_name, table, rows_name, rows, ids, table_writable, rows_writable):
    check_array(table_name, table, ndim=2, writable=table_writable)
    check_array("ids", ids, dtype=np.int64, ndim=1)
    check_array(rows_name, rows, shape=(ids.shape[0], table.shape[1]), writable=rows_writable)
    check_index_range("ids", ids, table.shape[0])


cdef void _embedding_forward(float[:, ::1] out, const int64_t[::1] ids,
                             const float[:, ::1] weight) noexcept nogil:
    """out[n] = weight[ids[n]]"""
    cdef Py_ssize_t n, c
    cdef int64_t row
    for n in range(ids.shape[0]):
        row = ids[n]
        for c in range(weight.shape[1]):
            out[n, c] = weight[row, c]


cdef void _embedding_backward(float[:, ::1] dweight, const float[:, ::1] dout,
                              const int64_t[::1] ids) noexcept nogil:
    """dweight[ids[n]] += dout[n] for n = 0..N-1 in order"""
    cdef Py_ssize_t n, c
    cdef int64_t row
    for n in range(ids.shape[0]):
        # forward: out[n] = weight[ids[n]]
        row = ids[n]
        for c in range(dout.shape[1]):
            dweight[row, c] += dout[n, c]


def embedding_forward(out, ids, weight):
    """out[n] = weight[ids[n]]; ids int64 in [0, V)"""
    _check("weight", weight, "out", out, ids, False, True)
    check_no_alias({"out": out}, {"weight": weight})
    cdef float[:, ::1] o = out
    cdef const int64_t[::1] i = ids
    cdef const float[:, ::1] w = weight
    with nogil:
        _embedding_forward(o, i, w)


def embedding_backward(dweight, dout, ids):
    """dweight[ids[n]] += dout[n], rows in order n = 0..N-1 (deterministic scatter-add)"""
    _check("dweight", dweight, "dout", dout, ids, True, False)
    check_no_alias({"dweight": dweight}, {"dout": dout})
    cdef float[:, ::1] dw = dweight
    cdef const float[:, ::1] g = dout
    cdef const int64_t[::1] i = ids
    with nogil:
        _embedding_backward(dw, g, i)
