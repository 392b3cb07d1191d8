"""data.name = "triplets": (anchor, positive, negative) rows drawn from a labelled table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import DataConfig, load_config
from pipelines.core import build_model_for
from pipelines.data import DataError, load_dataset
from tests.pipelines.cli_util import zerotrain

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def triplets(path, seed=0, **opts):
    return DataConfig(name="triplets", seed=seed, options={"path": str(path), **opts})


@pytest.fixture
def labelled(tmp_path):
    """60 rows: feature `row` = the row number, `kind` one of four string labels with
    uneven counts (a: 30, b: 15, c: 10, d: 5)."""
    kinds = ["a"] * 30 + ["b"] * 15 + ["c"] * 10 + ["d"] * 5
    order = np.random.default_rng(3).permutation(60)
    lines = ["row,noise,kind"] + [f"{i},{i % 7},{kinds[order[i]]}" for i in range(60)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, {i: kinds[order[i]] for i in range(60)}


def _rows(ds):
    """The (anchor, positive, negative) source rows of every triplet (feature `row`)."""
    b = ds.take(np.arange(len(ds)))
    return np.stack([b[k][:, 0] for k in ("anchor", "positive", "negative")], 1).astype(int)


def test_anchor_and_positive_share_a_label_and_the_negative_does_not(labelled):
    path, label = labelled
    ds = load_dataset(triplets(path, n_train=500, eval_fraction=0.2), "train")
    rows = _rows(ds)
    assert rows.shape == (500, 3)
    for a, p, n in rows:
        assert label[a] == label[p] != label[n]
        assert a != p  # a different row of the class
    # every class with 2+ training rows anchors, every class is a negative
    assert {label[a] for a in rows[:, 0]} == {"a", "b", "c", "d"}
    assert {label[n] for n in rows[:, 2]} == {"a", "b", "c", "d"}
    assert rows.max() < 48  # the eval tail (rows 48..59) is never trained on


def test_eval_triplets_come_from_the_held_out_rows_only(labelled):
    path, label = labelled
    ds = load_dataset(triplets(path, n_eval=200, eval_fraction=0.2), "eval")
    rows = _rows(ds)
    assert len(ds) == 200 and rows.min() >= 48
    for a, p, n in rows:
        assert label[a] == label[p] != label[n]


def test_the_draw_is_a_pure_function_of_the_data_seed(labelled):
    path, _ = labelled
    one = _rows(load_dataset(triplets(path, seed=5, n_train=300), "train"))
    again = _rows(load_dataset(triplets(path, seed=5, n_train=300), "train"))
    other = _rows(load_dataset(triplets(path, seed=6, n_train=300), "train"))
    np.testing.assert_array_equal(one, again)
    assert (one != other).any()


def test_triplets_are_standardised_like_the_table(labelled):
    path, _ = labelled
    ds = load_dataset(triplets(path, n_train=400, standardize=True), "train")
    mean, std = (np.asarray(ds.meta["standardize"][k]) for k in ("mean", "std"))
    batch = ds.take(np.arange(len(ds)))
    raw = _rows(load_dataset(triplets(path, n_train=400), "train"))
    np.testing.assert_allclose(batch["anchor"][:, 0], (raw[:, 0] - mean[0]) / std[0], rtol=1e-5)


def test_the_embedder_takes_its_input_size_from_the_table(labelled):
    path, _ = labelled
    cfg = load_config(
        "triplet_embedding", ["data.name=triplets", f"data.path={json.dumps(str(path))}"]
    )
    assert "noise" not in cfg.data.options  # digit_triplets' keys the table does not take
    model = build_model_for(cfg, load_dataset(cfg.data, "train").meta)
    assert dict(model.named_parameters())["layers.0.weight"].shape[1] == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("x,y\n1,0\n2,0\n3,0\n4,0\n5,0\n", r"has 1 class"),
        ("x,y\n1,0\n2,1\n3,2\n4,3\n5,4\n", r"triplets need a class with at least 2 rows"),
    ],
    ids=["one class", "no class with two rows"],
)
def test_a_table_that_allows_no_triplet_is_one_line(tmp_path, text, match, raises_one_line):
    path = tmp_path / "few.csv"
    path.write_text(text)
    with raises_one_line(DataError, match=match):
        load_dataset(triplets(path, eval_fraction=0.2), "train")


def test_triplet_embedding_trains_on_the_exported_digits_from_the_cli(tmp_path):
    pytest.importorskip("sklearn")
    csv_path = tmp_path / "digits.csv"
    subprocess.run([sys.executable, str(SCRIPTS / "export_digits.py"), str(csv_path)], check=True)
    run_dir = tmp_path / "run"
    proc = zerotrain(
        "run",
        "triplet_embedding",
        "--set",
        "data.name=triplets",
        "--set",
        f"data.path={json.dumps(str(csv_path))}",
        "--set",
        f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
        "--steps",
        "150",
        "--run-dir",
        str(run_dir),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # held-out triplets (the file's last 20 %): d(a, p) < d(a, n) for most of them
    assert summary["eval"]["accuracy"] >= 0.95, summary["eval"]
    record = json.loads((run_dir / "data.json").read_text())
    assert record["name"] == "triplets" and record["meta"]["n_features"] == 64
