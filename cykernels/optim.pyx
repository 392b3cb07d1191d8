# cython: language_level=3
"""Optimizers on a flat float32 shard: SGD (momentum, dampening, Nesterov, weight decay) and
Adam with its variants as settings (AdamW = decoupled weight decay, AMSGrad = running max).

The Optimizer actor owns one contiguous slice of the flat parameter buffer and the same
slice of every state buffer; these kernels update that slice in place, in one pass over
memory, with the GIL released. They reproduce torch.optim (for-loop and fused CPU paths)
to float32 rounding: same defaults, same bias correction, same eps placement (after the
bias-corrected square root), same first-step momentum buffer.

References: torch.optim.SGD / Adam / AdamW docs and _single_tensor_adam;
aten/src/ATen/native/cpu/FusedAdamKernel.cpp (float32 math, lerp form of the m update);
Kingma & Ba 2015 (sec. 2, the "more efficient" ordering used below); Loshchilov & Hutter
2019 (decoupled weight decay); tinygrad (one Adam, variants as parameters).

Shape legend: P = parameters in this shard. Every array is float32 (P,), C-contiguous.
  param            in/out  the shard of the flat parameter buffer
  grad             in      its (reduced, clipped) gradient; never written
  momentum_buffer  in/out  SGD velocity (None when momentum == 0)
  exp_avg          in/out  Adam m
  exp_avg_sq       in/out  Adam v
  max_exp_avg_sq   in/out  AMSGrad max of v (None unless amsgrad)

Per element the hot loops read each array once and write each state once (28 bytes per
parameter for Adam); they allocate nothing and are plain float32 code gcc vectorises.
"""

from libc.math cimport sqrtf

from cykernels._checks import check_array, check_no_alias, check_same_shape


# ---- SGD -----------------------------------------------------------------------------


cdef void _sgd_loop(float[::1] param, const float[::1] grad, float[::1] buf, float lr,
                    float momentum, float damp_keep, bint nesterov, float weight_decay,
                    bint first_step) noexcept nogil:
    """p -= lr * d,  d = g + wd p; with momentum b = mu b + (1 - damp) d (b = d first),
    d = d + mu b (Nesterov) or d = b"""
    cdef Py_ssize_t i, n = param.shape[0]
    cdef float d
    if momentum == 0.0:
        for i in range(n):
            d = grad[i]
            if weight_decay != 0.0:
                d = d + weight_decay * param[i]
            param[i] = param[i] + (-lr) * d
        return
    for i in range(n):
        d = grad[i]
        if weight_decay != 0.0:
            d = d + weight_decay * param[i]
        if first_step:
            buf[i] = d                      # torch: buf = clone(grad) on the first step
        else:
            buf[i] = buf[i] * momentum + damp_keep * d
        if nesterov:
            d = d + momentum * buf[i]
        else:
            d = buf[i]
        param[i] = param[i] + (-lr) * d


def sgd_step(param, grad, momentum_buffer, double lr, double momentum=0.0,
             double dampening=0.0, bint nesterov=False, double weight_decay=0.0,
             bint first_step=False):
    """One torch.optim.SGD step in place on `param` (and `momentum_buffer`).

    `first_step=True` on a shard's first step sets the buffer to the gradient, as torch does
    when it has no buffer yet; afterwards pass False. With a zero-filled buffer and
    dampening == 0 both give the same numbers; with dampening != 0 only first_step=True
    matches torch. `momentum_buffer` may be None when momentum == 0.

    Raises ValueError for bad arrays (naming the argument) and for nesterov without
    momentum > 0 and dampening == 0 (torch's rule).
    """
    check_array("param", param, ndim=1, writable=True)
    check_array("grad", grad, ndim=1)
    check_same_shape("param", param, grad=grad)
    if lr < 0.0:
        raise ValueError(f"lr: expected >= 0, got {lr}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"nesterov: requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum} dampening={dampening}"
        )
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer: required when momentum != 0, got None")
        check_array("momentum_buffer", momentum_buffer, ndim=1, writable=True)
        check_same_shape("param", param, momentum_buffer=momentum_buffer)
        check_no_alias({"param": param, "momentum_buffer": momentum_buffer}, {"grad": grad})
        _sgd_loop(param, grad, momentum_buffer, lr, momentum, 1.0 - dampening, nesterov,
                  weight_decay, first_step)
    else:
        check_no_alias({"param": param}, {"grad": grad})
        _sgd_loop(param, grad, param, lr, 0.0, 1.0, False, weight_decay, False)


# ---- Adam / AdamW / AMSGrad ----------------------------------------------------------
#
# torch:   m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
#          p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),  bcK = 1 - bK^step
# here:    p -= alpha * m / (sqrt(v) + eps_hat),  alpha = lr sqrt(bc2) / bc1,
#          eps_hat = eps sqrt(bc2)
# The same number in exact arithmetic (multiply top and bottom by sqrt(bc2)); it saves one
# division per element and hoists every step-dependent constant out of the loop. Guarded by
# test_adam_matches_torch_for_1000_steps.


