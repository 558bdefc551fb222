"""mmcore.distributed without processes: the frame protocol, payloads, auth and configs."""

from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import PROPERTY_SETTINGS, examples
from mmcore import Modality
from mmcore.distributed import DistributedConfig, ShardingStrategy
from mmcore.distributed.auth import TOKEN_ENV, client_handshake, resolve_token, server_handshake
from mmcore.distributed.config import parse_address
from mmcore.distributed.payload import MAX_ITEMS, pack_input, unpack_input
from mmcore.distributed.protocol import (
    ALLOWED_DTYPES,
    HEADER,
    MAGIC,
    VERSION,
    ConnectionClosed,
    Frame,
    FrameLimits,
    MsgType,
    decode_frame,
    encode_frame,
    recv_frame,
    send_frame,
)
from mmcore.errors import AuthError, ConfigError, ProtocolError, ShapeError


def _bytes(bufs):
    return b"".join(bytes(b) for b in bufs)


def _frame(msg_type=MsgType.ENCODE, header=None, arrays=()):
    return _bytes(encode_frame(msg_type, header, arrays))


def _raw_frame(header_obj, payload=b"", msg_type=MsgType.ENCODE, *, magic=MAGIC,
               version=VERSION):
    js = json.dumps(header_obj).encode()
    return HEADER.pack(magic, version, int(msg_type), 0, len(js), len(payload)) + js + payload


# -- encode / decode -----------------------------------------------------------------------------


def test_header_layout():
    data = _frame(MsgType.HEALTH, {"id": "x"})
    magic, version, mtype, flags, jlen, plen = HEADER.unpack(data[:20])
    assert HEADER.size == 20
    assert (magic, version, mtype, flags, plen) == (b"MMCF", 1, MsgType.HEALTH, 0, 0)
    assert json.loads(data[20:20 + jlen]) == {"id": "x", "arrays": []}
    assert len(data) == 20 + jlen


def test_roundtrip_basic_dtypes_and_alignment():
    arrays = [np.arange(3, dtype=np.uint8), np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
              np.array([True, False]), np.arange(4, dtype=np.int64).reshape(2, 2, 1),
              np.float16(1.5) * np.ones((2,), np.float16)]
    data = _frame(MsgType.RESULT, {"id": 7, "stats": {"a": 1.5}}, arrays)
    f = decode_frame(data)
    assert f.type == MsgType.RESULT and f.flags == 0
    assert f.header == {"id": 7, "stats": {"a": 1.5}}
    jlen = HEADER.unpack(data[:20])[4]
    for d in json.loads(data[20:20 + jlen])["arrays"]:
        assert d["offset"] % 64 == 0
    for a, b in zip(arrays, f.arrays):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_zero_d_and_empty_arrays_keep_their_shape():
    arrays = [np.array(3.5, np.float64), np.array(True), np.zeros((0, 3), np.float32),
              np.zeros((2, 0, 4), np.int8), np.zeros((0,), np.uint16)]
    f = decode_frame(_frame(MsgType.RESULT, {}, arrays))
    assert [a.shape for a in f.arrays] == [(), (), (0, 3), (2, 0, 4), (0,)]
    assert f.arrays[0] == 3.5 and bool(f.arrays[1]) is True


def test_big_endian_and_non_contiguous_arrays_are_converted():
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    b = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    f = decode_frame(_frame(MsgType.RESULT, {}, [a, b]))
    assert f.arrays[0].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(f.arrays[0], a)
    np.testing.assert_array_equal(f.arrays[1], b)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([object()], dtype=object),
                                 np.zeros(2, np.complex64), np.zeros(2, "datetime64[s]"),
                                 np.zeros(2, [("a", "<i4")])])
def test_encode_refuses_dtypes_outside_the_allow_list(bad):
    with pytest.raises(ProtocolError, match="dtype"):
        encode_frame(MsgType.RESULT, {}, [bad])


def test_encode_refuses_bad_headers():
    with pytest.raises(ProtocolError, match="arrays"):
        encode_frame(MsgType.RESULT, {"arrays": []})
    with pytest.raises(ProtocolError, match="JSON"):
        encode_frame(MsgType.RESULT, {"x": object()})
    with pytest.raises(ProtocolError, match="JSON"):
        encode_frame(MsgType.RESULT, {"x": float("nan")})


def test_decoded_arrays_do_not_alias_the_input():
    data = bytearray(_frame(MsgType.RESULT, {}, [np.arange(4, dtype=np.uint8)]))
    f = decode_frame(data)
    data[-1] = 99
    assert f.arrays[0].tolist() == [0, 1, 2, 3]


