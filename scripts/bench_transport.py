"""Benchmark the wire: ring collectives vs gloo and raw pyzmq, codec overhead, latency.

    python scripts/bench_transport.py            # full run (a few minutes on 2 cores)
    python scripts/bench_transport.py --quick    # 1M floats, N = 2 only

Every measurement runs in freshly spawned processes (never forked) talking over ipc://
(gloo uses tcp loopback, its only transport). The ring runs on both of its wires:
*lanes* (shared memory, the default for ipc://) and *frames* (ZeroMQ frames, what tcp://
gets). Prints tables, then one JSON line with every figure.

Bus bandwidth as in nccl-tests: all-reduce 2(N-1)/N * bytes / time, reduce-scatter and
all-gather (N-1)/N * bytes / time, where bytes is the whole array. A time is the median
over repetitions of the slowest rank's time (each repetition starts after a barrier);
ring wires and gloo take turns for three rounds, so load drifts hit them alike.

Targets (issue 3): at 16M floats, all-reduce bus bandwidth >= 1.5x gloo's, reduce-scatter
and all-gather >= 2x; codec overhead < 5% of raw pyzmq throughput; round trip < 150 us
(checked for each layer: the trio wrapper, wrapper + codec, and a remote actors.call, which
is also checked as a ratio, <= 2.5x raw pyzmq's round trip: 150 us over the 60 us that
TRANSPORT.md measured for raw).
The machine has 2 cores: with N = 4 processes they are oversubscribed, and other work on
the machine moves every figure; compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {"1M": 1 << 20, "16M": 16 << 20}  # float32 elements
OPS = ("all_reduce", "reduce_scatter", "all_gather")
WIRES = ("lanes", "frames")
TARGET_RATIO = {"all_reduce": 1.5, "reduce_scatter": 2.0, "all_gather": 2.0}


def bus_factor(op: str, world: int) -> float:
    return (2 if op == "all_reduce" else 1) * (world - 1) / world


# ----------------------------------------------------------------------------------------
# Workers: each runs in its own spawned process and prints one JSON line
# ----------------------------------------------------------------------------------------


def worker_ring(args) -> dict:
    import trio

    from actors._collectives import Ring, shard_bounds
    from actors._transport import ipc_endpoint

    endpoints = [ipc_endpoint(f"ring-{r}", args.dir) for r in range(args.world)]
    options = dict(timeout=60, chunk_bytes=args.chunk, lanes=args.mode == "lanes")
    results: dict = {}

    async def main():
        with Ring(args.rank, args.world, endpoints, **options) as ring:
            step = 0
            for size_name in args.sizes.split(","):
                n = SIZES[size_name]
                x = np.ones(n, np.float32)
                start, stop = shard_bounds(n, args.world, args.rank)
                for op in OPS:
                    times = []
                    for rep in range(args.reps + 1):
                        step += 1
                        x[start:stop] = args.rank  # keeps all-reduce sums finite
                        await ring.barrier(step=step)
                        t0 = time.perf_counter()
                        await getattr(ring, op)(x, step=step)
                        if rep:  # the first is a warm-up
                            times.append(time.perf_counter() - t0)
                    results[f"{op}/{size_name}"] = times
            assert ring.stats()["stale_discarded"] == 0

    trio.run(main)
    return results


def worker_gloo(args) -> dict:
    import torch
    import torch.distributed as dist

    address = f"tcp://127.0.0.1:{args.port}"
    dist.init_process_group("gloo", init_method=address, rank=args.rank, world_size=args.world)
    # torch 2.13 renamed the single-tensor collectives; the old names warn on every call
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    results: dict = {}
    for size_name in args.sizes.split(","):
        n = SIZES[size_name]
        x = torch.ones(n)
        shard = n // args.world
        reduced, gathered = torch.empty(shard), torch.empty(shard * args.world)
        for op in OPS:
            times = []
            for rep in range(args.reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(x)
                elif op == "reduce_scatter":
                    reduce_scatter(reduced, x)
                else:
                    all_gather(gathered, x[:shard])
                if rep:
                    times.append(time.perf_counter() - t0)
            results[f"{op}/{size_name}"] = times
    dist.destroy_process_group()
    return results


def worker_stream(args) -> dict:
    """One PUSH/PULL stream, rank 0 to rank 1: raw pyzmq, raw pyzmq + codec, trio + codec.

    Messages are one tensor of the given size (a 64-byte header frame for raw pyzmq).
    """
    import zmq

    from actors._frames import Message, decode, encode

    n = SIZES[args.sizes]
    count = max(8, (768 << 20) // (4 * n))  # about 768 MiB per measurement
    endpoint = f"ipc://{args.dir}/stream"
    tensor = np.ones(n, np.float32)

    if args.mode == "trio":
        import trio

        from actors._transport import open_socket, wait_released

        async def main():
            if args.rank == 0:
                with open_socket("PUSH", connect=endpoint) as sock:
                    msg = Message("tensor", tensors=[tensor])
                    for _ in range(count):
                        await sock.send_message(msg)
                    # Released = written to the kernel; earlier messages went before it.
                    await wait_released(await sock.send_message(msg, track=True))
                return {}
            with open_socket("PULL", bind=endpoint) as sock:
                await sock.recv_message()  # includes connection set-up: not timed
                t0 = time.perf_counter()
                for _ in range(count):
                    _, msg = await sock.recv_message()
                    assert msg.tensors[0].size == n
                return {"gbps": count * tensor.nbytes / (time.perf_counter() - t0) / 1e9}

        return trio.run(main)

    ctx = zmq.Context()
    codec = args.mode == "codec"
    spent = 0.0  # seconds inside encode (sender) or decode (receiver)
    if args.rank == 0:
        sock = ctx.socket(zmq.PUSH)
        sock.connect(endpoint)
        for _ in range(count + 1):
            if codec:
                t = time.perf_counter()
                frames = encode(Message("tensor", tensors=[tensor]))
                spent += time.perf_counter() - t
                sock.send_multipart(frames, copy=False)
            else:
                sock.send_multipart([b"h" * 64, tensor], copy=False)
        sock.close(linger=-1)
        ctx.term()
        return {"codec_us": spent / (count + 1) * 1e6}
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    sock.recv_multipart(copy=False)
    t0 = time.perf_counter()
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        if codec:
            t = time.perf_counter()
            msg = decode(frames)
            spent += time.perf_counter() - t
            assert msg.tensors[0].size == n
            del msg  # freeing the last message's 4+ MiB is not decode's time
        else:
            assert np.frombuffer(frames[1].buffer, np.float32).size == n
    elapsed = time.perf_counter() - t0
    return {"gbps": count * tensor.nbytes / elapsed / 1e9, "codec_us": spent / count * 1e6}


def worker_pingpong(args) -> dict:
    """A small call: rank 1 sends a request, rank 0 (ROUTER) echoes it, round and round.

    raw: blocking pyzmq both sides, 64-byte frames. wrapper: TrioSocket both sides, the
    same 64-byte frames. trio: TrioSocket + the codec both sides, a Message with a small
    body (what an actor call costs on the wire).
    """
    import zmq

    endpoint = f"ipc://{args.dir}/pingpong"
    count, warmup = args.reps * 1000, 300
    if args.mode in ("trio", "wrapper"):
        import trio

        from actors._frames import Message
        from actors._transport import open_socket

        codec = args.mode == "trio"

        async def main():
            if args.rank == 0:
                with open_socket("ROUTER", bind=endpoint) as sock:
                    for _ in range(count + warmup):
                        if codec:
                            routing_id, msg = await sock.recv_message()
                            await sock.send_message(msg, routing_id)
                        else:
                            await sock.send_multipart(await sock.recv_multipart())
                    await trio.sleep(0.2)
                return {}
            with open_socket("DEALER", connect=endpoint) as sock:
                msg = Message("call", sender="bench", seq=1, body={"request": 1, "args": [1, 2]})
                payload = [b"x" * 64]
                for i in range(count + warmup):
                    if i == warmup:
                        t0 = time.perf_counter()
                    if codec:
                        await sock.send_message(msg)
                        await sock.recv_message()
                    else:
                        await sock.send_multipart(payload)
                        await sock.recv_multipart()
                return {"us": (time.perf_counter() - t0) / count * 1e6}

        return trio.run(main)

    ctx = zmq.Context()
    if args.rank == 0:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)
        for _ in range(count + warmup):
            sock.send_multipart(sock.recv_multipart())
        time.sleep(0.2)
        return {}
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    payload = b"x" * 64
    for i in range(count + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        sock.send(payload)
        sock.recv()
    return {"us": (time.perf_counter() - t0) / count * 1e6}


def worker_node_call(args) -> dict:
    """A remote ``actors.call`` between two nodes: rank 0 serves an echo actor, rank 1
    calls it (registry lookup, wire data, the node's reader and reply path included)."""
    import logging

    import trio

    import actors

    logging.getLogger("zerotrain").setLevel(logging.ERROR)  # "peer down" as rank 1 leaves

    class Echo(actors.Actor):
        async def handle_call(self, request, from_):
            return request

    count, warmup = args.reps * 1000, 300

    async def main():
        name = f"rank{args.rank}"
        async with actors.open_node(name, directory=args.dir) as node:
            if args.rank == 0:
                async with trio.open_nursery() as nursery:
                    await actors.spawn(nursery, Echo(), name="Echo")
                    await node.wait_peer("rank1")
                    await node.wait_peer("rank1", alive=False)  # until the caller leaves
                    nursery.cancel_scope.cancel()
                return {}
            with trio.fail_after(30):
                await node.wait_peer("rank0", names=("Echo",))
            request = {"request": 1, "args": [1, 2]}
            for i in range(count + warmup):
                if i == warmup:
                    t0 = time.perf_counter()
                await actors.call("Echo@rank0", request)
            return {"us": (time.perf_counter() - t0) / count * 1e6}

    return trio.run(main)


WORKERS = {
    "node_call": worker_node_call,
    "ring": worker_ring,
    "gloo": worker_gloo,
    "stream": worker_stream,
    "pingpong": worker_pingpong,
}


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(kind: str, world: int, **options) -> list[dict]:
    """Run `world` worker processes of one kind; return each rank's JSON result."""
    with tempfile.TemporaryDirectory(prefix="ztb-") as directory:
        os.chmod(directory, 0o700)
        argv = [sys.executable, os.path.abspath(__file__), "--worker", kind]
        argv += ["--world", str(world), "--dir", directory]
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        procs = [
            subprocess.Popen([*argv, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
            for r in range(world)
        ]
        try:
            outs = []
            for p in procs:
                out, _ = p.communicate(timeout=900)
                if p.returncode:
                    raise RuntimeError(f"{kind} worker failed with exit code {p.returncode}")
                outs.append(json.loads(out.strip().splitlines()[-1]))
            return outs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def slowest_rank_times(per_rank: list[dict]) -> dict[str, list[float]]:
    """Per key and repetition: the slowest rank's time."""
    return {
        key: [max(times) for times in zip(*(r[key] for r in per_rank), strict=True)]
        for key in per_rank[0]
    }


def row(cells, widths) -> str:
    return "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def collectives_table(args, sizes, worlds, have_torch) -> dict:
    widths = (16, 3, 6, 10, 10, 10, 10, 10, 10, 10, 10)
    print(
        row(
            ("collective", "N", "size", "lanes ms", "GB/s", "frames ms", "GB/s", "gloo ms",
             "GB/s", "lanes/gloo", "frames/gl"),
            widths,
        )
    )  # fmt: skip
    report = {}
    for world in worlds:
        # The implementations take turns for `rounds` rounds, so load from elsewhere on
        # the machine falls on all of them alike; a figure is the median of all rounds.
        common = dict(sizes=",".join(sizes), reps=args.reps)
        runs: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.rounds):
            for impl in (*WIRES, "gloo") if have_torch else WIRES:
                if impl == "gloo":
                    per_rank = spawn("gloo", world, port=free_port(), **common)
                else:
                    per_rank = spawn("ring", world, mode=impl, chunk=args.chunk, **common)
                for key, times in slowest_rank_times(per_rank).items():
                    runs.setdefault(impl, {}).setdefault(key, []).extend(times)
        ring = {wire: {k: statistics.median(v) for k, v in runs[wire].items()} for wire in WIRES}
        gloo = {k: statistics.median(v) for k, v in runs.get("gloo", {}).items()}
        for size in sizes:
            nbytes = SIZES[size] * 4
            for op in OPS:
                key = f"{op}/{size}"
                entry = {}
                cells = [op, world, size]
                for name, times in [*((w, ring[w]) for w in WIRES), ("gloo", gloo)]:
                    if key in times:
                        busbw = bus_factor(op, world) * nbytes / times[key]
                        entry[f"{name}_ms"] = times[key] * 1e3
                        entry[f"{name}_busbw_GBps"] = busbw / 1e9
                        cells += [f"{times[key] * 1e3:.1f}", f"{busbw / 1e9:.2f}"]
                    else:
                        cells += ["-", "-"]
                if gloo:
                    for wire in WIRES:
                        entry[f"{wire}_vs_gloo"] = entry["gloo_ms"] / entry[f"{wire}_ms"]
                    cells += [f"{entry['lanes_vs_gloo']:.2f}x", f"{entry['frames_vs_gloo']:.2f}x"]
                report[f"{key}/N{world}"] = entry
                print(row(cells, widths), flush=True)
    return report


def stream_table(sizes, rounds: int = 3) -> dict:
    """Throughput of each mode; the modes alternate for ``rounds`` rounds (median kept),
    so a burst of load from elsewhere on the machine does not land on one mode only.

    The codec's overhead is also measured directly: encode + decode time per message
    over raw pyzmq's time per message (end-to-end throughput is too noisy here to show
    a few percent).
    """
    widths = (26, 6, 8, 9)
    print("\n" + row(("PUSH/PULL stream, ipc", "size", "GB/s", "vs raw"), widths))
    labels = {"raw": "raw pyzmq", "codec": "pyzmq + codec", "trio": "trio + codec"}
    report = {}
    for size in sizes:
        runs = {mode: [] for mode in labels}
        codec_us = []
        for _ in range(rounds):
            for mode in labels:
                sender, receiver = spawn("stream", 2, sizes=size, mode=mode)
                runs[mode].append(receiver["gbps"])
                if mode == "codec":
                    codec_us.append(sender["codec_us"] + receiver["codec_us"])
        for mode, label in labels.items():
            gbps = report[f"{mode}/{size}"] = statistics.median(runs[mode])
            ratio = gbps / report[f"raw/{size}"]
            print(row((label, size, f"{gbps:.2f}", f"{ratio:.2f}x"), widths), flush=True)
        raw_us_per_message = SIZES[size] * 4 / (report[f"raw/{size}"] * 1e9) * 1e6
        overhead = statistics.median(codec_us) / raw_us_per_message
        report[f"codec_overhead/{size}"] = overhead
        print(
            f"  codec: encode + decode {statistics.median(codec_us):.1f} us per message = "
            f"{overhead:.2%} of raw pyzmq's {raw_us_per_message:.0f} us",
            flush=True,
        )
    return report


def latency_table(reps, rounds: int = 5) -> dict:
    """Round trips of a small message; the modes alternate for ``rounds`` rounds and the
    median is kept (one run per mode let a burst of load land on one mode only). The
    ratios to raw are medians of each round's ratio: a round's modes run back to back,
    so a slow spell of this shared machine scales them together."""
    widths = (26, 6, 8, 9)
    print("\n" + row(("round trip, small msg, ipc", "", "us", "vs raw"), widths))
    labels = {
        "raw": "raw pyzmq",
        "wrapper": "trio wrapper",
        "trio": "trio wrapper + codec",
        "node_call": "actors.call, remote",
    }
    runs = {mode: [] for mode in labels}
    for _ in range(rounds):
        for mode in labels:
            kind = "node_call" if mode == "node_call" else "pingpong"
            runs[mode].append(spawn(kind, 2, mode=mode, reps=reps)[1]["us"])
    us = {mode: statistics.median(values) for mode, values in runs.items()}
    vs_raw = {
        mode: statistics.median(v / r for v, r in zip(values, runs["raw"], strict=True))
        for mode, values in runs.items()
    }
    for mode, label in labels.items():
        print(row((label, "", f"{us[mode]:.1f}", f"{vs_raw[mode]:.2f}x"), widths))
    per_round = zip(runs["node_call"], runs["raw"], strict=True)
    print(f"  actors.call / raw per round: {[round(v / r, 2) for v, r in per_round]}")
    return {
        "raw_us": us["raw"],
        "trio_wrapper_us": us["wrapper"],
        "trio_codec_us": us["trio"],
        "node_call_us": us["node_call"],
        "node_call_vs_raw": vs_raw["node_call"],
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M floats, N = 2 only")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the collectives")
    parser.add_argument("--chunk", type=int, default=4 << 20, help="ring chunk_bytes")
    parser.add_argument(
        "--latency-only", type=int, metavar="ROUNDS", help="only the round-trip table"
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1M,16M", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="raw", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    if args.latency_only:
        report = latency_table(args.reps, args.latency_only)
        print(json.dumps({"round_trip": report, "load": os.getloadavg()}))
        return
    sizes = ["1M"] if args.quick else list(SIZES)
    worlds = [2] if args.quick else [2, 4]
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    started = time.perf_counter()
    report: dict = {"chunk_bytes": args.chunk, "reps": args.reps, "rounds": args.rounds}
    report["load_before"] = os.getloadavg()
    report["collectives"] = collectives_table(args, sizes, worlds, have_torch)
    report["stream_GBps"] = stream_table(sizes)
    report["round_trip"] = latency_table(args.reps)

    checks = {}
    if have_torch and "16M" in sizes:
        for op, ratio in TARGET_RATIO.items():
            checks[f"{op}_16M_N2_vs_gloo>={ratio}"] = (
                report["collectives"][f"{op}/16M/N2"]["lanes_vs_gloo"] >= ratio
            )
    for size in sizes:
        checks[f"codec_overhead_{size}<5%"] = report["stream_GBps"][f"codec_overhead/{size}"] < 0.05
    checks["round_trip_wrapper<150us"] = report["round_trip"]["trio_wrapper_us"] < 150
    checks["round_trip_wrapper_codec<150us"] = report["round_trip"]["trio_codec_us"] < 150
    checks["round_trip_actors_call<150us"] = report["round_trip"]["node_call_us"] < 150
    # The figures (150 us, with raw pyzmq at 60 us) as a ratio to raw measured in
    # this run: raw pyzmq itself ranges over 60-150 us between these shared machines.
    checks["round_trip_actors_call<=2.5x_raw"] = report["round_trip"]["node_call_vs_raw"] <= 2.5
    report["targets_met"] = checks
    report["load_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report))


if __name__ == "__main__":
    main()
