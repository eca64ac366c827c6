"""A kidney painted on a slice through its hilum (its truth encloses the renal sinus, a hole of at least
0.1 of the filled outline), one run per such slice with volume.ring_min_hole 0.1 and 0.2: whole-volume Dice
(a ring's walk against a filled organ's; docs/corrections.md, "A kidney painted through its hilum is not a
ring").

    python benchmarks/kidney_sinus.py [DATA] [--embedding-cache DIR]

DATA: a BTCV folder (image_N / label_N, labels 2 and 3 the kidneys; default ../shared/data/btcv_ct). CPU,
LiteMedSAM, SAM features.
"""
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))
from synpo.io import read_volume  # noqa: E402
from synpo.rings import ring_parts  # noqa: E402
from synpo.session import Session, Models  # noqa: E402
from synpo.features import load_models  # noqa: E402
from synpo.config import SynPoConfig  # noqa: E402
from synpo.evaluate import dice  # noqa: E402


def sinus_slices(gt: np.ndarray, labels=(2, 3), min_hole: float = 0.1):
    """(label, slice, hole fraction) of every kidney slice whose truth encloses a hole of at least
    `min_hole` of its filled outline (slices of at least 20 px)."""
    for lab in labels:
        for k in range(gt.shape[0]):
            m = gt[k] == lab
            parts = ring_parts([m], min_hole) if m.sum() >= 20 else None   # the run's own ring test
            if parts is not None:
                yield lab, k, float(parts[1][0].sum() / parts[0][0].sum())


def main(argv):
    cache = None
    if "--embedding-cache" in argv:
        i = argv.index("--embedding-cache")
        cache = argv[i + 1]
        del argv[i:i + 2]
    here = os.path.dirname(os.path.abspath(__file__))
    data = argv[0] if argv else os.path.join(here, "..", "..", "shared", "data", "btcv_ct")
    models = Models.of(*load_models("litemedsam", "sam", "small", "cpu", True))
    rows = []
    for img_path in sorted(glob.glob(os.path.join(data, "image_*.nii*"))):
        gt = read_volume(img_path.replace("image_", "label_"), "label", label=True)[0]
        found = list(sinus_slices(gt))
        if not found:
            continue
        image, geom = read_volume(img_path)
        session = Session(image, geom.spacing, models, cache)
        for lab, k, hole in found:
            support = np.zeros_like(gt)
            support[k][gt[k] == lab] = lab
            dices = [dice(session.run(support, SynPoConfig().with_(volume={"ring_min_hole": v})).labels == lab,
                          gt == lab) for v in (0.1, 0.2)]
            rows.append((os.path.basename(img_path).split(".")[0], lab, k, hole, dices[0], dices[1]))
            print("%s kidney %d slice %d hole %.3f: Dice at 0.1 %.3f, at 0.2 %.3f" % rows[-1], flush=True)
    if not rows:
        print("no kidney slice with a hole of 0.1 or more in " + data)
        return 1
    print("mean over %d paints: 0.1 %.4f, 0.2 %.4f" % (len(rows), np.mean([r[4] for r in rows]),
                                                      np.mean([r[5] for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
