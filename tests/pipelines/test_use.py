"""generate, predict and eval on finished runs; --resume refusing changed data."""

import csv
import inspect
import json
import textwrap

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.use import load_run, predict
from tests.pipelines.cli_util import cli, one_line

SOURCE = inspect.getsourcefile(textwrap)  # a text file nobody on the project wrote


@pytest.fixture(scope="module", params=["bytes", "chars"])
def lm_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / request.param
    code = main(
        ["run", "char_lm", "--steps", "30", "--run-dir", str(run_dir)]
        + ["--set", "data.name=text", "--set", f'data.path="{SOURCE}"']
        + ["--set", f"data.tokenizer={request.param}", "--set", "data.seq_len=32"]
        + ["--set", "model.seq_len=32", "--set", "model.d_model=32", "--set", "model.n_layer=1"]
        + ["--set", f'data.cache_dir="{run_dir.parent / "cache"}"']
    )
    assert code == 0
    return run_dir


def test_generate_is_deterministic_per_seed_and_continues_the_prompt(lm_run, capsys):
    code, out, _ = cli(capsys, "generate", lm_run, "--prompt", "def ", "--tokens", 40, "--seed", 3)
    assert code == 0 and out.startswith("def ") and len(out) > 20
    again = cli(capsys, "generate", lm_run, "--prompt", "def ", "--tokens", 40, "--seed", 3)[1]
    other = cli(capsys, "generate", lm_run, "--prompt", "def ", "--tokens", 40, "--seed", 4)[1]
    assert out == again
    assert out != other
    data = json.loads((lm_run / "data.json").read_text())["meta"]
    if data["tokenizer"] == "chars":
        assert set(out.rstrip("\n")) <= set(data["vocab"])


def test_top_k_1_is_greedy_and_each_token_is_drawn_from_the_last_seq_len(lm_run):
    from pipelines.use import sample

    trained = load_run(lm_run)
    model, prompt = trained.model, [5, 9, 12]
    assert sample(model, prompt, 50, 1.5, top_k=1, seed=9) == sample(model, prompt, 50, 0.0)
    ids = sample(model, prompt, 50, temperature=0.8, seed=2)  # longer than seq_len 32
    uniforms = np.random.default_rng(2).random(50)
    for end in range(3, 53):  # the documented rule, replayed by hand
        window = np.array(ids[max(0, end - 32) : end])[None, :]
        z = model.forward({"x": window})["logits"][0, -1].astype(np.float64) / 0.8
        cdf = np.cumsum(np.exp(z - z.max()))
        u = uniforms[end - len(prompt)]
        assert ids[end] == int(np.searchsorted(cdf, u * cdf[-1], side="right"))


def test_eval_of_a_text_file_reads_it_with_the_runs_tokenizer(lm_run, tmp_path, capsys):
    raw = open(SOURCE, "rb").read()  # ASCII: a byte is a character
    frac = load_run(lm_run).cfg.data.options["eval_fraction"]
    cut = int(len(raw) * (1.0 - frac))
    (tmp_path / "tail.txt").write_bytes(raw[cut:])  # the run's own held-out text
    (tmp_path / "head.txt").write_bytes(raw[: len(raw) - cut])  # as long, other text
    own = json.loads(cli(capsys, "eval", lm_run)[1])
    code, out, err = cli(capsys, "eval", lm_run, "--data", tmp_path / "tail.txt")
    assert code == 0, err
    assert json.loads(out) == own
    head = json.loads(cli(capsys, "eval", lm_run, "--data", tmp_path / "head.txt")[1])
    assert head["loss"] != own["loss"]  # the file given is the one scored
    (tmp_path / "bad.txt").write_bytes(raw[:100] + b"\xff" + raw[100:200])
    code, _, err = cli(capsys, "eval", lm_run, "--data", tmp_path / "bad.txt")
    assert code == 2
    assert "bad.txt: not UTF-8 at byte 100" in one_line(err)


def test_generate_refuses_a_prompt_outside_the_vocabulary(lm_run, capsys):
    """chars: a character the training files lack is refused; bytes: every prompt is
    its UTF-8 bytes, so the same prompt is continued."""
    meta = json.loads((lm_run / "data.json").read_text())["meta"]
    code, out, err = cli(capsys, "generate", lm_run, "--prompt", "snowman \u2603", "--tokens", 5)
    if meta["tokenizer"] == "bytes":
        assert code == 0, err
        assert out.startswith("snowman \u2603")
        return
    assert code == 2
    assert "is not in the vocabulary" in one_line(err)


