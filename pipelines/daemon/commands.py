"""`zerotrain serve` and the client verbs on the command line.

``register_daemon_commands(subparsers)`` adds them to the `zerotrain` parser;
``run_daemon_command(args)`` runs one and returns its exit code (2 with one line on
stderr for anything a user can fix).
"""

from __future__ import annotations

import os
import sys

from ..cliargs import int_at_least
from .statedir import (
    DEFAULT_HTTP,
    DEFAULT_JOB_NICE,
    RECENT_ENDED,
    DaemonUsageError,
    default_state_dir,
)

TYPE_CHECKING = False  # (typing and pathlib stay out of a client verb's start)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DAEMON_COMMANDS", "register_daemon_commands", "run_daemon_command"]

DAEMON_COMMANDS = (
    "serve",
    "submit",
    "jobs",
    "status",
    "pause",
    "resume",
    "stop",
    "cancel",
    "logs",
    "export",
    "checkpoint",
    "set",
    "hook",
)
EXIT_OK, EXIT_USAGE = 0, 2
_LIVE_JOB = "a job id or name, or the run dir of a running `zerotrain run` (any node's)"
LIVE_TIMEOUT = 180.0  # checkpoint, set: the daemon waits up to 150 s for the run


def _state_dir_option(p) -> None:
    p.add_argument(
        "--state-dir",
        help="the daemon's state directory (default $ZEROTRAIN_STATE_DIR, else "
        "$XDG_STATE_HOME/zerotrain, else ~/.local/state/zerotrain)",
    )


def register_daemon_commands(sub, verb: str | None = None) -> None:
    """Add `serve` and the client verbs to the `zerotrain` subcommands ``sub``, in
    :data:`_VERBS`' order; ``verb``: that one alone (a client verb's own parser builds
    no other verb's options)."""
    for names, add in _VERBS:
        if verb is None or verb in names:
            add(sub, verb)


def _add_serve(sub, _) -> None:
    serve = sub.add_parser("serve", help="run the training daemon (foreground)")
    _state_dir_option(serve)
    serve.add_argument(
        "--cpus",
        type=int_at_least(1),
        help="CPU budget: a job needs one per rank (default: every CPU this process may use)",
    )
    serve.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        help=f"HOST:PORT for /metrics and / (default {DEFAULT_HTTP}), or off",
    )
    serve.add_argument(
        "--grace",
        type=int_at_least(1),
        default=25,
        help="seconds a stopping job gets before SIGKILL (default 25)",
    )
    serve.add_argument(
        "--job-nice",
        type=int_at_least(0, 19),
        default=DEFAULT_JOB_NICE,
        metavar="N",
        help=f"jobs run N nice levels below the daemon, 0-19 (default {DEFAULT_JOB_NICE}: the "
        "daemon and commands like status are served first; a job alone trains as fast)",
    )


def _add_submit(sub, _) -> None:
    submit = sub.add_parser("submit", help="queue a training job; prints its id")
    _state_dir_option(submit)
    submit.add_argument(
        "config", nargs="?", default=None, help="a .toml path or a built-in pipeline"
    )
    submit.add_argument("--ranks", type=int_at_least(1), help="rank processes")
    submit.add_argument("--mode", choices=("ddp", "zero1", "zero2"), help="data-parallel mode")
    submit.add_argument("--steps", type=int_at_least(0), help="optimizer steps (0: until stopped)")
    submit.add_argument("--seed", type=int_at_least(0), help="run seed")
    submit.add_argument(
        "--model", metavar="PATH.py:NAME", help="a model from a file (model.name = file:...)"
    )
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--hook", dest="hooks", action="append", default=[], metavar="PATH[:NAME]")
    submit.add_argument("--name", help="a name for the job (default job-ID)")
    submit.add_argument("--priority", type=int, default=0, help="higher starts first (default 0)")


def _add_jobs(sub, _) -> None:
    jobs = sub.add_parser("jobs", help="list the daemon's jobs (not ended ones unless --all)")
    _state_dir_option(jobs)
    jobs.add_argument("--all", action="store_true", help="also done, failed and cancelled jobs")
    jobs.add_argument("--json", action="store_true", help="a JSON list")


def _add_status(sub, _) -> None:
    status = sub.add_parser(
        "status",
        help=f"one job's status, or the daemon's: its jobs not ended and the last {RECENT_ENDED} "
        "ended (jobs --all lists every job)",
    )
    _state_dir_option(status)
    status.add_argument("job", nargs="?", default="", help="a job id or name")
    status.add_argument("--json", action="store_true", help="a JSON object")


_JOB_STATE_VERBS = {
    "pause": "stop a job at a step and keep it paused (processes exit)",
    "resume": "continue a paused or stopped job",
    "stop": "stop a job with a checkpoint; resumable",
    "cancel": "stop a job for good",
}