cdef void _adam_loop(float[::1] param, const float[::1] grad, float[::1] exp_avg,
                     float[::1] exp_avg_sq, float[::1] max_exp_avg_sq, bint amsgrad,
                     float l2, float decay, float one_minus_beta1, float beta2,
                     float one_minus_beta2, float eps_hat, float alpha) noexcept nogil:
    """p = decay p - alpha m / (sqrt(v or max v) + eps_hat),  g += l2 p,  m, v updated"""
    # Two copies of one loop body: a branch on amsgrad inside the loop (a conditional load
    # and store) stops gcc vectorising; the l2 branch is a select and vectorises.
    cdef Py_ssize_t i, n = param.shape[0]
    cdef float g, p, m, v, vmax
    cdef bint coupled = l2 != 0.0
    if not amsgrad:
        for i in range(n):
            g = grad[i]
            p = param[i]
            if coupled:
                g = g + p * l2                  # Adam: L2 penalty folded into the gradient
            p = p * decay                       # AdamW: 1 - lr wd (exactly 1.0 otherwise)
            m = exp_avg[i]
            m = m + one_minus_beta1 * (g - m)   # torch's lerp form of b1 m + (1 - b1) g
            v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
            exp_avg[i] = m
            exp_avg_sq[i] = v
            param[i] = p - alpha * m / (sqrtf(v) + eps_hat)
        return
    for i in range(n):
        g = grad[i]
        p = param[i]
        if coupled:
            g = g + p * l2
        p = p * decay
        m = exp_avg[i]
        m = m + one_minus_beta1 * (g - m)
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        vmax = max_exp_avg_sq[i]
        if vmax > v:                            # AMSGrad: the running max replaces v
            v = vmax                            # (NaN in v propagates, as torch.maximum)
        max_exp_avg_sq[i] = v
        param[i] = p - alpha * m / (sqrtf(v) + eps_hat)


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, long step, double lr=1e-3,
              double beta1=0.9, double beta2=0.999, double eps=1e-8, double weight_decay=0.0,
              bint decoupled_weight_decay=False, bint amsgrad=False):
    """One torch.optim.Adam step (AdamW when decoupled_weight_decay) in place.

    `step` is the 1-based count after increment, as torch's state["step"]; start at 1.
    `max_exp_avg_sq` may be None unless amsgrad. State buffers start zero-filled.
    Math is float32 like torch's fused CPU kernel; constants are computed in double.

    Raises ValueError for bad arrays (naming the argument), step < 1, or hyper-parameters
    torch rejects (lr < 0, eps < 0, betas outside [0, 1)).
    """
    check_array("param", param, ndim=1, writable=True)
    check_array("grad", grad, ndim=1)
    check_array("exp_avg", exp_avg, ndim=1, writable=True)
    check_array("exp_avg_sq", exp_avg_sq, ndim=1, writable=True)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq: required when amsgrad=True, got None")
        check_array("max_exp_avg_sq", max_exp_avg_sq, ndim=1, writable=True)
    else:
        max_exp_avg_sq = None               # ignored: never touched unless amsgrad
    check_same_shape("param", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                     max_exp_avg_sq=max_exp_avg_sq)
    check_no_alias(
        {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
         "max_exp_avg_sq": max_exp_avg_sq},
        {"grad": grad},
    )
    if step < 1:
        raise ValueError(f"step: expected the 1-based step count (>= 1), got {step}")
    if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
        raise ValueError(
            f"lr, eps, weight_decay: expected >= 0, got lr={lr} eps={eps} "
            f"weight_decay={weight_decay}"
        )
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1, beta2: expected in [0, 1), got {beta1}, {beta2}")

    cdef double bias_correction1 = 1.0 - beta1 ** step
    cdef double bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    cdef double l2 = 0.0 if decoupled_weight_decay else weight_decay
    cdef double decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    cdef float[::1] ams = max_exp_avg_sq if amsgrad else exp_avg_sq  # unread unless amsgrad
    _adam_loop(param, grad, exp_avg, exp_avg_sq, ams, amsgrad, l2, decay, 1.0 - beta1, beta2,
               1.0 - beta2, eps * bias_correction2_sqrt,
               lr * bias_correction2_sqrt / bias_correction1)


def adamw_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, long step, double lr=1e-3,
               double beta1=0.9, double beta2=0.999, double eps=1e-8,
               double weight_decay=1e-2, bint amsgrad=False):
    """torch.optim.AdamW: adam_step with decoupled weight decay, default weight_decay 0.01."""
    adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
              weight_decay, True, amsgrad)
