"""Export scikit-learn's bundled handwritten digits to CSV (data nobody here wrote).

    python scripts/export_digits.py data/digits.csv [--eval-fraction 0.2]

The 1,797 8x8 images (UCI optdigits, shipped inside scikit-learn's wheel: no network)
become one row each: columns p0..p63 (pixel values 0..16) and `label` (0..9). Rows are
written in a fixed shuffled order (seed 0): the file's tail is then a fair held-out
split for `data.split = "tail"`, and scripts/bench_digits.py uses the same rows.
scikit-learn is a test/bench extra, never a runtime dependency of zerotrain.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

SHUFFLE_SEED = 0


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """(x (1797, 64) float, y (1797,) int) in the exported row order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(d.target))
    return d.data[order], d.target[order]


def export(path: Path) -> int:
    x, y = digits_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"p{i}" for i in range(x.shape[1])] + ["label"])
        for row, label in zip(x, y, strict=True):
            w.writerow([f"{v:g}" for v in row] + [int(label)])
    return len(y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the CSV file to write")
    args = ap.parse_args(argv)
    n = export(args.out)
    print(f"wrote {n} rows x 65 columns to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