def _add_job_state_verbs(sub, verb: str | None) -> None:
    """pause, resume, stop, cancel (``verb``: that one alone)."""
    for name, text in _JOB_STATE_VERBS.items():
        if verb is not None and name != verb:
            continue
        p = sub.add_parser(name, help=text)
        _state_dir_option(p)
        p.add_argument("job", help="a job id or name")
        if name != "resume":
            p.add_argument(
                "--wait", action="store_true", help="return once the job's processes are gone"
            )


def _add_checkpoint(sub, _) -> None:
    ckpt = sub.add_parser(
        "checkpoint", help="a full checkpoint of a running job now; prints its step and manifest"
    )
    _state_dir_option(ckpt)
    ckpt.add_argument("job", help=_LIVE_JOB)


def _add_set(sub, _) -> None:
    setp = sub.add_parser(
        "set", help="change a key of a running job at a step every rank agrees on"
    )
    _state_dir_option(setp)
    setp.add_argument("job", help=_LIVE_JOB)
    setp.add_argument("assignment", metavar="KEY=VALUE", help="e.g. optimizer.lr=3e-4")
    setp.add_argument(
        "--at-step",
        type=int_at_least(1),
        help="the step from which it holds (default: the next one every rank can honour)",
    )


def _add_hook(sub, _) -> None:
    hook = sub.add_parser("hook", help="attach analyzers to a running job, or detach one")
    actions = hook.add_subparsers(dest="hook_action", metavar="ACTION", required=True)
    attach = actions.add_parser("attach", help="attach a script's analyzers from the next step")
    _state_dir_option(attach)
    attach.add_argument("job", help=_LIVE_JOB)
    attach.add_argument("spec", metavar="PATH[:NAME]", help="a hook script, or builtin[:NAME]")
    detach = actions.add_parser("detach", help="detach an analyzer by name")
    _state_dir_option(detach)
    detach.add_argument("job", help=_LIVE_JOB)
    detach.add_argument("name", help="the hook's name")


def _add_logs(sub, _) -> None:
    logs = sub.add_parser("logs", help="a job's output")
    _state_dir_option(logs)
    logs.add_argument("job", help="a job id or name")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the job ends"
    )


def _add_export(sub, _) -> None:
    export = sub.add_parser("export", help="a job's latest weights as safetensors (PyTorch names)")
    _state_dir_option(export)
    export.add_argument("job", help="a job id or name")
    export.add_argument("out", nargs="?", help="output file (default JOBNAME.safetensors)")


# (verbs, what adds them), in `zerotrain --help`'s order: the queue and the job-state
# verbs, then the requests to a running job (checkpoint, set, hook attach / detach),
# then what a job leaves (logs, export)
_VERBS = (
    (("serve",), _add_serve),
    (("submit",), _add_submit),
    (("jobs",), _add_jobs),
    (("status",), _add_status),
    (tuple(_JOB_STATE_VERBS), _add_job_state_verbs),
    (("checkpoint",), _add_checkpoint),
    (("set",), _add_set),
    (("hook",), _add_hook),
    (("logs",), _add_logs),
    (("export",), _add_export),
)


def run_daemon_command(args, out=None) -> int:
    out = out or sys.stdout
    try:
        return _run(args, out)
    except DaemonUsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE


def _run(args, out) -> int:
    from . import client, protocol

    state_dir = default_state_dir(args.state_dir)
    command = args.command
    if command == "serve":
        return _serve(args, state_dir)
    if command == "submit":
        request = client.submit_request(args)
        reply = client.call(state_dir, request)
        print(reply["id"], file=out)
        return EXIT_OK
    if command == "jobs":
        jobs = client.call(state_dir, protocol.ListJobs(args.all))
        if args.json:
            import json

            print(json.dumps(jobs, indent=1), file=out)
        else:
            print(client.format_table(jobs), file=out)
        return EXIT_OK
    if command == "status":
        _print_status(client.call(state_dir, protocol.JobStatus(args.job)), args, out)
        return EXIT_OK
    if command in ("pause", "resume", "stop", "cancel"):
        reply = client.call(state_dir, protocol.Control(command, args.job))
        if getattr(args, "wait", False):
            reply = client.wait_until_settled(state_dir, args.job, timeout=120)
        print(f"job {reply['id']} ({reply['name']}): {reply['state']}", file=out)
        return EXIT_OK
    if command == "logs":
        client.follow_logs(state_dir, args.job, args.follow)
        return EXIT_OK
    if command == "checkpoint":
        reply = _live(state_dir, protocol.Checkpoint(args.job), "checkpoint")
        print(
            f"{reply['label']}: checkpoint at step {reply['step']}: {reply['manifest']}",
            file=out,
        )
        return EXIT_OK
    if command == "set":
        return _set_key(args, state_dir, out)
    if command == "export":
        status = client.call(state_dir, protocol.JobStatus(args.job))
        from pathlib import Path

        target = Path(args.out or f"{status['name']}.safetensors")
        path, step = client.export_job(status, status["config"], target)
        print(f"{path} (step {step})", file=out)
        return EXIT_OK
    if command == "hook":
        return _hook(args, state_dir, out)
    raise DaemonUsageError(f"zerotrain: unknown daemon command {command!r}")


