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

Each row also holds the walk so far (Step.history: hist_areas, hist_scores, the paint first) and the
mask's mean grey value against the paint's (grey_z, in the paint's standard deviations), so a rule on
the walk's trend can be replayed on the CSV (benchmarks/replay_rules.py). With --rules the configured
rules walk instead of the truth and every step is recorded up to the one that ended the walk, past
the organ's end too (replay_rules.py --rules counts the slices a candidate would take away).

With --ends, the walks run with the configured rules instead (as the product does) and every
walk's end is set against the truth: per walk (each side of each organ's support), its last
accepted slice against the organ's last labelled slice on that side (too far / right / too short,
in slices), the rule that ended it (the reason of the slice after its last), and for walks that
went too far, the rules' figures on the first wrong slice they let through, each as its margin
over the rule's limit (the rule nearest to stopping it). `organ_ends` is the same measure for any
result (benchmarks/stability.py prints it for its first run).
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
from synpo.evaluate import check_data_folders, dataset_names, support_slice  # noqa: E402
from synpo.errors import SynPoError  # noqa: E402
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

    def __init__(self, gt: np.ndarray, cfg, dataset: str, volume: str, support_area: Dict[int, float],
                 image: np.ndarray = None, support_grey: Dict[int, tuple] = None, rules: bool = False):
        self.gt, self.cfg, self.dataset, self.volume = gt, cfg, dataset, volume
        self.rules = rules           # answer with the configured rules (the product's walks), not the truth
        self.support_area = support_area
        self.image, self.support_grey = image, support_grey or {}   # grey values: mean, std under the paint
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
               "rule": judge_step(step, vc) or "go",
               # the walk so far (Step.history: the paint first, prev last), for trend rules
               "hist_areas": ";".join(str(a) for a, _ in step.history),
               "hist_scores": ";".join("%.4f" % c for _, c in step.history)}
        if self.image is not None and step.label in self.support_grey and step.area:
            mu, sd = self.support_grey[step.label]
            v = self.image[step.index][step.mask]
            row["grey_z"] = float((v.mean() - mu) / sd) if sd > 0 else float("nan")
            row["grey_sd_ratio"] = float(v.std() / sd) if sd > 0 else float("nan")
        else:
            row["grey_z"] = row["grey_sd_ratio"] = float("nan")
        with self.lock:
            self.rows.append(row)
        if self.rules:
            return judge_step(step, vc)
        return "" if go else "past the organ"


def record_volume(img_path: str, lab_path: str, dataset: str, models: Models, cfg, labels, cache,
                  rules: bool = False) -> List[dict]:
    image, geom = read_volume(img_path)
    gt, _ = read_volume(lab_path, "label", label=True)
    present = [int(v) for v in np.unique(gt) if v != 0]
    wanted = [v for v in (labels or present) if v in present]
    support = np.zeros_like(gt)
    areas, grey = {}, {}
    for v in wanted:
        s = support_slice(gt == v, 0.5)
        support[s][gt[s] == v] = v
        areas[v] = float((gt[s] == v).sum())
        under = np.asarray(image[s][gt[s] == v], dtype=float)
        grey[v] = (float(under.mean()), float(under.std()))
    run = VolumeRun(image, geom.spacing, support, models.sam, models.dino, cfg, None, models.confidence_from, 0, None)
    run.judge = Recorder(gt, cfg, dataset, os.path.basename(img_path).split(".")[0], areas, image, grey, rules)
    run.segment(None, None, {}, cache, None, False)
    return run.judge.rows


def walk_ends(records, gt: np.ndarray, label: int, cfg) -> List[dict]:
    """Every walk of one label (a result's records, slices on axis 0): each side of each support
    slice, up to the next support. error = last accepted slice - the organ's last labelled slice on
    that side, counted along the walk (+: too far, -: too short); stopped_by: the reason of the
    slice after the last accepted one ("volume end" when none, "next support" between supports);
    margins: on the first slice past the organ that the walk accepted, each rule's figure minus
    its limit (the smallest is the rule nearest to stopping it)."""
    vc = cfg.volume
    recs = {r.index: r for r in records if r.label == label}
    supports = sorted(t for t, r in recs.items() if r.status == "support")
    labelled = np.flatnonzero((gt == label).reshape(len(gt), -1).any(1))
    accepted = ("present", "interpolated")
    out = []
    for k, s in enumerate(supports):
        for step in (-1, +1):
            bound = (supports[k - 1] if k > 0 else -1) if step < 0 else \
                (supports[k + 1] if k + 1 < len(supports) else len(gt))
            last, t = s, s + step
            while t != bound and t in recs and recs[t].status in accepted:
                last, t = t, t + step
            side = [u for u in labelled if (u - s) * step >= 0 and (bound - u) * step > 0]
            truth = max(side, key=lambda u: (u - s) * step) if side else s
            if t == bound:
                stopped = "volume end" if bound in (-1, len(gt)) else "next support"
            else:
                r = recs.get(t)
                stopped = (r.reason or r.status) if r is not None else "not decoded"
            row = {"label": label, "support": s, "step": step, "last": last, "truth_last": int(truth),
                   "error": int((last - truth) * step), "stopped_by": stopped, "margins": {}}
            if row["error"] > 0:
                w = recs[truth + step]             # the first slice past the organ, accepted
                p = recs.get(truth)
                first = p is not None and p.status == "support"
                ratio_limit = vc.min_confidence_ratio_first if first else vc.min_confidence_ratio
                row["margins"] = {
                    "confidence drop": (w.score / p.score - ratio_limit) if p is not None and p.score else None,
                    "low SAM IoU": w.sam_iou - vc.min_sam_iou,
                    "left the previous mask": w.overlap_prev - (vc.min_overlap_first if first else vc.min_overlap),
                    "low confidence": w.score - vc.min_confidence}
            out.append(row)
    return out


