"""`zerotrain report RUN_DIR`: PNG plots of a run from its metrics.jsonl and hooks.jsonl.

Reads
    metrics.jsonl   one object per step: step, loss, lr[, grad_norm, samples_per_s]
                    (objects without step and loss — events — are skipped)
    hooks.jsonl     optional; the AnalyzerRunner's records: step, hook, metrics

and writes into RUN_DIR/report/ (or --out):

    loss_lr.png         loss, learning rate (and grad_norm when logged) against step
    gradient_flow.png   heatmap of log10 mean|g| per layer (rows, layer order) × step,
                        from `flow/<layer>` metrics (the grad_flow hook)
    layer_norms.png     per-layer gradient norms, from `norm/<layer>` (grad_norm hook)
    noise_scale.png     B_simple against step, from `b_simple` metrics (noise_scale hook),
                        with the run's global batch for comparison

A plot whose data is missing is not written. Any hook may feed the last three by using
the same metric names. A missing, empty or malformed run dir is one line on stderr and
exit status 2; matplotlib missing is one line and exit status 3 (it is the optional
extra `zerotrain[report]`). Drawing uses matplotlib's object API with the Agg canvas:
no pyplot, no global backend switch, no display needed.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

__all__ = [
    "EXIT_BAD_RUN_DIR",
    "EXIT_NO_MATPLOTLIB",
    "MissingDependency",
    "ReportError",
    "load_run",
    "main_report",
    "read_jsonl",
    "render_report",
]

EXIT_BAD_RUN_DIR = 2
EXIT_NO_MATPLOTLIB = 3


class ReportError(Exception):
    """The run dir cannot be reported on; the message is one line saying why."""


class MissingDependency(ReportError):
    """matplotlib is not installed."""


# ---- reading -------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; ReportError naming file:line for a bad line.

    An unterminated last line is dropped silently: it is what a run killed mid-write
    leaves behind, not a malformed file.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: a torn write
                break
            raise ReportError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, got {line[:60]!r}")
        records.append(record)
    return records


def _num(x):
    return math.nan if x is None else float(x)


def load_run(run_dir) -> tuple[list[dict], list[dict]]:
    """(training rows of metrics.jsonl, hook records of hooks.jsonl); ReportError if unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run dir {run_dir} does not exist or is not a directory")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl (is it a zerotrain run dir?)")
    rows = []
    for record in read_jsonl(metrics_path):
        if "step" in record and "loss" in record:
            try:
                int(record["step"]), _num(record["loss"]), _num(record.get("lr"))
            except (TypeError, ValueError):
                raise ReportError(
                    f"{metrics_path}: step {record.get('step')!r}: step, loss and lr must be "
                    f"numbers, got {record!r:.120}"
                ) from None
            rows.append(record)
    if not rows:
        raise ReportError(f"{metrics_path} has no records with 'step' and 'loss'")
    hooks_path = run_dir / "hooks.jsonl"
    hooks = []
    if hooks_path.is_file():
        hooks = [
            r
            for r in read_jsonl(hooks_path)
            if isinstance(r.get("metrics"), dict) and "step" in r and "hook" in r
        ]
    return rows, hooks


def _series(records, prefix):
    """{hook: (steps, names, matrix[name, step])} for metrics named prefix + name."""
    out = {}
    for record in sorted(records, key=lambda r: r["step"]):
        found = {k[len(prefix) :]: v for k, v in record["metrics"].items() if k.startswith(prefix)}
        found = {k: v for k, v in found.items() if v is None or isinstance(v, int | float)}
        if found:
            steps, table = out.setdefault(record["hook"], ([], {}))
            steps.append(record["step"])
            for name, value in found.items():
                table.setdefault(name, {})[len(steps) - 1] = _num(value)
    result = {}
    for hook, (steps, table) in out.items():
        matrix = np.full((len(table), len(steps)), np.nan)
        for i, column in enumerate(table.values()):
            for j, value in column.items():
                matrix[i, j] = value
        result[hook] = (np.array(steps), list(table), matrix)
    return result


# ---- drawing -------------------------------------------------------------------------


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "matplotlib is not installed; install it with: pip install 'zerotrain[report]'"
        ) from None


