"""Built-in gradient analyses: pure numpy functions, and hook factories around them.

Each analysis is a function of dicts name -> array (in layer order) so a notebook or a
test can call it on anything; each `*_hook(every=1, ...)` factory wraps one as an
analyzer Hook with a stable name and metric names. The names are a contract with
`zerotrain report` and TensorBoard tags:

    hook               metrics
    grad_norm          global, norm/<param>
    grad_distribution  mean, std, min, max, sparsity, nonfinite, hist (log10|g| Histogram)
    grad_flow          flow/<param>                      (mean |g|, layer order)
    grad_health        global_norm, nonfinite, vanishing, exploding, healthy,
                       nonfinite/<param>, vanishing/<param>, exploding/<param> (flagged only)
    update_ratio       ratio/<param>, max, median
    rank_cosine        matrix (ranks x ranks), mean, min (off-diagonal)
    noise_scale        b_simple, g2, trace_sigma (averaged over training steps: see
                       NoiseScale), window_steps (that average's window in steps),
                       gap (steps since the previous sample), *_step (this step's raw
                       estimates: b_simple, g2, trace_sigma, and small_sq / big_sq,
                       the squared norms |G_small|² and |G_big|²), b_small, b_big

Sums of squares and dot products accumulate in float64 (in bounded chunks, so no copy
of a whole layer): the noise scale subtracts nearly equal squared norms and float32
accumulation would drown the difference. A value that overflows is reported as nan.

Load them with `builtin` (all of them) or `builtin:NAME` in --hook or the config.
"""

import math

import numpy as np

from ._hook import analyzer
from ._metrics import Histogram

__all__ = [
    "BUILTINS",
    "DEFAULT_LOG10_EDGES",
    "NoiseScale",
    "builtin_hooks",
    "dot",
    "ema_window",
    "grad_distribution",
    "grad_distribution_hook",
    "grad_flow",
    "grad_flow_hook",
    "grad_health",
    "grad_health_hook",
    "grad_norm_hook",
    "grad_norms",
    "noise_scale_estimates",
    "noise_scale_hook",
    "rank_cosine",
    "rank_cosine_hook",
    "update_ratio_hook",
    "update_ratios",
]

_CHUNK = 1 << 16

# Fixed bins of log10|g|: 1e-10 .. 1e2 in half decades. Fixed, so that histograms of
# different steps are comparable; values outside land in the end bins.
DEFAULT_LOG10_EDGES = np.arange(-10.0, 2.0 + 0.25, 0.5)


def _flat(a):
    return np.asarray(a).reshape(-1)


def dot(a, b) -> float:
    """sum(a * b) over all elements, accumulated in float64."""
    a, b = _flat(a), _flat(b)
    assert a.shape == b.shape, f"dot: shapes differ, {a.shape} vs {b.shape}"
    total = 0.0
    for i in range(0, a.size, _CHUNK):
        total += float(np.dot(a[i : i + _CHUNK].astype(np.float64), b[i : i + _CHUNK]))
    return total


def _sumsq(a) -> float:
    return dot(a, a)


def _nan_if_inf(x: float) -> float:
    return x if math.isfinite(x) else math.nan


# ---- norms, distribution, flow, health -----------------------------------------------


def grad_norms(grads) -> tuple[float, dict]:
    """(‖g‖₂ over all parameters, {name: ‖g_name‖₂})."""
    sq = {name: _sumsq(g) for name, g in grads.items()}
    return math.sqrt(sum(sq.values())), {name: math.sqrt(s) for name, s in sq.items()}