def organ_ends(records, gt: np.ndarray, labels, cfg) -> List[dict]:
    """walk_ends of every label in `labels`."""
    return [row for v in labels for row in walk_ends(records, gt, v, cfg)]


def ends_report(rows: List[dict], title: str) -> dict:
    """Prints and returns the ends of `rows` (walk_ends rows, one data set or all)."""
    err = np.array([r["error"] for r in rows]) if rows else np.zeros(0, int)
    # (the data set too: image_1's label 1 of one set is not image_1's label 1 of another)
    organs = len({(r.get("dataset"), r.get("volume"), r["label"]) for r in rows})
    f = {"walks": len(rows), "too_far": int((err > 0).sum()), "right": int((err == 0).sum()),
         "too_short": int((err < 0).sum()), "slices_too_far": int(err[err > 0].sum()),
         "slices_too_short": int(-err[err < 0].sum()), "organs": organs}
    print("\n== ends, %s: %d walks of %d organ-volumes: %d too far (%d slices, %.2f per organ), %d right, "
          "%d too short (%d slices, %.2f per organ)" % (title, f["walks"], organs, f["too_far"], f["slices_too_far"],
                                                        f["slices_too_far"] / max(1, organs), f["right"],
                                                        f["too_short"], f["slices_too_short"],
                                                        f["slices_too_short"] / max(1, organs)))
    by: Dict[str, List[int]] = {}
    for r in rows:
        by.setdefault(r["stopped_by"], []).append(r["error"])
    for why, errs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        e = np.array(errs)
        print("  stopped by %-24s %3d walks: %3d too far (%d slices), %3d right, %3d too short (%d slices)"
              % (why, len(e), (e > 0).sum(), e[e > 0].sum(), (e == 0).sum(), (e < 0).sum(), -e[e < 0].sum()))
    near: Dict[str, int] = {}
    for r in rows:
        m = {k: v for k, v in r["margins"].items() if v is not None}
        if m:
            k = min(m, key=m.get)
            near[k] = near.get(k, 0) + 1
    if near:
        print("  too-far walks, the rule nearest to stopping the first wrong slice: %s"
              % ", ".join("%s %d" % kv for kv in sorted(near.items(), key=lambda kv: -kv[1])))
    return f


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
    ap.add_argument("--ends", action="store_true",
                    help="the configured rules walk (not the truth); report every walk's end against the truth")
    ap.add_argument("--by-label", action="store_true", help="with --ends: the ends of each label apart too")
    ap.add_argument("--rules", action="store_true",
                    help="record the walks the configured rules make (every step, past the organ's end too), "
                         "not the truth-steered ones (benchmarks/replay_rules.py --rules)")
    args = ap.parse_args(argv)
    try:
        args.found = check_data_folders(args.data, args.limit)
    except SynPoError as e:
        raise SystemExit("walk_decisions: error: %s" % e)
    found = args.found
    if args.ends:
        return ends_main(args)
    cfg = configured(args.set)
    models = Models.load("litemedsam", "sam", "small", args.device, "auto", True, "torch")
    rows: List[dict] = []
    for folder, dataset in zip(args.data, dataset_names(args.data)):
        for img, lab in found[folder]:
            got = record_volume(img, lab, dataset, models, cfg, args.labels, args.embedding_cache, args.rules)
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


def ends_main(args) -> Dict[str, dict]:
    """--ends: each volume segmented as `synpo evaluate` does (each organ painted on its middle
    labelled slice, one run), every walk's end set against the truth."""
    found = getattr(args, "found", None) or check_data_folders(args.data, args.limit)
    from synpo.session import Session
    cfg = configured(args.set)
    models = Models.load("litemedsam", "sam", "small", args.device, "auto", True, "torch")
    per_set: Dict[str, List[dict]] = {}
    for folder, dataset in zip(args.data, dataset_names(args.data)):
        for img, lab in found[folder]:
            image, geom = read_volume(img)
            gt, _ = read_volume(lab, "label", label=True)
            present = [int(v) for v in np.unique(gt) if v != 0]
            wanted = [v for v in (args.labels or present) if v in present]
            support = np.zeros_like(gt)
            for v in wanted:
                s = support_slice(gt == v, 0.5)
                support[s][gt[s] == v] = v
            result = Session(image, geom.spacing, models, args.embedding_cache).run(support, cfg)
            name = os.path.basename(img).split(".")[0]
            rows = organ_ends(result.records, gt, wanted, cfg)
            for r in rows:
                r["volume"], r["dataset"] = name, dataset
            per_set.setdefault(dataset, []).extend(rows)
            print("%s %s: %s" % (dataset, name, " ".join("%d%s%+d" % (r["label"], "v^"[r["step"] > 0], r["error"])
                                                          for r in rows)), flush=True)
    out = {ds: ends_report(rows, ds) for ds, rows in per_set.items()}
    if args.by_label:
        for ds, rows in per_set.items():
            for v in sorted({r["label"] for r in rows}):
                out["%s label %d" % (ds, v)] = ends_report([r for r in rows if r["label"] == v],
                                                           "%s label %d" % (ds, v))
    if len(per_set) > 1:
        out["all"] = ends_report([r for rows in per_set.values() for r in rows], "all")
    return out


if __name__ == "__main__":
    main()
