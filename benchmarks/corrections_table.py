"""The corrections curve of one or more `synpo evaluate --corrections N` runs, side by side.

    python benchmarks/corrections_table.py NAME=FOLDER[=DATA] [NAME=FOLDER[=DATA] ...]

Each FOLDER is an evaluate output folder (its corrections.csv). Prints per run: per round the
mean Dice of SynPo and (when the CSV has it) of Fill between slices on the same painted slices,
the painted slices per organ and the mean seconds per run; then the monotonicity figures of
issue 28 (per organ-volume, Dice after k+1 corrections >= Dice after k - 0.005; steps down by
more than 0.02; the worst step). CSVs written before the Fill-between-slices columns existed are
read too: the painted slices are counted from the actions, and with =DATA (the data folder the
run evaluated) Fill between slices is run on each round's painted slices from its ground truth
(corrections.fill_dice), as `synpo evaluate --corrections` does today.
"""
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.corrections import (COST_DICE, CorrectionScore, cost, even_fill_cost, fill_dice,  # noqa: E402
                               monotonicity, summarize_rounds)


def load(folder, data=None):
    rows = sorted(csv.DictReader(open(os.path.join(folder, "corrections.csv"))),
                  key=lambda r: (r["volume"], int(r["label"]), int(r["round"])))
    out, gts = [], {}
    painted, touched = {}, {}
    for r in rows:
        key = (r["volume"], int(r["label"]))
        fill, even = float(r.get("fill_dice") or "nan"), [int(r.get("fill_even_090") or 0),
                                                         int(r.get("fill_even_095") or 0)]
        if "painted" not in r and data is not None:
            import numpy as np
            from synpo.evaluate import label_of, support_slice
            from synpo.io import read_volume
            if r["volume"] not in gts:
                gt, geom = read_volume(label_of(data, r["volume"]), "label", label=True)
                gts[r["volume"]] = (gt, tuple(reversed(tuple(geom.spacing))), {})
            gt, spacing, costs = gts[r["volume"]]
            g = gt == key[1]
            if int(r["round"]) == 0:
                painted[key] = {support_slice(g, 0.5)}
                touched[key] = set(painted[key])
            elif r["action"] not in ("", "none"):
                kind, t = r["action"].split()
                touched[key].add(int(t))
                if kind == "paint":
                    painted[key].add(int(t))
            fill = fill_dice(g, painted[key], touched[key], spacing)
            if key not in costs:
                costs[key] = even_fill_cost(g, spacing)
            even = costs[key]
            n_painted = len(painted[key])
        else:
            n_painted = int(r.get("painted") or 0)
        out.append(CorrectionScore(r["volume"], int(r["label"]), int(r["round"]), float(r["dice_volume"]),
                                   int(r["fp_slices"]), float(r["seconds"]), r["action"], n_painted, fill, *even,
                                   dice_before_same=float(r.get("dice_before_same") or "nan")))
    return out


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    for arg in argv:
        name, folder = arg.split("=", 1)
        folder, data = folder.split("=", 1) if "=" in folder else (folder, None)
        scores = load(folder, data)
        print("### %s (%s)\n" % (name, folder))
        print("| k | SynPo Dice | Fill between slices Dice | painted slices / organ | seconds per run (max) |")
        print("|---|---|---|---|---|")
        for k, s in summarize_rounds(scores).items():
            fill = "-" if s["fill_dice"] != s["fill_dice"] else "%.4f" % s["fill_dice"]
            painted = "-" if not s["painted"] else "%.2f" % s["painted"]
            print("| %d | %.4f | %s | %s | %.1f (%.1f) |" % (k, s["dice_volume"], fill, painted, s["seconds_per_run"],
                                                            s["seconds_max"]))
        m = monotonicity(scores)
        print("\nsteps %d; held (>= -0.005) %.1f %%; organ-volumes held at every step %.1f %%; down by > 0.02: %d; "
              "worst step %+.4f\n" % (m["steps"], 100 * m["held"], 100 * m["organs_held"], m["down_beyond_floor"],
                                      m["worst"]))
        if m["same_steps"]:
            print("on the same slices (the slice painted or marked at step k+1 left out of both rounds): held %.1f %% "
                  "of %d steps; down by > 0.02: %d\n" % (100 * m["held_same"], m["same_steps"],
                                                         m["down_beyond_floor_same"]))
        if scores[0].painted:
            need = cost(scores)
            for level in COST_DICE:
                print("painted slices to reach Dice %.2f (median; share reached): SynPo %s; Fill between slices, "
                      "same slices %s; evenly spread %s" % (level, *("%.0f; %.0f %%" % (need[m][level][0],
                                                                                         100 * need[m][level][1])
                                                                    for m in ("synpo", "fill_same", "fill_even"))))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