def grad_distribution(grads, edges=DEFAULT_LOG10_EDGES) -> dict:
    """Statistics of all gradient elements together.

    mean, std (population, ddof=0), min, max over the finite elements; sparsity the
    fraction of elements exactly 0; nonfinite the count of nan/inf elements; hist a
    Histogram of log10|g| over the finite non-zero elements, with fixed `edges`
    (out-of-range values counted in the first/last bin).
    """
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.zeros(edges.size - 1, dtype=np.int64)
    n = zeros = nonfinite = 0
    s = ss = 0.0
    lo, hi = math.inf, -math.inf
    for g in grads.values():
        g = _flat(g)
        for i in range(0, g.size, _CHUNK):
            c = g[i : i + _CHUNK].astype(np.float64)
            finite = np.isfinite(c)
            if not finite.all():
                nonfinite += int(c.size - finite.sum())
                c = c[finite]
            if c.size == 0:
                continue
            n += c.size
            s += float(c.sum())
            ss += float(np.dot(c, c))
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
            nz = np.abs(c[c != 0])
            zeros += c.size - nz.size
            logs = np.clip(np.log10(nz), edges[0], edges[-1])
            counts += np.histogram(logs, bins=edges)[0]
    total = n + nonfinite
    mean = s / n if n else math.nan
    var = max(ss / n - mean * mean, 0.0) if n else math.nan
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "min": lo if n else math.nan,
        "max": hi if n else math.nan,
        "sparsity": zeros / total if total else math.nan,
        "nonfinite": nonfinite,
        "hist": Histogram(edges, counts),
    }


def grad_flow(grads) -> dict:
    """{name: mean |g_name|} in layer order: how much gradient reaches each layer."""
    out = {}
    for name, g in grads.items():
        g = _flat(g)
        total = sum(
            float(np.abs(g[i : i + _CHUNK], dtype=np.float64).sum())
            for i in range(0, g.size, _CHUNK)
        )
        out[name] = total / g.size if g.size else math.nan
    return out


def grad_health(grads, *, vanishing: float = 1e-7, exploding: float = 1e3) -> dict:
    """Flags layers whose gradient norm is below `vanishing` or above `exploding`, and
    counts non-finite elements.

    A layer with non-finite elements is counted under nonfinite, not exploding.
    healthy is 1 when nothing is flagged.
    """
    if not 0 <= vanishing < exploding:
        raise ValueError(f"need 0 <= vanishing < exploding, got {vanishing}, {exploding}")
    out = {"global_norm": 0.0, "nonfinite": 0, "vanishing": 0, "exploding": 0}
    flags = {}
    for name, g in grads.items():
        sq = _sumsq(g)  # float64: finite for any finite float32 layer, so only a layer
        bad = 0 if math.isfinite(sq) else int(np.size(g) - np.count_nonzero(np.isfinite(g)))
        if bad:  # (the elements are counted only then)
            out["nonfinite"] += bad
            flags[f"nonfinite/{name}"] = bad
            continue
        out["global_norm"] += sq
        norm = math.sqrt(sq)
        if norm < vanishing:
            out["vanishing"] += 1
            flags[f"vanishing/{name}"] = 1
        elif norm > exploding:
            out["exploding"] += 1
            flags[f"exploding/{name}"] = 1
    out["global_norm"] = (
        math.nan if out["nonfinite"] else _nan_if_inf(math.sqrt(out["global_norm"]))
    )
    out["healthy"] = int(not (out["nonfinite"] or out["vanishing"] or out["exploding"]))
    return {**out, **flags}


# ---- update, ranks, noise scale ------------------------------------------------------


def update_ratios(update, params) -> dict:
    """{name: ‖update_name‖ / ‖param_name‖}; nan where the parameter is all zeros."""
    out = {}
    for name, u in update.items():
        w = math.sqrt(_sumsq(params[name]))
        out[name] = math.sqrt(_sumsq(u)) / w if w > 0 else math.nan
    return out


def rank_cosine(rank_grads) -> tuple[np.ndarray, float]:
    """(C, mean): C[i, j] the cosine similarity of rank i's and rank j's whole gradients
    (ranks in ascending order), mean the average of C over pairs i < j (nan for 1 rank).
    A rank with a zero gradient has nan similarities."""
    ranks = sorted(rank_grads)
    k = len(ranks)
    gram = np.zeros((k, k))
    names = list(rank_grads[ranks[0]]) if ranks else []
    for name in names:
        layer = [_flat(rank_grads[r][name]) for r in ranks]
        for i in range(0, layer[0].size, _CHUNK):
            block = np.stack([g[i : i + _CHUNK] for g in layer]).astype(np.float64)
            gram += block @ block.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / np.outer(norms, norms)
    cos[~np.isfinite(cos)] = np.nan
    pairs = cos[np.triu_indices(k, 1)]
    return cos, float(pairs.mean()) if pairs.size else math.nan


