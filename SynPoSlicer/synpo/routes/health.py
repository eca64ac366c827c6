"""`GET /v1/health`: the one path without a token; the version, the models and the limits. HEAD
answers the same status without a body (a monitor's or a load balancer's probe; FastAPI adds no
HEAD to a GET route, Starlette's `Route` would)."""
from fastapi import APIRouter, Request

from .. import __version__
from .common import service_of

API = 1
router = APIRouter()


@router.api_route("/v1/health", methods=["GET", "HEAD"])
async def health(request: Request):
    service = service_of(request)
    return {"status": "ok", "synpo": __version__, "api": API, "models": service.models.describe(),
            "limits": {"max_body_mb": request.app.state.max_body_bytes >> 20,
                       "max_memory_mb": service.budget_bytes >> 20, "session_ttl_s": service.ttl_seconds}}
