import json
import sys

import pytest

from pipelines.hooks import AnalyzerRunner, HooksLog
from pipelines.hooks.builtins import builtin_hooks
from pipelines.hooks.report import ReportError, load_run, main_report, render_report

PNG = b"\x89PNG\r\n\x1a\n"


def fabricate(run_dir, step_ctx, steps=12, hooks=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")  # not a step row: skipped
        for step in range(steps):
            row = {"step": step, "loss": 3.0 / (1 + step), "lr": 1e-3, "grad_norm": 1.0}
            f.write(json.dumps({**row, "samples_per_s": 100.0}) + "\n")
    if hooks:
        runner = AnalyzerRunner(builtin_hooks(), sinks=[HooksLog(run_dir / "hooks.jsonl")])
        for step in range(steps):
            runner.run(step_ctx(step, ranks=4, scale=0.9**step)[0])
        runner.close()
    return run_dir


def test_a_run_with_hooks_renders_all_four_plots(tmp_path, step_ctx, capsys):
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
    run = fabricate(tmp_path / "run", step_ctx)
    assert main_report([str(run)]) == 0
    names = ["loss_lr.png", "gradient_flow.png", "layer_norms.png", "noise_scale.png"]
    assert capsys.readouterr().out.split() == [str(run / "report" / n) for n in names]
    for name in names:
        assert (run / "report" / name).read_bytes().startswith(PNG)


def test_a_run_without_hooks_renders_loss_and_lr_only(tmp_path, step_ctx):
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
    run = fabricate(tmp_path / "run", step_ctx, hooks=False)
    written = render_report(run, out_dir=tmp_path / "out")
    assert [p.name for p in written] == ["loss_lr.png"]
    assert written[0].parent == tmp_path / "out"


def test_a_torn_last_line_from_a_killed_run_is_ignored(tmp_path, step_ctx):
    run = fabricate(tmp_path / "run", step_ctx, steps=3, hooks=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    rows, _ = load_run(run)
    assert [r["step"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist or is not a directory"),
        ("", "has no records with 'step' and 'loss'"),
        ('{"step": 0, "loss": 1}\nnot json\n{"step": 1, "loss": 1}\n', "metrics.jsonl:2: not JSON"),
        ("[1, 2]\n", "metrics.jsonl:1: expected a JSON object"),
        ('{"step": 0, "loss": "high"}\n', "step, loss and lr must be numbers"),
        ('{"event": "start"}\n', "has no records with 'step' and 'loss'"),
    ],
)
def test_a_bad_run_dir_is_one_line_and_exit_status_2(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        (run / "metrics.jsonl").write_text(content)
    assert main_report([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zerotrain report: ")
    assert message in err
    assert not (run / "report").exists()


def test_a_dir_without_metrics_says_what_it_expected(tmp_path):
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        render_report(tmp_path)


def test_missing_matplotlib_is_one_line_and_exit_status_3(tmp_path, step_ctx, capsys, monkeypatch):
    run = fabricate(tmp_path / "run", step_ctx, steps=2, hooks=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main_report([str(run)]) == 3
    err = capsys.readouterr().err
    assert (
        err == "zerotrain report: matplotlib is not installed; install it with: "
        "pip install 'zerotrain[report]'\n"
    )
