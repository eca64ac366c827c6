"""Sessions: one uploaded volume each (its image and, as runs need them, its embeddings).

    POST   /v1/sessions        wire: image [k, j, i]; meta: spacing (mm along i, j, k), optional direction
                               (9 numbers: its 3x3 direction, row-major; synpo/layout.py) -> the session
    GET    /v1/sessions        the sessions held, memory used and budget
    GET    /v1/sessions/{sid}  what the session holds
    DELETE /v1/sessions/{sid}
"""
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .common import Refused, message_of, service_of

router = APIRouter()
SPACING = "meta.spacing must be 3 numbers: the voxel size in mm along i, j, k"


@router.post("/v1/sessions", status_code=201)
async def create_session(request: Request):
    service = service_of(request)
    arrays, meta = await message_of(request)
    image = arrays.get("image")
    if image is None:
        raise Refused(400, "the body holds no array named 'image'")
    spacing = meta.get("spacing")
    if not isinstance(spacing, list) or len(spacing) != 3:
        raise Refused(400, SPACING)
    try:
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in spacing):
            raise TypeError                    # (true read as 1 mm, "2" as 2 mm)
        spacing = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise Refused(400, SPACING) from None
    direction = meta.get("direction")
    if direction is not None:
        if not isinstance(direction, list) or len(direction) != 9 or \
                any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in direction):
            raise Refused(400, "meta.direction must be 9 numbers: the volume's 3x3 direction, row-major")
        # (not orthonormal: the Session's InputError, 400 like a bad spacing)
    entry = await run_in_threadpool(service.create, image, spacing, {}, direction)
    return service.describe(entry)


@router.get("/v1/sessions")
async def list_sessions(request: Request):
    service = service_of(request)
    entries = service.sessions()
    return {"sessions": [service.describe(e) for e in entries.values()],
            "memory_mb": round(service.memory_bytes() / 2 ** 20, 2), "max_memory_mb": service.budget_bytes >> 20,
            "evictions": service.evictions}


@router.get("/v1/sessions/{sid}")
async def get_session(sid: str, request: Request):
    service = service_of(request)
    return service.describe(service.get(sid))


@router.delete("/v1/sessions/{sid}")
async def delete_session(sid: str, request: Request):
    service_of(request).delete(sid)
    return {"deleted": sid}
