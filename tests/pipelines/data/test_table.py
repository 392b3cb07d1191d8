"""data.name = "table": the user's CSV/TSV, .npy, .npz and .safetensors files."""

import json

import numpy as np
import pytest

from pipelines.config import DataConfig, load_config
from pipelines.core import build_model_for
from pipelines.data import DataError, load_dataset
from tests.pipelines.cli_util import table_data, zerotrain


def table(path, cache_dir="", **opts):
    opts.setdefault("task", "classification")
    return DataConfig(name="table", cache_dir=cache_dir, options={"path": str(path), **opts})


def write_csv(path, header, rows, sep=","):
    lines = [sep.join(header)] + [sep.join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def animals(tmp_path):
    """20 rows: a, b features, `kind` a string label (dog, cat, emu, ...); b = row number."""
    names = ["dog", "cat", "emu"]
    rows = [[i * 0.5, i, names[i % 3]] for i in range(20)]
    return write_csv(tmp_path / "animals.csv", ["a", "b", "kind"], rows)


def test_csv_string_labels_are_mapped_in_sorted_order_and_eval_is_the_tail(animals):
    train = load_dataset(table(animals, eval_fraction=0.2), "train")
    ev = load_dataset(table(animals, eval_fraction=0.2), "eval")
    assert (len(train), len(ev)) == (16, 4)
    assert train.meta["classes"] == ["cat", "dog", "emu"]
    assert train.meta["columns"] == ["a", "b"] and train.meta["target"] == "kind"
    batch = ev.take(np.arange(4))
    assert batch["x"].dtype == np.float32 and batch["y"].dtype == np.int64
    np.testing.assert_array_equal(batch["x"][:, 1], [16, 17, 18, 19])  # the last rows
    ids = {"cat": 0, "dog": 1, "emu": 2}
    np.testing.assert_array_equal(
        batch["y"], [ids[["dog", "cat", "emu"][r % 3]] for r in range(16, 20)]
    )


def test_tsv_integer_labels_keep_their_values_as_classes(tmp_path):
    rows = [[i, i % 2 * 7 + 3] for i in range(10)]  # labels 3 and 10
    path = write_csv(tmp_path / "t.tsv", ["f", "y"], rows, sep="\t")
    ds = load_dataset(table(path, eval_fraction=0.2), "train")
    assert ds.meta["classes"] == [3, 10]
    np.testing.assert_array_equal(ds.take(np.arange(4))["y"], [0, 1, 0, 1])


def test_the_random_split_is_seeded_disjoint_and_covers_every_row(animals):
    def rows(seed, split):
        cfg = DataConfig(
            name="table",
            seed=seed,
            options={"path": str(animals), "task": "classification", "split": "random"},
        )
        return load_dataset(cfg, split).take(np.arange(4 if split == "eval" else 16))["x"][:, 1]

    ev, tr = rows(3, "eval"), rows(3, "train")
    assert sorted(np.concatenate([ev, tr]).tolist()) == list(range(20))
    np.testing.assert_array_equal(ev, rows(3, "eval"))
    assert not np.array_equal(ev, rows(4, "eval"))
    assert not np.array_equal(ev, [16, 17, 18, 19])


def test_standardisation_is_fitted_on_the_training_rows_only(animals):
    cfg = table(animals, standardize=True, eval_fraction=0.2)
    train, ev = load_dataset(cfg, "train"), load_dataset(cfg, "eval")
    xt = train.take(np.arange(16))["x"]
    np.testing.assert_allclose(xt.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(xt.std(0), 1, atol=1e-5)
    b = np.arange(16.0)
    expected = (np.arange(16, 20) - b.mean()) / b.std()
    np.testing.assert_allclose(ev.take(np.arange(4))["x"][:, 1], expected, rtol=1e-6)


def test_a_constant_feature_standardises_to_zero(tmp_path):
    rows = [[7, i, i % 2] for i in range(10)]
    path = write_csv(tmp_path / "c.csv", ["k", "f", "y"], rows)
    ds = load_dataset(table(path, standardize=True, eval_fraction=0.2), "train")
    np.testing.assert_array_equal(ds.take(np.arange(8))["x"][:, 0], np.zeros(8, np.float32))


def test_npy_is_memory_mapped_and_its_target_is_a_column(tmp_path):
    arr = np.column_stack([np.arange(30.0), np.arange(30.0) * 2, np.arange(30) % 3])
    np.save(tmp_path / "d.npy", arr.astype(np.float32))
    ds = load_dataset(table(tmp_path / "d.npy", cache_dir=str(tmp_path / "c")), "train")
    assert not list((tmp_path / "c").rglob("x.npy"))  # features read from the file, not copied
    assert ds.meta["n_features"] == 2 and ds.meta["n_classes"] == 3
    b = ds.take(np.array([4, 5]))
    np.testing.assert_array_equal(b["x"], [[4, 8], [5, 10]])
    np.testing.assert_array_equal(b["y"], [1, 2])
    col0 = load_dataset(table(tmp_path / "d.npy", target="0", task="regression"), "train")
    np.testing.assert_array_equal(col0.take(np.array([7]))["y"], [[7.0]])


def test_npy_rows_are_read_from_the_file_by_batch_in_any_column_order(tmp_path):
    arr = np.arange(5 * 40, dtype=np.float64).reshape(40, 5)
    arr[:, 4] = np.arange(40) % 7 == 0  # 1 at rows 0, 7, ..., 35: eval row 35 is local 5
    np.save(tmp_path / "d.npy", arr)
    opts = {"features": ["3", "0"], "target": "4", "eval_fraction": 0.25}
    ds = load_dataset(table(tmp_path / "d.npy", cache_dir=str(tmp_path / "c"), **opts), "eval")
    b = ds.take(np.array([2, 5, 2]))  # eval rows 30..39, a row twice
    np.testing.assert_array_equal(b["x"], [[163, 160], [178, 175], [163, 160]])
    np.testing.assert_array_equal(b["y"], [0, 1, 0])  # each file row's own target
    # the rows come from the file as it is now (read per batch, never held)
    live = np.load(tmp_path / "d.npy", mmap_mode="r+")
    live[32, 3] = -1.0
    live.flush()
    assert ds.take(np.array([2]))["x"].tolist() == [[-1.0, 160.0]]


@pytest.mark.parametrize(
    "layout",
    ["<f8", ">f4", ">i4", "fortran", "version 2.0"],
)
def test_npy_rows_read_the_same_values_in_every_byte_order_layout_and_header(tmp_path, layout):
    # big-endian files are read by pread and converted by value; Fortran order is
    # read through the map; a version 2.0 header (4-byte length) moves the data offset
    arr = np.arange(4 * 24).reshape(24, 4) * 3 - 50
    arr[:, 3] = np.arange(24) % 3
    path = tmp_path / "d.npy"
    if layout == "fortran":
        np.save(path, np.asfortranarray(arr.astype("<f4")))
    elif layout == "version 2.0":
        with open(path, "wb") as f:
            np.lib.format.write_array(f, arr.astype("<f4"), version=(2, 0))
    else:
        np.save(path, arr.astype(layout))
    opts = {"features": ["2", "0"], "target": "3", "eval_fraction": 0.25}
    ds = load_dataset(table(path, cache_dir=str(tmp_path / "c"), **opts), "train")
    b = ds.take(np.array([7, 1, 17]))
    np.testing.assert_array_equal(b["x"], arr[[7, 1, 17]][:, [2, 0]])
    np.testing.assert_array_equal(b["y"], [1, 1, 2])


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_named_arrays_give_features_and_target(tmp_path, fmt):
    x = np.arange(40, dtype=np.float32).reshape(10, 2, 2)
    y = np.arange(10, dtype=np.float32) / 4
    path = tmp_path / f"d.{fmt}"
    if fmt == "npz":
        np.savez(path, images=x, value=y)
    else:
        from pipelines.store.checkpoint import write_safetensors

        write_safetensors(path, {"images": x, "value": y})
    cfg = table(path, features="images", target="value", task="regression", eval_fraction=0.2)
    ds = load_dataset(cfg, "train")
    assert ds.meta["n_features"] == 4
    b = ds.take(np.array([3]))
    np.testing.assert_array_equal(b["x"], x[3].reshape(1, 4))
    np.testing.assert_array_equal(b["y"], [[0.75]])


def test_eval_path_labels_use_the_training_classes(tmp_path, animals, raises_one_line):
    other = write_csv(tmp_path / "ev.csv", ["a", "b", "kind"], [[0, 1, "emu"], [1, 2, "cat"]])
    ev = load_dataset(table(animals, eval_path=str(other)), "eval")
    assert len(load_dataset(table(animals, eval_path=str(other)), "train")) == 20
    np.testing.assert_array_equal(ev.take(np.arange(2))["y"], [2, 0])
    bad = write_csv(tmp_path / "bad.csv", ["a", "b", "kind"], [[0, 1, "emu"], [1, 2, "yak"]])
    with raises_one_line(DataError, match=r"bad.csv line 3, column 'kind': label 'yak' is not"):
        load_dataset(table(animals, eval_path=str(bad)), "eval")


def test_a_cache_maps_prepared_arrays_and_never_serves_a_changed_file(tmp_path, animals):
    cache = str(tmp_path / "cache")
    first = load_dataset(table(animals, cache_dir=cache), "train")
    again = load_dataset(table(animals, cache_dir=cache), "train")
    assert isinstance(again.x, np.memmap)
    np.testing.assert_array_equal(first.take(np.arange(3))["x"], again.take(np.arange(3))["x"])
    rows = [[100 + i, i, "cat" if i % 2 else "dog"] for i in range(20)]
    write_csv(animals, ["a", "b", "kind"], rows)
    changed = load_dataset(table(animals, cache_dir=cache), "train")
    assert changed.take(np.arange(1))["x"][0, 0] == 100
    assert changed.meta["classes"] == ["cat", "dog"]


def test_the_model_takes_its_sizes_from_the_data(animals):
    cfg = load_config(
        "mlp_classifier", ["data.name=table", f"data.path={json.dumps(str(animals))}"]
    )
    assert cfg.data.options["task"] == "classification"  # from the model
    assert "n_train" not in cfg.data.options  # digits' keys dropped with data.name
    model = build_model_for(cfg, load_dataset(cfg.data, "train").meta)
    assert model.in_dim == 2
    assert dict(model.named_parameters())["layers.2.weight"].shape[0] == 3


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file and, where it applies, line / row and column
# ---------------------------------------------------------------------------------------


def _csv(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = {
    "missing file": (lambda p: p / "nope.csv", {}, r"no such file or directory .*nope.csv"),
    "empty file": (lambda p: _csv(p, ""), {}, r"d.csv: empty file"),
    "header only": (lambda p: _csv(p, "a,y\n"), {}, r"d.csv: no data rows"),
    "missing column": (
        lambda p: _csv(p, "a,y\n1,0\n2,1\n"),
        {"target": "label"},
        r"d.csv: no column 'label'; columns: a, y",
    ),
    "non-numeric feature": (
        lambda p: _csv(p, "a,b,y\n1,2,0\n3,x,1\n4,5,0\n"),
        {},
        r"d.csv line 3, column 'b': 'x' is not a number",
    ),
    "NaN feature": (
        lambda p: _csv(p, "a,b,y\n1,2,0\n3,4,1\n4,nan,0\n"),
        {},
        r"d.csv line 4, column 'b': nan is not finite",
    ),
    "short row": (lambda p: _csv(p, "a,y\n1,0\n2\n"), {}, r"d.csv line 3: 1 fields, expected 2"),
    "fractional labels": (
        lambda p: _csv(p, "a,y\n1,0\n2,0.5\n3,1\n"),
        {},
        r"d.csv line 3, column 'y': 0.5 is not a class label",
    ),
    "one class": (lambda p: _csv(p, "a,y\n1,0\n2,0\n3,0\n"), {}, r"has 1 class"),
    "regression target not a number": (
        lambda p: _csv(p, "a,y\n1,0.5\n2,big\n3,1\n"),
        {"task": "regression"},
        r"d.csv line 3, column 'y': 'big' is not a number \(a regression target\)",
    ),
    "unsupported format": (lambda p: _csv(p, "x", "d.xlsx"), {}, r"unsupported table format"),
    "NaN in npy": (
        lambda p: (np.save(p / "d.npy", np.array([[1.0, 0], [np.nan, 1], [2, 1]])), p / "d.npy")[1],
        {},
        r"d.npy row 1, column 0: nan feature",
    ),
    "target of the wrong shape": (
        lambda p: (
            np.savez(p / "d.npz", x=np.zeros((4, 3)), y=np.zeros((4, 2))),
            p / "d.npz",
        )[1],
        {},
        r"d.npz: target 'y' has shape \(4, 2\); expected \(4,\) or \(4, 1\)",
    ),
    "missing array": (
        lambda p: (np.savez(p / "d.npz", x=np.zeros((4, 3))), p / "d.npz")[1],
        {},
        r"d.npz: no array 'y'; arrays: x",
    ),
    "string features": (
        lambda p: (np.save(p / "d.npy", np.array([["a", "b"]] * 3)), p / "d.npy")[1],
        {},
        r"d.npy: the array has dtype <U1; expected numbers",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tables_are_one_line_naming_the_file(tmp_path, case, raises_one_line):
    make, opts, match = BAD[case]
    path = make(tmp_path)
    with raises_one_line(DataError, match=match):
        load_dataset(table(path, **opts), "train")


def test_zerotrain_run_on_bad_data_exits_2_before_any_rank_starts(tmp_path):
    path = _csv(tmp_path, "a,b,y\n1,2,0\n3,x,1\n4,5,0\n")
    run_dir = tmp_path / "run"
    data = table_data(path, tmp_path / "c")
    proc = zerotrain("run", "mlp_classifier", "--ranks", "2", *data, "--run-dir", str(run_dir))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "d.csv line 3, column 'b': 'x' is not a number" in lines[0]
    assert not run_dir.exists()  # nothing started


@pytest.mark.parametrize(
    ("train_y", "eval_y", "shown"),
    [([0, 1], [1, 5], "5"), (["cat", "dog"], ["dog", "yak"], "'yak'")],
)
def test_eval_array_labels_outside_the_training_classes_name_the_row(
    tmp_path, train_y, eval_y, shown, raises_one_line
):
    x = np.zeros((8, 2), np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.array(train_y * 4))
    np.savez(tmp_path / "ev.npz", x=x[:2], y=np.array(eval_y))
    ev = str(tmp_path / "ev.npz")
    cfg = table(tmp_path / "train.npz", features="x", target="y", eval_path=ev)
    match = rf"ev.npz row 1, target 'y': label {shown} is not one of the 2 training classes$"
    with raises_one_line(DataError, match=match):
        load_dataset(cfg, "eval")
