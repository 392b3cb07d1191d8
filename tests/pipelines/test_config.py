"""Config schema: loading, one-line errors naming the key, --set overrides, the hash."""

import subprocess
import sys

import pytest

from pipelines.config import (
    ConfigError,
    builtin_pipelines,
    config_hash,
    from_dict,
    load_config,
    parse_override,
    resume_hash,
)


def test_every_builtin_pipeline_loads_and_has_a_description():
    pipes = builtin_pipelines()
    assert {"char_lm", "mlp_classifier", "mlp_regressor", "triplet_embedding"} <= set(pipes)
    for name, text in pipes.items():
        cfg = load_config(name)
        assert cfg.name == name
        assert text and "\n" not in text


def test_no_config_means_the_default_char_lm_pipeline():
    cfg = load_config()
    assert cfg.name == "char_lm"
    assert cfg.model.name == "char_transformer"
    assert cfg.model.options["d_model"] == 128 and cfg.model.options["n_layer"] == 2
    assert cfg.optimizer.name == "adamw" and cfg.schedule.name == "warmup_cosine"
    assert cfg.train.batch_size == 32


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.bogus=1", "train.bogus", "unknown key"),
        ("optimizer.lrr=0.1", "optimizer.lrr", "did you mean 'lr'"),
        ('train.steps="ten"', "train.steps", 'expected an integer, got "ten"'),
        ("train.steps=-1", "train.steps", "an integer >= 0, got -1"),
        # 0 trains until stopped: a decaying schedule then needs its own horizon
        ("train.steps=0", "schedule.total_steps", "> 0 with train.steps = 0"),
        ("train.steps=1.5", "train.steps", "expected an integer"),
        ("optimizer.lr=-1", "optimizer.lr", "expected a number > 0.0, got -1.0"),
        ("optimizer.betas=[0.9]", "optimizer.betas", "two numbers"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas[1]", "< 1.0"),
        ("cluster.mode=zero3", "cluster.mode", 'one of ddp, zero1, zero2, got "zero3"'),
        ("cluster.wire_dtype=fp16", "cluster.wire_dtype", 'one of fp32, bf16, got "fp16"'),
        ("cluster.ranks=0", "cluster.ranks", ">= 1"),
        ("train.grad_accum=5", "train.batch_size", "a multiple of"),
        ('eval.metrics=["r2"]', "eval.metrics[0]", "a metric of model"),
        ("data.n_train=10", "data.n_train", "unknown key for dataset 'corpus'"),
        ("model.d_modle=64", "model.d_modle", "did you mean 'd_model'"),
        ("eval.early_stopping.mode=up", "eval.early_stopping.mode", "one of min, max"),
        ("train=3", "train", "expected a table"),
        ("optimizer.nesterov=true", "optimizer.nesterov", "momentum > 0"),
        ("loss.name=hinge", "loss.name", "a registered loss"),
        ("hooks.specs=[3]", "hooks.specs[0]", "expected"),
        ("hooks.specs=[{every = 2}]", "hooks.specs[0]", "hook spec"),
        ("hooks.timeout_s=0", "hooks.timeout_s", "> 0.0"),
        ("train.log_every=-1", "train.log_every", "an integer >= 0, got -1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_dotted_key(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("char_lm", [override])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}:"), msg
    assert fragment in msg, msg


def test_unknown_top_level_section_is_rejected_with_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"^optimiser: unknown key \(top level\).*optimizer"):
        from_dict({"optimiser": {}})


def test_a_dataset_that_does_not_feed_the_model_is_rejected():
    with pytest.raises(
        ConfigError,
        match=r"^data.name: expected a dataset for model "
        r"'mlp_classifier': digits, table, got \"friedman\"$",
    ):
        from_dict({"model": {"name": "mlp_classifier"}, "data": {"name": "friedman"}})


