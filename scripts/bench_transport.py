"""Benchmark the wire: ring collectives vs gloo and raw pyzmq, codec overhead, latency.

    python scripts/bench_transport.py            # full run (about a minute or two)
    python scripts/bench_transport.py --quick    # 1M floats, N = 2 only

Every measurement runs in freshly spawned processes (never forked) talking over ipc://
(gloo uses tcp loopback, its only transport). Prints a table, then one JSON line with
every figure. Bus bandwidth as in nccl-tests: all-reduce 2(N-1)/N * bytes / time,
reduce-scatter and all-gather (N-1)/N * bytes / time, where bytes is the full array.
Times are the median over repetitions of the slowest rank's time.

Targets (issue 3): at 16M floats all-reduce bus bandwidth >= 1.5x gloo's, reduce-scatter
and all-gather >= 2x; codec overhead < 5% of raw pyzmq throughput; round trip < 150 us.
The machine has 2 cores; with N = 4 processes they are oversubscribed.
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

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"1M": 1 << 20, "16M": 16 << 20}
OPS = ("all_reduce", "reduce_scatter", "all_gather")


def bus_factor(op: str, world: int) -> float:
    return (2 if op == "all_reduce" else 1) * (world - 1) / world


# ----------------------------------------------------------------------------------------
# Workers (each runs in its own spawned process and prints one JSON line)
# ----------------------------------------------------------------------------------------


def worker_ring(args) -> dict:
    import trio

    from actors._collectives import Ring, shard_bounds
    from actors._transport import ipc_endpoint

    endpoints = [ipc_endpoint(f"ring-{r}", args.dir) for r in range(args.world)]
    results: dict = {}

    async def main():
        with Ring(args.rank, args.world, endpoints, timeout=60, chunk_bytes=args.chunk) as ring:
            step = 0
            for size_name in args.sizes.split(","):
                n = SIZES[size_name]
                x = np.full(n, args.rank + 1, np.float32)
                for op in OPS:
                    times = []
                    for rep in range(args.reps + 1):
                        step += 1
                        await ring.barrier(step=step)
                        if op == "all_gather":
                            a, b = shard_bounds(n, args.world, args.rank)
                            x[a:b] = args.rank
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

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
    )
    results: dict = {}
    for size_name in args.sizes.split(","):
        n = SIZES[size_name]
        x = torch.ones(n)
        shard = n // args.world
        out_rs = torch.empty(shard)
        out_ag = torch.empty(shard * args.world)
        for op in OPS:
            times = []
            for rep in range(args.reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(x)
                elif op == "reduce_scatter":
                    dist.reduce_scatter_tensor(out_rs, x)
                else:
                    dist.all_gather_into_tensor(out_ag, x[:shard])
                if rep:
                    times.append(time.perf_counter() - t0)
            results[f"{op}/{size_name}"] = times
    dist.destroy_process_group()
    return results


def worker_stream(args) -> dict:
    """One direction of a PUSH/PULL stream: raw pyzmq, raw + codec, or trio + codec."""
    import zmq

    from actors._frames import Message, decode, encode

    n = SIZES[args.sizes]
    count = max(8, (512 << 20) // (4 * n))  # about 512 MiB per measurement
    endpoint = f"ipc://{args.dir}/stream"
    tensor = np.ones(n, np.float32)
    header = b"h" * 64

    if args.mode == "trio":
        import trio

        from actors._transport import open_socket

        async def main():
            if args.rank == 0:
                sock = open_socket("PUSH", connect=endpoint)
                msg = Message("tensor", tensors=[tensor])
                for _ in range(count + 1):
                    await sock.send_message(msg)
                await trio.sleep(0.5)
                return {}
            sock = open_socket("PULL", bind=endpoint)
            await sock.recv_message()  # the first message includes connection set-up
            t0 = time.perf_counter()
            for _ in range(count):
                _, msg = await sock.recv_message()
                assert msg.tensors[0].size == n
            return {"gbps": count * tensor.nbytes / (time.perf_counter() - t0) / 1e9}

        return trio.run(main)

    ctx = zmq.Context()
    codec = args.mode == "codec"
    if args.rank == 0:
        sock = ctx.socket(zmq.PUSH)
        sock.connect(endpoint)
        for _ in range(count + 1):
            if codec:
                sock.send_multipart(encode(Message("tensor", tensors=[tensor])), copy=False)
            else:
                sock.send_multipart([header, tensor], copy=False)
        time.sleep(0.5)
        return {}
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    sock.recv_multipart(copy=False)
    t0 = time.perf_counter()
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        if codec:
            assert decode(frames).tensors[0].size == n
        else:
            assert np.frombuffer(frames[1].buffer, np.float32).size == n
    return {"gbps": count * tensor.nbytes / (time.perf_counter() - t0) / 1e9}


def worker_pingpong(args) -> dict:
    """A small request/reply: rank 0 echoes (ROUTER), rank 1 calls (DEALER)."""
    import zmq

    endpoint = f"ipc://{args.dir}/pingpong"
    count = args.reps * 1000
    if args.mode == "trio":
        import trio

        from actors._frames import Message
        from actors._transport import open_socket

        async def main():
            if args.rank == 0:
                sock = open_socket("ROUTER", bind=endpoint)
                for _ in range(count + 200):
                    routing_id, msg = await sock.recv_message()
                    await sock.send_message(msg, routing_id)
                await trio.sleep(0.2)
                return {}
            sock = open_socket("DEALER", connect=endpoint)
            msg = Message("ping", sender="bench", body={"request": 1, "args": [1, 2, 3]})
            for i in range(count + 200):
                if i == 200:
                    t0 = time.perf_counter()
                await sock.send_message(msg)
                await sock.recv_message()
            return {"us": (time.perf_counter() - t0) / count * 1e6}

        return trio.run(main)

    ctx = zmq.Context()
    payload = b"x" * 64
    if args.rank == 0:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)
        for _ in range(count + 200):
            sock.send_multipart(sock.recv_multipart())
        time.sleep(0.2)
        return {}
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    for i in range(count + 200):
        if i == 200:
            t0 = time.perf_counter()
        sock.send(payload)
        sock.recv()
    return {"us": (time.perf_counter() - t0) / count * 1e6}


WORKERS = {
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
        base = [sys.executable, os.path.abspath(__file__), "--worker", kind]
        base += ["--world", str(world), "--dir", directory]
        for key, value in options.items():
            base += [f"--{key}", str(value)]
        procs = [
            subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, text=True)
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


def collective_times(per_rank: list[dict]) -> dict[str, float]:
    """Median over repetitions of the slowest rank's time."""
    slowest = {
        key: [max(reps) for reps in zip(*(r[key] for r in per_rank), strict=True)]
        for key in per_rank[0]
    }
    return {key: statistics.median(times) for key, times in slowest.items()}


