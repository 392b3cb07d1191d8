"""The analyzer runner: calls each due hook on a context and never lets one hurt the rest.

This is the part of the HookAnalyzer actor that knows nothing of actors: give it the
hooks and a context, it runs the hooks due at that step and hands the records to its
sinks (hooks.jsonl, TensorBoard). The actor around it (phase 2) owns the mailbox, the
drop-when-behind policy and the process it all runs in.

## Failure rules, in one place

- A hook that **raises** (or returns something that is not metrics) is caught: one log
  line names the hook, the step, the exception and the line of the script it came
  from; the hook's `errors` count goes up; an error record goes to the sinks; the other
  hooks run as usual, and the same hook is called again at its next due step. After
  `max_consecutive_errors` failures in a row (None: never) it is DISABLED, logged once.
- A hook that **hangs** — has not returned `timeout_s` after it was called — is timed
  out. Python cannot stop a running thread, so the call is abandoned: it keeps running
  in its daemon worker thread (which cannot block interpreter exit; the next call gets
  a new worker), whatever it returns later is thrown away, and the hook is HUNG — never
  called again in this process, since it may hold a lock or half-updated state.
  `needs_restart` turns true: the HookAnalyzer answers by letting its process be
  restarted by its supervisor, the only way to reclaim the thread; the new process
  reloads the scripts from scratch. Until then the other hooks keep running.
- A sample the actor could not take because it was behind is **dropped** by the actor,
  which counts it here with `note_dropped`.
- A sink that fails (disk full) is logged and counted; the records of that step are lost.

None of these reach a rank: the ranks only offer contexts and never wait for answers.

## What the HookAnalyzer actor does with it (phase 2)

    hooks = [h for h in load_hooks(specs, base_dir=...) if h.kind == ANALYZER]
    runner = AnalyzerRunner(hooks, sinks=[HooksLog(run_dir / "hooks.jsonl"),
                                          EventWriter(run_dir / "tb")])
    on each offered step:  if not runner.due(step): skip it (nothing to build)
                           if behind:               runner.note_dropped()
                           else:  ctx = HookContext.from_flat(step, layout, reduced,
                                        rank_grads=..., params=..., update=..., ...)
                                  await trio.to_thread.run_sync(runner.run, ctx)
                           if runner.needs_restart: crash, to be restarted
    on stats request:      runner.stats()
    on stop:               runner.close()   (in `finally`)
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

DEFAULT_TIMEOUT_S = 10.0

_log = logging.getLogger("zerotrain.hooks")


class HookState(enum.Enum):
    """Where a hook is in its life inside one analyzer process.

        ACTIVE --returns metrics-------------------> ACTIVE
        ACTIVE --raises / bad metrics---------------> ACTIVE   (errors += 1)
        ACTIVE --max_consecutive_errors in a row----> DISABLED (not called again)
        ACTIVE --outlives its timeout---------------> HUNG     (not called again;
                                                                 runner.needs_restart)

    DISABLED and HUNG are final for this process; a restarted analyzer process starts
    every hook ACTIVE again, with its script freshly loaded.
    """

    ACTIVE = "active"
    DISABLED = "disabled"
    HUNG = "hung"


class _Hung(Exception):
    pass


class HookStats:
    """Counters of one hook: calls, ok, errors, timeouts, skipped (not ACTIVE), seconds."""

    __slots__ = ("state", "calls", "ok", "errors", "timeouts", "skipped", "seconds", "streak")

    def __init__(self):
        self.state = HookState.ACTIVE
        self.calls = self.ok = self.errors = self.timeouts = self.skipped = self.streak = 0
        self.seconds = 0.0

    def as_dict(self):
        return {
            "state": self.state.value,
            **{k: getattr(self, k) for k in ("calls", "ok", "errors", "timeouts", "skipped")},
            "seconds": round(self.seconds, 6),
        }


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
    """Runs analyzer hooks on contexts, with the failure rules of this module's doc.

    hooks                   analyzer Hooks (transforms are refused: they run in the rank).
    sinks                   objects with write(records) (and optionally close()):
                            HooksLog, pipelines.hooks.tensorboard.EventWriter.
    timeout_s               default per-call budget; a hook's own timeout_s wins.
                            None: call inline, without a thread and without a timeout.
    max_consecutive_errors  disable a hook after this many failures in a row (None: never).
    label                   log-line prefix: the actor's role (and rank).
    """

    def __init__(
        self,
        hooks,
        *,
        sinks=(),
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_consecutive_errors: int | None = None,
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
        self.sinks = list(sinks)
        self.timeout_s = timeout_s
        self.max_consecutive_errors = max_consecutive_errors
        self.label = label
        self.logger = logger
        self.dropped = 0
        self.sink_errors = 0
        self._stats = {h.name: HookStats() for h in hooks}
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
            self._write(records)
        return records

    def run_hook(self, hook: Hook, ctx) -> dict | None:
        """One call under the failure rules: a record (metrics or error), or None if the
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
            return self._failed(hook, stats, ctx.step, exc)
        finally:
            stats.seconds += time.perf_counter() - start
        stats.ok += 1
        stats.streak = 0
        return make_record(ctx.step, hook, metrics) if metrics else None

    def note_dropped(self, n: int = 1):
        """Count `n` contexts the actor dropped because it was behind."""
        self.dropped += n

    @property
    def needs_restart(self) -> bool:
        """True once a hook has hung: only a new process reclaims its thread."""
        return any(s.state is HookState.HUNG for s in self._stats.values())

    def stats(self) -> dict:
        """{"hooks": {name: counters}, "dropped": n, "sink_errors": n}."""
        return {
            "hooks": {name: s.as_dict() for name, s in self._stats.items()},
            "dropped": self.dropped,
            "sink_errors": self.sink_errors,
        }

    def close(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    # ---- internals -------------------------------------------------------------------

    def _call(self, hook, ctx, timeout):
        if timeout is None:
            return hook(ctx)
        if self._worker is None:
            self._worker = _Worker()
            weakref.finalize(self, self._worker.stop)  # a forgotten runner ends its thread
        return self._worker.call(hook, ctx, timeout)

    def _failed(self, hook, stats, step, exc):
        stats.errors += 1
        stats.streak += 1
        error = f"{type(exc).__name__}: {exc}"
        self._warn(f"hook {hook.name!r} failed at step {step}{_where(exc, hook)}: {error}")
        limit = self.max_consecutive_errors
        if limit is not None and stats.streak >= limit:
            stats.state = HookState.DISABLED
            self._warn(f"hook {hook.name!r} disabled after {stats.streak} failures in a row")
        return make_record(step, hook, error=error)

    def _write(self, records):
        for sink in self.sinks:
            try:
                sink.write(records)
            except Exception as exc:  # losing a step of metrics beats losing the analyzer
                self.sink_errors += 1
                self._warn(f"sink {type(sink).__name__} failed: {type(exc).__name__}: {exc}")

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
