"""`synpo web`'s runner (synpo_web.app.SynPoWeb._run, the module's timer as an asyncio task) without a
browser: the app in a child process, as `synpo web` runs it, clicks as calls of its handlers."""
import os
import subprocess
import sys

import pytest

from conftest import missing_module

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "..", "SynPoSlicer")


pytestmark = pytest.mark.skipif(missing_module() is not None, reason=str(missing_module()))


SETTLING_SCENARIO = """
import asyncio, os, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from conftest import Server
from trame.app import get_server
from synpo_web.app import SynPoWeb, STEP_SECONDS


async def scenario(app):
    app.load_sample()
    app.preview()
    deadline = time.time() + 120
    while not (app.logic.job is not None and app.logic.job._upload is not None and app.logic.job._upload.waiting()):
        assert time.time() < deadline, app.state.message
        await asyncio.sleep(0.005)
    upload, held = app.logic.job._upload, {"open": False}
    answer = upload.step
    upload.step = lambda: answer() if held["open"] else None        # the answer, read when let through
    app.cancel()
    assert app.logic.settling(), app.logic.job.state
    app.load_sample()                                                # the user's next action
    said = app.state.message
    assert said.startswith("Sample CT loaded"), said
    await asyncio.sleep(4 * STEP_SECONDS)                            # ticks that only settle
    assert app.logic.settling() and app.state.message == said, app.state.message
    held["open"] = True
    while app._runner is not None and not app._runner.done():
        assert time.time() < deadline, app.state.message
        await asyncio.sleep(0.05)
    assert not app.logic.settling() and app.state.message == said, app.state.message
    print("settled; the page says: " + said[:40])


server = Server(tempfile.mkdtemp(prefix="synpo-web-settling-"))
try:
    page = get_server("synpo-web-settling", client_type="vue3")
    asyncio.run(scenario(SynPoWeb(page, server_options={}, remote=(server.url, server.token_file))))
finally:
    server.stop()
"""


def test_a_cancelled_upload_settling_leaves_the_pages_message_alone(tmp_path):
    """The page's runner goes on while a cancelled upload reads the server's answer (its session is
    kept for the next preview); those ticks must not write the run's old message over what the user's
    next action said (Load sample, Apply). The app in a child process (as `synpo web` runs it), its
    runner on asyncio, the server's answer held back until the check is done."""
    script = tmp_path / "settling.py"
    script.write_text(SETTLING_SCENARIO)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    out = subprocess.run([sys.executable, str(script), HERE], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    assert out.returncode == 0 and "settled; the page says: Sample CT loaded" in out.stdout, out.stdout[-3000:]
