import numpy as np
import pytest

from pipelines.hooks import HookContext, flat_views, normalise_layout

LAYOUT = [("embed.weight", 0, (5, 4)), ("fc.weight", 20, (3, 4)), ("fc.bias", 32, (3,))]
SIZE = 35


def test_a_context_from_flat_buffers_holds_views_not_copies():
    flat = np.arange(SIZE, dtype=np.float32)
    ctx = HookContext.from_flat(3, LAYOUT, flat, rank_grads=[flat, flat + 1], params=flat)
    assert ctx.names == ("embed.weight", "fc.weight", "fc.bias")
    assert ctx.grads["fc.weight"].shape == (3, 4)
    assert np.shares_memory(ctx.grads["fc.bias"], flat)
    assert ctx.grads["fc.bias"].tolist() == [32.0, 33.0, 34.0]
    assert ctx.rank_grads[1]["fc.bias"].tolist() == [33.0, 34.0, 35.0]
    assert ctx.world_size == 2 and ctx.update is None


def test_an_analyzer_context_cannot_change_training_data():
    flat = np.zeros(SIZE, dtype=np.float32)
    ctx = HookContext.from_flat(
        0, LAYOUT, flat, rank_grads=[flat.copy(), flat.copy()], params=flat.copy(),
        update=flat.copy(),
    )  # fmt: skip
    mappings = [ctx.grads, ctx.params, ctx.update, *ctx.rank_grads.values()]
    for mapping in mappings:
        for name in ("embed.weight", "fc.weight", "fc.bias"):
            with pytest.raises(ValueError, match="read-only"):
                mapping[name].reshape(-1)[0] = 1.0
        with pytest.raises(TypeError):
            mapping["fc.bias"] = np.ones(3)
    assert flat.flags.writeable  # the caller's buffer itself is untouched


def test_layouts_of_parameter_like_objects_are_accepted():
    class Param:
        def __init__(self, name, offset, shape):
            self.name, self.offset, self.shape = name, offset, shape

    layout = normalise_layout([Param(n, o, s) for n, o, s in LAYOUT])
    assert layout == tuple((n, o, tuple(s)) for n, o, s in LAYOUT)


def test_a_layout_that_overruns_the_buffer_names_the_parameter():
    with pytest.raises(ValueError, match="'fc.bias' needs elements \\[32, 35\\) of a buffer of 34"):
        flat_views(np.zeros(SIZE - 1, np.float32), normalise_layout(LAYOUT))


def test_a_summed_reduction_is_rescaled_to_the_mean():
    flat = np.full(SIZE, 4.0, dtype=np.float32)
    ctx = HookContext.from_flat(0, LAYOUT, flat, reduced_scale=0.25)
    assert ctx.grads["fc.bias"].tolist() == [1.0, 1.0, 1.0]


def test_the_global_batch_is_per_rank_batch_times_ranks(step_ctx):
    ctx, _ = step_ctx(ranks=4, batch_size=8)
    assert (ctx.batch_size, ctx.global_batch_size) == (8, 32)
