"""`synpo serve`: the engine as an HTTP service (FastAPI on uvicorn).

Paths (all but health need `Authorization: Bearer TOKEN`; bodies and results of arrays are
wire.py messages, the rest JSON; every error is {"error": "one line"} with a 4xx/5xx status):

    GET    /v1/health                                   no token; version, models, limits
    POST   /v1/sessions                                 wire: image [k,j,i]; meta: spacing (mm along i,j,k)
    GET    /v1/sessions                                 the sessions held, memory used and budget
    GET    /v1/sessions/{sid}                           what the session holds
    DELETE /v1/sessions/{sid}
    POST   /v1/sessions/{sid}/runs                      wire: support (+ support_image); meta: set, modality,
                                                        mode ("new"; "add": corrections on the last run),
                                                        absent ({label: [slices]}), confidence_all,
                                                        axis (a new run's slicing axis 0/1/2; else the paint's)
    GET    /v1/sessions/{sid}/runs/{rid}?since=N        state, progress, the slices decided since N
    GET    /v1/sessions/{sid}/runs/{rid}/slices?since=N wire: those slices' masks
    POST   /v1/sessions/{sid}/runs/{rid}/cancel
    GET    /v1/sessions/{sid}/runs/{rid}/result?confidence=none|max|labels   wire: labels (+ confidence)
           ...&offset=N&length=M                        that message in parts: 202 {"state": "packing"} until
                                                        it is packed, then its bytes N..N+M, the message's
                                                        length in the header X-SynPo-Total
    POST   /v1/sessions/{sid}/redecode                  JSON: slice, positive, negative, label, axis -> wire: mask

The server never opens a path a client names, never logs tokens or image content, and binds
127.0.0.1 unless told otherwise (then only with a token file).
"""
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import time
from typing import Optional

import numpy as np

from . import __version__
from . import wire
from .errors import SynPoError

API = 1
DEFAULT_PORT = 8765
log = logging.getLogger("synpo.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_REDECODE_POINTS = 256             # a user clicks a handful; 100,000 made SAM ask for 320 GB


def make_token_file(path: str) -> str:
    """A fresh random token written to `path`, readable by the user only; returns the token."""
    token = secrets.token_urlsafe(32)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp-%d" % os.getpid()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise SynPoError("cannot write the token file %s: %s" % (path, exc.strerror or exc)) from None
    return token


def reusable_token(path: str) -> Optional[str]:
    """The token already in `path` when another `synpo serve` wrote it there for this user (a file of
    this user's, which no one else may read or write, holding one token): servers started without
    --token-file on one machine share the default token file, so a second one keeps the token the
    first one's clients read (making a fresh one locked them out: 401). None: make a fresh one."""
    try:
        info = os.stat(path)
        if os.name == "posix" and (info.st_uid != os.getuid() or info.st_mode & 0o077):
            return None
        return read_token_file(path)
    except (OSError, SynPoError):
        return None


def read_token_file(path: str) -> str:
    try:
        with open(path) as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise SynPoError("cannot read the token file %s: %s" % (path, exc.strerror or exc)) from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() or ord(c) > 127 for c in token):
        # (printable ASCII, as clients take it: an HTTP header carries no other, so a UTF-8 token was
        # one no client could send, every request 401)
        raise SynPoError("the token file %s must hold one token of at least 16 printable ASCII characters, "
                         "without spaces" % path)
    return token


