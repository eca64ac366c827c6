"""`synpo serve`: the engine as an HTTP service (FastAPI on uvicorn).

Paths (all but health need `Authorization: Bearer TOKEN`; bodies and results of arrays are
wire.py messages, the rest JSON; every error is {"error": "one line"} with a 4xx/5xx status):

    GET    /v1/health                                   no token; version, models, limits (HEAD: the status)
    POST   /v1/sessions                                 wire: image [k,j,i]; meta: spacing (mm along i,j,k),
                                                        direction (optional, 9 numbers, ITK's LPS, row-major;
                                                        leave it out for a placeholder header: layout.py)
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

The routes are in routes/ (one module per resource), the token file in tokens.py; this file makes
the application (create_app: the token, the body limit, the errors) and runs the command.
"""
import hmac
import ipaddress
import logging
import math
import os
import shutil
import socket
import sys
import time
from typing import Optional

from . import __version__
from .errors import SynPoError
from .tokens import make_token_file, read_token_file, reusable_token  # noqa: F401 (SynPoSlicerLib.engine's import)

DEFAULT_PORT = 8765
DEFAULT_MEMORY_MB = 8192             # --max-memory-mb
log = logging.getLogger("synpo.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(service, token: str, max_body_bytes: int, max_array_bytes: Optional[int] = None):
    """The FastAPI application over a `service.Service`: the routes of routes/ (one module per
    resource), behind the token and the body limit; every error answers {"error": "one line"}."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .routes import ROUTERS
    from .routes.common import Refused
    from .service import Busy, NotFound

    app = FastAPI(title="SynPo", version=__version__, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.max_body_bytes = max_body_bytes
    app.state.max_array_bytes = max_array_bytes or max(max_body_bytes * 16, 1 << 30)

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

    for router in ROUTERS:
        app.include_router(router)
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
    p.add_argument("--max-memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                   help="sessions together hold at most this much (images, embeddings, results); beyond it the "
                        "least recently used idle sessions are evicted (default %d)" % DEFAULT_MEMORY_MB)
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
