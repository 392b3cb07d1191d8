"""Gradient hooks end to end, over real processes: `zerotrain run --ranks 2 --hook ...`.

Two rank processes, the cluster process and the analyzer process, on a short MLP run.
Analyzers -- healthy, raising or hanging -- never change the numbers (params_sha256 equal
to the run without hooks); their records reach hooks.jsonl and their failures are
counted in summary.json. A transform changes the numbers, the same way every time. And
each worked example of scripts/hooks/ runs on the pipeline, with one and two ranks.

The analyzer drops steps when it falls behind (by design, and it does on a run this
fast), so the assertions hold for whichever steps it analyzed; the last step offered is
always analyzed, since the run's end waits for the analyzer to settle. No wall-time
asserts: every wait is bounded by the subprocess timeout.
"""

import json
import math
from pathlib import Path

import pytest

from pipelines.hooks import load_hooks
from pipelines.hooks.process import MAX_HANGS
from tests.pipelines.cli_util import zerotrain

STEPS = 12
SHORT = [
    "--steps", str(STEPS),
    "--set", "data.n_train=512",
    "--set", "data.n_eval=128",
    "--set", "model.hidden=[32,32]",
    "--set", "train.batch_size=64",
    "--set", "eval.every=0",
]  # fmt: skip
SCRIPTS = Path(__file__).resolve().parents[3] / "scripts" / "hooks"
BUILTINS = tuple(hook.name for hook in load_hooks(["builtin"]))  # names: test_builtins

BAD_HOOKS = """
import time
from pipelines.hooks import analyzer

@analyzer
def raises(ctx):
    raise RuntimeError(f"boom at step {ctx.step}")

@analyzer
def hangs(ctx):
    time.sleep(3600)  # the analyzer abandons it after hooks.timeout_s
"""


