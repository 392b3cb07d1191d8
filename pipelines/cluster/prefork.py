"""Rank processes forked ahead of time: a rank that starts without importing anything.

A fresh `python -m pipelines.cluster.rank` spends most of its start importing numpy,
trio, zmq, the kernels and pipelines (about 0.35 CPU-seconds each here), and the
cluster supervisor starts ranks one after another. A process that has already imported
all that -- the daemon's warm job runner (``pipelines.daemon.warm``) -- calls
:func:`prefork` while it is still single-threaded and holds no zmq context, no run and
no open files of a run. Each forked *template* waits on its end of a Unix socket pair.

Later, when that process runs a job as `zerotrain run` does, the rank supervisor's
``actors.process_spec(..., spawner=spawn_rank)`` asks :func:`spawn_rank` first: it hands
a template what ``Popen`` would have given an exec'd rank -- the environment, the
working directory, the output descriptor (stdout and stderr), the descriptors to keep
(``pass_fds``, same numbers) and the signals to start with blocked -- and the template
becomes that rank: it calls ``pipelines.cluster.rank.main()`` and leaves as an exec'd
rank would, through the interpreter's exit handlers (the zmq flush). Nothing else of
the forking process is kept: every other descriptor is closed before the rank runs.

What holds for a template rank, as for an exec'd one:

* it is a direct child of the process that runs the cluster supervisor, forked by its
  main thread (the trio thread): ``waitpid`` and the pidfd work, and the rank's own
  PR_SET_PDEATHSIG (``actors.child_node``) fires when that process dies. A template
  that is never used arms the same signal at once, and also leaves when its socket
  closes (the forking process ended).
* its computation sees exactly the inputs an exec'd rank sees (the plan, the config,
  the environment), so a run gives the same params_sha256 either way (the daemon's
  tests check it against `zerotrain run`).

What differs, and who handles it: ``/proc/PID/environ`` shows the environment the
forking process was *started* with, not the one handed over (the kernel keeps the
block fixed at exec), so the daemon finds a template rank by its warm runner's marker
(``pipelines.daemon.supervisor``). Each template is handed out once, to a first start
or to a restart after a crash alike (a template is as fresh a process as an exec'd
one); once they are used up, ranks are exec'd as usual -- as is every rank of a plain
`zerotrain run`, which never calls :func:`prefork`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading

__all__ = ["RANK_MODULE", "ForkedChild", "prefork", "spawn_rank", "templates"]

RANK_MODULE = "pipelines.cluster.rank"
_MAX_REQUEST = 1 << 20
_PR_SET_PDEATHSIG = 1
_FD_BASE = 256  # received descriptors are parked above this before they are placed

_templates: list[tuple[int, socket.socket]] = []  # (pid, our end), oldest first


def templates() -> list[int]:
    """Pids of the templates not handed out yet."""
    return [pid for pid, _ in _templates]


def prefork(n: int) -> list[int]:
    """Fork ``n`` rank templates (see the module doc); their pids.

    Call it from the main thread of a process with no other thread and no zmq context
    (a fork would copy them broken); RuntimeError otherwise. Never returns in a
    template: it becomes a rank, or exits when its socket closes.
    """
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("prefork() needs a single-threaded process (threads run here)")
    if "zmq" in sys.modules and getattr(sys.modules.get("actors._transport"), "_context", None):
        raise RuntimeError("prefork() before any zmq context: a forked context is unusable")
    pids = []
    for _ in range(n):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the template
            ours.close()
            for _, sock in _templates:  # earlier templates' ends are not ours
                sock.close()
            _templates.clear()
            _template(theirs)  # never returns
        theirs.close()
        _templates.append((pid, ours))
        pids.append(pid)
    return pids


def spawn_rank(argv, env, cwd, pass_fds, output, block_signals):
    """An ``actors`` spawner (``actors._process.Spawner``): start the rank in a template,
    or None (no template left, or ``argv`` is not a rank's) to exec it as usual."""
    if list(argv[1:]) != ["-m", RANK_MODULE]:
        return None
    while _templates:
        pid, sock = _templates.pop(0)
        child = ForkedChild(pid)
        if child.poll() is not None:
            sock.close()
            continue  # it died waiting (killed): try the next one
        out = [1, 2] if output is None or output < 0 else [output, output]
        fds = [*out, *pass_fds]
        request = {
            "env": dict(env),
            "cwd": cwd,
            "targets": [1, 2, *pass_fds],
            "block": [int(s) for s in block_signals],
        }
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], fds)
        except OSError:
            child.send_signal(signal.SIGKILL)
            continue
        finally:
            sock.close()
        return child
    return None


class ForkedChild:
    """What ``actors`` needs of a started child (``subprocess.Popen``'s names), for a
    process this one forked: ``pid``, ``returncode``, ``poll()``, ``send_signal()``."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = 255
                return self.returncode
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a reaped (perhaps reused) pid
            os.kill(self.pid, sig)


# ---- the template's side (runs in the forked child) -----------------------------------


def _template(sock: socket.socket) -> None:
    code = 70
    try:
        _become_rank(sock)
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # a rank's own errors end in rank.main(); this is ours
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        _leave(code)


def _become_rank(sock: socket.socket) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0):
        raise SystemExit(71)
    # what the forking process had installed is not a fresh interpreter's
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the forking process's stdout is not a rank's
    os.close(null)
    data, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, 64)
    if not data:  # the forking process is done: never used
        raise SystemExit(0)
    request = json.loads(data)
    if request["block"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, request["block"])
    parked = [_dup_above(fd) for fd in fds]  # out of the way of every target number
    for fd in fds:
        os.close(fd)
    sock.close()
    targets = request["targets"]
    for fd, target in zip(parked, targets, strict=True):
        os.dup2(fd, target)
    keep = {0, 1, 2, *targets}
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    if request["cwd"]:
        os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    from . import rank

    sys.argv = [rank.__file__]
    rank.main()


def _dup_above(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FD_BASE)


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _leave(code: int) -> None:
    """Exit as an exec'd rank would: the exit handlers (zmq's flush of the last
    messages) and the standard streams, then the process -- without unwinding into the
    forking process's frames, which are not this process's business."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
