"""Bad input and hostile peers: one line, exit 2, nothing queued or changed; the control
endpoint keeps serving whatever it is sent."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest

import actors
from pipelines.daemon import protocol
from pipelines.daemon.client import call

from .conftest import SMALL, zerotrain


def _one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_verb_with_no_daemon_says_how_to_start_one(tmp_path):
    for args in (["jobs"], ["status", "1"], ["pause", "1"], ["submit", *SMALL]):
        r = zerotrain(*args, "--state-dir", tmp_path / "none")
        assert _one_line(r) == (
            f"no zerotrain daemon at {tmp_path / 'none'} -- start one with: "
            f"zerotrain serve --state-dir {tmp_path / 'none'}"
        )


def test_the_state_dir_comes_from_the_environment(tmp_path):
    env = {**os.environ, "ZEROTRAIN_STATE_DIR": str(tmp_path / "envdir")}
    r = zerotrain("jobs", env=env)
    assert f"no zerotrain daemon at {tmp_path / 'envdir'} " in _one_line(r)


@pytest.mark.slow
def test_bad_submits_queue_nothing(daemon_factory):
    d = daemon_factory("--cpus", "2")
    line = _one_line(d.cli("submit", *SMALL, "--set", "train.batch_size=0"))
    assert line == (
        "zerotrain submit: config error: train.batch_size: expected an integer >= 1, got 0; "
        "nothing queued"
    )
    line = _one_line(d.cli("submit", "no_such_pipeline"))
    assert line.startswith("zerotrain submit: config error: config: expected a .toml path")
    line = _one_line(d.cli("submit", "mlp_classifier", "--ranks", "4"))
    assert line == (
        "zerotrain submit: the job needs 4 CPUs (one per rank), the daemon's budget is 2 "
        "(zerotrain serve --cpus N); nothing queued"
    )
    assert "nothing queued" in _one_line(d.cli("submit", *SMALL, "--hook", "/nonexistent.py"))
    line = _one_line(
        d.cli("submit", "mlp_classifier", "--set", "data.name=table", "--set", "data.path=/x.csv")
    )
    assert line == (
        "zerotrain submit: data: data.path: no such file or directory '/x.csv'; nothing queued"
    )
    line = _one_line(d.cli("submit", *SMALL, "--model", "/nonexistent.py:Net"))
    assert line.startswith("zerotrain submit: data: model file '/nonexistent.py'")
    assert d.cli("jobs", "--all", "--json").stdout.strip() == "[]"


@pytest.mark.slow
def test_unknown_jobs_and_verbs_that_do_not_fit_the_state(daemon_factory):
    d = daemon_factory()
    assert _one_line(d.cli("status", "7")) == (
        "zerotrain status: unknown job '7'; no jobs have been submitted"
    )
    job = d.submit(*SMALL, "--steps", "5", "--name", "tiny")
    d.wait_for(job, {"done"})
    assert _one_line(d.cli("pause", "nope")) == (
        f"zerotrain pause: unknown job 'nope'; known jobs: {job} (tiny, done)"
    )
    assert _one_line(d.cli("pause", "tiny")) == (
        f"zerotrain pause: job {job} (tiny) is done; pause accepts a queued or running job"
    )
    assert _one_line(d.cli("resume", str(job))).endswith("resume accepts a paused or stopped job")
    assert d.status(job)["state"] == "done"


@pytest.mark.slow
def test_a_second_serve_on_a_state_dir_in_use_names_the_pid(daemon_factory):
    d = daemon_factory()
    r = zerotrain("serve", "--state-dir", d.state_dir, "--http", "off", timeout=60)
    assert _one_line(r) == (
        f"zerotrain serve: the state dir {d.state_dir} is in use by the daemon with pid "
        f"{d.proc.pid}; stop it first or use another --state-dir"
    )
    call(d.state_dir, protocol.DaemonInfo())  # the first one serves on


def test_an_unreadable_job_database_is_reported_and_kept(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    junk = b"this is not an sqlite database, but somebody's notes\n" * 40
    (state / "jobs.sqlite3").write_bytes(junk)
    r = zerotrain("serve", "--state-dir", state, "--http", "off", timeout=60)
    line = _one_line(r)
    assert line.startswith(f"zerotrain serve: cannot read the job database {state}/jobs.sqlite3: ")
    assert "left as it is" in line
    assert (state / "jobs.sqlite3").read_bytes() == junk
    # and the lock is free again: nothing half-started holds the state dir
    assert not (state / "control.sock").exists()


_HEADER = {
    "v": 1,
    "type": "call",
    "sender": "x",
    "generation": 0,
    "step": 0,
    "seq": 1,
    "tensors": [],
}


def _deep(n: int):
    value = {"to": "daemon"}
    for _ in range(n):
        value = {"x": [value]}
    return value


def _connect(sock, path: str) -> None:
    for _ in range(500):  # EAGAIN: the daemon's accept queue is full for a moment
        try:
            return sock.connect(path)
        except BlockingIOError:
            time.sleep(0.01)
    raise TimeoutError(f"could not connect to {path}")


def _send(sock, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.settimeout(10)
    return sock.recv(1 << 16)


@pytest.mark.slow
def test_the_control_endpoint_survives_ten_thousand_malformed_messages(daemon_factory):
    d = daemon_factory()
    path = str(d.state_dir / "control.sock")
    rng = random.Random(18)
    good = protocol.encode_call(protocol.DaemonInfo(), 1, "fuzz", 5.0)
    header = good[8:]
    u32 = struct.Struct(">I")

    def frame(data: bytes) -> bytes:
        return u32.pack(1) + u32.pack(len(data)) + data

    def call_msg(body) -> bytes:
        return protocol.pack_frames(actors.encode(actors.Message("call", "fuzz", 0, 0, 3, body)))

    cases = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),  # noise
        lambda: u32.pack(rng.choice([0, 2, 3, 2**32 - 1])) + b"x" * 8,  # frame counts
        lambda: u32.pack(1) + u32.pack(rng.choice([2**21, 2**32 - 1])),  # frame too long
        lambda: frame(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))),
        lambda: frame(bytearray(header)[: rng.randint(0, len(header) - 1)]),  # truncated
        lambda: frame(
            bytes(b ^ (1 << rng.randint(0, 7)) if rng.random() < 0.05 else b for b in header)
        ),  # bit flips
        lambda: frame(msgpack.packb(rng.choice([None, 1, [1, 2], {"v": 1}, "call"]))),
        lambda: call_msg({"to": "daemon", "request": {"$r": "os.system", "f": {}}, "timeout": 1.0}),
        lambda: call_msg(
            {
                "to": "daemon",
                "request": {"$r": "zerotrain.Control", "f": {"verb": 1, "job": []}},
                "timeout": 1.0,
            }
        ),
        lambda: call_msg({"to": "other", "request": None, "timeout": 1.0}),
        lambda: call_msg(
            {
                "to": "daemon",
                "request": {
                    "$r": "zerotrain.ReadLog",
                    "f": {"job": "1", "offset": -5, "limit": 2**40},
                },
                "timeout": 1.0,
            }
        ),
        lambda: frame(msgpack.packb(dict(_HEADER, body=_deep(40)))),  # nesting bomb
    ]
    t0 = time.monotonic()
    sent = 0
    for _ in range(10_000):  # a connection each: a framing error ends a stream
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            _connect(sock, path)
            try:
                sock.sendall(rng.choice(cases)())
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
    # and clients that connect and vanish, or say half a thing and vanish
    for _ in range(200):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            _connect(s, path)
            s.sendall(good[: rng.randint(0, len(good) - 1)])
    assert sent > 9000
    assert time.monotonic() - t0 < 120
    info = call(d.state_dir, protocol.DaemonInfo())
    assert info["pid"] == d.proc.pid and d.proc.poll() is None
    seen = info["control"]["rejected"] + info["control"]["requests"]
    assert seen >= sent, info["control"]  # every one reached the checks
    # a malformed request is answered with its reason on an open connection
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        reply = _send(s, call_msg({"to": "daemon", "request": 5, "timeout": 1.0}))
        assert b"request must be one of Submit" in reply
        assert b"state_dir" in _send(s, good)  # and the connection serves on


@pytest.mark.slow
def test_a_peer_of_another_uid_is_refused_even_when_the_modes_allow_it(daemon_factory):
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    root = tempfile.mkdtemp(prefix="zt-uid-")  # under /tmp: every ancestor traversable
    os.chmod(root, 0o755)
    d = daemon_factory(name=f"{root}/state")  # (an absolute name replaces tmp_path)
    os.chmod(d.state_dir, 0o755)
    os.chmod(d.state_dir / "control.sock", 0o777)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.connect(sys.argv[1])\n"
        "try: s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "except BrokenPipeError: pass  # refused at once: the answer is waiting all the same\n"
        "s.settimeout(10); sys.stdout.buffer.write(s.recv(65536))\n"
    )
    good = protocol.encode_call(protocol.DaemonInfo(), 1, "other", 5.0)
    r = subprocess.run(
        [sys.executable, "-c", code, str(d.state_dir / "control.sock"), good.hex()],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert b"refused: this daemon serves uid 0 only, the peer is uid 65534" in r.stdout
    assert b"state_dir" not in r.stdout
    d.cleanup()
    shutil.rmtree(root)
