"""The HTTP routes of `synpo serve`, one module per resource (FastAPI `APIRouter`s), over the
`service.Service` that `server.create_app` puts in `app.state.service`:

- health.py: `GET /v1/health` (no token);
- sessions.py: a volume uploaded, listed, described, deleted;
- runs.py: a run started on a session, its progress, its decided slices, cancel, its result;
- redecode.py: one slice decoded again from the user's points;
- common.py: what they share (the request body within the limits, wire messages, refusals).

The paths and their messages are listed in server.py's docstring.
"""
from . import health, redecode, runs, sessions

ROUTERS = (health.router, sessions.router, runs.router, redecode.router)
