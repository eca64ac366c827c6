"""A client of `synpo serve`: Python's standard library and numpy only, no torch.

Used by `synpo segment --server` and by the Slicer module (which runs it in Slicer's Python 3.9:
keep this file to 3.9 syntax). Every failure is a `ServerError` (a SynPoError) with one line.

    client = Client("http://127.0.0.1:8765", token)
    sid = client.create_session(image, spacing_ijk)
    rid = client.start_run(sid, support)
    while client.status(sid, rid)["state"] in ("queued", "running"): ...
    result = client.result(sid, rid)                 # a result.VolumeResult
"""
import http.client
import io
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import wire
from .errors import SynPoError
from .result import SliceRecord, VolumeResult, support_from_dict

ACTIVE = ("queued", "running")
RESENDS = 3          # run_remote: times a session evicted before its run is sent again


class ServerError(SynPoError):
    """The server refused a request, or could not be reached. `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, timed_out: bool = False):
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out      # no answer within the request's timeout (a server stalled, or gone)


def default_token_path() -> str:
    """Where `synpo serve` writes the token it makes when given no --token-file."""
    from .weights import cache_dir
    return os.path.join(cache_dir(), "server-token")


def find_token(token_file: Optional[str] = None) -> str:
    """The token from `token_file`, else $SYNPO_TOKEN, else the file `synpo serve` writes by default."""
    if token_file:
        path = token_file
    elif os.environ.get("SYNPO_TOKEN", "").strip():
        token = os.environ["SYNPO_TOKEN"].strip()
        if any(c.isspace() or not c.isprintable() or ord(c) > 127 for c in token):
            raise SynPoError("$SYNPO_TOKEN does not hold one token (printable ASCII without spaces)")
        return token
    else:
        path = default_token_path()
        if not os.path.isfile(path):
            raise SynPoError("no token: give --token-file FILE (the file the server reads or wrote), or set "
                             "SYNPO_TOKEN; %s does not exist" % path)
    try:
        with open(path, encoding="ascii") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise SynPoError("cannot read the token file %s: %s" % (path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        token = None
    if token == "":
        raise SynPoError("the token file %s is empty" % path)
    if token is None or any(c.isspace() or not c.isprintable() for c in token):
        # (an HTTP header cannot carry it: a traceback from http.client before)
        raise SynPoError("the token file %s does not hold one token (one line of printable ASCII without spaces)"
                         % path)
    return token


class Client:
    def __init__(self, url: str, token: str = "", timeout: float = 60.0, cafile: Optional[str] = None):
        try:
            parsed = urllib.parse.urlparse(url)
            parsed.port                   # ("http://h:99999", "http://[::1": ValueError, a traceback before)
        except ValueError as exc:
            raise SynPoError("server URL %r: %s; give http://HOST:PORT or https://HOST:PORT" % (url, exc)) from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SynPoError("server URL %r: give http://HOST:PORT or https://HOST:PORT" % url)
        self.url = url.rstrip("/")
        self.token, self.timeout = token, timeout
        self.context = ssl.create_default_context(cafile=cafile) if parsed.scheme == "https" else None

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "",
                timeout: Optional[float] = None) -> Tuple[bytes, str]:
        """(body, content type) of the answer; ServerError with the server's one-line reason."""
        data, headers, _ = self.exchange(method, path, body, content_type, timeout)
        return data, headers.get("Content-Type", "")

    def exchange(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "",
                 timeout: Optional[float] = None):
        """(body, headers, status) of a successful answer (2xx); ServerError as request() gives it."""
        headers = {"Accept": "application/json, %s" % wire.CONTENT_TYPE}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self.context) as answer:
                return answer.read(), answer.headers, answer.status
        except urllib.error.HTTPError as exc:
            raise ServerError(self._reason(exc), exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            error = self.unreachable(reason or type(exc).__name__)
            error.timed_out = isinstance(reason, (socket.timeout, TimeoutError))
            raise error from None

    def _reason(self, exc) -> str:
        try:
            text = exc.read()
        except Exception:
            text = b""
        return server_said(text, exc.reason, exc.code)

    def unreachable(self, reason) -> ServerError:
        if isinstance(reason, ssl.SSLCertVerificationError):
            # (the server is there: "is `synpo serve` running there?" sent users looking for the wrong fault)
            return ServerError("the SynPo server at %s has a certificate this computer does not trust (%s): for "
                               "a self-signed one, give its certificate file as SSL_CERT_FILE=cert.pem in the "
                               "environment" % (self.url, getattr(reason, "verify_message", "") or reason))
        return ServerError("cannot reach the SynPo server at %s (%s): is `synpo serve` running there?"
                           % (self.url, reason))

    def json(self, method: str, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        data, _ = self.request(method, path, body, "application/json" if body is not None else "", timeout)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise ServerError("the server at %s answered something that is not JSON" % self.url) from None

    def arrays(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "",
               timeout: Optional[float] = None) -> Tuple[Dict[str, np.ndarray], dict]:
        data, _ = self.request(method, path, body, content_type, timeout)
        try:
            return wire.unpack(data)
        except SynPoError as exc:
            raise ServerError("the server's answer is malformed: %s" % exc) from None

    # ------------------------------------------------------------------ the API

    def health(self) -> dict:
        return self.json("GET", "/v1/health", timeout=min(self.timeout, 10.0))

    def create_session(self, image: np.ndarray, spacing_ijk: Sequence[float],
                       direction: Optional[Sequence[float]] = None) -> str:
        # (client.Upload: a refusal the server answers before it has read the body, 413 over --max-body-mb,
        # is what the user reads, not the connection reset that follows it with urllib)
        upload = self.session_upload(image, spacing_ijk, chunk=64 << 20, direction=direction)
        while True:
            sid = upload.step()
            if sid is not None:
                return sid
            if upload.waiting():
                time.sleep(0.005)

    def session_upload(self, image: np.ndarray, spacing_ijk: Sequence[float], chunk: int = 4 << 20,
                       direction: Optional[Sequence[float]] = None) -> "Upload":
        """create_session a step at a time (Upload): `Upload.step()` returns the session's ID once the
        server has it, else None; each step compresses or sends at most `chunk` bytes. direction: the
        volume's 3x3 LPS direction, when its header says where it lies (layout.known_direction;
        meta.direction: the server gives the encoders its slices in the development volumes' layout,
        synpo/layout.py; a server from before it ignores it)."""
        return Upload(self, "/v1/sessions", *_session_message(image, spacing_ijk, direction), chunk=chunk,
                      answer=lambda reply: reply["session"])

    def session(self, sid: str) -> dict:
        return self.json("GET", "/v1/sessions/%s" % sid)

    def delete_session(self, sid: str) -> None:
        self.json("DELETE", "/v1/sessions/%s" % sid)

    def start_run(self, sid: str, support: np.ndarray, settings: Sequence[str] = (), modality: Optional[str] = None,
                  support_image: Optional[np.ndarray] = None, add: bool = False, confidence_all: bool = False,
                  absent: Optional[Dict[int, Sequence[int]]] = None) -> str:
        """Start a run; `add`: `support` holds paint on new slices, merged into the last run's support;
        confidence_all: the confidence of every slice, not only of those the walks reach;
        absent: {label: slices} where the label is absent (walks end there)."""
        arrays, meta = _run_message(support, settings, modality, support_image, add, confidence_all, absent)
        data, _ = self.request("POST", "/v1/sessions/%s/runs" % sid, wire.pack(arrays, meta), wire.CONTENT_TYPE)
        return json.loads(data.decode("utf-8"))["run"]

    def run_upload(self, sid: str, support: Optional[np.ndarray], settings: Sequence[str] = (), add: bool = False,
                   absent: Optional[Dict[int, Sequence[int]]] = None, chunk: int = 4 << 20,
                   axis: Optional[int] = None) -> "Upload":
        """start_run a step at a time (Upload): `Upload.step()` returns the run's ID once the server
        has started it, else None (a support label map of a large CT took half a second to pack).
        axis: a new run's slicing axis (0, 1, 2 across the array's k, j, i), else found from the paint."""
        return Upload(self, "/v1/sessions/%s/runs" % sid, *_run_message(support, settings, None, None, add, False,
                                                                          absent, axis),
                      chunk=chunk, answer=lambda reply: reply["run"])

    def status(self, sid: str, rid: str, since: int = 0, timeout: Optional[float] = None) -> dict:
        return self.json("GET", "/v1/sessions/%s/runs/%s?since=%d" % (sid, rid, since), timeout=timeout)

    def slices(self, sid: str, rid: str, since: int = 0) -> Tuple[List[Tuple[SliceRecord, Optional[np.ndarray]]], int]:
        """([(record, mask or None)] of the slices decided since `since`, the next `since`)."""
        arrays, meta = self.arrays("GET", "/v1/sessions/%s/runs/%s/slices?since=%d" % (sid, rid, since))
        out = [(SliceRecord.from_dict(r), arrays.get(r["mask"]) if r.get("mask") else None) for r in meta["slices"]]
        return out, int(meta["next"])

    def cancel(self, sid: str, rid: str, timeout: Optional[float] = None) -> dict:
        return self.json("POST", "/v1/sessions/%s/runs/%s/cancel" % (sid, rid), timeout=timeout)

    def result(self, sid: str, rid: str, confidence: str = "none") -> VolumeResult:
        """The finished run's VolumeResult; confidence: "none", "max" (stored under the first label
        and as the maximum) or "labels" (one map per label)."""
        arrays, meta = self.arrays("GET", "/v1/sessions/%s/runs/%s/result?confidence=%s" % (sid, rid, confidence),
                                   timeout=max(self.timeout, 600.0))
        return _volume_result(arrays, meta)

    def result_download(self, sid: str, rid: str, confidence: str = "none", chunk: int = 4 << 20
                        ) -> "ResultDownload":
        """result() a step at a time (ResultDownload)."""
        return ResultDownload(self, sid, rid, confidence, chunk)

    def redecode(self, sid: str, slice_index: int, positive, negative, label: Optional[int] = None,
                 axis: Optional[int] = None) -> Tuple[np.ndarray, float]:
        payload = {"slice": int(slice_index), "positive": np.asarray(positive, float).reshape(-1, 2).tolist(),
                   "negative": np.asarray(negative, float).reshape(-1, 2).tolist(), "label": label, "axis": axis}
        arrays, meta = self.arrays("POST", "/v1/sessions/%s/redecode" % sid, json.dumps(payload).encode("utf-8"),
                                   "application/json")
        return arrays["mask"], float(meta["iou"])

    def wait(self, sid: str, rid: str, progress: Optional[Callable[[str, int, int], None]] = None,
             interval: float = 0.25, cancel: Optional[Callable[[], bool]] = None) -> dict:
        """Poll until the run ends; returns its last status. Cancels it if `cancel()` turns True."""
        since, cancelled = 0, False
        while True:
            st = self.status(sid, rid, since)
            since = st["next"]
            if progress:
                progress(st["stage"], st["done"], st["total"])
            if st["state"] not in ACTIVE:
                return st
            if cancel is not None and not cancelled and cancel():
                self.cancel(sid, rid)
                cancelled = True
            time.sleep(interval)


def server_said(text: bytes, reason: str, code: int) -> str:
    """The one line of an HTTP error answer: the server's JSON "error" when it gave one."""
    try:
        said = json.loads(text.decode("utf-8")).get("error") or ""
    except Exception:
        said = ""
    return "the SynPo server said: %s (HTTP %d)" % (said or reason or "error", code)


def _session_message(image: np.ndarray, spacing_ijk: Sequence[float], direction: Optional[Sequence[float]] = None):
    """(arrays, meta) of a new session's message."""
    meta = {"spacing": [float(s) for s in spacing_ijk]}
    if direction is not None:
        meta["direction"] = [float(x) for x in np.asarray(direction, dtype=float).ravel()]
    return {"image": wire.compact_image(np.asarray(image))}, meta


def _run_message(support, settings, modality, support_image, add, confidence_all, absent, axis=None):
    """(arrays, meta) of a new run's message (axis: a new run's slicing axis, when given)."""
    arrays = {}
    if support is not None:
        support = np.asarray(support)
        arrays["support"] = support.astype(np.int32) if support.dtype.kind == "f" else support
    if support_image is not None:
        arrays["support_image"] = wire.compact_image(np.asarray(support_image))
    meta = {"set": list(settings), "modality": modality, "mode": "add" if add else "new",
            "confidence_all": bool(confidence_all),
            "absent": {str(int(k)): [int(t) for t in v] for k, v in (absent or {}).items()}}
    if axis is not None:
        meta["axis"] = int(axis)
    return arrays, meta


def _volume_result(arrays: Dict[str, np.ndarray], meta: dict) -> VolumeResult:
    """The VolumeResult of a result message's arrays and meta."""
    support = support_from_dict(meta["support"])
    conf = {}
    if "confidence" in arrays:
        conf = {v: arrays["confidence"] for v in support.labels}
    for v in support.labels:
        if "confidence_%d" % v in arrays:
            conf[v] = arrays["confidence_%d" % v]
    return VolumeResult(arrays["labels"], conf, [SliceRecord.from_dict(r) for r in meta["records"]], support,
                        meta["modality"], list(meta["features"]), dict(meta["timings"]),
                        [int(t) for t in meta.get("computed", [])])


class ResultDownload:
    """Client.result a step at a time, for a caller on a GUI thread (the Slicer module's timer, where
    one call froze Slicer while the server packed a large result and Slicer unpacked it). Each
    step() is one request for a part of the result (at most `chunk` bytes; the server answers at
    once, "packing" while it packs the message in a thread of its own) or decompresses at most `chunk`
    bytes of it (wire.Unpacker). step() returns the VolumeResult once done, else None; ServerError as
    Client.request gives it. A server that answers the whole message at once (one that does not
    send parts) is taken as it is."""

    def __init__(self, client: "Client", sid: str, rid: str, confidence: str = "none", chunk: int = 4 << 20):
        self.client, self.chunk = client, max(1, int(chunk))
        self.path = "/v1/sessions/%s/runs/%s/result?confidence=%s" % (sid, rid, confidence)
        self.parts: List[bytes] = []
        self.received = 0
        self.total: Optional[int] = None          # the message's bytes, once the server has packed it
        self.packing = False                      # the last answer: the server is still packing it
        self.unpacker: Optional[wire.Unpacker] = None

    def waiting(self) -> bool:
        """The server is still packing the result: only a later request can get it (as Upload.waiting)."""
        return self.packing

    def progress(self) -> int:
        """Per cent done: receiving counts half, decompressing the other half."""
        if self.unpacker is not None:
            return 50 + int(50 * self.unpacker.done // max(1, self.unpacker.declared))
        return int(50 * self.received // max(1, self.total or 1)) if self.total else 0

    def step(self) -> Optional[VolumeResult]:
        if self.unpacker is None:
            # The first request waits as long as result() did: a server without parts packs the whole
            # message before it answers. Parts come at once (202 while packing); a part gets a minute.
            first = self.total is None and not self.packing
            data, headers, status = self.client.exchange(
                "GET", "%s&offset=%d&length=%d" % (self.path, self.received, self.chunk),
                timeout=max(self.client.timeout, 600.0 if first else 60.0))
            self.packing = status == 202
            if self.packing:                       # still packing on the server
                return None
            total = headers.get(wire.PART_TOTAL)
            if total is None:                      # the whole message in one answer
                self.parts, self.received, self.total = [data], len(data), len(data)
            else:
                self.total = int(total)
                if not data and self.received < self.total:
                    raise ServerError("the server at %s sent %d of the result's %d bytes, then nothing"
                                      % (self.client.url, self.received, self.total))
                self.parts.append(data)
                self.received += len(data)
            if self.received < self.total:
                return None
            try:
                self.unpacker = wire.Unpacker(b"".join(self.parts), chunk=self.chunk)
            except SynPoError as exc:
                raise ServerError("the server's answer is malformed: %s" % exc) from None
            self.parts = []
            return None
        try:
            if not self.unpacker.step():
                return None
        except SynPoError as exc:
            raise ServerError("the server's answer is malformed: %s" % exc) from None
        return _volume_result(self.unpacker.arrays, self.unpacker.meta)


class Upload:
    """A POST of a wire message, a step at a time: compressing it (wire.Packer), sending it, waiting
    for the answer. Each step() is short (at most `chunk` bytes compressed or sent; the answer is
    read only once it has arrived), so the Slicer module's timer can drive it on the main thread,
    where PythonQt holds the GIL while Qt idles (a Python thread would not run) and a one-call upload
    froze Slicer for seconds on a large CT. step() returns answer(the JSON reply) once done, else
    None; ServerError as Client.request gives it. Behind a proxy configured for the URL, the body is
    sent in one request (urllib's proxy handling)."""

    PIECE = 64 << 10                       # bytes handed to the socket at a time, only while it takes them

    def __init__(self, client: "Client", path: str, arrays: Dict[str, np.ndarray], meta: dict,
                 chunk: int = 4 << 20, answer: Callable[[dict], object] = lambda reply: reply,
                 timeout: float = 600.0):
        self.client, self.path, self.chunk, self.answer = client, path, max(1, int(chunk)), answer
        self.timeout = max(client.timeout, timeout)
        self.packer = wire.Packer(arrays, meta, chunk=self.chunk)
        self.body: Optional[bytes] = None
        self.sent = 0
        self.conn: Optional[http.client.HTTPConnection] = None
        self._since = 0.0

    def progress(self) -> int:
        """Per cent done: compressing counts the arrays' bytes, sending the message's (a per cent, not
        bytes: a progress bar's maximum is a 32-bit int)."""
        total = self.packer.total + (len(self.body) if self.body is not None else self.packer.total)
        return int(100 * (self.packer.done + self.sent) // max(1, total))

    def waiting(self) -> bool:
        """Everything is sent: only the server's answer is left (a step then only looks for it)."""
        return self.body is not None and self.conn is not None and self.sent >= len(self.body)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _open(self) -> None:
        parsed = urllib.parse.urlparse(self.client.url)
        if parsed.scheme == "https":
            conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=self.timeout,
                                               context=self.client.context)
        else:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=self.timeout)
        conn.putrequest("POST", (parsed.path.rstrip("/") or "") + self.path)
        conn.putheader("Accept", "application/json")
        if self.client.token:
            conn.putheader("Authorization", "Bearer " + self.client.token)
        conn.putheader("Content-Type", wire.CONTENT_TYPE)
        conn.putheader("Content-Length", str(len(self.body)))
        conn.endheaders()
        self.conn, self._since = conn, time.monotonic()     # _since: the last byte sent (timeout)

    def _proxied(self) -> bool:
        parsed = urllib.parse.urlparse(self.client.url)
        return (bool(urllib.request.getproxies().get(parsed.scheme))
                and not urllib.request.proxy_bypass(parsed.hostname or ""))

    def step(self):
        if self.body is None:
            if not self.packer.step():
                return None
            self.body = self.packer.message()
            if self._proxied():
                data, _ = self.client.request("POST", self.path, self.body, wire.CONTENT_TYPE, timeout=self.timeout)
                self.sent = len(self.body)
                return self.answer(json.loads(data.decode("utf-8")))
            return None
        try:
            if self.conn is None:
                self._open()
                return None
            # An answer may come before the whole body is sent (401, or 413 on the Content-Length):
            # that answer, not the broken pipe that would follow, is what the user is told.
            arrived = self._arrived()
            if arrived is None and self.sent < len(self.body):
                self._send()
                return None
            if arrived is None:
                if time.monotonic() - self._since > self.timeout:
                    raise socket.timeout("no answer %.0f s after the last byte was sent" % self.timeout)
                return None
            response = http.client.HTTPResponse(_Replayed(arrived, self.conn.sock), method="POST")
            response.begin()
            data = response.read()
            status, reason = response.status, response.reason
        except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            self.close()
            raise self.client.unreachable(exc if isinstance(exc, ssl.SSLCertVerificationError)
                                          else getattr(exc, "reason", None) or str(exc) or type(exc).__name__) from None
        self.close()
        if status >= 400:
            raise ServerError(server_said(data, reason, status), status)
        try:
            return self.answer(json.loads(data.decode("utf-8")))
        except (ValueError, KeyError, TypeError):
            raise ServerError("the server at %s answered something unexpected" % self.client.url) from None

    def _send(self) -> None:
        """Up to `chunk` bytes of the body, a piece at a time while the socket takes them without
        waiting (a slow link never holds the step); a refused write is left to _arrived()."""
        import select
        sock, limit = self.conn.sock, min(len(self.body), self.sent + self.chunk)
        while self.sent < limit and select.select([], [sock], [], 0.01)[1]:
            sock.setblocking(False)
            try:
                n = sock.send(memoryview(self.body)[self.sent:min(limit, self.sent + self.PIECE)])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                n = 0
            except OSError:                      # the server answered and closed: read its answer next
                return
            finally:
                sock.settimeout(self.timeout)
            if n <= 0:
                return
            self.sent += n
            self._since = time.monotonic()

    def _arrived(self) -> Optional[bytes]:
        """The answer's first bytes once some have arrived, else None. Read, not just polled: a TLS
        socket is readable for records that carry no data (TLS 1.3's session tickets, sent after the
        handshake), and answering then blocked until the server gave up waiting for the body."""
        import select
        sock = self.conn.sock
        if not select.select([sock], [], [], 0)[0]:
            return None
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        finally:
            sock.settimeout(self.timeout)
        if not data:
            raise ConnectionError("the server closed the connection without an answer")
        return data


class _Replayed:
    """A socket for http.client.HTTPResponse whose first bytes were already read (Upload._arrived)."""

    def __init__(self, first: bytes, sock):
        self.first, self.sock = first, sock

    def makefile(self, mode: str):
        return io.BufferedReader(_ReplayedStream(self.first, self.sock))


class _ReplayedStream(io.RawIOBase):
    """`first`, then what the socket still receives."""

    def __init__(self, first: bytes, sock):
        super().__init__()
        self.first, self.sock = first, sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.first:
            n = min(len(buffer), len(self.first))
            buffer[:n] = self.first[:n]
            self.first = self.first[n:]
            return n
        return self.sock.recv_into(buffer)


def run_remote(client: Client, image: np.ndarray, spacing_ijk, support: np.ndarray, settings: Sequence[str] = (),
               modality: Optional[str] = None, support_image: Optional[np.ndarray] = None, confidence: str = "none",
               progress: Optional[Callable[[str, int, int], None]] = None, confidence_all: bool = False,
               absent: Optional[Dict[int, Sequence[int]]] = None,
               direction: Optional[Sequence[float]] = None) -> VolumeResult:
    """One whole segmentation through the server: upload, run, download; the session is deleted
    after (and the run cancelled when interrupted). A session the server evicted before the run's
    request reached it (another client's upload on a server with a small --max-memory-mb) is sent
    again, up to RESENDS times, as the Slicer module does. direction: as Client.session_upload."""
    sid = client.create_session(image, spacing_ijk, direction)
    rid = None
    try:
        for tries in range(RESENDS + 1):
            try:
                rid = client.start_run(sid, support, settings, modality, support_image,
                                       confidence_all=confidence_all, absent=absent)
                break
            except ServerError as exc:
                if exc.status != 404 or tries == RESENDS:
                    raise
            sid = client.create_session(image, spacing_ijk, direction)
        st = client.wait(sid, rid, progress)
        if st["state"] != "done":
            raise ServerError("the server's run %s: %s" % (st["state"], st["error"] or "no result"))
        return client.result(sid, rid, confidence)
    except KeyboardInterrupt:
        if rid is not None:
            try:
                client.cancel(sid, rid)
            except SynPoError:
                pass
        raise
    finally:
        try:
            client.delete_session(sid)
        except SynPoError:
            pass
