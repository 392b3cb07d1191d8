"""Plain-numpy twin of cykernels.optim: same names, same argument order, same in-place effect.

Written the way torch.optim writes it (torch.optim.SGD / Adam _single_tensor_* paths), one
array operation per line, so it reads as the specification the Cython kernels are checked
against. Works in any float dtype (the arrays' own); allocates temporaries freely.

Shape legend: P = parameters in the shard; every array is (P,).
"""

import numpy as np

# ---- SGD -----------------------------------------------------------------------------


def sgd_step(
    param,
    grad,
    momentum_buffer,
    lr,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    weight_decay=0.0,
    first_step=False,
):
    """p -= lr * d,  d = g + wd p; with momentum b = mu b + (1 - damp) d (b = d first),
    d = d + mu b (Nesterov) or d = b"""
    d = grad
    if weight_decay != 0.0:
        d = d + weight_decay * param
    if momentum != 0.0:
        if first_step:
            momentum_buffer[...] = d
        else:
            momentum_buffer *= momentum
            momentum_buffer += (1.0 - dampening) * d
        d = d + momentum * momentum_buffer if nesterov else momentum_buffer
    param -= lr * d


# ---- Adam / AdamW / AMSGrad ----------------------------------------------------------


def adam_step(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
):
    """p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),  bcK = 1 - betaK^step"""
    g = grad
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            param *= 1.0 - lr * weight_decay
        else:
            g = g + weight_decay * param
    exp_avg += (1.0 - beta1) * (g - exp_avg)
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * g * g
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    v = exp_avg_sq
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    param -= (lr / bias_correction1) * exp_avg / denom


def adamw_step(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad=False,
):
    """torch.optim.AdamW: adam_step with decoupled weight decay, default weight_decay 0.01."""
    adam_step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        step,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        True,
        amsgrad,
    )
