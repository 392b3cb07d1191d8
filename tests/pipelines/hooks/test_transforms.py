import numpy as np
import pytest

from pipelines.hooks import (
    HookError,
    TransformError,
    TransformRunner,
    analyzer,
    transform,
    transform_rng,
)

LAYOUT = [("embed.weight", 0, (5, 4)), ("fc.weight", 20, (3, 4)), ("fc.bias", 32, (3,))]
SIZE = 35


@transform
def add_noise(ctx):
    for g in ctx.grads.values():
        g += ctx.rng.normal(0.0, 0.1, size=g.shape).astype(g.dtype)
    return {"rank": ctx.rank}


def run_once(seed, step, rank, hooks=(add_noise,)):
    grad = np.ones(SIZE, dtype=np.float32)
    records = TransformRunner(list(hooks), layout=LAYOUT, seed=seed, rank=rank).apply(step, grad)
    return grad, records


def test_transform_rng_is_a_pure_function_of_seed_step_rank_and_name():
    draw = transform_rng(7, 3, 1, "h").normal(size=4)
    assert (draw == transform_rng(7, 3, 1, "h").normal(size=4)).all()
    for other in [(8, 3, 1, "h"), (7, 4, 1, "h"), (7, 3, 2, "h"), (7, 3, 1, "g")]:
        assert not (draw == transform_rng(*other).normal(size=4)).any()


def test_a_transform_edits_the_flat_gradient_in_place_deterministically():
    grad, records = run_once(seed=1, step=5, rank=2)
    again, _ = run_once(seed=1, step=5, rank=2)
    assert not (grad == 1.0).all()
    assert grad.tobytes() == again.tobytes()
    assert records == [
        {"step": 5, "hook": "add_noise", "kind": "transform", "rank": 2, "metrics": {"rank": 2}}
    ]


def test_ranks_and_steps_draw_different_noise():
    assert run_once(1, 5, 0)[0].tobytes() != run_once(1, 5, 1)[0].tobytes()
    assert run_once(1, 5, 0)[0].tobytes() != run_once(1, 6, 0)[0].tobytes()


def test_adding_a_transform_leaves_another_transforms_stream_unchanged():
    @transform
    def scale_nothing(ctx):
        ctx.rng.normal(size=100)  # draws from its own stream only

    alone, _ = run_once(3, 1, 0)
    together, _ = run_once(3, 1, 0, hooks=(scale_nothing, add_noise))
    assert alone.tobytes() == together.tobytes()


def test_transforms_run_in_order_each_seeing_the_last_ones_output():
    @transform
    def double(ctx):
        ctx.grads["fc.bias"][...] *= 2

    seen = []
    look = transform(name="look")(lambda ctx: seen.append(ctx.grads["fc.bias"].copy()))
    run_once(0, 0, 0, hooks=(double, look))
    assert seen[0].tolist() == [2.0, 2.0, 2.0]


def test_a_transform_is_skipped_off_its_sampled_steps():
    sparse = transform(every=2, name="sparse")(add_noise.fn)
    grad, records = run_once(0, 1, 0, hooks=(sparse,))
    assert records == [] and (grad == 1.0).all()


def test_a_raising_transform_fails_the_step_naming_hook_step_and_rank():
    bad = transform(name="bad")(lambda ctx: 1 / 0)
    with pytest.raises(TransformError, match="'bad' raised at step 4 on rank 1: ZeroDivision"):
        run_once(0, 4, 1, hooks=(bad,))


def test_replacing_a_gradient_instead_of_editing_it_is_an_error():
    @transform
    def swap(ctx):
        ctx.grads["fc.bias"] = np.zeros(3)  # rebinding would silently change nothing

    with pytest.raises(TransformError, match="TypeError"):
        run_once(0, 0, 0, hooks=(swap,))


def test_the_transform_runner_refuses_analyzers():
    with pytest.raises(HookError, match="transforms only"):
        TransformRunner([analyzer(lambda ctx: None)], layout=LAYOUT, seed=0, rank=0)
