"""PyTorch against OpenVINO for the SAM encoder: the same masks? how much faster?

    .venv/bin/python benchmarks/runtime_agreement.py ../shared/data/chaos_t2 [--embedding-cache DIR]

For every volume of the folder, every organ painted on its middle labelled slice, all organs in
one run, once with each runtime: the mask IoU of every label-slice where either mask is
non-empty (the smallest, and how many are identical), whether the label maps are equal, and the
encoder's seconds per slice for each runtime (from runs that embedded the slices: a cache that
already holds a runtime's embeddings gives no time for it; the cache keeps each runtime's apart).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.evaluate import find_pairs, middle_paint  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402
from synpo.volume import sam_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--embedding-cache", help="reuse either runtime's embeddings from here (kept apart by runtime)")
    args = p.parse_args()
    runtimes = {name: Models.load("litemedsam", "sam", device="cpu", runtime=name) for name in ("torch", "openvino")}
    ious, equal_maps, seconds = [], [], {name: [] for name in runtimes}
    for img_path, lab_path in find_pairs(args.folder):
        image, geom = read_volume(img_path)
        gt, _ = read_volume(lab_path, "label", label=True)
        support, _ = middle_paint(gt)
        results = {}
        for name, models in runtimes.items():
            session = Session(image, geom.spacing, models, args.embedding_cache)
            results[name] = session.run(support)
            store = sam_store(session.stores)
            if results[name].timings["encode_sam"] > 0:
                seconds[name].append(store.seconds / max(1, len(store.cache)))
        a, b = results["torch"].labels, results["openvino"].labels
        equal_maps.append(np.array_equal(a, b))
        for v in results["torch"].support.labels:
            for t in range(len(a)):
                x, y = a[t] == v, b[t] == v
                union = np.logical_or(x, y).sum()
                if union:
                    ious.append(float(np.logical_and(x, y).sum() / union))
        print("%s: label maps equal %s" % (os.path.basename(img_path), equal_maps[-1]), flush=True)
    ious = np.array(ious)
    print("label-slices compared: %d; identical: %d; smallest IoU: %.4f; label maps equal on %d of %d volumes"
          % (len(ious), int((ious == 1.0).sum()), ious.min(), sum(equal_maps), len(equal_maps)))
    for name, values in seconds.items():
        if values:
            print("encoder, %s: %.3f s per slice (mean over %d volumes)" % (name, float(np.mean(values)), len(values)))


if __name__ == "__main__":
    main()
