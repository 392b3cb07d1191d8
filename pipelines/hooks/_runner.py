"""The analyzer runner: calls each due hook on a context and never lets one hurt the rest.

This is the part of hook analysis that knows nothing of actors: give it hooks and a
context, it calls the hooks due at that step, records what each returned (or how it
failed) and hands the records to its sinks (hooks.jsonl, TensorBoard). It is used in two
places: by each HookWorker of the analyzer process (pipelines.hooks.process), one hook
per runner, and directly by a single-process run (pipelines.local).

What it does when a hook fails is one part of the hook failure policy, written out in
`pipelines.hooks` (the package doc): it records the error and marks a hung hook HUNG;
what happens to the hook next (called again, restarted, disabled) is decided around it.

With `timeout_s=None` a hook runs inline in the caller's thread: cheaper, but a hang
then hangs the runner (fine in tests and notebooks, never in a run).
"""

import enum
import json
import logging
import queue
import threading
import time
import traceback
import weakref
from pathlib import Path

from ._hook import ANALYZER, Hook, HookError
from ._metrics import make_record, validate_metrics

# the package exports DEFAULT_TIMEOUT_S, AnalyzerRunner, HooksLog and HookState; HookStats
# and Sinks serve the analyzer process (hooks.process) only
__all__ = ["DEFAULT_TIMEOUT_S", "AnalyzerRunner", "HookState", "HookStats", "HooksLog", "Sinks"]

DEFAULT_TIMEOUT_S = 10.0

_log = logging.getLogger("zerotrain.hooks")


class HookState(enum.Enum):
    """Where a hook is in its life inside one analyzer process.

        ACTIVE --returns metrics-------------------> ACTIVE
        ACTIVE --raises / bad metrics---------------> ACTIVE   (errors += 1; the runner's
                                                                owner decides what next)
        ACTIVE --outlives its timeout---------------> HUNG     (not called again;
                                                                runner.needs_restart)
        ACTIVE --disabled by the failure policy------> DISABLED (not called again)

    DISABLED and HUNG are final for this process; a restarted analyzer process starts
    every hook ACTIVE again (except those quarantined for hanging), its script freshly
    loaded.
    """

    ACTIVE = "active"
    DISABLED = "disabled"
    HUNG = "hung"


class _Hung(Exception):
    pass


class HookStats:
    """Counters of one hook: calls, ok, errors, timeouts, skipped (not ACTIVE), seconds.

    The one record of a hook's calls: a runner counts into it, and the analyzer process
    hands the same object to each incarnation of the hook's worker, so the counts
    outlive a restart."""

    __slots__ = ("state", "calls", "ok", "errors", "timeouts", "skipped", "seconds")

    def __init__(self):
        self.state = HookState.ACTIVE
        self.calls = self.ok = self.errors = self.timeouts = self.skipped = 0
        self.seconds = 0.0

    def as_dict(self):
        return {
            "state": self.state.value,
            **{k: getattr(self, k) for k in ("calls", "ok", "errors", "timeouts", "skipped")},
            "seconds": round(self.seconds, 6),
        }


class Sinks:
    """Where records go: each sink gets every batch; a sink that fails (disk full) is
    logged and counted (`errors`) and the records of that batch are lost to it -- losing
    a step of metrics beats losing the analyzer."""

    def __init__(self, sinks=(), *, label: str = "HookAnalyzer", logger: logging.Logger = _log):
        self.sinks, self.label, self.logger = list(sinks), label, logger
        self.errors = 0

    def write(self, records):
        for sink in self.sinks:
            try:
                sink.write(records)
            except Exception as exc:
                self.errors += 1
                self.logger.warning(
                    "[%s] sink %s failed: %s: %s", self.label, type(sink).__name__,
                    type(exc).__name__, exc,
                )  # fmt: skip

    def close(self):
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            try:
                if close is not None:
                    close()
            except Exception as exc:
                self.logger.warning("[%s] closing %s: %s", self.label, type(sink).__name__, exc)


