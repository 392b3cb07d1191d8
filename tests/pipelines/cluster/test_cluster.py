"""Multi-rank training with real rank processes: the modes agree, runs repeat bit for
bit, ZeRO shards what it should, checkpoints reshard (issue 4's correctness list)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.pipelines.cli_util import zerotrain

from .cluster_util import run, run_logged, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config and seed on 1 rank, 2 ranks ddp / zero2, 4 ranks zero1 / zero2."""
    root = tmp_path_factory.mktemp("modes")
    out = {}
    for ranks, mode in ((1, "ddp"), (2, "ddp"), (2, "zero2"), (4, "zero1"), (4, "zero2")):
        d = root / f"{ranks}-{mode}"
        out[(ranks, mode)] = (d, run(d, "--ranks", str(ranks), "--mode", mode))
    return out


def test_modes_give_the_same_parameters(runs):
    ref = weights(runs[(1, "ddp")][0])
    for key, (d, summary) in runs.items():
        assert summary["ranks"] == key[0] and summary["mode"] == key[1]
        assert summary["steps"] == 16 and summary["restarts"] == 0
        diff = np.abs(weights(d) - ref).max() / np.abs(ref).max()
        assert diff <= 1e-5, (key, diff)
    # one world size: ddp's all-reduce and zero2's reduce-scatter + all-gather give the
    # same bits (the ring's fixed summation order)
    assert runs[(2, "ddp")][1]["params_sha256"] == runs[(2, "zero2")][1]["params_sha256"]
    assert runs[(4, "zero1")][1]["params_sha256"] == runs[(4, "zero2")][1]["params_sha256"]


def test_zero_shards_optimizer_state_and_gradients(runs):
    def mem(key):
        return runs[key][1]["memory"]["per_rank"]

    full = mem((1, "ddp"))[0]
    assert mem((2, "ddp"))[0]["optimizer_state_bytes"] == full["optimizer_state_bytes"]
    for world in (2, 4):
        for rank_mem in mem((world, "zero2")):
            assert rank_mem["optimizer_state_bytes"] <= full["optimizer_state_bytes"] // world + 16
            assert rank_mem["reduced_grad_bytes"] <= full["reduced_grad_bytes"] // world + 8
    for z1 in mem((4, "zero1")):
        assert z1["optimizer_state_bytes"] <= full["optimizer_state_bytes"] // 4 + 16
        assert z1["reduced_grad_bytes"] == full["reduced_grad_bytes"]  # zero1 keeps it whole


def test_same_config_and_seed_twice_is_bitwise_identical(runs, tmp_path):
    again = run(tmp_path / "again", "--ranks", "4", "--mode", "zero2")
    assert again["params_sha256"] == runs[(4, "zero2")][1]["params_sha256"]


def test_outputs_of_a_cluster_run(runs):
    d, summary = runs[(2, "zero2")]
    for key in ("final_loss", "eval", "wall_s", "samples_per_s", "seed", "timing"):
        assert key in summary
    assert set(summary["eval"]) >= {"loss", "accuracy", "precision", "recall", "macro_f1"}
    records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= set(r) for r in records)
    assert zerotrain("ckpt", "verify", str(d)).returncode == 0


def test_ranks_are_pinned_to_a_cpu_each_and_that_never_changes_the_numbers(runs, tmp_path):
    # the module's 2-rank runs used the default, cluster.pin_ranks = true
    # exactly one rank per CPU: pinned, rank r to the r-th CPU; else left free (more
    # ranks would share CPUs, fewer would pile every run onto the first CPUs)
    allowed = sorted(os.sched_getaffinity(0))
    for world, mode in ((2, "ddp"), (4, "zero1")):
        cpus = runs[(world, mode)][1]["cpus_per_rank"]
        if len(allowed) == world:
            assert cpus == [[cpu] for cpu in allowed]
        else:
            assert cpus == [allowed] * world
    free = run(tmp_path / "free", "--ranks", "2", "--set", "cluster.pin_ranks=false")
    assert free["cpus_per_rank"] == [allowed, allowed]
    assert free["params_sha256"] == runs[(2, "ddp")][1]["params_sha256"]


def test_resume_reaches_the_uninterrupted_parameters(runs, tmp_path):
    d, summary = runs[(2, "zero2")]
    resumed = tmp_path / "resumed"
    shutil.copytree(d, resumed)
    for ckpt in (resumed / "checkpoints").iterdir():
        if ckpt.name != "step-00000015":
            shutil.rmtree(ckpt)
    (resumed / "summary.json").unlink()
    again, log = run_logged(resumed, "--ranks", "2", "--mode", "zero2", "--resume")
    assert "resumed at step 15 from" in log  # (a run from the seed gives the same bits)
    assert again["params_sha256"] == summary["params_sha256"]
    # a different world size and mode reshards the checkpoint
    other = tmp_path / "resharded"
    shutil.copytree(resumed, other)
    shutil.rmtree(other / "checkpoints" / "step-00000016")
    moved, log = run_logged(
        other, "--ranks", "4", "--mode", "zero1", "--resume", str(other / "checkpoints")
    )
    assert "resumed at step 15 from" in log
    assert moved["steps"] == 16
    assert moved["samples_per_s"] > 0 and moved["ranks"] == 4
    ref = weights(d)
    assert np.abs(weights(other) - ref).max() / np.abs(ref).max() <= 1e-5


