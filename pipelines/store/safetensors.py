"""A small safetensors writer and reader in numpy (no runtime dependency on the package).

The format (https://github.com/huggingface/safetensors, "Format"):

    8 bytes     N, the header size, unsigned little-endian
    N bytes     UTF-8 JSON: {name: {"dtype": "F32", "shape": [...], "data_offsets":
                [begin, end]}, ..., "__metadata__": {str: str}}, padded with spaces
    rest        the tensors' raw little-endian bytes; offsets are relative to here

Tensors are laid out contiguously in name order, and the header is padded so the data
starts 8-byte aligned. The reader checks what the reference implementation checks: the
header parses, offsets are in order, contiguous, cover the buffer exactly, and agree with
dtype x shape — so a truncated or torn file is an error, never garbage.
"""

from __future__ import annotations

import json
import struct

import numpy as np

__all__ = ["SafetensorsError", "read_safetensors", "safetensors_bytes"]

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says why."""


def safetensors_bytes(
    tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> list[bytes | memoryview]:
    """The file as a list of chunks (header, then each tensor's bytes): write them in order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        code = _CODES.get(arr.dtype)
        if code is None:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors code")
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        chunks.append(memoryview(arr.reshape(-1)).cast("B"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return [struct.pack("<Q", len(raw)) + raw, *chunks]


def read_safetensors(
    data: bytes | memoryview | np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) from a file's bytes; tensors are read-only views of `data`."""
    buf = memoryview(data).cast("B")
    if len(buf) < 8:
        raise SafetensorsError(f"file of {len(buf)} bytes is shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > _MAX_HEADER or 8 + n > len(buf):
        raise SafetensorsError(f"header size {n} exceeds the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    body = buf[8 + n :]
    entries = []
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{name}: malformed tensor entry {info!r}") from None
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(
                f"{name}: data_offsets [{begin}, {end}] do not match {info['dtype']} {list(shape)}"
            )
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise SafetensorsError(
                f"{name}: data starts at {begin}, expected {pos} (gap or overlap)"
            )
        pos = end
    if pos != len(body):
        raise SafetensorsError(
            f"tensors cover {pos} bytes but the file holds {len(body)} "
            "(truncated or trailing bytes)"
        )
    tensors = {
        name: np.frombuffer(body[b:e], dtype=dt).reshape(sh) for b, e, name, dt, sh in entries
    }
    return tensors, dict(metadata)