class HooksLog:
    """A sink appending one JSON object per record to a file (hooks.jsonl), one per line.

    Lines are strict JSON (nan is written as null) and flushed after every `write`, so a
    crash loses at most the step being written. Appends: a restarted analyzer continues
    the same file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, records):
        for record in records:
            self._file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


class AnalyzerRunner:
    """Runs analyzer hooks on contexts; records a hook's failure and goes on.

    hooks      analyzer Hooks (transforms are refused: they run in the rank).
    sinks      objects with write(records) (and optionally close()):
               HooksLog, pipelines.hooks.tensorboard.EventWriter.
    timeout_s  default per-call budget; a hook's own timeout_s wins.
               None: call inline, without a thread and without a timeout.
    stats      {name: HookStats} to count into (default: fresh ones); the analyzer
               process passes the counters its earlier workers of that hook kept.
    label      log-line prefix: the actor's role (and rank).
    """

    def __init__(
        self,
        hooks,
        *,
        sinks=(),
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        stats: dict | None = None,
        label: str = "HookAnalyzer",
        logger: logging.Logger = _log,
    ):
        hooks = list(hooks)
        wrong = [
            getattr(h, "name", h) for h in hooks if not isinstance(h, Hook) or h.kind != ANALYZER
        ]
        if wrong:
            raise HookError(f"AnalyzerRunner takes analyzer hooks only, got {wrong}")
        names = [h.name for h in hooks]
        if len(set(names)) != len(names):
            raise HookError(f"hook names must be unique in a run, got {names}")
        self.hooks = hooks
        self.sinks = Sinks(sinks, label=label, logger=logger)
        self.timeout_s = timeout_s
        self.label = label
        self.logger = logger
        stats = stats if stats is not None else {}
        self._stats = {h.name: stats.setdefault(h.name, HookStats()) for h in hooks}
        self._worker = None

    # ---- client API ------------------------------------------------------------------

    def due(self, step: int) -> list[Hook]:
        """The hooks that want `step`, whatever their state (the actor can skip the
        context entirely when this is empty)."""
        return [h for h in self.hooks if h.due(step)]

    def run(self, ctx) -> list[dict]:
        """Run every ACTIVE hook due at ctx.step; send the records to the sinks; return them."""
        records = [r for h in self.due(ctx.step) if (r := self.run_hook(h, ctx)) is not None]
        if records:
            self.sinks.write(records)
        return records

    def run_hook(self, hook: Hook, ctx) -> dict | None:
        """One call under the failure policy: a record (metrics or error), or None if the
        hook is not ACTIVE or had nothing to say (returned None or {})."""
        stats = self._stats[hook.name]
        if stats.state is not HookState.ACTIVE:
            stats.skipped += 1
            return None
        stats.calls += 1
        timeout = hook.timeout_s if hook.timeout_s is not None else self.timeout_s
        start = time.perf_counter()
        try:
            metrics = validate_metrics(hook.name, self._call(hook, ctx, timeout))
        except _Hung:
            self._worker = None  # abandoned with its hung call; the next call gets a new one
            stats.timeouts += 1
            stats.state = HookState.HUNG
            self._warn(f"hook {hook.name!r} hung at step {ctx.step} (> {timeout} s): abandoned")
            return make_record(ctx.step, hook, error=f"timeout: no answer within {timeout} s")
        except Exception as exc:  # a research script's bug must not end the analyzer
            stats.errors += 1
            error = f"{type(exc).__name__}: {exc}"
            self._warn(f"hook {hook.name!r} failed at step {ctx.step}{_where(exc, hook)}: {error}")
            return make_record(ctx.step, hook, error=error)
        finally:
            stats.seconds += time.perf_counter() - start
        stats.ok += 1
        return make_record(ctx.step, hook, metrics) if metrics else None

    @property
    def needs_restart(self) -> bool:
        """True once a hook has hung: only a new process reclaims its thread."""
        return any(s.state is HookState.HUNG for s in self._stats.values())

    def stats(self) -> dict:
        """{"hooks": {name: counters}, "sink_errors": n}."""
        return {
            "hooks": {name: s.as_dict() for name, s in self._stats.items()},
            "sink_errors": self.sinks.errors,
        }

    def close(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self.sinks.close()

    # ---- internals -------------------------------------------------------------------

    def _call(self, hook, ctx, timeout):
        if timeout is None:
            return hook(ctx)
        if self._worker is None:
            self._worker = _Worker()
            weakref.finalize(self, self._worker.stop)  # a forgotten runner ends its thread
        return self._worker.call(hook, ctx, timeout)

    def _warn(self, message):
        self.logger.warning("[%s] %s", self.label, message)


class _Worker:
    """A daemon thread that runs hook calls handed to it, one at a time.

    One thread per runner, not per call: a thread start costs milliseconds on a busy
    machine, a hand-over through two queues tens of microseconds. A worker whose call
    hangs is abandoned (the runner makes a new one for the next call); when the hung
    call returns, its answer lands in the abandoned worker's queue, read by nobody.
    """

    def __init__(self):
        self._jobs = queue.SimpleQueue()
        self._answers = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="HookAnalyzer-worker", daemon=True).start()

    def _loop(self):
        while (job := self._jobs.get()) is not None:
            hook, ctx = job
            try:
                self._answers.put((True, hook(ctx)))
            except Exception as exc:  # handed to the caller's thread
                self._answers.put((False, exc))
            except BaseException as exc:  # sys.exit() in a hook is a failing hook, not an exit
                self._answers.put((False, RuntimeError(f"hook raised {type(exc).__name__}")))

    def call(self, hook, ctx, timeout):
        """hook(ctx) in the worker thread; _Hung if no answer within `timeout` seconds."""
        self._jobs.put((hook, ctx))
        try:
            ok, value = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise _Hung from None
        if not ok:
            raise value
        return value

    def stop(self):
        self._jobs.put(None)


def _where(exc, hook):
    """' (script.py:12)': the innermost traceback frame in the hook's own file (else the
    innermost frame), to point at the bug rather than at numpy."""
    frames = traceback.extract_tb(exc.__traceback__)
    code = getattr(hook.fn, "__code__", None)
    own = [f for f in frames if code is not None and f.filename == code.co_filename]
    frame = (own or frames or [None])[-1]
    return f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
