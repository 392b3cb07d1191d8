"""Parity with PyTorch: our state_dict loads into the equivalent torch module (strict, so
the names and shapes are PyTorch's), and outputs, loss and every gradient agree."""

import numpy as np
import pytest

from pipelines.model import build_model

torch = pytest.importorskip("torch")
F = torch.nn.functional

from pipelines.model.torch_twin import (  # noqa: E402  (torch first, or skip)
    TorchCharTransformer,
    TorchLoRALinear,
    TorchMLP,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


# ---- helpers ---------------------------------------------------------------------------


def load_into(module, model):
    """Our state_dict into the torch module, strict: every name and shape must match."""
    sd = {k: torch.from_numpy(v) for k, v in model.state_dict().items()}
    module.load_state_dict(sd, strict=True)


def assert_grads_match(module, model, grads):
    ours = dict(model.named_parameters())
    n = 0
    for name, p in module.named_parameters():
        slot = next(s for s in model.layout if s.name == name)
        if not p.requires_grad:
            assert not slot.trainable, name
            continue
        assert slot.trainable, name
        g = grads[slot.offset : slot.offset + ours[name].size].reshape(slot.shape)
        want = p.grad.numpy()
        np.testing.assert_allclose(g, want, **TOL, err_msg=name)
        # and at the tensor's own scale: some norm gains' gradients are ~4e-5, where an
        # absolute 1e-5 would pass a 20 % error
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        n += 1
    assert n == sum(s.trainable for s in model.layout)


# ---- the tests -------------------------------------------------------------------------


LM = {"vocab": 13, "d_model": 16, "n_head": 4, "n_layer": 2, "seq_len": 8}


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"mlp": "swiglu", "norm": "rmsnorm", "mlp_hidden": 32},
        {"gelu_approximate": "none"},
        {"lora": {"rank": 2, "alpha": 4, "targets": ["attn.qkv"]}},
    ],
    ids=["gelu-layernorm", "swiglu-rmsnorm", "exact-gelu", "lora-qkv"],
)
def test_the_char_transformer_matches_torch(cfg):
    model = build_model("char_transformer", **LM, **cfg, seed=2)
    if model.lora:  # B starts at zero; move it so the adapters matter
        model.params[...] = (
            np.random.default_rng(0).normal(size=model.params.size).astype(np.float32) * 0.1
        )
    torch_cfg = dict(cfg)
    if "lora" in cfg:
        torch_cfg["lora"] = (cfg["lora"]["rank"], cfg["lora"]["alpha"])
    module = TorchCharTransformer(**LM, **torch_cfg)
    if "lora" in cfg:  # LoRA freezes everything but the adapters (peft's default)
        for name, p in module.named_parameters():
            p.requires_grad_(".lora_" in name)
    load_into(module, model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, LM["vocab"], size=(3, LM["seq_len"] + 1))
    batch = {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}

    loss, grads = model.compute_gradients(batch)
    logits = module(torch.from_numpy(batch["x"]))
    ref = F.cross_entropy(logits.reshape(-1, LM["vocab"]), torch.from_numpy(batch["y"]).reshape(-1))
    ref.backward()
    np.testing.assert_allclose(model.forward(batch)["logits"], logits.detach().numpy(), **TOL)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert_grads_match(module, model, grads)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_the_mlp_classifier_matches_torch(activation):
    model = build_model(
        "mlp_classifier", in_dim=10, n_classes=5, hidden=[16, 12], activation=activation, seed=4
    )
    module = TorchMLP([10, 16, 12, 5], getattr(F, activation))
    load_into(module, model)
    rng = np.random.default_rng(2)
    batch = {"x": rng.normal(size=(8, 10)).astype(np.float32), "y": rng.integers(0, 5, size=8)}
    loss, grads = model.compute_gradients(batch, {"cross_entropy": {"label_smoothing": 0.1}})
    logits = module(torch.from_numpy(batch["x"]))
    ref = F.cross_entropy(logits, torch.from_numpy(batch["y"]), label_smoothing=0.1)
    ref.backward()
    np.testing.assert_allclose(model.forward(batch)["logits"], logits.detach().numpy(), **TOL)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert_grads_match(module, model, grads)


def test_the_mlp_regressor_with_lora_matches_torch():
    lora = {"rank": 3, "alpha": 6, "targets": ["layers.0"]}
    model = build_model("mlp_regressor", in_dim=6, out_dim=2, hidden=[8], lora=lora, seed=1)
    model.params[...] = np.random.default_rng(3).normal(size=model.params.size) * 0.1
    module = TorchMLP([6, 8, 2], F.relu)
    module.layers[0] = TorchLoRALinear(6, 8, 3, 6)
    for p in module.layers[1].parameters():
        p.requires_grad_(False)
    load_into(module, model)
    rng = np.random.default_rng(4)
    batch = {
        "x": rng.normal(size=(5, 6)).astype(np.float32),
        "y": rng.normal(size=(5, 2)).astype(np.float32),
    }
    loss, grads = model.compute_gradients(batch)
    ref = F.mse_loss(module(torch.from_numpy(batch["x"])), torch.from_numpy(batch["y"]))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert_grads_match(module, model, grads)


def test_the_triplet_embedder_matches_torch():
    model = build_model("triplet_embedder", in_dim=6, embed_dim=4, hidden=[8], margin=0.5, seed=3)
    module = TorchMLP([6, 8, 4], F.relu, normalize=True)
    load_into(module, model)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 6)).astype(np.float32)
    batch = {
        "anchor": x,
        "positive": x + 0.5 * rng.normal(size=x.shape).astype(np.float32),
        "negative": rng.normal(size=x.shape).astype(np.float32),
    }
    loss, grads = model.compute_gradients(batch)
    a, p, n = (module(torch.from_numpy(batch[k])) for k in ("anchor", "positive", "negative"))
    ref = F.triplet_margin_loss(a, p, n, margin=0.5)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(model.evaluate(batch)["anchor"], a.detach().numpy(), **TOL)
    assert_grads_match(module, model, grads)


def test_kl_distillation_matches_torch():
    model = build_model("mlp_classifier", in_dim=4, n_classes=3, hidden=[5], seed=6)
    module = TorchMLP([4, 5, 3], F.relu)
    load_into(module, model)
    rng = np.random.default_rng(6)
    teacher = rng.random((6, 3)).astype(np.float32)
    teacher /= teacher.sum(axis=1, keepdims=True)
    batch = {
        "x": rng.normal(size=(6, 4)).astype(np.float32),
        "y": rng.integers(0, 3, 6),
        "teacher_probs": teacher,
    }
    loss, grads = model.compute_gradients(batch, "cross_entropy + 0.5*kl_div")
    logits = module(torch.from_numpy(batch["x"]))
    ref = F.cross_entropy(logits, torch.from_numpy(batch["y"])) + 0.5 * F.kl_div(
        F.log_softmax(logits, dim=1), torch.from_numpy(teacher), reduction="batchmean"
    )
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert_grads_match(module, model, grads)
