"""Hostile peers against a live run: what fuzzing every endpoint costs it (issue 21).

    python scripts/bench_fuzz.py                  # a clean run, then the same run fuzzed
    python scripts/bench_fuzz.py --attack RUNDIR  # only fuzz the run writing RUNDIR

The attacker is a same-host process with raw pyzmq sockets and no run token. It finds
the run's ipc directory from ``RUNDIR/plan.json`` (the ring endpoints live there, next
to the node endpoints ``cluster``, ``rank0``, ``rank1``) and, until the run ends or
``--seconds`` pass, opens DEALER connections to every socket file in it -- with random
routing ids, spoofed ones (``rank0``, ``cluster``) and a wrong PLAIN token -- and sends
random, mutated, spoofed, oversized and truncated messages: node headers with forged
senders and generations, ring chunk headers and acks with mutated fields, raw bytes.
Some connections are kept open and idle (an idle DEALER on a ring inbox used to steal
its acks), the rest dropped at once, and raw Unix-socket connections send garbage.

The benchmark trains mlp_classifier on 2 ranks (zero2) twice, clean and fuzzed, and
prints for each steps/s (from metrics.jsonl: the steps between the first and the last)
and the run's own CPU seconds per step (its processes' rusage), both ratios (target
>= 0.90), whether params_sha256 agree, restarts, and summary.json's admission counters;
then one JSON line. The attacker is paced (``--rate`` messages per second), and by
default runs on another CPU than the run (both runs, clean and fuzzed, on the first CPU,
the attacker on the last): on a shared CPU the attacker's own work takes the run's time,
which is not what the run spends on hostile traffic. The CPU-per-step ratio is that
spend whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

_RING_HEADER = struct.Struct("<4sBBBBiiqqqiiq")
_ACK = struct.Struct("<4sBBqq16sI")
_NODE_TYPES = ["hb", "call", "cast", "send", "stop", "stats", "reply", "busy", "ready",
               "monitor", "link", "watching", "demonitor", "exit", "down", "error"]  # fmt: skip
_BIG = [bytes(1 << 20), bytes(5 << 20)]  # made once: the attacker's CPU is the run's too
_ROLES = ["Trainer", "Checkpointer", "Optimizer", "Reducer", "DataLoader", "Coordinator"]


def _endpoints(run_dir: Path, deadline: float) -> tuple[Path, list[str]]:
    """The run's ipc directory and the socket files in it."""
    plan = run_dir / "plan.json"
    while time.monotonic() < deadline:
        try:
            ring = json.loads(plan.read_text())["endpoints"][0]
            directory = Path(ring[len("ipc://") :]).parent
            names = sorted(
                n for n in os.listdir(directory) if stat.S_ISSOCK(os.stat(directory / n).st_mode)
            )
            if {"cluster", "rank0", "rank1", "ring-0", "ring-1"} <= set(names):
                return directory, [f"ipc://{directory}/{name}" for name in names]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"no run endpoints appeared under {run_dir}")


def _node_message(rng: random.Random) -> list[bytes]:
    sender = rng.choice(["rank0", "rank1", "cluster", "analyzer", f"fz-{rng.randrange(1 << 30)}"])
    kind = rng.choice(_NODE_TYPES)
    body = {
        "to": rng.choice(_ROLES + [None, 7]),
        "msg": rng.choice([None, 1, "x", [], {"$r": "Nope", "f": {}}, {"$nd": 3}]),
        "request": rng.choice([None, "stats", {"$t": [1, 2]}]),
        "timeout": rng.choice([None, 1.0, -1.0, float("nan")]),
        "ref": rng.choice([[1, "rank0"], "x", None]),
        "endpoint": rng.choice(["ipc:///tmp/nowhere", "tcp://127.0.0.1:1", 5]),
        "names": rng.choice([["Trainer"], "x", [1]]),
        "at": rng.choice([None, rng.randrange(1 << 56), "x"]),
        "ok": rng.choice([True, False, None]),
    }
    keys = rng.sample(sorted(body), rng.randrange(len(body) + 1))
    header = {
        "v": rng.choice([1, 1, 1, 2]),
        "type": kind,
        "sender": sender,
        "generation": rng.randrange(1 << 56),
        "step": rng.randrange(1000),
        "seq": rng.randrange(1 << 20),
        "body": {k: body[k] for k in keys},
        "tensors": rng.choice([[], [{"dtype": "<f4", "shape": [4], "offset": 0}]]),
    }
    frames = [msgpack.packb(header)]
    if header["tensors"]:
        frames.append(os.urandom(rng.choice([0, 8, 16])))
    return frames


