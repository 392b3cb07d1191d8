"""Plain-numpy twin of cykernels.linear: same names, same argument order.

Shape legend: N rows (B*T), I input features, O output features. weight is (O, I),
PyTorch's nn.Linear layout, so out = x @ weight.T + bias.
Parameter gradients (dweight, dbias) ACCUMULATE (+=) so tied weights work, unless
accumulate=False (the first write of a pass overwrites); the input gradient dx
OVERWRITES and may be None to skip it (the first layer needs no dx).
"""

import numpy as np


def linear_forward(out, x, weight, bias):
    """out = x @ weight.T + bias   (bias may be None)"""
    np.matmul(x, weight.T, out=out)
    if bias is not None:
        out += bias


def linear_backward(dx, dweight, dbias, dout, x, weight, accumulate=True):
    """dx = dout @ weight; dweight += dout.T @ x; dbias += sum_n dout[n]
    (accumulate=False: dweight = ..., dbias = ...)"""
    if dx is not None:
        np.matmul(dout, weight, out=dx)
    if not accumulate:
        dweight[...] = 0
        if dbias is not None:
            dbias[...] = 0
    dweight += dout.T @ x
    if dbias is not None:
        dbias += dout.sum(axis=0)
