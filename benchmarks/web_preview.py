"""Seconds from opening the `synpo web` page to the preview on the bundled CT, as a user meets it.

Starts `synpo web` (its own `synpo serve`, LiteMedSAM, --features sam by default) on a free
loopback port and, as soon as the page is served (the server may still be loading its models, as
for a user who opens the printed URL at once), drives Debian's Chromium with Playwright: open the page, *Load sample*, *Preview* (the sample's painted
liver slice), wait for "Preview ready". Prints the time of each step. No embedding cache: the
encoder runs on every slice as for a new volume.

    python benchmarks/web_preview.py [--device cpu] [--features sam] [--repeats 1] [--screenshot PNG]
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "..", "SynPoSlicer")


def start_web(folder, device, features):
    ready = os.path.join(folder, "ready")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(MODULE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(os.path.join(folder, "web.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "synpo.cli", "web", "--port", "0", "--device", device,
                             "--features", features, "--ready-file", ready], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise SystemExit("synpo web did not start: %s" % open(log.name).read()[-2000:])
        time.sleep(0.2)
    return proc, open(ready).read().strip()


def wait_text(page, selector, texts, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.inner_text(selector)
        if any(t in text for t in texts):
            return text
        time.sleep(0.1)
    raise SystemExit("timed out; the page says: %s" % page.inner_text(selector))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--features", default="sam", choices=("auto", "synergy", "sam", "dinov2"))
    p.add_argument("--repeats", type=int, default=1, help="page loads (each on a fresh `synpo web`)")
    p.add_argument("--screenshot", help="save the page after the last preview")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright
    for run in range(args.repeats):
        folder = tempfile.mkdtemp(prefix="synpo-web-bench-")
        proc, url = start_web(folder, args.device, args.features)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                t0 = time.time()
                page.goto(url)
                page.wait_for_selector("body[data-synpo=owner]", timeout=60000)
                t_page = time.time()
                page.click("#synpo-sample")
                wait_text(page, "#synpo-message", ["Sample CT loaded"], 120)
                t_sample = time.time()
                page.click("#synpo-preview")
                text = wait_text(page, "#synpo-message", ["Preview ready", "failed"], 1800)
                t_preview = time.time()
                if "failed" in text:
                    raise SystemExit(text)
                if args.screenshot and run == args.repeats - 1:
                    time.sleep(1.5)
                    page.screenshot(path=args.screenshot)
                browser.close()
            print("run %d: page shown %.1f s, sample loaded %.1f s, preview ready %.1f s after opening the page "
                  "(Preview -> ready %.1f s)" % (run + 1, t_page - t0, t_sample - t0, t_preview - t0,
                                                  t_preview - t_sample), flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