def test_decode_accepts_memoryview_and_bytearray():
    data = _frame(MsgType.HEALTH, {"id": "a"}, [np.arange(3, dtype=np.int16)])
    for d in (bytearray(data), memoryview(data)):
        assert decode_frame(d).arrays[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d[:10], "shorter"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + bytes([2]) + d[5:], "version"),
    (lambda d: d[:5] + bytes([99]) + d[6:], "message type"),
    (lambda d: d + b"\0", "header says"),
    (lambda d: d[:-1], "header says"),
])
def test_decode_malformed_fixed_header(mutate, match):
    data = _frame(MsgType.RESULT, {"id": 1}, [np.arange(5, dtype=np.float32)])
    with pytest.raises(ProtocolError, match=match):
        decode_frame(mutate(data))


def test_limits_are_checked_on_the_fixed_header():
    huge = HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, 10, 1 << 62)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_frame(huge)
    big_json = HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, 2 << 20, 0)
    with pytest.raises(ProtocolError, match="JSON header"):
        decode_frame(big_json)
    data = _frame(MsgType.RESULT, {}, [np.zeros(100, np.float64)])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_frame(data, limits=FrameLimits(max_frame_bytes=200))


@pytest.mark.parametrize("header, payload, match", [
    ({"arrays": "x"}, b"", "not a list"),
    ({"arrays": [1]}, b"", "not an object"),
    ({"arrays": [{"dtype": "|O", "shape": [1], "offset": 0}]}, b"\0" * 8, "dtype"),
    ({"arrays": [{"dtype": "<c8", "shape": [1], "offset": 0}]}, b"\0" * 8, "dtype"),
    ({"arrays": [{"dtype": ">f4", "shape": [1], "offset": 0}]}, b"\0" * 8, "dtype"),
    ({"arrays": [{"dtype": "<f4", "shape": [-1], "offset": 0}]}, b"\0" * 8, "shape"),
    ({"arrays": [{"dtype": "<f4", "shape": [1.0], "offset": 0}]}, b"\0" * 8, "shape"),
    ({"arrays": [{"dtype": "<f4", "shape": [True], "offset": 0}]}, b"\0" * 8, "shape"),
    ({"arrays": [{"dtype": "<f4", "shape": [1] * 9, "offset": 0}]}, b"\0" * 8, "shape"),
    ({"arrays": [{"dtype": "<f4", "shape": 3, "offset": 0}]}, b"\0" * 8, "shape"),
    ({"arrays": [{"dtype": "<f4", "shape": [1], "offset": 3}]}, b"\0" * 8, "offset"),
    ({"arrays": [{"dtype": "<f4", "shape": [1], "offset": -64}]}, b"\0" * 8, "offset"),
    ({"arrays": [{"dtype": "<f4", "shape": [1], "offset": "0"}]}, b"\0" * 8, "offset"),
    ({"arrays": [{"dtype": "<f4", "shape": [3], "offset": 0}]}, b"\0" * 8, "runs past"),
    ({"arrays": [{"dtype": "<f4", "shape": [1 << 40, 1 << 40], "offset": 0}]}, b"\0" * 8,
     "exceeds the frame limit"),
    ({"arrays": [{"dtype": "<f4", "shape": [0], "offset": 128}]}, b"\0" * 8, "runs past"),
    ({"arrays": [{"dtype": "<f4", "shape": [32], "offset": 0},
                 {"dtype": "<f4", "shape": [1], "offset": 64}]}, b"\0" * 192, "offset"),
])
def test_decode_malformed_array_descriptions(header, payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode_frame(_raw_frame(header, payload))


def test_decode_malformed_json():
    for js in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100000 + b"]" * 100000,
               b'{"a": ' + b"9" * 5000 + b"}"):
        data = HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, len(js), 0) + js
        with pytest.raises(ProtocolError, match="JSON"):
            decode_frame(data)


def test_too_many_arrays():
    descs = [{"dtype": "|u1", "shape": [0], "offset": 0}] * 5
    with pytest.raises(ProtocolError, match="limit"):
        decode_frame(_raw_frame({"arrays": descs}), limits=FrameLimits(max_arrays=4))
    assert len(decode_frame(_raw_frame({"arrays": descs})).arrays) == 5


_dtypes = st.sampled_from(sorted(ALLOWED_DTYPES))
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def _arrays(draw):
    dt = np.dtype(draw(_dtypes))
    shape = tuple(draw(_shapes))
    n = int(np.prod(shape)) * dt.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    a = np.frombuffer(raw, dt).reshape(shape) if n else np.zeros(shape, dt)
    return a


