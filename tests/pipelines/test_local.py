"""The single-process runner: convergence of each model, exact resume, early stopping,
hooks that fail without stopping training."""

import io
import json

import pytest

from pipelines.config import load_config
from pipelines.core import RunRefused, TrainingFailed
from pipelines.local import run_local

QUIET = ["eval.every=0", "checkpoint.every=0"]


def run(tmp_path, name, *overrides, sub="run", **kw):
    cfg = load_config(name, [*QUIET, *overrides])
    return run_local(cfg, tmp_path / sub, out=io.StringIO(), **kw)


# Convergence: each model reaches a stated number on held-out data in a stated number of
# steps (a few seconds each). Chance levels: LM loss ln 96 = 4.56; 10 classes 0.1;
# regression r2 0; triplets 0.5.


def test_the_char_transformer_learns_characters_in_150_steps(tmp_path):
    s = run(
        tmp_path,
        "char_lm",
        "model.d_model=64",
        "model.n_layer=1",
        "model.seq_len=32",
        "data.seq_len=32",
        "train.batch_size=16",
        "train.steps=150",
        "optimizer.lr=1e-2",
        "schedule.warmup_steps=10",
        "eval.max_batches=2",
    )
    assert s["eval"]["loss"] < 3.1 and s["eval"]["perplexity"] < 22


def test_the_mlp_classifier_reaches_85_percent_on_held_out_digits_in_150_steps(tmp_path):
    s = run(
        tmp_path,
        "mlp_classifier",
        "model.hidden=[64]",
        "data.n_train=4000",
        "data.n_eval=500",
        "train.steps=150",
        "train.batch_size=64",
        "eval.early_stopping.patience=0",
    )
    assert s["eval"]["accuracy"] > 0.85 and s["eval"]["macro_f1"] > 0.85


def test_the_mlp_regressor_reaches_r2_0_75_on_friedman_in_250_steps(tmp_path):
    s = run(
        tmp_path,
        "mlp_regressor",
        "model.hidden=[64, 64]",
        "data.n_train=4000",
        "data.n_eval=500",
        "train.steps=250",
    )
    assert s["eval"]["r2"] > 0.75 and s["eval"]["mse"] < 0.25


def test_the_triplet_embedder_orders_90_percent_of_held_out_triplets_in_150_steps(tmp_path):
    s = run(
        tmp_path,
        "triplet_embedding",
        "model.hidden=[64]",
        "data.n_train=2000",
        "data.n_eval=500",
        "train.steps=150",
    )
    assert s["eval"]["accuracy"] > 0.9


TINY = ["model.hidden=[16]", "data.n_train=256", "data.n_eval=64", "train.steps=8"]
# the full run's schedule, for runs cut short to be resumed (a shorter train.steps is a
# shorter schedule, which a resume refuses)
SCHEDULE = ["schedule.total_steps=8", "schedule.warmup_steps=4"]


def test_a_resumed_run_ends_with_the_same_params_sha256(tmp_path):
    full = run(tmp_path, "mlp_classifier", *TINY, *SCHEDULE, sub="full")
    # the schedule's length is that of the full run (else more steps are a new schedule)
    part = run(tmp_path, "mlp_classifier", *TINY, "train.steps=5", *SCHEDULE, sub="part")
    assert part["steps"] == 5
    log = io.StringIO()
    cfg = load_config("mlp_classifier", [*QUIET, *TINY, *SCHEDULE])
    resumed = run_local(cfg, tmp_path / "resumed", out=log, resume=tmp_path / "part")
    assert resumed["steps"] == 8
    assert resumed["params_sha256"] == full["params_sha256"]
    # it did resume (a run from scratch ends with the same bits): from step 5, and only
    # steps 6..8 were trained here
    assert "resumed from" in log.getvalue() and "(step 5," in log.getvalue()
    metrics = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    trained = [json.loads(line)["step"] for line in metrics if '"loss"' in line]
    assert trained == [6, 7, 8]


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path):
    full = run(tmp_path, "mlp_classifier", *TINY, *SCHEDULE, "checkpoint.every=3", sub="full")
    part = run(
        tmp_path,
        "mlp_classifier",
        *TINY,
        "checkpoint.every=3",
        "train.steps=6",
        *SCHEDULE,
        sub="part",
    )
    assert part["steps"] == 6
    shard = next((tmp_path / "part" / "checkpoints" / "step-00000006").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    out = io.StringIO()
    cfg = load_config("mlp_classifier", [*QUIET, *TINY, *SCHEDULE, "checkpoint.every=3"])
    resumed = run_local(cfg, tmp_path / "resumed", resume=tmp_path / "part", out=out)
    assert "skipping checkpoint" in out.getvalue() and "truncated" in out.getvalue()
    assert "resumed from" in out.getvalue() and "step 3" in out.getvalue()
    assert resumed["params_sha256"] == full["params_sha256"]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["optimizer.name=sgd"], "optimizer 'adamw' in the checkpoint, 'sgd' here"),
        (["model.hidden=[12]"], "parameter count 12730 in the checkpoint, 9550 here"),
        (["optimizer.lr=0.5"], "optimizer.lr 0.001 in the checkpoint, 0.5 here"),
    ],
)
def test_resuming_another_run_is_refused_before_the_run_dir_exists(
    tmp_path, overrides, named, raises_one_line
):
    run(tmp_path, "mlp_classifier", *TINY, "train.steps=2", *SCHEDULE, sub="adamw")
    cfg = load_config("mlp_classifier", [*QUIET, *TINY, *SCHEDULE, *overrides])
    with raises_one_line(RunRefused, match="is not a checkpoint of this run") as info:
        run_local(cfg, tmp_path / "other", out=io.StringIO(), resume=tmp_path / "adamw")
    assert named in str(info.value)
    assert not (tmp_path / "other").exists()