def noise_scale_estimates(small_sq, big_sq, b_small, b_big) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from squared gradient norms at two batch sizes.

    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A: a
    gradient averaged over B examples has E|G_B|² = |G|² + tr(Σ)/B, so with
    small_sq = |G_small|² (B = b_small) and big_sq = |G_big|² (B = b_big > b_small):

        |G|²  ≈ (b_big |G_big|² - b_small |G_small|²) / (b_big - b_small)
        tr Σ  ≈ (|G_small|² - |G_big|²) / (1/b_small - 1/b_big)

    Either can come out negative on one step; smooth before taking a ratio (NoiseScale).
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def ema_window(weight: float, beta: float) -> float:
    """The effective window, in training steps, of an average with bias-correction
    weight `weight`: sum over the steps it spans of beta^age = weight / (1 - beta).
    It grows like the number of steps seen and levels off at 1 / (1 - beta)."""
    return weight / (1.0 - beta)


class NoiseScale:
    """The simple gradient noise scale B_simple = tr(Σ) / |G|², averaged over training steps.

    Each sample, |G_small|² is the mean over ranks of each rank's squared gradient norm
    (every rank's gradient is an independent estimate at B_small = per-rank batch), and
    |G_big|² that of the reduced gradient (B_big = B_small * ranks). The two unbiased
    estimates each go through an exponential moving average over *training steps* with
    decay `beta` per step, and B_simple is the ratio of the averages -- a ratio of
    noisy estimates would be biased and often negative.

    A sample taken `gap` steps after the previous one decays the averages as `gap`
    steps would (beta**gap) and enters with weight 1 - beta**gap: it stands for the
    steps since the last sample, so the result is the every-step average of the series
    each sample holds until the next. The bias correction (like Adam's moments, so the
    first steps are not pulled to 0) follows the same rule, and `window_steps` is the
    effective window in steps (`ema_window`): whether the analyzer saw every step or
    one in ten, the average spans what beta says. Successive calls without `step` are
    consecutive steps. A step with non-finite gradients is reported as nan and is a
    missing sample: it leaves the averages and the step count alone.

    `start` (HookContext.series_start) is the step the series counts from: a fresh
    NoiseScale that is handed a later start (its hook restarted: the averages of the
    steps before are gone) begins there, so its first sample counts for the steps since
    `start` only and `window_steps` counts from there, instead of that one sample
    standing for every step since step 0 with a full window.
    """

    def __init__(self, beta: float = 0.95):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.g2 = self.trace = self.weight = 0.0
        self.last_step = 0  # the step of the last sample folded in; 0: none yet

    def update(
        self, rank_grads, grads, b_small: int, step: int | None = None, start: int = 0
    ) -> dict:
        """Fold in the sample of `step`, the series counting from step `start`; the
        metrics of the `noise_scale` hook."""
        if len(rank_grads) < 2:
            raise ValueError(
                f"the noise scale needs the gradients of >= 2 ranks, got {len(rank_grads)}"
            )
        b_big = b_small * len(rank_grads)
        small_sq = sum(sum(_sumsq(g) for g in rg.values()) for rg in rank_grads.values())
        small_sq /= len(rank_grads)
        big_sq = sum(_sumsq(g) for g in grads.values())
        g2, trace = noise_scale_estimates(small_sq, big_sq, b_small, b_big)
        self.last_step = max(self.last_step, int(start))
        step = self.last_step + 1 if step is None else int(step)
        gap = max(step - self.last_step, 1)
        if math.isfinite(g2) and math.isfinite(trace):
            keep = self.beta**gap
            self.g2 = keep * self.g2 + (1 - keep) * g2
            self.trace = keep * self.trace + (1 - keep) * trace
            self.weight = keep * self.weight + (1 - keep)
            self.last_step = max(step, self.last_step)
        else:
            g2 = trace = small_sq = big_sq = math.nan
        return {
            "b_simple": self.b_simple,
            "g2": self.g2 / self.weight if self.weight else math.nan,
            "trace_sigma": self.trace / self.weight if self.weight else math.nan,
            "window_steps": ema_window(self.weight, self.beta),
            "gap": gap,
            "b_simple_step": trace / g2 if g2 > 0 else math.nan,
            "g2_step": g2,
            "trace_sigma_step": trace,
            "small_sq_step": small_sq,
            "big_sq_step": big_sq,
            "b_small": b_small,
            "b_big": b_big,
        }

    @property
    def b_simple(self) -> float:
        """tr(Σ)/|G|² of the smoothed estimates; nan until |G|² is positive."""
        return self.trace / self.g2 if self.g2 > 0 else math.nan


