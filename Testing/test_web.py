"""`synpo web` in a real browser: Debian's Chromium driven by Playwright, as a user would.

The page is started as a user starts it (`synpo web` on a free loopback port, its own `synpo
serve` with LiteMedSAM on the CPU); the test loads the sample, paints a stroke with the mouse on a
new segment, saves that paint, previews, checks the screen's pixels (the overlay inside the liver,
green and red points), applies, saves, and compares the saved label map with `synpo segment` run
on the saved paint with the page's settings: they must be identical. Also: a bad upload gets one
message and the page keeps working; a second tab is refused; unsafe options are refused.

Needs the `web` extra (trame-slicer, slicer-core), `playwright` and the `chromium` package
(`.ci/run` installs them); skipped with the reason when one is missing.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "..", "SynPoSlicer")
sys.path.insert(0, MODULE)

from conftest import WEB_MODULES, missing_module, synpo_cmd  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 900}


def _missing():
    if not os.path.exists(CHROMIUM):
        return "no Chromium (Debian: apt-get install chromium)"
    return missing_module((("playwright.sync_api", "playwright"),) + WEB_MODULES)


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """`synpo web` on a free loopback port, with its own `synpo serve` (LiteMedSAM, CPU)."""
    folder = tmp_path_factory.mktemp("web")
    ready = str(folder / "ready")
    emb = str(folder / "emb")
    log = open(str(folder / "web.log"), "w")
    cmd = synpo_cmd() + ["web", "--port", "0", "--device", "cpu", "--features", "sam", "--embedding-cache", emb,
                         "--ready-file", ready, "--max-upload-mb", "0.002"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    deadline = time.time() + 180
    while not os.path.exists(ready):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("synpo web did not start: %s" % open(log.name).read()[-3000:])
        time.sleep(0.3)
    url = open(ready).read().strip()
    yield dict(url=url, folder=folder, emb=emb, proc=proc)
    import signal
    os.killpg(proc.pid, signal.SIGTERM)            # the page and the `synpo serve` it started
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _message(page):
    return page.inner_text("#synpo-message")


def _wait_message(page, *texts, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = _message(page)
        if any(t in text for t in texts):
            return text
        time.sleep(0.25)
    raise AssertionError("waited for %r; the page says %r" % (texts, _message(page)))


def _axial(page):
    """The axial view: the largest of the page's view images."""
    deadline = time.time() + 60                # the first frames may come late on a busy machine
    while True:
        views = page.locator("img.image-display-area")
        boxes = [views.nth(i).bounding_box() for i in range(views.count())]
        shown = [i for i in range(len(boxes)) if boxes[i] and boxes[i]["width"] > 50]
        if shown:
            best = max(shown, key=lambda i: boxes[i]["width"] * boxes[i]["height"])
            return views.nth(best), boxes[best]
        assert time.time() < deadline, "the page shows no view"
        time.sleep(0.5)


def _shot(page, settle=1.5):
    """The axial view's pixels (rows, cols, 3) once the server has sent the new frame."""
    import io
    from PIL import Image
    time.sleep(settle)
    view, _ = _axial(page)
    return np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(int)


def _wait_changed(page, before, what, timeout=60.0, pixels=50):
    """The axial view once it differs from `before` on more than `pixels` pixels (a stroke is drawn by
    the server: its frame may come late on a busy machine)."""
    deadline = time.time() + timeout
    while True:
        now = _shot(page, settle=0.5)
        if (np.abs(now - before).sum(-1) > 40).sum() > pixels:
            time.sleep(2.0)                    # the brush's outline shows first; the paint lands with it
            return now
        assert time.time() < deadline, "%s did not show in the axial view" % what


def _stroke(page, fx, fy, dx, dy, moves=12):
    """A mouse stroke on the axial view, as a user paints: from the fraction (fx, fy) of the view,
    `moves` moves of (dx, dy) pixels with the button held."""
    _, box = _axial(page)
    x0, y0 = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, moves + 1):
        page.mouse.move(x0 + dx * i, y0 + dy * i, steps=2)
        time.sleep(0.05)
    page.mouse.up()


