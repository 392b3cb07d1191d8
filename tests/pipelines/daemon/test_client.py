"""The client verbs' side: `zerotrain status` is a remote call and imports only what one
needs (no training modules, no trio, no zmq, no numpy), so it costs little more than the
interpreter's own start. Its codec (pipelines.daemon.protocol, msgpack alone) writes and
reads the bytes of actors' frame codec."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import actors
from pipelines.daemon import protocol

_LIST_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('MODULES', *sorted(sys.modules), file=sys.stderr))\n"
    "from pipelines.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _modules_imported_by(*args: str) -> set[str]:
    """Module names a `zerotrain ARGS` process had imported when it exited."""
    r = subprocess.run(
        [sys.executable, "-c", _LIST_MODULES, *args], capture_output=True, text=True, timeout=60
    )
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")]
    return set(line.split()[1:])


# what a client verb may import beyond the interpreter's own start: argparse parsing a
# subcommand, the Unix socket, msgpack, fcntl and signal (the floor below imports them
# so, on any Python version, the set says what they bring along) -- and the daemon
# package's client side with the command line it is reached through
_CLIENT_FLOOR = (
    "from __future__ import annotations\n"
    "import argparse, atexit, fcntl, signal, socket, struct, sys\n"
    "import msgpack\n"
    "p = argparse.ArgumentParser(prog='zerotrain')\n"
    "p.add_subparsers(dest='verb').add_parser('status').add_argument('--state-dir')\n"
    "p.parse_args(['status', '--state-dir', 'x'])\n"
    "print(*sorted(sys.modules))\n"
)
_CLIENT_OWN = {
    "pipelines",
    "pipelines.cli",
    "pipelines.cliargs",
    "pipelines.daemon",
    "pipelines.daemon.client",
    "pipelines.daemon.commands",
    "pipelines.daemon.protocol",
    "pipelines.daemon.statedir",
}


def _heavy(mods: set[str]) -> list[str]:
    heavy = {"numpy", "trio", "zmq", "pipelines.config", "pipelines.data", "pipelines.use"}
    return sorted(
        m
        for m in mods
        if m.split(".")[0] in heavy or m in heavy or m.startswith(("pipelines.launch", "actors."))
    )


def test_zerotrain_status_imports_no_training_modules_nor_numpy_trio_zmq(tmp_path):
    mods = _modules_imported_by("status", "--state-dir", str(tmp_path / "none"))
    assert "pipelines.daemon.protocol" in mods  # it did get as far as the call
    assert _heavy(mods) == []


def test_the_client_verbs_import_argparse_a_socket_msgpack_and_the_client_alone(
    daemon_factory,
):
    d = daemon_factory("--cpus", "2")
    r = subprocess.run([sys.executable, "-c", _CLIENT_FLOOR], capture_output=True, text=True)
    floor = set(r.stdout.split())
    assert {"argparse", "msgpack", "socket"} <= floor
    for verb in (["status"], ["jobs", "--all"], ["status", "1"]):
        mods = _modules_imported_by(*verb, "--state-dir", str(d.state_dir))
        assert "pipelines.daemon.protocol" in mods  # it did get as far as the call
        # e.g. no dataclasses (inspect, ast, dis), typing, traceback, json, numpy, trio
        assert sorted(mods - floor - _CLIENT_OWN) == [], verb


def test_zerotrain_status_json_answered_by_a_daemon_imports_no_numpy(daemon_factory):
    d = daemon_factory("--cpus", "2")
    args = ("status", "--json", "--state-dir", str(d.state_dir))
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _LIST_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["daemon"]["pid"] == d.proc.pid  # the answer, decoded
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")]
    assert _heavy(set(line.split()[1:])) == []
    timed = [x.rsplit("|", 1)[1].strip() for x in r.stderr.splitlines() if "import time:" in x]
    assert "numpy" not in timed and "pipelines.daemon.client" in timed


_REQUESTS = [
    protocol.Submit("p", "[train]\nsteps = 3\n", ["a=1"], ["builtin"], "/tmp", "", -2),
    protocol.ListJobs(True),
    protocol.JobStatus("7"),
    protocol.Control("stop", "7"),
    protocol.ReadLog("7", 2**40, 0),
    protocol.DaemonInfo(),
    protocol.Checkpoint("7"),
    protocol.SetKey("7", "optim.lr", "0.1", None),
    protocol.SetKey("7", "optim.lr", "0.1", 12),
    protocol.HookRequest("7", "attach", "builtin:norms"),
]


@pytest.mark.parametrize("request_", _REQUESTS, ids=lambda r: type(r).__name__)
def test_a_clients_call_is_the_bytes_actors_encode_writes(request_):
    sent = protocol.encode_call(request_, 5, "zerotrain-9", 30.0)
    protocol._actors()  # the daemon's codec: the requests registered as actors' records
    data, tensors = actors.to_wire(request_)
    body = {"to": "daemon", "request": data, "timeout": 30.0}
    frames = actors.encode(actors.Message("call", "zerotrain-9", 0, 0, 5, body, tensors))
    assert sent == protocol.pack_frames(frames)
    assert protocol.decode_call([sent[8:]]) == (5, request_)


_VALUES = [
    None,
    {"id": 3, "state": "running", "loss": 0.25, "run_dir": "/x", "summary": None},
    [{"id": 1}, {"id": 2, "warm": {"ready": True, "pid": 12}}],
    {"data": b"\x00\xff", "offset": 2**40, "ended": False},
    ("a", 1, ("b", [2.5, -0.0])),
    {1: "one", ("t", 2): ["x"], "$odd": 3},
    protocol.JobStatus("4"),
]


@pytest.mark.parametrize("value", _VALUES, ids=range(len(_VALUES)))
def test_a_daemons_reply_decodes_as_actors_from_wire_reads_it(value):
    sent = protocol.encode_reply(4, value=value)
    got = protocol.decode_reply([sent[8:]], 4)
    assert got == actors.from_wire(*actors.to_wire(value)) == value
    assert type(got) is type(value)


def test_a_reply_carrying_a_tensor_is_refused_in_one_line():
    import numpy as np

    sent = protocol.encode_reply(4, value={"x": np.zeros(2, np.float32)})
    frames = protocol_frames(sent)
    with pytest.raises(protocol.ControlError, match="2 frames; control messages are one"):
        protocol.decode_reply(frames, 4)
    header = dataclasses.replace(actors.decode(frames), tensors=[])
    with pytest.raises(protocol.ControlError, match="tensor|tagged value"):
        protocol.decode_reply(actors.encode(header), 4)


def protocol_frames(packed: bytes) -> list[bytes]:
    """The frames of one multipart as the control stream carries it."""
    count, at, frames = int.from_bytes(packed[:4], "big"), 4, []
    for _ in range(count):
        size = int.from_bytes(packed[at : at + 4], "big")
        frames.append(packed[at + 4 : at + 4 + size])
        at += 4 + size
    return frames
