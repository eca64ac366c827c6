"""What the routes share: the service and the limits the app was made with (`app.state`), a request
body read within `--max-body-mb`, wire messages in and out, and `Refused` (a 4xx with one line)."""
from typing import Tuple

from .. import wire


class Refused(Exception):
    """A request refused with `status` and a one-line `message` (server.create_app answers it as
    {"error": message})."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def service_of(request):
    """The `service.Service` this app serves."""
    return request.app.state.service


def is_int(value) -> bool:
    """A JSON integer (true and false are ints to Python: not slice 1 and 0)."""
    return isinstance(value, int) and not isinstance(value, bool)


async def body_of(request) -> bytes:
    """The whole request body; 413 past `app.state.max_body_bytes`, 400 when the client goes away."""
    from starlette.requests import ClientDisconnect
    limit = request.app.state.max_body_bytes
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, "the request body is larger than this server accepts (%d MB, --max-body-mb)"
                              % (limit >> 20))
            chunks.append(chunk)
    except ClientDisconnect:
        # A client that stopped sending (the Slicer module's Cancel during an upload): nothing was
        # made; no traceback in the log.
        raise Refused(400, "the client went away before the whole request body arrived") from None
    return b"".join(chunks)


async def message_of(request) -> Tuple[dict, dict]:
    """The body as a wire message: ({name: array}, meta); 415 for another content type, arrays
    beyond `app.state.max_array_bytes` refused by wire.unpack."""
    from starlette.concurrency import run_in_threadpool
    if request.headers.get("content-type", "").split(";")[0].strip() != wire.CONTENT_TYPE:
        raise Refused(415, "send the arrays as %s (synpo.wire)" % wire.CONTENT_TYPE)
    data = await body_of(request)
    return await run_in_threadpool(wire.unpack, data, request.app.state.max_array_bytes)


def packed(arrays, meta):
    """A wire message as the response."""
    from fastapi.responses import Response
    return Response(wire.pack(arrays, meta), media_type=wire.CONTENT_TYPE)
