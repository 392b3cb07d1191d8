"""cykernels.optim: the Cython kernels against their numpy twin and against torch.optim."""

import gc
import tracemalloc

import numpy as np
import pytest

from cykernels import optim, optim_ref

SIZES = [1, 7, 64, 1031]  # odd sizes exercise the vector loops' scalar tails

SGD_VARIANTS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.5},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"momentum": 0.8, "weight_decay": 0.1},
    "nesterov_weight_decay": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
}

ADAM_VARIANTS = {
    "adam": {},
    "adam_l2": {"weight_decay": 0.1},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "amsgrad": {"amsgrad": True},
    "adamw_amsgrad": {"weight_decay": 0.05, "decoupled_weight_decay": True, "amsgrad": True},
    "betas_eps": {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "lr": 3e-3},
}


class Shard:
    """A parameter shard with zeroed optimizer state, as the Optimizer actor holds it."""

    def __init__(self, rng, size):
        self.param = rng.standard_normal(size, dtype=np.float32)
        self.buf = np.zeros(size, np.float32)
        self.exp_avg = np.zeros(size, np.float32)
        self.exp_avg_sq = np.zeros(size, np.float32)
        self.max_exp_avg_sq = np.zeros(size, np.float32)

    def copy(self):
        clone = object.__new__(Shard)
        clone.__dict__ = {k: v.copy() for k, v in self.__dict__.items()}
        return clone

    def sgd(self, module, grad, step, **kw):
        module.sgd_step(self.param, grad, self.buf, first_step=step == 1, lr=0.05, **kw)

    def adam(self, module, grad, step, lr=1e-3, **kw):
        module.adam_step(
            self.param, grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq, step, lr, **kw
        )


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(actual, expected, **tol)


# ---- kernel vs numpy twin ------------------------------------------------------------


VARIANTS = {"sgd": SGD_VARIANTS, "adam": ADAM_VARIANTS}
STATE = {"sgd": ("param", "buf"), "adam": ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "optimizer, variant", [(kind, name) for kind, table in VARIANTS.items() for name in table]
)
def test_kernel_matches_twin_over_five_steps(rng, tolerance, size, optimizer, variant):
    ours = Shard(rng, size)
    ref = ours.copy()
    for step in range(1, 6):
        grad = rng.standard_normal(size, dtype=np.float32)
        getattr(ours, optimizer)(optim, grad, step, **VARIANTS[optimizer][variant])
        getattr(ref, optimizer)(optim_ref, grad, step, **VARIANTS[optimizer][variant])
    for name in STATE[optimizer]:
        assert_close(getattr(ours, name), getattr(ref, name), tolerance[np.float32])


def test_adamw_step_is_adam_with_decoupled_decay_and_torch_default(rng):
    a = Shard(rng, 33)
    b = a.copy()
    grad = rng.standard_normal(33, dtype=np.float32)
    optim.adamw_step(a.param, grad, a.exp_avg, a.exp_avg_sq, None, 1)
    optim.adam_step(
        b.param,
        grad,
        b.exp_avg,
        b.exp_avg_sq,
        None,
        1,
        weight_decay=0.01,
        decoupled_weight_decay=True,
    )
    np.testing.assert_array_equal(a.param, b.param)


def test_sgd_first_step_sets_the_buffer_to_the_gradient_as_torch(rng):
    shard = Shard(rng, 16)
    shard.buf[:] = 123.0  # stale contents must be ignored on the first step
    grad = rng.standard_normal(16, dtype=np.float32)
    optim.sgd_step(shard.param, grad, shard.buf, 0.1, momentum=0.9, dampening=0.5, first_step=True)
    np.testing.assert_array_equal(shard.buf, grad)


def test_adam_gives_the_same_bits_every_call(rng):
    first = Shard(rng, 1031)
    second = first.copy()
    grad = rng.standard_normal(1031, dtype=np.float32)
    for shard in (first, second):
        for step in range(1, 4):
            shard.adam(optim, grad, step, weight_decay=0.1)
    np.testing.assert_array_equal(first.param, second.param)


# ---- kernel vs torch.optim -----------------------------------------------------------


def run_against_torch(torch, rng, make_opt, update, size, steps):
    """Run `steps` steps with the same random gradients; return max |ours - torch| of params."""
    shard = Shard(rng, size)
    tparam = torch.nn.Parameter(torch.from_numpy(shard.param.copy()))
    opt = make_opt([tparam])
    for step in range(1, steps + 1):
        grad = rng.standard_normal(size, dtype=np.float32)
        tparam.grad = torch.from_numpy(grad.copy())
        opt.step()
        update(shard, grad, step)
    return np.abs(shard.param - tparam.detach().numpy()).max()


@pytest.mark.parametrize("variant", SGD_VARIANTS)
def test_sgd_matches_torch_for_100_steps(torch, rng, tolerance, variant):
    kw = SGD_VARIANTS[variant]
    diff = run_against_torch(
        torch,
        rng,
        lambda params: torch.optim.SGD(params, lr=0.05, foreach=False, **kw),
        lambda shard, grad, step: shard.sgd(optim, grad, step, **kw),
        size=257,
        steps=100,
    )
    assert diff <= tolerance[np.float32]["atol"]


