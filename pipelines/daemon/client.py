"""The client verbs: `zerotrain submit | jobs | status | pause | resume | stop | cancel |
logs | export | checkpoint | set`, each a remote call to the daemon of a state dir (see
``protocol``).

Each verb finds the daemon through --state-dir, $ZEROTRAIN_STATE_DIR or the default
(``statedir.default_state_dir``). What a user can fix is one line on stderr and exit 2
(no daemon, unknown job, a verb that does not fit the job's state, a bad config).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

from . import protocol
from .statedir import DaemonUsageError, no_daemon_message

TYPE_CHECKING = False  # (typing and pathlib stay out of a client verb's start)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["call", "export_job", "format_table", "submit_request"]

_U32 = struct.Struct(">I")


def call(state_dir: str | Path, request, *, timeout: float = 30.0):
    """One request to the daemon at ``state_dir``; its answer's value.

    DaemonUsageError for: no daemon there, a refusal, or the daemon's own usage error.
    """
    path = os.path.join(state_dir, "control.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            _connect(sock, path, timeout)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonUsageError(no_daemon_message(state_dir)) from None
        except PermissionError:
            raise DaemonUsageError(
                f"cannot reach the zerotrain daemon at {state_dir}: permission denied "
                "(the state dir belongs to another user)"
            ) from None
        sender = f"zerotrain-{os.getpid()}"
        try:
            sock.sendall(protocol.encode_call(request, 1, sender, timeout))
        except BrokenPipeError:
            pass  # the daemon answered (a refusal) and closed before reading: read it
        frames = _read_message(sock)
    except TimeoutError:
        raise DaemonUsageError(
            f"the zerotrain daemon at {state_dir} did not answer within {timeout:g}s"
        ) from None
    except (ConnectionResetError, BrokenPipeError):
        raise DaemonUsageError(
            f"the zerotrain daemon at {state_dir} closed the connection"
        ) from None
    finally:
        sock.close()
    try:
        return protocol.decode_reply(frames, 1)
    except protocol.ControlError as err:
        raise DaemonUsageError(str(err)) from None


def _connect(sock, path: str, timeout: float) -> None:
    """Connect, waiting while the daemon's accept queue is full (EAGAIN on a Unix
    socket: the daemon is busy, not gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError from None
            time.sleep(0.02)


def _recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError
        buf += chunk
    return bytes(buf)


def _read_message(sock) -> list[bytes]:
    (count,) = _U32.unpack(_recv_exactly(sock, 4))
    if not 1 <= count <= protocol.MAX_FRAMES:
        raise DaemonUsageError(f"the daemon sent a message of {count} frames")
    frames = []
    for _ in range(count):
        (size,) = _U32.unpack(_recv_exactly(sock, 4))
        if size > protocol.MAX_FRAME_BYTES:
            raise DaemonUsageError(f"the daemon sent a frame of {size} bytes")
        frames.append(_recv_exactly(sock, size))
    return frames


def submit_request(args) -> protocol.Submit:
    """Validate the submit arguments as `zerotrain run` does before any rank starts
    (config and overrides, hooks, data files, a file model) and build the request: the
    pipeline file's text, not its path, so later edits of the file do not change the
    queued job."""
    from pathlib import Path

    from ..cliargs import flag_overrides
    from ..config import CONFIG_DIR, ConfigError, load_config
    from ..core import load_hooks

    model = args.model
    if model is not None:  # absolute: the job runs in this directory, but be exact
        path, sep, name = model.partition(":")
        model = os.path.abspath(path) + sep + name
    overrides = flag_overrides(args, model)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        raise DaemonUsageError(f"zerotrain submit: config error: {err}; nothing queued") from None
    try:
        load_hooks(args.hooks)
    except ValueError as err:
        raise DaemonUsageError(f"zerotrain submit: {err}; nothing queued") from None
    from ..data import DataError
    from ..use import UsageError, check_data

    try:  # what `zerotrain run` checks before any rank starts
        check_data(cfg)
    except (DataError, UsageError) as err:
        raise DaemonUsageError(f"zerotrain submit: data: {err}; nothing queued") from None
    source = args.config or cfg.name
    path = Path(source)
    if not (path.suffix == ".toml" or path.exists()):
        path = CONFIG_DIR / f"{source}.toml"
    hooks = []
    for spec in args.hooks:
        if spec.split(":", 1)[0] == "builtin":
            hooks.append(spec)
        else:
            file, sep, name = spec.partition(":")
            hooks.append(os.path.abspath(file) + sep + name)
    return protocol.Submit(
        pipeline=cfg.name,
        config_toml=path.read_text(),
        overrides=overrides,
        hooks=hooks,
        cwd=os.getcwd(),
        name=args.name or "",
        priority=args.priority,
    )


_COLUMNS = ("id", "name", "state", "step", "loss", "ranks", "restarts", "run_dir")


def format_table(jobs: list[dict]) -> str:
    rows = [list(_COLUMNS)]
    for job in jobs:
        loss = job.get("loss")
        rows.append(
            [
                str(job["id"]),
                job["name"],
                job["state"],
                str(job.get("step") or 0),
                "" if loss is None else f"{loss:.4f}",
                str(job["ranks"]),
                str(job.get("restarts") or 0),
                job["run_dir"],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def wait_until_settled(state_dir: Path, job: str, timeout: float) -> dict:
    """Poll until the job is no longer stopping (or ``timeout``); its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = call(state_dir, protocol.JobStatus(job))
        if status["state"] != "stopping" or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def follow_logs(state_dir: Path, job: str, follow: bool, out=None) -> None:
    out = out or sys.stdout.buffer
    offset = 0
    while True:
        chunk = call(state_dir, protocol.ReadLog(job, offset, 0))
        if chunk["data"]:
            out.write(chunk["data"])
            out.flush()
            offset = chunk["offset"]
            continue
        if not follow or chunk["ended"]:
            return
        time.sleep(0.5)


def export_job(status: dict, config: dict, out: Path) -> tuple[Path, int]:
    """Write the job's latest weights (PyTorch names) to ``out``: its final weights once
    done, else its newest valid checkpoint's parameters. Returns (out, step)."""
    import shutil
    from pathlib import Path

    from ..config import from_resolved
    from ..store.checkpoint import export_weights, latest_valid, load_full

    run_dir = Path(status["run_dir"])
    final = run_dir / "weights.safetensors"
    if status["state"] == "done" and final.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(final, tmp)
        os.replace(tmp, out)
        return out, int(status.get("step") or 0)
    cfg = from_resolved(config)
    found = latest_valid(run_dir / cfg.checkpoint.dir)
    if found.path is None:
        raise DaemonUsageError(
            f"zerotrain export: job {status['id']} has no valid checkpoint yet (state "
            f"{status['state']}, step {status.get('step') or 0}); nothing written"
        )
    from ..core import build_model_for
    from ..data import load_dataset, with_default_cache

    manifest, full = load_full(found.path)
    model = build_model_for(cfg, load_dataset(with_default_cache(cfg.data), "train").meta)
    model.params[:] = full["params"]
    export_weights(
        out,
        model.state_dict(),
        {"pipeline": cfg.name, "step": str(manifest["step"]), "job": str(status["id"])},
    )
    return out, int(manifest["step"])
