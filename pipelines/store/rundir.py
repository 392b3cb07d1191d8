"""The run directory: what a run leaves behind, and its progress display.

    <run dir>/
      config.json       the resolved config, its config_hash and resume_hash
      data.json         the data's record: dataset name and meta (for the user's files:
                        each file's path, size and SHA-256; classes, vocabulary,
                        standardisation -- what predict, generate and eval read back)
      metrics.jsonl     one JSON object per optimizer step: step (1-based count of steps
                        done), loss, lr, grad_norm, samples_per_s, skipped (this step was
                        skipped for a non-finite gradient), plus eval results when evaluated
      checkpoints/      see pipelines.store.checkpoint
      summary.json      final_loss, eval, steps, ranks, mode, seed, wall_s, samples_per_s,
                        restarts, skipped_steps, params_sha256, memory (per rank, bytes),
                        config_hash, stopped_early, status
      weights.safetensors  the final weights by PyTorch parameter name
      hooks.jsonl       hook outputs, when hooks are loaded
      overrides.jsonl   the live overrides (`zerotrain set`), replayed by recovery and
                        --resume (pipelines.store.overrides)
      hooks_live.jsonl  the analyzers attached and detached live (`zerotrain hook`)
      .lock             the owner's advisory lock (flock) and pid
      live/             a cluster run's telemetry while it trains, for the daemon's
                        /metrics (pipelines.daemon.supervisor): rank-R.json (pid, step,
                        compute seconds, RSS; replaced about twice a second) and
                        faults.json (recovery.json so far); left as the run last wrote it

A run dir has one owner: :class:`RunDir` takes an exclusive flock on ``.lock`` for the
whole run (the cluster passes the locked descriptor to its rank and analyzer processes,
which check they hold it), so a second run on the same dir is refused with the owner's
pid. A dir that already holds checkpoints is taken only by a run that resumes from it.

Every file a reader may open while the run goes on is appended line by line (jsonl) or
replaced atomically (json), so a reader never sees half a record.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = [
    "LOCK_FD_ENV",
    "Progress",
    "RunDir",
    "RunDirRefused",
    "check_run_lock",
    "default_run_dir",
    "disk_error",
    "last_good_checkpoint",
    "stop_line",
    "params_sha256",
]

LOCK_NAME = ".lock"
LOCK_FD_ENV = "ZEROTRAIN_RUN_LOCK_FD"  # the inherited descriptor of the owner's lock


# errors of the world, not of the run: retrying from a checkpoint meets them again
WORLD_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
)


def disk_error(err: BaseException, where: str | Path | None = None) -> str | None:
    """``"<path>: <meaning> (<ERRNO>)"`` when `err` is an OSError of the world (a full,
    read-only or forbidden disk: WORLD_ERRNOS), else None. `where` names the path when
    the error does not (a failed write() carries no file name)."""
    if not isinstance(err, OSError) or err.errno not in WORLD_ERRNOS:
        return None
    path = err.filename if err.filename is not None else where
    name = errno.errorcode.get(err.errno, str(err.errno))
    return f"{path if path is not None else 'the run dir'}: {os.strerror(err.errno)} ({name})"


def last_good_checkpoint(root: str | Path) -> str:
    """The newest valid checkpoint under `root` for a failure message: its path, 'none
    written yet', or why it cannot be told (the error handler must not fail on the disk
    that failed)."""
    from .checkpoint import latest_valid

    try:
        found = latest_valid(root).path
    except OSError as err:
        return f"unknown ({os.strerror(err.errno) if err.errno else err})"
    return str(found) if found is not None else "none written yet"


def stop_line(step: int, reason: str, ckpt_root: str | Path, rundir: RunDir) -> str:
    """A planned stop's one line: the step, why, its checkpoint, how to continue."""
    from .checkpoint import checkpoint_dir

    if step == 0:
        return f"stopped before the first step ({reason}); nothing to resume: start it again"
    return (
        f"stopped at step {step} ({reason}); checkpoint {checkpoint_dir(ckpt_root, step)}; "
        f"continue with --resume {rundir.path}"
    )


class RunDirRefused(Exception):
    """The run dir cannot be this run's: another run holds it, or it holds checkpoints
    this run does not resume from (a usage error, exit 2)."""


