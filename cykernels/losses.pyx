# cython: language_level=3
"""Losses with fused gradients: softmax cross-entropy, mean squared error, KL divergence and
triplet margin, each mean-reduced with torch's semantics.

Every loss comes as a pair that reads side by side:
  <name>_forward(inputs..., options) -> loss
  <name>_forward_backward(d_inputs..., inputs..., options, grad_scale=1.0) -> loss
The second writes d(grad_scale * loss)/d(input) into the d-arrays (overwriting them) in
the same pass that computes the loss, so a model's backward starts from a ready gradient;
grad_scale carries a loss scale or 1/accumulation_steps. Both return the same bits.

Numerics: float32 in and out; row reductions (log-sum-exp, norms, the batch sum) in
float64 in a fixed order, so the same input gives the same loss and gradient bits.
An empty mean — no rows, or every cross-entropy row ignored — is defined as loss 0.0 with a
zero gradient (torch returns nan): a padding-only micro-batch contributes nothing instead
of poisoning the step; guarded by test_all_ignored_rows_give_zero_loss_and_zero_grad.

References: torch.nn.functional.cross_entropy (ignore_index, label_smoothing as
(1 - s) nll + s mean_c(-log p_c), mean over non-ignored rows), mse_loss,
kl_div(reduction="batchmean", log_target=False) = sum(xlogy(t, t) - t x) / N,
triplet_margin_loss with pairwise_distance(a, b) = ||a - b + eps||_p;
llm.c crossentropy_softmax_backward (the fused softmax gradient).

Shape legend: N rows (batch, or B*T tokens), C classes, D embedding width, P elements.
"""

from libc.math cimport expf, fabs, log, pow, sqrt
from libc.stdint cimport int64_t

from cykernels._checks import check_array, check_no_alias, check_same_shape


# ---- softmax cross-entropy -----------------------------------------------------------
#
# loss_i = lse(x_i) - (1 - s) x_iy - s mean_c x_ic   (s = label_smoothing)
# d x_ic = scale (softmax(x_i)_c - s / C - (1 - s) [c == y]),  scale = grad_scale / N_valid


cdef Py_ssize_t _ce_count_valid(const int64_t[::1] targets, Py_ssize_t n_classes,
                                int64_t ignore_index, Py_ssize_t* bad_row) noexcept nogil:
    """#{i : y_i != ignore_index}; bad_row = first i with y_i outside [0, C) (else -1)"""
    cdef Py_ssize_t i, n_valid = 0
    cdef int64_t y
    bad_row[0] = -1
    for i in range(targets.shape[0]):
        y = targets[i]
        if y == ignore_index:
            continue
        if y < 0 or y >= n_classes:
            bad_row[0] = i
            return 0
        n_valid += 1
    return n_valid


cdef inline float _ce_row_max(const float[:, ::1] logits, Py_ssize_t i) noexcept nogil:
    """max_c x_ic"""
    cdef Py_ssize_t c
    cdef float mx = logits[i, 0]
    for c in range(1, logits.shape[1]):
        if logits[i, c] > mx:
            mx = logits[i, c]
    return mx


cdef inline double _ce_row_loss(const float[:, ::1] logits, Py_ssize_t i, Py_ssize_t y,
                                double smoothing, float mx, double log_z) noexcept nogil:
    """loss_i = (1 - s)(lse_i - x_iy) + s (lse_i - mean_c x_ic),  lse_i = mx + log_z"""
    # The one loss formula of both row kernels below: forward and forward_backward give
    # the same bits because they share it (and mx, log_z are computed alike).
    cdef Py_ssize_t c, n_classes = logits.shape[1]
    cdef double sum_x = 0.0
    if smoothing == 0.0:
        return (<double>mx - logits[i, y]) + log_z
    for c in range(n_classes):
        sum_x += logits[i, c]
    return ((1.0 - smoothing) * ((<double>mx - logits[i, y]) + log_z)
            + smoothing * ((<double>mx - sum_x / n_classes) + log_z))