# ---- hook factories ------------------------------------------------------------------
# Each returns a fresh Hook (fresh state, for NoiseScale) so two runs never share one.


def grad_norm_hook(every: int = 1):
    @analyzer(every=every, name="grad_norm")
    def grad_norm(ctx):
        """Global and per-layer L2 norm of the reduced gradient."""
        total, per_layer = grad_norms(ctx.grads)
        return {
            "global": _nan_if_inf(total),
            "norm": {k: _nan_if_inf(v) for k, v in per_layer.items()},
        }

    return grad_norm


def grad_distribution_hook(every: int = 1, edges=DEFAULT_LOG10_EDGES):
    @analyzer(every=every, name="grad_distribution")
    def distribution(ctx):
        """mean/std/min/max/sparsity/non-finite count and a log10|g| histogram."""
        return grad_distribution(ctx.grads, edges)

    return distribution


def grad_flow_hook(every: int = 1):
    @analyzer(every=every, name="grad_flow")
    def flow(ctx):
        """Per-layer mean |g| of the reduced gradient, in layer order."""
        return {"flow": {k: _nan_if_inf(v) for k, v in grad_flow(ctx.grads).items()}}

    return flow


def grad_health_hook(every: int = 1, vanishing: float = 1e-7, exploding: float = 1e3):
    @analyzer(every=every, name="grad_health")
    def health(ctx):
        """Vanishing / exploding layers and non-finite counts of the reduced gradient."""
        return grad_health(ctx.grads, vanishing=vanishing, exploding=exploding)

    return health


def update_ratio_hook(every: int = 1):
    @analyzer(every=every, name="update_ratio")
    def update_ratio(ctx):
        """Per-layer |update| / |weight| (healthy training often sits near 1e-3)."""
        if ctx.update is None:
            return None
        ratios = {k: _nan_if_inf(v) for k, v in update_ratios(ctx.update, ctx.params).items()}
        values = np.array([v for v in ratios.values() if not math.isnan(v)])
        return {
            "ratio": ratios,
            "max": float(values.max()) if values.size else math.nan,
            "median": float(np.median(values)) if values.size else math.nan,
        }

    return update_ratio


def rank_cosine_hook(every: int = 1):
    @analyzer(every=every, name="rank_cosine")
    def cosine(ctx):
        """Pairwise cosine similarity of the ranks' own gradients (before reduction)."""
        if len(ctx.rank_grads) < 2:
            return None
        matrix, mean = rank_cosine(ctx.rank_grads)
        off = matrix[np.triu_indices(len(matrix), 1)]
        return {
            "matrix": matrix,
            "mean": mean,
            "min": float(np.nanmin(off)) if np.isfinite(off).any() else math.nan,
        }

    return cosine


def noise_scale_hook(every: int = 1, beta: float = 0.95):
    state = NoiseScale(beta)

    @analyzer(every=every, name="noise_scale")
    def noise_scale(ctx):
        """Gradient noise scale B_simple (McCandlish et al. 2018), averaged over steps."""
        if len(ctx.rank_grads) < 2:
            return None
        if ctx.batch_size is None:
            raise ValueError("noise_scale needs ctx.batch_size (examples per rank per step)")
        return state.update(
            ctx.rank_grads, ctx.grads, ctx.batch_size, ctx.step, start=ctx.series_start
        )

    return noise_scale


BUILTINS = {
    "grad_norm": grad_norm_hook,
    "grad_distribution": grad_distribution_hook,
    "grad_flow": grad_flow_hook,
    "grad_health": grad_health_hook,
    "update_ratio": update_ratio_hook,
    "rank_cosine": rank_cosine_hook,
    "noise_scale": noise_scale_hook,
}


def builtin_hooks(every: int = 1) -> list:
    """A fresh Hook of every built-in analysis, each sampling every `every` steps."""
    return [factory(every=every) for factory in BUILTINS.values()]
