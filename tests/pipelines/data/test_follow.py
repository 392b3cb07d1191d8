"""data.follow = true: files added to a directory are used from the next epoch, each
epoch's files are recorded, and a recovery replays exactly the recorded sets."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelines.config import DataConfig
from pipelines.data import EPOCHS_DIR, DataError, EpochLog, load_dataset, locate
from tests.pipelines.cli_util import BLAS_THREAD_VARS, REPO

HEADER = "a,b,c,d,label"


def write_rows(path, n, seed):
    """n rows of 4 features, label = a + b > 0 (two classes); distinct per seed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    lines = [HEADER] + [
        ",".join(f"{v:.4f}" for v in r) + f",{k}" for r, k in zip(x, y, strict=False)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    """A followed directory with two 64-row CSV files and a held-out file beside it."""
    d = tmp_path / "incoming"
    d.mkdir()
    write_rows(d / "part-000.csv", 64, 1)
    write_rows(d / "part-001.csv", 64, 2)
    return d, write_rows(tmp_path / "eval.csv", 64, 9)


def followed(d, eval_path, cache=""):
    return DataConfig(
        name="table",
        cache_dir=str(cache),
        options={
            "path": str(d),
            "eval_path": str(eval_path),
            "follow": True,
            "task": "classification",
        },
    )


def names(log, epoch):
    return [os.path.basename(f["path"]) for f in log.get(epoch)["files"]]


def test_a_file_added_during_an_epoch_is_used_from_the_next_one(folder, tmp_path):
    d, ev = folder
    log = EpochLog(tmp_path / "run" / EPOCHS_DIR)
    train = load_dataset(followed(d, ev), "train", epochs=log)
    assert len(train) == 128 and names(log, 0) == ["part-000.csv", "part-001.csv"]
    assert locate(train, 3, 32)[:2] == (0, 3)
    assert locate(train, 4, 32)[:2] == (1, 0)  # epoch 1 decided now: same two files
    write_rows(d / "part-002.csv", 64, 3)  # added during epoch 1
    assert locate(train, 7, 32)[:2] == (1, 3)  # epoch 1 keeps its recorded files
    epoch, pos, part = locate(train, 8, 32)
    assert (epoch, pos, len(part)) == (2, 0, 192)  # 6 steps: the new file's rows too
    assert names(log, 2) == ["part-000.csv", "part-001.csv", "part-002.csv"]
    assert locate(train, 13, 32)[:2] == (2, 5) and locate(train, 14, 32)[:2] == (3, 0)
    # batches of epoch 2 reach the new file's rows (row ids 128.. of the concatenation)
    rows = part.take(np.arange(128, 192))["x"]
    np.testing.assert_allclose(
        rows[0],
        np.loadtxt(d / "part-002.csv", delimiter=",", skiprows=1, max_rows=1)[:4],
        rtol=1e-4,
    )


def test_later_epochs_are_standardised_with_epoch_0s_statistics(folder, tmp_path):
    d, ev = folder
    cfg = followed(d, ev)
    cfg = DataConfig(name="table", options={**cfg.options, "standardize": True})
    train = load_dataset(cfg, "train", epochs=EpochLog(tmp_path / "run" / EPOCHS_DIR))

    def raw(path):
        return np.loadtxt(path, delimiter=",", skiprows=1)[:, :4]

    first = np.concatenate([raw(d / "part-000.csv"), raw(d / "part-001.csv")])
    mean, std = first.mean(0), first.std(0)
    shifted = raw(d / "part-001.csv") * 3 + 10  # far from epoch 0's statistics
    lines = [HEADER] + [",".join(f"{v:.4f}" for v in r) + ",1" for r in shifted]
    (d / "part-002.csv").write_text("\n".join(lines) + "\n")
    _, _, part = locate(train, 4, 32)  # epoch 1: three files
    got = part.take(np.arange(128, 192))["x"]
    want = (raw(d / "part-002.csv") - mean) / std
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_later_file_with_its_columns_in_another_order_is_read_by_name(folder, tmp_path):
    d, ev = folder
    train = load_dataset(followed(d, ev), "train", epochs=EpochLog(tmp_path / "e"))
    src = np.loadtxt(d / "part-001.csv", delimiter=",", skiprows=1)
    order = [1, 0, 3, 2, 4]  # b,a,d,c,label
    lines = ["b,a,d,c,label"] + [
        ",".join(f"{r[i]:.4f}" for i in order[:4]) + f",{int(r[4])}" for r in src
    ]
    (d / "part-002.csv").write_text("\n".join(lines) + "\n")
    _, _, part = locate(train, 4, 32)
    b = part.take(np.arange(128, 192))
    np.testing.assert_allclose(b["x"], src[:, :4], rtol=1e-6)  # a, b, c, d as in epoch 0
    np.testing.assert_array_equal(b["y"], src[:, 4])


def test_another_process_replays_the_recorded_sets_not_the_directory(folder, tmp_path):
    d, ev = folder
    log_dir = tmp_path / "run" / EPOCHS_DIR
    first = load_dataset(followed(d, ev), "train", epochs=EpochLog(log_dir))
    locate(first, 4, 32)  # epoch 1 recorded with two files
    write_rows(d / "part-002.csv", 64, 3)
    # a rank restarted now (a fresh log on the same dir) sees epoch 1 as recorded
    again = EpochLog(log_dir)
    restarted = load_dataset(followed(d, ev), "train", epochs=again)
    epoch, _, part = locate(restarted, 7, 32)
    assert epoch == 1 and len(part) == 128
    assert names(again, 1) == ["part-000.csv", "part-001.csv"]


class _LateLog(EpochLog):
    """A log that finds epoch 1 unrecorded until it records it itself: another process
    records it between this process's look and its own record (the race, made certain)."""

    tried = False

    def get(self, epoch):
        return None if epoch == 1 and not self.tried else super().get(epoch)

    def publish(self, record):
        self.tried = True
        return super().publish(record)


def test_a_process_that_loses_the_race_to_record_an_epoch_trains_on_the_winners_files(
    folder, tmp_path
):
    d, ev = folder
    log_dir = tmp_path / "run" / EPOCHS_DIR
    winner = load_dataset(followed(d, ev), "train", epochs=EpochLog(log_dir))
    locate(winner, 4, 32)  # epoch 1 recorded: two files
    write_rows(d / "part-002.csv", 64, 3)
    loser = load_dataset(followed(d, ev), "train", epochs=_LateLog(log_dir))
    epoch, _, part = locate(loser, 4, 32)  # scanned three files, recorded too late
    assert epoch == 1 and len(part) == 128


def test_the_first_process_to_record_an_epoch_wins(tmp_path):
    one, two = EpochLog(tmp_path / "e"), EpochLog(tmp_path / "e")
    a = {"epoch": 4, "files": [{"path": "/x", "size": 1, "sha256": "a"}], "samples": 10}
    b = {"epoch": 4, "files": [{"path": "/y", "size": 2, "sha256": "b"}], "samples": 20}
    assert one.publish(a) == a
    assert two.publish(b) == a  # the second reads the first's record
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["epoch-00004.json"]


def test_a_resume_writes_the_inherited_records_into_its_run_dir(tmp_path):
    rec = {"epoch": 0, "files": [{"path": "/x", "size": 1, "sha256": "a"}], "samples": 10}
    log = EpochLog(records=[rec])
    log.attach(tmp_path / "run" / EPOCHS_DIR)
    assert EpochLog(tmp_path / "run" / EPOCHS_DIR).get(0) == rec


def test_a_recorded_file_that_changed_is_refused(folder, tmp_path, raises_one_line):
    d, ev = folder
    log_dir = tmp_path / "run" / EPOCHS_DIR
    load_dataset(followed(d, ev), "train", epochs=EpochLog(log_dir))
    text = (d / "part-001.csv").read_text()
    # one digit rewritten after epoch 0 used the file: the same size, other bytes
    at = text.index("\n") + 3
    (d / "part-001.csv").write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :])
    with raises_one_line(DataError, match=r"part-001.csv: changed since epoch 0 recorded it"):
        load_dataset(followed(d, ev), "train", epochs=EpochLog(log_dir))


