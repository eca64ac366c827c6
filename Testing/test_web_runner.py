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

"""


SCENARIO_MAIN = """
server = Server(tempfile.mkdtemp(prefix="synpo-web-%(name)s-"))
try:
    page = get_server("synpo-web-%(name)s", client_type="vue3")
    asyncio.run(scenario(SynPoWeb(page, server_options={}, remote=(server.url, server.token_file))))
finally:
    server.stop()
"""


def _run_scenario(tmp_path, name, scenario, timeout):
    """A scenario (an `async def scenario(app)`) run on a SynPoWeb over a test server, in a child
    process as `synpo web` runs the app: its output and exit status."""
    script = tmp_path / (name + ".py")
    script.write_text(scenario + SCENARIO_MAIN % {"name": name})
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))   # its server's folders go with the test's
    env["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    return subprocess.run([sys.executable, str(script), HERE], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)


def test_a_cancelled_upload_settling_leaves_the_pages_message_alone(tmp_path):
    """The page's runner goes on while a cancelled upload reads the server's answer (its session is
    kept for the next preview); those ticks must not write the run's old message over what the user's
    next action said (Load sample, Apply). The app in a child process (as `synpo web` runs it), its
    runner on asyncio, the server's answer held back until the check is done."""
    out = _run_scenario(tmp_path, "settling", SETTLING_SCENARIO, 600)
    assert out.returncode == 0 and "settled; the page says: Sample CT loaded" in out.stdout, out.stdout[-3000:]


TOKEN_SCENARIO = """
import asyncio, os, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from conftest import Server
from trame.app import get_server
from synpo_web.app import SynPoWeb

server = Server(tempfile.mkdtemp(prefix="synpo-web-token-"))
try:
    token_file = os.path.join(server.folder, "token-the-page-reads")
    with open(token_file, "w") as handle:
        handle.write("the-token-of-the-server-before-it-restarted")
    app = SynPoWeb(get_server("synpo-web-token", client_type="vue3"), server_options={},
                   remote=(server.url, token_file))
    shutil.copyfile(server.token_file, token_file)     # the restarted server wrote its new token
    app.load_sample()
    app.preview()
    deadline = time.time() + 120
    while app.logic.job is None or app.logic.job.state == "upload":  # the server made the session, or refused
        assert time.time() < deadline and app.logic.state != "failed", app.logic.message
        app.logic.step()
    assert app.logic.job.state != "failed", app.logic.job.error
    app.cancel()
    print("the preview went up with the token in the file now")
finally:
    server.stop()
"""


def test_a_server_restarted_with_a_new_token_is_reached_on_the_next_preview(tmp_path):
    """`synpo web --server URL --token-file F`: the server restarted since the page started, and wrote its
    new token to F. The next Preview reads F again, as the module's Preview does (SynPoSlicer.prepareServer):
    it was read once at start, and every request of the page was refused (401) until it was restarted."""
    script = tmp_path / "restarted_server.py"          # (not token.py: the standard library has one)
    script.write_text(TOKEN_SCENARIO)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))   # its server's folders go with the test's
    env["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    out = subprocess.run([sys.executable, str(script), HERE], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert out.returncode == 0 and "went up with the token in the file now" in out.stdout, out.stdout[-3000:]


def _web(args, env=None, **kwargs):
    from conftest import synpo_cmd
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    return subprocess.Popen(synpo_cmd() + ["web"] + args, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, **kwargs)


def test_a_server_given_with_its_token_file_or_synpo_token_serves_the_page(tmp_path):
    """`synpo web --server URL --token-file FILE` (and the token in $SYNPO_TOKEN instead): the page
    starts on that server. The command checked the token, then gave the page's logic the token where
    it takes the token file (PreviewLogic.useServer): every start with a right token ended in "cannot
    read the token file <the token>", the secret printed on the console."""
    import time
    from conftest import Server
    server = Server(str(tmp_path))
    try:
        for name, args, env in (("file", ["--token-file", server.token_file], {}),
                                ("environment", [], {"SYNPO_TOKEN": server.token})):
            ready = str(tmp_path / ("ready-" + name))
            proc = _web(["--port", "0", "--server", server.url, "--ready-file", ready] + args, env)
            try:
                deadline = time.time() + 180
                while not os.path.exists(ready) and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.2)
                assert os.path.exists(ready), (name, proc.poll(), proc.stdout.read() if proc.poll() is not None else "")
            finally:
                proc.terminate()
                out = proc.communicate(timeout=30)[0]
            assert server.token not in out, out
    finally:
        server.stop()


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path):
    """A --port another program listens on: one `synpo: error:` line, exit 2, and no `synpo serve`
    started (trame's bind failed after the local server had started, with a traceback)."""
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        proc = _web(["--port", str(taken.getsockname()[1]), "--device", "cpu"])
        out = proc.communicate(timeout=120)[0]
    finally:
        taken.close()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("synpo: error: cannot listen"), out