def _opacity(page, key):
    slider = page.locator("#synpo-opacity [role=slider]").first
    slider.focus()
    slider.press(key)


def _download(page, button, path):
    with page.expect_download(timeout=60000) as info:
        page.click(button)
    info.value.save_as(str(path))
    return str(path)


def _read(path):
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def test_bad_uploads_get_one_message_and_the_page_keeps_working(web, browser):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(web["url"])
    page.wait_for_selector("body[data-synpo=owner]", timeout=60000)     # this page owns the scene
    page.set_input_files("#synpo-upload", files=[{"name": "scan.nii.gz", "mimeType": "application/gzip",
                                                  "buffer": b"this is not a volume" * 5}])
    text = _wait_message(page, "could not be read", "not a volume", "cannot")
    assert "scan.nii.gz" in text and len(text.strip().splitlines()) == 1
    # Named by the user's name for it, not the server's temporary path it was read from.
    assert "synpo-web-" not in text and "/tmp" not in text and "scan.nii.gz scan.nii.gz" not in text, text
    assert "Traceback" not in page.inner_text("body")
    # Beyond --max-upload-mb (0.002 MB here): refused with the limit named.
    page.set_input_files("#synpo-upload", files=[{"name": "big.nrrd", "mimeType": "application/octet-stream",
                                                  "buffer": b"0" * 4096}])
    text = _wait_message(page, "--max-upload-mb")
    assert "big.nrrd" in text
    # The page still works: the sample loads.
    page.click("#synpo-sample")
    _wait_message(page, "Sample CT loaded")
    page.close()