@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(arrays=st.lists(_arrays(), max_size=6), mtype=st.sampled_from(list(MsgType)),
       header=st.dictionaries(st.text(max_size=5).filter(lambda k: k != "arrays"),
                              st.one_of(st.none(), st.booleans(), st.integers(-10, 10),
                                        st.text(max_size=10)), max_size=4))
def test_roundtrip_property(arrays, mtype, header):
    f = decode_frame(_frame(mtype, header, arrays))
    assert f.type == mtype and f.header == header
    assert len(f.arrays) == len(arrays)
    for a, b in zip(arrays, f.arrays):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert b.tobytes() == a.tobytes()      # bitwise (NaN payloads included)


_SMALL = FrameLimits(max_frame_bytes=1 << 16, max_json_bytes=1 << 12, max_arrays=8, max_ndim=4)


def _decode_or_protocol_error(data, limits=_SMALL):
    try:
        f = decode_frame(data, limits=limits)
    except ProtocolError:
        return None
    assert isinstance(f, Frame)
    assert isinstance(f.header, dict) and "arrays" not in f.header
    assert len(f.arrays) <= limits.max_arrays
    assert sum(a.nbytes for a in f.arrays) <= limits.max_frame_bytes
    for a in f.arrays:
        assert a.dtype.str in ALLOWED_DTYPES and a.ndim <= limits.max_ndim
    return f


@settings(max_examples=examples(300), **PROPERTY_SETTINGS)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _decode_or_protocol_error(data)


@settings(max_examples=examples(300), **PROPERTY_SETTINGS)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_after_a_valid_fixed_header(body):
    # random JSON / payload lengths, valid magic and version: the limits must hold
    for mtype in (MsgType.ENCODE, MsgType.RESULT):
        data = MAGIC + bytes([VERSION, mtype]) + body
        _decode_or_protocol_error(data)


_VALID = [
    _frame(MsgType.ENCODE, {"id": "r", "modality": "image", "input": {"value": {
        "form": "array", "index": 0}}}, [np.arange(24, dtype=np.uint8).reshape(2, 4, 3)]),
    _frame(MsgType.RESULT, {"id": "r"}, [np.ones((1, 2, 3), np.float32),
                                         np.ones((1, 2), bool), np.zeros((1, 3), np.float32)]),
    _frame(MsgType.HEALTH, {"id": 1}),
]


@settings(max_examples=examples(400), **PROPERTY_SETTINGS)
@given(which=st.integers(0, len(_VALID) - 1),
       edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10 ** 6)),
       extra=st.binary(max_size=16))
def test_fuzz_mutated_valid_frames(which, edits, cut, extra):
    data = bytearray(_VALID[which])
    for pos, val in edits:
        data[pos % len(data)] = val
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    data += extra
    _decode_or_protocol_error(bytes(data))


@settings(max_examples=examples(200), **PROPERTY_SETTINGS)
@given(descs=st.lists(st.fixed_dictionaries({
    "dtype": st.one_of(_dtypes, st.text(max_size=4)),
    "shape": st.one_of(st.lists(st.integers(-2, 1 << 33), max_size=10), st.integers(),
                       st.none()),
    "offset": st.one_of(st.integers(-64, 1 << 20).map(lambda x: x - x % 64), st.integers(),
                        st.text(max_size=2))}), max_size=10),
    plen=st.integers(0, 4096))
def test_fuzz_array_descriptions(descs, plen):
    _decode_or_protocol_error(_raw_frame({"arrays": descs}, bytes(plen)))


# -- over sockets ------------------------------------------------------------------------------


def test_send_recv_over_a_socket_pair():
    a, b = socket.socketpair()
    try:
        big = np.arange(300000, dtype=np.float32).reshape(600, 500)
        t = threading.Thread(target=send_frame, args=(a, MsgType.RESULT, {"id": "z"},
                                                       [big, np.array(2, np.int8)]))
        t.start()
        b.settimeout(10)
        f = recv_frame(b)
        t.join(10)
        assert f.header == {"id": "z"}
        np.testing.assert_array_equal(f.arrays[0], big)
        assert f.arrays[1].shape == () and f.arrays[1] == 2
    finally:
        a.close()
        b.close()


