"""Arrays and their metadata on the wire between the server and its clients (numpy only).

One message is a JSON header followed by each array's bytes, compressed with zlib:

    b"SYNPO-WIRE/1\\n" | header length (4 bytes, big-endian) | header (UTF-8 JSON) | blobs

header = {"meta": {...}, "arrays": [{"name", "dtype", "shape", "size"}, ...]} where "size" is the
compressed blob's byte count. Reading never trusts the header: each array's decompressed size is
bounded by its declared shape (a decompression bomb stops there), only plain numeric dtypes are
accepted, and the total is bounded by the caller's limit. No pickle, no paths.

Written by the server and by `client.py`; Python 3.9 syntax (the Slicer module imports it).
"""
import math
import json
import struct
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import InputError

MAGIC = b"SYNPO-WIRE/1\n"
CONTENT_TYPE = "application/x-synpo-wire"
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32", "float64")
LEVEL = 1                 # zlib level: 1 is several times faster than 6 and compresses medical volumes nearly as well
MAX_HEADER = 1 << 24
# The header of a message's part (a result fetched in parts): the whole message's length in bytes.
PART_TOTAL = "X-SynPo-Total"


def pack(arrays: Dict[str, np.ndarray], meta: Optional[dict] = None) -> bytes:
    """One message holding `arrays` (name -> ndarray) and `meta` (JSON-serialisable)."""
    packer = Packer(arrays, meta, chunk=0)
    while not packer.step():
        pass
    return packer.message()


class Packer:
    """pack() a step at a time: each step() compresses at most `chunk` bytes of the arrays (0: an
    array at once), so that a caller driven by a GUI timer (Slicer's main thread) stays responsive
    while a large volume is compressed. step() returns True once every array is compressed; then
    message() is the message pack() gives (the same arrays and meta once unpacked)."""

    def __init__(self, arrays: Dict[str, np.ndarray], meta: Optional[dict] = None, chunk: int = 4 << 20):
        self.meta, self.chunk = meta or {}, int(chunk)
        self._todo = []
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            if a.dtype.name not in DTYPES:
                raise InputError("array %s has dtype %s; one of %s is needed" % (name, a.dtype, ", ".join(DTYPES)))
            self._todo.append((name, a.astype(a.dtype.newbyteorder("<"), copy=False)))
        self.total = sum(a.nbytes for _, a in self._todo)
        self.done = 0                               # bytes of the arrays compressed so far
        self._entries: List[dict] = []
        self._blobs: List[bytes] = []
        self._index, self._pos, self._parts, self._z = 0, 0, [], None

    def step(self) -> bool:
        if self._index == len(self._todo):
            return True
        name, a = self._todo[self._index]
        raw = memoryview(a).cast("B") if a.size else memoryview(b"")
        if self._z is None:
            self._z = zlib.compressobj(LEVEL)
        end = len(raw) if self.chunk <= 0 else min(len(raw), self._pos + self.chunk)
        if end > self._pos:
            self._parts.append(self._z.compress(raw[self._pos:end]))
        self.done += end - self._pos
        self._pos = end
        if end == len(raw):
            blob = b"".join(self._parts + [self._z.flush()]) if a.size else b""
            self._entries.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "size": len(blob)})
            self._blobs.append(blob)
            self._index, self._pos, self._parts, self._z = self._index + 1, 0, [], None
        return self._index == len(self._todo)

    def message(self) -> bytes:
        if self._index != len(self._todo):
            raise RuntimeError("Packer.message() before every array is compressed")
        header = json.dumps({"meta": self.meta, "arrays": self._entries}).encode("utf-8")
        return b"".join([MAGIC, struct.pack(">I", len(header)), header] + self._blobs)


def unpack(data: bytes, max_bytes: int = 1 << 34) -> Tuple[Dict[str, np.ndarray], dict]:
    """(arrays, meta) of a message; InputError with a one-line reason for anything malformed,
    or arrays that would take more than `max_bytes` once decompressed."""
    unpacker = Unpacker(data, max_bytes, chunk=0)
    while not unpacker.step():
        pass
    return unpacker.arrays, unpacker.meta


def _nbytes(shape, dtype: str) -> int:
    """Bytes of an array of `shape` and `dtype` (one of DTYPES), in exact integers: a product over
    int64 wrapped for a huge declared shape and slipped past the size limit."""
    return math.prod(shape) * np.dtype(dtype).itemsize


def _declared_bytes(entry) -> int:
    """Bytes an array entry of a header says it holds decompressed; 0 if the entry is malformed."""
    try:
        shape, dtype = [int(v) for v in entry["shape"]], str(entry["dtype"])
    except (KeyError, TypeError, ValueError):
        return 0
    return _nbytes(shape, dtype) if dtype in DTYPES and all(v >= 0 for v in shape) else 0