USER_SCENARIO = """
import asyncio, os, sys, tempfile, time
import numpy as np
import SimpleITK as sitk
sys.path.insert(0, sys.argv[1])
from conftest import Server
from trame.app import get_server
from synpo_web.app import SynPoWeb
from synpo_web.tabs import OwnerOnlyAreas
from SynPoSlicerLib import mrml


async def run(app):
    deadline = time.time() + 600
    while app._runner is not None and not app._runner.done():
        assert time.time() < deadline, app.state.message
        await asyncio.sleep(0.05)


async def scenario(app):
    # The user's edits of the candidates are not dropped by one click (the module asks: confirmDiscard).
    app.load_sample()
    app.preview()
    await run(app)
    assert app.logic.state == "previewed", app.state.message
    labels = app.logic.preview.labels
    t = next(t for t in range(len(labels)) if (labels[t] == 1).any())
    edited = (labels == 1).astype(np.uint8)
    edited[t] = 0
    mrml.write_labels(app.logic.preview.candidates, app.volume, edited, {1: "liver"},
                      {1: app.logic.preview.candidate_ids[1]})
    for action, click in (("Discard", app.discard), ("Preview", app.preview), ("Load sample", app.load_sample)):
        click()
        assert "edits of the candidates on 1 slice(s) would be lost" in app.state.message, app.state.message
        assert "%s again" % action in app.state.message and app.state.error
        assert app.logic.preview is not None and app.logic.editedSlices() == 1 and not app.logic.active()
    app.discard()
    app.discard()                                       # asked twice: discarded
    assert app.logic.preview is None and app.state.message.startswith("Preview discarded")
    # 'Undo apply' restores the whole segmentation as it was before Apply: not offered once the user
    # paints again (it took a new segment and its paint with it).
    app.preview()
    await run(app)
    app.set_tool("paint")                               # a tool on when Apply switches the editor back
    app.apply()
    assert app.state.can_undo and "until you paint" in app.state.message, app.state.message
    assert app.state.tool == "none"                     # the editor dropped it: the page says so
    app.set_tool("paint")
    assert not app.state.can_undo and app.apply_logic is None
    # A volume beyond one voxel per byte of --max-upload-mb is refused from its header.
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "v.nii.gz")
    volume = np.zeros((20, 20, 20), np.int16)
    volume[10:, 5:15, 5:15] = 100                       # 8000 voxels in a file of a few hundred bytes
    sitk.WriteImage(sitk.GetImageFromArray(volume), path, True)
    content = open(path, "rb").read()
    app.max_upload_mb = 0.005                           # 5242 voxels
    app.load_upload({"name": "v.nii.gz", "size": len(content), "content": content})
    assert app.state.error and "changes since loading would be lost" in app.state.message, app.state.message
    app.load_upload({"name": "v.nii.gz", "size": len(content), "content": content})    # (Apply's, not saved)
    assert app.state.error and "20 x 20 x 20 = 8000 voxels" in app.state.message, app.state.message
    assert app.volume.GetName() == "SynPo sample CT"
    app.max_upload_mb = 1.0
    for _ in range(2):                                  # asked again: the segments are still not saved
        app.load_upload({"name": "v.nii.gz", "size": len(content), "content": content})
    assert not app.state.error and app.state.message.startswith("v.nii.gz loaded"), app.state.message
    # Another tab's view sizes and events never reach the owner's views; its sizes apply once it owns them.
    class Area:
        def __init__(self):
            self.sizes, self.events = [], []
        def update_size(self, origin, size):
            self.sizes.append(size)
        def on_interaction(self, origin, event):
            self.events.append(event)
    area = Area()
    areas = OwnerOnlyAreas({"axial": area}, app)
    app._areas, app._tab = areas, None
    caller = {"id": "A"}
    app._caller = lambda: caller["id"]
    areas.get("axial").update_size("o", {"w": 800, "h": 600})      # before A's claim: kept for it
    assert area.sizes == [] and app._tab is None
    assert app.claim("tab-a") == "ok" and area.sizes == [{"w": 800, "h": 600}]
    caller["id"] = "B"
    areas.get("axial").update_size("o", {"w": 10, "h": 10})
    areas.get("axial").on_interaction("o", {"t": "MouseWheel"})
    assert area.sizes == [{"w": 800, "h": 600}] and area.events == [] and app._tab == "A"
    assert app.claim("tab-b") == "busy"
    app._tab = None                                     # A's page closed (a reload)
    areas.get("axial").update_size("o", {"w": 12, "h": 12})        # the covered tab does not take it so
    assert app._tab is None and area.sizes == [{"w": 800, "h": 600}]
    assert app.claim("tab-b") == "ok" and area.sizes[-1] == {"w": 12, "h": 12}
    print("scenario done")

"""


