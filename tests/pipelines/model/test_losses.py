"""The loss registry: names, specs, weighted sums, user losses, and the built-ins' gradients."""

import numpy as np
import pytest

from pipelines.model import LOSSES, build_model, loss_names, register_loss, resolve_loss
from pipelines.model.testing import check_gradients


def classifier(**cfg):
    return build_model(
        "mlp_classifier", in_dim=5, n_classes=4, hidden=[6], backend="numpy", dtype="float64", **cfg
    )


def class_batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.random((b, 4))
    return {
        "x": rng.normal(size=(b, 5)),
        "y": rng.integers(0, 4, size=b),
        "teacher_probs": teacher / teacher.sum(axis=1, keepdims=True),
    }


def test_the_built_in_losses_are_registered_by_name():
    assert {"cross_entropy", "mse", "kl_div", "triplet_margin"} <= set(loss_names())
    assert set(loss_names()) == set(LOSSES)


@pytest.mark.parametrize(
    "spec",
    [
        "cross_entropy",
        {"cross_entropy": {"label_smoothing": 0.1}},
        "kl_div",
        "cross_entropy + 0.3*kl_div",
        {"cross_entropy": 1.0, "kl_div": 0.3},
    ],
)
def test_a_classifier_loss_spec_gives_true_gradients(spec):
    assert check_gradients(classifier(), class_batch(), spec, per_tensor=3) > 0


def test_the_regressor_and_triplet_losses_give_true_gradients():
    rng = np.random.default_rng(1)
    reg = build_model("mlp_regressor", in_dim=3, out_dim=2, backend="numpy", dtype="float64")
    check_gradients(reg, {"x": rng.normal(size=(5, 3)), "y": rng.normal(size=(5, 2))}, "mse")
    emb = build_model(
        "triplet_embedder", in_dim=3, embed_dim=4, margin=2.0, backend="numpy", dtype="float64"
    )
    x = rng.normal(size=(5, 3))
    batch = {"anchor": x, "positive": x + 0.3 * rng.normal(size=x.shape), "negative": -x}
    check_gradients(emb, batch, None)  # the model's default: triplet_margin(margin=2)
    assert emb.evaluate(batch)["loss"] > 0


def test_a_weighted_sum_is_the_weighted_sum_of_its_terms():
    model = classifier()
    batch = class_batch()
    ce, g_ce = model.compute_gradients(batch, "cross_entropy")
    g_ce = g_ce.copy()
    kl, g_kl = model.compute_gradients(batch, "kl_div")
    g_kl = g_kl.copy()
    both, g = model.compute_gradients(batch, {"cross_entropy": 1.0, "kl_div": 0.25})
    assert both == pytest.approx(ce + 0.25 * kl, rel=1e-12)
    assert np.allclose(g, g_ce + 0.25 * g_kl, rtol=1e-12, atol=1e-15)
    same = model.compute_gradients(batch, "cross_entropy + 0.25*kl_div")[0]
    assert same == both


def test_a_registered_user_loss_is_used_by_name_with_its_options():
    def hinge(outputs, batch, grads=None, grad_scale=1.0, margin=1.0):
        logits = outputs["logits"]
        rows = np.arange(len(logits))
        z = margin - logits[rows, batch["y"]]
        if grads is not None:
            grads["logits"][rows, batch["y"]] -= grad_scale * (z > 0) / len(logits)
        return float(np.maximum(z, 0).mean())

    register_loss("test_hinge", hinge, replace=True)
    assert "test_hinge" in loss_names()
    model = classifier()
    check_gradients(model, class_batch(), {"test_hinge": {"margin": 5.0}})
    check_gradients(model, class_batch(), "cross_entropy + 0.5*test_hinge")


def test_loss_spec_errors_are_one_line_and_list_what_is_accepted(raises_one_line):
    with raises_one_line(ValueError, match="unknown loss 'nll'; known losses: cross_entropy"):
        resolve_loss("nll")
    with raises_one_line(ValueError, match="cannot parse '0.1\\*\\*kl_div'"):
        resolve_loss("cross_entropy + 0.1**kl_div")
    with raises_one_line(ValueError, match=r"loss cross_entropy: unknown option\(s\) \['smooth'\]"):
        resolve_loss({"cross_entropy": {"smooth": 0.1}})
    with raises_one_line(ValueError, match="'mse' is already a loss"):
        register_loss("mse", lambda *a: 0.0)
    with raises_one_line(ValueError, match="loss spec: expected a name"):
        resolve_loss(3)


def test_kl_div_needs_the_teacher_probabilities_in_the_batch():
    batch = class_batch()
    del batch["teacher_probs"]
    with pytest.raises(ValueError, match="kl_div: the batch has no key 'teacher_probs'"):
        classifier().evaluate(batch, "kl_div")