def _ring_message(rng: random.Random) -> list[bytes]:
    if rng.random() < 0.3:  # an ack, as the right neighbour would send it
        ack = _ACK.pack(b"ZTAK", 1, rng.choice([1, 2]), rng.randrange(3), rng.randrange(50),
                        os.urandom(16), rng.randrange(8))  # fmt: skip
        return [ack]
    header = _RING_HEADER.pack(
        b"ZTRG", 1, rng.choice([1, 2, 3]), rng.randrange(1, 6), rng.randrange(8),
        rng.randrange(2), rng.randrange(2), rng.randrange(3), rng.randrange(400),
        rng.randrange(50), rng.randrange(4), rng.randrange(8), rng.randrange(1 << 20),
    )  # fmt: skip
    return [header, os.urandom(rng.choice([0, 28, 4096]))]


def _mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    how = rng.randrange(6)
    if how == 0 and frames:  # truncated
        return [frames[0][: rng.randrange(len(frames[0]) + 1)]]
    if how == 1:  # flipped bytes
        raw = bytearray(frames[0])
        for _ in range(rng.randrange(1, 4)):
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return [bytes(raw), *frames[1:]]
    if how == 2:  # oversized (over the ring's 4 MiB frame limit, which drops the link)
        return [frames[0], rng.choice(_BIG)]
    if how == 3:  # many frames
        return frames + [b"x"] * rng.randrange(1, 40)
    if how == 4:  # random bytes
        return [os.urandom(rng.randrange(1, 200))]
    return frames


def _run_over(run_dir: Path, directory: Path) -> bool:
    """The run has ended: its summary is written, or its ipc directory is gone."""
    return (run_dir / "summary.json").exists() or not directory.exists()


def attack(
    run_dir: Path,
    seconds: float,
    seed: int,
    rate: float,
    until_exit: int | None = None,
    gate: tuple[Path, int, int] | None = None,
):
    """Fuzz the run writing ``run_dir`` until it ends (or process ``until_exit`` exits),
    for at most ``seconds``; return what was done, per endpoint. ``gate`` = (PATH,
    MESSAGES, CONNECTIONS): create PATH once that many messages were sent over that many
    connections (a run held at a step by ``wait:...,until=PATH`` chaos then trains on,
    so the attack's size does not depend on how fast the run is)."""
    rng = random.Random(seed)
    started = time.monotonic()
    deadline = started + seconds
    directory, endpoints = _endpoints(run_dir, deadline)
    ctx = zmq.Context()
    held: list[zmq.Socket] = []
    counts = {e.rsplit("/", 1)[1]: 0 for e in endpoints}
    stats = {"messages": 0, "connections": 0, "raw": 0, "held_open": 0, "stopped": "seconds"}
    stats["gate_opened"] = False
    wrong_token = os.urandom(16).hex().encode()
    try:
        while time.monotonic() < deadline:
            if (until_exit is not None and _exited(until_exit)) or _run_over(run_dir, directory):
                stats["stopped"] = "run ended"
                break
            if gate is not None and not stats["gate_opened"]:
                path, messages, connections = gate
                if stats["messages"] >= messages and stats["connections"] >= connections:
                    path.touch()
                    stats["gate_opened"] = True
            endpoint = rng.choice(endpoints)
            name = endpoint.rsplit("/", 1)[1]
            if rng.random() < 0.1:  # a raw Unix-socket connection sending garbage
                with socket.socket(socket.AF_UNIX) as raw:
                    try:
                        raw.connect(endpoint[len("ipc://") :])
                        raw.sendall(rng.choice([b"\xff" + os.urandom(60), os.urandom(9)]))
                    except OSError:
                        pass
                stats["raw"] += 1
                continue
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 64)
            sock.setsockopt(zmq.IMMEDIATE, 0)
            who = rng.choice([None, b"rank0", b"rank1", b"cluster", b"ring0", b"ring1"])
            if who is not None:
                sock.setsockopt(zmq.ROUTING_ID, who)
            if rng.random() < 0.3:  # credentials, but not the run's token
                sock.setsockopt(zmq.PLAIN_USERNAME, (who or b"rank1").decode().encode())
                sock.setsockopt(zmq.PLAIN_PASSWORD, wrong_token)
            sock.connect(endpoint)
            stats["connections"] += 1
            burst = rng.randrange(1, 40)
            for _ in range(burst):
                frames = _ring_message(rng) if name.startswith("ring") else _node_message(rng)
                try:
                    sock.send_multipart(_mutate(frames, rng), zmq.DONTWAIT, copy=False)
                except zmq.Again:
                    break
                counts[name] += 1
                stats["messages"] += 1
            if rng.random() < 0.3 and len(held) < 16:  # kept open, idle
                held.append(sock)
                stats["held_open"] += 1
            else:
                time.sleep(0.002)
                sock.close()
            if held and rng.random() < 0.05:
                held.pop(rng.randrange(len(held))).close()
            time.sleep(burst / rate)
    finally:
        for sock in held:
            sock.close()
        ctx.destroy(linger=0)
    used = resource.getrusage(resource.RUSAGE_SELF)
    stats["attacker_cpu_s"] = round(used.ru_utime + used.ru_stime, 2)
    stats["seconds"] = round(time.monotonic() - started, 2)
    return {**stats, "per_endpoint": counts}


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done != 0
    except ChildProcessError:
        return True


