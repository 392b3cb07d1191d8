"""data.name = "table": rows of features and a target, from the user's files.

Formats (by suffix) and what each costs:

    .csv / .tsv / .tab  header row, then one row per sample; parsed once by the stdlib
                        csv reader in the launching process (a cell that is not a number
                        is reported by line and column) into float32 .npy in the cache,
                        which every rank memory-maps
    .npy                one 2-D array (n, F + 1): the target is a column (the last by
                        default, data.target = "k" for column k); checked through a map,
                        then the ranks read their batches' rows with pread (_RowReader),
                        nothing copied
    .npz                arrays by name (data.features = ["x"], data.target = "y" by
                        default); zip members cannot be mapped, so the features are
                        copied once into the cache as .npy
    .safetensors        arrays by name, as .npz; memory-mapped in place

Classification maps labels (integers or strings) to class ids 0..K-1 in sorted order;
regression reads the target as float. `standardize = true` fits each feature's mean and
standard deviation on the training rows only; batches are standardised as they are
gathered (the files are never rewritten). What a model or `predict` needs back -- the
feature names, the classes, the statistics -- is in the dataset's meta and the run's
data.json.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from ._files import DataError, file_identity, map_bytes, prepared, resolve_paths

__all__ = ["TableDataset", "load_table", "read_features"]

_CSV = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_ARRAYS = (".npy", ".npz", ".safetensors")
FORMATS = (*_CSV, *_ARRAYS)
# The purpose tag of the eval split's stream: SeedSequence([data.seed, _SPLIT]).
_SPLIT = 0x5B17
_CHUNK_ROWS = 65536


class TableDataset:
    """Rows `rows` of a (memory-mapped) feature matrix and target vector.

    take(idx) gathers only the rows asked for: x (B, F) float32 (standardised when
    fitted), y (B,) int64 class ids or (B, 1) float32 values.
    """

    def __init__(self, split, x, y, rows, meta):
        self.name, self.split, self.meta = "table", split, meta
        self.x, self.y, self.rows = x, y, rows
        self.arrays = {"x": x, "y": y}
        std = meta.get("standardize")
        self._mean = np.asarray(std["mean"], np.float32) if std else None
        self._std = np.asarray(std["std"], np.float32) if std else None
        self._classify = meta["task"] == "classification"

    def __len__(self) -> int:
        return len(self.rows)

    def eval_indices(self) -> np.ndarray:
        return np.arange(len(self))

    def take(self, idx) -> dict[str, np.ndarray]:
        r = self.rows[np.asarray(idx)]
        x = np.asarray(self.x[r], dtype=np.float32).reshape(len(r), -1)
        if self._mean is not None:
            x = (x - self._mean) / self._std
        y = self.y[r]
        y = y.astype(np.int64) if self._classify else y.astype(np.float32).reshape(-1, 1)
        return {"x": np.ascontiguousarray(x), "y": np.ascontiguousarray(y)}

    def __repr__(self) -> str:
        return f"<Dataset table/{self.split}: {len(self)} samples>"


# ---------------------------------------------------------------------------------------
# Reading one file: features (n, F) and the raw target
# ---------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: unsupported table format {path.suffix or '(no suffix)'!r}; accepted: "
            + ", ".join(FORMATS)
        )
    return suffix


def _one_file(pattern: str, what: str) -> Path:
    paths = resolve_paths(pattern, what)
    if len(paths) != 1:
        raise DataError(f"{what}: expected one table file, {pattern!r} names {len(paths)}")
    return paths[0]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan if text.strip().lower() == "nan" else None


def _bad_cell(path, line, column, text, what):
    if _number(text) is None:
        return DataError(
            f"{path} line {line}, column {column!r}: {text!r} is not a number ({what})"
        )
    return DataError(
        f"{path} line {line}, column {column!r}: {text.strip()} is not finite ({what} must "
        "be finite numbers)"
    )


def _read_csv(path: Path, features: list[str], target: str, need_target: bool):
    """(x float32 (n, F), raw target list of str or None, feature names, target name)."""
    delimiter = _CSV[path.suffix.lower()]
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{path} line 1: not a readable header row: {err}") from None
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}: empty file (expected a header row, then data rows)")
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"{path} line 1: column {dup[0]!r} appears more than once")
        target = target or (header[-1] if need_target or not features else "")
        if target and target not in header and need_target:
            raise DataError(f"{path}: no column {target!r}; columns: {', '.join(header)}")
        names = list(features) or [h for h in header if h != target]
        for name in names:
            if name not in header:
                raise DataError(f"{path}: no column {name!r}; columns: {', '.join(header)}")
        if not names:
            raise DataError(f"{path}: no feature columns besides the target {target!r}")
        cols = [header.index(n) for n in names]
        t_col = header.index(target) if target in header else None
        chunks, labels, rows, lines = [], [] if t_col is not None else None, [], []
        width = len(header)

        def flush():
            try:
                block = np.array(rows, dtype=np.float64)
            except ValueError:
                block = None
            if block is None or not np.isfinite(block).all():
                for line, row in zip(lines, rows, strict=True):
                    for name, text in zip(names, row, strict=True):
                        value = _number(text)
                        if value is None or not math.isfinite(value):
                            raise _bad_cell(path, line, name, text, "features")
            chunks.append(block.astype(np.float32))
            rows.clear()
            lines.clear()

        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != width:
                    raise DataError(
                        f"{path} line {reader.line_num}: {len(row)} fields, expected {width} "
                        "(the header's)"
                    )
                rows.append([row[c] for c in cols])
                lines.append(reader.line_num)
                if labels is not None:
                    labels.append((row[t_col].strip(), reader.line_num))
                if len(rows) == _CHUNK_ROWS:
                    flush()
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text near line {reader.line_num}: {err}") from None
        if rows:
            flush()
    if not chunks:
        raise DataError(f"{path}: no data rows after the header")
    return np.concatenate(chunks), labels, names, target


def _open_arrays(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npy file: {err}") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npz file: {err}") from None
    from pipelines.store.safetensors import SafetensorsError, read_safetensors

    data = map_bytes(path)
    try:
        tensors, _ = read_safetensors(data)
    except SafetensorsError as err:
        raise DataError(f"{path}: not a readable .safetensors file: {err}") from None
    return tensors


def _read_arrays(path: Path, features: list[str], target: str, need_target: bool):
    """(x (n, F) numeric -- a memory map when the format allows --, raw target array or
    None, feature names, target name)."""
    arrays = _open_arrays(path)
    if not arrays or all(a.size == 0 for a in arrays.values()):
        raise DataError(f"{path}: empty file (no arrays, or arrays of no rows)")
    if "" in arrays:  # .npy: the target is a column
        arr = arrays[""]
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise DataError(
                f"{path}: expected a 2-D array (rows, features + target), got shape "
                f"{tuple(arr.shape)}"
            )
        _check_numeric(path, "the array", arr)
        n_cols = arr.shape[1]
        if target:
            try:
                t_col = int(target) % n_cols if -n_cols <= int(target) < n_cols else None
            except ValueError:
                t_col = None
            if t_col is None:
                raise DataError(
                    f"{path}: data.target {target!r} is not a column of the array; accepted: "
                    f"a column index 0..{n_cols - 1} (default: the last)"
                )
        else:
            t_col = n_cols - 1
        names = [str(c) for c in range(n_cols) if c != t_col]
        if features:
            bad = [f for f in features if f not in names]
            if bad:
                raise DataError(
                    f"{path}: data.features {bad[0]!r} is not a feature column; accepted: "
                    f"column indexes {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                )
            names = list(features)
        cols = [int(c) for c in names]
        if cols == list(range(cols[0], cols[0] + len(cols))):
            x = arr[:, cols[0] : cols[0] + len(cols)]  # a view of the map
        else:
            x = _Columns(arr, cols)
        y = arr[:, t_col] if need_target or target else None
        return x, y, names, str(t_col)
    x_name = features[0] if features else "x"
    if len(features) > 1:
        raise DataError(
            f"{path}: data.features names one array in {path.suffix} files, got {features}"
        )
    target = target or "y"
    for name in (x_name, *([target] if need_target else [])):
        if name not in arrays:
            raise DataError(f"{path}: no array {name!r}; arrays: {', '.join(sorted(arrays))}")
    x = arrays[x_name]
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(
            f"{path}: features array {x_name!r} must be (rows, features...), got shape "
            f"{tuple(x.shape)}"
        )
    _check_numeric(path, f"features array {x_name!r}", x)
    x = x.reshape(x.shape[0], -1)
    y = arrays.get(target)
    if y is not None:
        if y.shape not in ((x.shape[0],), (x.shape[0], 1)):
            raise DataError(
                f"{path}: target {target!r} has shape {tuple(y.shape)}; expected "
                f"({x.shape[0]},) or ({x.shape[0]}, 1), one value per row of {x_name!r}"
            )
        y = y.reshape(-1)
    return x, y, [x_name], target


class _RowReader:
    """Some columns of the rows of a C-order .npy matrix, read with os.pread: a batch's
    rows enter this process and nothing else does. (A memory map would also map the
    kernel's fault-around window, 64 KiB by default, around every row a batch touches:
    over a run the whole file ends up in each rank's RSS, shared but resident.)

    reader[rows] is (len(rows), len(cols)) in the file's dtype; None from `of` when the
    file is not a C-order 2-D .npy (the map is used then)."""

    def __init__(self, fd, offset, row_bytes, dtype, n, cols):
        self.fd, self.offset, self.row_bytes, self.dtype = fd, offset, row_bytes, dtype
        self.cols = np.asarray(cols)
        lo, hi = int(self.cols.min()), int(self.cols.max()) + 1
        self.span = (lo * dtype.itemsize, (hi - lo) * dtype.itemsize)
        self.pick = None if list(cols) == list(range(lo, hi)) else self.cols - lo
        self.shape = (n, len(cols))

    @classmethod
    def of(cls, path: Path, cols: list[int]):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
        if fortran or len(shape) != 2 or dtype.hasobject:
            return None
        fd = os.open(path, os.O_RDONLY)
        return cls(fd, offset, shape[1] * dtype.itemsize, dtype, shape[0], cols)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        start, size = self.span
        out = np.empty((len(rows), size // self.dtype.itemsize), self.dtype)
        view = out.view(np.uint8).reshape(len(rows), size)
        for i, r in enumerate(rows.tolist()):
            view[i] = np.frombuffer(
                os.pread(self.fd, size, self.offset + r * self.row_bytes + start), np.uint8
            )
        return out if self.pick is None else out[:, self.pick]

    def __del__(self):
        os.close(self.fd)


def _npy_readers(path: Path, names: list[str], target: str):
    """(features reader, target reader) of a .npy table, or None (see _RowReader)."""
    x = _RowReader.of(path, [int(c) for c in names])
    if x is None:
        return None
    return x, _RowReader.of(path, [int(target)])


class _Columns:
    """Some columns of a memory-mapped matrix, gathered per batch (rows first)."""

    def __init__(self, arr, cols):
        self.arr, self.cols = arr, np.asarray(cols)
        self.shape = (arr.shape[0], len(cols))
        self.dtype = arr.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        return self.arr[rows][:, self.cols]


def _check_numeric(path, what, arr) -> None:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has dtype {arr.dtype}; expected numbers (int or float)")


def check_finite(path: Path, x) -> None:
    """DataError naming the first non-finite feature (row, column), read in chunks."""
    if getattr(x, "dtype", np.dtype("f4")).kind != "f":
        return
    n = x.shape[0]
    for lo in range(0, n, _CHUNK_ROWS):
        block = np.asarray(x[lo : lo + _CHUNK_ROWS])
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(
                f"{path} row {lo + r}, column {c}: {block[r, c]} feature (features must be "
                "finite numbers)"
            )


def _stats(x, rows) -> dict:
    """Per-feature mean and std (population) over `rows`, in float64 over chunks."""
    f = x.shape[1]
    s, ss, n = np.zeros(f), np.zeros(f), 0
    for lo in range(0, len(rows), _CHUNK_ROWS):
        block = np.asarray(x[rows[lo : lo + _CHUNK_ROWS]], dtype=np.float64)
        s += block.sum(0)
        ss += (block * block).sum(0)
        n += block.shape[0]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    std[std < 1e-12] = 1.0  # a constant feature stays at 0 after centring
    return {"mean": mean.tolist(), "std": std.tolist()}


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


def _classes_of(path: Path, raw, target: str) -> list:
    """Sorted class labels: ints when every label is an integer, else strings."""
    if isinstance(raw, list):  # CSV: strings with their line numbers
        values = [v for v, _ in raw]
        for v, line in raw:
            if v == "":
                raise DataError(f"{path} line {line}, column {target!r}: empty label")
        ints, fracs = [], None
        for v, line in raw:
            num = _number(v)
            if num is None:
                ints = None
                break
            if not math.isfinite(num) or num != int(num):
                fracs = fracs or (v, line)
            else:
                ints.append(int(num))
        if ints is not None:
            if fracs:
                v, line = fracs
                raise DataError(
                    f"{path} line {line}, column {target!r}: {v} is not a class label "
                    "(expected integers or names; a numeric target is mlp_regressor's)"
                )
            return sorted(set(ints))
        return sorted(set(values))
    if raw.dtype.kind in "US":
        return sorted({str(v) for v in np.unique(raw)})
    if raw.dtype.kind == "f":
        bad = ~np.isfinite(raw) | (raw != np.round(raw))
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(
                f"{path} row {r}, target {target!r}: {raw[r]} is not a class label "
                "(expected integers or names; a numeric target is mlp_regressor's)"
            )
    elif raw.dtype.kind not in "biu":
        raise DataError(f"{path}: target {target!r} has dtype {raw.dtype}; expected labels")
    return [int(v) for v in np.unique(raw)]


def class_ids(path: Path, raw, target: str, classes: list) -> np.ndarray:
    """Labels -> ids into `classes`; DataError naming the first label not among them."""
    lookup = {c: i for i, c in enumerate(classes)}
    by_int = classes and isinstance(classes[0], int)
    if isinstance(raw, list):
        out = np.empty(len(raw), np.int64)
        for i, (v, line) in enumerate(raw):
            key = v
            if by_int:
                num = _number(v)
                key = int(num) if num is not None and math.isfinite(num) else v
            if key not in lookup:
                raise _not_a_class(f"{path} line {line}, column {target!r}", repr(v), classes)
            out[i] = lookup[key]
        return out
    values = np.asarray(raw)
    keys = [str(v) for v in values] if not by_int else None
    if by_int:
        if values.dtype.kind not in "biuf":
            raise DataError(f"{path}: target {target!r} holds names, the training classes ints")
        cls = np.asarray(classes)
        ids = np.searchsorted(cls, values)
        ids = np.clip(ids, 0, len(cls) - 1)
        bad = cls[ids] != values
        if bad.any():
            r = int(np.argmax(bad))
            raise _not_a_class(f"{path} row {r}, target {target!r}", values[r], classes)
        return ids.astype(np.int64)
    out = np.empty(len(keys), np.int64)
    for i, k in enumerate(keys):
        if k not in lookup:
            raise _not_a_class(f"{path} row {i}, target {target!r}", repr(k), classes)
        out[i] = lookup[k]
    return out


def _not_a_class(where: str, label, classes: list) -> DataError:
    """The error of a label (as it is to be shown) that is not among `classes`."""
    return DataError(f"{where}: label {label} is not one of the {len(classes)} training classes")


def regression_target(path: Path, raw, target: str) -> np.ndarray:
    if isinstance(raw, list):
        out = np.empty(len(raw), np.float32)
        for i, (v, line) in enumerate(raw):
            num = _number(v)
            if num is None or not math.isfinite(num):
                raise _bad_cell(path, line, target, v, "a regression target")
            out[i] = num
        return out
    if raw.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: target {target!r} has dtype {raw.dtype}; a regression target is numbers"
        )
    bad = ~np.isfinite(np.asarray(raw, np.float64))
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(f"{path} row {r}, target {target!r}: {raw[r]} is not finite")
    return raw


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def read_features(path: Path, features: list[str], target: str, need_target: bool):
    """(x, raw target or None, feature names, target name) of one table file."""
    if _suffix(path) in _CSV:
        return _read_csv(path, features, target, need_target)
    return _read_arrays(path, features, target, need_target)


def _targets(task, parts, target, classes=None):
    """(y of the files in `parts` concatenated, classes): class ids into `classes` (the
    sorted labels of every part when None) or regression values. parts: (path, raw)."""
    if task == "classification":
        if classes is None:
            found = set()
            for path, raw in parts:
                found.update(_classes_of(path, raw, target))
            classes = sorted(found)
            if len(classes) < 2:
                raise DataError(
                    f"{parts[0][0]}: target {target!r} has {len(classes)} class; "
                    "classification needs 2 or more"
                )
        ys = [class_ids(path, raw, target, classes) for path, raw in parts]
    else:
        ys = [regression_target(path, raw, target) for path, raw in parts]
    return (ys[0] if len(ys) == 1 else np.concatenate(ys)), classes


def _build(opts: dict, seed: int, paths: list[Path], eval_path: Path | None):
    features, target, task = list(opts["features"]), opts["target"], opts["task"]
    if task not in ("classification", "regression"):
        raise DataError(
            "data.task: expected classification or regression (set it, or use "
            f"mlp_classifier / mlp_regressor), got {task!r}"
        )
    path = paths[0]
    x, raw, names, target = read_features(path, features, target, True)
    check_finite(path, x)
    parts = [(path, raw)]
    if len(paths) > 1:  # several files (a followed directory): their rows in order
        xs = [x]
        for other in paths[1:]:
            if _suffix(other) != _suffix(path):
                raise DataError(f"{other}: every table file must have the format {path.suffix}")
            ox, oraw, _, _ = read_features(other, names, target, True)
            if ox.shape[1:] != x.shape[1:]:
                raise DataError(f"{other}: {ox.shape[1]} feature columns, {path} has {x.shape[1]}")
            check_finite(other, ox)
            xs.append(ox)
            parts.append((other, oraw))
        x = np.concatenate([np.asarray(a, np.float32) for a in xs])
    n = x.shape[0]
    if eval_path is not None:
        ex, eraw, _, _ = read_features(eval_path, names, target, True)
        check_finite(eval_path, ex)
        train_rows, eval_rows = np.arange(n), np.arange(ex.shape[0])
    else:
        k = max(1, int(round(n * opts["eval_fraction"])))
        if n - k < 1:
            raise DataError(f"{path}: {n} rows leave none for training after the eval share")
        if opts["split"] == "tail":
            train_rows, eval_rows = np.arange(n - k), np.arange(n - k, n)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT]))
            perm = rng.permutation(n)
            train_rows, eval_rows = np.sort(perm[k:]), np.sort(perm[:k])
    arrays = {}
    meta = {
        "task": task,
        "n_features": int(np.prod(x.shape[1:])),
        "columns": names,
        "target": target,
        "format": path.suffix.lower(),
    }
    one_map = len(paths) == 1 and _mappable(path)
    y, classes = _targets(task, parts, target)
    if task == "classification":
        meta.update(classes=classes, n_classes=len(classes))
    if task == "classification" or not one_map:
        arrays["y"] = np.asarray(y, np.int64 if task == "classification" else np.float32)
    if eval_path is not None:
        arrays["eval_y"] = _targets(task, [(eval_path, eraw)], target, classes)[0]
    # CSV (parsed), .npz (unmappable) and several files' features are materialised; one
    # .npy or .safetensors file's features stay views of the file's map.
    if not one_map:
        arrays["x"] = np.ascontiguousarray(x)
    if eval_path is not None and not _mappable(eval_path):
        arrays["eval_x"] = np.ascontiguousarray(ex)
    if eval_path is None:
        arrays["train_rows"], arrays["eval_rows"] = train_rows, eval_rows
    if opts["standardize"]:
        meta["standardize"] = _stats(x, train_rows)
    files = list(paths) + ([eval_path] if eval_path is not None else [])
    meta["files"] = [file_identity(p) for p in files]
    return arrays, meta


def _mappable(path: Path) -> bool:
    return path.suffix.lower() in (".npy", ".safetensors")


def load_table(data_cfg, split: str, paths: list[Path] | None = None) -> TableDataset:
    """The `split` of the table data_cfg names; `paths`: the files to read instead of
    data.path's (a followed directory's files of one epoch, see _follow)."""
    opts = data_cfg.options
    path = paths[0] if paths else _one_file(opts["path"], "data.path")
    eval_path = _one_file(opts["eval_path"], "data.eval_path") if opts["eval_path"] else None
    for p in (path, eval_path):
        if p is not None:
            _suffix(p)
    if eval_path is not None and _suffix(eval_path) != _suffix(path):
        raise DataError(
            f"data.eval_path: {eval_path} must have the format of data.path ({path.suffix})"
        )
    train_paths = list(paths) if paths else [path]
    arrays, meta = prepared(
        "table",
        opts,
        train_paths + ([eval_path] if eval_path is not None else []),
        data_cfg.cache_dir,
        lambda: _build(opts, data_cfg.seed, train_paths, eval_path),
    )
    which = "eval" if split == "eval" and eval_path is not None else "train"
    src = path if which == "train" else eval_path
    if which == "train":
        rows = arrays.get(f"{split}_rows")
    else:
        rows = None
    x = arrays.get("x" if which == "train" else "eval_x")
    y = arrays.get("y" if which == "train" else "eval_y")
    if x is None or y is None:
        # features (or a regression target) read from the file itself: a .npy's rows by
        # pread, a .safetensors' through its map
        readers = None
        if src.suffix.lower() == ".npy":
            readers = _npy_readers(src, meta["columns"], meta["target"])
        if readers is not None:
            mx, my = readers
        else:
            mx, my, _, _ = read_features(src, meta["columns"], meta["target"], True)
        x = mx if x is None else x
        y = my if y is None else y
    if rows is None:
        rows = np.arange(x.shape[0])
    return TableDataset(split, x, y, rows, meta)
