"""What the file sources share: DataError, finding the files, their identity, the cache.

A file source (table, text) is prepared once -- parsed, checked, labels mapped,
statistics fitted -- into a few derived arrays and a JSON meta; the source files
themselves stay where they are and are memory-mapped whenever their format allows. With
a cache dir the derived arrays are written as .npy under a key of the files' (path,
size, mtime) and memory-mapped back by every later process (the rank processes of a run
map what the launching process prepared), so no process copies a whole file.

Identity: `meta["files"]` lists every file read, with its size and SHA-256 -- the run
records it (data.json) and `--resume` compares it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

__all__ = ["DataError", "file_identity", "map_bytes", "materialise", "prepared", "resolve_paths"]

# A change in how files are prepared must change every cache key.
_PREPARE_VERSION = 1


class DataError(ValueError):
    """Data that cannot be used as it is; `str(err)` is one line naming the file and,
    where it applies, the line or row and column."""


def resolve_paths(pattern: str, what: str = "data.path") -> list[Path]:
    """The files `pattern` names: a file, every file under a directory (sorted, hidden
    names skipped), or the files a glob matches (sorted). DataError when there are none."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{what}: directory {str(path)!r} holds no files")
        return files
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"{what}: no files match {pattern!r}")
        return files
    if path.exists():
        raise DataError(f"{what}: {str(path)!r} is neither a file nor a directory")
    raise DataError(f"{what}: no such file or directory {str(path)!r}")


def map_bytes(path: Path) -> np.ndarray:
    """The file's bytes as a read-only uint8 memory map (an empty array for an empty file).

    DataError (one line) when it cannot be opened."""
    try:
        size = path.stat().st_size
        if size == 0:
            return np.zeros(0, np.uint8)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    return np.frombuffer(mm, dtype=np.uint8)


def file_identity(path: Path) -> dict:
    """{"path", "size", "sha256"} of a file, read through a memory map in 16 MiB pieces."""
    data = map_bytes(path)
    digest = hashlib.sha256()
    for lo in range(0, data.size, 1 << 24):
        digest.update(data[lo : lo + (1 << 24)])
    return {"path": str(path.resolve()), "size": int(data.size), "sha256": digest.hexdigest()}


def _stat_key(paths: list[Path]) -> list:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as err:
            raise DataError(f"{p}: cannot read: {err.strerror or err}") from None
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def prepared(name: str, options: dict, paths: list[Path], cache_dir: str, build):
    """(arrays, meta) of a file source: `build()` once per (options, files), cached.

    Without a cache dir `build()` runs in this process and its arrays stay in memory.
    With one, the arrays are written as .npy (temp dir + rename, so concurrent processes
    never see half a cache) and memory-mapped back; a file changed on disk changes the
    key (its size or mtime), so a stale cache is never read.
    """
    if not cache_dir:
        return build()
    blob = json.dumps(
        {"name": name, "options": options, "files": _stat_key(paths), "v": _PREPARE_VERSION},
        sort_keys=True,
    )
    root = Path(cache_dir) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if not (root / "meta.json").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        materialise(root, *build())
    meta = json.loads((root / "meta.json").read_text())
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(root.glob("*.npy"))}
    return arrays, meta


def materialise(root: Path, arrays: dict, meta: dict) -> None:
    """Write arrays as .npy + meta.json under `root` atomically (temp dir + rename), so
    concurrent rank processes building the same cache never see half a file."""
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        np.save(tmp / f"{key}.npy", arr)
    (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race: its copy is identical
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
