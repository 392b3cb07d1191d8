"""Plain-numpy twin of cykernels.norms: same names, same argument order.

Shape legend: N rows (B*T), C channels. Each row is normalised over its C channels.
mean and rstd (N,) are saved by the forward for the backward.
Parameter gradients (dweight, dbias) ACCUMULATE; dx OVERWRITES and may be None.

References: llm.c layernorm_forward/backward; torch.nn.LayerNorm (biased variance);
torch.nn.RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, eps explicit here.
"""

import numpy as np

# ---- layernorm -----------------------------------------------------------------------


def layernorm_forward(out, mean, rstd, x, weight, bias, eps=1e-5):
    """out = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps)   (bias may be None)"""
    mu = x.mean(axis=-1)
    xc = x - mu[:, None]
    var = (xc * xc).mean(axis=-1)
    rs = 1.0 / np.sqrt(var + eps)
    mean[...] = mu
    rstd[...] = rs
    out[...] = xc * rs[:, None] * weight
    if bias is not None:
        out += bias


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout * weight, xhat the normalised x"""
    xhat = (x - mean[:, None]) * rstd[:, None]
    if dbias is not None:
        dbias += dout.sum(axis=0)
    dweight += (dout * xhat).sum(axis=0)
    if dx is not None:
        g = dout * weight
        dx[...] = rstd[:, None] * (
            g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
        )


# ---- rmsnorm -------------------------------------------------------------------------


def rmsnorm_forward(out, rstd, x, weight, eps=1e-6):
    """out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps)"""
    rs = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)
    rstd[...] = rs
    out[...] = x * rs[:, None] * weight


def rmsnorm_backward(dx, dweight, dout, x, weight, rstd):
    """dx = rstd (g - xhat mean(g xhat)), g = dout * weight, xhat = x * rstd"""
    xhat = x * rstd[:, None]
    dweight += (dout * xhat).sum(axis=0)
    if dx is not None:
        g = dout * weight
        dx[...] = rstd[:, None] * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