def test_paint_preview_apply_save_in_the_browser_equals_synpo_segment(web, browser, tmp_path):
    from synpo import demo
    from SynPoSlicerLib.logic import PARAMETERS, PreviewLogic
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    t_load = time.time()
    page.goto(web["url"])
    page.wait_for_selector("body[data-synpo=owner]", timeout=60000)     # this page owns the scene
    page.click("#synpo-sample")
    _wait_message(page, "Sample CT loaded")
    # The liver as painted on the sample's slice: coloured where the segment is drawn (the CT is grey).
    deadline = time.time() + 60
    while True:
        painted_slice = _shot(page, settle=0.5)
        liver = (painted_slice.max(-1) - painted_slice.min(-1)) > 30
        if liver.sum() > 2000:
            break
        assert time.time() < deadline, "the painted liver is not drawn in the axial view"
        _, box = _axial(page)                  # a busy machine: hover the view, as a user would
        page.mouse.move(box["x"] + 5, box["y"] + 5)
        page.mouse.move(box["x"] + 10, box["y"] + 10)
    time.sleep(1.0)
    painted_slice = _shot(page)

    # A new segment, painted with the mouse: a stroke on the spleen (right of the screen).
    page.click("#synpo-add")
    _wait_message(page, "Paint segment 2")
    _stroke(page, 0.885, 0.46, 0.6, 4.0)
    _wait_changed(page, painted_slice, "the stroke")
    paint_path = _download(page, "#synpo-save-nifti", tmp_path / "paint.nii.gz")
    paint, _ = _read(paint_path)
    assert set(np.unique(paint)) == {0, 1, 2}
    assert len(np.flatnonzero((paint == 2).reshape(len(paint), -1).any(1))) == 1    # one slice

    # Preview: the progress bar runs to 100 %, the preview arrives.
    page.click("#synpo-preview")
    seen = set()
    deadline = time.time() + 900
    while "Preview ready" not in _message(page):
        assert "failed" not in _message(page), _message(page)
        assert time.time() < deadline, _message(page)
        seen.add(page.get_attribute("#synpo-progress", "aria-valuenow"))
        time.sleep(0.25)
    print("\npage load -> preview on the sample: %.1f s" % (time.time() - t_load))
    assert page.get_attribute("#synpo-progress", "aria-valuenow") == "100"
    shot_path = os.environ.get("SYNPO_WEB_SCREENSHOT")
    if shot_path:
        time.sleep(1.5)
        page.screenshot(path=shot_path)

    # The confidence overlay is there inside the liver: opacity 1 vs 0 changes the liver's pixels.
    _opacity(page, "End")
    full = _shot(page)
    _opacity(page, "Home")
    none = _shot(page)
    changed = np.abs(full - none).sum(-1) > 40
    assert changed[liver].mean() > 0.5, changed[liver].mean()

    # The points: on another slice, green (positive) and red (negative) dots, overlay hidden.
    view, box = _axial(page)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(5):
        page.mouse.wheel(0, 120)
        time.sleep(0.2)
    other = _shot(page, settle=2.0)
    assert np.abs(other - none).sum(-1).mean() > 2, "the axial view did not move to another slice"
    r, g, b = other[..., 0], other[..., 1], other[..., 2]
    green = (g > 150) & (r < 80) & (b < 80) & (g - r > 100)
    red = (r > 170) & (g < 70) & (b < 70) & (r - g > 120)
    assert green.sum() >= 5 and red.sum() >= 5, (green.sum(), red.sum())

    # Apply, then Save: the label map equals `synpo segment` on the saved paint with the page's settings.
    page.click("#synpo-apply")
    _wait_message(page, "Applied to")
    saved = _download(page, "#synpo-save-nifti", tmp_path / "web.nii.gz")
    settings = PreviewLogic().settings(type("P", (), {"GetParameter": lambda self, k: PARAMETERS[k]})())
    out = str(tmp_path / "cli.nii.gz")
    cmd = synpo_cmd() + ["segment", demo.SAMPLE_IMAGE, paint_path, "-o", out, "--device", "cpu", "--features", "sam",
                         "--embedding-cache", web["emb"], "--quiet"]
    for s in settings:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    web_labels, web_image = _read(saved)
    cli_labels, cli_image = _read(out)
    assert np.array_equal(web_labels, cli_labels.astype(web_labels.dtype))
    assert np.allclose(web_image.GetSpacing(), cli_image.GetSpacing())
    assert np.allclose(web_image.GetOrigin(), cli_image.GetOrigin())
    assert np.allclose(web_image.GetDirection(), cli_image.GetDirection())
    assert (web_labels == 1).sum() > 5 * (paint == 1).sum()              # the liver grew beyond its slice
    # The same segmentation as a .seg.nrrd (Slicer's own writer): the same voxels per segment.
    seg, _ = _read(_download(page, "#synpo-save-seg", tmp_path / "web.seg.nrrd"))
    assert (seg != 0).sum() == (web_labels != 0).sum()

    # Undo apply: the segments are the paint again.
    page.click("#synpo-undo")
    _wait_message(page, "Apply undone")
    undone, _ = _read(_download(page, "#synpo-save-nifti", tmp_path / "undone.nii.gz"))
    assert np.array_equal(undone, paint)

    # Re-run slice, Correct and Update on a new preview (embeddings cached): the slice in view decoded
    # again from its points; a stroke painted on the candidates there, and Update runs from it.
    page.click("#synpo-preview")
    _wait_message(page, "Preview ready", "failed", timeout=900)
    assert "failed" not in _message(page)
    page.click("#synpo-rerun")
    assert "decoded again from" in _wait_message(page, "decoded again from", "failed", "No slice view", timeout=120)
    page.click("#synpo-correct")
    _wait_message(page, "Correcting")
    before = _shot(page)
    _stroke(page, 0.5, 0.52, 3.0, 2.0)                     # outside the liver
    _wait_changed(page, before, "the correction")
    page.click("#synpo-update")                          # the page said "Correcting..." until now
    text = _wait_message(page, "Preview ready", "No corrections", "failed", timeout=900)
    assert "Preview ready" in text, text
    page.click("#synpo-discard")
    _wait_message(page, "Preview discarded")

    # A second tab (another window size) is refused while this one is open; this one keeps working,
    # its views at their own size (the views are shared: the other tab's sizes shrank them).
    def frames(p):
        return p.evaluate("Array.from(document.querySelectorAll('img.image-display-area'))"
                          ".map(i => [i.naturalWidth, i.naturalHeight])")
    before = frames(page)
    second = browser.new_context(viewport={"width": 500, "height": 400}).new_page()
    second.goto(web["url"])
    second.wait_for_selector("#synpo-refused", timeout=60000)
    assert "another tab" in second.inner_text("body")
    time.sleep(12)                                   # its claims are over; its views mounted meanwhile
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)                         # a new frame of this page's axial view
    time.sleep(3)
    assert frames(page) == before, (before, frames(page))
    second.close()
    assert page.locator("#synpo-preview").count() == 1
    context.close()