def test_files_that_change_the_classes_are_refused_at_their_epoch(
    folder, tmp_path, raises_one_line
):
    d, ev = folder
    train = load_dataset(followed(d, ev), "train", epochs=EpochLog(tmp_path / "e"))
    (d / "part-002.csv").write_text(HEADER + "\n1,2,3,4,7\n")  # a third class
    with raises_one_line(DataError, match=r"the files of epoch 1 change the data's classes"):
        locate(train, 4, 32)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"path": "FILE"}, r"data.path: follow = true needs a directory"),
        ({"eval_path": ""}, r"data.eval_path: follow = true needs a held-out file"),
    ],
    ids=["a file, not a directory", "no eval_path"],
)
def test_follow_needs_a_directory_and_an_eval_file(folder, opts, match, raises_one_line):
    d, ev = folder
    cfg = followed(d, ev)
    options = dict(
        cfg.options, **{k: str(d / "part-000.csv") if v == "FILE" else v for k, v in opts.items()}
    )
    with raises_one_line(DataError, match=match):
        load_dataset(DataConfig(name="table", options=options), "train")


# ---------------------------------------------------------------------------------------
# Two ranks: a file added at a known point, a rank killed after it
# ---------------------------------------------------------------------------------------


def _folder(root):
    d = root / "incoming"
    d.mkdir(parents=True)
    write_rows(d / "part-000.csv", 64, 1)
    write_rows(d / "part-001.csv", 64, 2)
    return d, write_rows(root / "eval.csv", 64, 9)


