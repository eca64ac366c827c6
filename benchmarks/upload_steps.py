"""How long Slicer's interface is frozen while a volume goes to the server: one
`Client.create_session` call (what the module did) against `RemoteJob`'s steps (what it does: a
step per tick of its 250 ms Qt timer, at most RemoteJob.UPLOAD_SECONDS of compressing or sending
each), on a CT-like volume (HU values, exact in int16) sent to a local `synpo serve`.
With --result, the same for the run's result coming back (labels and the confidence map of the
whole volume): one `Client.result` call against RemoteJob's "fetch" steps (client.ResultDownload);
the run is a small blob painted on one slice of the volume (its walk ends within a few slices), and
the longest step of sending its support label map is printed too.

    .venv/bin/python benchmarks/upload_steps.py [--shape 300 512 512] [--result]

Prints the one call's seconds (the freeze), and the steps' count, the longest step and the total.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "SynPoSlicer"))

from synpo.client import Client  # noqa: E402
from SynPoSlicerLib.engine import RemoteJob  # noqa: E402


def timed_steps(job, state: str) -> str:
    """Step `job` while it is in `state`, a step per tick of the module's 250 ms timer: the steps'
    count, the longest step and the seconds in all."""
    steps, longest, t0 = 0, 0.0, time.perf_counter()
    while job.state == state:
        s0 = time.perf_counter()
        job.step()
        took = time.perf_counter() - s0
        steps, longest = steps + 1, max(longest, took)
        time.sleep(max(0.0, 0.25 - took))              # the rest of the timer's 250 ms
    return "%d steps, the longest %.2f s, %.2f s in all (%s)" % (steps, longest, time.perf_counter() - t0,
                                                                job.state if not job.error else job.error)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    ap.add_argument("--result", action="store_true", help="also time the result coming back")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="synpo-upload-")
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "SynPoSlicer"))
    server = subprocess.Popen([sys.executable, "-m", "synpo.cli", "serve", "--port", "0", "--device", "cpu",
                               "--features", "sam", "--token-out", folder + "/token", "--ready-file",
                               folder + "/ready"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while not os.path.exists(folder + "/ready") or not open(folder + "/ready").read().strip():
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        client = Client(open(folder + "/ready").read().strip(), open(folder + "/token").read().strip(), 60)
        image = np.random.default_rng(0).normal(40, 30, size=args.shape).round().astype(np.float32)
        t0 = time.perf_counter()
        client.delete_session(client.create_session(image, (0.8, 0.8, 2.5)))
        one = time.perf_counter() - t0
        job = RemoteJob(client, image, (0.8, 0.8, 2.5), np.zeros(image.shape, np.uint8))
        print("%s voxels: one call %.2f s (the interface frozen that long); RemoteJob %s"
              % ("x".join(map(str, args.shape)), one, timed_steps(job, "upload")))
        if args.result:
            support = np.zeros(image.shape, np.uint8)
            k, j, i = (n // 2 for n in image.shape)
            support[k, j - 20:j + 20, i - 20:i + 20] = 1
            job = RemoteJob(client, image, (0.8, 0.8, 2.5), support)
            longest_start = 0.0
            while job.state != "fetch" and job.active():
                state, s0 = job.state, time.perf_counter()
                job.step()
                if state == "start":
                    longest_start = max(longest_start, time.perf_counter() - s0)
                time.sleep(0.05)
            print("the run's support (a label map of every voxel): the longest step %.2f s" % longest_start)
            t0 = time.perf_counter()
            client.result(job.session_id, job.run_id, "max")
            one = time.perf_counter() - t0
            print("the result (labels and confidence of every voxel): one call %.2f s; RemoteJob %s"
                  % (one, timed_steps(job, "fetch")))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