def test_recv_frame_connection_closed_and_limits():
    a, b = socket.socketpair()
    b.settimeout(5)
    a.close()
    with pytest.raises(ConnectionClosed) as info:
        recv_frame(b)
    assert info.value.at_boundary
    b.close()

    a, b = socket.socketpair()
    b.settimeout(5)
    a.sendall(_frame(MsgType.HEALTH, {"id": "abc"})[:25])
    a.close()
    with pytest.raises(ConnectionClosed, match="inside a frame") as info:
        recv_frame(b)
    assert not info.value.at_boundary
    b.close()

    a, b = socket.socketpair()
    b.settimeout(5)
    try:
        a.sendall(HEADER.pack(MAGIC, VERSION, MsgType.ENCODE, 0, 16, 1 << 60))
        with pytest.raises(ProtocolError, match="exceeds"):
            recv_frame(b)            # refused without reading (or allocating) the payload
    finally:
        a.close()
        b.close()


def test_recv_frame_deadline_bounds_a_dripping_peer():
    """A deadline bounds the whole frame, however the peer spaces its bytes (each read alone
    would stay within the socket's timeout)."""
    import time
    a, b = socket.socketpair()
    b.settimeout(5)
    data = _frame(MsgType.AUTH, {"nonce": "00" * 32})
    stop = threading.Event()

    def drip():
        for i in range(len(data)):
            if stop.wait(0.1):
                return
            try:
                a.send(data[i:i + 1])
            except OSError:
                return
    t = threading.Thread(target=drip, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(socket.timeout):
            recv_frame(b, deadline=time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 3
        assert b.gettimeout() == 5                       # left as it was
    finally:
        stop.set()
        t.join(5)
        a.close()
        b.close()


def test_recv_frame_pace_drops_a_stalled_frame_and_lets_a_steady_one_through():
    import time

    from mmcore.distributed.protocol import Pace
    a, b = socket.socketpair()
    b.settimeout(30)
    try:
        a.sendall(HEADER.pack(MAGIC, VERSION, MsgType.HEALTH, 0, 2, 1 << 20) + b"{}")
        t0 = time.monotonic()
        with pytest.raises(socket.timeout, match="bytes/s"):
            recv_frame(b, pace=Pace(0.3, 1 << 20))       # declared 1 MiB, sent nothing
        assert time.monotonic() - t0 < 3
        assert b.gettimeout() == 30
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    b.settimeout(30)
    try:
        big = np.zeros(4 << 20, np.uint8)
        t = threading.Thread(target=send_frame, args=(a, MsgType.HEALTH, {"id": 1}, [big]))
        t.start()
        f = recv_frame(b, pace=Pace(1.0, 1 << 20))
        t.join(10)
        assert f.arrays[0].nbytes == 4 << 20
    finally:
        a.close()
        b.close()
    for bad in (0, -1, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ProtocolError, match="Pace"):
            Pace(bad, 1)
        with pytest.raises(ProtocolError, match="Pace"):
            Pace(1, bad)


def test_send_frame_pace_bounds_a_peer_that_does_not_read():
    import time

    from mmcore.distributed.protocol import Pace
    a, b = socket.socketpair()
    a.settimeout(30)
    try:
        t0 = time.monotonic()
        with pytest.raises(socket.timeout):
            send_frame(a, MsgType.RESULT, {"id": 1}, [np.zeros(64 << 20, np.uint8)],
                       pace=Pace(0.3, 64 << 20))
        assert time.monotonic() - t0 < 5
        assert a.gettimeout() == 30
    finally:
        a.close()
        b.close()


def test_frame_refused_by_on_header_is_read_past():
    from mmcore.distributed.protocol import FrameRefused
    a, b = socket.socketpair()
    b.settimeout(5)
    seen = []

    def refuse(mtype, jlen, plen):
        seen.append((mtype, jlen, plen))
        if plen > 1000:
            raise FrameRefused("too big for now", error="Busy", read_json=len(seen) == 1)
    try:
        t = threading.Thread(target=lambda: [
            send_frame(a, MsgType.ENCODE, {"id": "x"}, [np.ones(5 << 20, np.uint8)]),
            send_frame(a, MsgType.ENCODE, {"id": "y"}, [np.ones(3000, np.uint8)]),
            send_frame(a, MsgType.HEALTH, {"id": "z"}, [np.arange(3, dtype=np.int8)])])
        t.start()
        with pytest.raises(FrameRefused) as info:
            recv_frame(b, on_header=refuse)
        assert info.value.header == {"id": "x"} and info.value.error == "Busy"
        with pytest.raises(FrameRefused) as info:
            recv_frame(b, on_header=refuse)
        assert info.value.header == {}                    # its JSON skipped, not parsed
        f = recv_frame(b, on_header=refuse)               # the stream is still in step
        t.join(10)
        assert f.header == {"id": "z"} and f.arrays[0].tolist() == [0, 1, 2]
        assert seen[0][0] == MsgType.ENCODE and seen[0][2] == 5 << 20
    finally:
        a.close()
        b.close()


# -- payloads ----------------------------------------------------------------------------------


def _through_frame(desc, arrays):
    f = decode_frame(_frame(MsgType.ENCODE, {"input": desc}, arrays))
    return f.header["input"], f.arrays


def test_payload_strings_and_bytes(tmp_path):
    for v in ("a cat", ["a cat", "a dog"], b"raw text", [b"x", "y"]):
        desc, arrays = _through_frame(*pack_input("text", v))
        assert unpack_input(desc, arrays, tmpdir=str(tmp_path)) == v


def test_payload_encoded_memoryviews():
    raw = np.arange(40, dtype=np.uint8)
    views = (memoryview(raw)[::2], memoryview(raw.reshape(5, 8)[:, 1:3]),
             memoryview(raw.reshape(5, 8)), memoryview(bytearray(b"abc")))
    for v in views:
        for kind in ("image", "audio", "video"):
            out = unpack_input(*_through_frame(*pack_input(kind, v)), tmpdir=None)
            assert out == v.tobytes()


def test_payload_arrays_and_numbers(tmp_path):
    img = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)
    wav = [0.1, -0.5, 0.25]
    for kind, v in (("image", img), ("audio", np.linspace(-1, 1, 50)), ("video", img[None])):
        out = unpack_input(*_through_frame(*pack_input(kind, v)), tmpdir=None)
        assert out.dtype == v.dtype and out.shape == v.shape
        np.testing.assert_array_equal(out, v)
    out = unpack_input(*_through_frame(*pack_input("audio", wav)), tmpdir=None)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, wav)
    lst = [img[0], img[1][:3]]
    out = unpack_input(*_through_frame(*pack_input("image", lst)), tmpdir=None)
    assert isinstance(out, list) and len(out) == 2
    for a, b in zip(lst, out):
        np.testing.assert_array_equal(a, b)