def test_edits_undo_large_volumes_and_another_tab_as_a_user_meets_them(tmp_path):
    """What a user of the page meets after Preview (the app in a child process, clicks as calls of its
    handlers): edits of the candidates survive one click of Discard / Preview / Load sample (a second
    discards them); 'Undo apply' is withdrawn once the segments are edited again; a volume too large
    for the server is refused from its header; another tab's view sizes and events are kept from the
    owner's views (they shrank them to 10 x 10 pixels)."""
    out = _run_scenario(tmp_path, "user", USER_SCENARIO, 900)
    assert out.returncode == 0 and "scenario done" in out.stdout, out.stdout[-3000:]


SEGMENTS_SCENARIO = """
import asyncio, os, sys, tempfile, time
import numpy as np
import SimpleITK as sitk
sys.path.insert(0, sys.argv[1])
from conftest import Server
from trame.app import get_server
from synpo_web.app import SynPoWeb
from SynPoSlicerLib import mrml


def upload(app, name, content):
    app.load_upload({"name": name, "size": len(content), "content": content})


async def scenario(app):
    folder = tempfile.mkdtemp()
    # A small volume: two bright blocks on 12 slices.
    image = np.zeros((12, 48, 48), np.int16)
    image[:, 8:20, 8:22] = 300
    image[:, 28:40, 26:42] = 600
    # A NIfTI without a voxel size (pixdim 0, no sform): synpo segment's warning, on the page.
    path = os.path.join(folder, "nosize.nii")
    sitk.WriteImage(sitk.GetImageFromArray(image), path)
    header = bytearray(open(path, "rb").read())
    header[88:92] = bytes(4)                            # pixdim[3] = 0.0
    header[252:256] = bytes(4)                          # no qform, no sform
    upload(app, "nosize.nii", bytes(header))
    said = app.state.message
    assert said.startswith("nosize.nii loaded") and "Note: nosize.nii gives no voxel size along k" in said, said
    assert "synpo-web-" not in said and not app.state.error, said
    path = os.path.join(folder, "two.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(image), path, True)
    upload(app, "two.nii.gz", open(path, "rb").read())
    assert app.state.message.startswith("two.nii.gz loaded"), app.state.message
    # Save .seg.nrrd before anything is painted: Slicer's writer writes no file (a traceback on the
    # console, nothing on the page). Now a message.
    assert app.download("seg.nrrd") is None and "no segment has been painted" in app.state.message
    app.add_segment()
    app.add_segment()
    first, second = app.segmentation.GetSegmentation().GetSegmentIDs()
    paint = np.zeros(image.shape, np.uint8)
    paint[6, 10:18, 10:20] = 1
    paint[6, 30:38, 28:40] = 2
    mrml.write_labels(app.segmentation, app.volume, paint, {1: "segment 1", 2: "segment 2"}, {1: first, 2: second})
    # Load sample would drop the painted segments: asked first (they went without a word).
    app.load_sample()
    assert app.state.error and "would be lost" in app.state.message and "Load sample again" in app.state.message
    assert app.volume.GetName().startswith("two")
    # A header naming a data file elsewhere on the server is refused (its bytes became the volume).
    secret = os.path.join(folder, "secret")
    open(secret, "wb").write(b"the server's secret" * 100)
    nrrd = ("NRRD0004\\ntype: uint8\\ndimension: 3\\nsizes: 10 10 10\\nencoding: raw\\ndata file: %s\\n\\n" % secret)
    mha = ("ObjectType = Image\\nNDims = 3\\nDimSize = 10 10 10\\nElementType = MET_UCHAR\\n"
           "ElementDataFile = %s\\n" % secret)
    padded = nrrd.replace("encoding: raw\\n", "encoding: raw\\n" + "# a comment line to pad the header\\n" * 3000)
    for name, text in (("leak.nrrd", nrrd), ("leak.mha", mha), ("padded.nrrd", padded)):
        upload(app, name, text.encode())
        assert "would be lost" in app.state.message, app.state.message
        upload(app, name, text.encode())                # asked twice: the file is read, and refused
        assert app.state.error and "names a separate data file" in app.state.message, app.state.message
        assert app.volume.GetName().startswith("two")
    # Preview both; Correct the second one: its candidates are painted, not the first one's.
    app.state.selected_segments = [first, second]
    app.state.active_segment = second
    app.set_active_segment(second)
    app.preview()
    deadline = time.time() + 600
    while app._runner is not None and not app._runner.done():
        assert time.time() < deadline, app.state.message
        await asyncio.sleep(0.05)
    assert app.logic.state == "previewed", app.state.message
    ids = app.logic.preview.candidate_ids
    # A stroke in segment 1 itself (the page's Paint, not Correct) after Preview, where the preview is
    # empty: Apply keeps it (it set the segment to the preview, erasing the stroke without a word).
    now = mrml.segment_array(app.segmentation, first, app.volume).astype(bool)
    stroke = np.zeros_like(now)
    stroke[1, 40:46, 2:8] = True
    assert not (stroke & (app.logic.preview.labels != 0)).any() and not (stroke & now).any()
    mrml.write_labels(app.segmentation, app.volume, (now | stroke).astype(np.uint8), {1: "segment 1"}, {1: first})
    app.start_correcting()
    assert app.editor.active_segment_id == ids[2], (app.editor.active_segment_id, ids)
    app.state.active_segment = first
    app.set_active_segment(first)
    assert app.editor.active_segment_id == ids[1]
    # Apply, with segment 2 chosen on the page: the editor paints into segment 2 afterwards (it was
    # segment 1, whatever the page showed).
    app.state.active_segment = second
    app.set_active_segment(second)
    app.apply()
    assert app.editor.active_segment_id == second == app.state.active_segment, app.editor.active_segment_id
    assert mrml.segment_array(app.segmentation, first, app.volume)[stroke].all(), app.state.message
    assert "since the preview (%d voxel(s)) are kept" % stroke.sum() in app.state.message, app.state.message
    print("scenario done")

"""


