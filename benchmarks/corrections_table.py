"""The corrections curve of one or more `synpo evaluate --corrections N` runs, side by side.

    python benchmarks/corrections_table.py NAME=FOLDER [NAME=FOLDER ...]

Each FOLDER is an evaluate output folder (its corrections.csv). Prints per run: per round the
mean Dice of SynPo and (when the CSV has it) of Fill between slices on the same painted slices,
the painted slices per organ and the mean seconds per run; then the monotonicity figures of
issue 28 (per organ-volume, Dice after k+1 corrections >= Dice after k - 0.005; steps down by
more than 0.02; the worst step). CSVs written before the Fill-between-slices columns existed are
read too (those columns then show "-").
"""
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.corrections import CorrectionScore, monotonicity, summarize_rounds  # noqa: E402


def load(folder):
    out = []
    for r in csv.DictReader(open(os.path.join(folder, "corrections.csv"))):
        out.append(CorrectionScore(r["volume"], int(r["label"]), int(r["round"]), float(r["dice_volume"]),
                                   int(r["fp_slices"]), float(r["seconds"]), r["action"],
                                   int(r.get("painted") or 0), float(r.get("fill_dice") or "nan")))
    return out


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    for arg in argv:
        name, folder = arg.split("=", 1)
        scores = load(folder)
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