def test_payload_dict_and_mask():
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    desc, arrays = _through_frame(*pack_input("text", {"input_ids": ids, "skip": None},
                                              attention_mask=mask))
    value, m = unpack_input(desc, arrays, tmpdir=None, with_mask=True)
    assert set(value) == {"input_ids"}
    np.testing.assert_array_equal(value["input_ids"], ids)
    np.testing.assert_array_equal(m, mask)
    value, m = unpack_input(*_through_frame(*pack_input("text", "hi")), tmpdir=None,
                            with_mask=True)
    assert value == "hi" and m is None


def test_payload_files_keep_suffix_and_bytes(tmp_path):
    src = tmp_path / "clip.wav"
    src.write_bytes(b"RIFF....WAVEdata")
    out_dir = tmp_path / "node"
    out_dir.mkdir()
    desc, arrays = _through_frame(*pack_input("audio", [str(src), src]))
    paths = unpack_input(desc, arrays, tmpdir=str(out_dir))
    assert len(paths) == 2 and len(set(paths)) == 2
    for p in paths:
        assert os.path.dirname(p) == str(out_dir) and p.endswith(".wav")
        assert open(p, "rb").read() == src.read_bytes()


def test_payload_file_names_cannot_escape_the_directory(tmp_path):
    desc = {"value": {"form": "file", "index": 0, "name": "../../etc/evil.png"}}
    out = unpack_input(desc, [np.frombuffer(b"abc", np.uint8)], tmpdir=str(tmp_path))
    assert os.path.dirname(out) == str(tmp_path) and out.endswith(".png")


def test_payload_pack_errors(tmp_path):
    with pytest.raises(ShapeError, match="cannot be read"):
        pack_input("image", str(tmp_path / "missing.png"))
    with pytest.raises(ShapeError, match="nested"):
        pack_input("image", [[np.zeros((2, 2, 3), np.uint8)], [np.zeros((2, 2, 3), np.uint8)]])
    with pytest.raises(ShapeError, match="nested"):
        pack_input("text", [{"input_ids": np.zeros((1, 2), np.int64)}])
    with pytest.raises(ShapeError, match="cannot be sent"):
        pack_input("image", object())
    with pytest.raises(ShapeError, match="exceeds"):
        pack_input("text", ["a"] * (MAX_ITEMS + 1))