def test_segments_a_user_paints_are_painted_where_shown_and_never_dropped_unasked(tmp_path):
    """The page's segments (the app in a child process, clicks as calls of its handlers): after Apply,
    and while correcting two previewed segments, the editor paints the segment the page shows; Load
    sample and an upload ask before dropping painted segments not saved; an uploaded header naming a
    data file elsewhere is refused; Save .seg.nrrd with nothing painted says so; a stroke painted in a
    segment itself after Preview is kept by Apply."""
    out = _run_scenario(tmp_path, "segments", SEGMENTS_SCENARIO, 900)
    assert out.returncode == 0 and "scenario done" in out.stdout, out.stdout[-3000:]


def test_the_page_stays_until_asked_to_end(tmp_path):
    """trame's default (wslink's timeout, 300 s) ended `synpo web`, its scene and what was painted, five
    minutes after the last tab closed, or after its start when no page opened (a laptop asleep, a VPN
    dropped). It now stays (--idle-exit 0, trame_server's Server.start timeout=0: no shutdown is
    scheduled); --idle-exit N brings the old behaviour back, after N seconds."""
    import time
    from conftest import Server
    server = Server(str(tmp_path))
    try:
        procs = {}
        for name, extra in (("default", []), ("idle", ["--idle-exit", "2"])):
            ready = str(tmp_path / ("ready-" + name))
            procs[name] = (_web(["--port", "0", "--server", server.url, "--token-file", server.token_file,
                                 "--ready-file", ready] + extra), ready)
        deadline = time.time() + 180
        while not all(os.path.exists(r) for _, r in procs.values()):
            assert time.time() < deadline and all(p.poll() is None for p, _ in procs.values())
            time.sleep(0.2)
        idle = procs["idle"][0]
        assert idle.wait(60) == 0                        # no page opened: gone after 2 s
        assert procs["default"][0].poll() is None        # the default one is still there
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
            proc.communicate(timeout=30)
        server.stop()
