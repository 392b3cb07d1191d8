"""The daemon's state directory: where it is, its permissions, and the lock that makes
one daemon its only owner.

Layout (the directory is 0700: the control socket inside is reachable by its owner only)::

    DIR/daemon.lock    flock held by the serving daemon for its whole life; holds its pid
    DIR/jobs.sqlite3   the job table (pipelines.daemon.jobs), WAL mode
    DIR/control.sock   the control endpoint (pipelines.daemon.control)
    DIR/http.json      the address the HTTP server listens on, while it does
    DIR/warm.log       what the warm job runners (pipelines.daemon.warm) print before a job
    DIR/jobs/N/        job N's files: its config copy and its output log (job.log)
    DIR/runs/job-N/    job N's run dir, unless its submit named one

The lock is an advisory flock on an open file: the kernel drops it when the holder dies,
however it dies, so a ``kill -9``'d daemon never leaves a stale lock behind, and the pid
written in the file is only read to name the holder in the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import stat

TYPE_CHECKING = False  # (typing and pathlib stay out of a client verb's start)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DEFAULT_HTTP", "DaemonUsageError", "StateDir", "default_state_dir", "no_daemon_message"]


DEFAULT_HTTP = "127.0.0.1:9477"  # `zerotrain serve --http`: loopback, a fixed port
DEFAULT_JOB_NICE = 10  # `zerotrain serve --job-nice` (pipelines.daemon.supervisor)
RECENT_ENDED = 20  # ended jobs that `status` and the HTTP page list beside those not ended


class DaemonUsageError(Exception):
    """A mistake a user can fix: printed as its one line, exit code 2."""


def default_state_dir(flag: str | None = None) -> str:
    """--state-dir, else $ZEROTRAIN_STATE_DIR, else $XDG_STATE_HOME/zerotrain, else
    ~/.local/state/zerotrain: an absolute path."""
    where = flag or os.environ.get("ZEROTRAIN_STATE_DIR")
    if not where:
        xdg = os.environ.get("XDG_STATE_HOME")
        where = os.path.join(xdg or os.path.join("~", ".local", "state"), "zerotrain")
    return os.path.abspath(os.path.expanduser(where))


def no_daemon_message(path: str | Path) -> str:
    return f"no zerotrain daemon at {path} -- start one with: zerotrain serve --state-dir {path}"


class StateDir:
    """Paths inside one state directory; :meth:`acquire` makes this process its owner."""

    def __init__(self, path: str | Path):
        from pathlib import Path

        self.path = Path(path)
        self.lock_path = self.path / "daemon.lock"
        self.db_path = self.path / "jobs.sqlite3"
        self.socket_path = self.path / "control.sock"
        self.http_path = self.path / "http.json"
        self._lock_fd: int | None = None

    def job_dir(self, job_id: int) -> Path:
        return self.path / "jobs" / str(job_id)

    def default_run_dir(self, job_id: int) -> Path:
        return self.path / "runs" / f"job-{job_id}"

    def acquire(self) -> None:
        """Create the directory (0700), take the lock and write our pid into it.

        Raises DaemonUsageError naming the pid that holds it, or saying why the directory
        cannot be used (another user's, or a file).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise DaemonUsageError(
                f"zerotrain serve: cannot create the state dir {self.path}: {err.strerror}"
            ) from None
        info = self.path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise DaemonUsageError(f"zerotrain serve: {self.path} is not a directory")
        if info.st_uid != os.getuid():
            raise DaemonUsageError(
                f"zerotrain serve: the state dir {self.path} belongs to uid {info.st_uid}, "
                f"not to this user (uid {os.getuid()}); use a state dir of your own"
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(self.path, 0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonUsageError(
                f"zerotrain serve: the state dir {self.path} is in use by the daemon with "
                f"pid {holder}; stop it first or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the last fd drops the flock
            self._lock_fd = None