def train(run_dir: Path, *args: str, ranks: int = 2) -> dict:
    """`zerotrain run mlp_classifier SHORT --ranks N ARGS`: (summary, records of hooks.jsonl)."""
    proc = zerotrain(
        "run", "mlp_classifier", *SHORT, "--ranks", str(ranks), *args, "--run-dir", str(run_dir)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    path = run_dir / "hooks.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {"summary": summary, "records": records, "stderr": proc.stderr}


def by_hook(records: list) -> dict:
    out = {}
    for r in records:
        out.setdefault(r["hook"], []).append(r)
    return out


def check_outboxes(summary: dict, world: int = 2):
    """Each rank offered every step some analyzer wanted and lost none of them."""
    ranks = summary["hooks"]["ranks"]
    assert len(ranks) == world
    for outbox in ranks:
        assert outbox["offered"] == outbox["sent"] + outbox["dropped"] + outbox["failed"]
        assert outbox["queued"] == 0


def check_accounting(analyzer: dict, offered: int):
    """Every offered step is analyzed, dropped or left with no hook due -- never more.
    (stale counts late samples of a step already dropped, not steps.)"""
    assert "error" not in analyzer, analyzer
    assert analyzer["rejected"] == 0 and analyzer["sink_errors"] == 0
    assert 1 <= analyzer["steps_analyzed"]
    assert analyzer["steps_analyzed"] + analyzer["dropped"] <= offered


def check_conservation(summary: dict, world: int):
    """Every sample a rank offered has one counted fate: dropped or failed by its outbox,
    or received by the analyzer and there analyzed, dropped, stale, rejected, skipped or
    still pending -- none vanishes on the way (the rank's end waits for the analyzer to
    confirm what it received: nothing lost, nothing unconfirmed)."""
    outboxes = summary["hooks"]["ranks"]
    fates = summary["hooks"]["analyzer"]["ranks"]
    assert len(outboxes) == world and set(fates) <= {str(r) for r in range(world)}
    for rank, out in enumerate(outboxes):
        assert out["offered"] >= 1, out
        # (the whole hooks summary as text, so that a failure in CI says why in full)
        assert out["lost"] == out["unconfirmed"] == out["queued"] == 0, json.dumps(summary["hooks"])
        got = fates.get(str(rank), dict.fromkeys(("received",), 0))
        settled = ("analyzed", "dropped", "stale", "rejected", "skipped", "pending")
        assert got["received"] == sum(got.get(k, 0) for k in settled), got
        assert out["sent"] == got["received"], (out, got)
        assert out["offered"] == (
            out["dropped"] + out["failed"] + sum(got.get(k, 0) for k in settled)
        ), (out, got)


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_offered_sample_is_analyzed_or_counted(tmp_path, ranks):
    """Whatever the load on the machine: the analyzer may fall behind and drop, but it
    counts what it drops, and the last samples of the run are not lost with the ranks'
    exit nor left unread when the analyzer's stats are taken."""
    summary = train(tmp_path, "--hook", "builtin:grad_norm", ranks=ranks)["summary"]
    check_conservation(summary, ranks)
    analyzer = summary["hooks"]["analyzer"]
    check_accounting(analyzer, STEPS)
    # an analyzed step holds one sample of each rank; a dropped one, at most one each
    for counts in analyzer["ranks"].values():
        assert counts["analyzed"] == analyzer["steps_analyzed"], analyzer
        assert counts["dropped"] <= analyzer["dropped"], analyzer
    lines = (tmp_path / "hooks.jsonl").read_text().splitlines()
    assert len(lines) == analyzer["steps_analyzed"]


SLOW_HOOK = """
import time
from pipelines.hooks import analyzer

@analyzer
def slow(ctx):
    time.sleep(0.3)  # far slower than a step of this run
    return {"step": ctx.step}
"""


def test_a_slow_analyzer_gets_fewer_samples_instead_of_dropping_copies(tmp_path, baseline):
    """Demand: the ranks build a sample only when the analyzer has answered their last
    one, so the steps it cannot take are declined in the ranks (nothing copied or sent)
    rather than sent and dropped there; the run's numbers are those without hooks."""
    script = tmp_path / "slow_hook.py"
    script.write_text(SLOW_HOOK)
    summary = train(tmp_path, "--hook", f"{script}:slow")["summary"]
    assert summary["params_sha256"] == baseline["params_sha256"]
    check_conservation(summary, 2)
    analyzer = summary["hooks"]["analyzer"]
    assert analyzer["dropped"] == 0 and analyzer["stale"] == 0, analyzer
    for out in summary["hooks"]["ranks"]:
        assert out["offered"] == STEPS and out["dropped"] >= 1, out  # declined
        assert out["sent"] == analyzer["steps_analyzed"], (out, analyzer)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "hooks.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == STEPS and len(steps) == analyzer["steps_analyzed"]


def test_an_exact_hook_sees_every_due_step_and_training_waits_for_it(tmp_path, baseline):
    """The same slow hook with exact=True, beside noise_scale (every 3 steps, exact):
    every due step reaches hooks.jsonl, no rank declines one and the analyzer drops
    none -- the ranks waited -- and the numbers are still those without hooks."""
    script = tmp_path / "slow_hook.py"
    script.write_text(SLOW_HOOK)
    specs = (f'hooks.specs=[{{hook = "{script}:slow", exact = true}}, '
             '{hook = "builtin:noise_scale", every = 3, exact = true}]')  # fmt: skip
    run = train(tmp_path, "--set", specs)
    summary, hooks = run["summary"], by_hook(run["records"])
    assert summary["params_sha256"] == baseline["params_sha256"]
    check_conservation(summary, 2)
    analyzer = summary["hooks"]["analyzer"]
    assert analyzer["dropped"] == analyzer["stale"] == analyzer["skipped"] == 0, analyzer
    for out in summary["hooks"]["ranks"]:
        assert out["offered"] == out["sent"] == STEPS and out["dropped"] == 0, out
    assert [r["step"] for r in hooks["slow"]] == list(range(1, STEPS + 1))
    noise = [r["metrics"] for r in hooks["noise_scale"]]
    assert [r["step"] for r in hooks["noise_scale"]] == list(range(3, STEPS + 1, 3))
    assert [m["gap"] for m in noise] == [3] * (STEPS // 3)
    for name, every in (("slow", 1), ("noise_scale", 3)):
        counts = analyzer["hooks"][name]
        assert counts["steps_due"] == STEPS // every and counts["fraction_analysed"] == 1.0


# Once per run (a marker file: the restarted analyzer re-runs the step), at step AT.
ONCE = """
import ctypes, os, signal
from pathlib import Path
from pipelines.hooks import analyzer

MARK = Path({mark!r})

@analyzer
def once(ctx):
    if ctx.step == {at} and not MARK.exists():
        MARK.touch()
        {action}
    return {{"step": ctx.step}}
"""
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
# a PyDLL call keeps the GIL: the analyzer's trio loop, its heartbeats included, stops
# for 6 s (a hook in C, or a starved process); time.sleep would release the GIL
SILENCE = "ctypes.PyDLL(None).usleep(6_000_000)"


def train_with_once(tmp_path: Path, at: int, action: str, noise_every: int = 1) -> tuple:
    """Train with the exact hooks `once` (ACTION in step AT, the first time) and
    builtin:noise_scale every `noise_every` steps: (summary, records by hook)."""
    script = tmp_path / "once.py"
    script.write_text(ONCE.format(mark=str(tmp_path / "done"), at=at, action=action))
    every = f"every = {noise_every}, " if noise_every != 1 else ""
    specs = (f'hooks.specs=[{{hook = "{script}:once", exact = true}}, '
             f'{{hook = "builtin:noise_scale", {every}exact = true}}]')  # fmt: skip
    run = train(tmp_path, "--set", specs)
    return run["summary"], by_hook(run["records"])


def test_a_restarted_analyzer_starts_its_averages_afresh_and_says_so(
    tmp_path, baseline, every_step_average
):
    """The analyzer process is SIGKILLed in step 6 (exact noise_scale, every step): its
    supervisor restarts it, the ranks send step 6 again, and the fresh noise_scale's
    averages start there -- window_steps 1 at step 6, the every-step average of its own
    samples since -- instead of its first sample standing for all steps since step 0;
    every record of the new series, and summary.json, say restarted_at 6."""
    summary, hooks = train_with_once(tmp_path, 6, KILL)
    assert summary["params_sha256"] == baseline["params_sha256"]
    assert (tmp_path / "done").exists()  # it was killed
    noise = hooks["noise_scale"]
    assert [r["step"] for r in noise] == list(range(1, STEPS + 1))
    assert [r.get("restarted_at") for r in noise] == [None] * 5 + [6] * (STEPS - 5)
    assert summary["hooks"]["analyzer"]["hooks"]["noise_scale"]["restarted_at"] == 6
    metrics = [r["metrics"] for r in noise]
    assert [m["gap"] for m in metrics] == [1] * STEPS
    assert metrics[5]["window_steps"] == pytest.approx(1.0)
    # the new series' every-step average of its own samples, counted from step 5
    fresh = [(step - 5, m["g2_step"], m["trace_sigma_step"]) for step, m in enumerate(metrics, 1)]
    g2, trace, window = every_step_average(fresh[5:], 0.95)
    last = metrics[-1]
    assert last["window_steps"] == pytest.approx(window)
    assert last["g2"] == pytest.approx(g2) and last["trace_sigma"] == pytest.approx(trace)


def test_an_exact_hook_waits_for_a_silent_analyzer_and_its_restart(tmp_path, baseline):
    """A hook holds the GIL for 6 s in step 5: the analyzer falls silent, the ranks
    declare it down after the heartbeat timeout (2 s) and its supervisor kills and
    restarts it. The exact hooks still record every due step (the ranks waited for the
    new analyzer and sent step 5 again), no rank gave a sample up, and the numbers are
    those without hooks."""
    summary, hooks = train_with_once(tmp_path, 5, SILENCE, noise_every=3)
    assert summary["params_sha256"] == baseline["params_sha256"]
    assert [r["step"] for r in hooks["once"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in hooks["noise_scale"]] == list(range(3, STEPS + 1, 3))
    analyzer = summary["hooks"]["analyzer"]
    assert analyzer["hooks"]["once"]["restarted_at"] == 5  # it was restarted
    for out in summary["hooks"]["ranks"]:
        assert out["offered"] == out["sent"] == STEPS and out["failed"] == 0, out
    for name in ("once", "noise_scale"):
        assert analyzer["hooks"][name]["fraction_analysed"] == 1.0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("baseline"))["summary"]


@pytest.fixture(scope="module")
def bad_hooks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "bad_hooks.py"
    path.write_text(BAD_HOOKS)
    return path


def test_every_builtin_analyzer_leaves_training_alone_and_logs_its_metrics(tmp_path, baseline):
    run = train(tmp_path, "--hook", "builtin")
    summary, records = run["summary"], run["records"]
    assert summary["params_sha256"] == baseline["params_sha256"]
    assert summary["final_loss"] == baseline["final_loss"]
    check_outboxes(summary)
    check_conservation(summary, 2)
    analyzer = summary["hooks"]["analyzer"]
    check_accounting(analyzer, STEPS)
    assert analyzer["hook_errors"] == analyzer["timeouts"] == analyzer["restarts"] == 0
    assert set(analyzer["hooks"]) == set(BUILTINS)
    for name, counts in analyzer["hooks"].items():
        assert counts["calls"] == counts["ok"] == analyzer["steps_analyzed"], name

    # every analyzed step has one record per builtin, and the run's last step is one
    assert records and all("error" not in r for r in records)
    steps = sorted({r["step"] for r in records})
    assert steps[-1] == STEPS and set(steps) <= set(range(1, STEPS + 1))
    assert len(steps) == analyzer["steps_analyzed"]
    hooks = by_hook(records)
    assert set(hooks) == set(BUILTINS)
    for name in BUILTINS:
        assert [r["step"] for r in hooks[name]] == steps, name
    last = {r["hook"]: r["metrics"] for r in records if r["step"] == STEPS}
    params = {k.removeprefix("norm/") for k in last["grad_norm"] if k.startswith("norm/")}
    assert len(params) == 6  # three Linear layers: weight and bias each
    assert last["grad_norm"]["global"] > 0
    assert math.isclose(
        last["grad_norm"]["global"] ** 2,
        sum(last["grad_norm"][f"norm/{p}"] ** 2 for p in params),
        rel_tol=1e-9,
    )
    assert last["grad_health"]["healthy"] == 1 and last["grad_health"]["nonfinite"] == 0
    assert {f"flow/{p}" for p in params} == set(last["grad_flow"])
    assert {f"ratio/{p}" for p in params} <= set(last["update_ratio"])
    assert len(last["rank_cosine"]["matrix"]) == 2  # the two ranks' own gradients
    assert -1.0 <= last["rank_cosine"]["mean"] <= 1.0
    assert last["noise_scale"]["b_small"] == 32 and last["noise_scale"]["b_big"] == 64
    assert 0.0 <= last["grad_distribution"]["sparsity"] <= 1.0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_a_raising_hook_is_logged_counted_and_restarted_and_training_is_unchanged(
    tmp_path, baseline, bad_hooks
):
    run = train(tmp_path, "--hook", f"{bad_hooks}:raises", "--hook", "builtin:grad_norm")
    summary, hooks = run["summary"], by_hook(run["records"])
    assert summary["params_sha256"] == baseline["params_sha256"]
    check_outboxes(summary)
    analyzer = summary["hooks"]["analyzer"]
    check_accounting(analyzer, STEPS)
    raised = analyzer["hooks"]["raises"]
    assert raised["errors"] >= 1 and raised["ok"] == 0
    assert analyzer["hook_errors"] == raised["errors"]
    # its worker was restarted (script reloaded) after a failure, or disabled after many
    assert analyzer["restarts"] >= 1 or "raises" in analyzer["disabled"]
    errors = hooks["raises"]
    assert len(errors) == raised["errors"]
    assert all(r["error"].startswith("RuntimeError: boom at step") for r in errors)
    assert "boom at step" in run["stderr"]  # one log line per failure
    # the healthy hook beside it is untouched
    healthy = analyzer["hooks"]["grad_norm"]
    assert healthy["errors"] == 0 and healthy["ok"] == healthy["calls"] >= 1
    assert hooks["grad_norm"][-1]["step"] == STEPS
    assert all("metrics" in r for r in hooks["grad_norm"])


def test_a_hanging_hook_is_timed_out_counted_and_training_is_unchanged(
    tmp_path, baseline, bad_hooks
):
    run = train(
        tmp_path,
        "--hook", f"{bad_hooks}:hangs",
        "--hook", "builtin:grad_norm",
        "--set", "hooks.timeout_s=0.5",
    )  # fmt: skip
    summary, hooks = run["summary"], by_hook(run["records"])
    assert summary["params_sha256"] == baseline["params_sha256"]
    check_outboxes(summary)
    analyzer = summary["hooks"]["analyzer"]
    assert "error" not in analyzer, analyzer
    # run-wide counts, even if the hang restarted the analyzer process meanwhile
    assert analyzer["timeouts"] >= 1 and analyzer["hangs"]["hangs"] >= 1
    assert analyzer["hooks"]["hangs"]["timeouts"] == analyzer["hangs"]["hangs"]
    # disabled once it hung MAX_HANGS times (a fast run may end before a second hang:
    # the ranks offer no sample while the analyzer owes them an answer)
    assert ("hangs" in analyzer["disabled"]) == (analyzer["hangs"]["hangs"] >= MAX_HANGS)
    timeouts = hooks["hangs"]
    assert timeouts and all(r["error"] == "timeout: no answer within 0.5 s" for r in timeouts)
    quarantine = json.loads((tmp_path / "hooks_quarantine.json").read_text())
    assert quarantine == analyzer["hangs"]
    # the hook beside it went on in its own thread
    assert hooks["grad_norm"] and all("metrics" in r for r in hooks["grad_norm"])


def test_a_transform_changes_the_numbers_the_same_way_every_time(tmp_path, baseline):
    script = str(SCRIPTS / "clip_and_noise.py")
    a = train(tmp_path / "a", "--hook", script)["summary"]
    b = train(tmp_path / "b", "--hook", script)["summary"]
    assert a["params_sha256"] == b["params_sha256"]  # ctx.rng: (seed, step, rank, name)
    assert a["final_loss"] == b["final_loss"]
    assert a["params_sha256"] != baseline["params_sha256"]
    assert "analyzer" not in a["hooks"]  # a transform needs no analyzer process
    assert a["hooks"]["ranks"] == [{}, {}]
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    steps = [m for m in metrics if "loss" in m and "step" in m]
    assert steps and all(m.get("transforms") == 1 for m in steps)
    # ctx.rng is a pure function of (seed, step, rank, name), and each of them matters
    from pipelines.hooks import transform_rng

    def draws(*key):
        return transform_rng(*key).normal(size=4).tolist()

    base = draws(0, 3, 1, "clip_and_noise")
    assert draws(0, 3, 1, "clip_and_noise") == base
    for other in ((1, 3, 1, "clip_and_noise"), (0, 4, 1, "clip_and_noise"),
                  (0, 3, 0, "clip_and_noise"), (0, 3, 1, "other")):  # fmt: skip
        assert draws(*other) != base, other


def test_the_worked_examples_run_on_two_ranks(tmp_path, baseline):
    """dead_layer, critical_batch and rank_agreement in the analyzer process; every 4
    steps, so that the last step (always analyzed) is due for all three."""
    specs = ", ".join(
        f'{{hook = "{SCRIPTS / name}.py", every = 4}}'
        for name in ("dead_layer", "critical_batch", "rank_agreement")
    )
    run = train(tmp_path, "--set", f"hooks.specs=[{specs}]")
    summary, hooks = run["summary"], by_hook(run["records"])
    assert summary["params_sha256"] == baseline["params_sha256"]
    check_outboxes(summary)
    analyzer = summary["hooks"]["analyzer"]
    check_accounting(analyzer, STEPS // 4)
    assert analyzer["hook_errors"] == analyzer["timeouts"] == 0
    assert all(r["step"] % 4 == 0 and "metrics" in r for r in run["records"])
    last = {r["hook"]: r["metrics"] for r in run["records"] if r["step"] == STEPS}
    assert set(last) == {"dead_layer", "critical_batch", "rank_agreement"}
    dead = last["dead_layer"]
    assert dead["dead_layers"] == 0  # a healthy MLP: every layer gets gradient
    assert len([k for k in dead if k.startswith("relative_flow/")]) == 6
    assert last["critical_batch"]["global_batch"] == 64
    agreement = last["rank_agreement"]
    assert agreement["outlier_rank"] in (0, 1)
    assert len(agreement["cosine"]) == 2 and len(agreement["cosine"][0]) == 2
    assert {"rank_mean/0", "rank_mean/1"} <= set(agreement)
    assert len(hooks["critical_batch"]) == analyzer["steps_analyzed"]


def test_every_worked_example_runs_on_one_rank(tmp_path):
    """--ranks 1: analyzers still run in the analyzer process (off the critical path);
    the transform runs in the rank and logs every step. The two analyzers that need two
    ranks say nothing; the others log what they analyzed (a sample the analyzer was too
    busy for is dropped and counted, never lost)."""
    # dead_layer every 12 steps (its own default is 10) and exact (the rank waits for the
    # analyzer to take it: a busy analyzer may drop a plain sample, the last one too), so
    # exactly one record is owed, step 12's
    examples = [p for p in sorted(SCRIPTS.glob("*.py")) if p.stem != "dead_layer"]
    every_example = [a for p in examples for a in ("--hook", str(p))]
    dead_every_12 = (
        f'hooks.specs=[{{hook = "{SCRIPTS / "dead_layer.py"}", every = 12, exact = true}}]'
    )
    run = train(tmp_path, *every_example, "--set", dead_every_12, ranks=1)
    hooks = by_hook(run["records"])
    assert all("error" not in r for r in run["records"])
    assert [r["step"] for r in hooks["clip_and_noise"]] == list(range(1, STEPS + 1))
    assert "critical_batch" not in hooks and "rank_agreement" not in hooks
    assert [(r["step"], r["metrics"]["dead_layers"]) for r in hooks["dead_layer"]] == [(12, 0)]
    analyzer = run["summary"]["hooks"]["analyzer"]
    check_accounting(analyzer, STEPS)
    stats = analyzer["hooks"]
    for name in ("dead_layer", "critical_batch", "rank_agreement"):
        assert stats[name]["errors"] == stats[name]["timeouts"] == 0
        assert stats[name]["ok"] == stats[name]["calls"]
    assert stats["dead_layer"]["ok"] == 1  # step 12
