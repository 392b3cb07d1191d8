"""TensorBoard event files, written without tensorboard or tensorflow.

An event file is a sequence of TFRecords, each framing one serialised `Event` protobuf:

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

all little-endian, where masked_crc32c(x) = rotate_right(crc32c(x), 15) + 0xa282ead8
(mod 2^32) and CRC-32C is the Castagnoli CRC (reflected polynomial 0x82f63b78) — see
tensorflow/core/lib/hash/crc32c.h and tensorflow/core/lib/io/record_writer.cc.

The messages, hand-encoded (tensorflow/core/util/event.proto, framework/summary.proto):

    Event            1 wall_time double | 2 step int64 | 3 file_version string
                     | 5 summary Summary
    Summary          1 value repeated Summary.Value
    Summary.Value    1 tag string | 2 simple_value float | 5 histo HistogramProto
    HistogramProto   1 min | 2 max | 3 num | 4 sum | 5 sum_squares (doubles)
                     | 6 bucket_limit packed double | 7 bucket packed double

The first record of a file carries file_version "brain.Event:2"; TensorBoard maps
simple_value and histo to its scalar and histogram dashboards itself. The file name
must contain "tfevents". `read_records` undoes the framing (checking both CRCs).

    with EventWriter("runs/x/tb") as tb:
        tb.add_scalar("loss", 2.3, step=0)
        tb.write(records)          # hook records, as AnalyzerRunner produces them
"""

import math
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

__all__ = [
    "FILE_VERSION",
    "EventWriter",
    "crc32c",
    "encode_event",
    "frame_record",
    "histogram_value",
    "masked_crc32c",
    "read_records",
    "scalar_value",
]

FILE_VERSION = "brain.Event:2"

# ---- CRC-32C -------------------------------------------------------------------------


def _crc32c_table():
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of `data` (continuing from `crc`), table-driven, one byte at a time."""
    table = _TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: the CRC rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord around `data`."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# ---- protobuf encoding ---------------------------------------------------------------
# Wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 negatives: two's complement, ten bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field, wire):
    return _varint(field << 3 | wire)


def _double(field, x):
    return _key(field, 1) + struct.pack("<d", x)


def _float(field, x):
    return _key(field, 5) + struct.pack("<f", x)


def _int64(field, n):
    return _key(field, 0) + _varint(n)


def _bytes(field, data):
    return _key(field, 2) + _varint(len(data)) + data


def _packed_doubles(field, values):
    return _bytes(field, np.asarray(values, dtype="<f8").tobytes())


def encode_event(step, wall_time, *, file_version=None, values=()) -> bytes:
    """A serialised Event; `values` are serialised Summary.Value messages."""
    out = _double(1, wall_time) + _int64(2, int(step))
    if file_version is not None:
        out += _bytes(3, file_version.encode())
    if values:
        out += _bytes(5, b"".join(_bytes(1, v) for v in values))
    return out


def scalar_value(tag: str, value: float) -> bytes:
    """A Summary.Value holding one scalar (stored as float32)."""
    return _bytes(1, tag.encode()) + _float(2, float(value))


def histogram_value(tag: str, edges, counts, *, stats=None) -> bytes:
    """A Summary.Value holding a histogram of `counts` over bins with `edges`.

    TensorBoard buckets are (previous limit, limit]; a leading empty bucket ending at
    edges[0] makes the first real bucket start there. `stats` is (min, max, num, sum,
    sum_squares) of the values when known, else estimated from bin centres.
    """
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    assert edges.size == counts.size + 1, (
        f"need len(edges) == len(counts) + 1, got {edges.size}, {counts.size}"
    )
    if stats is None:
        centres = (edges[:-1] + edges[1:]) / 2
        stats = (
            edges[0],
            edges[-1],
            counts.sum(),
            float(centres @ counts),
            float((centres**2) @ counts),
        )
    histo = b"".join(_double(i + 1, float(x)) for i, x in enumerate(stats))
    histo += _packed_doubles(6, edges) + _packed_doubles(7, np.concatenate([[0.0], counts]))
    return _bytes(1, tag.encode()) + _bytes(5, histo)


# ---- the writer ----------------------------------------------------------------------


class EventWriter:
    """Appends events to a new event file in `logdir`; a sink for hook records.

    Each writer makes its own file (TensorBoard reads every tfevents file of a folder),
    so a restarted analyzer never appends to a file another process holds. Records are
    flushed on `flush()`, after every `write(records)`, and on `close()`.
    """

    _count = 0

    def __init__(self, logdir, *, suffix: str = "", clock=time.time):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        EventWriter._count += 1
        name = (
            f"events.out.tfevents.{int(clock()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{EventWriter._count}{suffix}"
        )
        self.path = self.logdir / name
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._emit(encode_event(0, clock(), file_version=FILE_VERSION))

    def _emit(self, event: bytes):
        self._file.write(frame_record(event))

    def add_scalar(self, tag: str, value: float, step: int, wall_time=None):
        self._emit(encode_event(step, wall_time or self.clock(), values=[scalar_value(tag, value)]))

    def add_histogram(self, tag: str, edges, counts, step: int, wall_time=None):
        """A histogram from fixed bins: len(edges) == len(counts) + 1."""
        value = histogram_value(tag, edges, counts)
        self._emit(encode_event(step, wall_time or self.clock(), values=[value]))

    def add_values(self, tag: str, values, step: int, bins: int = 30, wall_time=None):
        """A histogram of raw values (nan ignored), with `bins` equal bins over their range."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        counts, edges = np.histogram(values, bins=bins)
        stats = (values.min(), values.max(), values.size, values.sum(), values @ values)
        value = histogram_value(tag, edges, counts, stats=stats)
        self._emit(encode_event(step, wall_time or self.clock(), values=[value]))

    def write(self, records):
        """Sink for hook records: scalars as scalars, Histograms and arrays as histograms.

        Tags are "<hook>/<metric>" ("<hook>/rank<r>/<metric>" for a transform's record);
        error records are skipped; null (nan) is written as nan.
        """
        now = self.clock()
        for record in records:
            metrics = record.get("metrics")
            if not metrics:
                continue
            prefix = record["hook"] + (f"/rank{record['rank']}" if "rank" in record else "")
            values = []
            for name, value in metrics.items():
                tag = f"{prefix}/{name}"
                if value is None or isinstance(value, int | float):
                    values.append(scalar_value(tag, math.nan if value is None else value))
                elif isinstance(value, dict) and set(value) == {"edges", "counts"}:
                    values.append(histogram_value(tag, value["edges"], value["counts"]))
                elif isinstance(value, list):
                    flat = np.asarray(value, dtype=np.float64).reshape(-1)  # None -> nan
                    flat = flat[np.isfinite(flat)]
                    if flat.size:
                        counts, edges = np.histogram(flat, bins=min(30, flat.size))
                        stats = (flat.min(), flat.max(), flat.size, flat.sum(), flat @ flat)
                        values.append(histogram_value(tag, edges, counts, stats=stats))
            if values:
                self._emit(encode_event(record["step"], now, values=values))
        self.flush()

    def flush(self):
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- reading back --------------------------------------------------------------------


def read_records(path):
    """The payloads of a TFRecord file; ValueError on a bad length or data CRC."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12 : pos + 12 + length]
        end = pos + 12 + length
        if len(payload) != length or end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        (crc,) = struct.unpack("<I", data[end : end + 4])
        if crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        yield payload
        pos = end + 4
