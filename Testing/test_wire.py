"""The wire format between server and clients: exact round trips, and malformed messages refused."""
import json
import struct
import zlib

import numpy as np
import pytest

from synpo import wire
from synpo.errors import InputError


def test_round_trip_keeps_values_dtypes_and_meta():
    rng = np.random.default_rng(0)
    arrays = {"image": rng.normal(size=(3, 5, 7)).astype(np.float32), "labels": rng.integers(0, 4, (3, 5, 7)).astype(np.uint8),
              "mask": rng.random((5, 7)) > 0.5, "empty": np.zeros((0, 2), np.int32), "big": np.arange(6, dtype=np.int64)}
    out, meta = wire.unpack(wire.pack(arrays, {"spacing": [1.0, 2.0, 3.5], "name": "x"}))
    assert meta == {"spacing": [1.0, 2.0, 3.5], "name": "x"}
    for k, a in arrays.items():
        assert out[k].dtype == a.dtype and out[k].shape == a.shape and np.array_equal(out[k], a)


def test_compact_image_is_exact():
    ct = np.array([[[-1024.0, 0.0, 3071.0]]], dtype=np.float32)
    assert wire.compact_image(ct).dtype == np.int16 and np.array_equal(wire.compact_image(ct), ct)
    mr = np.array([[[0.5, 2.0]]], dtype=np.float32)
    assert wire.compact_image(mr).dtype == np.float32
    u8 = np.array([[[0.0, 255.0]]], dtype=np.float32)
    assert wire.compact_image(u8).dtype == np.uint8


def _message(entries, blobs, meta=None):
    header = json.dumps({"meta": meta or {}, "arrays": entries}).encode()
    return wire.MAGIC + struct.pack(">I", len(header)) + header + b"".join(blobs)


@pytest.mark.parametrize("make, says", [
    (lambda: b"PK\x03\x04...", "not a SynPo wire message"),
    (lambda: wire.MAGIC + b"\x00\x00", "truncated"),
    (lambda: wire.MAGIC + struct.pack(">I", 5) + b"{nope", "not valid JSON"),
    (lambda: _message([{"name": "a", "dtype": "object", "shape": [1], "size": 0}], []), "dtype object"),
    (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [4], "size": 3}], [b"abc"]), "not valid zlib"),
    (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [4], "size": len(zlib.compress(b"abcdefgh"))}],
                      [zlib.compress(b"abcdefgh")]), "does not match its declared shape"),
    (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [8], "size": len(zlib.compress(b"abcd"))}],
                      [zlib.compress(b"abcd")]), "4 bytes of data for a declared 8"),
    (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [4], "size": 100}], [b"x"]), "truncated"),
    (lambda: wire.pack({"a": np.zeros(3)}) + b"junk", "after its last array"),
])
def test_malformed_messages_are_refused_with_a_reason(make, says):
    with pytest.raises(InputError) as err:
        wire.unpack(make())
    assert says in str(err.value)


def test_a_decompression_bomb_stops_at_the_limit():
    bomb = wire.pack({"a": np.zeros((64, 1024, 1024), np.uint8)})            # 64 MB of zeros: a few KB sent
    assert len(bomb) < 1 << 20
    with pytest.raises(InputError) as err:
        wire.unpack(bomb, max_bytes=16 << 20)
    assert "more than this server accepts" in str(err.value)


def test_the_packer_gives_packs_message_a_bounded_step_at_a_time():
    rng = np.random.default_rng(1)
    arrays = {"image": rng.integers(-1000, 2000, (7, 33, 41)).astype(np.int16), "empty": np.zeros((0, 3), np.float32),
              "mask": rng.random((9, 11)) > 0.5}
    whole = wire.pack(arrays, {"spacing": [1.0, 1.0, 2.5]})
    packer = wire.Packer(arrays, {"spacing": [1.0, 1.0, 2.5]}, chunk=1000)
    steps, done = 0, [0]
    while not packer.step():
        steps += 1
        assert packer.done - done[-1] <= 1000          # never more than a chunk compressed in one step
        done.append(packer.done)
    assert packer.done == packer.total == sum(a.nbytes for a in arrays.values())
    assert steps >= arrays["image"].nbytes // 1000
    assert packer.message() == whole
    with pytest.raises(RuntimeError):
        wire.Packer(arrays, chunk=10).message()
    with pytest.raises(InputError, match="dtype"):
        wire.Packer({"x": np.zeros(3, np.complex64)})


