"""The frame codec: round trips, zero-copy views, and a fuzzed untrusted boundary."""

import random
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors._frames import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    FrameError,
    Limits,
    Message,
    decode,
    encode,
)

# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
nested = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(max_size=10), nested, max_size=5)
tensors = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda name: hnp.arrays(
        DTYPES[name], hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)
messages = st.builds(
    Message,
    type=st.text(min_size=1, max_size=30),
    sender=st.text(max_size=30),
    generation=st.integers(0, 2**63 - 1),
    step=st.integers(-(2**63), 2**63 - 1),
    seq=st.integers(0, 2**64 - 1),
    body=bodies,
    tensors=st.lists(tensors, max_size=4),
)


def wire(frames):
    """What a receiver gets: every frame as its own bytes object."""
    return [bytes(f) for f in frames]


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_valid_message_round_trips_through_encode_and_decode(msg):
    assert decode(wire(encode(msg))) == msg


def test_encode_hands_over_the_arrays_own_buffer():
    array = np.arange(1000, dtype=np.float32)
    frames = encode(Message("grad", tensors=[array]))
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), array)


def test_decoded_tensors_are_writable_views_of_the_received_frames():
    frames = [bytes(encode(Message("grad"))[0]), bytearray(np.arange(8, dtype="<f8").tobytes())]
    header = msgpack.unpackb(frames[0])
    header["tensors"] = [["float64", [2, 4], 1, 0, 64]]
    frames[0] = msgpack.packb(header)
    tensor = decode(frames).tensors[0]
    assert tensor.shape == (2, 4) and tensor.flags.writeable
    assert np.shares_memory(tensor, np.frombuffer(frames[1], np.uint8))


def test_several_tensors_may_share_one_frame_at_aligned_offsets():
    # encode uses a frame per tensor; the format also allows packing (decode accepts it)
    data = np.arange(10, dtype="<f4").tobytes() + np.arange(3, dtype="<i8").tobytes()
    header = msgpack.unpackb(encode(Message("packed"))[0])
    header["tensors"] = [["int64", [3], 1, 40, 24], ["float32", [2, 5], 1, 0, 40]]
    got = decode([msgpack.packb(header), data]).tensors
    assert got[0].tolist() == [0, 1, 2] and got[1].ravel().tolist() == list(range(10))


def test_a_misaligned_frame_is_copied_into_an_aligned_array():
    storage = bytearray(8 * 4 + 1)
    misaligned = memoryview(storage)[1:]
    misaligned[:] = np.arange(8, dtype="<f4").tobytes()
    header = msgpack.unpackb(encode(Message("grad"))[0])
    header["tensors"] = [["float32", [8], 1, 0, 32]]
    tensor = decode([msgpack.packb(header), misaligned]).tensors[0]
    assert tensor.flags.aligned
    assert tensor.tolist() == list(range(8))


def test_non_contiguous_and_big_endian_tensors_arrive_as_little_endian_copies():
    strided = np.arange(12, dtype=np.int32).reshape(3, 4).T
    big_endian = np.arange(5, dtype=">f8")
    got = decode(wire(encode(Message("x", tensors=[strided, big_endian])))).tensors
    assert got[0].tolist() == strided.tolist() and got[0].dtype == np.dtype("<i4")
    assert got[1].tolist() == big_endian.tolist() and got[1].dtype == np.dtype("<f8")


@pytest.mark.parametrize(
    "msg, complaint",
    [
        (Message(""), "type"),
        (Message("x", generation=2**64), "generation"),
        (Message("x", step=True), "step"),
        (Message("x", body=[]), "body"),
        (Message("x", body={1: 2}), "keys must be str"),
        (Message("x", body={"a": {b"k": 1}}), "keys must be str"),
        (Message("x", body={"a": (1, 2)}), "tuple"),
        (Message("x", body={"a": 2**70}), "range"),
        (Message("x", body={"a": np.float32(1)}), "float32"),
        (Message("x", tensors=[np.zeros(2, dtype="datetime64[s]")]), "accepted"),
        (Message("x", tensors=[np.zeros((1,) * 9)]), "9 dims"),
        (Message("x", tensors=[[1.0, 2.0]]), "numpy array"),
        # over what a peer's decode accepts (DEFAULT_LIMITS): refused, not sent to be lost
        (Message("x", body={"a": [0] * 65537}), "list of 65537 items; at most 65536"),
        (Message("x", body={"a": dict.fromkeys(map(str, range(4097)))}), "map of 4097"),
        (Message("x", body={"a": b"x" * (1 << 20)}), r"header is \d+ bytes; .* at most 1048576"),
        (Message("x", body={"a": "y" * (1 << 20)}), "header is"),
        (Message("x", tensors=[np.zeros(1)] * 1025), "1025 tensors; at most 1024"),
    ],
)
def test_encode_refuses_what_a_peer_could_not_decode(msg, complaint):
    with pytest.raises((TypeError, ValueError), match=complaint):
        encode(msg)


