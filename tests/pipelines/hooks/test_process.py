"""The analyzer process, for real: started by analyzer_spec under a supervisor, fed
HookSamples of two fake ranks of a tiny MLP. Real processes, real time: every wait is
bounded by LIMIT and nothing asserts on wall time."""

import dataclasses
import json
import os
import signal
import textwrap
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

import actors
from pipelines.hooks.link import HookOutbox, HookSample, wire_layout
from pipelines.hooks.process import (
    EXIT_HUNG,
    HOOK_RESTARTS,
    MAX_HANGS,
    QUARANTINE,
    analyzer_spec,
)
from pipelines.model import build_model
from tests.actors import actor_util

LIMIT = 40
TARGET = "HookAnalyzer@analyzer"
WORLD = 2
MODEL = build_model("mlp_classifier", in_dim=4, n_classes=3, hidden=(6,), seed=0)
N = MODEL.params.size
LAYOUT = wire_layout(MODEL.layout)


def step_arrays(step):
    """(rank_grads, reduced grad, params, update) of a made-up step: full length n each."""
    rng = np.random.default_rng(step)
    rank_grads = [rng.normal(size=N).astype(np.float32) for _ in range(WORLD)]
    grad = np.mean(rank_grads, axis=0).astype(np.float32)
    params = rng.normal(size=N).astype(np.float32)
    return rank_grads, grad, params, (-1e-2 * grad).astype(np.float32)


def samples(step):
    """The WORLD HookSamples of `step`, each rank holding its ZeRO shard."""
    rank_grads, grad, params, update = step_arrays(step)
    out = []
    for rank in range(WORLD):
        lo, hi = actors.shard_bounds(N, WORLD, rank)
        out.append(
            HookSample(
                step=step, rank=rank, world=WORLD, loss=1.0 / step, lr=1e-2, lo=lo, hi=hi,
                batch_size=4, rank_grad=rank_grads[rank], grad=grad[lo:hi].copy(),
                params=params[lo:hi].copy(), update=update[lo:hi].copy(), layout=LAYOUT,
            )
        )  # fmt: skip
    return out


async def send_step(step, ranks=range(WORLD)):
    for sample in samples(step):
        if sample.rank in ranks:
            await actors.cast(TARGET, sample)


async def stats():
    return await actors.call(TARGET, "stats", timeout=10)


async def wait_stats(predicate):
    while not predicate(s := await stats()):
        await trio.sleep(0.05)
    return s


async def child():
    return await actor_util.child("cluster", "analyzer")


async def wait_restarted(restarts):
    info = await actor_util.wait_restarted("cluster", "analyzer", restarts)
    await actors.call(TARGET, "stats", timeout=10)  # up and answering
    return info


def records(run_dir):
    path = run_dir / "hooks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@asynccontextmanager
async def analyzer(run_dir, specs, timeout_s=5.0):
    with trio.fail_after(LIMIT):
        options = {"heartbeat_interval": 0.1, "heartbeat_timeout": 2.0}
        async with actors.open_node("cluster", **options):
            async with trio.open_nursery() as nursery:
                spec = analyzer_spec(run_dir, specs, WORLD, timeout_s, shutdown=2)
                sup = actors.Supervisor([spec], name="cluster", max_restarts=5)
                ref = await nursery.start(sup.run)
                yield nursery
                await actors.stop(ref, timeout=None)


