"""Real data nobody here wrote: scikit-learn's handwritten digits, trained three ways.

    python scripts/bench_digits.py [--ranks 2] [--mode zero2] [--seed 0]

scripts/export_digits.py writes the 1,797 8x8 images as CSV (shuffled once, seed 0);
the last 20 % of the rows (359) are held out. On the same rows and the same architecture
-- mlp_classifier's 64-1024-1024-10 ReLU MLP on the raw pixel values 0..16, batch 128 --
this trains:

    zerotrain   `zerotrain run mlp_classifier --set data.name=table --set data.path=CSV`
                (its pipeline as shipped: AdamW lr 1e-3, weight decay 0.01, warmup-cosine,
                300 steps, early stopping on held-out accuracy)
    sklearn     MLPClassifier(hidden_layer_sizes=(1024, 1024), solver="adam", the same
                batch and learning rate, as many epochs as zerotrain's steps make)
    torch       the same MLP, AdamW and schedule, 300 steps over per-epoch shuffles

and prints the held-out accuracy of each, a table, and one final JSON line. Needs the
test or bench extra (scikit-learn, torch).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_digits import digits_table, export  # noqa: E402

EVAL_FRACTION = 0.2
HIDDEN = (1024, 1024)
BATCH, STEPS, LR, WD, WARMUP, MIN_LR = 128, 300, 1e-3, 0.01, 20, 0.05


def split():
    x, y = digits_table()
    k = round(len(y) * EVAL_FRACTION)
    return x[:-k], y[:-k], x[-k:], y[-k:]


def run_zerotrain(csv_path: Path, work: Path, ranks: int, mode: str, seed: int) -> dict:
    run_dir = work / "zerotrain-run"
    cmd = [
        *(sys.executable, "-m", "pipelines.cli", "run", "mlp_classifier"),
        *("--set", "data.name=table", "--set", f"data.path={json.dumps(str(csv_path))}"),
        *("--ranks", str(ranks), "--mode", mode, "--seed", str(seed)),
        *("--run-dir", str(run_dir)),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "accuracy": summary["eval"]["accuracy"],
        "seconds": time.perf_counter() - t0,
        "steps": summary["steps"],
    }


def run_sklearn(xt, yt, xe, ye, seed: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    epochs = max(1, round(STEPS * BATCH / len(yt)))
    clf = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        solver="adam",
        batch_size=BATCH,
        learning_rate_init=LR,
        alpha=1e-4,
        max_iter=epochs,
        random_state=seed,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xt, yt)
    return {
        "accuracy": float(clf.score(xe, ye)),
        "seconds": time.perf_counter() - t0,
        "epochs": epochs,
    }


def run_torch(xt, yt, xe, ye, seed: int) -> dict:
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    sizes = [xt.shape[1], *HIDDEN, 10]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

    def lr_at(step):  # warmup_cosine as pipelines.optim computes it
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, STEPS - WARMUP)
        return MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    x = torch.tensor(xt, dtype=torch.float32)
    y = torch.tensor(yt, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    per_epoch = len(yt) // BATCH
    t0 = time.perf_counter()
    perm = None
    for step in range(STEPS):
        if step % per_epoch == 0:
            perm = torch.tensor(rng.permutation(len(yt)))
        idx = perm[(step % per_epoch) * BATCH : (step % per_epoch + 1) * BATCH]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        pred = model(torch.tensor(xe, dtype=torch.float32)).argmax(1).numpy()
    return {"accuracy": float((pred == ye).mean()), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--mode", default="ddp", choices=("ddp", "zero1", "zero2"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    xt, yt, xe, ye = split()
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        work = Path(tmp)
        csv_path = work / "digits.csv"
        export(csv_path)
        results = {
            "zerotrain": run_zerotrain(csv_path, work, args.ranks, args.mode, args.seed),
            "sklearn": run_sklearn(xt, yt, xe, ye, args.seed),
            "torch": run_torch(xt, yt, xe, ye, args.seed),
        }
    print(f"digits: {len(yt)} train rows, {len(ye)} held out; MLP 64-1024-1024-10")
    print(f"{'':<10} {'held-out accuracy':>18} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['accuracy']:>18.4f} {r['seconds']:>8.1f}")
    ours = results["zerotrain"]["accuracy"]
    gaps = {k: round(100 * (ours - results[k]["accuracy"]), 2) for k in ("sklearn", "torch")}
    print(
        json.dumps(
            {
                "bench": "digits",
                "train_rows": len(yt),
                "eval_rows": len(ye),
                **{f"{k}_accuracy": round(v["accuracy"], 4) for k, v in results.items()},
                "points_vs": gaps,
                "within_1_point": all(abs(g) <= 1.0 for g in gaps.values()),
                "at_least_0.95": ours >= 0.95,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
