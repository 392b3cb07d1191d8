"""Models from the user's file: --model PATH.py:NAME, check-model, and bad model files."""

import json
from pathlib import Path

import pytest

from tests.pipelines.cli_util import cli, one_line

MODELS = Path(__file__).resolve().parents[3] / "scripts" / "models"
SMALL = ["--set", "model.hidden=[32]", "--set", "data.n_train=800", "--set", "data.n_eval=100"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_file_copy_of_the_builtin_mlp_trains_to_the_same_bits_on_2_ranks_zero2(tmp_path, capsys):
    common = ["mlp_classifier", "--ranks", 2, "--mode", "zero2", "--steps", 12, "--seed", 11]
    common += [*SMALL, "--set", "cluster.pin_ranks=false"]
    spec = f"{MODELS / 'copy_mlp.py'}:CopyMLP"
    runs = {}
    for name, extra in (
        ("file1", ["--model", spec]),
        ("file2", ["--model", spec]),
        ("builtin", []),
    ):
        code, _, err = cli(capsys, "run", *common, *extra, "--run-dir", tmp_path / name)
        assert code == 0, err
        runs[name] = tmp_path / name
    assert summary(runs["file1"])["params_sha256"] == summary(runs["file2"])["params_sha256"]
    assert losses(runs["file1"]) == pytest.approx(losses(runs["builtin"]), abs=1e-6)
    assert summary(runs["file1"])["params_sha256"] == summary(runs["builtin"])["params_sha256"]


def test_the_worked_example_trains_from_the_cli(tmp_path, capsys):
    spec = f"{MODELS / 'gated_mlp.py'}:GatedMLP"
    code, _, err = cli(
        capsys,
        *("run", "mlp_classifier", "--model", spec, "--steps", 60, *SMALL),
        *("--set", "optimizer.lr=3e-3", "--run-dir", tmp_path / "run"),
    )
    assert code == 0, err
    s = summary(tmp_path / "run")
    assert s["eval"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    from pipelines.store.checkpoint import read_safetensors_file

    names = read_safetensors_file(tmp_path / "run" / "weights.safetensors")[0]
    assert "gated.gate.weight" in names  # the file's model, not the built-in


def test_the_analyzer_process_names_a_file_models_parameters_without_importing_it(tmp_path, capsys):
    """The analyzer builds no model: the ranks send the layout (names, offsets, shapes)
    with each sample, so a model from a file is analysed by its own parameter names."""
    spec = f"{MODELS / 'gated_mlp.py'}:GatedMLP"
    code, _, err = cli(
        capsys,
        *("run", "mlp_classifier", "--model", spec, "--steps", 4, *SMALL),
        *("--ranks", 2, "--hook", "builtin:grad_norm", "--run-dir", tmp_path / "run"),
        *("--set", "cluster.pin_ranks=false"),
    )
    assert code == 0, err
    records = [json.loads(line) for line in open(tmp_path / "run" / "hooks.jsonl")]
    names = {k for r in records for k in r.get("metrics", {}) if k.startswith("norm/")}
    assert {"norm/gated.gate.weight", "norm/gated.value.weight", "norm/head.bias"} <= names


def test_check_model_passes_a_correct_layer_and_fails_a_wrong_backward(tmp_path, capsys):
    code, out, _ = cli(capsys, "check-model", f"{MODELS / 'gated_mlp.py'}:GatedMLP")
    assert code == 0, out
    assert "gated.gate.weight" in out and "6 of 6 parameters pass" in out
    broken = (
        (MODELS / "gated_mlp.py")
        .read_text()
        .replace("dg = dout * self._v * self._s * (1.0 - self._s)", "dg = dout * self._v * self._s")
    )
    (tmp_path / "broken.py").write_text(broken)
    code, out, _ = cli(capsys, "check-model", f"{tmp_path / 'broken.py'}:GatedMLP")
    assert code == 1
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:-1]}
    assert rows["gated.gate.weight"] == "FAIL" and rows["gated.value.weight"] == "pass"


BAD = {
    "syntax": ("x = 1\ndef f(:\n", "M", r"bad.py line 2: does not import: SyntaxError"),
    "raises on import": (
        "import numpy\n\nraise RuntimeError('no GPU here')\n",
        "M",
        r"bad.py line 3: does not import: RuntimeError: no GPU here",
    ),
    "missing name": (
        "from pipelines.model import Model\n\n\ndef mlp():\n    pass\n",
        "Net",
        r"bad.py: no name 'Net' \(models and functions defined there: mlp\)",
    ),
    "not a model": ("Net = 42\n", "Net", r"bad.py:Net is a int, not a pipelines.model Model"),
    "returns no model": (
        "def net(**kw):\n    return 'model'\n",
        "net",
        r"bad.py:net returned a str, not a pipelines.model Model",
    ),
    "batch keys mismatch": (
        (MODELS / "copy_mlp.py").read_text().replace('batch, "x"', 'batch, "pixels"'),
        "CopyMLP",
        r"does not take the data's batch \(keys x, y\): ValueError: .*missing key 'pixels'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_files_are_one_line_exit_2_before_any_rank(tmp_path, capsys, case):
    text, name, match = BAD[case]
    (tmp_path / "bad.py").write_text(text)
    run_dir = tmp_path / "run"
    code, _, err = cli(
        capsys,
        *("run", "mlp_classifier", "--ranks", 2, "--model", f"{tmp_path / 'bad.py'}:{name}"),
        *(*SMALL, "--run-dir", run_dir),
    )
    assert code == 2
    import re

    assert re.search(match, one_line(err)), err
    assert not run_dir.exists()
