"""Gradient hooks: research code that watches (analyzers) or edits (transforms) gradients.

A research script is a plain Python file of decorated functions:

    import numpy as np
    from pipelines.hooks import analyzer

    @analyzer(every=10)
    def embedding_norm(ctx):
        # Does the embedding's gradient shrink as training goes on?
        return {"norm": float(np.linalg.norm(ctx.grads["embed.weight"]))}

run with `zerotrain run --hook path/to/script.py[:embedding_norm]`, listed in the
config's hooks, or installed as an entry point of the group "zerotrain.hooks". Each hook
gets a `HookContext` (step, loss, lr, the reduced gradient, each rank's own gradient,
the parameters and the update, all by parameter name) and returns a dict of metrics or
None; the metrics go to hooks.jsonl and TensorBoard, and `zerotrain report` plots them.

Analyzers run in the analyzer process (`pipelines.hooks.process`), read-only, off the
critical path: training never waits for one. Transforms run in each rank on the rank's
gradient before the reduction, with a deterministic RNG (see `TransformRunner`). The
built-in analyses are in `pipelines.hooks.builtins`.

## When an analyzer fails: the policy, in one place

The runner (`AnalyzerRunner`) records; the analyzer process's supervisors decide.

- **It raises** (or returns something that is not metrics): the runner logs one line
  (hook, step, exception, the line of the script it came from), counts it (`errors`)
  and writes the record {"step", "hook", "kind", "error"} to hooks.jsonl. In the
  analyzer process the hook's worker then crashes and its own supervisor restarts it,
  reloading the script from scratch (`restarts`); a hook failing more than
  `HOOK_RESTARTS` allows (3 times in 5 s) makes that supervisor give up: the hook is
  DISABLED for the rest of the process (logged once; summary.json's "disabled"). The
  other hooks never notice. (A single-process run without an analyzer process,
  `pipelines.local`, has no supervisor: there the hook is simply called again at its
  next due step.)
- **It hangs** (no answer within its timeout_s): the runner gives up waiting, records
  "timeout: ..." and marks the hook HUNG; the other hooks go on in their own threads.
  Python cannot stop a thread, so the analyzer process then exits (`EXIT_HUNG`) and
  its supervisor starts a fresh one with every script reloaded. Hangs are
  counted over the whole run in RUN_DIR/hooks_quarantine.json; a hook that hung
  `MAX_HANGS` (2) times is not loaded again.
- **A sink fails** (disk full): logged and counted (`sink_errors`); the records of that
  step are lost, the analyzer goes on.
- **The analyzer process dies** (SIGKILL, or exits for a hang): its supervisor in the
  `zerotrain` process ("AnalyzerSupervisor", 10 restarts in 10 s, apart from the ranks')
  restarts it; if that gives up, the run goes on without analyzers. hooks.jsonl is
  appended to (lines are flushed per step); in-process counters start again from zero
  (hangs excepted). A process that falls silent for the run's heartbeat timeout (a hook
  holding the GIL, a starved process) is killed and restarted the same way.
- **A hook restarts** (its worker, or the analyzer process): whatever state it kept is
  gone, so its series starts afresh at the first step S it is then called on:
  `ctx.series_start` is S - every (noise_scale's averages count from there), and each
  of its records says "restarted_at": S (summary.json: hooks.analyzer.hooks.<name>.
  restarted_at). A step whose records were written just before a kill may appear twice,
  the second time with restarted_at.
- **The analyzer is slow, down or gone**: nothing reaches a rank. A rank offers a
  sample only when the analyzer has answered its previous one, and otherwise declines
  the step, counted (`pipelines.hooks.link`); what the analyzer could not keep up with
  is dropped and counted there (`pipelines.hooks.process`). A step due for an exact
  hook is the exception: the ranks wait for the analyzer, through its restart, and
  send the step again (`pipelines.hooks.link`, "Exact hooks").

This module is the public face of the private modules beside it; every public name is
exported here exactly once (tests/pipelines/hooks/test_api.py).
"""

from ._context import HookContext, flat_views, normalise_layout
from ._hook import ANALYZER, TRANSFORM, Hook, HookError, analyzer, transform
from ._loader import ENTRY_POINT_GROUP, HookSpec, load_hooks, normalise_spec
from ._metrics import MAX_ARRAY_SIZE, Histogram, make_record, validate_metrics
from ._runner import DEFAULT_TIMEOUT_S, AnalyzerRunner, HooksLog, HookState
from ._transforms import TransformError, TransformRunner, transform_rng

__all__ = [
    "ANALYZER",
    "DEFAULT_TIMEOUT_S",
    "ENTRY_POINT_GROUP",
    "MAX_ARRAY_SIZE",
    "TRANSFORM",
    "AnalyzerRunner",
    "Histogram",
    "Hook",
    "HookContext",
    "HookError",
    "HookSpec",
    "HookState",
    "HooksLog",
    "TransformError",
    "TransformRunner",
    "analyzer",
    "flat_views",
    "load_hooks",
    "make_record",
    "normalise_layout",
    "normalise_spec",
    "transform",
    "transform_rng",
    "validate_metrics",
]