class Unpacker:
    """unpack() a step at a time: each step() decompresses at most `chunk` bytes of an array (0: an
    array at once), so that a caller driven by a GUI timer (Slicer's main thread) stays responsive
    while a large result is decompressed. The header is read (and refused if malformed) on
    construction; step() returns True once every array is read, then `arrays` and `meta` are what
    unpack() gives. It accepts and refuses what unpack() does (a differential fuzz of malformed
    messages found no difference); for a blob both longer than its array and not valid zlib, the
    reason it names may be the other of the two."""

    def __init__(self, data: bytes, max_bytes: int = 1 << 34, chunk: int = 4 << 20):
        self.data, self.max_bytes, self.chunk = memoryview(data), int(max_bytes), int(chunk)
        data = self.data
        if bytes(data[:len(MAGIC)]) != MAGIC:
            raise InputError("the body is not a SynPo wire message (%s)" % CONTENT_TYPE)
        pos = len(MAGIC)
        if len(data) < pos + 4:
            raise InputError("the message is truncated")
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        pos += 4
        if n > MAX_HEADER or len(data) < pos + n:
            raise InputError("the message header is truncated or too large")
        try:
            header = json.loads(bytes(data[pos:pos + n]).decode("utf-8"))
            entries, meta = header["arrays"], header.get("meta", {})
            if not isinstance(entries, list) or not isinstance(meta, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise InputError("the message header is not valid JSON of the expected form") from None
        self.meta: dict = meta
        self.arrays: Dict[str, np.ndarray] = {}
        self.total = 0                   # bytes of the arrays once decompressed, so far declared
        self.done = 0                    # ... decompressed so far
        # ... all of them, as the header declares them (for progress: `total` grows array by array,
        # so done / total fell back when a larger array began). Arithmetic only, nothing reserved; a
        # malformed entry counts 0 here and is refused when step() reaches it.
        self.declared = sum(_declared_bytes(e) for e in entries)
        self._entries, self._pos, self._index = entries, pos + n, 0
        self._current = None             # [name, dtype, shape, blob, bytes declared, decompressor, pieces out]
        self._filled = self._fed = 0     # bytes of the current array decompressed; of its blob given to zlib

    def step(self) -> bool:
        if self._current is None:
            if self._index == len(self._entries):
                if self._pos != len(self.data):
                    raise InputError("the message has %d bytes after its last array" % (len(self.data) - self._pos))
                return True
            self._begin(self._entries[self._index])
        self._inflate()
        return False

    def _begin(self, e) -> None:
        try:
            name, dtype, shape, size = str(e["name"]), str(e["dtype"]), [int(s) for s in e["shape"]], int(e["size"])
        except (KeyError, TypeError, ValueError):
            raise InputError("an array entry of the header is malformed") from None
        if dtype not in DTYPES:
            raise InputError("array %s has dtype %s; one of %s is accepted" % (name, dtype, ", ".join(DTYPES)))
        if any(s < 0 for s in shape) or size < 0 or len(shape) > 8:
            raise InputError("array %s has an invalid shape or size" % name)
        dt = np.dtype(dtype).newbyteorder("<")
        nbytes = _nbytes(shape, dtype)
        self.total += nbytes
        if self.total > self.max_bytes:
            raise InputError("the arrays would take %d MB decompressed, more than this server accepts (%d MB)"
                             % (self.total >> 20, self.max_bytes >> 20))
        if len(self.data) < self._pos + size:
            raise InputError("array %s is truncated" % name)
        blob = self.data[self._pos:self._pos + size]
        self._pos += size
        # The output grows as data comes out (nothing reserved for the declared shape beforehand: a
        # header alone must not make the server take memory).
        self._current = [name, dt, shape, blob, nbytes, zlib.decompressobj(), []]
        self._filled = self._fed = 0

    def _inflate(self) -> None:
        """At most `chunk` more bytes of the current array from at most `chunk` more bytes of its
        blob (all of it at once with chunk 0), and the array once they are all there. Never more than
        its declared shape holds (a decompression bomb stops there)."""
        name, dt, shape, blob, expected, d, pieces = self._current
        if expected and self.chunk <= 0:                  # at once, as unpack() has always read it
            try:
                out = d.decompress(bytes(blob), expected)
                if d.unconsumed_tail or not d.eof:
                    raise InputError("array %s: its data does not match its declared shape" % name)
            except zlib.error:
                raise InputError("array %s: its data is not valid zlib" % name) from None
            if len(out) != expected:
                raise InputError("array %s: %d bytes of data for a declared %d" % (name, len(out), expected))
            pieces.append(out)
            self.done += len(out)
        elif expected:
            room = expected - self._filled
            tail = d.unconsumed_tail
            data = tail if tail else blob[self._fed:self._fed + self.chunk]
            self._fed += 0 if tail else len(data)
            try:
                # One byte when the array is full: what comes out then lies beyond its declared shape.
                got = d.decompress(data, min(room, self.chunk) if room else 1)
            except zlib.error:
                raise InputError("array %s: its data is not valid zlib" % name) from None
            if len(got) > room:
                raise InputError("array %s: its data does not match its declared shape" % name)
            pieces.append(got)
            self._filled += len(got)
            self.done += len(got)
            if not d.eof:
                if not got and not d.unconsumed_tail and self._fed >= len(blob):
                    raise InputError("array %s: its data does not match its declared shape" % name)
                return                                      # more at the next step
            if self._filled != expected:
                raise InputError("array %s: %d bytes of data for a declared %d" % (name, self._filled, expected))
        raw = b"".join(pieces) if expected else b""
        self.arrays[name] = np.frombuffer(raw, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)
        self._current, self._index = None, self._index + 1


def compact_image(image: np.ndarray) -> np.ndarray:
    """The image in the smallest dtype that holds it exactly (int16 for a CT in Hounsfield units
    read as float32): a third to a half of the bytes to compress and send, the same values."""
    if image.dtype.kind == "f" and image.size:
        lo, hi = float(image.min()), float(image.max())
        for dt in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                cast = image.astype(dt)
                if np.array_equal(cast, image):
                    return cast
                break
    return image
