"""data.name = "text": UTF-8 text files as a token stream for the character LM.

    path       a file, a directory (every file under it, sorted) or a glob
    tokenizer  "bytes": a token is a byte of the UTF-8 encoding (256 ids; any text works);
               "chars": a token is a character of the training files' vocabulary (sorted
               code points; saved in the run's data.json, used by eval and generation)

Samples are windows of seq_len + 1 tokens, as for the corpus. Every file is read through
a memory map: one file with the bytes tokenizer is used as it lies on disk (nothing
copied); several files, or the chars tokenizer, are encoded once in pieces into a token
.npy in the cache, which every rank maps. Each file is checked to be UTF-8 first; a file
that is not says where (byte offset, line and byte of the line).
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np

from ._files import DataError, file_identity, map_bytes, prepared, resolve_paths

__all__ = ["TextWindows", "chars_decode", "chars_encode", "load_text"]

_PIECE = 1 << 22  # bytes decoded at a time


class TextWindows:
    """Every window of seq_len + 1 tokens of a token stream is a sample (the text
    sources and the built-in corpus alike)."""

    def __init__(self, split: str, tokens: np.ndarray, seq_len: int, meta: dict, name="text"):
        self.name, self.split, self.meta = name, split, meta
        self.arrays = {"tokens": tokens}
        self.seq_len = seq_len
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return len(self.arrays["tokens"]) - self.seq_len

    def eval_indices(self) -> np.ndarray:
        """Non-overlapping windows: every token is scored once."""
        return np.arange(0, len(self), self.seq_len)

    def take(self, idx):
        win = self.arrays["tokens"][np.asarray(idx)[:, None] + self._offsets].astype(np.int64)
        return {"x": np.ascontiguousarray(win[:, :-1]), "y": np.ascontiguousarray(win[:, 1:])}

    def __repr__(self) -> str:
        return f"<Dataset {self.name}/{self.split}: {len(self)} samples>"


def _pieces(path: Path):
    """(byte offset, str) pieces of a UTF-8 file; DataError saying where it is not UTF-8."""
    data = map_bytes(path)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    for lo in range(0, max(data.size, 1), _PIECE):
        chunk = data[lo : lo + _PIECE].tobytes()
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk, final=lo + _PIECE >= data.size)
        except UnicodeDecodeError as err:
            at = lo - pending + err.start
            line = int(np.count_nonzero(data[:at] == 10)) + 1
            nl = np.flatnonzero(data[:at] == 10)
            col = at - (int(nl[-1]) + 1 if nl.size else 0) + 1
            raise DataError(
                f"{path}: not UTF-8 at byte {at} (line {line}, byte {col} of the line): "
                f"{err.reason}; accepted: UTF-8 text"
            ) from None
        yield lo - pending, text


def check_utf8(path: Path) -> int:
    """The file's size after checking it decodes; DataError for an empty file."""
    size = map_bytes(path).size
    if size == 0:
        raise DataError(f"{path}: empty file (expected UTF-8 text)")
    for _ in _pieces(path):
        pass
    return size


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def chars_encode(text: str, vocab: str, where: str = "text") -> np.ndarray:
    """Characters -> ids into `vocab` (sorted code points); DataError naming the first
    character that is not in it."""
    table = _code_points(vocab)
    cps = _code_points(text)
    ids = np.clip(np.searchsorted(table, cps), 0, max(len(table) - 1, 0))
    bad = table[ids] != cps if table.size else np.ones(cps.shape, bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{where}: character {text[i]!r} (at character {i}) is not in the vocabulary of "
            f"the training files ({len(vocab)} characters)"
        )
    return ids


def chars_decode(ids, vocab: str) -> str:
    return "".join(vocab[int(i)] for i in np.asarray(ids).ravel())


def encode_files(paths: list[Path], vocab: str, dtype) -> np.ndarray:
    """The chars-tokenized stream of `paths` in order; DataError (file, line) for a
    character outside `vocab`."""
    parts = []
    for path in paths:
        line = 1
        for _, text in _pieces(path):
            try:
                parts.append(chars_encode(text, vocab).astype(dtype))
            except DataError:
                cps = set(vocab)
                for i, ch in enumerate(text):
                    if ch not in cps:
                        line_at = line + text.count("\n", 0, i)
                        raise DataError(
                            f"{path} line {line_at}: character {ch!r} is not in the vocabulary "
                            f"of the training files ({len(vocab)} characters)"
                        ) from None
            line += text.count("\n")
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _build(opts: dict, paths: list[Path], eval_paths: list[Path]):
    for p in paths + eval_paths:
        check_utf8(p)
    arrays, meta = {}, {"tokenizer": opts["tokenizer"], "seq_len": opts["seq_len"]}
    if opts["tokenizer"] == "bytes":
        meta["vocab_size"] = 256
        if len(paths) > 1:
            arrays["tokens"] = np.concatenate([map_bytes(p) for p in paths])
        if len(eval_paths) > 1:
            arrays["eval_tokens"] = np.concatenate([map_bytes(p) for p in eval_paths])
    else:
        seen = np.zeros(0, np.uint32)
        for path in paths:
            for _, text in _pieces(path):
                seen = np.union1d(seen, np.unique(_code_points(text)))
        vocab = "".join(map(chr, seen.tolist()))
        dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
        arrays["tokens"] = encode_files(paths, vocab, dtype)
        if eval_paths:
            arrays["eval_tokens"] = encode_files(eval_paths, vocab, dtype)
        meta.update(vocab=vocab, vocab_size=len(vocab))
    meta["files"] = [file_identity(p) for p in paths + eval_paths]
    return arrays, meta


def load_text(data_cfg, split: str, paths: list[Path] | None = None) -> TextWindows:
    """The `split` of the text data_cfg names; `paths`: the files to read instead of
    data.path's (a followed directory's files of one epoch, see _follow)."""
    opts = data_cfg.options
    paths = list(paths) if paths else resolve_paths(opts["path"], "data.path")
    eval_paths = resolve_paths(opts["eval_path"], "data.eval_path") if opts["eval_path"] else []
    arrays, meta = prepared(
        "text",
        opts,
        paths + eval_paths,
        data_cfg.cache_dir,
        lambda: _build(opts, paths, eval_paths),
    )
    tokens = arrays.get("tokens")
    if tokens is None:
        tokens = map_bytes(paths[0])
    seq_len = opts["seq_len"]
    if eval_paths:
        if split == "eval":
            tokens = arrays.get("eval_tokens")
            if tokens is None:
                tokens = map_bytes(eval_paths[0])
        where = opts["eval_path"] if split == "eval" else opts["path"]
    else:
        cut = int(len(tokens) * (1.0 - opts["eval_fraction"]))
        tokens = tokens[:cut] if split == "train" else tokens[cut:]
        where = f"{opts['path']} ({'the first' if split == 'train' else 'the last'} share)"
    if len(tokens) <= seq_len:
        raise DataError(
            f"{where}: the {split} text has {len(tokens)} tokens; a sample needs data.seq_len "
            f"+ 1 = {seq_len + 1}"
        )
    return TextWindows(split, tokens, seq_len, meta)
