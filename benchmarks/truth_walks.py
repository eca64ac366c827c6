"""The walk's trend rules on the truth itself: would a rule end an organ the annotators drew?

    PYTHONPATH=SynPoSlicer python benchmarks/truth_walks.py ../shared/data/chaos_t2 [DATA ...] \
        [--set SECTION.FIELD=VALUE ...]

For every organ-volume, the truth's area on each slice is walked outwards from the organ's middle
labelled slice (where `synpo evaluate` paints it) in both directions, as a walk of perfect masks,
and `walk_rules.trend` judges each step with the configured rules (volume.regrow_*, sudden_*,
falling_*; the pixel size from the volume's spacing). Every step's confidence is taken as the same,
so only the rules on the areas can fire (the re-growth rule; the abrupt end also asks for a
confidence drop). A rule that fires there would end a walk whose
masks were the truth: it prints each such cut (organ, slice, labelled slices lost, the reason) and
per data set how many organ-volumes the rules leave whole. No model runs: seconds for all four sets.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.config import configured  # noqa: E402
from synpo.evaluate import find_pairs, support_slice  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.walk_rules import Step, trend  # noqa: E402


def truth_cuts(areas: np.ndarray, start: int, vc, pixel_mm2: float, label: int = 1):
    """[(slice, labelled slices lost, reason)] where the trend rules end a walk of the truth's own
    areas (areas: (slices,) pixel counts) from `start`, one entry per direction at most."""
    cuts = []
    for d in (-1, 1):
        history, k = [(int(areas[start]), 1.0)], start + d
        while 0 <= k < len(areas) and areas[k] > 0:
            step = Step(label, k, False, None, int(areas[k]), None, 0.0, 1.0, 1.0, 1.0, 1.0, tuple(history),
                        pixel_mm2)
            why = trend(step, vc) if len(history) > 1 else ""
            if why:
                lost = int(np.count_nonzero(areas[k::d]))             # from k outwards
                cuts.append((k, lost, why))
                break
            history.append((int(areas[k]), 1.0))
            k += d
    return cuts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args(argv)
    vc = configured(args.set).volume
    for folder in args.data:
        name, organs, cut = os.path.basename(os.path.normpath(folder)), 0, 0
        for _, lab in find_pairs(folder):
            gt, geom = read_volume(lab, "label", label=True)
            pixel_mm2 = float(geom.spacing[0] * geom.spacing[1])      # the k-slices' in-plane pixel (i, j)
            for v in (int(x) for x in np.unique(gt) if x):
                truth = gt == v
                areas = truth.reshape(truth.shape[0], -1).sum(1)
                cuts = truth_cuts(areas, support_slice(truth, 0.5), vc, pixel_mm2, v)
                organs += 1
                cut += bool(cuts)
                for k, lost, why in cuts:
                    print("%s %s label %d: cut at slice %d, %d labelled slices lost: %s"
                          % (name, os.path.basename(lab).split(".")[0], v, k, lost, why))
        print("%s: %d organ-volumes, %d cut by the trend rules on their own truth" % (name, organs, cut), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
