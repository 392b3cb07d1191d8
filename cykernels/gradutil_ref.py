"""Plain-numpy twin of cykernels.gradutil: same names, same argument order, same effects.

Shape legend: P = elements (any shape; treated as flat). Works in any float dtype.
"""

import numpy as np

CLIP_EPS = 1e-6


def sq_norm(x):
    """sum(x**2) as a Python float, accumulated in float64."""
    flat = x.reshape(-1).astype(np.float64)
    return float(np.dot(flat, flat))


def clip_by_global_norm(grad, max_norm, total_norm=None):
    """grad *= max_norm / (norm + 1e-6) when that is below 1; (norm, finite), grad untouched
    when the norm is not finite"""
    norm = sq_norm(grad) ** 0.5 if total_norm is None else float(total_norm)
    if not np.isfinite(norm):
        return norm, False
    clip_coef = max_norm / (norm + CLIP_EPS)
    if clip_coef < 1.0:
        grad *= grad.dtype.type(clip_coef)
    return norm, True


def scale(x, alpha):
    """x *= alpha"""
    x *= x.dtype.type(alpha)


def accumulate(dst, src, alpha=1.0):
    """dst += alpha * src"""
    dst += dst.dtype.type(alpha) * src


def count_nonfinite(x):
    """#{i : x_i is NaN or +-Inf}"""
    return int(np.count_nonzero(~np.isfinite(x)))
