"""The `zerotrain` command line.

    zerotrain run [CONFIG] [--ranks N] [--mode ddp|zero1|zero2] [--steps N] [--seed S]
                  [--run-dir DIR] [--set KEY=VALUE ...] [--resume [DIR]] [--hook PATH[:NAME]]
    zerotrain simulate [CONFIG] --ranks N --chaos SPEC [run's options]
    zerotrain pipelines
    zerotrain ckpt inspect DIR
    zerotrain ckpt verify DIR
    zerotrain generate RUN_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K]
    zerotrain predict RUN_DIR INPUT [--out FILE]
    zerotrain eval RUN_DIR [--data PATH]          (these three: pipelines.use)
    zerotrain env [CONFIG] [--ranks N] [identity flags] [--json]   (pipelines.launch)
    zerotrain keys init DIR --nodes N

CONFIG is a .toml path or a built-in pipeline name (`zerotrain pipelines`); without it the
default pipeline (char_lm) runs. `--set` overrides any config key by dotted path; the value
is read as TOML (`--set optimizer.betas=[0.9,0.95]`), a bare word as a string.

Exit codes: 0 success; 2 usage or config error, or a run that cannot start as asked (a
--resume naming nothing resumable or a checkpoint of another run, a batch larger than the
data: one line on stderr, no traceback, no run dir created); 3 training failed (one line
on stderr; the traceback of an unexpected error goes to error.txt in the run dir); 4
stopped by a signal (SIGINT, SIGTERM, SIGUSR1, SIGUSR2), resumable: one line naming the
step's checkpoint and the --resume that continues it.
`ckpt verify` exits 0 when the newest usable checkpoint it names exists, 1 when nothing
under DIR can be resumed from.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .cliargs import flag_overrides, int_at_least
from .daemon import DAEMON_COMMANDS, register_daemon_commands, run_daemon_command

TYPE_CHECKING = False  # (typing and pathlib stay out of a client verb's start)
if TYPE_CHECKING:
    from pathlib import Path

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_FAILED, EXIT_STOPPED = 0, 1, 2, 3, 4


class _UsageError(Exception):
    pass


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, sized to the terminal without importing shutil (argparse
    builds a formatter for every add_argument, and shutil brings zlib, bz2 and lzma into
    every client verb's start): $COLUMNS, else stdout's terminal, else 80 columns."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """What shutil.get_terminal_size().columns says."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


_positive_int, _nonneg_int = int_at_least(1), int_at_least(0)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a .toml path or a built-in pipeline name (default: char_lm)",
    )
    p.add_argument("--ranks", type=_positive_int, help="number of rank processes")
    p.add_argument("--mode", choices=("ddp", "zero1", "zero2"), help="data-parallel mode")
    p.add_argument("--steps", type=_nonneg_int, help="optimizer steps (0: until stopped)")
    p.add_argument("--seed", type=_nonneg_int, help="run seed")
    p.add_argument(
        "--model",
        metavar="PATH.py:NAME",
        help="a model from a file (model.name = file:PATH.py:NAME)",
    )
    p.add_argument("--run-dir", help="output directory (default runs/<pipeline>-<time>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from the latest valid checkpoint in DIR (a run dir or a "
        "checkpoint root; default: --run-dir, else the newest run of this "
        "pipeline)",
    )
    p.add_argument(
        "--hook",
        dest="hooks",
        action="append",
        default=[],
        metavar="PATH[:NAME]",
        help="a gradient-hook script (repeatable)",
    )
    p.add_argument(
        "--overrides",
        dest="overrides_file",
        metavar="FILE",
        help="live overrides to apply at their steps: a RUN/overrides.jsonl that "
        "`zerotrain set` recorded (one JSON object a line: step, key, value)",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue although data files changed since the run",
    )


