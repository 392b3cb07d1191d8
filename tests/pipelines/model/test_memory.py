"""Activation buffers are allocated once per batch shape: steady training allocates nothing."""

import tracemalloc

import numpy as np
import pytest

from pipelines.model import build_model

CASES = {
    "char_transformer": (
        {"vocab": 11, "d_model": 16, "n_head": 2, "n_layer": 2, "seq_len": 8, "dropout": 0.1},
        lambda rng: {"x": rng.integers(0, 11, (4, 8)), "y": rng.integers(0, 11, (4, 8))},
    ),
    "triplet_embedder": (
        {"in_dim": 12, "embed_dim": 4, "dropout": 0.1},
        lambda rng: {
            k: rng.normal(size=(6, 12)).astype(np.float32)
            for k in ("anchor", "positive", "negative")
        },
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_many_steps_of_one_batch_shape_do_not_grow_memory(name):
    cfg, make_batch = CASES[name]
    model = build_model(name, **cfg)
    rng = np.random.default_rng(0)
    batches = [make_batch(rng) for _ in range(3)]
    for step in range(3):  # warm up: the buffers of this shape are made here
        model.compute_gradients(batches[step % 3], seed=step)
        model.evaluate(batches[step % 3])
    tracemalloc.start()
    try:
        model.compute_gradients(batches[0], seed=0)
        start, _ = tracemalloc.get_traced_memory()
        for step in range(40):
            model.compute_gradients(batches[step % 3], seed=step)
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 4096, f"grew by {end - start} bytes over 40 steps"


@pytest.mark.parametrize("name", list(CASES))
def test_buffers_are_reused_between_steps_of_one_shape(name):
    """The very same memory, step after step: not merely as many buffers."""
    cfg, make_batch = CASES[name]
    model = build_model(name, **cfg)
    rng = np.random.default_rng(1)

    def addresses():
        return {
            (module_name, slot): buf.__array_interface__["data"][0]
            for module_name, module in model.named_modules()
            for slot, buf in module._buffers.items()
        }

    model.compute_gradients(make_batch(rng), seed=0)
    first = addresses()
    assert first  # the model does use buffers
    for step in range(1, 4):
        model.compute_gradients(make_batch(rng), seed=step)
    assert addresses() == first
