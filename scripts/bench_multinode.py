"""Benchmark collectives between two hosts: two network namespaces on a veth pair
(scripts/netns_rig.py, root), the link capped with tc tbf.

    sudo python scripts/bench_multinode.py            # 1 Gbit/s and 100 Mbit/s caps
    sudo python scripts/bench_multinode.py --quick    # smaller arrays, fewer repetitions

Two ranks, one per namespace, all-reduce a float32 array over tcp between their 10.x
addresses (the ring's frames wire, as between hosts), with the fp32 wire and the bf16
one, against:

* raw pyzmq: each side PUSHes the same bytes to the other in messages of the ring's
  chunk size (blocking pyzmq, a sender thread, no trio, no header checks, no sums) --
  what the link and libzmq give; for the bf16 wire, half the bytes, as the ring sends;
* gloo: torch.distributed all_reduce over the same link (GLOO_SOCKET_IFNAME the veth
  end); skipped, saying so, when torch is missing.

A 2-rank all-reduce moves the whole array once each way per rank (half in the
reduce-scatter, half in the all-gather), so every figure here is "link bytes per
second" = bytes each rank sends / time; the ratio ring / raw is the share of the raw
link the collective reaches (issue 20's target: >= 0.80). A time is the median over
repetitions of the slower rank's time, each repetition after a barrier; ring, raw and
gloo take turns for `--rounds` rounds, so load drifts hit them alike. Array sizes follow
the rate (SIZES_AT), so every measurement moves a similar number of seconds of traffic.
The machine has 2 cores shared with other work: compare the ratios of one run.

Node loss (skipped with --no-node-loss): two node agents train char_lm (4 ranks, zero2,
40 steps, the link uncapped); once 12 steps are logged node 1's agent and ranks are
SIGKILLed (its process group), and as soon as node 0 reports its ranks down node 1 is
started again with the same arguments. Reported: seconds from the kill to node 0
seeing it, from node 1's restart to the next step logged (its interpreter's start-up
included), from the kill to that step, both agents' exit codes and the run's
params_sha256. The agents run in the two namespaces when the node transport takes
`--keys` (CURVE), else on 127.0.0.2 / 127.0.0.3 (plaintext tcp is refused between
other addresses); `where` says which. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(HERE))

RATES = ("1gbit", "100mbit")
SIZES = {"1M": 1 << 20, "4M": 4 << 20, "16M": 16 << 20}  # float32 elements
SIZES_AT = {"1gbit": ["4M", "16M"], "100mbit": ["1M", "4M"]}  # any other rate: 1M, 4M
QUICK_SIZES = ["1M"]
CHUNK_BYTES = 4 << 20  # the Ring's default
TARGET = 0.80
RING_PORT, RAW_PORT, GLOO_PORT = 29610, 29620, 29630


# ----------------------------------------------------------------------------------------
# Workers: one per namespace, each prints one JSON line {size: [seconds per repetition]}
# ----------------------------------------------------------------------------------------


def worker_ring(args) -> dict:
    import trio

    from actors import Ring

    endpoints = [f"tcp://{args.addrs[r]}:{RING_PORT}" for r in range(2)]
    wire = "bf16" if args.wire == "bf16" else None
    results: dict = {}

    async def main():
        with Ring(args.rank, 2, endpoints, timeout=120.0, chunk_bytes=CHUNK_BYTES) as ring:
            step = 0
            for size in args.sizes:
                x = np.random.default_rng(args.rank).standard_normal(SIZES[size]).astype("f4")
                times = []
                for rep in range(args.reps + 1):
                    step += 1
                    await ring.barrier(step=step)
                    t0 = time.perf_counter()
                    await ring.all_reduce(x, step=step, wire=wire)
                    if rep:  # the first is a warm-up
                        times.append(time.perf_counter() - t0)
                    x *= 0.5  # keeps sums finite
                results[size] = times

    trio.run(main)
    return results


def ring_chunk_elements(n: int, itemsize: int, world: int = 2) -> int:
    """Elements per message of the Ring's n-element all-reduce (its _chunk_length: at
    most CHUNK_BYTES, about two chunks per segment, not under 64 KiB)."""
    segment = -(-n // world)
    return max(1, min(CHUNK_BYTES // itemsize, max(-(-segment // 2), (64 << 10) // itemsize)))


def worker_raw(args) -> dict:
    """Each side sends `bytes` to the other as messages of the ring's chunk size, and
    receives as much; a repetition ends when both directions are complete (the next
    repetition's barrier message is the acknowledgement)."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://{args.addrs[args.rank]}:{RAW_PORT}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://{args.addrs[1 - args.rank]}:{RAW_PORT}")
    itemsize = 2 if args.wire == "bf16" else 4
    results: dict = {}

    def barrier() -> None:
        push.send(b"b")
        assert pull.recv() == b"b"

    def send_all(chunks) -> None:
        for chunk in chunks:
            push.send(chunk, copy=False)

    for size in args.sizes:
        total = SIZES[size] * itemsize
        payload = np.ones(total, np.uint8)
        step = ring_chunk_elements(SIZES[size], itemsize) * itemsize
        chunks = [payload[a : a + step] for a in range(0, total, step)]
        times = []
        for rep in range(args.reps + 1):
            barrier()
            t0 = time.perf_counter()
            sender = threading.Thread(target=send_all, args=(chunks,), daemon=True)
            sender.start()
            got = 0
            while got < total:
                got += len(pull.recv(copy=False).buffer)
            sender.join()
            if rep:
                times.append(time.perf_counter() - t0)
        barrier()  # the other side has all of ours too
        results[size] = times
    push.close(linger=1000)
    pull.close(linger=0)
    ctx.term()
    return results


def worker_gloo(args) -> dict:
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return {"skipped": "torch is not installed"}
    os.environ["GLOO_SOCKET_IFNAME"] = args.device
    address = f"tcp://{args.addrs[0]}:{GLOO_PORT}"
    dist.init_process_group("gloo", init_method=address, rank=args.rank, world_size=2)
    results: dict = {}
    for size in args.sizes:
        x = torch.from_numpy(
            np.random.default_rng(args.rank).standard_normal(SIZES[size]).astype("f4")
        )
        times = []
        for rep in range(args.reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if rep:
                times.append(time.perf_counter() - t0)
            x *= 0.5
        results[size] = times
    dist.destroy_process_group()
    return results


WORKERS = {"ring": worker_ring, "raw": worker_raw, "gloo": worker_gloo}


# ----------------------------------------------------------------------------------------
# A node lost and started again
# ----------------------------------------------------------------------------------------

LOSS_RUN = ["run", "char_lm", "--ranks", "4", "--mode", "zero2", "--steps", "40", "--seed", "11"]


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _wait(what: str, ready, agents: dict, timeout: float = 300) -> float:
    """Poll `ready()` every 20 ms; the time it became true (SystemExit on a timeout or
    an agent that ended)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"node loss: no {what} within {timeout:g} s")
        ended = [name for name, p in agents.items() if p.poll() is not None]
        if ended:
            raise SystemExit(f"node loss: {', '.join(ended)} ended before {what}")
        time.sleep(0.02)
    return time.monotonic()


def node_loss(pair, work: Path) -> dict:
    """Kill node 1 past step 12, start it again once node 0 has seen it go: timings.
    In the namespaces with keys when the node transport takes them, else on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEROTRAIN_", "SLURM"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    keys = work / "keys"
    init = [*CLI, "keys", "init", str(keys), "--nodes", "2"]
    subprocess.run(init, env=env, check=True, stdout=subprocess.DEVNULL)
    netns = _lose_node_1(pair, work, env, ["--keys", str(keys)])
    return netns if netns is not None else _lose_node_1(None, work, env, [])


CLI = [sys.executable, "-m", "pipelines.cli"]


def _lose_node_1(pair, work: Path, env: dict, extra: list[str]) -> dict | None:
    """One node-loss run, its agents in `pair`'s namespaces (None: on 127.0.0.2 and
    127.0.0.3); None when node 0 refuses the keys (no CURVE on the node transport)."""
    where = "netns" if pair is not None else "loopback"
    run_dir, metrics = work / f"run-{where}", work / f"run-{where}" / "metrics.jsonl"
    addrs = (pair.addr(0), pair.addr(1)) if pair is not None else ("127.0.0.2", "127.0.0.3")
    common = [*LOSS_RUN, *extra, "--nodes", "2", "--master", f"{addrs[0]}:29640"]
    common += ["--run-dir", str(run_dir)]
    node1 = [*common, "--node-rank", "1", "--advertise-addr", addrs[1]]
    node0_err = work / f"{where}-node0.err"

    def start(host: int, args: list[str], name: str) -> subprocess.Popen:
        argv = [*CLI, *args] if pair is None else pair.argv(host, [*CLI, *args])
        err = open(work / f"{name}.err", "w")
        return subprocess.Popen(
            argv, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )

    agents = {
        "node1": start(1, node1, f"{where}-node1"),
        "node0": start(0, [*common, "--node-rank", "0"], f"{where}-node0"),
    }
    try:
        if pair is not None and _refuses_keys(agents, node0_err, metrics):
            agents["node0"].wait()
            return None
        _wait("12 steps", lambda: _lines(metrics) >= 12, agents)
        lost = agents.pop("node1")
        killed = time.monotonic()
        os.killpg(lost.pid, signal.SIGKILL)
        lost.wait()
        seen = _wait(
            "node 0 seeing node 1 down", lambda: "rank 2 is down" in node0_err.read_text(), agents
        )
        logged = _lines(metrics)
        back = time.monotonic()
        agents["node1"] = start(1, node1, f"{where}-node1-again")
        stepped = _wait("a step after node 1 is back", lambda: _lines(metrics) > logged, agents)
        codes = {name: p.wait(timeout=600) for name, p in agents.items()}
    finally:
        for p in agents.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    summary = run_dir / "summary.json"
    return {
        "where": where,
        "kill_to_seen_s": seen - killed,
        "back_to_next_step_s": stepped - back,
        "kill_to_next_step_s": stepped - killed,
        "exit_codes": codes,
        "params_sha256": json.loads(summary.read_text())["params_sha256"]
        if summary.exists()
        else None,
    }


def _refuses_keys(agents: dict, node0_err: Path, metrics: Path) -> bool:
    """Whether node 0 refused --keys (it says so in one line and exits), judged once it
    has either exited or logged a step."""
    while agents["node0"].poll() is None and _lines(metrics) == 0:
        if "not wired in yet" in node0_err.read_text():
            return True
        time.sleep(0.2)
    return "not wired in yet" in node0_err.read_text()


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def run_pair(pair, kind: str, wire: str, sizes: list[str], reps: int) -> dict:
    """Both workers of one measurement, one in each namespace: {size: [the slower
    rank's seconds per repetition]}, or {"skipped": why}."""
    procs = []
    for rank in range(2):
        argv = [
            sys.executable, __file__, "--worker", kind, "--rank", str(rank),
            "--addrs", pair.addr(0), pair.addr(1), "--device", pair.devices[rank],
            "--wire", wire, "--sizes", *sizes, "--reps", str(reps),
        ]  # fmt: skip
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path, TORCH_CPP_LOG_LEVEL="ERROR")
        procs.append(
            subprocess.Popen(pair.argv(rank, argv), stdout=subprocess.PIPE, text=True, env=env)
        )
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    if "skipped" in outs[0]:
        return outs[0]
    return {size: list(map(max, outs[0][size], outs[1][size])) for size in sizes}


def measure(pair, sizes: list[str], reps: int, rounds: int) -> dict:
    """{(kind, wire): {size: median seconds}} over `rounds` turns of every kind, or
    {("gloo", "fp32"): {"skipped": why}}."""
    kinds = [("gloo", "fp32"), ("ring", "fp32"), ("raw", "fp32"), ("ring", "bf16"), ("raw", "bf16")]
    times: dict = {k: {s: [] for s in sizes} for k in kinds}
    for _ in range(rounds):
        for kind, wire in kinds:
            if "skipped" in times[kind, wire]:
                continue
            got = run_pair(pair, kind, wire, sizes, reps)
            if "skipped" in got:
                times[kind, wire] = got
                continue
            for size in sizes:
                times[kind, wire][size] += got[size]
    return {
        k: v if "skipped" in v else {s: statistics.median(t) for s, t in v.items()}
        for k, v in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M floats, 2 reps, 1 round")
    parser.add_argument("--rates", nargs="+", default=list(RATES), help="tc tbf rates")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per round (3)")
    parser.add_argument("--rounds", type=int, default=None, help="turns of every kind (2)")
    parser.add_argument("--no-node-loss", action="store_true", help="skip the node-loss run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--addrs", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--wire", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    import netns_rig

    why = netns_rig.missing()
    if why is not None:
        raise SystemExit(f"bench_multinode: {why}")
    reps = args.reps or (2 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    figures: dict = {"elements": SIZES, "reps": reps, "rounds": rounds, "rates": {}}
    load_before = os.getloadavg()
    print(f"{'rate':>8} {'size':>4} {'wire':>5} {'ring MB/s':>10} {'raw MB/s':>9} "
          f"{'ring/raw':>8} {'gloo MB/s':>9} {'ring/gloo':>9} {'bf16 gain':>9}")  # fmt: skip
    with netns_rig.NetnsPair() as pair:
        for rate in args.rates:
            pair.set_rate(rate)
            per_rate: dict = {}
            sizes = QUICK_SIZES if args.quick else SIZES_AT.get(rate, ["1M", "4M"])
            medians = measure(pair, sizes, reps, rounds)
            gloo = medians["gloo", "fp32"]
            for wire in ("fp32", "bf16"):
                ring, raw = medians["ring", wire], medians["raw", wire]
                itemsize = 2 if wire == "bf16" else 4
                for size in sizes:
                    sent = SIZES[size] * itemsize  # link bytes each rank sends
                    row = {
                        "ring_s": ring[size],
                        "raw_s": raw[size],
                        "ring_MBps": sent / ring[size] / 1e6,
                        "raw_MBps": sent / raw[size] / 1e6,
                        "ring_over_raw": raw[size] / ring[size],
                    }
                    if "skipped" not in gloo:
                        row["gloo_s"] = gloo[size]
                        # gloo sends fp32: the same array's all-reduce, time against time
                        row["gloo_MBps"] = SIZES[size] * 4 / gloo[size] / 1e6
                        row["gloo_over_ring_time"] = gloo[size] / ring[size]
                    if wire == "bf16":
                        row["fp32_over_bf16_time"] = per_rate[f"{size}/fp32"]["ring_s"] / ring[size]
                    per_rate[f"{size}/{wire}"] = row
                    print(
                        f"{rate:>8} {size:>4} {wire:>5} {row['ring_MBps']:10.1f} "
                        f"{row['raw_MBps']:9.1f} {row['ring_over_raw']:8.2f} "
                        f"{row.get('gloo_MBps', float('nan')):9.1f} "
                        f"{row.get('gloo_over_ring_time', float('nan')):9.2f} "
                        f"{row.get('fp32_over_bf16_time', 1.0):9.2f}",
                        flush=True,
                    )
            if "skipped" in gloo:
                print(f"gloo skipped: {gloo['skipped']}")
                per_rate["gloo"] = gloo
            figures["rates"][rate] = per_rate
        if not args.no_node_loss:
            pair.set_rate(None)
            with tempfile.TemporaryDirectory() as work:
                loss = node_loss(pair, Path(work))
            figures["node_loss"] = loss
            print(
                f"node loss ({loss['where']}): seen {loss['kill_to_seen_s']:.2f} s after the "
                f"kill; next step {loss['back_to_next_step_s']:.2f} s after node 1 is back "
                f"({loss['kill_to_next_step_s']:.2f} s after the kill); exit codes "
                f"{loss['exit_codes']}"
            )
    left = [ns for ns in pair.names if ns in netns_rig.namespaces()]
    ratios = [
        row["ring_over_raw"]
        for r in figures["rates"].values()
        for k, row in r.items()
        if k != "gloo"
    ]
    figures["min_ring_over_raw"] = min(ratios)
    figures["target_ring_over_raw"] = TARGET
    figures["meets_target"] = min(ratios) >= TARGET
    figures["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    figures["namespaces_left"] = left
    print(
        f"ring/raw: min {min(ratios):.2f} (target >= {TARGET}); load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