cdef double _ce_row_forward(const float[:, ::1] logits, Py_ssize_t i, Py_ssize_t y,
                            double smoothing) noexcept nogil:
    """loss_i = (1 - s)(lse_i - x_iy) + s (lse_i - mean_c x_ic)"""
    cdef Py_ssize_t c
    cdef float mx = _ce_row_max(logits, i)
    cdef double sum_exp = 0.0
    for c in range(logits.shape[1]):
        sum_exp += expf(logits[i, c] - mx)
    return _ce_row_loss(logits, i, y, smoothing, mx, log(sum_exp))


cdef double _ce_row_forward_backward(float[:, ::1] d_logits, const float[:, ::1] logits,
                                     Py_ssize_t i, Py_ssize_t y, double smoothing,
                                     double scale) noexcept nogil:
    """loss_i as _ce_row_forward; d x_ic = scale (p_ic - s / C - (1 - s) [c == y])"""
    cdef Py_ssize_t c, n_classes = logits.shape[1]
    cdef float mx = _ce_row_max(logits, i), e, scale_f = <float>scale
    cdef float off = <float>(smoothing / n_classes)
    cdef double sum_exp = 0.0
    cdef float inv_z
    for c in range(n_classes):
        e = expf(logits[i, c] - mx)           # exp stored, reused below for softmax
        d_logits[i, c] = e
        sum_exp += e
    inv_z = <float>(1.0 / sum_exp)
    for c in range(n_classes):
        d_logits[i, c] = scale_f * (d_logits[i, c] * inv_z - off)
    # forward line: loss_i = ... - (1 - s) x_iy, so d x_iy gets -(1 - s) on top of softmax
    d_logits[i, y] -= <float>(scale * (1.0 - smoothing))
    return _ce_row_loss(logits, i, y, smoothing, mx, log(sum_exp))


def _ce_check(d_logits, logits, targets, ignore_index, label_smoothing):
    """Validate cross-entropy arguments; return N_valid (ValueError naming the argument)."""
    check_array("logits", logits, ndim=2)
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one class, got shape {logits.shape}")
    check_array("targets", targets, dtype="int64", ndim=1)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets: expected shape ({logits.shape[0]},) (one class id per row of logits "
            f"{logits.shape}), got {targets.shape}"
        )
    if d_logits is not None:
        check_array("d_logits", d_logits, writable=True)
        check_same_shape("logits", logits, d_logits=d_logits)
        check_no_alias({"d_logits": d_logits}, {"logits": logits, "targets": targets})
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected in [0, 1], got {label_smoothing}")
    cdef Py_ssize_t bad_row, n_valid
    n_valid = _ce_count_valid(targets, logits.shape[1], ignore_index, &bad_row)
    if bad_row >= 0:
        raise ValueError(
            f"targets: expected class ids in [0, {logits.shape[1]}) or ignore_index="
            f"{ignore_index}, got {int(targets[bad_row])} at row {bad_row}"
        )
    return n_valid


def softmax_cross_entropy_forward(logits, targets, long ignore_index=-100,
                                  double label_smoothing=0.0):
    """mean over rows with y_i != ignore_index of -log softmax(x_i)_{y_i} (label-smoothed)."""
    cdef Py_ssize_t n_valid = _ce_check(None, logits, targets, ignore_index, label_smoothing)
    cdef const float[:, ::1] x = logits
    cdef const int64_t[::1] y = targets
    cdef Py_ssize_t i
    cdef double total = 0.0
    if n_valid == 0:
        return 0.0
    with nogil:
        for i in range(x.shape[0]):
            if y[i] != ignore_index:
                total += _ce_row_forward(x, i, y[i], label_smoothing)
    return total / n_valid


def softmax_cross_entropy_forward_backward(d_logits, logits, targets, long ignore_index=-100,
                                           double label_smoothing=0.0,
                                           double grad_scale=1.0):
    """softmax_cross_entropy_forward, and d_logits = d(grad_scale * loss) / d logits."""
    cdef Py_ssize_t n_valid = _ce_check(d_logits, logits, targets, ignore_index,
                                        label_smoothing)
    cdef float[:, ::1] dx = d_logits
    cdef const float[:, ::1] x = logits
    cdef const int64_t[::1] y = targets
    cdef Py_ssize_t i, c
    cdef double total = 0.0
    cdef double scale = grad_scale / n_valid if n_valid else 0.0
    with nogil:
        for i in range(x.shape[0]):
            if y[i] == ignore_index:
                for c in range(x.shape[1]):
                    dx[i, c] = 0.0
            else:
                total += _ce_row_forward_backward(dx, x, i, y[i], label_smoothing, scale)
    return total / n_valid if n_valid else 0.0