def test_early_stopping_ends_the_run_when_the_metric_stalls(tmp_path):
    s = run(
        tmp_path,
        "mlp_classifier",
        *TINY,
        "train.steps=60",
        "eval.every=2",
        "optimizer.lr=1e-9",
        "eval.early_stopping.patience=2",
        "eval.early_stopping.min_delta=0.5",
    )
    assert s["stopped_early"] and s["steps"] == 6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_a_run_whose_every_step_is_non_finite_fails(tmp_path):
    with pytest.raises(TrainingFailed, match="consecutive steps skipped"):
        run(
            tmp_path,
            "mlp_classifier",
            *TINY,
            "train.steps=40",
            "optimizer.lr=1e30",
            "optimizer.name=sgd",
        )


HOOKS = """
import numpy as np
from pipelines.hooks import analyzer, transform

@analyzer(every=1)
def norms(ctx):
    return {"w0": float(np.linalg.norm(ctx.grads["layers.0.weight"])),
            "moved": float(np.abs(ctx.update["layers.0.weight"]).max())}

@analyzer(every=2)
def broken(ctx):
    raise RuntimeError("boom")

@transform(every=1)
def halve(ctx):
    for g in ctx.grads.values():
        g *= 0.5
"""


def test_analyzers_that_raise_are_counted_and_do_not_change_the_run(tmp_path):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    plain = run(tmp_path, "mlp_classifier", *TINY, sub="plain")
    hooked = run(
        tmp_path,
        "mlp_classifier",
        *TINY,
        sub="hooked",
        hooks=[f"{script}:norms", f"{script}:broken"],
    )
    assert hooked["params_sha256"] == plain["params_sha256"]
    stats = hooked["hooks"]["hooks"]
    assert stats["norms"]["ok"] == 8 and stats["broken"]["errors"] == 4
    records = [
        json.loads(line) for line in (tmp_path / "hooked" / "hooks.jsonl").read_text().splitlines()
    ]
    norms = [r for r in records if r["hook"] == "norms"]
    assert [r["step"] for r in norms] == list(range(1, 9))
    assert norms[0]["metrics"]["w0"] > 0 and norms[0]["metrics"]["moved"] > 0


def test_a_transform_edits_the_gradient_before_the_step_deterministically(tmp_path):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    # plain SGD (no weight decay, no warm-up, no clipping): halving every gradient is
    # halving the learning rate, and both are exact in binary floating point
    sgd = ("optimizer.name=sgd", "optimizer.weight_decay=0", "optimizer.lr=0.05")
    sgd += ("schedule.warmup_steps=0", "train.clip_norm=0")
    plain = run(tmp_path, "mlp_classifier", *TINY, *sgd, sub="plain")
    half_lr = run(tmp_path, "mlp_classifier", *TINY, *sgd, "optimizer.lr=0.025", sub="half")
    a = run(tmp_path, "mlp_classifier", *TINY, *sgd, sub="a", hooks=[f"{script}:halve"])
    b = run(tmp_path, "mlp_classifier", *TINY, *sgd, sub="b", hooks=[f"{script}:halve"])
    assert a["params_sha256"] == b["params_sha256"] == half_lr["params_sha256"]
    assert plain["final_loss"] != pytest.approx(half_lr["final_loss"], rel=1e-3)  # it moved