def test_the_unpacker_gives_unpacks_arrays_a_bounded_step_at_a_time():
    """wire.Unpacker: what unpack() gives, decompressing at most `chunk` bytes a step (a result
    unpacked on Slicer's main thread between timer ticks), and the same refusals, step by step."""
    rng = np.random.default_rng(2)
    arrays = {"labels": rng.integers(0, 3, (6, 40, 30)).astype(np.uint8), "empty": np.zeros((0, 2), np.int32),
              "confidence": rng.random((6, 40, 30)).astype(np.float32)}
    message = wire.pack(arrays, {"records": [1, 2]})
    unpacker = wire.Unpacker(message, chunk=1000)
    steps, done = 0, [0]
    while not unpacker.step():
        steps += 1
        assert unpacker.done - done[-1] <= 1000        # never more than a chunk decompressed in one step
        done.append(unpacker.done)
    assert steps >= sum(a.nbytes for a in arrays.values()) // 1000
    assert unpacker.meta == {"records": [1, 2]} and unpacker.done == unpacker.total
    for k, a in arrays.items():
        assert unpacker.arrays[k].dtype == a.dtype and np.array_equal(unpacker.arrays[k], a)
    for make, says in [
        (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [4000], "size": len(zlib.compress(bytes(9000)))}],
                          [zlib.compress(bytes(9000))]), "does not match its declared shape"),
        (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [9000], "size": len(zlib.compress(bytes(4000)))}],
                          [zlib.compress(bytes(4000))]), "4000 bytes of data for a declared 9000"),
        (lambda: _message([{"name": "a", "dtype": "uint8", "shape": [9000], "size": 30}],
                          [zlib.compress(bytes(9000))[:30]]), "does not match its declared shape"),
        (lambda: wire.pack({"a": np.zeros(3000)}) + b"junk", "after its last array"),
    ]:
        with pytest.raises(InputError) as err:
            unpacker = wire.Unpacker(make(), chunk=1000)
            while not unpacker.step():
                pass
        assert says in str(err.value)
    with pytest.raises(InputError, match="not a SynPo wire message"):
        wire.Unpacker(b"nope")                          # the header is read on construction


@pytest.mark.parametrize("chunk", [0, 4096])
def test_a_header_alone_takes_no_memory(chunk):
    """A message that declares a large array but carries a few bytes is refused without reserving the
    declared size (the server unpacks what any token holder sends): memory follows the data."""
    import tracemalloc
    blob = zlib.compress(bytes(10))
    message = _message([{"name": "x", "dtype": "uint8", "shape": [512 << 20], "size": len(blob)}], [blob])
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="10 bytes of data for a declared"):
            unpacker = wire.Unpacker(message, chunk=chunk)
            while not unpacker.step():
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("chunk", [0, 64])
def test_a_shape_whose_size_overflows_int64_is_refused_by_the_size_limit(chunk):
    """2^40 x 2^40 x 16 bytes wrapped to 0 in an int64 product: the declared size passed the limit and
    the array ended in numpy's ValueError (not a clear refusal). The size is counted exactly."""
    message = _message([{"name": "x", "dtype": "uint8", "shape": [1 << 40, 1 << 40, 16], "size": 0}], [b""])
    with pytest.raises(InputError, match="more than this server accepts"):
        unpacker = wire.Unpacker(message, chunk=chunk)
        while not unpacker.step():
            pass