# ---- mean squared error --------------------------------------------------------------
#
# loss = mean_i (p_i - t_i)^2;   d p_i = grad_scale 2 (p_i - t_i) / P


cdef double _mse_sum(const float[::1] pred, const float[::1] target) noexcept nogil:
    """sum_i (p_i - t_i)^2 in float64"""
    cdef Py_ssize_t i
    cdef double total = 0.0, diff
    for i in range(pred.shape[0]):
        diff = pred[i] - target[i]
        total += diff * diff
    return total


cdef double _mse_sum_backward(float[::1] d_pred, const float[::1] pred,
                              const float[::1] target, float coef) noexcept nogil:
    """sum_i (p_i - t_i)^2; d p_i = coef (p_i - t_i)"""
    cdef Py_ssize_t i
    cdef double total = 0.0, diff
    cdef float diff_f
    for i in range(pred.shape[0]):
        diff_f = pred[i] - target[i]
        d_pred[i] = coef * diff_f
        diff = diff_f
        total += diff * diff
    return total


def _mse_check(d_pred, pred, target):
    check_array("pred", pred)
    check_array("target", target)
    check_same_shape("pred", pred, target=target)
    if d_pred is not None:
        check_array("d_pred", d_pred, writable=True)
        check_same_shape("pred", pred, d_pred=d_pred)
        check_no_alias({"d_pred": d_pred}, {"pred": pred, "target": target})


def mse_forward(pred, target):
    """mean((pred - target)**2) over every element (any shape, same for both)."""
    _mse_check(None, pred, target)
    cdef const float[::1] p = pred.reshape(-1)
    cdef const float[::1] t = target.reshape(-1)
    cdef double total
    with nogil:
        total = _mse_sum(p, t)
    return total / p.shape[0] if p.shape[0] else 0.0


def mse_forward_backward(d_pred, pred, target, double grad_scale=1.0):
    """mse_forward, and d_pred = grad_scale * 2 (pred - target) / P."""
    _mse_check(d_pred, pred, target)
    cdef float[::1] d = d_pred.reshape(-1)
    cdef const float[::1] p = pred.reshape(-1)
    cdef const float[::1] t = target.reshape(-1)
    cdef Py_ssize_t n = p.shape[0]
    cdef double total
    if n == 0:
        return 0.0
    with nogil:
        total = _mse_sum_backward(d, p, t, <float>(2.0 * grad_scale / n))
    return total / n


# ---- KL divergence (batchmean) -------------------------------------------------------
#
# loss = sum_ic (xlogy(t_ic, t_ic) - t_ic x_ic) / N,  x = log q (log-probabilities), t = p
# d x_ic = -grad_scale t_ic / N


cdef inline double _kl_term(float x, float t) noexcept nogil:
    """xlogy(t, t) - t x, with 0 log 0 = 0 (NaN for t < 0, as torch)"""
    cdef double td = t
    if t == 0.0:
        return -td * x                        # 0 * x: NaN only if x is +-Inf or NaN
    return td * log(td) - td * x


cdef double _kl_sum(const float[::1] log_input, const float[::1] target) noexcept nogil:
    """sum_ic xlogy(t, t) - t x in float64"""
    cdef Py_ssize_t i
    cdef double total = 0.0
    for i in range(log_input.shape[0]):
        total += _kl_term(log_input[i], target[i])
    return total


cdef double _kl_sum_backward(float[::1] d_log_input, const float[::1] log_input,
                             const float[::1] target, float coef) noexcept nogil:
    """sum_ic xlogy(t, t) - t x; d x_ic = coef t_ic (coef = -grad_scale / N)"""
    cdef Py_ssize_t i
    cdef double total = 0.0
    for i in range(log_input.shape[0]):
        total += _kl_term(log_input[i], target[i])
        d_log_input[i] = coef * target[i]
    return total


