"""What every runner shares: the resume check (one function for --ranks 1 and N), the
checkpoint manifest it reads back, the skip limit."""

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.core import (
    MAX_CONSECUTIVE_SKIPS,
    ResumePoint,
    RunIdentity,
    RunRefused,
    SkipLimit,
    build_model_for,
    check_resume,
    checkpoint_manifest,
    prepare_run,
)
from pipelines.data import load_dataset

SMALL = ["model.hidden=[16]", "data.n_train=256", "data.n_eval=64"]


def identity(name="mlp_classifier", *overrides):
    cfg = load_config(name, [*SMALL, *overrides] if name != "char_lm" else list(overrides))
    train = load_dataset(cfg.data, "train")
    return cfg, RunIdentity.of(cfg, build_model_for(cfg, train.meta), train)


def manifest_of(cfg, ident, **changes):
    m = checkpoint_manifest(
        cfg, ident, 5, world=2, counters={}, early_state={}, metrics={"train_loss": 1.0}
    )
    return dict(m, **changes)


def check(ident, manifest):
    check_resume(ident, ResumePoint(Path("ck/step-00000005"), Path("ck/step-00000005"), manifest))


def test_a_checkpoint_resumes_at_any_world_size_mode_and_step_count():
    cfg, ident = identity()
    _, other = identity("mlp_classifier", "cluster.ranks=4", "cluster.mode=zero1")
    _, longer = identity("mlp_classifier", "train.steps=900", "schedule.total_steps=600")
    _, also = identity("mlp_classifier", "train.steps=901", "schedule.total_steps=600")
    check(other, manifest_of(cfg, ident))
    check(also, manifest_of(cfg, longer))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"pipeline": "char_lm"}, "pipeline 'char_lm' in the checkpoint, 'mlp_classifier' here"),
        ({"n": 12}, "parameter count 12 in the checkpoint, 12730 here"),
        (
            {"model_shapes": {"layers.0.weight": [784, 16]}},
            "parameter 'layers.0.weight' has shape [784, 16] in the checkpoint, [16, 784] here",
        ),
        ({"optimizer": "sgd"}, "optimizer 'sgd' in the checkpoint, 'adamw' here"),
        (
            {"optimizer_state": ["momentum_buffer"]},
            "optimizer state ['momentum_buffer'] in the checkpoint, ['exp_avg', 'exp_avg_sq']",
        ),
        (
            {"dataset": {"name": "friedman"}},
            "data name 'friedman' in the checkpoint, 'digits' here",
        ),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_in_one_line_naming_what_differs(
    change, named, raises_one_line
):
    cfg, ident = identity()
    with raises_one_line(RunRefused, match="is not a checkpoint of this run") as info:
        check(ident, manifest_of(cfg, ident, **change))
    assert named in str(info.value)


def test_a_config_change_that_alters_the_numbers_is_named_key_by_key(raises_one_line):
    cfg, ident = identity()
    _, changed = identity("mlp_classifier", "optimizer.lr=0.5", "train.clip_norm=0.25")
    with raises_one_line(RunRefused, match="optimizer.lr .* here; train.clip_norm") as info:
        check(changed, manifest_of(cfg, ident))
    assert "optimizer.lr 0.001 in the checkpoint, 0.5 here" in str(info.value)
    # more steps lengthen the LR schedule: named, with the way to keep the checkpoint's
    _, longer = identity("mlp_classifier", "train.steps=900")
    with raises_one_line(RunRefused, match="schedule.total_steps 300 in the checkpoint, 900") as e:
        check(longer, manifest_of(cfg, ident))
    assert "--set schedule.total_steps=300 keeps the checkpoint's schedule" in str(e.value)
    # a checkpoint that records no config still cannot be resumed with other numbers
    bare = {k: v for k, v in manifest_of(cfg, ident).items() if k != "resume_config"}
    with raises_one_line(RunRefused, match="resume_hash differs"):
        check(changed, bare)


def test_a_checkpoint_written_before_manifests_recorded_identity_is_checked_by_what_it_has(
    raises_one_line,
):
    cfg, ident = identity()
    old = manifest_of(cfg, ident)
    for key in ("pipeline", "model_shapes", "optimizer_state", "dataset", "resume_config"):
        del old[key]
    check(ident, old)
    _, sgd = identity("mlp_classifier", "optimizer.name=sgd")
    with raises_one_line(RunRefused, match="optimizer 'adamw' in the checkpoint, 'sgd' here"):
        check(sgd, old)


def test_the_skip_limit_fails_only_on_that_many_consecutive_skips():
    limit = SkipLimit()
    for step in range(1, MAX_CONSECUTIVE_SKIPS):
        assert limit.update(True, step) is None
    assert limit.update(False, 100) is None  # a good step starts the count again
    for step in range(1, MAX_CONSECUTIVE_SKIPS):
        assert limit.update(True, step) is None
    reason = limit.update(True, 77)
    assert reason == f"{MAX_CONSECUTIVE_SKIPS} consecutive steps skipped for non-finite " + (
        "gradients (last at step 77)"
    )


def test_a_batch_as_large_as_the_data_is_accepted_and_one_larger_refused(raises_one_line):
    cfg = load_config("mlp_classifier", [*SMALL, "train.batch_size=256"])
    assert len(prepare_run(cfg).train) == 256
    cfg = load_config("mlp_classifier", [*SMALL, "train.batch_size=257"])
    with raises_one_line(RunRefused, match=r"257 exceeds the 256 training samples \(accepted: 1"):
        prepare_run(cfg)


def test_data_whose_vocabulary_changed_under_the_same_config_is_refused(tmp_path, raises_one_line):
    # the same path, length and config: only the data's meta (its vocabulary) differs
    text = tmp_path / "t.txt"
    overrides = ["data.name=text", f'data.path="{text}"', "data.tokenizer=chars"]
    text.write_text("abcd\n" * 200)
    cfg, before = identity("char_lm", *overrides)
    text.write_text("abce\n" * 200)
    _, after = identity("char_lm", *overrides)
    assert after.resume_hash == before.resume_hash and after.shapes == before.shapes
    with raises_one_line(RunRefused, match="data meta.vocab ") as info:
        check(after, manifest_of(cfg, before))
    assert "data meta.vocab '\\nabcd' in the checkpoint, '\\nabce' here" in str(info.value)
