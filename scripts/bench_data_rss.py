"""What a 1 GB .npy costs each rank: resident memory against the batches it reads.

    python scripts/bench_data_rss.py                 # 1 GiB file, 2 ranks, 300 steps
    python scripts/bench_data_rss.py --gib 0.25 --steps 100

Writes a float32 .npy of (rows, 256) to /tmp (255 feature columns and a class label
column, 1 KiB a row; written in pieces through np.lib.format.open_memmap, so this script
never holds it), then trains mlp_classifier on it from the command line as a user would
(`zerotrain run mlp_classifier --ranks 2 --set data.name=table --set data.path=...`;
hidden [64], global batch 64). While the ranks train, it samples every rank process's
/proc/PID/status (VmRSS, RssAnon, RssFile) every 0.1 s.

What the numbers mean. RssAnon is the rank's own memory (model, optimizer, batches,
Python); RssFile is the file pages mapped into it: the .npy's pages a batch touched
(each fault maps the kernel's fault-around window, 64 KiB by default, around the row),
shared with the page cache and every other process, and dropped under memory pressure
instead of swapped. "Growth" is from the first sample at which the rank has trained a
step (metrics.jsonl has a line) to the largest later sample. The batch bytes are the
rank's part of a step's features (32 rows x 255 x 4 B), times two for the prefetched
next step. The file itself is 1 GiB: a loader that copied it into each rank would add
that to RssAnon.

The last line is JSON: file size, per rank baseline / peak / growth of VmRSS, RssAnon
and RssFile in MiB, the batch bytes, and the training steps seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COLUMNS = 256  # 255 features + the label
CHUNK_ROWS = 1 << 16


def write_npy(path: Path, rows: int, seed: int = 0) -> None:
    """(rows, 256) float32: features N(0, 1), the last column a label 0..9 that depends
    on the first ten features (something to learn), written CHUNK_ROWS at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, COLUMNS))
    rng = np.random.default_rng(seed)
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(rows, lo + CHUNK_ROWS)
        block = rng.standard_normal((hi - lo, COLUMNS), dtype=np.float32)
        block[:, -1] = np.argmax(block[:, :10], axis=1)
        out[lo:hi] = block
    out.flush()
    del out


def _status(pid: int) -> dict | None:
    """VmRSS, RssAnon, RssFile of a process in KiB (None once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rank_pids(root: int) -> dict[int, int]:
    """rank -> pid of the rank processes (pipelines.cluster.rank, ZEROTRAIN_RANK) that
    descend from `root` (other runs on the machine are not ours to measure)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"pipelines.cluster.rank" not in cmd:
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(entry)
        while pid > 1 and pid != root:
            pid = _parent(pid)
        if pid != root:
            continue
        for item in env:
            if item.startswith(b"ZEROTRAIN_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(entry)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default 1)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    ap.add_argument("--keep", action="store_true", help="keep the /tmp directory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zt-rss-"))
    try:
        rows = int(args.gib * (1 << 30)) // (COLUMNS * 4)
        data = work / "big.npy"
        t0 = time.perf_counter()
        write_npy(data, rows)
        size = data.stat().st_size
        print(
            f"wrote {data}: {rows:,} rows x {COLUMNS} float32, {size / 2**20:,.0f} MiB "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        run_dir = work / "run"
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "mlp_classifier"]
        cmd += ["--ranks", str(args.ranks), "--mode", "zero2", "--steps", str(args.steps)]
        cmd += ["--run-dir", str(run_dir)]
        for key, value in {
            "data.name": "table",
            "data.path": json.dumps(str(data)),
            "data.cache_dir": json.dumps(str(work / "cache")),
            "data.eval_fraction": "0.01",
            "model.hidden": "[64]",
            "train.batch_size": str(args.batch),
            "eval.every": str(args.steps),
            "eval.batch_size": "256",
            "checkpoint.every": str(args.steps),
        }.items():
            cmd += ["--set", f"{key}={value}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples: dict[int, list] = {}  # rank -> [(trained?, status)]
        pids: dict[int, set] = {}  # rank -> its process ids (more than one: restarted)
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None:
            trained = metrics.exists() and metrics.stat().st_size > 0
            for rank, pid in _rank_pids(proc.pid).items():
                st = _status(pid)
                pids.setdefault(rank, set()).add(pid)
                if st:
                    samples.setdefault(rank, []).append((trained, st))
            time.sleep(0.1)
        err = proc.stderr.read().decode()
        if proc.returncode != 0:
            sys.exit(f"zerotrain run failed ({proc.returncode}): {err.strip()[-500:]}")
        wall = time.perf_counter() - t0
        summary = json.loads((run_dir / "summary.json").read_text())
        batch_bytes = args.batch // args.ranks * (COLUMNS - 1) * 4
        per_rank = {}
        print(
            f"trained {summary['steps']} steps on {args.ranks} ranks in {wall:.1f}s "
            f"(launcher included); a rank's batch: {batch_bytes / 1024:.0f} KiB of features"
        )
        print(f"{'rank':>4} {'':>8} {'VmRSS':>9} {'RssAnon':>9} {'RssFile':>9}   (MiB)")
        for rank in sorted(samples):
            seen = samples[rank]
            after = [s for trained, s in seen if trained] or [s for _, s in seen]
            base, out = after[0], {}
            for key in ("VmRSS", "RssAnon", "RssFile"):
                peak = max(s[key] for s in after)
                out[key] = {
                    "baseline_mib": round(base[key] / 1024, 1),
                    "peak_mib": round(peak / 1024, 1),
                    "growth_mib": round((peak - base[key]) / 1024, 1),
                }
            per_rank[rank] = out
            for what in ("baseline_mib", "peak_mib", "growth_mib"):
                row = " ".join(f"{out[k][what]:>9.1f}" for k in ("VmRSS", "RssAnon", "RssFile"))
                print(f"{rank:>4} {what[:-4]:>8} {row}")
        print(
            json.dumps(
                {
                    "file_mib": round(size / 2**20, 1),
                    "ranks": args.ranks,
                    "steps": summary["steps"],
                    "rank_batch_bytes": batch_bytes,
                    "samples": {r: len(s) for r, s in samples.items()},
                    "processes_per_rank": {r: len(p) for r, p in pids.items()},
                    "per_rank": per_rank,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
