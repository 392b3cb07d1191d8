"""data.follow = true: a text or table directory that grows while a run trains.

Epoch e trains on the files data.path holds when the run first needs epoch e (at its
first step, or a prefetch of it): that set is decided once, by whichever process gets
there first, and recorded in the run dir as data_epochs/epoch-NNNNN.json
({"epoch", "files": [{path, size, sha256}], "samples"}). Every other process -- the
other ranks, a rank restarted after a crash, the coordinator writing a checkpoint
manifest, a run resumed from that checkpoint (the manifest's data position carries the
records) -- reads the record and never looks at the directory for that epoch. So a file
added during epoch e is used from epoch e + 1, and a recovery or resume replays exactly
the recorded sets (a recorded file whose size or SHA-256 changed is a DataError).

First writer wins: a record is written under a temporary name and hard-linked to its
final name, which fails if the name exists; a process that loses reads the winner's.

What the model was built for stays epoch 0's: a later epoch's files must give the same
columns, classes and vocabulary (DataError naming the epoch and what differs), and a
fitted standardisation stays epoch 0's. Held-out data comes from data.eval_path, which
follow requires: a tail of a growing directory would move.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._files import DataError, resolve_paths
from ._sampling import steps_per_epoch

__all__ = ["EPOCHS_DIR", "EpochLog", "FollowedData", "load_followed", "locate_in", "read_epochs"]

# Under the run dir: one record per epoch.
EPOCHS_DIR = "data_epochs"
# Meta keys that fix the model's sizes and the data's meaning: equal in every epoch.
_FRAME = ("columns", "target", "classes", "n_features", "vocab", "vocab_size", "seq_len")


def _record_name(epoch: int) -> str:
    return f"epoch-{epoch:05d}.json"


def read_epochs(run_dir) -> list[dict]:
    """The epoch records of a run dir, by epoch (an empty list when there are none)."""
    root = Path(run_dir) / EPOCHS_DIR
    if not root.is_dir():
        return []
    out = [json.loads(p.read_text()) for p in sorted(root.glob("epoch-*.json"))]
    return sorted(out, key=lambda r: r["epoch"])


class EpochLog:
    """The recorded file set of each epoch: in memory, and in `directory` once attached
    (the run dir's data_epochs, shared by every process of the run)."""

    def __init__(self, directory=None, records=()):
        self.dir = Path(directory) if directory is not None else None
        self.records = {int(r["epoch"]): r for r in records}

    def attach(self, directory) -> None:
        """Share this log through `directory`: the records held so far are written there
        (a different record already there is a DataError: two runs in one dir)."""
        self.dir = Path(directory)
        for record in [self.records[e] for e in sorted(self.records)]:
            if self.publish(record) != record:
                raise DataError(f"{self.dir}: epoch {record['epoch']} is recorded with other files")

    def get(self, epoch: int) -> dict | None:
        if epoch not in self.records and self.dir is not None:
            path = self.dir / _record_name(epoch)
            if path.is_file():
                self.records[epoch] = json.loads(path.read_text())
        return self.records.get(epoch)

    def publish(self, record: dict) -> dict:
        """Record `record` unless its epoch is recorded already; the record that holds."""
        epoch = int(record["epoch"])
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            final = self.dir / _record_name(epoch)
            tmp = self.dir / f".{_record_name(epoch)}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(record, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # fails if another process recorded this epoch first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            record = json.loads(final.read_text())
        return self.records.setdefault(epoch, record)

    def as_list(self) -> list[dict]:
        return [self.records[e] for e in sorted(self.records)]


def locate_in(records: list[dict], step: int, batch_size: int) -> tuple[int, int]:
    """(epoch, step within it) of 0-based global step `step`, walking the recorded
    epochs' sample counts; a step past them is the first step of the next epoch."""
    start = 0
    for record in records:
        spe = steps_per_epoch(int(record["samples"]), batch_size)
        if step < start + spe:
            return int(record["epoch"]), step - start
        start += spe
    return len(records), step - start


class FollowedData:
    """The training split of a followed directory: epoch e's dataset is `part(e)`.

    len, meta and take are epoch 0's (what the model is built for and the run records);
    training batches come through `locate(step, batch_size)`.
    """

    def __init__(self, data_cfg, load, log: EpochLog):
        self.cfg, self._load, self.log = data_cfg, load, log
        self._parts: dict[int, object] = {}
        first = self.part(0)
        self.name, self.split, self.meta = first.name, "train", first.meta
        self.arrays = first.arrays

    def __len__(self) -> int:
        return len(self.part(0))

    def take(self, idx):
        return self.part(0).take(idx)

    def eval_indices(self):
        return self.part(0).eval_indices()

    def paths(self, epoch: int) -> list[Path]:
        self.part(epoch)
        return [Path(f["path"]) for f in self.log.get(epoch)["files"]]

    def part(self, epoch: int):
        """Epoch `epoch`'s dataset: its recorded files, or the directory's files now
        (recorded here first) when nobody has recorded the epoch yet."""
        if epoch in self._parts:
            return self._parts[epoch]
        record = self.log.get(epoch)
        ds = None
        if record is None:
            files = resolve_paths(self.cfg.options["path"], "data.path")
            ds = self._load(files)
            ids = ds.meta["files"][: len(files)]
            record = {"epoch": epoch, "files": ids, "samples": len(ds)}
            if self.log.publish(record) != record:
                ds, record = None, self.log.get(epoch)
        if ds is None:
            ds = self._load([Path(f["path"]) for f in record["files"]])
            now = ds.meta["files"][: len(record["files"])]
            for old, new in zip(record["files"], now, strict=True):
                if (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
                    raise DataError(
                        f"{old['path']}: changed since epoch {epoch} recorded it (size or "
                        "SHA-256); a followed directory's files must not change once used"
                    )
        if epoch:
            self._fit_to_first(epoch, ds)
        for old in [e for e in self._parts if e not in (0, epoch - 1)]:
            self._parts.pop(old, None)  # epoch 0 (the frame) and the previous epoch stay
        self._parts[epoch] = ds
        return ds

    def _fit_to_first(self, epoch: int, ds) -> None:
        first = self.part(0)
        for key in _FRAME:
            if first.meta.get(key) != ds.meta.get(key):
                raise DataError(
                    f"{self.cfg.options['path']}: the files of epoch {epoch} change the "
                    f"data's {key} (follow keeps epoch 0's: add files of the same "
                    "columns, classes and characters)"
                )
        if hasattr(first, "_mean"):  # a table: epoch 0's standardisation
            ds._mean, ds._std = first._mean, first._std

    def locate(self, step: int, batch_size: int):
        """(epoch, step within it, that epoch's dataset) of 0-based global step `step`."""
        epoch, start = 0, 0
        while True:
            record = self.log.get(epoch)
            if record is None:  # the first step of an epoch nobody has decided yet
                self.part(epoch)
                record = self.log.get(epoch)
            spe = steps_per_epoch(int(record["samples"]), batch_size)
            if step < start + spe:
                return epoch, step - start, self.part(epoch)
            start += spe
            epoch += 1

    def __repr__(self) -> str:
        return f"<Dataset {self.name}/train followed: {len(self)} samples in epoch 0>"


def load_followed(data_cfg, split: str, log: EpochLog | None, loader):
    """The split of a followed directory (`loader(data_cfg, split, paths)` reads a file
    list): train is a FollowedData, eval is data.eval_path read with epoch 0's files."""
    opts = data_cfg.options
    path = Path(opts["path"]).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.path: follow = true needs a directory, got {opts['path']!r} (accepted: a "
            "directory whose files are read, more of them each epoch as they appear)"
        )
    if not opts["eval_path"]:
        raise DataError(
            "data.eval_path: follow = true needs a held-out file outside the followed "
            "directory (a tail of a growing directory would move)"
        )
    followed = FollowedData(
        data_cfg, lambda paths: loader(data_cfg, "train", paths), log or EpochLog()
    )
    if split == "train":
        return followed
    return loader(data_cfg, "eval", followed.paths(0))
