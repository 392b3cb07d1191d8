"""Kernel benchmarks against the numpy twins, PyTorch and the hardware, measured in one run.

    python scripts/bench_kernels.py                  # Adam/AdamW at 1M and 10M params
    python scripts/bench_kernels.py --sizes 100000 --repeat 5

Prints one table per section, then one final JSON line with every number (for scripts and
CI to parse). Everything runs on one thread (torch.set_num_threads(1)); times are the
median and best of `--repeat` calls after warm-up, so a busy machine shows as a gap
between the two. torch is optional: without it its rows are skipped.

Sections are plain functions `(args) -> {"rows": [...], ...}` listed in SECTIONS at the
bottom; main() runs them in order and prints each table. To add a benchmark (e.g. a
transformer forward+backward), write one more function and append it to SECTIONS.
"""

import os

# Single-threaded BLAS for the transformer section; must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cykernels import optim, optim_ref  # noqa: E402

try:
    import torch
except ImportError:  # torch is a reference, never a dependency
    torch = None

# Adam touches 28 bytes per parameter per step: reads p, g, m, v (16), writes p, m, v (12).
ADAM_BYTES_PER_PARAM = 28


# ---- timing helpers ------------------------------------------------------------------


def time_calls(fn, repeat, warmup=2):
    """(median, best) seconds of `repeat` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(min(times))


def minor_faults_per_call(fn, calls):
    """Minor page faults of this process per fn() call (after the caller's warm-up)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def print_table(title, rows, columns):
    """Print `rows` (dicts) as an aligned table of `columns` (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n## {title}")
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---- section: hardware ---------------------------------------------------------------


def bench_hardware(args):
    """Copy bandwidth: np.copyto of a 256 MB float32 array, counting read + write bytes."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    median, best = time_calls(lambda: np.copyto(dst, src), args.repeat)
    moved = 2 * src.nbytes
    row = {
        "what": "np.copyto 256 MB",
        "median_ms": median * 1e3,
        "best_ms": best * 1e3,
        "gbps_median": moved / median / 1e9,
        "gbps_best": moved / best / 1e9,
    }
    print_table(
        f"hardware ({platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__})",
        [row],
        [
            ("what", "what", "{}"),
            ("median_ms", "median ms", "{:.2f}"),
            ("best_ms", "best ms", "{:.2f}"),
            ("gbps_median", "GB/s median", "{:.1f}"),
            ("gbps_best", "GB/s best", "{:.1f}"),
        ],
    )
    return {"rows": [row], "copy_gbps": row["gbps_best"]}


# ---- section: optimizers -------------------------------------------------------------


def optimizer_contenders(variant, size, rng):
    """name -> zero-arg step function, each over its own shard of `size` params."""
    param = rng.standard_normal(size, dtype=np.float32)
    grad = rng.standard_normal(size, dtype=np.float32)
    weight_decay = 0.01 if variant == "adamw" else 0.0
    decoupled = variant == "adamw"

    def ours_and_twin(module):
        p, m, v = param.copy(), np.zeros_like(param), np.zeros_like(param)
        step = [0]

        def run():
            step[0] += 1
            module.adam_step(p, grad, m, v, None, step[0], 1e-3, 0.9, 0.999, 1e-8,
                             weight_decay, decoupled)  # fmt: skip

        return run

    contenders = {"zerotrain": ours_and_twin(optim), "numpy twin": ours_and_twin(optim_ref)}
    if torch is not None:
        for impl in ("fused", "foreach"):
            tparam = torch.nn.Parameter(torch.from_numpy(param.copy()))
            tparam.grad = torch.from_numpy(grad.copy())
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            opt = cls([tparam], lr=1e-3, weight_decay=weight_decay, **{impl: True})
            contenders[f"torch {impl}"] = opt.step
    return contenders


def bench_optimizers(args):
    """Adam and AdamW step time per implementation and size, GB/s, ratios, page faults.

    Minor page faults per step (after warm-up) show who allocates: zero for the in-place
    kernels; the numpy twin's temporaries fault whenever malloc hands them fresh pages
    (always above malloc's mmap threshold), which is most of its time at 10M params.
    """
    if torch is not None:
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("adam", "adamw"):
        for size in args.sizes:
            contenders = optimizer_contenders(variant, size, rng)
            times, faults = {}, {}
            for name, step in contenders.items():
                # the numpy twin is ~10x slower: fewer calls keep the run short
                repeat = max(3, args.repeat // 4) if name == "numpy twin" else args.repeat
                times[name] = time_calls(step, repeat)
                faults[name] = minor_faults_per_call(step, repeat)
            for name, (median, best) in times.items():
                rows.append(
                    {
                        "optimizer": variant,
                        "params": size,
                        "impl": name,
                        "median_ms": median * 1e3,
                        "best_ms": best * 1e3,
                        "gbps": ADAM_BYTES_PER_PARAM * size / median / 1e9,
                        "speedup_vs_torch_fused": (
                            times["torch fused"][0] / median if "torch fused" in times else None
                        ),
                        "speedup_vs_numpy": times["numpy twin"][0] / median,
                        "minflt_per_step": faults[name],
                    }
                )
            del contenders
    print_table(
        "optimizer step, single thread (median of calls; speedups are median / median)",
        rows,
        [
            ("optimizer", "opt", "{}"),
            ("params", "params", "{:,}"),
            ("impl", "impl", "{}"),
            ("median_ms", "median ms", "{:.3f}"),
            ("best_ms", "best ms", "{:.3f}"),
            ("gbps", "GB/s (28 B/param)", "{:.1f}"),
            ("speedup_vs_torch_fused", "x torch fused", "{:.2f}"),
            ("speedup_vs_numpy", "x numpy", "{:.2f}"),
            ("minflt_per_step", "minflt/step", "{:.2f}"),
        ],
    )
    return {"rows": rows}


# The char transformer's linear layers: 2048 rows (batch 32 x seq 64), (in, out) features.
GEMM_SHAPES = [(2048, 128, 384), (2048, 128, 128), (2048, 128, 512), (2048, 512, 128)]


def _libraries():
    from cykernels import gemm

    return [lib for lib in ("mkl", "numpy") if lib == "numpy" or gemm._mkl_path()]


def bench_gemm(args):
    """The linear layers' three products (y = x W^T, dx = dy W, dW = dy^T x) through
    cykernels.gemm with each library, against torch.mm (MKL inside torch)."""
    from cykernels import gemm

    rng = np.random.default_rng(0)
    rows, before = [], gemm.library()
    for n, i, o in GEMM_SHAPES:
        x, dy = rng.random((n, i), np.float32), rng.random((n, o), np.float32)
        w = rng.random((o, i), np.float32)
        products = {  # name -> (out, a, b, trans_a, trans_b)
            "y=xW^T": (np.empty((n, o), np.float32), x, w, False, True),
            "dx=dyW": (np.empty((n, i), np.float32), dy, w, False, False),
            "dW=dy^Tx": (np.empty((o, i), np.float32), dy, x, True, False),
        }
        for name, (out, a, b, ta, tb) in products.items():
            row = {"shape": f"{n}x{i}->{o}", "product": name}
            for lib in _libraries():
                gemm.use(lib)
                call = lambda out=out, a=a, b=b, ta=ta, tb=tb: gemm.matmul(out, a, b, ta, tb)  # noqa: E731
                row[f"{lib}_ms"] = 1e3 * time_calls(call, args.repeat)[0]
            if torch is not None:
                ta_, tb_, to = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
                left, right = (ta_.t() if ta else ta_), (tb_.t() if tb else tb_)
                call = lambda left=left, right=right, to=to: torch.mm(left, right, out=to)  # noqa: E731
                row["torch_ms"] = 1e3 * time_calls(call, args.repeat)[0]
            rows.append(row)
    gemm.use(before)
    totals = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_ms")}
    rows.append({"shape": "all", "product": "sum", **totals})
    for r in rows:
        if "mkl_ms" in r:
            r["mkl_over_numpy"] = r["mkl_ms"] / r["numpy_ms"]
        if "torch_ms" in r:
            r["mkl_over_torch" if "mkl_ms" in r else "numpy_over_torch"] = (
                r.get("mkl_ms", r["numpy_ms"]) / r["torch_ms"]
            )
    columns = [("shape", "shape", "{}"), ("product", "product", "{}")]
    columns += [(k, k, "{:.3f}") for k in rows[-1] if k not in ("shape", "product")]
    print_table("float32 matrix products, ms (single thread)", rows, columns)
    return {"rows": rows}


# ---- sections --------------------------------------------------------------------------
# One function per section, run in this order; each prints its table and returns a dict
# that lands under its name (without "bench_") in the final JSON line.
def bench_transformer(args):
    """Default char transformer: forward + backward + Adam per step, ours (with each
    matrix library) vs torch."""
    from cykernels import gemm
    from pipelines.model.bench import transformer_benchmark

    rows, before = [], gemm.library()
    for lib in _libraries():
        gemm.use(lib)
        result = transformer_benchmark(
            steps=args.transformer_steps, profile=False, torch_reference=not rows
        )
        row = {
            "model": "char_transformer 2x128, 4 heads, seq 64, vocab 96, batch 32",
            "blas": lib,
            "ours_cpu_ms": round(result["ours_cpu_ms"], 2),
            "ours_steps_per_s": round(result["ours_steps_per_s"], 2),
        }
        if rows and rows[0].get("torch_cpu_ms") is not None:
            row["torch_cpu_ms"] = rows[0]["torch_cpu_ms"]
        elif result.get("torch_cpu_ms") is not None:
            row["torch_cpu_ms"] = round(result["torch_cpu_ms"], 2)
        if row.get("torch_cpu_ms"):
            row["ours_over_torch_time"] = round(row["ours_cpu_ms"] / row["torch_cpu_ms"], 3)
        rows.append(row)
    gemm.use(before)
    columns = [(key, key, "{}") for key in rows[0]]
    print_table("transformer fwd+bwd+Adam (single thread)", rows, columns)
    return {"rows": rows}


SECTIONS = [
    bench_hardware,
    bench_optimizers,
    bench_gemm,
    bench_transformer,
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--transformer-steps", type=int, default=20)
    args = parser.parse_args(argv)
    results = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "cpus": os.cpu_count(),
    }
    for section in SECTIONS:
        results[section.__name__.removeprefix("bench_")] = section(args)
    print()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
