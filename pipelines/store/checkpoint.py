"""Sharded checkpoints: per-rank safetensors shards plus a manifest written last.

Design note. A checkpoint is a directory `<root>/step-<8 digits>/` holding

    shard-<rank>-of-<world>.safetensors   this rank's slice [lo, hi) of the flat vectors:
                                          "params" and the optimizer state ("exp_avg",
                                          "exp_avg_sq", "momentum_buffer", ...)
    manifest.json                         step, world, mode, config hashes, data position,
                                          counters, metrics, per shard: file, rank, lo,
                                          hi, bytes, sha256; "layout", the layout
                                          table (`layout_table`); "asked": true on a
                                          checkpoint a user asked for (`zerotrain
                                          checkpoint`), which retention keeps

Durability protocol (what makes a crash at any instant harmless):
1. each rank writes its shard to `<name>.tmp-<pid>`, fsyncs it, renames it into place and
   fsyncs the directory (`write_shard`, returning its ShardInfo: size and SHA-256);
2. only when every shard is durable, the coordinator writes manifest.json the same way
   (`write_manifest`). A directory without a valid manifest is not a checkpoint.
`latest_valid(root)` walks newest first and returns the first checkpoint whose manifest
parses and whose every file has the recorded size and SHA-256 and parses as safetensors;
every one it passes over is reported with the reason (torn, truncated, bit-flipped,
missing). Shards record their own [lo, hi) so loading never depends on how a world size
splits a vector: `load_full` concatenates them into full-length vectors, and any new
(world, rank) takes its slice with `shard_bounds` — resharding 4 -> 2, zero2 -> ddp, ...

The weights also export as one safetensors file named like the PyTorch module
(`export_weights`), so `model.load_state_dict(safetensors.torch.load_file(path))` works.

The layout table is the public description of the flat vector, so that a tool outside
zerotrain can read a checkpoint with nothing but JSON and a safetensors reader. Every
vector of a shard file ("params", "exp_avg", ...) is the slice [lo, hi) of a flat
float32 vector of length n, and parameters lie in it one after the other in model
order, each flattened in C order::

    "layout": {"n": 1234, "dtype": "float32", "order": "C",
               "params": [{"name": "layers.0.weight", "shape": [16, 4],
                           "offset": 0, "length": 64}, ...],
               "shards": [{"rank": 0, "lo": 0, "hi": 617,
                           "pieces": [{"name": "layers.0.weight", "start": 0,
                                       "stop": 64, "at": 0}, ...]}, ...],
               "frozen": [{"name": ..., "shape": [...]}]}

params[name] = flat[offset : offset + length].reshape(shape); a shard's piece says that
elements [start, stop) of that flattened parameter sit at [at, at + stop - start) of
the shard's own tensors. Frozen parameters (a LoRA base) are not in the vector: they
are rebuilt from the run's seed. weights.safetensors carries the same table, with one
shard [0, n), as JSON in its metadata under "layout".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .safetensors import SafetensorsError, read_safetensors, safetensors_bytes

__all__ = [
    "FORMAT",
    "CheckpointError",
    "LatestValid",
    "ShardInfo",
    "apply_retention",
    "checkpoint_dir",
    "export_weights",
    "inspect_checkpoint",
    "latest_valid",
    "layout_table",
    "list_checkpoints",
    "load_full",
    "read_safetensors_file",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
    "write_safetensors",
    "write_shard",
]

FORMAT = "zerotrain-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rank: int
    lo: int
    hi: int
    bytes: int
    sha256: str


# ---------------------------------------------------------------------------------------
# Durable file writes
# ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write(path: Path, chunks) -> tuple[int, str]:
    """Write chunks to a temp name, fsync, rename over `path`, fsync the directory.

    Returns (bytes, sha256 hex) of what was written.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return size, digest.hexdigest()