def test_encode_refuses_a_tensor_over_the_frame_cap_that_would_drop_the_connection():
    from actors._frames import MAX_FRAME_BYTES
    from actors._transport import DEFAULT_SOCKET_OPTIONS

    assert DEFAULT_SOCKET_OPTIONS["MAXMSGSIZE"] == MAX_FRAME_BYTES  # one number, both ends
    encode(Message("t", tensors=[np.zeros(MAX_FRAME_BYTES, np.uint8)]))  # (lazy zeros)
    too_big = np.zeros(MAX_FRAME_BYTES + 1, np.uint8)
    with pytest.raises(ValueError, match=r"tensors\[0\] is 67108865 bytes, over the 67108864"):
        encode(Message("t", tensors=[too_big]))


# ----------------------------------------------------------------------------------------
# Rejections, one reason each
# ----------------------------------------------------------------------------------------


def valid_frames():
    msg = Message("grad", "rank0", 1, 2, 3, {"k": [1]}, [np.arange(6, dtype=np.float32)])
    return wire(encode(msg))


def with_header(**changes):
    frames = valid_frames()
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
    frames[0] = msgpack.packb(header)
    return frames


REJECTED = {
    "no frames": ([], "frame count"),
    "too many frames": ([b""] * (DEFAULT_LIMITS.max_frames + 1), "frame count"),
    "not a frame": ([object()], "not a buffer"),
    "truncated header": ([valid_frames()[0][:-3], valid_frames()[1]], "not valid msgpack"),
    "trailing bytes": ([valid_frames()[0] + b"\x00", valid_frames()[1]], "not valid msgpack"),
    "header not a map": ([msgpack.packb([1, 2])], "must be a map"),
    "unknown key": (with_header(extra=1), "keys"),
    "missing key": (with_header(seq=KeyError), "keys"),
    "wrong version": (with_header(v=PROTOCOL_VERSION + 1), "protocol version"),
    "version as bool": (with_header(v=True), "protocol version"),
    "type not a str": (with_header(type=b"grad"), "type must be a str"),
    "empty type": (with_header(type=""), "type must have"),
    "step not an int": (with_header(step=1.5), "step must be an int"),
    "body not a map": (with_header(body=[1]), "body must be a map"),
    "bytes key in body": (with_header(body={"a": {b"k": 1}}), "keys must be str"),
    "deep body": (
        with_header(
            body={"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
        ),
        "deeper",
    ),  # fmt: skip
    "ext type": ([msgpack.packb(msgpack.ExtType(5, b"x"))], "ext"),
    "timestamp in body": (with_header(body={"t": msgpack.Timestamp(1)}), "ext"),
    "unknown dtype": (with_header(tensors=[["object", [6], 1, 0, 24]]), "dtype"),
    "descriptor too short": (with_header(tensors=[["float32", [6], 1, 0]]), "descriptor"),
    "too many dims": (with_header(tensors=[["float32", [1] * 9, 1, 0, 4]]), "shape"),
    "negative dim": (with_header(tensors=[["float32", [-6], 1, 0, 24]]), "ints >= 0"),
    "nbytes mismatch": (with_header(tensors=[["float32", [6], 1, 0, 20]]), "nbytes"),
    "frame index 0": (with_header(tensors=[["float32", [6], 0, 0, 24]]), "frame 0"),
    "frame index past the end": (with_header(tensors=[["float32", [6], 2, 0, 24]]), "frame 2"),
    "misaligned offset": (with_header(tensors=[["float32", [5], 1, 2, 20]]), "offset"),
    "out of bounds": (with_header(tensors=[["float32", [6], 1, 4, 24]]), "past the end"),
    "overlap": (with_header(tensors=[["float32", [6], 1, 0, 24]] * 2), "overlap"),
    "unused frame": (with_header(tensors=[]), "carry no tensor"),
    "huge shape": (with_header(tensors=[["float32", [2**40, 2**40], 1, 0, 24]]), "nbytes"),
}


@pytest.mark.parametrize("frames, reason", REJECTED.values(), ids=REJECTED.keys())
def test_decode_rejects_a_malformed_message_with_a_reason(frames, reason):
    with pytest.raises(FrameError, match=reason) as info:
        decode(frames)
    assert info.value.reason == str(info.value)


def test_limits_bound_the_header_size_and_the_number_of_tensors():
    frames = valid_frames()
    with pytest.raises(FrameError, match="header of"):
        decode(frames, Limits(max_header_bytes=len(frames[0]) - 1))
    with pytest.raises(FrameError, match="frame count"):
        decode(frames, Limits(max_tensors=0))
    big_body = wire(encode(Message("x", body={"s": "y" * 100})))
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode(big_body, Limits(max_str_len=99))


# ----------------------------------------------------------------------------------------
# Fuzz: anything either decodes to a valid message or raises FrameError, quickly
# ----------------------------------------------------------------------------------------

SEEDS = [
    Message("grad", "rank0", 1, 2, 3, {"k": [1, 2.5, None, b"x", {"n": "v"}]},
            [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0, 3)), np.array(True)]),
    Message("ping", body={"request": 7}),
    Message("shard", tensors=[np.arange(17, dtype=np.int16), np.ones(3, np.complex64)]),
]  # fmt: skip
HEADER_VALUES = [None, True, -1, 0, 1, 2**63, 2**64 - 1, 1.5, "", "x", b"x", [], {}, [1, 2],
                 {"a": 1}, "float32", [2, 3], [-1], [2**40]]  # fmt: skip


