"""Runs: a segmentation of a session's volume from the user's paint, computed in the service's
queue while the client polls.

    POST /v1/sessions/{sid}/runs                  wire: support (+ support_image); meta: set, modality,
                                                  mode ("new"; "add": corrections on the last run),
                                                  absent ({label: [slices]}), confidence_all, axis
    GET  /v1/sessions/{sid}/runs/{rid}?since=N    state, progress, the slices decided since N
    GET  /v1/sessions/{sid}/runs/{rid}/slices?since=N   wire: those slices' masks
    POST /v1/sessions/{sid}/runs/{rid}/cancel
    GET  /v1/sessions/{sid}/runs/{rid}/result?confidence=none|max|labels[&offset=N&length=M]
"""
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import wire
from ..service import Busy, NotFound
from .common import Refused, is_int, message_of, packed, service_of

router = APIRouter()
ABSENT = "meta.absent must map labels to lists of slice indices, e.g. {\"1\": [12, 13]}"


def run_settings(meta: dict) -> dict:
    """A run's settings from its message's meta: set, modality, confidence_all, absent, axis."""
    settings = {"set": meta.get("set") or [], "modality": meta.get("modality"),
                "confidence_all": bool(meta.get("confidence_all", False)), "absent": {}}
    absent = meta.get("absent") or {}
    try:
        if not isinstance(absent, dict):
            raise ValueError
        if any(not isinstance(v, list) or not all(is_int(t) for t in v) for v in absent.values()):
            raise TypeError                    # ("12" read as slices 1 and 2, 1.5 as slice 1)
        settings["absent"] = {int(k): [int(t) for t in v] for k, v in absent.items()}
    except (TypeError, ValueError):
        raise Refused(400, ABSENT) from None
    if not isinstance(settings["set"], list) or not all(isinstance(s, str) for s in settings["set"]):
        raise Refused(400, "meta.set must be a list of 'SECTION.FIELD=VALUE' strings")
    if settings["modality"] not in (None, "ct", "mr"):
        raise Refused(400, "meta.modality must be 'ct', 'mr' or null")
    settings["axis"] = meta.get("axis")
    if settings["axis"] is not None and (not is_int(settings["axis"]) or not 0 <= settings["axis"] <= 2):
        raise Refused(400, "meta.axis must be 0, 1 or 2 (the slicing axis across the array's k, j, i) or null")
    return settings


@router.post("/v1/sessions/{sid}/runs", status_code=202)
async def start_run(sid: str, request: Request):
    service = service_of(request)
    entry = service.get(sid)
    arrays, meta = await message_of(request)
    mode = meta.get("mode", "new")
    if mode not in ("new", "add"):
        raise Refused(400, "meta.mode must be 'new' or 'add', not %r" % (mode,))
    settings = run_settings(meta)
    support = arrays.get("support")
    if support is not None and support.dtype.kind not in "iub":
        raise Refused(400, "the support has dtype %s; integer labels are needed" % support.dtype)
    run = await run_in_threadpool(service.start_run, entry, support, settings, arrays.get("support_image"),
                                  mode == "add")
    return {"run": run.id, "session": sid, "state": run.state}


def _run(request: Request, sid: str, rid: str):
    service = service_of(request)
    return service.get_run(service.get(sid), rid)


@router.get("/v1/sessions/{sid}/runs/{rid}")
async def run_status(sid: str, rid: str, request: Request, since: int = 0):
    return _run(request, sid, rid).status(max(0, since))


@router.get("/v1/sessions/{sid}/runs/{rid}/slices")
async def run_slices(sid: str, rid: str, request: Request, since: int = 0):
    run = _run(request, sid, rid)
    records, arrays = await run_in_threadpool(run.slice_masks, max(0, since))
    return packed(arrays, {"slices": records, "next": max(0, since) + len(records), "state": run.state})


@router.post("/v1/sessions/{sid}/runs/{rid}/cancel")
async def cancel_run(sid: str, rid: str, request: Request):
    run = _run(request, sid, rid)
    run.cancel_event.set()
    run.drop_packed()                   # a client that stops fetching the result in parts says so
    run.fetched = True                  # (its session may be evicted now: service.Entry.awaiting_fetch)
    return {"run": rid, "state": run.state, "cancel": "requested"}


def result_message(result, confidence: str) -> bytes:
    """A done run's result as a wire message: labels (+ "confidence": the maximum over labels, or
    "confidence_<label>" each), with its records, support, modality, features, timings."""
    from ..outputs import max_confidence
    from ..result import support_to_dict
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


@router.get("/v1/sessions/{sid}/runs/{rid}/result")
async def run_result(sid: str, rid: str, request: Request, confidence: str = "none", offset: Optional[int] = None,
                     length: int = 4 << 20):
    run = _run(request, sid, rid)
    if confidence not in ("none", "max", "labels"):
        raise Refused(400, "confidence must be none, max or labels")
    if offset is not None and (offset < 0 or length < 1):
        raise Refused(400, "offset must be >= 0 and length >= 1")
    if run.state != "done":
        raise Busy("run %s is %s%s" % (rid, run.state, (": " + run.error) if run.error else ""))
    result = run.result
    if result is None:
        raise NotFound("the result of run %s is no longer kept; start the run again" % rid)
    if offset is None:
        message = await run_in_threadpool(result_message, result, confidence)
        run.fetched = True
        return Response(message, media_type=wire.CONTENT_TYPE)
    # In parts (client.ResultDownload: a client on a GUI thread): packed once, in a thread; each
    # request answers at once, 202 while packing, else `length` bytes from `offset` and the total.
    message = run.packed_result(confidence, lambda: result_message(result, confidence))
    if message is None:
        return JSONResponse({"state": "packing"}, status_code=202)
    part = message[offset:offset + length]
    if offset + len(part) >= len(message):
        run.drop_packed(confidence)
        run.fetched = True
    return Response(part, media_type="application/octet-stream", headers={wire.PART_TOTAL: str(len(message))})
