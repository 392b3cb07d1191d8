"""The `zerotrain` command line: runs end to end in subprocesses; the argument and config
errors in-process through `main()` (the same code path, without an interpreter start)."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from pipelines.cli import main
from pipelines.store.checkpoint import read_safetensors_file
from pipelines.store.rundir import Progress
from tests.pipelines.cli_util import BLAS_THREAD_VARS, REPO, zerotrain

# A run of a few steps on a few hundred samples: seconds, not minutes.
TINY = [
    "mlp_regressor",
    "--steps",
    "4",
    "--set",
    "data.n_train=256",
    "--set",
    "data.n_eval=64",
    "--set",
    "model.hidden=[16]",
    "--set",
    "checkpoint.every=2",
]


def assert_one_line_error(proc, code=2):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def run_main(capsys, *args):
    """main(args) in-process, as a CompletedProcess-like result."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_run_writes_metrics_checkpoints_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    proc = zerotrain("run", *TINY, "--seed", "3", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "skipped"} <= r.keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "final_loss",
        "eval",
        "steps",
        "ranks",
        "mode",
        "seed",
        "wall_s",
        "samples_per_s",
        "restarts",
        "params_sha256",
        "memory",
    ):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["seed"] == 3 and summary["ranks"] == 1
    from cykernels import gemm

    assert summary["blas"] == ("mkl" if gemm._mkl_path() else "numpy")
    assert set(summary["eval"]) == {"loss", "mse", "mae", "r2"}
    assert len(summary["params_sha256"]) == 64
    mem = summary["memory"]["per_rank"][0]
    assert mem["optimizer_state_bytes"] == 2 * 4 * summary["n_params"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    weights = read_safetensors_file(run_dir / "weights.safetensors")[0]
    assert sorted(weights) == [
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.bias",
        "layers.1.weight",
    ]
    assert weights["layers.0.weight"].shape == (16, 10)
    # not a terminal: plain progress lines
    assert "step 4/4" in proc.stderr and "\r" not in proc.stderr


def test_the_same_config_and_seed_give_the_same_params_sha256(tmp_path):
    a = zerotrain("run", *TINY, "--run-dir", str(tmp_path / "a"))
    b = zerotrain("run", *TINY, "--run-dir", str(tmp_path / "b"))
    assert a.returncode == b.returncode == 0
    sha = [
        json.loads((tmp_path / d / "summary.json").read_text())["params_sha256"] for d in ("a", "b")
    ]
    assert sha[0] == sha[1]
    c = zerotrain("run", *TINY, "--seed", "1", "--run-dir", str(tmp_path / "c"))
    assert c.returncode == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["params_sha256"] != sha[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["--set", 'train.batch_size="big"'], "train.batch_size: expected an integer"),
        (["--set", "optimizer.lr=0"], "optimizer.lr: expected a number > 0.0"),
        (["--mode", "zero3"], "argument --mode: invalid choice: 'zero3'"),
        (["--steps", "-1"], "argument --steps: expected an integer >= 0, got '-1'"),
        (["--hook", "/no/such/hook.py"], "hook '/no/such/hook.py': no such file"),
    ],
)
def test_a_config_or_usage_error_exits_2_with_one_line(capsys, args, fragment):
    line = assert_one_line_error(run_main(capsys, "run", "mlp_regressor", *args))
    assert fragment in line


def test_a_config_error_in_a_subprocess_exits_2_without_a_traceback():
    line = assert_one_line_error(zerotrain("run", "--set", "cluster.ranks=0"))
    assert line == (
        "zerotrain: config error: cluster.ranks: expected an integer >= 1 and <= 256, got 0"
    )


def test_an_unknown_matrix_library_exits_2_before_any_rank_starts(capsys, monkeypatch):
    monkeypatch.setenv("ZEROTRAIN_BLAS", "openblas")
    line = assert_one_line_error(run_main(capsys, "run", "mlp_regressor"))
    assert line == "zerotrain: ZEROTRAIN_BLAS: expected one of auto, mkl, numpy, got 'openblas'"