def _log_since(web, mark):
    with open(str(web["folder"] / "web.log"), errors="replace") as handle:
        handle.seek(mark)
        return handle.read()


def _browser_pids():
    """The Chromium browser processes this test's Playwright started (children of its driver)."""
    def children(pid):
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
                return [int(x) for x in handle.read().split()]
        except OSError:
            return []
    return {pid for driver in children(os.getpid()) for pid in children(driver)}


def test_tabs_closed_or_browser_killed_while_the_views_stream_are_quiet_and_a_new_tab_takes_over(web, browser):
    """Tabs closed (and a browser killed) while the views send frames: wslink sent them, and the answers
    of the tab's last RPCs, to the closing connection; aiohttp raised "Cannot write to closing transport",
    printed as dozens of tracebacks ("Task exception was never retrieved", "Error handling request"). The
    terminal stays quiet, and the next tab owns the page."""
    import signal
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the browser's process in /proc")
    mark = os.path.getsize(str(web["folder"] / "web.log"))

    def stream_and_close(context, close):
        page = context.new_page()
        page.goto(web["url"])
        page.wait_for_selector("body[data-synpo=owner]", timeout=60000)
        _, box = _axial(page)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for k in range(15):                           # frames on their way when the tab goes
            page.mouse.wheel(0, 120 if k % 2 else -120)
        close(page)
        time.sleep(3)

    for _ in range(2):
        context = browser.new_context(viewport=VIEWPORT)
        stream_and_close(context, lambda page: page.close())
        stream_and_close(context, lambda page: context.close())
    before = _browser_pids()
    other = browser.browser_type.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    killed = _browser_pids() - before
    assert killed
    stream_and_close(other.new_context(viewport=VIEWPORT),
                     lambda page: [os.kill(pid, signal.SIGKILL) for pid in killed])
    said = _log_since(web, mark)
    assert "Traceback" not in said and "Error handling request" not in said, said[-3000:]
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(web["url"])
    page.wait_for_selector("body[data-synpo=owner]", timeout=60000)     # the next tab owns the page
    page.click("#synpo-sample")
    _wait_message(page, "Sample CT loaded", "again to")
    context.close()


