"""Every layer's backward agrees with central differences (float64, the numpy twins)."""

import numpy as np
import pytest

from pipelines.model import (
    MLP,
    Activation,
    Block,
    CausalSelfAttention,
    Dropout,
    Embedding,
    L2Normalize,
    LayerNorm,
    Linear,
    LoRALinear,
    RMSNorm,
    SwiGLUMLP,
)
from pipelines.model.testing import LayerModel, check_gradients, check_input_gradient, probe_loss

B, T, C = 2, 5, 8


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def _randomise(model, seed=1):
    """Move parameters off their init (norm weights 1, LoRA's B 0) so every term matters."""
    model.params[...] = np.random.default_rng(seed).normal(size=model.params.shape) * 0.5


LAYERS = {
    "linear": lambda: (Linear(6, 4), None, (7, 6)),
    "linear without bias": lambda: (Linear(6, 4, bias=False), None, (7, 6)),
    "relu": lambda: (Activation("relu"), None, (7, 6)),
    "gelu": lambda: (Activation("gelu"), None, (7, 6)),
    "gelu tanh": lambda: (Activation("gelu", "tanh"), None, (7, 6)),
    "silu": lambda: (Activation("silu"), None, (7, 6)),
    "tanh": lambda: (Activation("tanh"), None, (7, 6)),
    "dropout": lambda: (Dropout(0.3), None, (7, 6)),
    "layernorm": lambda: (LayerNorm(6), None, (7, 6)),
    "rmsnorm": lambda: (RMSNorm(6), None, (7, 6)),
    "l2 normalize": lambda: (L2Normalize(), None, (7, 6)),
    "mlp": lambda: (MLP(6, 10, "gelu"), None, (7, 6)),
    "swiglu mlp": lambda: (SwiGLUMLP(6, 5), None, (7, 6)),
    "attention": lambda: (CausalSelfAttention(C, 2), (B, T), (B * T, C)),
    "block": lambda: (Block(C, 2, dropout=0.2), (B, T), (B * T, C)),
    "swiglu rmsnorm block": lambda: (
        Block(C, 4, mlp="swiglu", norm="rmsnorm", approximate="tanh"),
        (B, T),
        (B * T, C),
    ),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_layers_parameter_and_input_gradients_match_finite_differences(kind):
    layer, seq, x_shape = LAYERS[kind]()
    model = LayerModel(layer, seq=seq)
    _randomise(model)
    batch = {"x": _x(x_shape)}
    loss = probe_loss()
    if model.params.size:
        assert check_gradients(model, batch, loss, seed=3) > 0
    check_input_gradient(model, batch, loss, seed=3)


def test_embedding_gradients_match_finite_differences_with_repeated_ids():
    model = LayerModel(Embedding(5, 3))
    ids = np.array([0, 3, 3, 1, 0, 3], dtype=np.int64)
    assert check_gradients(model, {"x": ids}, probe_loss(), per_tensor=15) == 17
    assert model.dx is None


def test_lora_linear_trains_only_its_adapters_and_matches_finite_differences():
    model = LayerModel(LoRALinear(Linear(6, 4), rank=2, alpha=4.0, dropout=0.25))
    _randomise(model)
    model.frozen[...] = np.random.default_rng(2).normal(size=model.frozen.shape)
    trainable = [s.name for s in model.layout if s.trainable]
    assert trainable == ["layer.lora_A.weight", "layer.lora_B.weight"]
    batch = {"x": _x((7, 6))}
    check_gradients(model, batch, probe_loss(), seed=5)
    check_input_gradient(model, batch, probe_loss(), seed=5)


def test_lora_linear_starts_equal_to_its_base_layer():
    base = LayerModel(Linear(6, 4), seed=7)
    lora = LayerModel(LoRALinear(Linear(6, 4), rank=3, alpha=6.0), seed=7)
    assert np.array_equal(lora.state_dict()["layer.weight"], base.state_dict()["layer.weight"])
    assert not lora.state_dict()["layer.lora_B.weight"].any()
    x = {"x": _x((5, 6))}
    assert np.array_equal(lora.forward(x)["out"], base.forward(x)["out"])


def test_dropout_is_the_identity_outside_training_and_a_pure_function_of_the_seed():
    model = LayerModel(Dropout(0.5))
    x = {"x": _x((50, 8))}
    assert np.array_equal(model.forward(x)["out"], x["x"])
    probe = probe_loss()
    a = model.compute_gradients(x, probe, seed=11)[0]
    b = model.compute_gradients(x, probe, seed=11)[0]
    c = model.compute_gradients(x, probe, seed=12)[0]
    assert a == b and a != c


def test_two_dropout_layers_draw_different_masks_from_one_seed():
    model = LayerModel(Block(C, 2, dropout=0.5), seq=(B, T))
    model.compute_gradients({"x": _x((B * T, C))}, probe_loss(), seed=4)
    block = model.layer
    assert block.drop_attn.stream != block.drop_mlp.stream
    assert not np.array_equal(block.drop_attn._mask, block.drop_mlp._mask)


def test_unknown_layer_options_are_one_line_errors(raises_one_line):
    with raises_one_line(ValueError, match="activation: expected one of relu, gelu, silu, tanh"):
        Activation("swish")
    with raises_one_line(ValueError, match="norm: expected 'layernorm' or 'rmsnorm', got 'batch'"):
        Block(8, 2, norm="batch")
    with raises_one_line(ValueError, match="n_head: must divide d_model 8, got 3"):
        CausalSelfAttention(8, 3)
    with raises_one_line(ValueError, match=r"dropout: expected a probability in \[0, 1\)"):
        Dropout(1.0)