def test_the_matrix_library_is_chosen_by_the_environment_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROTRAIN_BLAS", "numpy")
    proc = zerotrain("run", *TINY, "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["blas"] == "numpy"


def test_an_unknown_pipeline_and_a_missing_command_exit_2(capsys):
    assert "built-in pipeline" in assert_one_line_error(run_main(capsys, "run", "nope"))
    assert "expected a command" in assert_one_line_error(run_main(capsys))
    assert "invalid choice: 'frobnicate'" in assert_one_line_error(run_main(capsys, "frobnicate"))


@pytest.mark.parametrize("columns", [None, "120", "0", "-5", "wide"])
def test_help_is_as_wide_as_shutil_says_the_terminal_is(monkeypatch, columns):
    """The command line's help formatter sizes itself without shutil (a client verb's
    start): the same width shutil.get_terminal_size gives."""
    from pipelines.cli import _terminal_columns

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _terminal_columns() == shutil.get_terminal_size().columns


def test_pipelines_lists_every_builtin_with_a_description(capsys):
    proc = run_main(capsys, "pipelines")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["char_lm", "mlp_classifier", "mlp_regressor", "triplet_embedding"]
    assert "(default)" in lines[0]


def test_run_with_two_ranks_writes_the_run_dir(tmp_path):
    proc = zerotrain("run", *TINY, "--ranks", "2", "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 4
    # the environment the ranks inherit (zerotrain() leaves the BLAS thread vars unset)
    assert summary["blas_threads"] == "1"


def test_the_cli_limits_blas_threads_before_building_its_parser_imports_numpy():
    # pipelines.use (the parser's commands) imports numpy, after which the limit could
    # no longer take: each rank's numpy BLAS then ran a pool of threads on its one CPU
    code = (
        "import os, sys\n"
        "from pipelines import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "cli.main(['pipelines'])\n"
        "assert 'numpy' in sys.modules\n"
        "print(' '.join(os.environ.get(v, '-') for v in cli._BLAS_THREAD_VARS))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "1 1 1"
    env["OPENBLAS_NUM_THREADS"] = "2"  # the user's choice wins
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.stdout.splitlines()[-1] == "2 1 1", proc.stderr


def test_simulate_validates_its_chaos_spec(capsys, tmp_path):
    line = assert_one_line_error(
        run_main(
            capsys, "simulate", "mlp_regressor", "--ranks", "2", "--chaos", "kill:rank=5,step=3"
        )
    )
    assert "kill.rank: expected 0 <= rank < 2" in line
    line = assert_one_line_error(run_main(capsys, "simulate", "--chaos", "explode:rank=0"))
    assert "event kind" in line
    line = assert_one_line_error(run_main(capsys, "simulate", "--chaos", "stall:rank=0"))
    assert "missing step, seconds" in line
    ok = zerotrain(
        "simulate",
        *TINY,
        "--ranks",
        "2",
        "--chaos",
        "kill:rank=1,step=3;delay:rank=0,ms=5;random-kill:every=10,seed=1",
        "--run-dir",
        str(tmp_path / "sim"),
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    recovery = json.loads((tmp_path / "sim" / "recovery.json").read_text())
    assert [f["kind"] for f in recovery["faults"]] == ["kill"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A TINY run (one rank, adam): checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = zerotrain("run", *TINY, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_ckpt_verify_and_inspect_report_a_corrupted_checkpoint(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    ok = zerotrain("ckpt", "verify", str(run_dir))
    assert ok.returncode == 0 and "2 of 2 checkpoints valid" in ok.stdout
    shard = next((run_dir / "checkpoints" / "step-00000004").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 1
    shard.write_bytes(bytes(raw))
    bad = zerotrain("ckpt", "verify", str(run_dir / "checkpoints"))
    assert "SHA-256 mismatch" in bad.stdout and "1 of 2 checkpoints valid" in bad.stdout
    # the exit code says whether there is something to resume from, and what
    assert bad.returncode == 0, bad.stdout
    assert f"newest usable: {run_dir / 'checkpoints' / 'step-00000002'} (step 2)" in bad.stdout
    (run_dir / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    none = zerotrain("ckpt", "verify", str(run_dir))
    assert none.returncode == 1 and "0 of 2 checkpoints valid" in none.stdout
    assert "nothing to resume from" in none.stdout and "newest usable" not in none.stdout
    inspect = zerotrain("ckpt", "inspect", str(tiny_run / "checkpoints" / "step-00000002"))
    assert inspect.returncode == 0
    row = json.loads(inspect.stdout)
    assert row["status"] == "ok" and row["step"] == 2 and row["world"] == 1
    assert zerotrain("ckpt", "verify", str(tmp_path / "missing")).returncode == 2


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_missing_resume_dir_exits_2_and_creates_no_run_dir(tmp_path, ranks):
    proc = zerotrain("run", *TINY, "--ranks", ranks, "--run-dir", str(tmp_path / "new"),
                     "--resume", str(tmp_path / "nowhere"))  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert f"--resume: no such directory {str(tmp_path / 'nowhere')!r}" in line
    assert not (tmp_path / "new").exists()
    # without --run-dir: no runs/<pipeline>-<time> is made either
    proc = zerotrain("run", *TINY, "--ranks", ranks, "--resume", "nowhere", cwd=tmp_path)
    assert_one_line_error(proc, 2)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_batch_larger_than_the_data_exits_2_and_creates_no_run_dir(tmp_path, ranks):
    proc = zerotrain("run", *TINY, "--ranks", ranks, "--set", "train.batch_size=512",
                     "--run-dir", str(tmp_path / "new"))  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert "train.batch_size 512 exceeds the 256 training samples (accepted: 1 to 256)" in line
    assert not (tmp_path / "new").exists()


def test_no_valid_checkpoint_names_each_checkpoint_and_why(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    shard = next((run_dir / "checkpoints" / "step-00000004").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    (run_dir / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    proc = zerotrain("run", *TINY, "--run-dir", str(tmp_path / "new"), "--resume", str(run_dir))
    line = assert_one_line_error(proc, 2)
    assert f"--resume: no valid checkpoint under {run_dir} (" in line
    assert "step-00000004: shard-00000-of-00001.safetensors: " in line and "truncated" in line
    assert "step-00000002: no manifest.json (incomplete write)" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["char_lm", "--steps", "4"], "pipeline 'mlp_regressor' in the checkpoint, 'char_lm' here"),
        ([*TINY, "--set", "optimizer.name=sgd"], "optimizer 'adam' in the checkpoint, 'sgd' here"),
    ],
)
def test_resuming_another_run_on_two_ranks_exits_2_before_any_rank_starts(
    tiny_run, tmp_path, args, named
):
    proc = zerotrain("run", *args, "--ranks", "2", "--mode", "zero2",
                     "--run-dir", str(tmp_path / "new"), "--resume", str(tiny_run))  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert "is not a checkpoint of this run" in line and named in line
    assert not (tmp_path / "new").exists()


def test_progress_is_a_bar_redrawn_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(total=3, every=1, out=out)
    for step in (1, 2, 3):
        bar.update(step, 1.0, 1e-3, 100.0)
    text = out.getvalue()
    assert text.startswith("\r[") and "step 3/3" in text and text.endswith("\n")


def test_report_renders_a_run_dir_or_says_in_one_line_why_not(tmp_path, capsys):
    assert "does not exist" in assert_one_line_error(
        run_main(capsys, "report", str(tmp_path / "x"))
    )
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_main(capsys, "report", str(run), "--out", str(tmp_path / "png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the report extra is not installed: exit 3, one line naming it
        assert "matplotlib" in assert_one_line_error(proc, code=3)
    else:
        assert proc.returncode == 0
        assert proc.stdout.split() == [str(tmp_path / "png" / "loss_lr.png")]


def test_a_stop_or_a_disk_error_deep_in_trio_groups_is_found_first_leaf_first(tmp_path):
    import errno

    from pipelines.cli import _leaf, _world_error
    from pipelines.core import RunStopped

    first, second = RunStopped("first"), RunStopped("second")
    inner = ExceptionGroup("inner", [ValueError("x"), first])
    group = BaseExceptionGroup("outer", [KeyError("k"), inner, second])
    assert _leaf(group, RunStopped) is first and _leaf(group, OSError) is None
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
    nested = ExceptionGroup("g", [ValueError("x"), ExceptionGroup("h", [full])])
    why = _world_error(nested, tmp_path)
    assert why is not None and "ENOSPC" in why, why


_SIGNAL_IN_PROTECTED_CODE = """
import os, signal
import trio
from pipelines import cli

cli._install_stop_handlers()
finished = []

@trio.lowlevel.enable_ki_protection
def trio_internals():  # code trio must not be interrupted in (its scheduler, its locks)
    os.kill(os.getpid(), signal.SIGTERM)
    total = sum(range(100_000))  # the handler runs during this
    finished.append(total)

async def main():
    trio_internals()
    await trio.sleep(5)  # a checkpoint: where trio raises the interrupt

try:
    trio.run(main)
    outcome = "no interrupt"
except BaseException as err:
    outcome = type(err).__name__
    if isinstance(err, BaseExceptionGroup) and err.split(KeyboardInterrupt)[0]:
        outcome = "KeyboardInterrupt"
print(outcome, len(finished))
"""


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint", "no-sigint"])
def test_a_stop_signal_inside_trio_is_raised_where_trio_allows_it(sigint):
    """SIGTERM while trio runs but before the runner installs its own signal receivers:
    the CLI's handler hands it to trio's KeyboardInterrupt delivery, which waits until
    the code is out of trio's protected internals and raises it at a checkpoint -- raised
    inside them it becomes a TrioInternalError or a corrupted run. Also when the process
    started with SIGINT ignored, as a shell starts a command in the background."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_IN_PROTECTED_CODE],
        capture_output=True, text=True, timeout=60, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["KeyboardInterrupt", "1"], done.stdout


_SIGNAL_WHILE_A_RECEIVER_IS_INSTALLED = """
import os, signal
import trio
from pipelines import cli

cli._install_stop_handlers()

async def main():
    # a runner installing its receiver for every stop signal has put SIGINT's handler
    # in place and not yet SIGTERM's (trio installs them one by one, SIGINT first)
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        async for signum in signals:
            print(signal.Signals(signum).name, cli._INTERRUPTED[-1])
            break

trio.run(main)
"""


def test_a_stop_signal_while_the_runner_installs_its_receiver_keeps_its_name():
    """SIGTERM in the moment a runner's signal receiver holds SIGINT but not yet SIGTERM:
    the CLI's handler hands it to that receiver as SIGTERM, so the run says it stopped
    for SIGTERM (not SIGINT)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_WHILE_A_RECEIVER_IS_INSTALLED],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SIGTERM", "SIGTERM"], done.stdout