def _kl_check(d_log_input, log_input, target):
    check_array("log_input", log_input, ndim=2)
    check_array("target", target)
    check_same_shape("log_input", log_input, target=target)
    if d_log_input is not None:
        check_array("d_log_input", d_log_input, writable=True)
        check_same_shape("log_input", log_input, d_log_input=d_log_input)
        check_no_alias({"d_log_input": d_log_input},
                       {"log_input": log_input, "target": target})


def kl_div_forward(log_input, target):
    """F.kl_div(log_input, target, reduction="batchmean"): sum(t (log t - x)) / N.

    log_input holds log-probabilities (N, C), target probabilities (N, C) (not logs).
    """
    _kl_check(None, log_input, target)
    cdef Py_ssize_t n_rows = log_input.shape[0]
    cdef const float[::1] x = log_input.reshape(-1)
    cdef const float[::1] t = target.reshape(-1)
    cdef double total
    with nogil:
        total = _kl_sum(x, t)
    return total / n_rows if n_rows else 0.0


def kl_div_forward_backward(d_log_input, log_input, target, double grad_scale=1.0):
    """kl_div_forward, and d_log_input = -grad_scale * target / N."""
    _kl_check(d_log_input, log_input, target)
    cdef Py_ssize_t n_rows = log_input.shape[0]
    cdef float[::1] d = d_log_input.reshape(-1)
    cdef const float[::1] x = log_input.reshape(-1)
    cdef const float[::1] t = target.reshape(-1)
    cdef double total
    if n_rows == 0:
        return 0.0
    with nogil:
        total = _kl_sum_backward(d, x, t, <float>(-grad_scale / n_rows))
    return total / n_rows


# ---- triplet margin ------------------------------------------------------------------
#
# loss = mean_i max(0, margin + d(a_i, p_i) - d(a_i, n_i)),  d(x, y) = ||x - y + eps||_p
# swap: d(a_i, n_i) <- min(d(a_i, n_i), d(p_i, n_i)) (the harder negative distance)
# d a_i = w (grad d(a, p) - grad d(a, n)), w = grad_scale / N where the hinge is active;
# grad_u ||u||_p = sign(u) |u|^(p-1) / ||u||^(p-1) (u / ||u|| for p = 2; 0 when ||u|| = 0)


cdef double _distance(const float[:, ::1] x, const float[:, ::1] y, Py_ssize_t i, double p,
                      float eps) noexcept nogil:
    """||x_i - y_i + eps||_p, accumulated in float64"""
    cdef Py_ssize_t k
    cdef double u, acc = 0.0
    for k in range(x.shape[1]):
        u = x[i, k] - y[i, k] + eps           # float32 difference, as torch
        if p == 2.0:
            acc += u * u
        elif p == 1.0:
            acc += fabs(u)
        else:
            acc += pow(fabs(u), p)
    if p == 2.0:
        return sqrt(acc)
    if p == 1.0:
        return acc
    return pow(acc, 1.0 / p)


cdef void _distance_backward(float[:, ::1] d_x, float[:, ::1] d_y, const float[:, ::1] x,
                             const float[:, ::1] y, Py_ssize_t i, double p, float eps,
                             double dist, double w) noexcept nogil:
    """d_x_i += w grad_u ||u||_p, d_y_i -= w grad_u ||u||_p, u = x_i - y_i + eps"""
    cdef Py_ssize_t k
    cdef double u, g
    if dist == 0.0:
        return                                # torch's norm backward is 0 at the origin
    for k in range(x.shape[1]):
        u = x[i, k] - y[i, k] + eps
        if p == 2.0:
            g = u / dist
        elif p == 1.0:
            g = (u > 0.0) - (u < 0.0)
        else:
            g = ((u > 0.0) - (u < 0.0)) * pow(fabs(u) / dist, p - 1.0)
        d_x[i, k] += <float>(w * g)
        d_y[i, k] -= <float>(w * g)