# ---------------------------------------------------------------------------------------
# predict and eval on a table run
# ---------------------------------------------------------------------------------------


def write_points(path, n, seed):
    """Two features; the label names the quadrant's side: 'left' / 'right' of x = 5."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, size=(n, 2))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["u", "v", "side"])
        for a, b in x:
            w.writerow([f"{a:.4f}", f"{b:.4f}", "left" if a < 5 else "right"])
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    train = write_points(root / "train.csv", 400, 0)
    held = write_points(root / "held.csv", 100, 1)
    run_dir = root / "run"
    code = main(
        ["run", "mlp_classifier", "--steps", "150", "--run-dir", str(run_dir)]
        + ["--set", "data.name=table", "--set", f'data.path="{train}"']
        + ["--set", f'data.eval_path="{held}"', "--set", "data.standardize=true"]
        + [
            "--set",
            "model.hidden=[32]",
            "--set",
            "train.batch_size=40",
            "--set",
            "optimizer.lr=1e-2",
        ]
        + ["--set", "eval.metrics=['loss','accuracy']"]
        + ["--set", f'data.cache_dir="{root / "cache"}"']
    )
    assert code == 0
    return run_dir, held


def test_eval_of_the_finished_run_gives_the_runs_own_final_eval(table_run, tmp_path, capsys):
    run_dir, held = table_run
    summary = json.loads((run_dir / "summary.json").read_text())
    code, out, _ = cli(capsys, "eval", run_dir)
    assert code == 0
    assert json.loads(out) == pytest.approx(summary["eval"], rel=1e-12)
    code, out, _ = cli(capsys, "eval", run_dir, "--data", held)
    assert json.loads(out) == pytest.approx(summary["eval"], rel=1e-12)
    assert summary["eval"]["accuracy"] > 0.9
    # the file given is the one scored: the held rows with every label swapped
    rows = list(csv.reader(open(held)))
    swap = {"left": "right", "right": "left", "side": "side"}
    flipped = tmp_path / "flipped.csv"
    with open(flipped, "w", newline="") as f:
        csv.writer(f).writerows([[*r[:-1], swap[r[-1]]] for r in rows])
    code, out, _ = cli(capsys, "eval", run_dir, "--data", flipped)
    assert code == 0
    assert json.loads(out)["accuracy"] == pytest.approx(1 - summary["eval"]["accuracy"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_predict_labels_a_table_with_the_training_classes(table_run, tmp_path, capsys, fmt):
    run_dir, held = table_run
    out_path = tmp_path / f"pred.{fmt}"
    code, _, _ = cli(capsys, "predict", run_dir, held, "--out", out_path)
    assert code == 0
    truth = [row["side"] for row in csv.DictReader(open(held))]
    if fmt == "csv":
        rows = list(csv.DictReader(open(out_path)))
        labels = [r["label"] for r in rows]
        probs = np.array([[float(r["p_left"]), float(r["p_right"])] for r in rows])
    else:
        recs = [json.loads(line) for line in open(out_path)]
        labels = [r["label"] for r in recs]
        probs = np.array([[r["probabilities"]["left"], r["probabilities"]["right"]] for r in recs])
    assert len(labels) == 100
    rows = [int(r["row"]) for r in (rows if fmt == "csv" else recs)]
    assert rows == list(range(100))
    # in batches of 7 rows: the same records
    batched = predict(load_run(run_dir), held, batch_size=7)
    assert [(r["row"], r["label"]) for r in batched] == list(enumerate(labels))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert labels == ["left" if p[0] > p[1] else "right" for p in probs]
    assert np.mean([a == b for a, b in zip(labels, truth, strict=True)]) > 0.9


def test_predict_of_a_regressor_is_its_forward_on_the_standardised_rows(tmp_path, capsys):
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 10, size=(1100, 2))  # two of predict's batches of 1024
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["u", "v", "t"])
        w.writerows([[f"{a:.4f}", f"{b:.4f}", f"{a + 0.5 * b:.4f}"] for a, b in x])
    run_dir = tmp_path / "run"
    code, _, err = cli(
        capsys,
        *("run", "mlp_regressor", "--steps", 20, "--run-dir", run_dir),
        *("--set", "data.name=table", "--set", f'data.path="{train}"'),
        *("--set", "data.standardize=true", "--set", "model.hidden=[8]"),
        *("--set", "train.batch_size=24", "--set", f'data.cache_dir="{tmp_path / "c"}"'),
    )
    assert code == 0, err
    out_path = tmp_path / "pred.csv"
    assert cli(capsys, "predict", run_dir, train, "--out", out_path)[0] == 0
    rows = list(csv.DictReader(open(out_path)))
    assert [int(r["row"]) for r in rows] == list(range(1100))
    # replayed by hand: the file's features, data.json's statistics, the final weights
    std = json.loads((run_dir / "data.json").read_text())["meta"]["standardize"]
    feats = np.array([r[:2] for r in list(csv.reader(open(train)))[1:]], np.float64)
    feats = feats.astype(np.float32)
    z = (feats - np.asarray(std["mean"], np.float32)) / np.asarray(std["std"], np.float32)
    want = load_run(run_dir).model.forward({"x": z})["predictions"].reshape(-1)
    np.testing.assert_allclose([float(r["value"]) for r in rows], want, rtol=1e-7)


def test_predict_on_a_table_without_the_feature_columns_is_one_line(table_run, tmp_path, capsys):
    run_dir, _ = table_run
    bad = tmp_path / "bad.csv"
    bad.write_text("u,w\n1,2\n")
    code, _, err = cli(capsys, "predict", run_dir, bad)
    assert code == 2
    assert "bad.csv: no column 'v'; columns: u, w" in one_line(err)


def test_resume_with_a_changed_data_file_is_refused_naming_it(tmp_path, capsys):
    train = write_points(tmp_path / "train.csv", 200, 0)
    run_dir = tmp_path / "run"
    base = ["--set", "data.name=table", "--set", f'data.path="{train}"']
    base += ["--set", "model.hidden=[8]", "--set", "train.batch_size=20"]
    base += ["--set", "checkpoint.every=5", "--set", f'data.cache_dir="{tmp_path / "c"}"']
    base += ["--set", "schedule.total_steps=8", "--set", "schedule.warmup_steps=2"]
    assert cli(capsys, "run", "mlp_classifier", "--steps", 5, "--run-dir", run_dir, *base)[0] == 0
    write_points(train, 200, 1)  # same size and columns, other numbers
    resume = ["run", "mlp_classifier", "--steps", "8", "--resume", str(run_dir), *base]
    code, _, err = cli(capsys, *resume)
    assert code == 2
    line = one_line(err)
    assert f"data file {train.resolve()} changed since the run" in line
    assert "--allow-data-change" in line
    code, _, err = cli(capsys, *resume, "--allow-data-change")
    assert code == 0, err
    assert "resumed from" in err


def test_resume_with_a_file_added_to_or_gone_from_the_data_is_refused_naming_it(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(open(SOURCE).read()[:4000])
    (texts / "b.txt").write_text(open(SOURCE).read()[4000:8000])
    run_dir = tmp_path / "run"
    base = ["--set", "data.name=text", "--set", f'data.path="{texts}"']
    base += ["--set", "data.seq_len=16", "--set", "model.seq_len=16"]
    base += ["--set", "model.d_model=16", "--set", "model.n_layer=1"]
    base += ["--set", "checkpoint.every=2", "--set", "schedule.total_steps=4"]
    base += ["--set", "schedule.warmup_steps=1", "--set", "train.batch_size=8"]
    base += ["--set", f'data.cache_dir="{tmp_path / "c"}"']
    assert cli(capsys, "run", "char_lm", "--steps", 2, "--run-dir", run_dir, *base)[0] == 0
    resume = ["run", "char_lm", "--steps", "4", "--resume", str(run_dir), *base]
    (texts / "c.txt").write_text("more text\n" * 50)
    code, _, err = cli(capsys, *resume)
    assert code == 2
    assert f"data file {(texts / 'c.txt').resolve()} was not among the run's files" in one_line(err)
    (texts / "c.txt").unlink()
    (texts / "b.txt").unlink()
    code, _, err = cli(capsys, *resume)
    assert code == 2
    line = one_line(err)
    assert f"data file {(texts / 'b.txt').resolve()} of the run is no longer among" in line