@pytest.mark.parametrize("desc, arrays", [
    (None, []),
    ({}, []),
    ({"value": 3}, []),
    ({"value": {"form": "pickle", "data": "x"}}, []),
    ({"value": {"form": "str", "value": 3}}, []),
    ({"value": {"form": "array", "index": 1}}, [np.zeros(1)]),
    ({"value": {"form": "array", "index": -1}}, [np.zeros(1)]),
    ({"value": {"form": "array", "index": "0"}}, [np.zeros(1)]),
    ({"value": {"form": "array", "index": True}}, [np.zeros(1)]),
    ({"value": {"form": "bytes", "index": 2}}, [np.zeros(1)]),
    ({"value": {"form": "file", "index": 0, "name": "a.png"}}, [np.zeros(1, np.uint8)]),
    ({"value": {"form": "dict", "items": [0]}}, [np.zeros(1)]),
    ({"value": {"form": "dict", "items": {"x": 5}}}, [np.zeros(1)]),
    ({"value": {"form": "list", "items": []}}, []),
    ({"value": {"form": "list", "items": "abc"}}, []),
    ({"value": {"form": "list", "items": [{"form": "list", "items": [
        {"form": "str", "value": "a"}]}]}}, []),
    ({"value": {"form": "list", "items": [{"form": "dict", "items": {}}]}}, []),
    ({"value": {"form": "str", "value": "a"}, "mask": 4}, []),
    # one array named by many items would be copied (or preprocessed) once per item
    ({"value": {"form": "list", "items": [{"form": "bytes", "index": 0}] * 3}},
     [np.zeros(1 << 20, np.uint8)]),
    ({"value": {"form": "list", "items": [{"form": "array", "index": 0}] * 2}},
     [np.zeros(4)]),
    ({"value": {"form": "array", "index": 0}, "mask": 0}, [np.zeros(4)]),
    ({"value": {"form": "dict", "items": {"a": 0, "b": 0}}}, [np.zeros(4)]),
])
def test_payload_unpack_malformed(desc, arrays):
    with pytest.raises(ProtocolError):
        unpack_input(desc, arrays, tmpdir=None, with_mask=True)


# -- tokens and handshakes ---------------------------------------------------------------------


def test_resolve_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    f = tmp_path / "tok"
    f.write_text("  from-file\n")
    assert resolve_token("arg") == b"arg"
    assert resolve_token(b"\x00\xff") == b"\x00\xff"
    assert resolve_token("arg", token_file=f) == b"arg"           # the argument wins
    assert resolve_token(token_file=f) == b"from-file"             # whitespace stripped
    assert resolve_token(token_file=str(f)) == b"from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token() == b"from-env"
    assert resolve_token(token_file=f) == b"from-file"             # the file wins over env
    assert resolve_token("arg") == b"arg"


def test_resolve_token_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        resolve_token()
    with pytest.raises(ConfigError, match=r"\[Thing\]"):
        resolve_token(owner="Thing")
    with pytest.raises(ConfigError, match="token_file"):
        resolve_token(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="non-empty"):
        resolve_token(token_file=tmp_path / "empty")
    with pytest.raises(ConfigError, match="non-empty"):
        resolve_token("")
    with pytest.raises(ConfigError, match="non-empty"):
        resolve_token(123)
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ConfigError, match="non-empty"):
        resolve_token()


def _handshake(server_token, client_token):
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result = {}

    def server():
        try:
            result["server"] = server_handshake(a, server_token, info={"modalities": ["x"]})
        except Exception as exc:  # recorded for the assertion
            result["server"] = exc

    t = threading.Thread(target=server)
    t.start()
    try:
        try:
            result["client"] = client_handshake(b, client_token)
        except Exception as exc:
            result["client"] = exc
    finally:
        t.join(5)
        a.close()
        b.close()
    return result["server"], result["client"]


def test_handshake_right_and_wrong_token():
    server, client = _handshake(b"secret", b"secret")
    assert server is True and client == {"modalities": ["x"]}
    server, client = _handshake(b"secret", b"wrong")
    assert server is False
    assert isinstance(client, AuthError)


def test_handshake_client_rejects_a_node_without_the_token():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)

    def impostor():
        send_frame(a, MsgType.CHALLENGE, {"nonce": os.urandom(32).hex()})
        recv_frame(a)
        send_frame(a, MsgType.AUTH_OK, {"mac": os.urandom(32).hex()})

    t = threading.Thread(target=impostor)
    t.start()
    try:
        with pytest.raises(AuthError, match="prove"):
            client_handshake(b, b"secret")
    finally:
        t.join(5)
        a.close()
        b.close()