cdef double _triplet_row(const float[:, ::1] anchor, const float[:, ::1] positive,
                         const float[:, ::1] negative, Py_ssize_t i, double margin, double p,
                         float eps, bint swap, double* d_pos, double* d_neg,
                         bint* swapped) noexcept nogil:
    """margin + d(a_i, p_i) - d(a_i, n_i) (hinge input; swap as above)"""
    cdef double d_swap
    d_pos[0] = _distance(anchor, positive, i, p, eps)
    d_neg[0] = _distance(anchor, negative, i, p, eps)
    swapped[0] = False
    if swap:
        d_swap = _distance(positive, negative, i, p, eps)
        if d_swap < d_neg[0]:                 # tie -> the anchor's negative (torch splits)
            d_neg[0] = d_swap
            swapped[0] = True
    return margin + d_pos[0] - d_neg[0]


def _triplet_check(d_anchor, d_positive, d_negative, anchor, positive, negative, p):
    check_array("anchor", anchor, ndim=2)
    check_array("positive", positive)
    check_array("negative", negative)
    check_same_shape("anchor", anchor, positive=positive, negative=negative)
    if not p >= 1.0:
        raise ValueError(f"p: expected a norm degree >= 1, got {p}")
    if d_anchor is None:
        return
    for name, arr in (("d_anchor", d_anchor), ("d_positive", d_positive),
                      ("d_negative", d_negative)):
        check_array(name, arr, shape=anchor.shape, writable=True)
    check_no_alias(
        {"d_anchor": d_anchor, "d_positive": d_positive, "d_negative": d_negative},
        {"anchor": anchor, "positive": positive, "negative": negative},
    )


def triplet_margin_forward(anchor, positive, negative, double margin=1.0, double p=2.0,
                           double eps=1e-6, bint swap=False):
    """F.triplet_margin_loss: mean max(0, margin + ||a - p + eps|| - ||a - n + eps||)."""
    _triplet_check(None, None, None, anchor, positive, negative, p)
    cdef const float[:, ::1] a = anchor
    cdef const float[:, ::1] pos = positive
    cdef const float[:, ::1] neg = negative
    cdef Py_ssize_t i, n = a.shape[0]
    cdef double h, d_pos, d_neg, total = 0.0
    cdef bint swapped
    with nogil:
        for i in range(n):
            h = _triplet_row(a, pos, neg, i, margin, p, <float>eps, swap, &d_pos, &d_neg,
                             &swapped)
            if h > 0.0:
                total += h
    return total / n if n else 0.0


def triplet_margin_forward_backward(d_anchor, d_positive, d_negative, anchor, positive,
                                    negative, double margin=1.0, double p=2.0,
                                    double eps=1e-6, bint swap=False,
                                    double grad_scale=1.0):
    """triplet_margin_forward, and the d-arrays = d(grad_scale * loss) / d(each input)."""
    _triplet_check(d_anchor, d_positive, d_negative, anchor, positive, negative, p)
    cdef float[:, ::1] da = d_anchor
    cdef float[:, ::1] dp = d_positive
    cdef float[:, ::1] dn = d_negative
    cdef const float[:, ::1] a = anchor
    cdef const float[:, ::1] pos = positive
    cdef const float[:, ::1] neg = negative
    cdef Py_ssize_t i, k, n = a.shape[0]
    cdef double h, d_pos, d_neg, w = grad_scale / n if n else 0.0, total = 0.0
    cdef float e = <float>eps
    cdef bint swapped
    with nogil:
        for i in range(n):
            for k in range(a.shape[1]):
                da[i, k] = 0.0
                dp[i, k] = 0.0
                dn[i, k] = 0.0
            h = _triplet_row(a, pos, neg, i, margin, p, e, swap, &d_pos, &d_neg, &swapped)
            if h < 0.0:
                continue                      # clamp_min(h, 0) passes the gradient at h == 0
            total += h
            # forward line: h = margin + d(a, p) - d(a, n | p, n)
            _distance_backward(da, dp, a, pos, i, p, e, d_pos, w)
            if swapped:
                _distance_backward(dp, dn, pos, neg, i, p, e, d_neg, -w)
            else:
                _distance_backward(da, dn, a, neg, i, p, e, d_neg, -w)
    return total / n if n else 0.0