def _print_status(reply: dict, args, out) -> None:
    """`zerotrain status [JOB]`: a job's fields, or the daemon's line and its jobs."""
    from . import client

    if args.json:
        import json

        print(json.dumps(reply, indent=1), file=out)
    elif args.job:
        reply.pop("config", None)
        width = max(map(len, reply))
        for key, value in reply.items():
            if key != "summary":
                print(f"{key:<{width}}  {'' if value is None else value}", file=out)
    else:
        d = reply["daemon"]
        print(
            f"daemon pid {d['pid']} at {d['state_dir']}: {d['cpus_in_use']} of "
            f"{d['cpus']} cpus in use, http {d['http'] or 'off'}",
            file=out,
        )
        print(client.format_table(reply["jobs"]), file=out)


def _set_key(args, state_dir: Path, out) -> int:
    """`zerotrain set JOB KEY=VALUE [--at-step N]`."""
    from . import protocol

    key, sep, value = args.assignment.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise DaemonUsageError(
            f"zerotrain set: expected KEY=VALUE (e.g. optimizer.lr=3e-4), got "
            f"{args.assignment!r}; nothing changed"
        )
    request = protocol.SetKey(args.job, key.strip(), value.strip(), args.at_step)
    reply = _live(state_dir, request, "set")
    print(
        f"{reply['label']}: {reply['key']} = {reply['value']!r} from "
        f"step {reply['step']} (recorded in {reply['file']})",
        file=out,
    )
    return EXIT_OK


def _hook(args, state_dir: Path, out) -> int:
    """`zerotrain hook attach JOB PATH[:NAME]` / `hook detach JOB NAME`."""
    from . import protocol

    target = args.spec if args.hook_action == "attach" else args.name
    if args.hook_action == "attach" and target.split(":", 1)[0] != "builtin":
        file, sep, name = target.partition(":")  # the daemon runs elsewhere: be exact
        target = os.path.abspath(file) + sep + name
    request = protocol.HookRequest(args.job, args.hook_action, target)
    reply = _live(state_dir, request, f"hook {args.hook_action}")
    after = "the steps after" if reply["action"] == "attach" else "no step after"
    print(
        f"{reply['label']}: {reply['action']}ed "
        f"{', '.join(reply['names'])}: {after} step {reply['step']} (records in "
        f"{reply['file']})",
        file=out,
    )
    return EXIT_OK


def is_run_dir(job: str) -> bool:
    """A live verb's JOB names a run dir rather than a daemon job: a directory holding
    a plan.json, or a multi-node node's DIR/node-K/plan.json (pipelines.cluster.live)."""
    from pathlib import Path

    path = Path(job)
    return path.is_dir() and ((path / "plan.json").is_file() or any(path.glob("node-*/plan.json")))


def _live(state_dir: Path, request, verb: str) -> dict:
    """checkpoint / set / hook: through the daemon for a job id or name; straight to the
    run's Coordinator for a run dir (a run of `zerotrain run`, one host or several
    nodes). The answer, with "label" naming the job or run."""
    from . import client, protocol

    if not is_run_dir(request.job):
        reply = client.call(state_dir, request, timeout=LIVE_TIMEOUT)
        return {**reply, "label": f"job {reply['id']} ({reply['name']})"}
    from ..cluster import messages as msg
    from ..cluster.live import LiveError, call_run

    if isinstance(request, protocol.Checkpoint):
        record = msg.CheckpointNow()
    elif isinstance(request, protocol.SetKey):
        try:
            record = msg.SetOverride(request.key, request.value, request.at_step)
        except msg.BadMessage as err:
            raise DaemonUsageError(f"zerotrain set: {err}; nothing changed") from None
    else:
        from .app import _hook_change

        record = _hook_change(request)
    label = f"run {request.job}"
    try:
        reply = call_run(request.job, record, timeout=LIVE_TIMEOUT - 30)
    except LiveError as err:
        raise DaemonUsageError(f"zerotrain {verb}: {label}: {err}") from None
    if "error" in reply:
        raise DaemonUsageError(f"zerotrain {verb}: {label}: {reply['error']}; nothing changed")
    return {**reply, "label": label}


def _serve(args, state_dir: Path) -> int:
    import logging  # (serve's alone: a client verb logs nothing)

    import trio

    from .app import Daemon
    from .http import parse_http

    http = parse_http(args.http)
    cpus = args.cpus or len(os.sched_getaffinity(0))
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="zerotrain serve: %(message)s"
    )
    daemon = Daemon(
        state_dir, cpus=cpus, http=http, grace=float(args.grace), job_nice=args.job_nice
    )
    daemon.open()
    trio.run(daemon.serve)
    return EXIT_OK
