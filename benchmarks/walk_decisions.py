"""The walk's stop rules against the truth: for every step of every walk, the figures the rules
look at, for steps that continue the organ and for steps that leave it.

    .venv/bin/python benchmarks/walk_decisions.py ../shared/data/chaos_t2 ../shared/data/cmr_bssfp \
        ../shared/data/btcv_ct [--labels ...] [--embedding-cache DIR] [-o steps.csv]

Each volume: every organ painted on its middle labelled slice (as `synpo evaluate`), one run. The
walks are steered by the ground truth instead of the rules (walk_rules.Step is recorded, then the
walk goes on when the decoded mask matches the organ on that slice, Dice >= 0.5, and stops
otherwise), so every walk is recorded up to and including its first wrong step: the steps a rule
must let through ("go") and the ones it must stop ("stop"). For each figure, first steps (next to
the paint) and later steps apart, it prints the quantiles of both kinds, and for each rule at its
configured threshold the go-steps it stops and the stop-steps it lets through; for each data set
apart, so a threshold can be chosen on some and checked on the others.
"""
import argparse
import csv
import os
import sys
import threading
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.config import configured  # noqa: E402
from synpo.decode import fill_holes  # noqa: E402
from synpo.evaluate import find_pairs, support_slice  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models  # noqa: E402
from synpo.volume import VolumeRun  # noqa: E402
from synpo.walk_rules import Step, judge_step  # noqa: E402

GO_DICE = 0.5            # a step whose mask has at least this Dice with the organ on its slice continues it
FIGURES = ("score", "ratio", "sam_iou", "overlap", "area_change", "area_frac")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


class Recorder:
    """A judge (walk_rules.Judge) that records each step and answers from the ground truth."""

    def __init__(self, gt: np.ndarray, cfg, dataset: str, volume: str, support_area: Dict[int, float]):
        self.gt, self.cfg, self.dataset, self.volume = gt, cfg, dataset, volume
        self.support_area = support_area
        self.rows: List[dict] = []
        self.lock = threading.Lock()

    def __call__(self, step: Step, vc) -> str:
        organ = self.gt[step.index] == step.label
        d = dice(step.mask, organ)
        if organ.any() and d < GO_DICE:        # a ring's walks: the filled shape, or the hole it encloses
            filled = fill_holes(organ)
            d = max(d, dice(step.mask, filled), dice(step.mask, filled & ~organ) if (filled & ~organ).any() else 0.0)
        go = bool(organ.any()) and d >= GO_DICE
        prev_area = float(step.prev.sum()) if step.prev is not None else float("nan")
        row = {"dataset": self.dataset, "volume": self.volume, "label": step.label, "slice": step.index,
               "first": step.first, "truth": "go" if go else "stop", "dice": round(d, 4),
               "organ_present": bool(organ.any()),
               "score": step.score, "ratio": step.score / step.prev_score if step.prev_score else float("nan"),
               "sam_iou": step.sam_iou, "overlap": step.overlap if step.prev is not None else float("nan"),
               "area_change": step.area / prev_area if prev_area > 0 else float("nan"),
               "area_frac": step.area / max(1.0, self.support_area.get(step.label, 1.0)),
               "rule": judge_step(step, vc) or "go"}
        with self.lock:
            self.rows.append(row)
        return "" if go else "past the organ"


def record_volume(img_path: str, lab_path: str, dataset: str, models: Models, cfg, labels, cache) -> List[dict]:
    image, geom = read_volume(img_path)
    gt, _ = read_volume(lab_path, "label", label=True)
    present = [int(v) for v in np.unique(gt) if v != 0]
    wanted = [v for v in (labels or present) if v in present]
    support = np.zeros_like(gt)
    areas = {}
    for v in wanted:
        s = support_slice(gt == v, 0.5)
        support[s][gt[s] == v] = v
        areas[v] = float((gt[s] == v).sum())
    run = VolumeRun(image, geom.spacing, support, models.sam, models.dino, cfg, None, models.confidence_from, 0, None)
    run.judge = Recorder(gt, cfg, dataset, os.path.basename(img_path).split(".")[0], areas)
    run.segment(None, None, {}, cache, None, False)
    return run.judge.rows


def quantiles(values) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "-"
    q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100])
    return "n %3d  min %.3f  p5 %.3f  p25 %.3f  med %.3f  p75 %.3f  p95 %.3f  max %.3f" % (len(v), *q)


def report(rows: List[dict], title: str) -> None:
    print("\n== %s: %d steps (%d go, %d stop)" % (title, len(rows), sum(r["truth"] == "go" for r in rows),
                                                    sum(r["truth"] == "stop" for r in rows)))
    for first in (True, False):
        sel = [r for r in rows if r["first"] == first]
        print("-- %s steps (%d)" % ("first" if first else "later", len(sel)))
        for fig in FIGURES:
            for truth in ("go", "stop"):
                print("  %-11s %-4s %s" % (fig, truth, quantiles(r[fig] for r in sel if r["truth"] == truth)))
        wrong_stops = [r for r in sel if r["truth"] == "go" and r["rule"] != "go"]
        misses = [r for r in sel if r["truth"] == "stop" and r["rule"] == "go"]
        by = {}
        for r in wrong_stops:
            by[r["rule"]] = by.get(r["rule"], 0) + 1
        print("  the configured rules stop %d of %d go-steps (%s) and let %d of %d stop-steps through"
              % (len(wrong_stops), sum(r["truth"] == "go" for r in sel),
                 ", ".join("%s %d" % kv for kv in sorted(by.items())) or "none", len(misses),
                 sum(r["truth"] == "stop" for r in sel)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="data folders (image_N / label_N)")
    ap.add_argument("--labels", type=int, nargs="*")
    ap.add_argument("--limit", type=int, default=None, help="only the first N volumes of each folder")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--embedding-cache", metavar="DIR")
    ap.add_argument("-o", "--output", help="write every step as CSV here")
    args = ap.parse_args(argv)
    cfg = configured(args.set)
    models = Models.load("litemedsam", "sam", "small", args.device, "auto", True, "torch")
    rows: List[dict] = []
    for folder in args.data:
        dataset = os.path.basename(os.path.normpath(folder))
        for img, lab in find_pairs(folder)[: args.limit]:
            got = record_volume(img, lab, dataset, models, cfg, args.labels, args.embedding_cache)
            print("%s %s: %d steps" % (dataset, os.path.basename(img), len(got)), flush=True)
            rows += got
    for dataset in sorted({r["dataset"] for r in rows}):
        report([r for r in rows if r["dataset"] == dataset], dataset)
    report(rows, "all")
    if args.output:
        with open(args.output, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