def mutate(rng: random.Random, frames: list[bytes]) -> list:
    frames = list(frames)
    kind = rng.randrange(8)
    if not frames:
        return [rng.randbytes(rng.randrange(64))]
    if kind == 0:  # flip bits anywhere
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(data)
    elif kind == 1:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif kind == 2:  # drop, duplicate or add frames
        if rng.random() < 0.4 and frames:
            del frames[rng.randrange(len(frames))]
        elif rng.random() < 0.5:
            frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
        else:
            frames.append(rng.randbytes(rng.randrange(40)))
    elif kind in (3, 4):  # change one header field (or one descriptor field)
        try:
            header = msgpack.unpackb(frames[0])
        except Exception:  # an earlier mutation broke it: just flip a byte instead
            return mutate(rng, frames) if rng.random() < 0.5 else frames[:1]
        if not isinstance(header, dict) or not header:
            return frames
        key = rng.choice(sorted(header))
        descs = header.get("tensors")
        if key == "tensors" and descs and isinstance(descs, list) and rng.random() < 0.7:
            desc = rng.choice(descs)
            if isinstance(desc, list) and desc:
                desc[rng.randrange(len(desc))] = rng.choice(HEADER_VALUES + [rng.randrange(-8, 64)])
        else:
            header[key] = rng.choice(HEADER_VALUES)
        frames[0] = msgpack.packb(header)
    elif kind == 5:  # random bytes as a header
        frames[0] = rng.randbytes(rng.randrange(64))
    elif kind == 6:  # splice random bytes into the header
        at = rng.randrange(len(frames[0]) + 1)
        frames[0] = frames[0][:at] + rng.randbytes(rng.randint(1, 8)) + frames[0][at:]
    else:  # entirely random frames
        frames = [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(5))]
    return frames


def check_valid(msg: Message) -> None:
    assert isinstance(msg, Message) and msg.type and isinstance(msg.body, dict)
    for tensor in msg.tensors:
        assert tensor.dtype in DTYPES.values() and tensor.ndim <= 8 and tensor.flags.aligned
    assert decode(wire(encode(msg))) == msg  # it is exactly what some valid message holds


def test_decode_survives_thirty_thousand_random_and_mutated_messages():
    rng = random.Random(20240611)
    seeds = [wire(encode(m)) for m in SEEDS]
    outcomes = {"rejected": 0, "accepted": 0}
    started = time.process_time()
    for i in range(30_000):
        frames = mutate(rng, rng.choice(seeds))
        if i % 3 == 0:  # mutations of mutations reach further
            frames = mutate(rng, frames)
        try:
            msg = decode(frames)
        except FrameError:
            outcomes["rejected"] += 1
        else:
            check_valid(msg)
            outcomes["accepted"] += 1
    assert outcomes["rejected"] > 20_000 and outcomes["accepted"] > 1_000, outcomes
    assert time.process_time() - started < 120, "decode must stay cheap on hostile input"