def test_a_refused_tabs_keyboard_does_not_change_the_owners_page(web, browser):
    """A second tab is covered, but its keyboard reaches the controls under the cover: its Erase (Tab
    to it, Space) was taken as the scene's state and shown pressed on the owner's page, while owner_only
    kept the editor's tool as it was (and its segment or "Segments to propagate" became the owner's)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(web["url"])
    page.wait_for_selector("body[data-synpo=owner]", timeout=60000)

    def pressed(p):
        return p.evaluate("Array.from(document.querySelectorAll('.v-btn--active')).map(e => e.id)")
    before = pressed(page)
    assert "synpo-erase" not in before, before
    second_context = browser.new_context(viewport=VIEWPORT)
    second = second_context.new_page()
    second.goto(web["url"])
    second.wait_for_selector("#synpo-refused", timeout=60000)
    for _ in range(60):
        second.keyboard.press("Tab")
        if second.evaluate("document.activeElement && document.activeElement.id") == "synpo-erase":
            second.keyboard.press("Space")
            break
    else:
        raise AssertionError("the Erase button under the cover was not reached with Tab")
    time.sleep(3)
    assert "synpo-erase" in pressed(second)              # it changed its own page, under its cover
    assert pressed(page) == before, pressed(page)
    second_context.close()
    context.close()


def test_unsafe_or_inconsistent_options_are_refused_with_one_line(tmp_path):
    token = tmp_path / "token"
    token.write_text("a-token-for-a-server-that-is-not-there")
    binary, password = tmp_path / "binary", tmp_path / "password"
    binary.write_bytes(b"\xff\xfe\x00password-in-no-encoding\x81")
    password.write_text("a-password-long-enough")
    for args, says in ((["--host", "0.0.0.0"], "--password-file"),
                       (["--token-file", str(tmp_path / "t")], "--token-file is for --server"),
                       (["--host", "0.0.0.0", "--password-file", str(tmp_path / "none")], "cannot read"),
                       (["--server", "http://127.0.0.1:9", "--token-file", str(token)], "127.0.0.1:9"),
                       # each of these was a traceback, or (an unknown host with port 0) one line only
                       # after the local server had started and stopped
                       (["--max-upload-mb", "nan"], "--max-upload-mb must be"),
                       (["--max-upload-mb", "inf"], "--max-upload-mb must be"),
                       (["--idle-exit", "-1"], "--idle-exit must be"),
                       (["--host", "::1", "--password-file", str(binary)], "not UTF-8"),
                       (["--server", "http://[::1", "--token-file", str(token)], "Invalid IPv6 URL"),
                       (["--server", "http://127.0.0.1:99999", "--token-file", str(token)], "out of range"),
                       (["--host", "nosuchhost.invalid", "--port", "0", "--password-file", str(password)],
                        "--host nosuchhost.invalid")):
        proc = subprocess.run(synpo_cmd() + ["web"] + args, capture_output=True, text=True, env=_env(), timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("synpo: error: "), proc.stderr
        assert says in lines[0]


def test_a_page_on_every_interface_prints_an_address_others_can_open():
    """--host 0.0.0.0 printed (and wrote to --ready-file) http://0.0.0.0:PORT/, no address to open from
    another computer (and one recent Chrome blocks): the machine's name is printed, loopback written."""
    import socket
    from synpo_web.cli import page_urls
    shown, ready = page_urls("0.0.0.0", 8080)
    assert ready == "http://127.0.0.1:8080/"
    assert shown.startswith("http://%s:8080/ from other computers" % socket.gethostname()) and ready in shown
    assert page_urls("::", 8080)[1] == "http://[::1]:8080/"
    assert page_urls("::1", 9) == ("http://[::1]:9/",) * 2 and page_urls("10.0.0.5", 9)[0] == "http://10.0.0.5:9/"


def test_the_password_guards_every_request():
    """With --password-file, the page, its files and its websocket need the password (HTTP basic)."""
    import asyncio
    import base64
    from aiohttp import web as aioweb
    from aiohttp.test_utils import TestClient, TestServer
    from synpo_web.cli import basic_auth_middleware

    async def check():
        app = aioweb.Application(middlewares=[basic_auth_middleware("correct horse")])
        app.router.add_get("/", lambda request: aioweb.Response(text="page"))
        async with TestClient(TestServer(app)) as http:
            assert (await http.get("/")).status == 401
            wrong = base64.b64encode(b"user:wrong password").decode()
            assert (await http.get("/", headers={"Authorization": "Basic " + wrong})).status == 401
            right = base64.b64encode(b"anyone:correct horse").decode()
            response = await http.get("/", headers={"Authorization": "Basic " + right})
            assert response.status == 200 and await response.text() == "page"
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, check()).result(60)