def _start(root, d, ev, run_dir, *extra):
    """`zerotrain ARGS` on 2 ranks zero2 over the followed directory `d` (a Popen)."""
    args = ["--ranks", "2", "--mode", "zero2", "--seed", "11", "--run-dir", str(run_dir)]
    for key, value in {
        "data.name": "table",
        "data.path": json.dumps(str(d)),
        "data.eval_path": json.dumps(str(ev)),
        "data.follow": "true",
        "data.cache_dir": json.dumps(str(root / "cache")),
        "model.hidden": "[16]",
        "train.batch_size": "32",  # 128 rows: 4 steps an epoch; 192 rows: 6
        "checkpoint.every": "4",
        "eval.every": "8",
        "schedule.warmup_steps": "4",
        "schedule.total_steps": "16",
    }.items():
        args += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *extra, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc, run_dir):
    """(summary, the epochs' file names, the last manifest's data position) of a run."""
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = {
        p.name: [os.path.basename(f["path"]) for f in json.loads(p.read_text())["files"]]
        for p in sorted((run_dir / EPOCHS_DIR).glob("epoch-*.json"))
    }
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    manifest = json.loads((last / "manifest.json").read_text())
    return summary, epochs, manifest["data"]


def _gated_run(root, kill):
    """16 steps where part-002.csv arrives during epoch 1, the same way in every run:
    both ranks wait at step 6 (chaos wait; epoch 1 is steps 4-7) until the test has seen
    epoch 1 recorded, added the file and opened the gate, so the file is new in epoch 2
    whatever the timing; `kill` adds SIGKILLs of rank 1 at step 7 (in epoch 1, after the
    addition: the restarted rank must replay epoch 1's two files while the directory
    holds three) and at step 10 (in epoch 2). Each run has its own copy of the directory
    (identical content)."""
    d, ev = _folder(root)
    gate, run_dir = root / "gate", root / "run"
    chaos = f"wait:rank=0,step=6,until={gate};wait:rank=1,step=6,until={gate}"
    if kill:
        chaos += ";kill:rank=1,step=7;kill:rank=1,step=10"
    proc = _start(
        root, d, ev, run_dir, "simulate", "mlp_classifier", "--steps", "16", "--chaos", chaos
    )
    record = run_dir / EPOCHS_DIR / "epoch-00001.json"
    deadline = time.monotonic() + 180
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if record.exists():
        write_rows(d / "part-002.csv", 64, 3)
        gate.touch()
    return _finish(proc, run_dir)