def torch_adam(
    torch,
    params,
    impl,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
):
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return cls(
        params,
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


@pytest.mark.parametrize("impl", ["single_tensor", "fused"])
@pytest.mark.parametrize("variant", ADAM_VARIANTS)
def test_adam_matches_torch_for_100_steps(torch, rng, tolerance, impl, variant):
    kw = ADAM_VARIANTS[variant]
    diff = run_against_torch(
        torch,
        rng,
        lambda params: torch_adam(torch, params, impl, **kw),
        lambda shard, grad, step: shard.adam(optim, grad, step, **kw),
        size=257,
        steps=100,
    )
    assert diff <= tolerance[np.float32]["atol"]


@pytest.mark.parametrize("variant", ["adam", "adamw"])
def test_adam_matches_torch_for_1000_steps(torch, rng, tolerance, variant):
    kw = ADAM_VARIANTS[variant]
    diff = run_against_torch(
        torch,
        rng,
        lambda params: torch_adam(torch, params, "fused", **kw),
        lambda shard, grad, step: shard.adam(optim, grad, step, **kw),
        size=1031,
        steps=1000,
    )
    assert diff <= tolerance[np.float32]["atol"]


# ---- memory --------------------------------------------------------------------------


def test_adam_step_allocates_nothing_per_call(rng):
    size = 100_000
    shard = Shard(rng, size)
    grad = rng.standard_normal(size, dtype=np.float32)
    tracemalloc.start()
    try:
        # warm-up under tracing: first-call caches are not per-call allocations
        for step in range(1, 21):
            shard.adam(optim, grad, step, amsgrad=True)
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for step in range(21, 321):
            shard.adam(optim, grad, step, amsgrad=True)
        gc.collect()  # cyclic garbage (small wrapper objects) is not growth
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 1024  # no growth over 300 calls
    assert peak - before < size  # no temporary of P elements (4 P bytes) inside a call


# ---- bad input -----------------------------------------------------------------------


def adam_args(rng, size=8):
    shard = Shard(rng, size)
    grad = rng.standard_normal(size, dtype=np.float32)
    return {
        "param": shard.param,
        "grad": grad,
        "exp_avg": shard.exp_avg,
        "exp_avg_sq": shard.exp_avg_sq,
        "max_exp_avg_sq": shard.max_exp_avg_sq,
    }


@pytest.mark.parametrize("name", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda a: a.astype(np.float64), "dtype float32"),
        (lambda a: np.zeros(a.size * 2, np.float32)[::2], "C-contiguous"),
        (lambda a: np.zeros(a.size + 1, np.float32), "shape"),
        (lambda a: a.reshape(2, -1), "dimensions"),
        (lambda a: list(a), "numpy.ndarray"),
    ],
    ids=["dtype", "strided", "shape", "ndim", "not_array"],
)
def test_adam_step_rejects_bad_arrays_naming_the_argument(rng, name, spoil, message):
    args = adam_args(rng)
    args[name] = spoil(args[name])
    with pytest.raises(ValueError, match=message) as info:
        optim.adam_step(*args.values(), 1, amsgrad=True)
    assert name in str(info.value)


@pytest.mark.parametrize(
    "out, other", [("exp_avg", "exp_avg_sq"), ("param", "grad"), ("max_exp_avg_sq", "param")]
)
def test_adam_step_rejects_aliased_buffers(rng, out, other):
    args = adam_args(rng)
    args[out] = args[other]
    with pytest.raises(ValueError, match="must not share memory"):
        optim.adam_step(*args.values(), 1, amsgrad=True)


def test_adam_step_rejects_overlapping_views_of_one_buffer(rng):
    flat = np.zeros(12, np.float32)
    args = adam_args(rng)
    args["exp_avg"], args["exp_avg_sq"] = flat[:8], flat[4:]
    with pytest.raises(ValueError, match="exp_avg: must not share memory with exp_avg_sq"):
        optim.adam_step(*args.values(), 1)


def test_adam_step_rejects_a_read_only_param(rng):
    args = adam_args(rng)
    args["param"].flags.writeable = False
    with pytest.raises(ValueError, match="param: expected a writable array"):
        optim.adam_step(*args.values(), 1)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"step": 0}, "step: expected the 1-based step count"),
        ({"beta2": 1.0}, "beta1, beta2"),
        ({"lr": -1.0}, "lr, eps, weight_decay"),
    ],
)
def test_adam_step_rejects_bad_hyperparameters(rng, kw, message):
    args = {**adam_args(rng), "step": 1, **kw}
    with pytest.raises(ValueError, match=message):
        optim.adam_step(**args)


def test_amsgrad_without_its_buffer_names_max_exp_avg_sq(rng):
    args = {**adam_args(rng), "max_exp_avg_sq": None}
    with pytest.raises(ValueError, match="max_exp_avg_sq: required when amsgrad"):
        optim.adam_step(*args.values(), 1, amsgrad=True)
    optim.adam_step(*args.values(), 1)  # without amsgrad None is fine


def test_sgd_with_momentum_requires_a_buffer_and_nesterov_requires_no_dampening(rng):
    param, grad = rng.standard_normal((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="momentum_buffer: required"):
        optim.sgd_step(param, grad, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov: requires momentum > 0 and dampening == 0"):
        optim.sgd_step(param, grad, np.zeros(8, np.float32), 0.1, 0.9, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum_buffer: must not share memory with grad"):
        optim.sgd_step(param, grad, grad, 0.1, momentum=0.9)
    optim.sgd_step(param, grad, None, 0.1)  # plain SGD needs no buffer
