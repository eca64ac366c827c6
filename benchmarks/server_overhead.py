"""What the server path costs on top of in-process segmentation (issue: SynPo as a service).

For each volume: an in-process first run (Session.run, nothing cached) against the same first
run through a `synpo serve` process on 127.0.0.1 (upload, run, download, the session deleted),
and a one-slice re-decode in process against through the server (median of --repeats).

    .venv/bin/python benchmarks/server_overhead.py [--chaos ../shared/data/chaos_t2/image_1.nii.gz] [--device cpu]

Prints one block per volume: the server-side run seconds, the client's wall seconds, the
transport overhead (client wall - server run) absolute and as a share of the first run, and the
re-decode milliseconds both ways.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "SynPoSlicer"))

from synpo.client import Client  # noqa: E402
from synpo.demo import SAMPLE_IMAGE, SAMPLE_SUPPORT  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402


def start_server(folder: str, device: str) -> subprocess.Popen:
    ready = os.path.join(folder, "ready")
    exe = os.path.join(os.path.dirname(sys.executable), "synpo")
    cmd = ([exe] if os.path.exists(exe) else [sys.executable, "-m", "synpo.cli"]) + [
        "serve", "--port", "0", "--device", device, "--features", "sam", "--token-out",
        os.path.join(folder, "token"), "--ready-file", ready, "--quiet"]
    proc = subprocess.Popen(cmd)
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    time.sleep(0.1)
    return proc


def middle_support(label_path: str) -> np.ndarray:
    """Each organ of a label map painted on its middle labelled slice (across k)."""
    gt, _ = read_volume(label_path, "label", label=True)
    support = np.zeros_like(gt)
    for v in [int(v) for v in np.unique(gt) if v]:
        ks = np.flatnonzero((gt == v).reshape(len(gt), -1).any(1))
        k = int(ks[len(ks) // 2])
        support[k][gt[k] == v] = v
    return support


def measure(name: str, image: np.ndarray, spacing, support: np.ndarray, models: Models, client: Client,
            repeats: int) -> None:
    t0 = time.perf_counter()
    session = Session(image, spacing, models)
    result = session.run(support)
    local = time.perf_counter() - t0

    t0 = time.perf_counter()
    sid = client.create_session(image, spacing)
    t1 = time.perf_counter()
    rid = client.start_run(sid, support)
    st = client.wait(sid, rid, interval=0.1)
    t2 = time.perf_counter()
    remote = client.result(sid, rid)
    t3 = time.perf_counter()
    assert st["state"] == "done", st
    same = np.array_equal(remote.labels, result.labels)

    axis = result.support.axis
    label = result.support.labels[0]
    present = [r for r in result.records if r.label == label and r.status == "present" and r.positive]
    rec = present[len(present) // 2]
    local_ms, remote_ms = [], []
    for _ in range(repeats):
        a = time.perf_counter()
        session.redecode(rec.index, rec.positive, rec.negative, label, axis)
        b = time.perf_counter()
        client.redecode(sid, rec.index, rec.positive, rec.negative, label, axis)
        c = time.perf_counter()
        local_ms.append(1000 * (b - a))
        remote_ms.append(1000 * (c - b))
    client.delete_session(sid)

    wall = t3 - t0
    overhead = wall - st["seconds"]
    print("%s (%s voxels, labels %s): label maps equal: %s" % (name, "x".join(map(str, image.shape[::-1])),
                                                             result.support.labels, same))
    print("  in process, first run        %7.2f s" % local)
    print("  server: upload %.3f s, run %.2f s (server side %.2f s), download %.3f s, wall %.2f s"
          % (t1 - t0, t2 - t1, st["seconds"], t3 - t2, wall))
    print("  transport overhead            %7.3f s = %.2f %% of the server's run (%.2f %% of the in-process run)"
          % (overhead, 100 * overhead / st["seconds"], 100 * overhead / local))
    lm, rm = statistics.median(local_ms), statistics.median(remote_ms)
    print("  one-slice re-decode (slice %d): in process %.1f ms, through the server %.1f ms (+%.1f ms), median of %d"
          % (rec.index, lm, rm, rm - lm, repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chaos", default=os.path.join(HERE, "..", "..", "shared", "data", "chaos_t2", "image_1.nii.gz"),
                   help="a CHAOS image (its label_N beside it); skipped when missing")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="synpo-bench-")
    proc = start_server(folder, args.device)
    try:
        client = Client(open(os.path.join(folder, "ready")).read().strip(),
                        open(os.path.join(folder, "token")).read().strip())
        models = Models.load("litemedsam", "sam", device=args.device)
        cases = [("bundled CT", SAMPLE_IMAGE, read_volume(SAMPLE_SUPPORT, "support", label=True)[0])]
        if os.path.isfile(args.chaos):
            label = args.chaos.replace("image_", "label_")
            cases.append(("CHAOS " + os.path.basename(args.chaos), args.chaos, middle_support(label)))
        for name, path, support in cases:
            image, geom = read_volume(path)
            measure(name, image, geom.spacing, support, models, client, args.repeats)
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
