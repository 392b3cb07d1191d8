"""The run directory: what a run leaves behind, and its progress display.

    <run dir>/
      config.json       the resolved config, its config_hash and resume_hash
      data.json         the data's record: dataset name and meta (for the user's files:
                        each file's path, size and SHA-256; classes, vocabulary,
                        standardisation -- what predict, generate and eval read back)
      metrics.jsonl     one JSON object per optimizer step: step (1-based count of steps
                        done), loss, lr, grad_norm, samples_per_s, skipped (this step was
                        skipped for a non-finite gradient), plus eval results when evaluated
      checkpoints/      see pipelines.store.checkpoint
      summary.json      final_loss, eval, steps, ranks, mode, seed, wall_s, samples_per_s,
                        restarts, skipped_steps, params_sha256, memory (per rank, bytes),
                        config_hash, stopped_early, status
      weights.safetensors  the final weights by PyTorch parameter name
      hooks.jsonl       hook outputs, when hooks are loaded

Every file a reader may open while the run goes on is appended line by line (jsonl) or
replaced atomically (json), so a reader never sees half a record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["Progress", "RunDir", "default_run_dir", "params_sha256"]


def default_run_dir(pipeline: str, root: str | Path = "runs") -> Path:
    """runs/<pipeline>-<YYYYmmdd-HHMMSS>[-k], a directory that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{pipeline}-{stamp}"
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def params_sha256(model) -> str:
    """SHA-256 of every parameter as float32 little-endian bytes, in named_parameters
    order (the number issue 4 compares across runs)."""
    digest = hashlib.sha256()
    for _, arr in model.named_parameters():
        digest.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return digest.hexdigest()


def _jsonable(obj):
    """Floats that JSON cannot carry (nan, inf) become null; numpy scalars become Python."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self._hooks = None

    def checkpoints(self, sub: str = "checkpoints") -> Path:
        return self.path / sub

    def write_config(self, cfg, config_hash: str, resume_hash: str) -> None:
        write_json_atomic(
            self.path / "config.json",
            {"config": cfg.to_dict(), "config_hash": config_hash, "resume_hash": resume_hash},
        )

    def write_data(self, record: dict) -> None:
        write_json_atomic(self.path / "data.json", record)

    def log_step(self, record: dict) -> None:
        self._metrics.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def log_hook(self, record: dict) -> None:
        if self._hooks is None:
            self._hooks = open(self.path / "hooks.jsonl", "a", buffering=1)
        self._hooks.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def close(self) -> None:
        self._metrics.close()
        if self._hooks is not None:
            self._hooks.close()


class Progress:
    """A one-line bar redrawn in place on a terminal; plain periodic lines otherwise.

    `every` is the step interval of plain lines (the bar redraws at most 10 times a second).
    """

    def __init__(self, total: int, every: int, out=None, prefix: str = ""):
        self.total, self.every, self.prefix = total, max(every, 1), prefix
        self.out = out if out is not None else sys.stderr
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._last_draw = 0.0

    def update(
        self, step: int, loss: float, lr: float, samples_per_s: float, extra: str = ""
    ) -> None:
        text = (
            f"{self.prefix}step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"{samples_per_s:,.0f} samples/s{extra}"
        )
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.1 and step != self.total:
                return
            self._last_draw = now
            width = 24
            done = int(width * step / self.total)
            bar = "#" * done + "-" * (width - done)
            self.out.write(f"\r[{bar}] {text}\x1b[K")
            if step == self.total:
                self.out.write("\n")
            self.out.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            self.out.write(text + "\n")
            self.out.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        self.out.write(self.prefix + text + "\n")
        self.out.flush()
