import json
import logging
import threading

import pytest

from pipelines.hooks import AnalyzerRunner, HookError, HooksLog, HookState, analyzer, transform


@analyzer
def steady(ctx):
    return {"step_seen": ctx.step, "loss": ctx.loss}


@analyzer
def broken(ctx):
    return {"x": 1 / 0}


def test_a_raising_hook_is_logged_counted_and_the_others_keep_going(step_ctx, caplog):
    runner = AnalyzerRunner([broken, steady], timeout_s=None)
    with caplog.at_level(logging.WARNING, logger="zerotrain.hooks"):
        for step in range(3):
            records = runner.run(step_ctx(step)[0])
            assert records[0] == {
                "step": step,
                "hook": "broken",
                "kind": "analyzer",
                "error": "ZeroDivisionError: division by zero",
            }
            assert records[1]["metrics"] == {"step_seen": step, "loss": 1.0}
    stats = runner.stats()["hooks"]
    assert (stats["broken"]["calls"], stats["broken"]["errors"]) == (3, 3)
    assert stats["broken"]["state"] == "active"  # called again at every due step
    assert stats["steady"]["ok"] == 3
    line = caplog.records[0].getMessage()
    assert line.startswith("[HookAnalyzer] hook 'broken' failed at step 0 (test_runner.py:")
    assert line.endswith("ZeroDivisionError: division by zero")


def test_a_hook_returning_non_metrics_counts_as_an_error(step_ctx):
    runner = AnalyzerRunner([analyzer(name="bad")(lambda ctx: {"x": float("inf")})])
    (record,) = runner.run(step_ctx()[0])
    assert "metrics must be finite or nan" in record["error"]
    assert runner.stats()["hooks"]["bad"]["errors"] == 1


def test_a_new_runner_counts_on_in_the_counters_it_is_given_and_skips_a_disabled_hook(
    step_ctx,
):
    """What a restarted HookWorker relies on: its counters are its predecessor's, and a
    hook its supervisor disabled is not called."""
    counters = {}
    AnalyzerRunner([broken], timeout_s=None, stats=counters).run(step_ctx(0)[0])
    runner = AnalyzerRunner([broken], timeout_s=None, stats=counters)  # the restart
    runner.run(step_ctx(1)[0])
    assert runner.stats()["hooks"]["broken"]["errors"] == 2
    counters["broken"].state = HookState.DISABLED
    assert runner.run(step_ctx(2)[0]) == []
    stats = runner.stats()["hooks"]["broken"]
    assert (stats["state"], stats["calls"], stats["skipped"]) == ("disabled", 2, 1)


def test_a_hung_hook_is_timed_out_quarantined_and_asks_for_a_restart(step_ctx):
    release = threading.Event()

    @analyzer(timeout_s=0.05)
    def stuck(ctx):
        release.wait()  # until the test lets it go
        return {"late": 1.0}

    runner = AnalyzerRunner([stuck, steady])
    try:
        first = runner.run(step_ctx(0)[0])
        assert first[0]["error"].startswith("timeout")
        assert first[1]["metrics"]["step_seen"] == 0  # the next hook ran on a new worker
        assert runner.needs_restart
        second = runner.run(step_ctx(1)[0])
        assert [r["hook"] for r in second] == ["steady"]  # stuck is not called again
        stats = runner.stats()["hooks"]["stuck"]
        assert (stats["state"], stats["timeouts"], stats["skipped"]) == ("hung", 1, 1)
        assert HookState(stats["state"]) is HookState.HUNG
    finally:
        release.set()
        runner.close()


def test_hooks_run_only_on_their_sampled_steps(step_ctx):
    every3 = analyzer(every=3, name="every3")(lambda ctx: {"x": 1})
    runner = AnalyzerRunner([every3, steady], timeout_s=None)
    seen = [(r["step"], r["hook"]) for s in range(7) for r in runner.run(step_ctx(s)[0])]
    assert [s for s, h in seen if h == "every3"] == [0, 3, 6]
    assert [s for s, h in seen if h == "steady"] == list(range(7))


def test_records_go_to_hooks_jsonl_one_strict_json_object_per_line(tmp_path, step_ctx):
    path = tmp_path / "run" / "hooks.jsonl"
    nan_hook = analyzer(name="nan")(lambda ctx: {"v": float("nan"), "a": [1.0, float("nan")]})
    runner = AnalyzerRunner([steady, nan_hook, broken], sinks=[HooksLog(path)])
    for step in range(2):
        runner.run(step_ctx(step)[0])
    runner.close()
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["hook"]) for r in records] == [
        (s, h) for s in range(2) for h in ("steady", "nan", "broken")
    ]
    assert records[1]["metrics"] == {"v": None, "a": [1.0, None]}
    assert "NaN" not in path.read_text()


def test_a_failing_sink_is_counted_and_does_not_stop_the_runner(step_ctx):
    class Full:
        def write(self, records):
            raise OSError("disk full")

    runner = AnalyzerRunner([steady], sinks=[Full()], timeout_s=None)
    assert runner.run(step_ctx()[0])[0]["metrics"]["step_seen"] == 0
    assert runner.stats()["sink_errors"] == 1


def test_the_runner_refuses_transforms_and_duplicate_names():
    with pytest.raises(HookError, match="analyzer hooks only"):
        AnalyzerRunner([transform(lambda ctx: None)])
    with pytest.raises(HookError, match="unique"):
        AnalyzerRunner([steady, steady])


def test_an_analyzer_that_tries_to_edit_gradients_fails_and_training_data_is_untouched(
    step_ctx,
):
    @analyzer
    def meddler(ctx):
        ctx.grads["fc.bias"][:] = 0.0

    ctx, buffers = step_ctx()
    before = buffers["grads"].copy()
    (record,) = AnalyzerRunner([meddler]).run(ctx)
    assert "read-only" in record["error"]
    assert (buffers["grads"] == before).all()