def test_transformer_weights_of_a_cluster_run_load_into_torch(tmp_path):
    """weights.safetensors of a 2-rank char_lm run loads into the equivalent PyTorch
    module by name (strict), and the two give the same logits."""
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    from pipelines.config import load_config
    from pipelines.core import build_model_for
    from pipelines.data import load_dataset
    from pipelines.model.torch_twin import TorchCharTransformer
    from pipelines.store.checkpoint import read_safetensors_file

    tiny = ["model.d_model=16", "model.n_head=2", "model.n_layer=1", "train.batch_size=8"]
    tiny += ["model.seq_len=16", "data.seq_len=16", "eval.every=0", "eval.max_batches=1"]
    args = [x for kv in tiny for x in ("--set", kv)]
    proc = zerotrain("run", "char_lm", "--ranks", "2", "--mode", "zero2", "--steps", "3",
                     *args, "--run-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = load_config("char_lm", tiny)
    data = load_dataset(cfg.data, "eval")
    ours = build_model_for(cfg, data.meta)
    tensors, _ = read_safetensors_file(tmp_path / "weights.safetensors")
    ours.load_state_dict(tensors)
    module = TorchCharTransformer(data.meta["vocab_size"], 16, 2, 1, 16)
    module.load_state_dict(st_torch.load_file(str(tmp_path / "weights.safetensors")), strict=True)
    x = np.asarray(data.take(np.arange(4))["x"])
    theirs = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours.forward({"x": x})["logits"], theirs, rtol=1e-4, atol=1e-5)


def test_a_diverged_cluster_run_fails_with_exit_3(tmp_path):
    out = run(
        tmp_path / "run",
        "--ranks", "2", "--steps", "40",
        "--set", "optimizer.lr=1e30", "--set", "optimizer.name=sgd",
        expect=3,
    )  # fmt: skip
    assert "consecutive steps skipped for non-finite gradients" in out["stderr"]


def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path):
    summary = run(
        tmp_path / "run",
        "--ranks", "2", "--steps", "40",
        "--set", "eval.every=2", "--set", "eval.early_stopping.patience=1",
        "--set", "eval.early_stopping.min_delta=10",  # nothing improves by 10: stop early
    )  # fmt: skip
    assert summary["stopped_early"] is True
    assert summary["steps"] == 4  # evaluations at 2 (best) and 4 (no improvement)


def test_a_resumed_run_stops_early_where_the_uninterrupted_run_does(tmp_path):
    # patience 2: evaluations at 2 (best), 4 and 6 (no improvement) stop the run at 6.
    # The first part ends at 4 with one evaluation without improvement behind it; a
    # resume that forgot it would count afresh from 6 and stop at 10.
    early = [
        "--ranks", "2", "--set", "schedule.total_steps=40",
        "--set", "eval.every=2", "--set", "eval.early_stopping.patience=2",
        "--set", "eval.early_stopping.min_delta=10",
    ]  # fmt: skip
    whole = run(tmp_path / "whole", *early, "--steps", "40")
    assert (whole["stopped_early"], whole["steps"]) == (True, 6)
    part = tmp_path / "part"
    run(part, *early, "--steps", "4")
    resumed, log = run_logged(part, *early, "--steps", "40", "--resume", str(part))
    assert "resumed at step 4 from" in log
    assert (resumed["stopped_early"], resumed["steps"]) == (True, 6)
    assert resumed["params_sha256"] == whole["params_sha256"]


def test_bucketed_reduction_overlaps_backward_and_keeps_the_numbers(runs, tmp_path):
    """cluster.bucket_mb: buckets are all-reduced while backward runs; the result is
    the same bits run after run (with a rank killed mid-backward too) and within 1e-5
    of one rank."""
    args = ["--ranks", "4", "--mode", "zero1", "--set", "cluster.bucket_mb=0.03"]
    first = run(tmp_path / "a", *args)
    assert first["timing"]["overlapped_buckets"] > 0  # reductions began before backward ended
    killed = run(tmp_path / "b", *args, "--chaos", "kill:rank=2,step=5,at=compute",
                 command="simulate")  # fmt: skip
    assert killed["params_sha256"] == first["params_sha256"] and killed["restarts"] == 1
    ref = weights(runs[(1, "ddp")][0])
    assert np.abs(weights(tmp_path / "a") - ref).max() / np.abs(ref).max() <= 1e-5


def test_bucket_mb_is_rejected_for_zero2(tmp_path):
    proc = zerotrain("run", "mlp_classifier", "--ranks", "2", "--mode", "zero2",
                     "--set", "cluster.bucket_mb=1", "--run-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("zerotrain: config error: cluster.bucket_mb")
    )


async def test_an_analyzer_that_cannot_start_does_not_stop_the_run():
    # hooks must never stop training: the run goes on without the analyzer process
    import sys

    import trio

    import actors
    from pipelines.cluster.main import _side

    broken = actors.process_spec(
        "analyzer", [sys.executable, "-c", "raise SystemExit(7)"], wait_for=["HookAnalyzer"]
    )
    with trio.fail_after(60):
        async with actors.open_node("cluster"):
            async with trio.open_nursery() as nursery:
                sup = actors.Supervisor([broken], name="AnalyzerSupervisor", max_restarts=0)
                await nursery.start(_side, sup)  # returns: the run may go on
