"""cykernels.losses: fused losses against their numpy twin, torch autograd and finite
differences."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from cykernels import losses, losses_ref

SHAPES = [(1, 1), (4, 7), (13, 33)]  # (N, C) or (N, D); C = 1 makes cross-entropy zero


# ---- the table of losses under test --------------------------------------------------


def ce_inputs(rng, dtype, shape, ignore_index=-100, **_):
    n, c = shape
    targets = rng.integers(0, c, n)
    targets[rng.random(n) < 0.25] = ignore_index  # some ignored rows
    targets[:1] = 0  # and at least one counted row (0 is never the ignore_index used here)
    return {"logits": (3 * rng.standard_normal(shape)).astype(dtype), "targets": targets}


def mse_inputs(rng, dtype, shape, **_):
    return {
        "pred": rng.standard_normal(shape).astype(dtype),
        "target": rng.standard_normal(shape).astype(dtype),
    }


def kl_inputs(rng, dtype, shape, **_):
    logits = rng.standard_normal(shape)
    log_input = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = rng.random(shape)
    target[rng.random(shape) < 0.2] = 0.0  # 0 log 0 = 0
    target /= np.maximum(target.sum(axis=1, keepdims=True), 1e-12)
    return {"log_input": log_input.astype(dtype), "target": target.astype(dtype)}


def triplet_inputs(rng, dtype, shape, **_):
    names = ("anchor", "positive", "negative")
    return {name: rng.standard_normal(shape).astype(dtype) for name in names}


@dataclass
class Loss:
    """One loss under one set of options: how to build inputs, call it and call torch."""

    name: str
    make_inputs: object
    differentiable: tuple  # input names that get a d-array, in argument order
    options: dict = field(default_factory=dict)

    def inputs(self, rng, dtype, shape):
        return self.make_inputs(rng, dtype, shape, **self.options)

    def kernel(self, module):
        return getattr(module, f"{self.name}_forward"), getattr(
            module, f"{self.name}_forward_backward"
        )

    def forward(self, module, inputs):
        return self.kernel(module)[0](**inputs, **self.options)

    def forward_backward(self, module, inputs, grad_scale=1.0, fill=0.0):
        d = {f"d_{k}": np.full_like(inputs[k], fill) for k in self.differentiable}
        loss = self.kernel(module)[1](**d, **inputs, **self.options, grad_scale=grad_scale)
        return loss, [d[f"d_{k}"] for k in self.differentiable]

    def torch(self, torch, inputs):
        """(loss, [grad of each differentiable input]) from torch autograd."""
        t = {k: torch.tensor(v, requires_grad=k in self.differentiable) for k, v in inputs.items()}
        F = torch.nn.functional
        if self.name == "softmax_cross_entropy":
            loss = F.cross_entropy(t["logits"], t["targets"], **self.options)
        elif self.name == "mse":
            loss = F.mse_loss(t["pred"], t["target"])
        elif self.name == "kl_div":
            loss = F.kl_div(t["log_input"], t["target"], reduction="batchmean")
        else:
            loss = F.triplet_margin_loss(t["anchor"], t["positive"], t["negative"], **self.options)
        loss.backward()
        return loss.item(), [t[k].grad.numpy() for k in self.differentiable]


LOSSES = [
    Loss("softmax_cross_entropy", ce_inputs, ("logits",)),
    Loss("softmax_cross_entropy", ce_inputs, ("logits",), {"label_smoothing": 0.1}),
    Loss("softmax_cross_entropy", ce_inputs, ("logits",), {"ignore_index": 1}),
    Loss("mse", mse_inputs, ("pred",)),
    Loss("kl_div", kl_inputs, ("log_input",)),
    Loss("triplet_margin", triplet_inputs, ("anchor", "positive", "negative")),
    Loss("triplet_margin", triplet_inputs, ("anchor", "positive", "negative"), {"p": 1.0}),
    Loss(
        "triplet_margin",
        triplet_inputs,
        ("anchor", "positive", "negative"),
        {"p": 3.0, "margin": 0.5, "swap": True},
    ),
]
LOSS_IDS = [f"{loss.name}{loss.options or ''}" for loss in LOSSES]


def cases(*, shapes=SHAPES):
    return pytest.mark.parametrize(
        "loss, shape",
        [(loss, shape) for loss in LOSSES for shape in shapes],
        ids=[f"{i}-{'x'.join(map(str, s))}" for i in LOSS_IDS for s in shapes],
    )


# ---- values and gradients ------------------------------------------------------------


def assert_gradients_close_at_their_scale(got, want, relative=1e-5):
    """Each gradient within ``relative`` of the largest entry of all of them: a mean
    loss has small gradient entries, and the absolute parity budget (1e-5) would let
    them be 25 % off. (One scale for all: an entry that cancels to 0 in one is fine.)"""
    scale = max(float(np.max(np.abs(w))) for w in want if np.size(w))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=relative, atol=relative * scale)


@cases()
def test_kernel_matches_twin_in_float32(rng, tolerance, loss, shape):
    inputs = loss.inputs(rng, np.float32, shape)
    ours, ours_grads = loss.forward_backward(losses, inputs)
    ref, ref_grads = loss.forward_backward(losses_ref, inputs)
    tol = tolerance[np.float32]
    np.testing.assert_allclose(ours, ref, **tol)
    np.testing.assert_allclose(loss.forward(losses, inputs), ref, **tol)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, **tol)
    assert_gradients_close_at_their_scale(ours_grads, ref_grads)


@cases()
def test_forward_and_forward_backward_return_the_same_bits(rng, loss, shape):
    inputs = loss.inputs(rng, np.float32, shape)
    assert loss.forward(losses, inputs) == loss.forward_backward(losses, inputs)[0]


@cases()
def test_loss_and_gradients_match_torch_autograd(torch, rng, tolerance, loss, shape):
    inputs = loss.inputs(rng, np.float32, shape)
    ours, ours_grads = loss.forward_backward(losses, inputs)
    expected, expected_grads = loss.torch(torch, inputs)
    np.testing.assert_allclose(ours, expected, **tolerance[np.float32])
    for got, want in zip(ours_grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, **tolerance[np.float32])
    assert_gradients_close_at_their_scale(ours_grads, expected_grads)


@cases(shapes=SHAPES[:2])
def test_twin_gradients_match_central_finite_differences_in_float64(
    rng, finite_differences, loss, shape
):
    inputs = loss.inputs(rng, np.float64, shape)
    _, grads = loss.forward_backward(losses_ref, inputs)
    for name, grad in zip(loss.differentiable, grads, strict=True):
        finite_differences(grad, lambda: loss.forward(losses_ref, inputs), inputs[name], name)


@cases(shapes=[(4, 7)])
def test_gradients_overwrite_the_d_arrays_and_scale_with_grad_scale(rng, tolerance, loss, shape):
    inputs = loss.inputs(rng, np.float32, shape)
    loss_value, grads = loss.forward_backward(losses, inputs)
    scaled_value, scaled = loss.forward_backward(losses, inputs, grad_scale=0.25, fill=np.nan)
    assert scaled_value == loss_value  # grad_scale scales the gradient, not the loss
    for got, unit in zip(scaled, grads, strict=True):
        np.testing.assert_allclose(got, 0.25 * unit, **tolerance[np.float32])


# ---- cross-entropy edges -------------------------------------------------------------


def test_all_ignored_rows_give_zero_loss_and_zero_grad(torch, rng):
    logits = rng.standard_normal((3, 5), dtype=np.float32)
    targets = np.full(3, -100)
    d_logits = np.full_like(logits, np.nan)
    assert losses.softmax_cross_entropy_forward(logits, targets) == 0.0
    assert losses.softmax_cross_entropy_forward_backward(d_logits, logits, targets) == 0.0
    assert not d_logits.any()
    assert losses_ref.softmax_cross_entropy_forward(logits, targets) == 0.0
    # a deliberate difference: torch's mean over zero rows is nan
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert np.isnan(expected.item())


def test_cross_entropy_is_stable_for_huge_logits(torch, rng, tolerance):
    loss = LOSSES[1]  # with label smoothing: sums every logit too
    inputs = {"logits": rng.standard_normal((4, 9), dtype=np.float32) * 1e4}
    inputs["targets"] = rng.integers(0, 9, 4)
    ours, (grad,) = loss.forward_backward(losses, inputs)
    expected, (expected_grad,) = loss.torch(torch, inputs)
    assert np.isfinite(ours) and np.isfinite(grad).all()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, **tolerance[np.float32])


@pytest.mark.parametrize("bad", [5, -1, -101, 2**40])
def test_out_of_range_targets_raise_value_error_naming_targets(rng, bad):
    logits = rng.standard_normal((3, 5), dtype=np.float32)
    targets = np.array([0, bad, -100])
    with pytest.raises(ValueError, match=r"^targets: expected class ids in \[0, 5\)"):
        losses.softmax_cross_entropy_forward(logits, targets)
    d_logits = np.full_like(logits, 7.0)
    with pytest.raises(ValueError, match="^targets: "):
        losses.softmax_cross_entropy_forward_backward(d_logits, logits, targets)
    assert (d_logits == 7.0).all()  # validated before anything is written


# ---- empty batches and bad input -----------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_an_empty_batch_gives_zero_loss(rng, loss):
    inputs = loss.inputs(rng, np.float32, (0, 3))
    assert loss.forward(losses, inputs) == 0.0
    assert loss.forward_backward(losses, inputs)[0] == 0.0


BAD_ARRAYS = {
    "float64": lambda a: a.astype(np.float64),
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "shape": lambda a: a[:-1],
    "not_array": lambda a: a.tolist(),
}


@pytest.mark.parametrize("spoil", BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
@pytest.mark.parametrize("loss", LOSSES[0:1] + LOSSES[3:6], ids=lambda loss: loss.name)
def test_bad_arrays_raise_value_error_naming_the_argument(rng, loss, spoil):
    inputs = loss.inputs(rng, np.float32, (4, 7))
    reference = next(iter(inputs))  # the others' shapes are checked against it
    for name in inputs:
        spoiled = {**inputs, name: spoil(inputs[name])}
        pattern = f"^{name}: "
        if spoil is BAD_ARRAYS["shape"] and name == reference:
            pattern = rf"^\w+: expected shape .*\b{name}\b"  # told on another, naming it
        with pytest.raises(ValueError, match=pattern):
            loss.forward_backward(losses, spoiled)
    for k in loss.differentiable:
        d = {f"d_{j}": np.zeros_like(inputs[j]) for j in loss.differentiable}
        d[f"d_{k}"] = spoil(d[f"d_{k}"])
        with pytest.raises(ValueError, match=f"^d_{k}: "):
            loss.kernel(losses)[1](**d, **inputs, **loss.options)


@pytest.mark.parametrize("loss", LOSSES[0:1] + LOSSES[3:6], ids=lambda loss: loss.name)
def test_a_d_array_aliasing_an_input_or_another_d_array_is_rejected(rng, loss):
    inputs = loss.inputs(rng, np.float32, (4, 7))
    first = loss.differentiable[0]
    d = {f"d_{k}": np.zeros_like(inputs[k]) for k in loss.differentiable}
    d[f"d_{first}"] = inputs[first]  # in place over the input
    with pytest.raises(ValueError, match=f"d_{first}: must not share memory with {first}"):
        loss.kernel(losses)[1](**d, **inputs, **loss.options)
    if len(d) > 1:
        d = {f"d_{k}": np.zeros_like(inputs[first]) for k in loss.differentiable}
        d["d_negative"] = d["d_anchor"]
        with pytest.raises(ValueError, match="d_anchor: must not share memory with d_negative"):
            loss.kernel(losses)[1](**d, **inputs, **loss.options)


def test_cross_entropy_wants_int64_targets_and_mse_a_writable_d_pred(rng):
    logits = rng.standard_normal((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="^targets: expected dtype int64, got int32"):
        losses.softmax_cross_entropy_forward(logits, np.zeros(3, np.int32))
    pred = np.zeros(4, np.float32)
    d_pred = np.zeros(4, np.float32)
    d_pred.flags.writeable = False
    with pytest.raises(ValueError, match="^d_pred: expected a writable array"):
        losses.mse_forward_backward(d_pred, pred, pred)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, t: losses.softmax_cross_entropy_forward(x, t, label_smoothing=1.5), "label_"),
        (lambda x, t: losses.triplet_margin_forward(x, x, x, p=0.5), "^p: "),
    ],
)
def test_bad_options_are_rejected(rng, call, message):
    with pytest.raises(ValueError, match=message):
        call(rng.standard_normal((3, 5), dtype=np.float32), np.zeros(3, np.int64))
