"""Whole models: gradients, the compute/apply split, determinism, the registry."""

import numpy as np
import pytest

from pipelines.model import build_model, model_names
from pipelines.model.testing import check_gradients, probe_loss

SMALL = {
    "mlp_classifier": {"in_dim": 6, "n_classes": 4, "hidden": [7, 5]},
    "mlp_regressor": {"in_dim": 6, "out_dim": 2, "hidden": [7]},
    "triplet_embedder": {"in_dim": 6, "embed_dim": 4, "hidden": [7]},
    "char_transformer": {"vocab": 11, "d_model": 8, "n_head": 2, "n_layer": 2, "seq_len": 6},
}


def small_batch(name, b=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    cfg = SMALL[name]
    if name == "char_transformer":
        t = cfg["seq_len"]
        tokens = rng.integers(0, cfg["vocab"], size=(b, t + 1))
        return {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}
    x = rng.normal(size=(b, cfg["in_dim"])).astype(dtype)
    if name == "mlp_classifier":
        return {"x": x, "y": rng.integers(0, cfg["n_classes"], size=b)}
    if name == "mlp_regressor":
        return {"x": x, "y": rng.normal(size=(b, cfg["out_dim"])).astype(dtype)}
    shifted = rng.normal(size=x.shape).astype(dtype)
    return {"anchor": x, "positive": x + 0.1 * shifted, "negative": shifted}


VARIANTS = {
    "mlp_classifier": {"dropout": 0.3, "activation": "tanh"},
    "mlp_regressor": {"activation": "silu"},
    "triplet_embedder": {"dropout": 0.2},
    "triplet_embedder plain": {"normalize": False},
    "char_transformer": {"dropout": 0.2},
    "char_transformer swiglu rmsnorm": {"mlp": "swiglu", "norm": "rmsnorm"},
    "char_transformer lora": {"lora": {"rank": 2, "alpha": 4, "targets": ["qkv", "mlp.fc"]}},
    "mlp_classifier lora": {"lora": {"rank": 2, "targets": ["layers.*"], "dropout": 0.1}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_whole_models_gradient_matches_finite_differences(variant):
    name = variant.split()[0]
    model = build_model(name, **SMALL[name], **VARIANTS[variant], backend="numpy", dtype="float64")
    if model.lora:  # move LoRA's B off zero so A's gradient is not trivially zero
        model.params[...] = np.random.default_rng(5).normal(size=model.params.size) * 0.1
    batch = small_batch(name, dtype=np.float64)
    assert check_gradients(model, batch, probe_loss(), seed=9, per_tensor=2) > 0


@pytest.mark.parametrize("name", list(SMALL))
def test_compute_gradients_leaves_the_parameters_bitwise_untouched(name):
    model = build_model(name, **SMALL[name])
    before = model.params.tobytes()
    loss, grads = model.compute_gradients(small_batch(name), seed=1)
    assert model.params.tobytes() == before
    assert np.isfinite(loss) and grads is model.grads and grads.any()


@pytest.mark.parametrize("name", list(SMALL))
def test_the_same_seed_gives_the_same_init_and_gradient_bits(name):
    a = build_model(name, **SMALL[name], seed=3, dropout=0.1)
    b = build_model(name, **SMALL[name], seed=3, dropout=0.1)
    c = build_model(name, **SMALL[name], seed=4, dropout=0.1)
    assert a.params.tobytes() == b.params.tobytes() != c.params.tobytes()
    batch = small_batch(name)
    la, ga = a.compute_gradients(batch, seed=8)
    lb, gb = b.compute_gradients(batch, seed=8)
    assert la == lb and ga.tobytes() == gb.tobytes()
    lc, gc = b.compute_gradients(batch, seed=9)  # another dropout seed: other masks
    assert gc.tobytes() != ga.tobytes()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_whatever_the_gradient_buffer_held_before_the_gradient_is_the_same(variant, backend):
    # compute_gradients does not zero the buffer: each parameter's first write of the
    # pass overwrites (or zeroes first), tied and LoRA-frozen parameters included
    name = variant.split()[0]
    model = build_model(name, **SMALL[name], **VARIANTS[variant], backend=backend)
    batch = small_batch(name)
    model.grads[...] = 0.0
    clean = model.compute_gradients(batch, seed=2)[1].copy()
    for garbage in (np.nan, -3.5, np.inf):
        model.grads[...] = garbage
        assert model.compute_gradients(batch, seed=2)[1].tobytes() == clean.tobytes()


def test_a_later_batch_does_not_change_an_earlier_batchs_gradient():
    model = build_model("char_transformer", **SMALL["char_transformer"])
    first = model.compute_gradients(small_batch("char_transformer", b=2), seed=1)[1].copy()
    model.compute_gradients(small_batch("char_transformer", b=3, seed=5), seed=2)
    again = model.compute_gradients(small_batch("char_transformer", b=2), seed=1)[1]
    assert again.tobytes() == first.tobytes()


@pytest.mark.parametrize("name", list(SMALL))
def test_evaluate_gives_the_loss_and_outputs_without_touching_gradients(name):
    model = build_model(name, **SMALL[name])
    batch = small_batch(name)
    model.grads[...] = 7.0
    result = model.evaluate(batch)
    assert np.all(model.grads == 7.0)
    loss, _ = model.compute_gradients(batch)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    for key in model.output_names:
        assert key in result
    outputs = model.forward(batch)
    for key, value in outputs.items():
        assert np.array_equal(value, result[key])


def test_the_transformer_returns_logits_per_position_and_takes_a_token_window():
    model = build_model("char_transformer", **SMALL["char_transformer"])
    batch = small_batch("char_transformer", b=3)
    out = model.evaluate(batch)
    assert out["logits"].shape == (3, 6, 11)
    tokens = np.concatenate([batch["x"], batch["y"][:, -1:]], axis=1)
    assert model.evaluate({"tokens": tokens})["loss"] == out["loss"]
    short = {"x": batch["x"][:, :4], "y": batch["y"][:, :4]}
    assert model.forward(short)["logits"].shape == (3, 4, 11)


def test_the_forward_pass_is_causal():
    model = build_model("char_transformer", **SMALL["char_transformer"])
    x = small_batch("char_transformer", b=1)["x"]
    changed = x.copy()
    changed[0, 4] = (changed[0, 4] + 1) % 11
    a, b = model.forward({"x": x})["logits"], model.forward({"x": changed})["logits"]
    assert np.array_equal(a[0, :4], b[0, :4]) and not np.array_equal(a[0, 4], b[0, 4])


def test_every_registered_model_builds_from_keyword_config():
    assert model_names() == sorted(SMALL)
    for name in model_names():
        model = build_model(name, **SMALL[name])
        assert model.params.size > 0 and model.params.size == sum(
            int(np.prod(slot.shape)) for slot in model.layout
        ), name


def test_build_model_errors_are_one_line_and_name_what_is_accepted(raises_one_line):
    with raises_one_line(ValueError, match="unknown model 'gpt'; known models: char_transformer"):
        build_model("gpt")
    with raises_one_line(ValueError, match=r"mlp_classifier: unknown config key\(s\) \['width'\]"):
        build_model("mlp_classifier", in_dim=3, n_classes=2, width=4)
    with raises_one_line(ValueError, match=r"missing config key\(s\) \['n_classes'\]"):
        build_model("mlp_classifier", in_dim=3)
    with raises_one_line(ValueError, match="float64 needs backend='numpy'"):
        build_model("mlp_classifier", in_dim=3, n_classes=2, dtype="float64")
    with raises_one_line(ValueError, match="backend: expected one of cython, numpy, got 'gpu'"):
        build_model("mlp_classifier", in_dim=3, n_classes=2, backend="gpu")


def test_a_bad_batch_is_a_one_line_error_naming_the_key(raises_one_line):
    model = build_model("mlp_classifier", in_dim=3, n_classes=2)
    with raises_one_line(ValueError, match=r"mlp_classifier batch: missing key 'y'"):
        model.compute_gradients({"x": np.zeros((2, 3), np.float32)})
    with raises_one_line(ValueError, match=r"batch\['x'\]: expected \(B, 3\) float, got float32"):
        model.forward({"x": np.zeros(3, np.float32)})
    lm = build_model("char_transformer", **SMALL["char_transformer"])
    with raises_one_line(ValueError, match=r"sequence length must be in \[1, 6\], got 7"):
        lm.forward({"x": np.zeros((1, 7), np.int64)})
