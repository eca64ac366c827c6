"""`POST /v1/sessions/{sid}/redecode`: one slice decoded again from the user's points.

Body (JSON): slice (index along the session's axis), positive and negative ([[x, y], ...] pixels),
label and axis (optional integers). Answer: wire, the mask [rows, cols] with meta iou and seconds.
"""
import json
import time

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .common import Refused, body_of, is_int, packed, service_of

router = APIRouter()
MAX_REDECODE_POINTS = 256             # a user clicks a handful; 100,000 made SAM ask for 320 GB


def _points(body: dict, name: str) -> np.ndarray:
    """body[name] as an (n, 2) float array."""
    return np.asarray(body.get(name, []), dtype=float).reshape(-1, 2)


@router.post("/v1/sessions/{sid}/redecode")
async def redecode(sid: str, request: Request):
    service = service_of(request)
    entry = service.get(sid)
    try:
        body = json.loads((await body_of(request)) or b"{}")
        if not isinstance(body, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise Refused(400, "the body must be a JSON object: slice, positive, negative (and label, axis)") from None
    if not is_int(body.get("slice")):
        raise Refused(400, "slice must be an integer slice index")
    try:
        pos, neg = _points(body, "positive"), _points(body, "negative")
    except (TypeError, ValueError):
        raise Refused(400, "positive and negative must be lists of [x, y] points") from None
    if len(pos) + len(neg) > MAX_REDECODE_POINTS:       # (SAM's cost grows with the square of the count)
        raise Refused(400, "at most %d points in all" % MAX_REDECODE_POINTS)
    label, axis = body.get("label"), body.get("axis")
    if label is not None and not is_int(label) or axis is not None and not is_int(axis):
        raise Refused(400, "label and axis must be integers")
    t0 = time.perf_counter()
    mask, iou = await run_in_threadpool(service.redecode, entry, body["slice"], pos, neg, label, axis)
    return packed({"mask": mask}, {"iou": iou, "seconds": round(time.perf_counter() - t0, 4)})