@pytest.mark.parametrize("frame", [
    _frame(MsgType.AUTH, {"nonce": "zz", "mac": "00" * 32}),
    _frame(MsgType.AUTH, {"nonce": "00" * 31, "mac": "00" * 32}),
    _frame(MsgType.AUTH, {"nonce": "00" * 32}),
    _frame(MsgType.HEALTH, {"id": 1}),
    _frame(MsgType.AUTH, {"nonce": "00" * 32, "mac": "00" * 32}, [np.zeros(1)]),
    b"garbage" * 4,
])
def test_server_handshake_malformed(frame):
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    try:
        b.sendall(frame)
        with pytest.raises(ProtocolError):
            server_handshake(a, b"secret")
    finally:
        a.close()
        b.close()


# -- configuration -----------------------------------------------------------------------------


def test_parse_address():
    assert parse_address("localhost:80", "x") == ("localhost", 80)
    assert parse_address("[::1]:7000", "x") == ("::1", 7000)
    assert parse_address(("h", "12"), "x") == ("h", 12)
    for bad, match in (("nohost", "host:port"), (":80", "host"), ("h:0", "1..65535"),
                       ("h:70000", "1..65535"), ("h:abc", "bad port"), (5, "host:port")):
        with pytest.raises(ConfigError, match=match):
            parse_address(bad, "x")


def test_sharding_strategy():
    s = ShardingStrategy.modality_specific({Modality.TEXT: ["a:1", ("b", 2)], "image": "c:3",
                                            "audio": ["[::1]:4"]})
    assert s.nodes == {Modality.TEXT: ("a:1", "b:2"), Modality.IMAGE: ("c:3",),
                       Modality.AUDIO: ("[::1]:4",)}
    assert s.modalities == (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)
    assert s.to_dict()["nodes"]["image"] == ["c:3"]
    assert ShardingStrategy.modality_specific({"text": 2}).nodes == {Modality.TEXT: 2}


@pytest.mark.parametrize("assignment, match", [
    ({}, "sharding_strategy"),
    ([("text", ["a:1"])], "sharding_strategy"),
    ({"text": []}, r"sharding_strategy\['text'\] has no nodes"),
    ({"text": 0}, r"sharding_strategy\['text'\] must be >= 1"),
    ({"text": True}, r"sharding_strategy\['text'\]"),
    ({"image": ["a:1", "bad"]}, r"sharding_strategy\['image'\]\[1\]"),
    ({"image": ["a:99999"]}, r"sharding_strategy\['image'\]\[0\]"),
])
def test_sharding_strategy_errors(assignment, match):
    with pytest.raises(ConfigError, match=match):
        ShardingStrategy.modality_specific(assignment)


def test_sharding_strategy_unknown_modality():
    with pytest.raises(ValueError):
        ShardingStrategy.modality_specific({"smell": ["a:1"]})


def test_distributed_config_defaults_and_coercion():
    cfg = DistributedConfig(sharding_strategy={"text": ["127.0.0.1:1"]}, token="s3cr3t-xyz",
                            connect_timeout_s=1, heartbeat_s=0.5)
    assert isinstance(cfg.sharding_strategy, ShardingStrategy)
    assert cfg.modalities == (Modality.TEXT,)
    assert cfg.connect_timeout_s == 1.0 and isinstance(cfg.connect_timeout_s, float)
    assert cfg.backend == "socket" and cfg.drop_unavailable is False
    assert "s3cr3t-xyz" not in repr(cfg)      # the token is not shown
    ray = DistributedConfig(sharding_strategy=ShardingStrategy.modality_specific({"image": 2}),
                            backend="ray", ray_resources={"image": {"gpu_box": 1}})
    assert ray.ray_resources == {Modality.IMAGE: {"gpu_box": 1}}


_S = ShardingStrategy.modality_specific({"text": ["127.0.0.1:1"]})


@pytest.mark.parametrize("kwargs, field", [
    (dict(sharding_strategy=["127.0.0.1:1"]), "sharding_strategy"),
    (dict(backend="grpc"), "backend"),
    (dict(backend="ray"), "sharding_strategy"),
    (dict(sharding_strategy=ShardingStrategy.modality_specific({"text": 2})),
     "sharding_strategy"),
    (dict(connect_timeout_s=0), "connect_timeout_s"),
    (dict(connect_timeout_s=-1), "connect_timeout_s"),
    (dict(request_timeout_s=float("inf")), "request_timeout_s"),
    (dict(request_timeout_s=float("nan")), "request_timeout_s"),
    (dict(request_timeout_s="5"), "request_timeout_s"),
    (dict(heartbeat_s=True), "heartbeat_s"),
    (dict(heartbeat_s=0), "heartbeat_s"),
    (dict(drop_unavailable=1), "drop_unavailable"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(max_attempts=1.5), "max_attempts"),
    (dict(max_attempts=True), "max_attempts"),
    (dict(max_workers=0), "max_workers"),
    (dict(max_workers=None), "max_workers"),
    (dict(ray_resources={"image": {"gpu": -1}}), "ray_resources"),
    (dict(ray_resources={"image": 3}), "ray_resources"),
])
def test_distributed_config_errors(kwargs, field):
    kwargs = dict(dict(sharding_strategy=_S), **kwargs)
    with pytest.raises(ConfigError, match=field):
        DistributedConfig(**kwargs)


