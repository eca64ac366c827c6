"""One organ slice by slice: where an organ-volume's Dice is lost (missed slices, a step onto a
neighbour, a bad mask on the slices reached, or the assembly giving its pixels to another label).

    .venv/bin/python benchmarks/organ_slices.py ../shared/data/btcv_ct --labels 2 3 \
        [--positions 0.33 0.5 0.67] [--alone] [--limit N] [--set F=V] [--embedding-cache DIR] [-v]

Each volume, each position: every wanted organ painted on the labelled slice at that position of
its range (as `synpo evaluate --positions`), one run (--alone: one run per organ, painted alone, so
no other label can take its pixels in the assembly). Per organ-volume it prints the whole-volume
Dice and the Dice lost to each cause, as whole-volume Dice points that add up to 1 - Dice (each
cause's pixels over the predicted plus the true pixels):
- missed: labelled slices left empty (the walk ended before them or judged them absent);
- extra: slices segmented where the organ is absent;
- neighbour: on labelled slices, the mask's pixels on another labelled organ (which one);
- mask: the rest of the loss on slices reached (pixels outside every organ, organ left out);
and with -v each slice: the truth's area, the mask's, Dice, status and reason (the stop rule), the
mask's fraction on each other organ.
"""
import argparse
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.config import configured  # noqa: E402
from synpo.evaluate import find_pairs, support_slice  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402


def loss_parts(pred: np.ndarray, gt: np.ndarray, label: int) -> Dict[str, object]:
    """Whole-volume Dice of `label` (slices on axis 0) and what it loses, per cause (module
    docstring): the Dice is 2|P&G| / (|P| + |G|); each cause's share is its pixels' effect on it."""
    p, g = pred == label, gt == label
    P, G = float(p.sum()), float(g.sum())
    inter = float(np.logical_and(p, g).sum())
    dice = 2 * inter / (P + G) if P + G else 1.0
    labelled = g.reshape(len(g), -1).any(1)
    reached = p.reshape(len(p), -1).any(1)
    denom = P + G
    # 1 - Dice = ((P - I) + (G - I)) / (P + G): P - I is extra + neighbour + outside, G - I is
    # missed + left out.
    missed = float(g[labelled & ~reached].sum())
    extra = float(p[~labelled].sum())
    on_lab = labelled & reached
    neighbours: Dict[int, float] = {}
    for t in np.flatnonzero(on_lab):
        other = gt[t][p[t] & ~g[t]]
        for v, n in zip(*np.unique(other[other != 0], return_counts=True)):
            neighbours[int(v)] = neighbours.get(int(v), 0.0) + float(n)
    outside = float(np.logical_and(p[on_lab], gt[on_lab] == 0).sum())
    left_out = float(np.logical_and(~p[on_lab], g[on_lab]).sum())
    return {"dice": dice, "P": P, "G": G, "missed_px": missed, "extra_px": extra, "neighbour_px": neighbours,
            "outside_px": outside, "left_out_px": left_out, "denom": denom,
            "labelled": int(labelled.sum()), "missed_slices": int((labelled & ~reached).sum()),
            "extra_slices": int((~labelled & reached).sum())}


def slice_rows(pred, gt, label, records) -> List[str]:
    recs = {r.index: r for r in records if r.label == label}
    p, g = pred == label, gt == label
    rows = []
    span = np.flatnonzero(g.reshape(len(g), -1).any(1) | p.reshape(len(p), -1).any(1))
    if not len(span):
        return rows
    for t in range(max(0, span[0] - 2), min(len(g), span[-1] + 3)):
        r = recs.get(t)
        a, b = int(g[t].sum()), int(p[t].sum())
        d = 2 * np.logical_and(p[t], g[t]).sum() / (a + b) if a + b else 1.0
        other = gt[t][p[t] & ~g[t]]
        on = ", ".join("%d:%.2f" % (v, n / max(1, b)) for v, n in zip(*np.unique(other[other != 0],
                                                                                   return_counts=True)))
        rows.append("    %3d truth %5d mask %5d dice %.3f  %-12s %-26s iou %.2f ovl %.2f conf %.3f %s" % (
            t, a, b, d, r.status if r else "-", (r.reason if r else "")[:26], r.sam_iou if r else 0,
            r.overlap_prev if r else 0, r.score if r else 0, ("on " + on) if on else ""))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--labels", type=int, nargs="+", required=True)
    ap.add_argument("--positions", type=float, nargs="+", default=[0.5])
    ap.add_argument("--alone", action="store_true", help="each organ painted alone (no assembly with others)")
    ap.add_argument("--paint-all", action="store_true",
                    help="paint every labelled organ (as synpo evaluate does), report --labels")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--embedding-cache")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    cfg = configured(args.set)
    models = Models.load("litemedsam", "sam", "small", args.device, "auto", True, "torch")
    summary = []
    for img, lab in find_pairs(args.data)[: args.limit]:
        image, geom = read_volume(img)
        gt, _ = read_volume(lab, "label", label=True)
        name = os.path.basename(img).split(".")[0]
        session = Session(image, geom.spacing, models, args.embedding_cache)
        present = [int(v) for v in np.unique(gt) if v != 0]
        wanted = [v for v in args.labels if v in present]
        for pos in args.positions:
            painted = present if args.paint_all else wanted
            groups = [[v] for v in wanted] if args.alone else [painted]
            for group in groups:
                support = np.zeros_like(gt)
                for v in group:
                    s = support_slice(gt == v, pos)
                    support[s][gt[s] == v] = v
                result = session.run(support, cfg)
                for v in [u for u in group if u in wanted]:
                    f = loss_parts(result.labels, gt, v)
                    d = f["denom"]
                    nb = ", ".join("%d %.3f" % (k, n / d) for k, n in sorted(f["neighbour_px"].items()))
                    print("%s label %d at %.2f: Dice %.3f | slices %d, missed %d (%.3f), extra %d (%.3f) | "
                          "neighbour %s | outside %.3f, left out %.3f" % (
                              name, v, pos, f["dice"], f["labelled"], f["missed_slices"], f["missed_px"] / d,
                              f["extra_slices"], f["extra_px"] / d, nb or "-", f["outside_px"] / d,
                              f["left_out_px"] / d), flush=True)
                    if args.verbose:
                        print("\n".join(slice_rows(result.labels, gt, v, result.records)), flush=True)
                    summary.append((name, v, pos, f))
    for v in args.labels:
        ds = [f["dice"] for (_, u, _, f) in summary if u == v]
        if ds:
            print("label %d: %d organ-volumes, mean Dice %.3f, min %.3f, missed slices %.2f, extra %.2f" % (
                v, len(ds), np.mean(ds), np.min(ds),
                np.mean([f["missed_slices"] for (_, u, _, f) in summary if u == v]),
                np.mean([f["extra_slices"] for (_, u, _, f) in summary if u == v])))


if __name__ == "__main__":
    main()
