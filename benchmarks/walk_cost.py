"""A preview costs what the organ costs: slices embedded and seconds per organ, and the same
decisions as embedding every slice.

    .venv/bin/python benchmarks/walk_cost.py cost ../shared/data/chaos_t2/image_1.nii.gz --labels 4 1
        each label alone, from its middle labelled slice, nothing cached: wall seconds, slices
        embedded, and each label's seconds as a ratio of the last one's (spleen 4 / liver 1)
    .venv/bin/python benchmarks/walk_cost.py same ../shared/data/chaos_t2 [--embedding-cache DIR]
        every volume of a data folder, all organs at their middle slice, run embedding only the
        slices the walks reach and again with the confidence of every slice: are the label maps,
        the records and the computed slices' confidence equal?
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.evaluate import find_pairs, support_slice  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402
from synpo.volume import sam_store  # noqa: E402


def middle_support(gt: np.ndarray, labels) -> np.ndarray:
    support = np.zeros_like(gt)
    for v in labels:
        s = support_slice(gt == v, 0.5)
        support[s][gt[s] == v] = v
    return support


def cost(args, models: Models) -> None:
    image, geom = read_volume(args.image)
    gt, _ = read_volume(args.image.replace("image_", "label_"), "label", label=True)
    rows = []
    for v in args.labels:
        session = Session(image, geom.spacing, models)            # nothing cached: encoding counts
        t0 = time.perf_counter()
        result = session.run(middle_support(gt, [v]))
        wall = time.perf_counter() - t0
        found = [r.index for r in result.records if r.status in ("support", "present")]
        rows.append((v, wall, len(sam_store(session.stores).cache), len(found), int((gt == v).any((1, 2)).sum())))
    print("%s, %d slices, %s" % (os.path.basename(args.image), image.shape[0], models.describe()))
    for v, wall, embedded, found, labelled in rows:
        print("  label %d alone: %.1f s, %d slices embedded, found on %d (labelled on %d), %.2f x label %d's time"
              % (v, wall, embedded, found, labelled, wall / rows[-1][1], rows[-1][0]))


def same(args, models: Models) -> None:
    equal_all = True
    for img_path, lab_path in find_pairs(args.folder):
        image, geom = read_volume(img_path)
        gt, _ = read_volume(lab_path, "label", label=True)
        support = middle_support(gt, [int(v) for v in np.unique(gt) if v])
        session = Session(image, geom.spacing, models, args.embedding_cache)
        t0 = time.perf_counter()
        lazy = session.run(support)
        t1 = time.perf_counter()
        full = Session(image, geom.spacing, models, args.embedding_cache).run(support, confidence_everywhere=True)
        recs = lambda r: [(x.label, x.index, x.status, x.reason, x.box, round(x.score, 6)) for x in r.records]
        conf_same = True
        for v in lazy.support.labels:            # each label's map where its own walks computed it
            mine = lazy.confidence[v].reshape(len(image), -1).any(1)
            conf_same &= np.array_equal(lazy.confidence[v][mine], full.confidence[v][mine])
        equal = np.array_equal(lazy.labels, full.labels) and recs(lazy) == recs(full) and conf_same
        equal_all &= equal
        print("%s: labels %s, %d of %d slices computed (%.1f s), label maps and records equal to every slice's: %s"
              % (os.path.basename(img_path), lazy.support.labels, len(lazy.computed), image.shape[0], t1 - t0, equal))
    print("all equal: %s" % equal_all)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("image")
    c.add_argument("--labels", type=int, nargs="+", default=[4, 1])
    s = sub.add_parser("same")
    s.add_argument("folder")
    s.add_argument("--embedding-cache")
    for q in (c, s):
        q.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    models = Models.load("litemedsam", "sam", device=args.device)
    (cost if args.what == "cost" else same)(args, models)


if __name__ == "__main__":
    main()
