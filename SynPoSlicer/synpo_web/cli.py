"""`synpo web`: its options, the safety checks, and the trame server.

    synpo web [--host 127.0.0.1] [--port 8080] [--server URL --token-file F] [--password-file F]
              [--max-upload-mb 512] [--sam litemedsam] [--features auto] [--device auto] [--idle-exit 0]

Loopback only unless --host comes with --password-file (the page then asks for it: HTTP basic
authentication, any user name). Segmentation runs in a `synpo serve` process: one this command
starts on a free loopback port (with a fresh token), or the one at --server.
"""
import atexit
import hmac
import ipaddress
import math
import os
import sys

from synpo.errors import SynPoError

LOOPBACK_NAMES = ("localhost",)


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this computer only); any other needs "
                        "--password-file")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--password-file", metavar="FILE",
                   help="a file holding the page's password (HTTP basic authentication, any user name); "
                        "required with a --host other than loopback")
    p.add_argument("--server", metavar="URL", help="segment on this `synpo serve` (default: start one here)")
    p.add_argument("--token-file", metavar="FILE", help="the --server's token (default: $SYNPO_TOKEN, else the "
                                                        "file `synpo serve` writes)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest volume upload (default 512 MB)")
    p.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"),
                   help="the local server's SAM model")
    p.add_argument("--features", default="auto", choices=("auto", "synergy", "sam", "dinov2"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="the local server's device")
    p.add_argument("--embedding-cache", metavar="DIR", help="the local server's embedding cache")
    p.add_argument("--ready-file", metavar="FILE", help="write the page's URL to FILE once it accepts connections")
    p.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                   help="end synpo web this many seconds after its last page closed, or after it started if no "
                        "page opens (default 0: never; Ctrl+C ends it). trame's own default ended it, with the "
                        "scene and everything painted, 5 minutes after a tab closed")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_urls(host: str, port: int):
    """(the URL to print, the URL for --ready-file) of a page listening on host:port. A wildcard host
    (0.0.0.0, ::) is no address to open: others reach this machine by its name, and this machine by
    loopback (the ready file's reader is a script here)."""
    def url(h):
        return "http://%s:%d/" % (h if ":" not in h else "[%s]" % h, port)
    if host in ("0.0.0.0", "::", ""):
        import socket
        here = url("127.0.0.1" if host == "0.0.0.0" else "::1")
        return "%s from other computers (listening on every interface; %s here)" % (url(socket.gethostname()),
                                                                                     here), here
    return url(host), url(host)


def read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as handle:          # (a BOM, as Notepad writes it, is not the password)
            secret = handle.read().strip()
    except OSError as exc:
        raise SynPoError("cannot read the %s file %s: %s" % (what, path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise SynPoError("the %s file %s is not UTF-8 text" % (what, path)) from None
    if len(secret) < 8:
        raise SynPoError("the %s in %s is shorter than 8 characters" % (what, path))
    return secret


def check_arguments(args) -> None:
    """Refuse unsafe or inconsistent options with one line (before anything starts)."""
    if not is_loopback(args.host) and not args.password_file:
        raise SynPoError("--host %s makes the page reachable from other computers: give --password-file FILE "
                         "too (or keep the default 127.0.0.1)" % args.host)
    if args.token_file and not args.server:
        raise SynPoError("--token-file is for --server URL; without --server, synpo web starts its own server")
    if not 0 <= args.port <= 65535:
        raise SynPoError("--port %d is not a port number" % args.port)
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise SynPoError("--max-upload-mb must be a number of MB > 0")
    if not (math.isfinite(args.idle_exit) and args.idle_exit >= 0):
        raise SynPoError("--idle-exit must be a number of seconds >= 0 (0: never)")


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (one line, before the local server is started:
    trame's bind failed later, with a traceback). Port 0 (any free port) always binds."""
    import socket
    try:                              # (also for port 0: an unknown host before the local server starts)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SynPoError("--host %s: %s" % (host, exc.strerror or exc)) from None
    if port == 0:
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        if hasattr(socket, "SO_REUSEADDR") and os.name != "nt":   # as aiohttp binds: a port in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SynPoError("cannot listen on %s port %d: %s (another program uses it? give another --port, or "
                             "--port 0 for any free one)" % (host, port, exc.strerror or exc)) from None


def basic_auth_middleware(password: str):
    """aiohttp middleware: every request (the page, its files, the websocket) needs the password."""
    import base64
    from aiohttp import web

    @web.middleware
    async def check(request, handler):
        header = request.headers.get("Authorization", "")
        given = ""
        if header.startswith("Basic "):
            try:
                given = base64.b64decode(header[6:]).decode("utf-8", "replace").split(":", 1)[-1]
            except ValueError:
                given = ""
        if not hmac.compare_digest(given.encode(), password.encode()):
            return web.Response(status=401, text="SynPo web: password needed",
                                headers={"WWW-Authenticate": 'Basic realm="SynPo web"'})
        return await handler(request)
    return check


def run(args) -> int:
    check_arguments(args)
    password = read_secret(args.password_file, "password") if args.password_file else None
    check_port(args.host, args.port)
    remote = None
    if args.server:
        from synpo.client import Client, ServerError, find_token
        # The page's logic takes the token *file* (PreviewLogic.useServer, as the module's Token file
        # field; "" = $SYNPO_TOKEN, else serve's default file); the token itself is only checked here.
        remote = (args.server, args.token_file or "")
        client = Client(args.server, find_token(args.token_file), 10.0)
        client.health()                                 # a wrong URL: one line, before the page starts
        try:
            client.session("synpo-web-token-check")    # a wrong token: 401, a right one: 404
        except ServerError as exc:
            if exc.status in (401, 403):
                raise SynPoError("the server at %s refused the token%s" % (
                    args.server, " in %s" % args.token_file if args.token_file else "")) from None
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    # trame reads sys.argv for its own options: ours are parsed already.
    sys.argv = sys.argv[:1]
    try:
        from trame.app import get_server
        from .app import SynPoWeb
    except ImportError as exc:
        raise SynPoError("synpo web needs trame-slicer and slicer-core: pip install 'synpo[web]' (%s)" % exc) \
            from None
    server = get_server("synpo-web", client_type="vue3")
    extra = ["--embedding-cache", args.embedding_cache] if args.embedding_cache else []
    options = dict(device=args.device, sam=args.sam, features=args.features, extra=extra)
    app = SynPoWeb(server, max_upload_mb=args.max_upload_mb, server_options=options, remote=remote)
    if remote is None:
        app.logic.serverReady(app.parameters)          # start the local server now (it loads the models)
        atexit.register(app.logic.stopServer)

    if password is not None:
        server.controller.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(
            basic_auth_middleware(password)))

    def ready(**_):
        shown, url = page_urls(args.host, server.port)
        print("SynPo web: open %s" % shown, flush=True)
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as handle:
                handle.write(url)
            os.replace(tmp, args.ready_file)
    server.controller.on_server_ready.add(ready)
    try:
        # timeout: trame_server.core.Server.start's "seconds to wait before stopping the server when no
        # client is connected" (wslink's aiohttp backend, shutdown_schedule; 0 disables it).
        server.start(port=args.port, host=args.host, open_browser=False, show_connection_info=False,
                     disable_logging=True, timeout=int(math.ceil(args.idle_exit)))
    except OSError as exc:                              # taken between check_port and now
        raise SynPoError("cannot listen on %s port %d: %s" % (args.host, args.port, exc.strerror or exc)) from None
    finally:
        app.logic.stopServer()
    return 0