TWO, THREE = ["part-000.csv", "part-001.csv"], ["part-000.csv", "part-001.csv", "part-002.csv"]
EXPECTED = {
    "epoch-00000.json": TWO,
    "epoch-00001.json": TWO,  # steps 4-7: the file came in during this epoch
    "epoch-00002.json": THREE,  # steps 8-13
    "epoch-00003.json": THREE,  # steps 14-15
}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    return _gated_run(tmp_path_factory.mktemp("quiet"), kill=False)


def test_a_rank_killed_after_an_addition_ends_bit_identical_to_an_undisturbed_run(
    tmp_path, undisturbed
):
    quiet, quiet_epochs, _ = undisturbed
    killed, killed_epochs, position = _gated_run(tmp_path, kill=True)
    assert quiet_epochs == killed_epochs == EXPECTED
    assert killed["restarts"] >= 2
    assert killed["params_sha256"] == quiet["params_sha256"]
    # the manifest's data position carries the recorded sets for a resume to replay
    assert (position["epoch"], position["step_in_epoch"]) == (3, 2)
    assert [len(e["files"]) for e in position["epoch_files"]] == [2, 2, 3, 3]


@pytest.mark.parametrize("stop", [8, 6], ids=["at epoch 2's start", "within epoch 1"])
def test_a_resume_replays_the_recorded_epochs_and_takes_new_files_after_them(
    tmp_path, undisturbed, stop
):
    """`stop` steps (epoch 0 and all or half of epoch 1 on two files), then part-002.csv,
    then --resume to 16: the resumed run keeps epochs 0 and 1 as recorded (the directory
    now holds three files; from step 6 the rest of epoch 1 is replayed) and ends where
    the undisturbed run did."""
    d, ev = _folder(tmp_path)
    first = tmp_path / "first"
    _finish(_start(tmp_path, d, ev, first, "run", "mlp_classifier", "--steps", str(stop)), first)
    write_rows(d / "part-002.csv", 64, 3)
    again = tmp_path / "again"
    proc = _start(
        tmp_path, d, ev, again, "run", "mlp_classifier", "--steps", "16", "--resume", str(first)
    )
    summary, epochs, _ = _finish(proc, again)
    assert epochs == EXPECTED
    assert summary["params_sha256"] == undisturbed[0]["params_sha256"]


def test_a_followed_text_directory_grows_by_the_added_file_and_keeps_its_vocabulary(
    tmp_path, raises_one_line
):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.txt").write_text("the cat sat on the mat\n" * 20)
    ev = tmp_path / "held.txt"
    ev.write_text("the mat sat on the cat\n" * 4)
    cfg = DataConfig(
        name="text",
        options={
            "path": str(d),
            "eval_path": str(ev),
            "follow": True,
            "tokenizer": "chars",
            "seq_len": 8,
        },
    )
    log = EpochLog(tmp_path / "run" / EPOCHS_DIR)
    train = load_dataset(cfg, "train", epochs=log)
    assert len(train) == 460 - 8 and load_dataset(cfg, "eval", epochs=log).meta == train.meta
    (d / "b.txt").write_text("a cat on a mat\n" * 10)  # no new character
    assert locate(train, 112, 4)[:2] == (0, 112)  # 452 windows: 113 steps of 4
    epoch, pos, part = locate(train, 113, 4)
    assert (epoch, pos, len(part)) == (1, 0, 460 + 150 - 8)
    (d / "c.txt").write_text("a dog\n")  # 'd', 'g' are not in epoch 0's vocabulary
    with raises_one_line(DataError, match=r"the files of epoch 2 change the data's vocab"):
        locate(train, 113 + 150, 4)  # epoch 2: 602 windows, 150 steps on
    # a restarted process replays epochs 0 and 1 as recorded, c.txt or not
    restarted = load_dataset(cfg, "train", epochs=EpochLog(tmp_path / "run" / EPOCHS_DIR))
    assert len(restarted) == 452 and len(locate(restarted, 113, 4)[2]) == 602
