"""Datasets and the pure batch function.

No network at run time: the character corpus ships as corpus.txt.gz (made once by
scripts/make_corpus.py from standard-library docstrings); digits, regression targets and
triplets are generated deterministically from `data.seed`. The user's own files come in
as `table` (CSV/TSV, .npy, .npz, .safetensors: see _table), `text` (UTF-8 files:
see _text) and `triplets` (drawn from a labelled table: see _triplets); their sizes
(features, classes, vocabulary) are in `dataset.meta`, which the model builder reads,
and what went in (files with size and SHA-256, classes, vocabulary, standardisation) is
the run's data.json (`data_record`).

    ds = load_dataset(cfg.data, "train")          # or "eval" (held out)
    batch = batch_for(ds, seed, epoch, step, rank, world, batch_size)

A batch is a dict of numpy arrays whose keys are the model's (BATCH_KEYS):

    corpus, text    x (B, T) int64, y (B, T) int64 (the next tokens: x shifted by one)
    digits          x (B, 784) float32 in [0, 1], y (B,) int64 class
    friedman        x (B, F) float32 in [0, 1], y (B, 1) float32 standardised target
    table           x (B, F) float32, y (B,) int64 class or (B, 1) float32 value
    digit_triplets  anchor, positive, negative (B, 784) float32
    triplets        anchor, positive, negative (B, F) float32 (rows of a table)

`batch_for` is pure: the same arguments give the same batch, on any machine, in any
process (see _sampling for the rule). With `cache_dir` set, arrays are written once as
.npy and memory-mapped back, so data larger than memory streams from disk.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ._files import DataError, file_identity, materialise, resolve_paths
from ._follow import EPOCHS_DIR, EpochLog, load_followed, locate_in, read_epochs
from ._sampling import batch_indices, position, steps_per_epoch
from ._text import (
    TextWindows,
    chars_decode,
    chars_encode,
    check_utf8,
    encode_files,
    load_text,
    map_bytes,
)

# _table (and _triplets, which reads a table) and _digits load on first use: a rank of a
# run on another dataset never needs them, and a restarted rank's imports are on the
# path of a recovery (each module is compiled again when no .pyc can be written).
_TABLE_NAMES = ("TableDataset", "check_finite", "class_ids", "read_features", "regression_target")


def __getattr__(name: str):
    if name in _TABLE_NAMES:
        from . import _table

        return getattr(_table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TableDataset",
    "TextWindows",
    "check_finite",
    "check_utf8",
    "class_ids",
    "encode_files",
    "map_bytes",
    "read_features",
    "regression_target",
    "with_default_cache",
    "VOCAB",
    "DataError",
    "EPOCHS_DIR",
    "EpochLog",
    "RECORD_ONLY",
    "Dataset",
    "Triplets",
    "batch_for",
    "batch_indices",
    "chars_decode",
    "chars_encode",
    "data_record",
    "file_identity",
    "resolve_paths",
    "decode",
    "encode",
    "load_corpus_text",
    "load_dataset",
    "locate",
    "locate_in",
    "position",
    "read_epochs",
    "record_epochs",
    "steps_per_epoch",
]

CORPUS_PATH = Path(__file__).resolve().parent / "corpus.txt.gz"
# newline + printable ASCII: 96 symbols, id = position in this string.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_CHAR_TO_ID = np.full(256, -1, dtype=np.int64)
_CHAR_TO_ID[np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)] = np.arange(len(VOCAB))

# Purpose tags for the data-generation streams (SeedSequence([data.seed, purpose, split])).
_GEN_DIGITS, _GEN_FRIEDMAN, _GEN_TRIPLETS = 0xD161, 0xF41D, 0x7219
_SPLITS = {"train": 0, "eval": 1}


def encode(text: str) -> np.ndarray:
    """Characters -> int64 ids; ValueError naming the first character outside VOCAB."""
    raw = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    ids = _CHAR_TO_ID[raw]
    if ids.size and ids.min() < 0:
        bad = text[int(np.argmin(ids))]
        raise ValueError(
            f"text: expected characters of VOCAB (newline, printable ASCII), got {bad!r}"
        )
    return ids


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in np.asarray(ids).ravel())


def load_corpus_text() -> str:
    with gzip.open(CORPUS_PATH, "rb") as f:
        return f.read().decode("ascii")


# ---------------------------------------------------------------------------------------
# Dataset: n samples and a gather
# ---------------------------------------------------------------------------------------


class Dataset:
    """n samples; `take(indices)` gathers a batch dict. Arrays may be memory-mapped.

    `arrays` hold per-sample rows (first axis = sample) unless a subclass says otherwise;
    `meta` carries what models and metrics need (vocab_size, n_classes, n_features).
    """

    def __init__(self, name: str, split: str, arrays: dict[str, np.ndarray], meta: dict):
        self.name, self.split, self.arrays, self.meta = name, split, arrays, meta

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(a[idx]) for k, a in self.arrays.items()}

    def eval_indices(self) -> np.ndarray:
        """The samples an evaluation walks, in order: every one."""
        return np.arange(len(self))

    def __repr__(self) -> str:
        return f"<Dataset {self.name}/{self.split}: {len(self)} samples>"


class Triplets(Dataset):
    """Rows of (anchor, positive, negative) indices into a table of images."""

    def __len__(self) -> int:
        return len(self.arrays["triplets"])

    def take(self, idx):
        rows = self.arrays["triplets"][np.asarray(idx)]
        images = self.arrays["images"]
        return {
            key: np.ascontiguousarray(images[rows[:, j]])
            for j, key in enumerate(("anchor", "positive", "negative"))
        }


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------

# Friedman #1 target statistics over U[0,1]^5 (mean, std without noise), used to
# standardise y with constants rather than data, so train and eval share the scale.
_FRIEDMAN_MEAN, _FRIEDMAN_STD = 14.416, 4.885


def _rng(seed: int, purpose: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, _SPLITS[split]]))


def _build_arrays(name: str, seed: int, split: str, opts: dict) -> tuple[dict, dict]:
    n = opts.get("n_train" if split == "train" else "n_eval")
    if name == "corpus":
        tokens = encode(load_corpus_text())
        cut = int(len(tokens) * (1.0 - opts["eval_fraction"]))
        part = tokens[:cut] if split == "train" else tokens[cut:]
        return {"tokens": part}, {"vocab_size": len(VOCAB), "seq_len": opts["seq_len"]}
    if name == "digits":
        from ._digits import render_digits

        x, y = render_digits(_rng(seed, _GEN_DIGITS, split), n, opts["noise"])
        return {"x": x, "y": y}, {"n_classes": 10, "n_features": x.shape[1]}
    if name == "friedman":
        rng = _rng(seed, _GEN_FRIEDMAN, split)
        x = rng.uniform(0.0, 1.0, size=(n, opts["n_features"]))
        y = (
            10 * np.sin(np.pi * x[:, 0] * x[:, 1])
            + 20 * (x[:, 2] - 0.5) ** 2
            + 10 * x[:, 3]
            + 5 * x[:, 4]
            + opts["noise"] * rng.normal(size=n)
        )
        y = (y - _FRIEDMAN_MEAN) / _FRIEDMAN_STD
        return (
            {"x": x.astype(np.float32), "y": y.astype(np.float32)[:, None]},
            {"n_features": opts["n_features"], "noise_var": (opts["noise"] / _FRIEDMAN_STD) ** 2},
        )
    if name == "digit_triplets":
        from ._digits import make_triplets, render_digits

        # A pool of images half the triplet count, shared by many triplets per class.
        rng = _rng(seed, _GEN_TRIPLETS, split)
        images, labels = render_digits(rng, max(n // 2, 20), opts["noise"])
        triplets = make_triplets(rng, labels, n)
        return (
            {"images": images, "labels": labels, "triplets": triplets},
            {"n_features": images.shape[1]},
        )
    raise ValueError(
        f"dataset: expected one of corpus, digits, friedman, digit_triplets, got {name!r}"
    )


def _wrap(name, split, arrays, meta) -> Dataset:
    if name == "corpus":
        return TextWindows(
            split,
            arrays["tokens"],
            meta["seq_len"],
            {"vocab_size": len(VOCAB), "seq_len": meta["seq_len"]},
            name="corpus",
        )
    if name == "digit_triplets":
        return Triplets(name, split, arrays, meta)
    return Dataset(name, split, arrays, meta)


def _cache_key(name, seed, opts) -> str:
    blob = json.dumps({"name": name, "seed": seed, "opts": opts, "v": 1}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def with_default_cache(data_cfg):
    """`data_cfg`, or with no cache_dir configured, the same with the per-user cache
    ($XDG_CACHE_HOME or ~/.cache, then zerotrain/data): a dataset is built once and
    memory-mapped by every later run and rank process (same arrays, same bits)."""
    if data_cfg.cache_dir:
        return data_cfg
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return dataclasses.replace(data_cfg, cache_dir=os.path.join(base, "zerotrain", "data"))


def load_dataset(data_cfg, split: str = "train", *, epochs: EpochLog | None = None) -> Dataset:
    """The `split` ("train" or "eval", held out) of the dataset `data_cfg` describes.

    `data_cfg` is a pipelines.config.DataConfig (name, seed, cache_dir, options).
    `epochs`: with data.follow, the run's record of each epoch's files (see _follow;
    one log for both splits of a run).
    """
    if split not in _SPLITS:
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    if data_cfg.options.get("follow"):
        if data_cfg.name == "table":
            from ._table import load_table as loader
        else:
            loader = load_text
        return load_followed(data_cfg, split, epochs, loader)
    if data_cfg.name == "table":
        from ._table import load_table

        return load_table(data_cfg, split)
    if data_cfg.name == "text":
        return load_text(data_cfg, split)
    if data_cfg.name == "triplets":
        from ._triplets import load_triplets

        return load_triplets(data_cfg, split)
    name, seed, opts = data_cfg.name, data_cfg.seed, dict(data_cfg.options)
    if not data_cfg.cache_dir:
        return _wrap(name, split, *_build_arrays(name, seed, split, opts))
    root = Path(data_cfg.cache_dir) / _cache_key(name, seed, opts) / split
    if not (root / "meta.json").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        materialise(root, *_build_arrays(name, seed, split, opts))
    meta = json.loads((root / "meta.json").read_text())
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(root.glob("*.npy"))}
    return _wrap(name, split, arrays, meta)


# Meta keys a run records but a resume does not compare: the files (size, SHA-256) and
# the statistics fitted on them; `zerotrain run --resume` compares the files itself and
# refuses a change unless --allow-data-change (pipelines.use.check_data).
RECORD_ONLY = ("files", "standardize")


def data_record(dataset) -> dict:
    """What a run records of its data (data.json): the dataset's name and meta -- for
    file sources the files with size and SHA-256, classes, vocabulary, statistics."""
    return {"name": dataset.name, "meta": dict(dataset.meta)}


def record_epochs(dataset, run_dir) -> None:
    """A followed dataset's epoch records go to the run dir, shared from then on by every
    process of the run (a dataset that is not followed: nothing to do)."""
    log = getattr(dataset, "log", None)
    if log is not None:
        log.attach(Path(run_dir) / EPOCHS_DIR)


def locate(dataset, step: int, batch_size: int):
    """(epoch, step within it, the dataset that epoch trains on) of 0-based global step
    `step`: `position` over a fixed dataset, the recorded epochs of a followed one."""
    if hasattr(dataset, "locate"):
        return dataset.locate(step, batch_size)
    return (*position(step, len(dataset), batch_size), dataset)


def batch_for(
    dataset: Dataset,
    seed: int,
    epoch: int,
    step: int,
    rank: int,
    world: int,
    batch_size: int,
    *,
    micro: int = 0,
    accum: int = 1,
) -> dict[str, np.ndarray]:
    """Rank `rank`'s part of micro-batch `micro` of global batch `step` of `epoch`.

    Pure: a function of its arguments only. `batch_size` is the global batch; the rank's
    part has batch_size / (world * accum) samples. See pipelines.data._sampling.
    """
    idx = batch_indices(
        len(dataset), seed, epoch, step, rank, world, batch_size, micro=micro, accum=accum
    )
    return dataset.take(idx)