SCRIPT = textwrap.dedent(
    """
    import time
    from pipelines.hooks import analyzer

    @analyzer
    def flaky(ctx):
        if ctx.step == 2:
            raise RuntimeError("flaky broke")
        return {"step": ctx.step}

    @analyzer
    def always(ctx):
        raise RuntimeError("always broken")

    @analyzer(timeout_s=1.0)
    def sleepy(ctx):
        if ctx.step == 4:
            time.sleep(60)
        return {"awake": 1}

    @analyzer(timeout_s=0.5)
    def stuck(ctx):
        time.sleep(60)

    @analyzer
    def slow(ctx):
        if ctx.step == 1:
            time.sleep(2.0)
        return None
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "research.py"
    path.write_text(SCRIPT)
    return str(path)


async def test_the_builtin_analyzers_write_their_metrics_for_each_step(tmp_path):
    async with analyzer(tmp_path, ["builtin"]):
        for step in (1, 2, 3):  # one at a time: sent together, step 2 would be dropped
            await send_step(step)
            s = await wait_stats(lambda s, t=step: s["steps_analyzed"] == t)
    assert (s["dropped"], s["hook_errors"], s["timeouts"]) == (0, 0, 0)
    got = {(r["step"], r["hook"]): r["metrics"] for r in records(tmp_path)}
    hooks = {"grad_norm", "grad_distribution", "grad_flow", "grad_health", "update_ratio",
             "rank_cosine", "noise_scale"}  # fmt: skip
    assert {h for _, h in got} == hooks and {st for st, _ in got} == {1, 2, 3}
    rank_grads, grad, params, update = step_arrays(2)
    metrics = got[(2, "grad_norm")]
    assert metrics["global"] == pytest.approx(np.linalg.norm(grad.astype(np.float64)), rel=1e-5)
    assert set(metrics) == {"global"} | {f"norm/{p.name}" for p in MODEL.layout}
    cosine = np.asarray(got[(2, "rank_cosine")]["matrix"])
    assert cosine.shape == (2, 2)
    expected = (
        rank_grads[0]
        @ rank_grads[1]
        / np.linalg.norm(rank_grads[0])
        / np.linalg.norm(rank_grads[1])
    )
    assert cosine[0, 1] == pytest.approx(expected, rel=1e-4)
    assert {"b_simple", "g2", "trace_sigma"} <= set(got[(3, "noise_scale")])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


async def test_a_raising_hook_is_logged_restarted_and_later_steps_are_analyzed(
    tmp_path, script, capfd
):
    async with analyzer(tmp_path, [f"{script}:flaky", "builtin:grad_norm"]):
        for step in (1, 2, 3):
            await send_step(step)
            # after step 2, also wait for the crashed worker's restart
            await wait_stats(
                lambda s, t=step: s["steps_analyzed"] == t and s["restarts"] == (t > 1)
            )
        s = await stats()
    assert (s["hook_errors"], s["restarts"]) == (1, 1)
    flaky = {k: s["hooks"]["flaky"][k] for k in ("state", "calls", "ok", "errors", "timeouts")}
    assert flaky == {"state": "active", "calls": 3, "ok": 2, "errors": 1, "timeouts": 0}
    got = {(r["step"], r["hook"]): r for r in records(tmp_path)}
    assert got[(2, "flaky")]["error"] == "RuntimeError: flaky broke"
    assert got[(3, "flaky")]["metrics"] == {"step": 3}  # the restarted worker
    assert got[(2, "grad_norm")]["metrics"]["global"] > 0  # the others were not disturbed
    lines = [line for line in capfd.readouterr().err.splitlines() if "research.py:" in line]
    assert len(lines) == 1 and "hook 'flaky' failed at step 2" in lines[0]
    assert "RuntimeError: flaky broke" in lines[0]


async def test_a_hook_failing_faster_than_its_restart_intensity_is_disabled_alone(tmp_path, script):
    """The one rule: a raising hook is restarted by its own supervisor, and one failing
    more than HOOK_RESTARTS allows is disabled -- never charging the process's budget
    (the HookAnalyzer is not restarted, nor the process) nor disturbing the others."""
    async with analyzer(tmp_path, [f"{script}:always", "builtin:grad_norm"]):
        step = 0
        while "always" not in (s := await stats())["disabled"]:
            step += 1
            await send_step(step)
            await wait_stats(lambda s, t=step: s["steps_analyzed"] == t)
        await send_step(step + 1)
        s = await wait_stats(lambda s: s["steps_analyzed"] == step + 1)
        assert (await child()).restarts == 0  # the process was never restarted
    always = s["hooks"]["always"]
    assert always["state"] == "disabled" and always["ok"] == 0
    assert step >= HOOK_RESTARTS[0] + 1  # at least one failure more than the budget
    assert always["errors"] == always["calls"] == step  # every due step until disabled
    assert s["restarts"] == step - 1  # every failure but the last restarted the worker
    assert "failed more than 3 times in 5 s" in s["disabled"]["always"]
    got = {(r["step"], r["hook"]): r for r in records(tmp_path)}
    assert (step + 1, "always") not in got and "metrics" in got[(step + 1, "grad_norm")]


async def test_a_hanging_hook_is_timed_out_and_the_analyzer_process_restarted(tmp_path, script):
    async with analyzer(tmp_path, [f"{script}:sleepy", "builtin:grad_norm"]):
        await send_step(4)  # sleepy hangs here; grad_norm answers meanwhile
        info = await wait_restarted(1)
        assert f"exited with status {EXIT_HUNG}" in info.last_exit
        await send_step(5)
        s = await wait_stats(lambda s: s["steps_analyzed"] == 1)  # a fresh process
        assert s["hooks"]["sleepy"]["ok"] == 1
    got = {(r["step"], r["hook"]): r for r in records(tmp_path)}
    assert got[(4, "sleepy")]["error"].startswith("timeout")
    assert "metrics" in got[(4, "grad_norm")] and "metrics" in got[(5, "sleepy")]
    assert json.loads((tmp_path / QUARANTINE).read_text()) == {"sleepy": 1}


async def test_a_sample_sent_as_a_call_is_answered_with_its_final_fate(tmp_path):
    """The rank's credit: a call per sample, answered once the sample is done with --
    analyzed, or dropped when its step stays incomplete (a rank never sent its part)."""
    async with analyzer(tmp_path, ["builtin:grad_norm"]):
        fates = {}

        async def offer(sample):
            fates[(sample.step, sample.rank)] = await actors.call(TARGET, sample, timeout=LIMIT)

        async with trio.open_nursery() as nursery:
            for sample in samples(1):
                nursery.start_soon(offer, sample)
        assert fates == {(1, 0): "analyzed", (1, 1): "analyzed"}
        await offer(samples(2)[1])  # rank 0's part never comes
        await offer(samples(1)[0])  # a step already analyzed
    assert fates[(2, 1)] == "dropped" and fates[(1, 0)] == "stale"


async def test_a_hook_that_hangs_max_hangs_times_is_disabled_for_the_run(tmp_path, script):
    async with analyzer(tmp_path, [f"{script}:stuck", "builtin:grad_norm"]):
        for hang in range(1, MAX_HANGS + 1):
            await send_step(hang)  # stuck hangs; the process exits and is restarted
            await wait_restarted(hang)
        await send_step(MAX_HANGS + 1)
        s = await wait_stats(lambda s: s["steps_analyzed"] == 1)  # grad_norm alone
    assert "stuck" in s["disabled"] and s["hangs"] == {"stuck": MAX_HANGS}
    assert json.loads((tmp_path / QUARANTINE).read_text()) == {"stuck": MAX_HANGS}
    assert not any(r["step"] == MAX_HANGS + 1 and r["hook"] == "stuck" for r in records(tmp_path))


async def test_a_flood_of_steps_is_dropped_and_counted_not_queued(tmp_path, script):
    async with analyzer(tmp_path, [f"{script}:slow"]):
        for step in range(1, 31):  # step 1 holds the analyzer for 2 s
            await send_step(step)
        s = await wait_stats(lambda s: s["steps_analyzed"] + s["dropped"] == 30)
        assert s["dropped"] > 0 and s["pending"] == 0
        await send_step(31, ranks=[0])  # never completed: dropped once 32 is
        await send_step(32)
        s2 = await wait_stats(lambda s2: s2["steps_analyzed"] == s["steps_analyzed"] + 1)
        await send_step(1)  # stale: step 1 was analyzed long ago
        s3 = await wait_stats(lambda s: s["stale"] == 2)
    assert s2["dropped"] == s["dropped"] + 1
    assert (s3["dropped"], s3["steps_analyzed"]) == (s2["dropped"], s2["steps_analyzed"])


async def test_a_slow_analyzer_skips_steps_and_the_averages_still_span_what_beta_says(
    tmp_path, script, every_step_average
):
    """noise_scale beside a hook that holds the analyzer for 2 s: most steps are
    dropped, and each average must still be the per-step EMA (beta 0.95) of what the
    raw estimates in hooks.jsonl say, over a window of (1 - 0.95**step) / 0.05 steps --
    not one that advanced once per analysed step."""
    async with analyzer(tmp_path, [f"{script}:slow", "builtin:noise_scale"]):
        for step in range(1, 31):
            await send_step(step)
        s = await wait_stats(lambda s: s["steps_analyzed"] + s["dropped"] == 30)
    noise = [r for r in records(tmp_path) if r["hook"] == "noise_scale"]
    steps = [r["step"] for r in noise]
    assert s["dropped"] > 0 and len(steps) == s["steps_analyzed"] and steps[-1] == 30
    assert max(b - a for a, b in zip([0, *steps], steps, strict=False)) > 1  # it skipped
    assert s["hooks"]["noise_scale"]["fraction_analysed"] == pytest.approx(
        len(steps) / 30, abs=1e-6
    )
    # TensorBoard: the running fraction, one point per analysed step
    tb = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
    assert tb.count(b"noise_scale/fraction_analysed") == len(steps)
    seen = []
    for r in noise:
        m = r["metrics"]
        seen.append((r["step"], m["g2_step"], m["trace_sigma_step"]))
        g2, trace, window = every_step_average(seen, 0.95)
        assert m["gap"] == r["step"] - (seen[-2][0] if len(seen) > 1 else 0)
        assert (m["g2"], m["trace_sigma"]) == (pytest.approx(g2), pytest.approx(trace))
        assert m["window_steps"] == pytest.approx(window)
        assert m["window_steps"] == pytest.approx((1 - 0.95 ** r["step"]) / 0.05)


async def test_the_outbox_never_blocks_and_counts_while_the_analyzer_is_down(tmp_path):
    async with analyzer(tmp_path, ["builtin:grad_norm"]) as nursery:
        outboxes = [HookOutbox(["builtin:grad_norm"], capacity=2) for _ in range(WORLD)]
        for box in outboxes:
            nursery.start_soon(box.run)
        assert outboxes[0].due(7)

        def offer(step):
            return [box.offer(s) for box, s in zip(outboxes, samples(step), strict=True)]

        assert offer(1) == [True, True]
        await wait_stats(lambda s: s["steps_analyzed"] == 1)
        pid = (await child()).pid
        await actors.terminate_child("cluster", "analyzer")  # down, not coming back
        for step in range(2, 40):
            offer(step)  # synchronous: it cannot wait, whatever the link does
            await trio.sleep(0.01)
        counts = [box.stats() for box in outboxes]
        for c in counts:
            assert c["offered"] == 39 and c["failed"] > 0
            assert c["offered"] == c["sent"] + c["failed"] + c["dropped"] + c["queued"]
        await actors.restart_child("cluster", "analyzer")
        before = await wait_restarted(0)
        os.kill(before.pid, signal.SIGKILL)  # and a crash for good measure
        info = await wait_restarted(before.restarts + 1)
        assert "killed by SIGKILL" in info.last_exit and len({pid, before.pid, info.pid}) == 3
        offer(50)
        await wait_stats(lambda s: s["steps_analyzed"] == 1)
        nursery.cancel_scope.cancel()
    assert any(r["step"] == 50 for r in records(tmp_path))


# ---- in-process pieces ---------------------------------------------------------------


def test_a_hook_sample_travels_as_wire_data_without_pickle():
    sample = samples(3)[1]
    data, tensors = actors.to_wire(sample)
    back = actors.from_wire(data, tensors)
    assert isinstance(back, HookSample) and (back.step, back.rank, back.lo) == (3, 1, sample.lo)
    assert back.layout == LAYOUT and np.array_equal(back.grad, sample.grad)


async def test_a_full_outbox_drops_the_offer_at_once_and_counts_it():
    specs = ["builtin:grad_norm", {"hook": "builtin:noise_scale", "every": 5}]
    box = HookOutbox(specs, capacity=2)
    assert [box.due(s) for s in (1, 5)] == [True, True] and box.periods == [1, 5]
    assert [box.offer(s) for s in samples(1) + samples(2)] == [True, True, False, False]
    assert box.stats() == {"offered": 4, "sent": 0, "dropped": 2, "failed": 0, "queued": 2}


async def test_an_outbox_has_credit_only_while_nothing_is_queued_or_unanswered():
    box = HookOutbox(["builtin:grad_norm"])  # capacity 1: one sample at a time
    assert box.has_credit()
    box.decline(1)  # a due step nobody sampled: counted, nothing copied
    assert box.offer(samples(2)[0]) and not box.has_credit()
    assert box.stats() == {"offered": 2, "sent": 0, "dropped": 1, "failed": 0, "queued": 1}


async def test_a_sample_handed_to_the_waiting_forwarder_is_unsettled_until_forwarded():
    """A memory channel gives an item straight to a parked receiver: the queue is empty
    before the forwarder has run. The outbox must still count that sample -- else the
    run's end (flush) and the ranks' credit see nothing in flight (a flaky
    test_hooks_cluster failure: queued=1 after flush)."""
    box = HookOutbox(["builtin:grad_norm"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await trio.testing.wait_all_tasks_blocked()  # the forwarder waits on the queue
        assert box.offer(samples(1)[0])
        assert not box.has_credit() and box.stats()["queued"] == 1
        await trio.testing.wait_all_tasks_blocked()  # forwarded: no node here, so failed
        assert box.has_credit()
        assert box.stats() == {"offered": 1, "sent": 0, "dropped": 0, "failed": 1, "queued": 0}
        nursery.cancel_scope.cancel()


def test_a_step_is_assembled_from_zero_shards_and_from_ddp_copies():
    from pipelines.hooks.process import _context

    rank_grads, grad, params, update = step_arrays(4)
    ctx = _context(4, samples(4))
    whole = [dataclasses.replace(s, lo=0, hi=N, grad=grad, params=params, update=update)
             for s in samples(4)]  # fmt: skip
    for c in (ctx, _context(4, whole)):
        assert c.world_size == WORLD and c.batch_size == 4 and c.names[0] == "layers.0.weight"
        assert np.array_equal(c.grads["layers.1.bias"], grad[MODEL.layout[-1].offset :])
        assert np.array_equal(c.rank_grads[1]["layers.0.bias"].reshape(-1),
                              rank_grads[1][24:30])  # fmt: skip
    gap = [dataclasses.replace(s, lo=s.lo + 1) if s.rank == 1 else s for s in samples(4)]
    assert "gap" in _context(4, gap)


async def test_an_exact_sample_gives_up_after_exact_wait_and_later_ones_fail_at_once(tmp_path):
    """An exact step's sample waits for a down analyzer at most exact_wait seconds, then
    is counted failed; the next exact samples fail without waiting while the analyzer
    is still down, and are sent again once it is up."""
    specs = [{"hook": "builtin:grad_norm", "exact": True}]
    async with analyzer(tmp_path, specs) as nursery:
        box = HookOutbox(specs, exact_wait=1.0)
        nursery.start_soon(box.run)
        assert box.exact(1) and box.offer(samples(1)[0])
        await box.wait_for_credit()
        assert box.stats()["sent"] == 1
        await actors.terminate_child("cluster", "analyzer")  # down, not coming back
        assert box.offer(samples(2)[0])
        await box.wait_for_credit()  # given up after exact_wait
        assert box.stats() == {"offered": 2, "sent": 1, "dropped": 0, "failed": 1, "queued": 0}
        box.exact_wait = 3600.0  # a sample that waited again would hold the test's LIMIT
        assert box.offer(samples(3)[0])
        await box.wait_for_credit()
        assert box.stats()["failed"] == 2
        await actors.restart_child("cluster", "analyzer")
        await wait_restarted(0)  # started again (not a restart after a crash)
        assert box.offer(samples(4)[0])
        await box.wait_for_credit()
        assert box.stats() == {"offered": 4, "sent": 2, "dropped": 0, "failed": 2, "queued": 0}
        nursery.cancel_scope.cancel()
