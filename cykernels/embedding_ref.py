"""Plain-numpy twin of cykernels.embedding: same names, same argument order.

Shape legend: N rows (B*T), V vocabulary, C channels. ids are int64 (N,).
dweight ACCUMULATES (scatter-add, rows visited in order n = 0..N-1, so repeated ids
sum in a fixed order and the bits are deterministic).
"""

import numpy as np


def _check_ids(ids, vocab):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(
            f"ids: ids must lie in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}"
        )


def embedding_forward(out, ids, weight):
    """out[n] = weight[ids[n]]"""
    _check_ids(ids, weight.shape[0])
    np.take(weight, ids, axis=0, out=out)


def embedding_backward(dweight, dout, ids):
    """dweight[ids[n]] += dout[n] for n = 0..N-1 in order"""
    _check_ids(ids, dweight.shape[0])
    np.add.at(dweight, ids, dout)