def default_run_dir(pipeline: str, root: str | Path = "runs") -> Path:
    """runs/<pipeline>-<YYYYmmdd-HHMMSS>[-k], a directory that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{pipeline}-{stamp}"
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def params_sha256(model) -> str:
    """SHA-256 of every parameter as float32 little-endian bytes, in named_parameters
    order (the number issue 4 compares across runs)."""
    digest = hashlib.sha256()
    for _, arr in model.named_parameters():
        digest.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return digest.hexdigest()


def _jsonable(obj):
    """Floats that JSON cannot carry (nan, inf) become null; numpy scalars become Python."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _lock(path: Path):
    """The run dir's lock file, exclusively flocked by this process; RunDirRefused
    naming the holder's pid when another process holds it."""
    lock = open(path / LOCK_NAME, "a+")  # closing the file (or exiting) releases the lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            lock.close()
            raise
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise RunDirRefused(
            f"{path} is in use by another run (pid {holder}); wait for it to end or choose "
            "another --run-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_run_lock(run_dir: str | Path, fd: int) -> None:
    """Check that descriptor `fd` (inherited from the process that started this one) is
    the locked ``.lock`` of `run_dir`: RunDirRefused if not. A process that holds it
    shares its owner's lock, so the dir stays owned while any process of the run lives."""
    path = Path(run_dir) / LOCK_NAME
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
        same = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
        if same:
            # the lock of the same open file: granted at once to a holder, refused otherwise
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        same = False
    if not same:
        raise RunDirRefused(f"this process does not hold the lock of {run_dir} ({path})")


class RunDir:
    """The run's directory, owned (locked) from construction to :meth:`close`.

    `resume`: the checkpoint root or run dir the run resumes from; a dir that holds
    checkpoints (under `checkpoint_dir`) is refused unless the run resumes from it.
    Raises RunDirRefused.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        resume: str | Path | None = None,
        checkpoint_dir: str = "checkpoints",
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.path)
        try:
            self._refuse_foreign_checkpoints(resume, checkpoint_dir)
        except BaseException:
            self._lock.close()
            raise
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self._hooks = None

    def _refuse_foreign_checkpoints(self, resume, checkpoint_dir: str) -> None:
        root = self.path / checkpoint_dir
        if not any(root.glob("step-*")):
            return
        if resume is not None:
            target = Path(resume).resolve()
            if target in (self.path.resolve(), root.resolve()):
                return
        raise RunDirRefused(
            f"{self.path} already holds checkpoints ({root}); continue that run with "
            f"--resume {self.path}, or choose a new --run-dir"
        )

    @property
    def lock_fd(self) -> int:
        """The locked descriptor, for processes that share the ownership (pass_fds)."""
        return self._lock.fileno()

    def checkpoints(self, sub: str = "checkpoints") -> Path:
        return self.path / sub

    def write_config(self, cfg, config_hash: str, resume_hash: str) -> None:
        write_json_atomic(
            self.path / "config.json",
            {"config": cfg.to_dict(), "config_hash": config_hash, "resume_hash": resume_hash},
        )

    def write_data(self, record: dict) -> None:
        write_json_atomic(self.path / "data.json", record)

    def forget_steps_after(self, step: int) -> None:
        """Drop the metrics of steps after `step` (a run resumed from its checkpoint
        trains them again: metrics.jsonl holds each step once). Replaced atomically."""
        path = self.path / "metrics.jsonl"
        self._metrics.close()
        kept = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self._metrics = open(path, "a", buffering=1)

    def log_step(self, record: dict) -> None:
        self._metrics.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def log_hook(self, record: dict) -> None:
        if self._hooks is None:
            self._hooks = open(self.path / "hooks.jsonl", "a", buffering=1)
        self._hooks.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def close(self) -> None:
        self._metrics.close()
        if self._hooks is not None:
            self._hooks.close()
        self._lock.close()


class Progress:
    """A one-line bar redrawn in place on a terminal; plain periodic lines otherwise.

    `every` is the step interval of plain lines (the bar redraws at most 10 times a second).
    """

    def __init__(self, total: int, every: int, out=None, prefix: str = ""):
        self.total, self.every, self.prefix = total, max(every, 1), prefix
        self.out = out if out is not None else sys.stderr
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._last_draw = 0.0

    def update(
        self, step: int, loss: float, lr: float, samples_per_s: float, extra: str = ""
    ) -> None:
        of = f"/{self.total}" if self.total else ""  # 0: a continuous run
        text = (
            f"{self.prefix}step {step}{of} loss {loss:.4f} lr {lr:.2e} "
            f"{samples_per_s:,.0f} samples/s{extra}"
        )
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.1 and step != self.total:
                return
            self._last_draw = now
            width = 24
            done = int(width * step / self.total) if self.total else 0
            bar = "#" * done + "-" * (width - done)
            self.out.write(f"\r[{bar}] {text}\x1b[K")
            if step == self.total:
                self.out.write("\n")
            self.out.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            self.out.write(text + "\n")
            self.out.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        self.out.write(self.prefix + text + "\n")
        self.out.flush()
