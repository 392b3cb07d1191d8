"""data.name = "triplets": (anchor, positive, negative) rows drawn from a labelled table.

The table is read exactly as `data.name = "table"` reads it for classification (same
formats, features, target, eval split, standardisation, errors; see _table). Then
`n_train` (`n_eval` for the held-out split) triplets are drawn from that split's rows:
the anchor's class uniformly among the classes with at least two rows, the anchor and a
different row of its class as the positive, the negative a row of another class. The
draw is a pure function of (data.seed, split): the same table and seed give the same
triplets in every process. A triplet is three row indices; `take` gathers (and
standardises) only the rows a batch names, so a memory-mapped table stays mapped.

    anchor, positive, negative  (B, F) float32 -- the triplet_embedder's batch keys
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._files import DataError
from ._table import load_table

__all__ = ["TableTriplets", "draw_triplets", "load_triplets"]

# The purpose tag of the triplet draw: SeedSequence([data.seed, _DRAW, split]).
_DRAW = 0x7A1B
_SPLITS = {"train": 0, "eval": 1}
# The table's own options; the rest (n_train, n_eval) are the draw's.
_DRAW_KEYS = ("n_train", "n_eval")


def draw_triplets(rng: np.random.Generator, labels: np.ndarray, n: int, where: str):
    """(n, 3) int64 positions into `labels`: anchor and positive share a label (and are
    different positions), the negative's label differs. DataError when the labels allow
    no triplet (no class with two rows, or a single class)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(classes))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    anchorable = np.flatnonzero(counts >= 2)
    if len(classes) < 2 or anchorable.size == 0:
        raise DataError(
            f"{where}: triplets need a class with at least 2 rows and a second class; the "
            f"{len(labels)} rows have {len(classes)} class(es), the largest with "
            f"{int(counts.max()) if counts.size else 0} row(s)"
        )
    a_cls = anchorable[rng.integers(0, anchorable.size, size=n)]
    # the negative's class: any other class (offset 1..K-1 from the anchor's)
    n_cls = (a_cls + rng.integers(1, len(classes), size=n)) % len(classes)
    a = rng.integers(0, counts[a_cls])
    # positive: a different member of the anchor's class (offset 1..count-1)
    p = (a + rng.integers(1, counts[a_cls])) % counts[a_cls]
    neg = rng.integers(0, counts[n_cls])
    out = np.empty((n, 3), np.int64)
    out[:, 0] = order[starts[a_cls] + a]
    out[:, 1] = order[starts[a_cls] + p]
    out[:, 2] = order[starts[n_cls] + neg]
    return out


class TableTriplets:
    """Triplets of rows of a TableDataset split: take(idx) gathers anchor, positive and
    negative rows (standardised when the table is)."""

    def __init__(self, split: str, table, triplets: np.ndarray, meta: dict):
        self.name, self.split, self.meta = "triplets", split, meta
        self.table, self.triplets = table, triplets
        self.arrays = {"triplets": triplets}

    def __len__(self) -> int:
        return len(self.triplets)

    def eval_indices(self) -> np.ndarray:
        return np.arange(len(self))

    def take(self, idx) -> dict[str, np.ndarray]:
        rows = self.triplets[np.asarray(idx)]
        return {
            key: self.table.take(rows[:, j])["x"]
            for j, key in enumerate(("anchor", "positive", "negative"))
        }

    def __repr__(self) -> str:
        return f"<Dataset triplets/{self.split}: {len(self)} samples>"


def load_triplets(data_cfg, split: str) -> TableTriplets:
    opts = data_cfg.options
    table_opts = {k: v for k, v in opts.items() if k not in _DRAW_KEYS}
    table_opts["task"] = "classification"
    table = load_table(dataclasses.replace(data_cfg, name="table", options=table_opts), split)
    labels = np.asarray(table.y[table.rows])
    rng = np.random.default_rng(np.random.SeedSequence([data_cfg.seed, _DRAW, _SPLITS[split]]))
    n = opts["n_train" if split == "train" else "n_eval"]
    where = f"{opts['path']} ({split} rows)"
    triplets = draw_triplets(rng, labels, n, where)
    meta = dict(table.meta, n_triplets=n)
    meta.pop("task", None)
    meta.pop("n_classes", None)
    return TableTriplets(split, table, triplets, meta)