def _parser() -> _Parser:
    parser = _Parser(prog="zerotrain", description="Data-parallel training, OTP-style.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="train a pipeline")
    _add_run_options(run)
    from .launch import add_identity_options

    add_identity_options(run)
    run.add_argument("--keys", metavar="DIR", help="the cluster's CURVE keys (multi-node)")
    sim = sub.add_parser("simulate", help="train with injected faults (chaos simulation)")
    _add_run_options(sim)
    add_identity_options(sim)  # a node of a multi-node simulation (ranks named globally)
    sim.add_argument("--keys", metavar="DIR", help="the cluster's CURVE keys (multi-node)")
    sim.add_argument(
        "--chaos",
        required=True,
        metavar="SPEC",
        help="';'-separated KIND:key=value,... events (kill, term, stall, "
        "hang, delay, straggler, random-kill)",
    )
    sub.add_parser("pipelines", help="list the built-in pipelines")
    ckpt = sub.add_parser("ckpt", help="inspect or verify checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", parser_class=_Parser)
    for name, text in (
        ("inspect", "describe checkpoints"),
        (
            "verify",
            "check every file's size and SHA-256; exit 1 when none can be resumed from",
        ),
    ):
        c = ckpt_sub.add_parser(name, help=text)
        c.add_argument("dir", help="a checkpoint dir, a checkpoint root or a run dir")
    report = sub.add_parser("report", help="render PNG plots of a run's metrics and hooks")
    report.add_argument("run_dir", help="the run's directory (holds metrics.jsonl)")
    report.add_argument("--out", help="where to write the PNGs (default RUN_DIR/report)")
    from .use import add_commands

    add_commands(sub)
    from .launch import register_launch_commands

    register_launch_commands(sub)
    register_daemon_commands(sub)
    return parser


def _daemon_parser(verb: str) -> _Parser:
    """The parser of daemon command ``verb`` (`serve` or a client verb) alone. `zerotrain
    status` is a remote call that should cost little more than the interpreter's start:
    the full parser imports numpy and the training modules for the other commands'
    options, and builds every other verb's."""
    parser = _Parser(prog="zerotrain", description="Data-parallel training, OTP-style.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    register_daemon_commands(sub, verb)
    return parser


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def _resolve(args):
    """The Config from CONFIG + --set + the flag shorthands (flags win)."""
    from .config import load_config

    return load_config(args.config, flag_overrides(args, args.model))


def _resume_dir(args, cfg) -> Path | None:
    from pathlib import Path

    if args.resume is None:
        return None
    if args.resume:
        return Path(args.resume)
    if args.run_dir:
        return Path(args.run_dir)
    runs = sorted(Path("runs").glob(f"{cfg.name}-*"), key=lambda p: p.stat().st_mtime)
    runs = [r for r in runs if (r / "checkpoints").is_dir()]
    if not runs:
        raise _UsageError(
            f"zerotrain run: --resume without DIR found no runs/{cfg.name}-* with checkpoints"
        )
    return runs[-1]


def _note(args, line: str) -> None:
    print(f"zerotrain {args.command}: {line}", file=sys.stderr)


def _cmd_run(args, out) -> int:
    from .core import RunRefused, RunStopped, TrainingFailed
    from .local import run_local
    from .store.rundir import RunDirRefused

    cfg, resume, chaos, layout, analyzers = _plan_run(args)
    overrides = _overrides(args, cfg, resume)
    run_dir = _run_dir(args, cfg, resume, layout)
    try:
        if (
            cfg.cluster.ranks > 1
            or chaos is not None
            or analyzers
            or layout is not None
            or overrides is not None  # the cluster's ranks apply them (one rank too)
        ):
            from .cluster import run_cluster

            run_cluster(
                cfg,
                run_dir,
                resume=resume,
                hooks=args.hooks,
                chaos=chaos,
                out=out,
                layout=layout,
                overrides=overrides,
            )
        else:
            run_local(cfg, run_dir, resume=resume, hooks=args.hooks, out=out)
    except (RunRefused, RunDirRefused, TrainingFailed, RunStopped) as err:
        return _refused_failed_or_stopped(args, err)
    except (KeyboardInterrupt, BaseExceptionGroup) as err:
        # e.g. node 0 refused this node: the refusal comes wrapped in trio's groups
        ended = _leaf(err, (RunRefused, RunDirRefused, RunStopped))
        if ended is not None:
            return _refused_failed_or_stopped(args, ended)
        if _leaf(err, KeyboardInterrupt) is not None:  # a signal outside the steps
            return _interrupted(run_dir, cfg)
        if not isinstance(err, Exception):
            raise
        return _failed(err, run_dir, cfg)
    except Exception as err:
        return _failed(err, run_dir, cfg)
    return EXIT_OK


def _overrides(args, cfg, resume) -> list[dict] | None:
    """--overrides FILE's records, checked against the config (a usage error, exit 2)."""
    if getattr(args, "overrides_file", None) is None:
        return None
    from .config import ConfigError, check_overrides
    from .store.overrides import OverridesError, read_overrides

    where = f"--overrides {args.overrides_file}"
    if resume is not None:
        raise _UsageError(
            f"zerotrain {args.command}: {where} starts a run; a --resume replays the "
            "overrides its run recorded (RUN/overrides.jsonl)"
        )
    if not os.path.isfile(args.overrides_file):
        raise _UsageError(f"zerotrain {args.command}: {where}: no such file")
    try:
        records = read_overrides(args.overrides_file)
        check_overrides(cfg, records, where)
    except (OverridesError, ConfigError) as err:
        raise _UsageError(f"zerotrain {args.command}: {err}") from None
    return records


def _plan_run(args):
    """What `run`/`simulate` checks before any rank starts (each a usage error, exit 2):
    (cfg, resume dir, parsed chaos, this node's layout, whether analyzers run)."""
    from .core import RunRefused, load_hooks
    from .data import DataError
    from .use import check_data

    cfg = _resolve(args)
    try:
        hooks = load_hooks(args.hooks)
    except ValueError as err:
        raise _UsageError(f"zerotrain run: {err}") from None
    # analyzers run in their own process, off the critical path: that is the cluster's
    # way even for one rank (the in-process runner would run them between steps)
    analyzers = any(h.kind == "analyzer" for h in hooks) or bool(cfg.hooks.specs)
    resume = _resume_dir(args, cfg)
    try:  # before any rank starts: bad data is a usage error (exit 2)
        check_data(cfg, resume=resume, allow_change=args.allow_data_change)
    except DataError as err:
        raise _UsageError(f"zerotrain run: data: {err}") from None
    chaos = None
    if getattr(args, "chaos", None) is not None:
        from .cluster.chaos import parse_chaos

        chaos = parse_chaos(args.chaos, cfg.cluster.ranks)
    from .cluster.nodes import layout_from_args

    try:  # one host, or this node of several (pipelines.cluster.nodes)
        layout = layout_from_args(args, cfg, os.environ, lambda line: _note(args, line))
    except RunRefused as err:
        raise _UsageError(f"zerotrain {args.command}: {err}") from None
    return cfg, resume, chaos, layout, analyzers


def _run_dir(args, cfg, resume: Path | None, layout) -> Path:
    """--run-dir; else a multi-node run's own default; else the resumed run's dir when
    it holds a config.json; else runs/<pipeline>-<time>."""
    from pathlib import Path

    from .store.rundir import default_run_dir

    if layout is not None and not args.run_dir:
        from .cluster.nodes import default_run_dir as node_run_dir

        args.run_dir = str(node_run_dir(cfg.name, layout))
    if args.run_dir:
        return Path(args.run_dir)
    if resume and (resume / "config.json").exists():
        return resume
    return default_run_dir(cfg.name)


def _refused_failed_or_stopped(args, err: Exception) -> int:
    """The one line and exit code of a run that could not start as asked (2), failed
    (3) or was stopped by a signal (4)."""
    from .core import RunStopped, TrainingFailed

    if isinstance(err, TrainingFailed):
        line, code = f"zerotrain run: training failed: {err}", EXIT_FAILED
    elif isinstance(err, RunStopped):
        line, code = f"zerotrain run: {err}", EXIT_STOPPED
    else:  # RunRefused, RunDirRefused
        line, code = f"zerotrain {args.command}: {err}", EXIT_USAGE
    print(line, file=sys.stderr)
    return code


def _interrupted(run_dir: Path, cfg) -> int:
    """A signal that came outside the training steps (before the first or after the
    last): what to do next, in one line; exit 4."""
    from .store.rundir import last_good_checkpoint

    why = f"{_INTERRUPTED[-1]} to the zerotrain process"
    last = last_good_checkpoint(run_dir / cfg.checkpoint.dir)
    if last == "none written yet":
        line = f"stopped before the first step ({why}); nothing to resume: start it again"
    else:
        line = (
            f"stopped outside the training steps ({why}); last good checkpoint: "
            f"{last}; continue with --resume {run_dir}"
        )
    print(f"zerotrain run: {line}", file=sys.stderr)
    return EXIT_STOPPED


def _failed(err: Exception, run_dir: Path, cfg) -> int:
    """An unexpected error's one line (and its traceback in error.txt); exit 3."""
    from .store.rundir import last_good_checkpoint

    why = _world_error(err, run_dir)
    if why is not None:  # a full, read-only or forbidden disk: the cause, in one line
        last = last_good_checkpoint(run_dir / cfg.checkpoint.dir)
        print(f"zerotrain run: training failed: {why}; last good checkpoint: {last}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    print(
        f"zerotrain run: training failed: {type(err).__name__}: {err} ({_save_traceback(run_dir)})",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _leaf(err: BaseException, kind: type | tuple) -> BaseException | None:
    """`err` if it is a `kind`, else the first `kind` inside it (trio raises groups)."""
    return _first(err, lambda leaf: leaf if isinstance(leaf, kind) else None)


def _world_error(err: BaseException, run_dir: Path) -> str | None:
    """disk_error of `err` or of the first OSError inside it (trio raises groups)."""
    from .store.rundir import disk_error

    return _first(err, lambda leaf: disk_error(leaf, run_dir))


def _first(err: BaseException, pick):
    """pick(e) for the first exception e, in order, of `err`'s leaves (`err` itself when
    it is not an exception group) for which it is not None; else None."""
    if not isinstance(err, BaseExceptionGroup):
        return pick(err)
    for inner in err.exceptions:
        found = _first(inner, pick)
        if found is not None:
            return found
    return None


def _save_traceback(run_dir: Path) -> str:
    """Write the current exception's traceback to error.txt in the run dir; say where
    it went. Never raises: the run dir may be what failed."""
    import traceback

    text = traceback.format_exc()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(text)
    except OSError as err:
        return f"traceback not saved: {run_dir / 'error.txt'}: {os.strerror(err.errno or 0)}"
    return f"traceback in {run_dir / 'error.txt'}"


def _cmd_pipelines(args, out) -> int:
    from .config import DEFAULT_PIPELINE, builtin_pipelines

    pipes = builtin_pipelines()
    width = max(map(len, pipes))
    for name, text in pipes.items():
        mark = " (default)" if name == DEFAULT_PIPELINE else ""
        print(f"{name:<{width}}  {text}{mark}", file=out)
    return EXIT_OK


def _cmd_ckpt(args, out) -> int:
    from pathlib import Path

    from .store.checkpoint import inspect_checkpoint

    target = Path(args.dir)
    if not target.exists():
        raise _UsageError(f"zerotrain ckpt {args.ckpt_command}: no such directory {str(target)!r}")
    if (target / "checkpoints").is_dir() and not (target / "manifest.json").exists():
        target = target / "checkpoints"
    rows = inspect_checkpoint(target)
    if not rows:
        print(f"no checkpoints under {target}", file=out)
        return EXIT_INVALID if args.ckpt_command == "verify" else EXIT_OK
    if args.ckpt_command == "inspect":
        import json

        for row in rows:
            print(json.dumps(row, indent=1, sort_keys=True), file=out)
        return EXIT_OK
    bad, usable = 0, None
    for row in rows:  # oldest first
        ok = row["status"] == "ok"
        bad += not ok
        usable = row if ok else usable
        print(
            f"{'OK ' if ok else 'BAD'} {row['path']}: "
            + (
                "step {} world {} mode {} {} bytes".format(
                    row.get("step"), row.get("world"), row.get("mode"), row.get("bytes")
                )
                if ok
                else row["status"]
            ),
            file=out,
        )
    print(f"{len(rows) - bad} of {len(rows)} checkpoints valid", file=out)
    if usable is None:
        print(f"nothing to resume from under {target}", file=out)
        return EXIT_INVALID
    print(f"newest usable: {usable['path']} (step {usable.get('step')})", file=out)
    return EXIT_OK


_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_blas_threads() -> None:
    """One BLAS thread per rank process unless the user chose (the env vars win).

    Two reasons, both measured on a 2-core machine: the parameters' bits depend on the
    BLAS thread count (1 and 2 threads gave different params_sha256 for the default
    pipeline), so a fixed count keeps runs reproducible across machines; and spinning
    BLAS threads on a busy machine made the default run 2.4x slower (141 s vs 59 s).
    Must run before numpy is imported to take effect.
    """
    if "numpy" in sys.modules:
        return
    for var in _BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")


def _check_blas_choice() -> None:
    """ZEROTRAIN_BLAS names a library that is there and loads (a usage error before any
    rank starts, not N crashed ranks). Loading MKL here costs about 10 ms."""
    from cykernels import gemm

    try:
        gemm.use(gemm.environment_choice())
    except (ValueError, ImportError) as err:
        raise _UsageError(f"zerotrain: {err}") from None


def _cmd_report(args, out) -> int:
    from .hooks.report import main_report

    return main_report([args.run_dir, *(["--out", args.out] if args.out else [])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # first of all: building the parser imports numpy (pipelines.use -> config)
    _limit_blas_threads()
    # outside trio (starting, loading data, writing the summary) a stop signal
    # interrupts like Ctrl-C (exit 4); inside it the runners take it as a planned stop
    previous = _install_stop_handlers()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run started, or a command other than run
        print(f"zerotrain: stopped by {_INTERRUPTED[-1]} before the run started",
              file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_stop_handlers() -> dict:
    """SIGTERM, SIGUSR1 and SIGUSR2 interrupt like SIGINT (see _interrupt); the handlers
    they replace, to put back. SIGINT gets Python's own handler if it was ignored (a
    process a shell started in the background): trio installs its safe KeyboardInterrupt
    delivery only over that one, and _interrupt hands the other signals to it."""
    stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    previous = {signum: signal.signal(signum, _interrupt) for signum in stops}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    return previous


# the signal that raised KeyboardInterrupt: SIGINT unless _interrupt says otherwise (SIGINT
# keeps Python's own handler, which trio protects its core from)
_INTERRUPTED = ["SIGINT"]


def _interrupt(signum, frame):
    _INTERRUPTED.append(signal.Signals(signum).name)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        # Inside trio.run: SIGINT's handler is trio's. Before the runner's own signal
        # receiver is installed, it delivers the KeyboardInterrupt where that is safe
        # (raised in trio's own code it would be a TrioInternalError); it takes SIGINT
        # alone (it asserts so). While a runner installs its receiver, SIGINT's handler
        # is already the receiver's, which must hear this signal, not SIGINT.
        try:
            handler(signum, frame)
        except AssertionError:
            handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    daemon = bool(argv) and argv[0] in DAEMON_COMMANDS
    try:
        args = (_daemon_parser(argv[0]) if daemon else _parser()).parse_args(argv)
    except _UsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    if daemon:  # (imports only what the verb needs: see _daemon_parser)
        return run_daemon_command(args)
    from .config import ConfigError
    from .data import DataError
    from .launch import LAUNCH_COMMANDS, run_launch_command
    from .use import COMMANDS, UsageError

    try:
        if args.command is None:
            raise _UsageError(
                "zerotrain: expected a command: run, simulate, pipelines, ckpt, report, "
                "generate, predict, eval, "
                f"{', '.join(LAUNCH_COMMANDS)}, {', '.join(DAEMON_COMMANDS)} (see zerotrain --help)"
            )
        if args.command == "ckpt" and args.ckpt_command is None:
            raise _UsageError("zerotrain ckpt: expected inspect DIR or verify DIR")
        if args.command in LAUNCH_COMMANDS:
            return run_launch_command(args, sys.stdout)
        if args.command in ("run", "simulate"):
            _check_blas_choice()
        handler = {
            "run": _cmd_run,
            "simulate": _cmd_run,
            "pipelines": _cmd_pipelines,
            "ckpt": _cmd_ckpt,
            "report": _cmd_report,
            **COMMANDS,
        }[args.command]
        return handler(args, sys.stdout if args.command != "run" else sys.stderr)
    except (_UsageError, UsageError) as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    except DataError as err:
        print(f"zerotrain {args.command}: data: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as err:
        print(f"zerotrain: config error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
