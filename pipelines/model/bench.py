"""Training-step benchmark of the default transformer, ours against PyTorch, single thread.

    python -m pipelines.model.bench            # prints the dict transformer_benchmark returns

One step = forward + backward (compute_gradients) + an Adam update of the flat buffer
(cykernels.optim.adam_step), against the same model in torch (nn modules, tied head,
scaled_dot_product_attention, torch.optim.Adam) with torch.set_num_threads(1).

Single thread for numpy's BLAS too: set OPENBLAS_NUM_THREADS=1 (or OMP_NUM_THREADS=1)
before Python starts — running this module as a script does it for you; a caller that
imported numpy already gets whatever threads its BLAS was started with (the result's
"blas_threads_env" says what the environment asked for).
"""

import os
import sys
import time
from collections import defaultdict

import numpy as np

from pipelines.model._models import build_model

DEFAULT = {"vocab": 96, "d_model": 128, "n_head": 4, "n_layer": 2, "seq_len": 64}
BATCH = 32


def transformer_benchmark(
    steps=20, warmup=3, batch=BATCH, torch_reference=True, profile=True, **config
):
    """Time training steps of the default char_transformer (config overrides allowed).

    Returns a dict::

        config            the model config and batch size
        blas              the matrix library the kernels used (cykernels.gemm)
        ours_ms, ours_cpu_ms  median wall / CPU milliseconds per step (fwd + bwd + Adam)
        ours_steps_per_s      1000 / ours_cpu_ms
        torch_ms, torch_cpu_ms, torch_steps_per_s, and ratio = ours_cpu_ms / torch_cpu_ms
                              when torch is installed (< 1: we are faster)
        profile               kernel name -> CPU ms per step inside it, "(python)" the rest
    """
    cfg = {**DEFAULT, **config}
    model = build_model("char_transformer", **cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg["vocab"], size=(batch, cfg["seq_len"] + 1))
    data = {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}
    from cykernels import gemm

    result = {
        "config": {**cfg, "batch": batch},
        "blas": gemm.library(),
        "blas_threads_env": os.environ.get(
            "OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS")
        ),
    }
    result["ours_ms"], result["ours_cpu_ms"] = _time(_our_step(model, data), steps, warmup)
    result["ours_steps_per_s"] = 1000.0 / result["ours_cpu_ms"]
    if torch_reference:
        try:
            step = _torch_step(model, data, cfg)
        except ImportError:
            step = None
        if step is not None:
            result["torch_ms"], result["torch_cpu_ms"] = _time(step, steps, warmup)
            result["torch_steps_per_s"] = 1000.0 / result["torch_cpu_ms"]
            result["ratio"] = result["ours_cpu_ms"] / result["torch_cpu_ms"]
    if profile:
        result["profile"] = profile_step(model, data, steps=max(3, steps // 4))
    return result


def _time(step, steps, warmup):
    """(median wall ms, median CPU ms) per step. CPU time (process_time, one thread) is
    the number to trust on a shared machine: it does not count waiting for a core."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000.0 * float(np.median(wall)), 1000.0 * float(np.median(cpu))


def _our_step(model, data):
    from cykernels.optim import adam_step

    m = np.zeros_like(model.params)
    v = np.zeros_like(model.params)
    count = [0]

    def step():
        count[0] += 1
        model.compute_gradients(data, seed=count[0])
        adam_step(model.params, model.grads, m, v, None, count[0], lr=1e-3)

    return step


_TWIN_KEYS = ("vocab", "d_model", "n_head", "n_layer", "seq_len")


def _torch_step(model, data, cfg):
    import torch

    from pipelines.model.torch_twin import TorchCharTransformer

    torch.set_num_threads(1)
    module = TorchCharTransformer(**{k: cfg[k] for k in _TWIN_KEYS})
    module.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).reshape(-1)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = module(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y).backward()
        opt.step()

    return step


# ---- where the time goes -----------------------------------------------------------------


class _TimedKernels:
    """Stands in for a kernel namespace: each call timed and summed under its name."""

    def __init__(self, inner, totals):
        self._inner, self._totals = inner, totals

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        totals = self._totals

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - t0

        return timed


def profile_step(model, data, steps=5):
    """CPU ms per compute_gradients step inside each kernel; "(python)" is everything
    else (the model's own numpy, Python overhead). Sorted, largest first."""
    totals = defaultdict(float)
    # every module and the built-in loss terms call kernels through a `.k` attribute
    modules = [m for _, m in model.named_modules()]
    modules += [t for _, t in model._resolve_loss(None).terms if hasattr(t, "k")]
    saved = [m.k for m in modules]
    for m, k in zip(modules, saved, strict=True):
        m.k = _TimedKernels(k, totals)
    try:
        model.compute_gradients(data, seed=0)
        totals.clear()
        t0 = time.process_time()
        for i in range(steps):
            model.compute_gradients(data, seed=i)
        wall = time.process_time() - t0
    finally:
        for m, k in zip(modules, saved, strict=True):
            m.k = k
    out = {name: 1000.0 * t / steps for name, t in totals.items()}
    out["(python)"] = 1000.0 * wall / steps - sum(out.values())
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    result = transformer_benchmark()
    for key, value in result.items():
        if key == "profile":
            print("profile (ms per step):")
            for name, ms in value.items():
                print(f"  {name:40s} {ms:8.2f}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    if os.environ.get("OPENBLAS_NUM_THREADS") is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "pipelines.model.bench", *sys.argv[1:]])
    main()
