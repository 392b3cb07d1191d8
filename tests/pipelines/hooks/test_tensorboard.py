"""Event files: framing and messages checked by an independent decoder, then by TensorBoard.

The decoder here shares no code with pipelines.hooks.tensorboard: a bit-at-a-time CRC-32C and
a generic protobuf wire-format reader.
"""

import math
import struct

import numpy as np
import pytest

from pipelines.hooks.tensorboard import EventWriter, crc32c, masked_crc32c, read_records

# ---- an independent reader -----------------------------------------------------------


def crc32c_bitwise(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def unmask(masked):
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot << 15) | (rot >> 17)) & 0xFFFFFFFF


def tfrecords(data):
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert unmask(len_crc) == crc32c_bitwise(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert unmask(data_crc) == crc32c_bitwise(payload)
        yield payload
        pos += 16 + length


def fields(message):
    """{field number: [values]}: ints for varints, bytes otherwise."""
    out, pos = {}, 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            byte = message[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = message[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = message[pos : pos + 4], pos + 4
        else:
            assert wire == 2, f"unexpected wire type {wire}"
            n = varint()
            value, pos = message[pos : pos + n], pos + n
        out.setdefault(number, []).append(value)
    return out


def decode_event(payload):
    f = fields(payload)
    event = {"wall_time": struct.unpack("<d", f[1][0])[0], "step": f.get(2, [0])[0]}
    if 3 in f:
        event["file_version"] = f[3][0].decode()
    event["values"] = {}
    for raw in fields(f[5][0]).get(1, []) if 5 in f else []:
        v = fields(raw)
        tag = v[1][0].decode()
        if 2 in v:
            event["values"][tag] = struct.unpack("<f", v[2][0])[0]
        else:
            h = fields(v[5][0])
            event["values"][tag] = {
                "stats": [struct.unpack("<d", h[i][0])[0] for i in range(1, 6)],
                "limits": np.frombuffer(h[6][0], "<f8").tolist(),
                "buckets": np.frombuffer(h[7][0], "<f8").tolist(),
            }
    return event


# ---- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, crc",
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (bytes([0xFF] * 32), 0x62A8AB43),
    ],
)
def test_crc32c_matches_the_published_check_values(data, crc):
    assert crc32c(data) == crc == crc32c_bitwise(data)


def test_the_masked_crc_undoes_with_the_inverse_rotation():
    assert unmask(masked_crc32c(b"zerotrain")) == crc32c(b"zerotrain")


def records_fixture():
    return [
        {
            "step": 4,
            "hook": "grad_norm",
            "kind": "analyzer",
            "metrics": {"global": 1.5, "nan": None},
        },
        {"step": 4, "hook": "broken", "kind": "analyzer", "error": "ZeroDivisionError: x"},
        {
            "step": 8,
            "hook": "grad_distribution",
            "kind": "analyzer",
            "metrics": {"hist": {"edges": [0.0, 1.0, 2.0], "counts": [3, 5]}, "m": [[1.0, 2.0]]},
        },
        {"step": 9, "hook": "clip", "kind": "transform", "rank": 1, "metrics": {"clipped": 2}},
    ]


def write_run(logdir):
    clock = iter(1000.0 + i for i in range(100)).__next__
    with EventWriter(logdir, clock=clock) as tb:
        tb.add_scalar("loss", 2.5, step=0)
        tb.add_scalar("loss", 2.0, step=1)
        tb.write(records_fixture())
        tb.add_values("weights", np.arange(10.0), step=3, bins=5)
    return tb.path


def test_event_files_decode_with_an_independent_parser(tmp_path):
    path = write_run(tmp_path)
    assert "tfevents" in path.name
    events = [decode_event(p) for p in tfrecords(path.read_bytes())]
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["values"] == {}
    assert [(e["step"], e["values"]) for e in events[1:3]] == [
        (0, {"loss": 2.5}),
        (1, {"loss": 2.0}),
    ]
    assert events[1]["wall_time"] == 1002.0  # the clock, read once per event
    norm = events[3]
    assert norm["step"] == 4 and norm["values"]["grad_norm/global"] == 1.5
    assert math.isnan(norm["values"]["grad_norm/nan"])
    hist = events[4]["values"]["grad_distribution/hist"]
    assert hist["limits"] == [0.0, 1.0, 2.0] and hist["buckets"] == [0.0, 3.0, 5.0]
    assert hist["stats"][2] == 8.0  # num
    assert "grad_distribution/m" in events[4]["values"]
    assert events[5]["values"] == {"clip/rank1/clipped": 2.0}
    assert events[6]["values"]["weights"]["stats"][:3] == [0.0, 9.0, 10.0]
    assert len(events) == 7  # the error record wrote nothing
    assert list(read_records(path)) == list(tfrecords(path.read_bytes()))


def test_a_corrupted_record_is_detected(tmp_path):
    path = write_run(tmp_path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data CRC"):
        list(read_records(path))


def test_real_tensorboard_reads_the_scalars_and_histograms(tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard absent"
    )
    write_run(tmp_path)
    acc = accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "grad_norm/global", "clip/rank1/clipped"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 2.5), (1, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm/global")] == [(4, 1.5)]
    assert "grad_distribution/hist" in tags["histograms"]
    (event,) = acc.Histograms("grad_distribution/hist")
    assert event.step == 8
    assert list(event.histogram_value.bucket_limit) == [0.0, 1.0, 2.0]
    assert list(event.histogram_value.bucket) == [0.0, 3.0, 5.0]