def _is_int(value) -> bool:
    """A JSON integer (true and false are ints to Python: not slice 1 and 0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def create_app(service, token: str, max_body_bytes: int, max_array_bytes: Optional[int] = None):
    """The FastAPI application over a `service.Service`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from .result import support_to_dict
    from .service import Busy, NotFound

    max_array_bytes = max_array_bytes or max(max_body_bytes * 16, 1 << 30)
    app = FastAPI(title="SynPo", version=__version__, docs_url=None, redoc_url=None)

    class Refused(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(Refused)
    async def _refused(request, exc: Refused):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, "invalid request: %s %s" % (where, first.get("msg", "")))

    @app.exception_handler(NotFound)
    async def _not_found(request, exc):
        return error(404, str(exc))

    @app.exception_handler(Busy)
    async def _busy(request, exc):
        return error(409, str(exc))

    @app.exception_handler(SynPoError)
    async def _bad_input(request, exc):
        return error(400, str(exc))

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        # Before anything else: a request without the right token reads no body and changes nothing.
        if request.url.path != "/v1/health":
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return error(401, "this server needs a token: send 'Authorization: Bearer TOKEN'")
            if not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
                return error(401, "wrong token")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_body_bytes:
                return error(413, "the request body is %.1f MB; this server accepts at most %d MB (--max-body-mb)"
                             % (int(length) / 2 ** 20, max_body_bytes >> 20))      # (2.9 MB read "2 MB")
        return await call_next(request)

    async def body_of(request: Request) -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise Refused(413, "the request body is larger than this server accepts (%d MB, --max-body-mb)"
                                  % (max_body_bytes >> 20))
                chunks.append(chunk)
        except ClientDisconnect:
            # A client that stopped sending (the Slicer module's Cancel during an upload): nothing was
            # made; no traceback in the log.
            raise Refused(400, "the client went away before the whole request body arrived") from None
        return b"".join(chunks)

    async def message_of(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != wire.CONTENT_TYPE:
            raise Refused(415, "send the arrays as %s (synpo.wire)" % wire.CONTENT_TYPE)
        data = await body_of(request)
        return await run_in_threadpool(wire.unpack, data, max_array_bytes)

    def packed(arrays, meta) -> Response:
        return Response(wire.pack(arrays, meta), media_type=wire.CONTENT_TYPE)

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "synpo": __version__, "api": API, "models": service.models.describe(),
                "limits": {"max_body_mb": max_body_bytes >> 20, "max_memory_mb": service.budget_bytes >> 20,
                           "session_ttl_s": service.ttl_seconds}}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request):
        arrays, meta = await message_of(request)
        image = arrays.get("image")
        if image is None:
            raise Refused(400, "the body holds no array named 'image'")
        spacing = meta.get("spacing")
        if not isinstance(spacing, list) or len(spacing) != 3:
            raise Refused(400, "meta.spacing must be 3 numbers: the voxel size in mm along i, j, k")
        try:
            if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in spacing):
                raise TypeError                    # (true read as 1 mm, "2" as 2 mm)
            spacing = [float(s) for s in spacing]
        except (TypeError, ValueError):
            raise Refused(400, "meta.spacing must be 3 numbers: the voxel size in mm along i, j, k") from None
        entry = await run_in_threadpool(service.create, image, spacing, {})
        return service.describe(entry)

    @app.get("/v1/sessions")
    async def list_sessions():
        entries = service.sessions()
        return {"sessions": [service.describe(e) for e in entries.values()],
                "memory_mb": round(service.memory_bytes() / 2 ** 20, 2), "max_memory_mb": service.budget_bytes >> 20,
                "evictions": service.evictions}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str):
        return service.describe(service.get(sid))

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        service.delete(sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/runs", status_code=202)
    async def start_run(sid: str, request: Request):
        entry = service.get(sid)
        arrays, meta = await message_of(request)
        mode = meta.get("mode", "new")
        if mode not in ("new", "add"):
            raise Refused(400, "meta.mode must be 'new' or 'add', not %r" % (mode,))
        settings = {"set": meta.get("set") or [], "modality": meta.get("modality"),
                    "confidence_all": bool(meta.get("confidence_all", False)), "absent": {}}
        absent = meta.get("absent") or {}
        try:
            if not isinstance(absent, dict):
                raise ValueError
            if any(not isinstance(v, list) or not all(_is_int(t) for t in v) for v in absent.values()):
                raise TypeError                    # ("12" read as slices 1 and 2, 1.5 as slice 1)
            settings["absent"] = {int(k): [int(t) for t in v] for k, v in absent.items()}
        except (TypeError, ValueError):
            raise Refused(400, "meta.absent must map labels to lists of slice indices, e.g. {\"1\": [12, 13]}") from None
        if not isinstance(settings["set"], list) or not all(isinstance(s, str) for s in settings["set"]):
            raise Refused(400, "meta.set must be a list of 'SECTION.FIELD=VALUE' strings")
        if settings["modality"] not in (None, "ct", "mr"):
            raise Refused(400, "meta.modality must be 'ct', 'mr' or null")
        settings["axis"] = meta.get("axis")
        if settings["axis"] is not None and (not _is_int(settings["axis"]) or not 0 <= settings["axis"] <= 2):
            raise Refused(400, "meta.axis must be 0, 1 or 2 (the slicing axis across the array's k, j, i) or null")
        support = arrays.get("support")
        if support is not None and support.dtype.kind not in "iub":
            raise Refused(400, "the support has dtype %s; integer labels are needed" % support.dtype)
        run = await run_in_threadpool(service.start_run, entry, support, settings, arrays.get("support_image"),
                                      mode == "add")
        return {"run": run.id, "session": sid, "state": run.state}

    @app.get("/v1/sessions/{sid}/runs/{rid}")
    async def run_status(sid: str, rid: str, since: int = 0):
        return service.get_run(service.get(sid), rid).status(max(0, since))

    @app.get("/v1/sessions/{sid}/runs/{rid}/slices")
    async def run_slices(sid: str, rid: str, since: int = 0):
        run = service.get_run(service.get(sid), rid)
        records, arrays = await run_in_threadpool(run.slice_masks, max(0, since))
        return packed(arrays, {"slices": records, "next": max(0, since) + len(records), "state": run.state})

    @app.post("/v1/sessions/{sid}/runs/{rid}/cancel")
    async def cancel_run(sid: str, rid: str):
        run = service.get_run(service.get(sid), rid)
        run.cancel_event.set()
        run.drop_packed()                   # a client that stops fetching the result in parts says so
        run.fetched = True                  # (its session may be evicted now: service.Entry.awaiting_fetch)
        return {"run": rid, "state": run.state, "cancel": "requested"}

    @app.get("/v1/sessions/{sid}/runs/{rid}/result")
    async def run_result(sid: str, rid: str, confidence: str = "none", offset: Optional[int] = None,
                         length: int = 4 << 20):
        run = service.get_run(service.get(sid), rid)
        if confidence not in ("none", "max", "labels"):
            raise Refused(400, "confidence must be none, max or labels")
        if offset is not None and (offset < 0 or length < 1):
            raise Refused(400, "offset must be >= 0 and length >= 1")
        if run.state != "done":
            raise Busy("run %s is %s%s" % (rid, run.state, (": " + run.error) if run.error else ""))
        result = run.result
        if result is None:
            raise NotFound("the result of run %s is no longer kept; start the run again" % rid)

        def build():
            from .outputs import max_confidence
            arrays = {"labels": result.labels}
            if confidence == "max":
                arrays["confidence"] = max_confidence(result)
            elif confidence == "labels":
                for v in result.support.labels:
                    arrays["confidence_%d" % v] = result.confidence[v]
            meta = {"records": [r.to_dict() for r in result.records], "support": support_to_dict(result.support),
                    "modality": result.modality, "features": list(result.features),
                    "timings": {k: round(v, 4) for k, v in result.timings.items()}, "computed": result.computed}
            return wire.pack(arrays, meta)
        if offset is None:
            message = await run_in_threadpool(build)
            run.fetched = True
            return Response(message, media_type=wire.CONTENT_TYPE)
        # In parts (client.ResultDownload: a client on a GUI thread): packed once, in a thread; each
        # request answers at once, 202 while packing, else `length` bytes from `offset` and the total.
        message = run.packed_result(confidence, build)
        if message is None:
            return JSONResponse({"state": "packing"}, status_code=202)
        part = message[offset:offset + length]
        if offset + len(part) >= len(message):
            run.drop_packed(confidence)
            run.fetched = True
        return Response(part, media_type="application/octet-stream", headers={wire.PART_TOTAL: str(len(message))})

    @app.post("/v1/sessions/{sid}/redecode")
    async def redecode(sid: str, request: Request):
        entry = service.get(sid)
        try:
            body = json.loads((await body_of(request)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, RecursionError):
            raise Refused(400, "the body must be a JSON object: slice, positive, negative (and label, axis)") from None
        if not _is_int(body.get("slice")):
            raise Refused(400, "slice must be an integer slice index")
        try:
            pos = np.asarray(body.get("positive", []), dtype=float).reshape(-1, 2)
            neg = np.asarray(body.get("negative", []), dtype=float).reshape(-1, 2)
        except (TypeError, ValueError):
            raise Refused(400, "positive and negative must be lists of [x, y] points") from None
        if len(pos) + len(neg) > MAX_REDECODE_POINTS:       # (SAM's cost grows with the square of the count)
            raise Refused(400, "at most %d points in all" % MAX_REDECODE_POINTS)
        label, axis = body.get("label"), body.get("axis")
        if label is not None and not _is_int(label) or axis is not None and not _is_int(axis):
            raise Refused(400, "label and axis must be integers")
        import time
        t0 = time.perf_counter()
        mask, iou = await run_in_threadpool(service.redecode, entry, body["slice"], pos, neg, label, axis)
        return packed({"mask": mask}, {"iou": iou, "seconds": round(time.perf_counter() - t0, 4)})

    return app


# ---------------------------------------------------------------------- the command

def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other needs --token-file)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %d; 0 = any free port)" % DEFAULT_PORT)
    p.add_argument("--token-file", metavar="FILE",
                   help="read the token clients must send from FILE; without it a random token is written to "
                        "--token-out (readable by you only; the default file's token is kept when it holds one, "
                        "so servers started without --token-file share it)")
    p.add_argument("--token-out", metavar="FILE",
                   help="where a generated token is written (default: server-token in the synpo cache: "
                        "$SYNPO_CACHE, else $XDG_CACHE_HOME/synpo, else ~/.cache/synpo)")
    p.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--features", default="auto", choices=("auto", "synergy", "sam", "dinov2"))
    p.add_argument("--dinov2", default="small", choices=("small", "base", "large", "giant"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    from .cli import add_runtime_option
    add_runtime_option(p)
    p.add_argument("--max-memory-mb", type=int, default=8192,
                   help="sessions together hold at most this much (images, embeddings, results); beyond it the "
                        "least recently used idle sessions are evicted (default 8192)")
    p.add_argument("--session-ttl", type=float, default=3600.0,
                   help="seconds after which an unused session is deleted (default 3600)")
    p.add_argument("--max-body-mb", type=int, default=1024,
                   help="largest request body accepted; larger ones get 413 (default 1024)")
    p.add_argument("--max-runs", type=int, default=1,
                   help="runs computed at the same time; others wait in a queue (default 1)")
    p.add_argument("--embedding-cache", metavar="DIR", help="keep embeddings on disk between server restarts")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--ready-file", metavar="FILE", help="write the server's URL to FILE once it accepts requests")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="exit when process PID ends (the program that started this server, e.g. 3D Slicer)")
    p.add_argument("--owned-folder", metavar="DIR",
                   help="a folder made for this server alone, holding its --token-file (and its ready file and log): "
                        "removed when the --parent-pid process has ended and the server exits, since nobody is "
                        "left to remove it (SynPoSlicerLib.engine.ServerProcess's folder)")
    p.add_argument("--access-log", action="store_true", help="log every request's method, path and status")
    p.add_argument("--quiet", action="store_true", help="log warnings only")


def check_arguments(args) -> None:
    """Refusals before anything starts (one line, exit 2 in the CLI)."""
    if not is_loopback(args.host) and not args.token_file:
        raise SynPoError("--host %s is reachable from other machines: give --token-file FILE (a secret token "
                         "you share with the clients), and use --tls-cert/--tls-key or an SSH tunnel" % args.host)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SynPoError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path and not os.path.isfile(path):
            raise SynPoError("TLS file not found: %s" % path)
    if args.tls_cert:                    # (uvicorn loads them after the ready file is written: a traceback)
        import ssl
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise SynPoError("--tls-cert %s / --tls-key %s cannot be loaded: %s" % (
                args.tls_cert, args.tls_key, getattr(exc, "reason", None) or exc)) from None
    for option in ("ready_file", "token_out"):
        path = getattr(args, option, None)
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            raise SynPoError("--%s %s: give a file in an existing folder" % (option.replace("_", "-"), path))
    for name in ("max_memory_mb", "max_body_mb", "max_runs"):
        if getattr(args, name) < 1:
            raise SynPoError("--%s must be >= 1" % name.replace("_", "-"))
    if not math.isfinite(args.session_ttl) or args.session_ttl <= 0:
        raise SynPoError("--session-ttl must be a number of seconds > 0")
    if not 0 <= args.port <= 65535:
        raise SynPoError("--port must be 0..65535")
    if getattr(args, "parent_pid", None) is not None:
        from .lifeline import alive
        if args.parent_pid <= 0 or not alive(args.parent_pid):
            owned = getattr(args, "owned_folder", None)
            if owned and args.token_file and os.path.dirname(os.path.abspath(args.token_file)) == os.path.abspath(owned):
                shutil.rmtree(owned, ignore_errors=True)     # (its maker is gone: nobody else removes it)
            raise SynPoError("--parent-pid %d: no such process" % args.parent_pid)
    owned = getattr(args, "owned_folder", None)
    if owned:
        # Only a folder that holds this server's token file: a mistyped path never removes a user's folder.
        inside = args.token_file and os.path.dirname(os.path.abspath(args.token_file)) == os.path.abspath(owned)
        if getattr(args, "parent_pid", None) is None or not os.path.isdir(owned) or not inside:
            raise SynPoError("--owned-folder DIR goes with --parent-pid, and DIR must be the folder that holds "
                             "--token-file")


def run_server(args) -> int:
    import uvicorn
    from .client import default_token_path
    from .service import Service
    from .session import Models

    check_arguments(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="synpo serve: %(message)s", stream=sys.stderr)
    if args.token_file:
        token, where = read_token_file(args.token_file), args.token_file
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise SynPoError("cannot listen on %s:%d: %s" % (args.host, args.port, exc.strerror or exc)) from None
    sock.listen(128)                 # connections wait in the backlog until the server accepts them
    if not args.token_file:          # only now: a second server refused its port left the first one's token alone
        where = args.token_out or default_token_path()
        token = (None if args.token_out else reusable_token(where)) or make_token_file(where)
    models = Models.load(args.sam, args.features, args.dinov2, args.device, args.precision, quiet=args.quiet,
                         runtime=args.runtime)
    service = Service(models, args.max_memory_mb << 20, args.session_ttl, args.max_runs, args.embedding_cache)
    service.start_reaper()
    app = create_app(service, token, args.max_body_mb << 20)
    port = sock.getsockname()[1]
    scheme = "https" if args.tls_cert else "http"
    host = "[%s]" % args.host if ":" in args.host else args.host
    url = "%s://%s:%d" % (scheme, host, port)
    print("synpo serve: %s on %s, listening on %s; token in %s" % (models.sam_name, models.device, url, where),
          flush=True)
    if args.ready_file:
        try:
            with open(args.ready_file, "w") as handle:
                handle.write(url + "\n")
        except OSError as exc:
            raise SynPoError("cannot write the ready file %s: %s" % (args.ready_file, exc.strerror or exc)) from None
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=args.access_log and not args.quiet,
                            ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if getattr(args, "parent_pid", None) is not None:
        from .lifeline import watch_parent
        try:
            watch_parent(args.parent_pid, lambda: _parent_gone(server, args.parent_pid,
                                                               owned=getattr(args, "owned_folder", None)))
        except ValueError:           # it ended while the models loaded: nobody is left to remove the folder
            _parent_gone(server, args.parent_pid, grace=0.0, owned=getattr(args, "owned_folder", None))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:        # (uvicorn raises the captured SIGINT again once it has shut down)
        pass
    # Stopped (Ctrl+C, the parent gone; SIGTERM's default action, which uvicorn raises again, ends the process
    # before this line with status 143): a run may still be inside torch or OpenVINO in a worker
    # thread, and the interpreter's finalisation under it aborted the process (exit 134, "terminate called
    # without an active exception"). Nothing is left to write: leave without finalising.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _parent_gone(server, pid: int, grace: float = 10.0, owned: Optional[str] = None) -> None:
    """The process that started the server is gone: stop accepting requests and exit (running
    requests get `grace` seconds; a run in progress in a worker thread does not hold the exit).
    owned: the folder made for this server (--owned-folder), removed with its token: the program
    that made it, which removes it on a normal stop, has ended (a crashed 3D Slicer)."""
    logging.getLogger(__name__).warning("process %d that started this server has ended; exiting", pid)
    if owned:
        # Before the server is told to stop: its main thread leaves with os._exit once uvicorn has shut
        # down. (On Windows the log, this process's own open output, stays until the process has ended.)
        shutil.rmtree(owned, ignore_errors=True)
    server.should_exit = True
    time.sleep(grace)
    os._exit(0)