def write_safetensors(
    path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Durably write a safetensors file; returns (bytes, sha256)."""
    return _durable_write(Path(path), safetensors_bytes(tensors, metadata))


def read_safetensors_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (copied into memory)."""
    return read_safetensors(Path(path).read_bytes())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------------------


def layout_table(model, bounds) -> dict:
    """The layout table of `model`'s flat parameter vector cut into shards `bounds`.

    model   a Model, or its `layout`: ParamSlot-like entries (name, offset, shape, and
            trainable, taken as True when missing) in model order.
    bounds  [(lo, hi), ...] of ranks 0, 1, ... (shard_bounds of the run's world), or
            [(0, n)] for a whole vector.
    """
    entries = getattr(model, "layout", model)
    params, frozen = [], []
    for e in entries:
        name, offset, shape = e[0], int(e[1]), [int(d) for d in e[2]]
        if not (e[3] if len(e) > 3 else True):
            frozen.append({"name": name, "shape": shape})
            continue
        length = int(np.prod(shape, dtype=np.int64))
        params.append({"name": name, "shape": shape, "offset": offset, "length": length})
    n = sum(p["length"] for p in params)
    shards = []
    for rank, (lo, hi) in enumerate(bounds):
        pieces = []
        for p in params:
            start, stop = max(lo, p["offset"]), min(hi, p["offset"] + p["length"])
            if start < stop:
                pieces.append(
                    {"name": p["name"], "start": start - p["offset"],
                     "stop": stop - p["offset"], "at": start - lo}
                )  # fmt: skip
        shards.append({"rank": rank, "lo": int(lo), "hi": int(hi), "pieces": pieces})
    return {"n": n, "dtype": "float32", "order": "C", "params": params, "shards": shards,
            "frozen": frozen}  # fmt: skip


def checkpoint_dir(root, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def write_shard(
    ckpt: Path, rank: int, world: int, lo: int, hi: int, tensors: dict[str, np.ndarray], n: int
) -> ShardInfo:
    """Rank `rank`'s part: every tensor is the slice [lo, hi) of a length-n flat vector."""
    for name, arr in tensors.items():
        assert arr.shape == (hi - lo,), f"{name}: expected ({hi - lo},), got {arr.shape}"
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"shard-{rank:05d}-of-{world:05d}.safetensors"
    meta = {"format": FORMAT, "rank": rank, "world": world, "lo": lo, "hi": hi, "n": n}
    size, sha = write_safetensors(ckpt / name, tensors, meta)
    return ShardInfo(name, rank, lo, hi, size, sha)


def write_manifest(ckpt: Path, manifest: dict, shards: list[ShardInfo]) -> Path:
    """Write manifest.json last, after every shard is durable: the commit point."""
    body = dict(
        manifest, format=FORMAT, shards=[asdict(s) for s in sorted(shards, key=lambda s: s.rank)]
    )
    body.setdefault("created", time.time())
    path = Path(ckpt) / MANIFEST
    _durable_write(path, [json.dumps(body, indent=1, sort_keys=True).encode()])
    return path


def save_checkpoint(
    root, step: int, shards: list[tuple[int, int, dict[str, np.ndarray]]], n: int, manifest: dict
) -> Path:
    """Single-process convenience: write every (lo, hi, tensors) shard, then the manifest.

    `manifest` carries step, world, mode, hashes, data position, counters, metrics.
    """
    ckpt = checkpoint_dir(root, step)
    world = len(shards)
    infos = [write_shard(ckpt, r, world, lo, hi, t, n) for r, (lo, hi, t) in enumerate(shards)]
    write_manifest(ckpt, dict(manifest, step=step, world=world, n=n), infos)
    return ckpt


# ---------------------------------------------------------------------------------------
# Finding and verifying
# ---------------------------------------------------------------------------------------


def list_checkpoints(root) -> list[Path]:
    """Checkpoint directories under root, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def _read_manifest(ckpt: Path) -> dict:
    path = ckpt / MANIFEST
    if not path.exists():
        raise CheckpointError("no manifest.json (incomplete write)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"manifest.json unreadable: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"manifest.json: expected format {FORMAT!r}")
    for key in ("step", "world", "n", "shards"):
        if key not in manifest:
            raise CheckpointError(f"manifest.json: missing {key!r}")
    return manifest


def verify_checkpoint(ckpt) -> dict:
    """The manifest of a checkpoint whose every file checks out; CheckpointError otherwise.

    Checks: manifest parses; one shard per rank of its world; each file present, with the
    recorded size and SHA-256; each parses as safetensors with the recorded [lo, hi); the
    shards tile [0, n) exactly.
    """
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    shards = manifest["shards"]
    if len(shards) != manifest["world"]:
        raise CheckpointError(f"manifest lists {len(shards)} shards for world {manifest['world']}")
    pos = 0
    for s in sorted(shards, key=lambda s: s["lo"]):
        path = ckpt / s["file"]
        if not path.exists():
            raise CheckpointError(f"{s['file']}: missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise CheckpointError(
                f"{s['file']}: {size} bytes, manifest says {s['bytes']} (truncated or torn)"
            )
        if _sha256_file(path) != s["sha256"]:
            raise CheckpointError(f"{s['file']}: SHA-256 mismatch (corrupted)")
        if s["lo"] != pos:
            raise CheckpointError(f"{s['file']}: starts at {s['lo']}, expected {pos}")
        pos = s["hi"]
    if pos != manifest["n"]:
        raise CheckpointError(f"shards cover {pos} of {manifest['n']} elements")
    return manifest


@dataclass
class LatestValid:
    path: Path | None
    manifest: dict | None
    skipped: list[tuple[Path, str]]  # newer checkpoints passed over, with the reason


def latest_valid(root) -> LatestValid:
    """The newest checkpoint under root that verifies; the newer broken ones, with reasons."""
    skipped = []
    for ckpt in reversed(list_checkpoints(root)):
        try:
            return LatestValid(ckpt, verify_checkpoint(ckpt), skipped)
        except CheckpointError as err:
            skipped.append((ckpt, str(err)))
    return LatestValid(None, None, skipped)


# ---------------------------------------------------------------------------------------
# Loading and resharding
# ---------------------------------------------------------------------------------------


def load_full(ckpt, *, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, {tensor name: full-length float32 vector}) assembled from all shards.

    Take a new rank's part with `full[name][lo:hi]`, (lo, hi) = shard_bounds(n, world,
    rank) of the NEW world: that is resharding.
    """
    ckpt = Path(ckpt)
    manifest = verify_checkpoint(ckpt) if verify else _read_manifest(ckpt)
    n = manifest["n"]
    full: dict[str, np.ndarray] = {}
    for s in manifest["shards"]:
        try:
            tensors, meta = read_safetensors_file(ckpt / s["file"])
        except SafetensorsError as err:
            raise CheckpointError(f"{s['file']}: {err}") from None
        lo, hi = s["lo"], s["hi"]
        if (int(meta.get("lo", -1)), int(meta.get("hi", -1))) != (lo, hi):
            raise CheckpointError(f"{s['file']}: header range disagrees with the manifest")
        for name, arr in tensors.items():
            if arr.shape != (hi - lo,):
                raise CheckpointError(
                    f"{s['file']}: {name} has shape {arr.shape}, expected ({hi - lo},)"
                )
            full.setdefault(name, np.zeros(n, dtype=np.float32))[lo:hi] = arr
    return manifest, full


# ---------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------


def apply_retention(
    root, keep_last: int, keep_best: int = 0, best_metric: str = "loss", best_mode: str = "min"
) -> list[Path]:
    """Delete checkpoints that are neither among the newest `keep_last` valid ones nor the
    `keep_best` best by manifest["metrics"][best_metric] nor asked for by a user (manifest
    "asked": `zerotrain checkpoint` names a restore point; only its user deletes it).
    Returns what was deleted.

    Directories without a manifest are in-flight writes or torn: left alone (the writer or
    a later `latest_valid` decides), unless older than every kept checkpoint.
    """
    entries = []
    for ckpt in list_checkpoints(root):
        try:
            entries.append((ckpt, _read_manifest(ckpt)))
        except CheckpointError:
            entries.append((ckpt, None))
    valid = [(c, m) for c, m in entries if m is not None]
    keep = {c for c, _ in valid[-keep_last:]} if keep_last else set()
    if keep_best:
        scored = [(m.get("metrics", {}).get(best_metric), c) for c, m in valid]
        scored = [(v, c) for v, c in scored if isinstance(v, int | float)]
        scored.sort(key=lambda vc: vc[0], reverse=best_mode == "max")
        keep |= {c for _, c in scored[:keep_best]}
    oldest_kept = min(keep) if keep else None
    keep |= {c for c, m in valid if m.get("asked") is True}
    deleted = []
    for ckpt, manifest in entries:
        if ckpt in keep:
            continue
        if manifest is None and (oldest_kept is None or ckpt > oldest_kept):
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
        deleted.append(ckpt)
    return deleted


# ---------------------------------------------------------------------------------------
# Export and inspection
# ---------------------------------------------------------------------------------------


def export_weights(path, model, metadata: dict[str, str] | None = None) -> tuple[int, str]:
    """Write full weights by PyTorch name (`model.state_dict()`, trainable and frozen),
    with the layout table (one shard [0, n)) as JSON in the metadata under "layout".
    `model` may also be a plain state dict (then without a layout table).

    Loads with safetensors.torch.load_file into the equivalent torch module."""
    state_dict = model.state_dict() if hasattr(model, "state_dict") else model
    metadata = dict(metadata or {})
    if hasattr(model, "layout"):
        n = int(model.params.size)
        metadata["layout"] = json.dumps(layout_table(model, [(0, n)]), separators=(",", ":"))
    return write_safetensors(
        path, {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}, metadata
    )


def inspect_checkpoint(root_or_ckpt) -> list[dict]:
    """One summary dict per checkpoint (a checkpoint dir or a root of them), with its
    verification status."""
    p = Path(root_or_ckpt)
    ckpts = [p] if (p / MANIFEST).exists() or _STEP_DIR.match(p.name) else list_checkpoints(p)
    out = []
    for ckpt in ckpts:
        row = {"path": str(ckpt)}
        try:
            m = verify_checkpoint(ckpt)
            row["status"] = "ok"
        except CheckpointError as err:
            row["status"] = f"INVALID: {err}"
            try:
                m = _read_manifest(ckpt)
            except CheckpointError:
                m = {}
        for key in ("step", "world", "mode", "n", "config_hash", "metrics", "counters", "data"):
            if key in m:
                row[key] = m[key]
        if "shards" in m:
            row["bytes"] = sum(s["bytes"] for s in m["shards"])
            row["shards"] = [{k: s[k] for k in ("file", "lo", "hi", "sha256")} for s in m["shards"]]
        out.append(row)
    return out
