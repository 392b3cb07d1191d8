"""Plain-numpy twin of cykernels.losses: same names, same argument order, same semantics.

Works in the inputs' own float dtype (float64 for finite-difference checks). Returns the
loss as a Python float; `*_forward_backward` overwrites the d-arrays with
d(grad_scale * loss)/d(input). An empty mean (no rows, every row ignored) is 0.0 with a
zero gradient, as in the kernels. Validation lives in the kernels, not here.

Shape legend: N rows, C classes, D embedding width, P elements.
"""

import numpy as np

# ---- softmax cross-entropy -----------------------------------------------------------


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """mean over rows with y_i != ignore_index of (1 - s)(-log p_iy) + s mean_c(-log p_ic)"""
    valid = targets != ignore_index
    if not valid.any():
        return 0.0
    logp = _log_softmax(logits[valid])
    nll = -logp[np.arange(logp.shape[0]), targets[valid]]
    smooth = -logp.mean(axis=1)
    return float(((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean())


def softmax_cross_entropy_forward_backward(
    d_logits, logits, targets, ignore_index=-100, label_smoothing=0.0, grad_scale=1.0
):
    """d x_ic = grad_scale / N_valid (p_ic - s / C - (1 - s) [c == y_i]); 0 on ignored rows"""
    valid = targets != ignore_index
    n_valid, n_classes = int(valid.sum()), logits.shape[1]
    d_logits[...] = 0.0
    if n_valid == 0:
        return 0.0
    rows = np.flatnonzero(valid)
    grad = np.exp(_log_softmax(logits[rows])) - label_smoothing / n_classes
    grad[np.arange(n_valid), targets[rows]] -= 1.0 - label_smoothing
    d_logits[rows] = grad * (grad_scale / n_valid)
    return softmax_cross_entropy_forward(logits, targets, ignore_index, label_smoothing)


# ---- mean squared error --------------------------------------------------------------


def mse_forward(pred, target):
    """mean((pred - target)^2)"""
    if pred.size == 0:
        return 0.0
    return float(((pred - target) ** 2).mean())


def mse_forward_backward(d_pred, pred, target, grad_scale=1.0):
    """d pred = grad_scale 2 (pred - target) / P"""
    if pred.size == 0:
        return 0.0
    d_pred[...] = (2.0 * grad_scale / pred.size) * (pred - target)
    return mse_forward(pred, target)


# ---- KL divergence (batchmean) -------------------------------------------------------


def kl_div_forward(log_input, target):
    """sum(xlogy(t, t) - t x) / N, 0 log 0 = 0"""
    n_rows = log_input.shape[0]
    if n_rows == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogy = np.where(target == 0, 0.0, target * np.log(target))
    return float((xlogy - target * log_input).sum() / n_rows)


def kl_div_forward_backward(d_log_input, log_input, target, grad_scale=1.0):
    """d x = -grad_scale t / N"""
    n_rows = log_input.shape[0]
    if n_rows == 0:
        return 0.0
    d_log_input[...] = (-grad_scale / n_rows) * target
    return kl_div_forward(log_input, target)


# ---- triplet margin ------------------------------------------------------------------


def _distance(x, y, p, eps):
    """(||x_i - y_i + eps||_p for each row, u = x - y + eps)"""
    u = x - y + eps
    return (np.abs(u) ** p).sum(axis=1) ** (1.0 / p), u


def _distance_grad(u, dist, p):
    """grad_u ||u||_p per row: sign(u) (|u| / ||u||)^(p-1), 0 where ||u|| = 0"""
    safe = np.where(dist == 0, 1.0, dist)[:, None]
    g = np.sign(u) * (np.abs(u) / safe) ** (p - 1.0)
    return np.where((dist == 0)[:, None], 0.0, g)


def _triplet(anchor, positive, negative, margin, p, eps, swap):
    d_pos, u_pos = _distance(anchor, positive, p, eps)
    d_neg, u_neg = _distance(anchor, negative, p, eps)
    swapped = np.zeros(anchor.shape[0], dtype=bool)
    u_swap = u_neg
    if swap:
        d_swap, u_swap = _distance(positive, negative, p, eps)
        swapped = d_swap < d_neg
        d_neg = np.where(swapped, d_swap, d_neg)
    hinge = margin + d_pos - d_neg
    return hinge, (d_pos, u_pos), (d_neg, np.where(swapped[:, None], u_swap, u_neg)), swapped


def triplet_margin_forward(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False):
    """mean max(0, margin + ||a - p + eps||_p - ||a - n + eps||_p)"""
    if anchor.shape[0] == 0:
        return 0.0
    hinge = _triplet(anchor, positive, negative, margin, p, eps, swap)[0]
    return float(np.maximum(hinge, 0.0).mean())


def triplet_margin_forward_backward(
    d_anchor,
    d_positive,
    d_negative,
    anchor,
    positive,
    negative,
    margin=1.0,
    p=2.0,
    eps=1e-6,
    swap=False,
    grad_scale=1.0,
):
    """d a = w (grad d(a, p) - grad d(a, n)), w = grad_scale / N on rows with hinge >= 0"""
    n = anchor.shape[0]
    if n == 0:
        return 0.0
    hinge, (d_pos, u_pos), (d_neg, u_neg), swapped = _triplet(
        anchor, positive, negative, margin, p, eps, swap
    )
    w = np.where(hinge >= 0, grad_scale / n, 0.0)[:, None]
    g_pos = w * _distance_grad(u_pos, d_pos, p)
    g_neg = w * _distance_grad(u_neg, d_neg, p)
    s = swapped[:, None]
    d_anchor[...] = g_pos - np.where(s, 0.0, g_neg)
    d_positive[...] = -g_pos - np.where(s, g_neg, 0.0)
    d_negative[...] = g_neg
    return float(np.maximum(hinge, 0.0).mean())