# ----------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants
    return used.ru_utime + used.ru_stime


def _train(run_dir: Path, steps: int, seed: int, fuzz: dict | None, cpus) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "mlp_classifier", "--ranks", "2",
           "--mode", "zero2", "--steps", str(steps), "--seed", str(seed),
           "--run-dir", str(run_dir)]  # fmt: skip
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus["run"]))
    cpu_before = _children_cpu_s()
    run = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=pin
    )
    done = None
    if fuzz is not None:
        if cpus is not None:  # the attacker's CPU is not the run's
            os.sched_setaffinity(0, cpus["attacker"])
        done = attack(run_dir, fuzz["seconds"], fuzz["seed"], fuzz["rate"], until_exit=run.pid)
    _, err = run.communicate(timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"run exited {run.returncode}: {err.strip().splitlines()[-3:]}")
    run_cpu_s = _children_cpu_s() - cpu_before  # the cluster process and its ranks
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [json.loads(line)["t"] for line in (run_dir / "metrics.jsonl").open()]
    rate = (len(times) - 1) / (times[-1] - times[0])
    return {
        "summary": summary,
        "steps_per_s": rate,
        "cpu_s_per_step": run_cpu_s / summary["steps"],
        "attack": done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", type=Path, help="only fuzz the run writing this run dir")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--open-gate",
        nargs=3,
        metavar=("PATH", "MESSAGES", "CONNECTIONS"),
        help="with --attack: create PATH once MESSAGES were sent over CONNECTIONS connections",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="share every CPU between the run and the attacker (default: on a machine of "
        "2+ CPUs, the run (clean and fuzzed) on the first, the attacker on the last)",
    )
    args = parser.parse_args()
    if args.attack is not None:
        gate = None
        if args.open_gate is not None:
            path, messages, connections = args.open_gate
            gate = (Path(path), int(messages), int(connections))
        done = attack(args.attack, args.seconds, args.seed, args.rate, gate=gate)
        print(json.dumps(done), flush=True)
        return
    allowed = sorted(os.sched_getaffinity(0))
    cpus = None
    if not args.no_pin and len(allowed) >= 2:
        cpus = {"run": {allowed[0]}, "attacker": {allowed[-1]}}
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        clean = _train(Path(tmp) / "clean", args.steps, 11, None, cpus)
        fuzz = {"seconds": args.seconds, "seed": args.seed, "rate": args.rate}
        fuzzed = _train(Path(tmp) / "fuzzed", args.steps, 11, fuzz, cpus)
    # steps/s: what the run achieved; CPU per step: what the run itself spent, whatever
    # the attacker (or anything else on the machine) took from it
    ratio = fuzzed["steps_per_s"] / clean["steps_per_s"]
    cpu_ratio = clean["cpu_s_per_step"] / fuzzed["cpu_s_per_step"]
    same = clean["summary"]["params_sha256"] == fuzzed["summary"]["params_sha256"]
    where = "shared CPUs" if cpus is None else f"run on CPU {allowed[0]}, attacker on {allowed[-1]}"
    print(f"{where}")
    for name, r in (("clean", clean), ("fuzzed", fuzzed)):
        ms = r["cpu_s_per_step"] * 1e3
        print(f"{name:7} {r['steps_per_s']:8.1f} steps/s  {ms:7.2f} ms CPU/step")
    print(f"ratio   steps/s {ratio:.3f}, CPU per step {cpu_ratio:.3f} (target >= 0.90)")
    print(f"attack  {fuzzed['attack']}")
    print(f"params_sha256 equal: {same}; restarts {fuzzed['summary']['restarts']}")
    print(f"admission {fuzzed['summary'].get('admission')}")
    result = {
        "pinned": cpus is not None,
        "clean_steps_per_s": clean["steps_per_s"],
        "fuzzed_steps_per_s": fuzzed["steps_per_s"],
        "ratio": ratio,
        "clean_cpu_s_per_step": clean["cpu_s_per_step"],
        "fuzzed_cpu_s_per_step": fuzzed["cpu_s_per_step"],
        "cpu_ratio": cpu_ratio,
        "target": 0.90,
        "params_equal": same,
        "restarts": fuzzed["summary"]["restarts"],
        "admission": fuzzed["summary"].get("admission"),
        "attack": fuzzed["attack"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