def _figure(rows=1, height=3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    return fig, axes


def _save(fig, path, written):
    fig.savefig(path, dpi=100)
    written.append(path)


def _plot_loss_lr(rows, out, written):
    steps = np.array([int(r["step"]) for r in rows])
    panels = [("loss", "loss"), ("lr", "learning rate")]
    if any(r.get("grad_norm") is not None for r in rows):
        panels.append(("grad_norm", "gradient norm (before clipping)"))
    fig, axes = _figure(len(panels), height=2.6)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(steps, [_num(r.get(key)) for r in rows], lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("training")
    axes[-1].set_xlabel("step")
    _save(fig, out / "loss_lr.png", written)


def _pick(series, preferred):
    return series.get(preferred) or next(iter(series.values()))


def _plot_flow(hooks, out, written):
    series = _series(hooks, "flow/")
    if not series:
        return
    steps, names, matrix = _pick(series, "grad_flow")
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(matrix)
    logs[~np.isfinite(logs)] = np.nan
    fig, (ax,) = _figure(height=max(3.0, 0.22 * len(names) + 1.5))
    image = ax.imshow(
        np.ma.masked_invalid(logs),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(names)), names if len(names) <= 60 else [""] * len(names))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("step")
    ax.set_title("gradient flow: log10 mean |g| per layer")
    fig.colorbar(image, ax=ax, label="log10 mean |g|")
    _save(fig, out / "gradient_flow.png", written)


def _plot_norms(hooks, out, written):
    series = _series(hooks, "norm/")
    if not series:
        return
    hook = "grad_norm" if "grad_norm" in series else next(iter(series))
    steps, names, matrix = series[hook]
    fig, (ax,) = _figure(height=4.5)
    colours = _colours(len(names))
    for i, name in enumerate(names):
        ax.plot(steps, matrix[i], lw=1, color=colours[i], label=name)
    total = [(r["step"], _num(r["metrics"].get("global"))) for r in hooks if r["hook"] == hook]
    if total and any("global" in r["metrics"] for r in hooks if r["hook"] == hook):
        total.sort()
        ax.plot(*zip(*total, strict=True), lw=2, color="black", label="global")
    if np.nanmin(matrix, initial=np.inf) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("per-layer gradient norms")
    ax.grid(alpha=0.3)
    if len(names) <= 24:
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, out / "layer_norms.png", written)


def _plot_noise_scale(hooks, out, written):
    by_hook = {}
    for r in sorted(hooks, key=lambda r: r["step"]):
        value = r["metrics"].get("b_simple", "absent")
        if value is None or isinstance(value, int | float):  # None: nan, e.g. early steps
            by_hook.setdefault(r["hook"], []).append((r["step"], _num(value), r["metrics"]))
    values = np.array([v for rs in by_hook.values() for _, v, _ in rs])
    if not np.isfinite(values).any():
        return
    fig, (ax,) = _figure(height=4)
    for hook, records in by_hook.items():
        ax.plot([s for s, _, _ in records], [v for _, v, _ in records], label=hook)
        b_big = records[-1][2].get("b_big")
        if isinstance(b_big, int | float):
            ax.axhline(b_big, color="grey", ls="--", lw=1, label=f"global batch ({b_big:g})")
    if np.nanmin(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Σ) / |G|²")
    ax.set_title("gradient noise scale (≈ critical batch size)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out / "noise_scale.png", written)


def _colours(n):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# ---- entry points --------------------------------------------------------------------


def render_report(run_dir, out_dir=None) -> list[Path]:
    """Write the report's PNGs for `run_dir`; their paths. ReportError if it cannot."""
    rows, hooks = load_run(run_dir)
    _require_matplotlib()  # before making the out dir, so a failure leaves nothing behind
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    _plot_loss_lr(rows, out, written)
    _plot_flow(hooks, out, written)
    _plot_norms(hooks, out, written)
    _plot_noise_scale(hooks, out, written)
    return written


def main_report(argv=None) -> int:
    """The `zerotrain report` subcommand: render, print the PNG paths; exit status."""
    parser = argparse.ArgumentParser(
        prog="zerotrain report", description="Render PNG plots of a run's metrics and hooks."
    )
    parser.add_argument("run_dir", help="the run's directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        for path in render_report(args.run_dir, args.out):
            print(path)
    except (MissingDependency, ReportError) as exc:
        print(f"zerotrain report: {exc}", file=sys.stderr)
        return EXIT_NO_MATPLOTLIB if isinstance(exc, MissingDependency) else EXIT_BAD_RUN_DIR
    return 0


if __name__ == "__main__":
    sys.exit(main_report())