STREAM_MODES = (("raw", "raw pyzmq"), ("codec", "pyzmq + codec"), ("trio", "trio + codec"))


def table_row(cells) -> str:
    widths = (16, 3, 6, 10, 11, 10, 11, 11)
    return "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, w) in enumerate(zip(cells, widths, strict=False))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M floats, N = 2 only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1 << 20, help="ring chunk bytes")
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

    sizes = ["1M"] if args.quick else list(SIZES)
    worlds = [2] if args.quick else [2, 4]
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    report: dict = {"chunk_bytes": args.chunk, "reps": args.reps, "collectives": {}}

    columns = (
        "collective",
        "N",
        "size",
        "ring ms",
        "ring GB/s",
        "gloo ms",
        "gloo GB/s",
        "ring/gloo",
    )
    print(table_row(columns))
    for world in worlds:
        ring = collective_times(
            spawn("ring", world, sizes=",".join(sizes), reps=args.reps, chunk=args.chunk)
        )
        gloo = {}
        if have_torch:
            gloo = collective_times(
                spawn("gloo", world, sizes=",".join(sizes), reps=args.reps, port=free_port())
            )
        for size in sizes:
            nbytes = SIZES[size] * 4
            for op in OPS:
                key = f"{op}/{size}"
                row = {
                    "ring_s": ring[key],
                    "ring_busbw": bus_factor(op, world) * nbytes / ring[key],
                }
                cells = [
                    op,
                    world,
                    size,
                    f"{ring[key] * 1e3:.1f}",
                    f"{row['ring_busbw'] / 1e9:.2f}",
                ]
                if key in gloo:
                    row["gloo_s"] = gloo[key]
                    row["gloo_busbw"] = bus_factor(op, world) * nbytes / gloo[key]
                    row["ratio"] = row["ring_busbw"] / row["gloo_busbw"]
                    cells += [f"{gloo[key] * 1e3:.1f}", f"{row['gloo_busbw'] / 1e9:.2f}"]
                    cells.append(f"{row['ratio']:.2f}x")
                report["collectives"][f"{key}/N{world}"] = row
                print(table_row(cells), flush=True)

    print(f"\n{'stream (PUSH/PULL, ipc)':<26}{'size':>6}{'GB/s':>8}{'vs raw':>9}")
    report["stream"] = {}
    for size in sizes:
        raw = spawn("stream", 2, sizes=size, mode="raw")[1]["gbps"]
        for mode, label in STREAM_MODES:
            gbps = raw if mode == "raw" else spawn("stream", 2, sizes=size, mode=mode)[1]["gbps"]
            report["stream"][f"{mode}/{size}"] = gbps
            print(f"{label:<26}{size:>6}{gbps:>8.2f}{gbps / raw:>8.2f}x", flush=True)
        for world in worlds:
            key = f"all_reduce/{size}/N{world}"
            link = report["collectives"][key]["ring_busbw"] / (raw * 1e9)
            report["collectives"][key]["busbw_vs_raw_link"] = link

    print(f"\n{'round trip (64 B, ipc)':<26}{'us':>8}{'vs raw':>9}")
    raw_us = spawn("pingpong", 2, mode="raw", reps=args.reps)[1]["us"]
    trio_us = spawn("pingpong", 2, mode="trio", reps=args.reps)[1]["us"]
    report["round_trip_us"] = {"raw": raw_us, "trio": trio_us}
    print(f"{'raw pyzmq':<26}{raw_us:>8.1f}{1:>8.2f}x")
    print(f"{'trio + codec':<26}{trio_us:>8.1f}{trio_us / raw_us:>8.2f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
