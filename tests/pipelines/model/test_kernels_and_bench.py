"""The default backend calls the compiled kernels, never a twin; the benchmark runs."""

import importlib.machinery

import numpy as np
import pytest

from pipelines.model import build_model
from pipelines.model._kernels import KERNELS, check_backend, kernels
from pipelines.model.bench import transformer_benchmark


@pytest.mark.parametrize("backend, compiled", [("cython", True), ("numpy", False)])
def test_each_backend_resolves_every_kernel_to_its_own_implementation(backend, compiled):
    k = kernels(backend)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for module, functions in KERNELS.items():
        for name in functions:
            fn = getattr(k, name)
            mod = importlib.import_module(fn.__module__)
            assert mod.__name__ == f"cykernels.{module}" + ("" if compiled else "_ref"), name
            assert mod.__file__.endswith(suffixes) == compiled, mod.__file__


SMALL_BATCHES = {
    "mlp_classifier": (
        {"in_dim": 3, "n_classes": 2, "hidden": [4]},
        {"x": np.ones((2, 3), np.float32), "y": np.array([0, 1])},
    ),
    "char_transformer": (
        {"vocab": 11, "d_model": 8, "n_head": 2, "n_layer": 1, "seq_len": 4, "dropout": 0.1},
        {"x": np.zeros((2, 4), np.int64), "y": np.ones((2, 4), np.int64)},
    ),
}


@pytest.mark.parametrize("name", list(SMALL_BATCHES))
def test_a_model_on_the_default_backend_uses_the_compiled_kernels(name):
    """Every module, and every loss a step resolves, calls the compiled kernels."""
    cfg, batch = SMALL_BATCHES[name]
    model = build_model(name, **cfg)
    model.compute_gradients(batch, seed=0)
    compiled = kernels("cython")
    assert model.backend == "cython"
    modules = dict(model.named_modules())
    assert len(modules) > 3 and all(m.k is compiled for m in modules.values()), [
        n for n, m in modules.items() if m.k is not compiled
    ]
    terms = [term for loss in model._losses.values() for _, term in loss.terms]
    assert terms and all(term.k is compiled for term in terms)  # the built-in losses


def test_an_unknown_backend_is_a_one_line_error():
    with pytest.raises(ValueError, match="backend: expected one of cython, numpy, got 'torch'"):
        check_backend("torch")


def test_the_transformer_benchmark_returns_its_numbers():
    out = transformer_benchmark(
        steps=1,
        warmup=0,
        batch=2,
        torch_reference=False,
        vocab=11,
        d_model=8,
        n_head=2,
        n_layer=1,
        seq_len=4,
    )
    assert out["config"]["batch"] == 2 and out["ours_cpu_ms"] > 0
    assert "linear_forward" in out["profile"] and "(python)" in out["profile"]
