"""Evaluation metrics on a held-out split, and early stopping.

Per model kind, what `evaluate(model, dataset, ...)` can report (config eval.metrics):

    classifier  loss, accuracy, precision, recall, macro_f1   (macro averages over classes)
    language    loss (mean per-token cross-entropy, nats), perplexity = exp(loss),
                accuracy (next-character)
    regression  loss, mse, mae, r2 (1 - SSE / SST, SST about the split's own mean)
    triplet     loss, accuracy (share of triplets with d(a, p) < d(a, n))

Metrics accumulate over batches (a confusion matrix, sums), so the numbers are those of
the whole split, not averages of per-batch numbers.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EarlyStopping", "MetricAccumulator", "evaluate", "is_better", "model_kind"]

_KIND = {
    "mlp_classifier": "classifier",
    "char_transformer": "language",
    "mlp_regressor": "regression",
    "triplet_embedder": "triplet",
}


KINDS = ("classifier", "language", "regression", "triplet")


def model_kind(model) -> str:
    """The metric family of a model: its `kind` attribute (a model from a file says
    which it is), else the kind of its registered name."""
    kind = getattr(model, "kind", None) or _KIND.get(model.name)
    if kind not in KINDS:
        raise ValueError(
            f"model {model.name!r}: expected a kind of {', '.join(KINDS)}, got {kind!r}"
        )
    return kind


class MetricAccumulator:
    """Sums over eval batches for one model kind; `result()` gives every metric."""

    def __init__(self, model_name: str, n_classes: int = 0):
        """`model_name`: a registered model's name or a kind (KINDS)."""
        self.kind = model_name if model_name in KINDS else _KIND[model_name]
        self.loss_sum = 0.0
        self.count = 0
        self.confusion = np.zeros((n_classes, n_classes), np.int64) if n_classes else None
        self.correct = 0
        self.sse = self.sae = self.y_sum = self.y_sq = 0.0

    def add(self, out: dict, batch: dict) -> None:
        """`out` is model.evaluate(batch): {"loss", **raw outputs}."""
        k = self.kind
        if k == "classifier":
            y = batch["y"]
            pred = out["logits"].argmax(axis=1)
            np.add.at(self.confusion, (y, pred), 1)
            n = y.size
        elif k == "language":
            y = batch["y"].reshape(-1)
            pred = out["logits"].reshape(y.size, -1).argmax(axis=1)
            self.correct += int((pred == y).sum())
            n = y.size
        elif k == "regression":
            y = batch["y"].reshape(-1).astype(np.float64)
            p = out["predictions"].reshape(-1).astype(np.float64)
            self.sse += float(((p - y) ** 2).sum())
            self.sae += float(np.abs(p - y).sum())
            self.y_sum += float(y.sum())
            self.y_sq += float((y * y).sum())
            n = y.size
        else:
            a, p, q = (out[key].astype(np.float64) for key in ("anchor", "positive", "negative"))
            self.correct += int((((a - p) ** 2).sum(1) < ((a - q) ** 2).sum(1)).sum())
            n = a.shape[0]
        self.loss_sum += float(out["loss"]) * n
        self.count += n

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        res = {"loss": self.loss_sum / n}
        k = self.kind
        if k == "classifier":
            cm = self.confusion
            tp = np.diag(cm).astype(np.float64)
            predicted, actual = cm.sum(0), cm.sum(1)
            present = actual > 0  # classes absent from the split are left out of the mean
            prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
            rec = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
            f1 = np.divide(
                2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0
            )
            res.update(
                accuracy=float(tp.sum() / n),
                precision=float(prec[present].mean()) if present.any() else 0.0,
                recall=float(rec[present].mean()) if present.any() else 0.0,
                macro_f1=float(f1[present].mean()) if present.any() else 0.0,
            )
        elif k == "language":
            res.update(perplexity=math.exp(min(res["loss"], 700.0)), accuracy=self.correct / n)
        elif k == "regression":
            sst = self.y_sq - self.y_sum**2 / n
            res.update(
                mse=self.sse / n, mae=self.sae / n, r2=1.0 - self.sse / sst if sst > 0 else 0.0
            )
        else:
            res.update(accuracy=self.correct / n)
        return res


def evaluate(
    model, dataset, *, metrics=("loss",), batch_size=256, max_batches=0, loss_fn=None
) -> dict[str, float]:
    """The requested metrics of `model` over `dataset` (no dropout, no gradients).

    Walks `dataset.eval_indices()` in order (non-overlapping windows for the corpus).
    """
    acc = MetricAccumulator(model_kind(model), dataset.meta.get("n_classes", 0))
    idx = dataset.eval_indices()
    starts = range(0, idx.size, batch_size)
    if max_batches:
        starts = starts[:max_batches]
    for lo in starts:
        batch = dataset.take(idx[lo : lo + batch_size])
        acc.add(model.evaluate(batch, loss_fn), batch)
    full = acc.result()
    return {m: full[m] for m in metrics}


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """Stop after `patience` evaluations without an improvement of more than min_delta.

    patience = 0 never stops. `update(value)` returns True when training should stop.
    """

    def __init__(self, metric: str, patience: int, mode: str = "min", min_delta: float = 0.0):
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.bad = 0

    def update(self, value: float) -> bool:
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.best, self.bad = state.get("best"), int(state.get("bad", 0))