def test_attach_and_coordinator_reject_bad_configs(monkeypatch):
    from mmcore.distributed import Coordinator, attach
    from mmcore.model import default_model
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="DistributedConfig"):
        attach(default_model(), {"text": ["127.0.0.1:1"]})
    with pytest.raises(ConfigError, match="token"):
        Coordinator(DistributedConfig(sharding_strategy=_S))
    with pytest.raises(ConfigError, match="DistributedConfig"):
        Coordinator({"text": ["127.0.0.1:1"]})


def test_payload_refused_forms_do_not_depend_on_the_value(tmp_path):
    """strings=False refuses str (a path for image, audio, video preprocessors), with
    files=False also bytes (no decoder), and files=False refuses files, with one message
    whatever the value names."""
    real = tmp_path / "real.png"
    real.write_bytes(b"\x89PNG")
    messages = set()
    for value in (str(real), str(tmp_path / "missing.png"), "/dev/zero", "x"):
        for desc, arrays in (({"value": {"form": "str", "value": value}}, []),
                             ({"value": {"form": "list", "items": [
                                 {"form": "str", "value": value}]}}, [])):
            with pytest.raises(ProtocolError, match=r"^\[distributed\] input form 'str' is "
                               r"refused: modality 'image'") as info:
                unpack_input(desc, arrays, tmpdir=str(tmp_path), strings=False,
                             what="modality 'image'")
            messages.add(str(info.value))
        with pytest.raises(ProtocolError, match="'bytes' is refused"):
            unpack_input({"value": {"form": "bytes", "index": 0}},
                         [np.frombuffer(value.encode(), np.uint8)], tmpdir=str(tmp_path),
                         strings=False, files=False)
        # an image / audio / video modality takes bytes as encoded data
        assert unpack_input({"value": {"form": "bytes", "index": 0}},
                            [np.frombuffer(value.encode(), np.uint8)], tmpdir=str(tmp_path),
                            strings=False) == value.encode()
    assert len(messages) == 1 and str(tmp_path) not in messages.pop()
    with pytest.raises(ProtocolError, match="'file' is refused.*text"):
        unpack_input({"value": {"form": "file", "index": 0, "name": "a.txt"}},
                     [np.zeros(3, np.uint8)], tmpdir=str(tmp_path), files=False,
                     what="modality 'text'")
    assert os.listdir(tmp_path) == ["real.png"]                # nothing written
    # the allowed forms still work
    out = unpack_input({"value": {"form": "file", "index": 0, "name": "a.png"}},
                       [np.frombuffer(b"abc", np.uint8)], tmpdir=str(tmp_path), strings=False)
    assert open(out, "rb").read() == b"abc"
    assert unpack_input({"value": {"form": "str", "value": "hi"}}, [], tmpdir=None,
                        files=False) == "hi"


def test_payload_keeps_0d_arrays_and_refuses_paths_as_text():
    import pathlib

    from mmcore.distributed.payload import pack_input, unpack_input
    desc, arrays = pack_input("audio", np.float32(3.5), attention_mask=np.bool_(True))
    value, mask = unpack_input(desc, arrays, tmpdir=None, with_mask=True)
    assert value.shape == () and float(value) == 3.5 and mask.shape == ()
    with pytest.raises(ShapeError, match="text input must be str or bytes"):
        pack_input("text", pathlib.Path("caption.txt"))


def test_empty_array_with_huge_dims_is_refused():
    from mmcore.distributed.protocol import HEADER, MAGIC, VERSION, MsgType, decode_frame
    js = json.dumps({"arrays": [{"dtype": "<f2", "shape": [0, 423036, 3300610, 3302845],
                                 "offset": 0}]}).encode()
    data = HEADER.pack(MAGIC, VERSION, int(MsgType.RESULT), 0, len(js), 0) + js
    with pytest.raises(ProtocolError, match="exceeds the frame limit"):
        decode_frame(data)