def test_set_overrides_parse_as_toml_values_or_bare_words():
    assert parse_override("optimizer.lr=3e-4") == (["optimizer", "lr"], 3e-4)
    assert parse_override("optimizer.betas=[0.9, 0.95]") == (["optimizer", "betas"], [0.9, 0.95])
    assert parse_override("cluster.mode=zero2") == (["cluster", "mode"], "zero2")
    assert parse_override('hooks.specs=["a.py:f"]')[1] == ["a.py:f"]
    cfg = load_config(
        "char_lm", ["optimizer.lr=3e-4", "cluster.mode=zero2", "eval.early_stopping.patience=2"]
    )
    assert cfg.optimizer.lr == 3e-4
    assert cfg.cluster.mode == "zero2"
    assert cfg.eval.early_stopping.patience == 2


def test_a_malformed_set_is_a_config_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("char_lm", ["optimizer.lr"])
    with pytest.raises(ConfigError, match="is a value, not a table"):
        load_config("char_lm", ["train.steps.x=1"])


def test_a_missing_file_or_pipeline_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="built-in pipeline"):
        load_config("no_such_pipeline")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "x.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


def test_a_toml_file_with_only_some_keys_gets_the_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[model]\nname = "mlp_regressor"\n[data]\nname = "friedman"\n'
        'n_train = 100\n[eval]\nmetrics = ["mse", "r2"]\n'
    )
    cfg = load_config(str(path))
    assert cfg.name == "mine"
    assert cfg.data.options == {"n_train": 100, "n_eval": 2000, "noise": 1.0, "n_features": 10}
    assert cfg.train.steps == 100 and cfg.cluster.mode == "ddp"


# one value in each section that shapes the numbers
CHANGES = [
    "train.seed=1",
    "model.d_model=32",
    "data.seq_len=16",
    "optimizer.lr=1e-4",
    "schedule.warmup_steps=7",
]


def test_config_hash_is_stable_and_changes_with_any_value():
    a = load_config("char_lm")
    assert config_hash(a) == config_hash(load_config("char_lm")) and len(config_hash(a)) == 64
    # the same in another process (no per-process salt, no dict-order luck)
    code = "from pipelines.config import *; print(config_hash(load_config('char_lm')))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == config_hash(a)
    hashes = {config_hash(load_config("char_lm", [change])) for change in CHANGES}
    assert len(hashes) == len(CHANGES) and config_hash(a) not in hashes


def test_resume_hash_ignores_world_size_and_mode_but_not_the_numbers():
    base = load_config("char_lm")
    assert resume_hash(
        load_config("char_lm", ["cluster.ranks=4", "cluster.mode=zero2"])
    ) == resume_hash(base)
    for change in CHANGES:
        assert resume_hash(load_config("char_lm", [change])) != resume_hash(base), change


def test_the_global_batch_is_split_over_ranks_and_micro_steps():
    cfg = load_config("mlp_classifier", ["cluster.ranks=4", "train.grad_accum=2"])
    assert cfg.train.batch_size == 128 and cfg.micro_batch == 16


def test_live_overrides_apply_from_their_step_by_step_then_in_decision_order():
    from pipelines.config import LiveConfig

    base = load_config("mlp_classifier")
    live = LiveConfig(
        base,
        [
            {"step": 20, "key": "optimizer.lr", "value": 0.5},
            {"step": 10, "key": "optimizer.lr", "value": 0.1},
            {"step": 10, "key": "optimizer.lr", "value": 0.2},  # decided later: wins
            {"step": 10, "key": "train.clip_norm", "value": 1.0},
        ],
    )
    assert live.at(9) is base
    assert (live.at(10).optimizer.lr, live.at(10).train.clip_norm) == (0.2, 1.0)
    assert live.at(19) is live.at(10)  # cached by how many apply
    assert live.at(20).optimizer.lr == 0.5 and live.at(20).train.clip_norm == 1.0


def test_a_key_that_cannot_change_live_is_named_with_the_ones_that_can():
    from pipelines.config import LIVE_KEYS, check_live_override

    cfg = load_config("mlp_classifier")
    assert check_live_override(cfg, "optimizer.lr", "3e-4") == 3e-4
    with pytest.raises(ConfigError) as err:
        check_live_override(cfg, "model.hidden", "[8]")
    assert str(err.value) == (
        "model.hidden: cannot be changed while a job runs; the keys that can: "
        + ", ".join(LIVE_KEYS)
    )
    with pytest.raises(ConfigError, match=r"^train.clip_norm: expected a number >= 0.0"):
        check_live_override(cfg, "train.clip_norm", "-1")
