"""Slices segmented where an organ is absent, split by how its labelled range ends on that side.

    PYTHONPATH=SynPoSlicer python benchmarks/label_ends.py ../shared/data/btcv_ct [DATA ...] \
        [--abrupt 0.5] [--set SECTION.FIELD=VALUE ...] [--embedding-cache DIR]

Each volume: every organ painted on its middle labelled slice (the intra protocol of `synpo
evaluate`), one run, CPU, LiteMedSAM, SAM features. For each organ and each end of its labelled
range: the end is "abrupt" when its last labelled slice still holds at least --abrupt x the organ's
median labelled area (the annotation stops where the structure goes on: a vessel labelled over part
of its course), else "tapering" (the organ itself ends); and the slices segmented beyond it, counted
outwards until the first empty slice. Per organ label and in all: ends of each kind and the slices
segmented beyond them (the "absent slices segmented" of `benchmarks/loss_breakdown.py --ends`, less
any inside the labelled range).
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.config import configured  # noqa: E402
from synpo.evaluate import find_pairs, middle_paint  # noqa: E402
from synpo.features import load_models  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402


def beyond_ends(truth_areas: np.ndarray, mask_areas: np.ndarray, abrupt: float):
    """[(kind, slices segmented beyond that end)] for the two ends of the labelled range: kind is
    "abrupt" or "tapering". truth_areas, mask_areas: (slices,) pixel counts of one organ."""
    labelled = np.nonzero(truth_areas)[0]
    median = float(np.median(truth_areas[labelled]))
    out = []
    for end, outwards in ((labelled.min(), -1), (labelled.max(), +1)):
        extra, k = 0, end + outwards
        while 0 <= k < len(mask_areas) and mask_areas[k] > 0:
            extra, k = extra + 1, k + outwards
        out.append(("abrupt" if truth_areas[end] >= abrupt * median else "tapering", extra))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--abrupt", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--embedding-cache", default="/tmp/emb")
    args = ap.parse_args(argv)
    cfg = configured(args.set)
    models = Models.of(*load_models("litemedsam", "sam", "small", "cpu", True))
    for folder in args.data:
        counts = defaultdict(lambda: {"abrupt": [0, 0], "tapering": [0, 0]})   # label -> kind -> [ends, slices]
        for img, lab in find_pairs(folder):
            image, geom = read_volume(img)
            gt, _ = read_volume(lab, "label", label=True)
            support, wanted = middle_paint(gt)
            labels = Session(image, geom.spacing, models, args.embedding_cache).run(support, cfg, axis=0).labels
            for v in wanted:
                per_slice = lambda a: (a == v).reshape(a.shape[0], -1).sum(1)   # noqa: E731
                for kind, extra in beyond_ends(per_slice(gt), per_slice(labels), args.abrupt):
                    counts[v][kind][0] += 1
                    counts[v][kind][1] += extra
        print("%s: slices segmented beyond each end of the labelled range" % os.path.basename(os.path.normpath(folder)))
        print("| label | abrupt ends | slices beyond them | tapering ends | slices beyond them |")
        print("|---|---|---|---|---|")
        total = {"abrupt": [0, 0], "tapering": [0, 0]}
        for v in sorted(counts):
            c = counts[v]
            for kind in total:
                total[kind] = [a + b for a, b in zip(total[kind], c[kind])]
            print("| %d | %d | %d | %d | %d |" % (v, *c["abrupt"], *c["tapering"]))
        print("| all | %d | %d | %d | %d |" % (*total["abrupt"], *total["tapering"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
