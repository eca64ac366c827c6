"""Where SynPo loses against the oracle box, per organ: the walk, or the mask on the slices it reached.

    .venv/bin/python benchmarks/loss_breakdown.py EVAL_DIR [--names btcv]

EVAL_DIR: the output of `synpo evaluate` (its per_slice.csv, with the `synpo` and `oracle_box`
methods). For each organ label, over every labelled slice of every volume: the fraction SynPo
left empty (the walk stopped before it, or judged it absent), SynPo's and the oracle's mean slice
Dice on the slices SynPo reached, and the oracle's on the slices SynPo missed. The loss against the
oracle then splits into "walk" (slices missed, each costing the oracle's Dice there) and "mask" (the
Dice given away on slices reached: prompts, box and decoding), per labelled slice.

    .venv/bin/python benchmarks/loss_breakdown.py EVAL_DIR --ends [--names chaos]

--ends needs SynPo's rows only (`synpo evaluate --no-baselines`): per organ label and over all, the
whole-volume Dice, the Dice over the labelled slices, the slices segmented where the organ is absent
and the labelled slices left empty (mostly a walk that ended early), each per organ-volume.
"""
import argparse
import csv
import os
from collections import defaultdict
from typing import Dict

import numpy as np

NAMES = {"btcv": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "oesophagus", 6: "liver",
                  7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic veins",
                  11: "pancreas", 12: "right adrenal", 13: "left adrenal"},
         "chaos": {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"},
         "cmr": {200: "LV myocardium", 500: "LV blood pool", 600: "right ventricle"},
         "acdc": {1: "right ventricle", 2: "LV myocardium", 3: "LV blood pool"}}


def breakdown(rows):
    """{label: figures} from per_slice.csv rows."""
    by = defaultdict(dict)
    for r in rows:
        if r["method"] in ("synpo", "oracle_box"):
            by[int(r["label"])].setdefault((r["volume"], int(r["slice_rank"])), {})[r["method"]] = float(r["dice"])
    out = {}
    for label, slices in sorted(by.items()):
        pairs = [(v["synpo"], v["oracle_box"]) for v in slices.values() if "synpo" in v and "oracle_box" in v]
        if not pairs:
            continue
        s, o = np.array(pairs).T
        reached = s > 0
        n = len(s)
        out[label] = {"slices": n, "missed": float(np.mean(~reached)),
                      "synpo_reached": float(np.mean(s[reached])) if reached.any() else float("nan"),
                      "oracle_reached": float(np.mean(o[reached])) if reached.any() else float("nan"),
                      "oracle_missed": float(np.mean(o[~reached])) if (~reached).any() else float("nan"),
                      "loss_walk": float(np.sum(o[~reached]) / n),
                      "loss_mask": float(np.sum(o[reached] - s[reached]) / n),
                      "synpo_mean": float(np.mean(s)), "oracle_mean": float(np.mean(o))}
    return out


def ends_table(eval_dir: str, method: str = "synpo") -> Dict:
    """{label or "all": figures} from an evaluation's results.csv and per_slice.csv (module docstring)."""
    with open(os.path.join(eval_dir, "results.csv")) as handle:
        res = [r for r in csv.DictReader(handle) if r["method"] == method]
    with open(os.path.join(eval_dir, "per_slice.csv")) as handle:
        sl = [r for r in csv.DictReader(handle) if r["method"] == method]
    missed = defaultdict(int)
    for r in sl:
        missed[(r["volume"], int(r["label"]), r["position"])] += float(r["dice"]) == 0.0
    out = {}
    for label in sorted({int(r["label"]) for r in res}) + ["all"]:
        rows = [r for r in res if label == "all" or int(r["label"]) == label]
        out[label] = {"n": len(rows),
                      "dice_volume": float(np.mean([float(r["dice_volume"]) for r in rows])),
                      "dice_labelled": float(np.mean([float(r["dice_labelled"]) for r in rows])),
                      "absent_segmented": float(np.mean([int(r["fp_slices"]) for r in rows])),
                      "labelled_missed": float(np.mean([missed[(r["volume"], int(r["label"]), r["position"])]
                                                        for r in rows])),
                      "lowest": float(min(float(r["dice_volume"]) for r in rows))}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir")
    ap.add_argument("--names", choices=sorted(NAMES), help="organ names for the labels")
    ap.add_argument("--oracle-from", metavar="EVAL_DIR",
                    help="take the oracle_box rows from this evaluation (SynPo's from EVAL_DIR): a later SynPo-only "
                         "run (--no-baselines) against the oracle of an earlier one on the same volumes")
    ap.add_argument("--ends", action="store_true", help="Dice, absent slices segmented and labelled slices missed "
                                                        "per organ (SynPo's rows only)")
    args = ap.parse_args(argv)
    if args.ends:
        names = NAMES.get(args.names, {})
        table = ends_table(args.eval_dir)
        print("| organ | organ-volumes | Dice (whole volume) | Dice (labelled slices) | absent slices segmented "
              "/ organ | labelled slices missed / organ | lowest |")
        print("|---|---|---|---|---|---|---|")
        for label, f in table.items():
            print("| %s | %d | %.3f | %.3f | %.2f | %.2f | %.3f |" % (
                names.get(label, label), f["n"], f["dice_volume"], f["dice_labelled"], f["absent_segmented"],
                f["labelled_missed"], f["lowest"]))
        return table
    with open(os.path.join(args.eval_dir, "per_slice.csv")) as handle:
        rows = list(csv.DictReader(handle))
    if args.oracle_from:
        with open(os.path.join(args.oracle_from, "per_slice.csv")) as handle:
            rows = [r for r in rows if r["method"] != "oracle_box"] + \
                [r for r in csv.DictReader(handle) if r["method"] == "oracle_box"]
    figures = breakdown(rows)
    names = NAMES.get(args.names, {})
    print("| organ | labelled slices | SynPo / oracle (mean slice Dice) | slices missed | on slices reached: "
          "SynPo / oracle | oracle on missed | loss: walk / mask |")
    print("|---|---|---|---|---|---|---|")
    for label, f in figures.items():
        print("| %s | %d | %.3f / %.3f | %.0f %% | %.3f / %.3f | %.3f | %.3f / %.3f |" % (
            names.get(label, label), f["slices"], f["synpo_mean"], f["oracle_mean"], 100 * f["missed"],
            f["synpo_reached"], f["oracle_reached"], f["oracle_missed"], f["loss_walk"], f["loss_mask"]))
    return figures


if __name__ == "__main__":
    main()
