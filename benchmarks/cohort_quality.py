"""Quality across patients through `synpo cohort` itself: each volume of a data set labels the others.

    .venv/bin/python benchmarks/cohort_quality.py ../shared/data/chaos_t2 [../shared/data/cmr_bssfp ...] \
        -o cohort-quality [--workers 2] [--threads-per-worker 1] [--limit N] \
        -- --device cpu --features sam --embedding-cache /tmp/emb [other `synpo cohort` options]

For each data set and each volume R in it: R's ground truth painted on 3 slices per organ (1/6, 1/2
and 5/6 of the organ's labelled range: the support slices of the published cross-patient protocol,
synpo/evaluate.py) is the reference; `synpo cohort image_R reference_labels <every other image> -o
OUT/<data set>/ref_<R>` segments the others (the product path: a subprocess running the command
line). Each output is scored against its query's ground truth, per organ the reference and the
query share:
- dice_labelled: Dice over the query's labelled slices of the organ (the published protocol's
  score; its support slices here come from the product's propagation, not from knowing which
  third of the organ each query slice lies in, as the protocol's chunks do);
- dice_volume: Dice over every slice (false positives where the organ is absent count);
- fp_slices: slices without the organ on which something was predicted.
Printed: per data set the means over all (reference, query, organ) triples, per organ, and the
seconds and volumes per minute of each cohort run; written: OUT/cohort_quality.json and .csv.
A re-run reuses the cohorts already done (the command's own resumption).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "SynPoSlicer"))

from synpo.evaluate import dataset_names, find_pairs, score, support_slice  # noqa: E402
from synpo.io import read_volume, write_volume  # noqa: E402


def reference_labels(gt: np.ndarray, positions=(1 / 6, 1 / 2, 5 / 6)) -> np.ndarray:
    """Each organ of `gt` painted on its slices at `positions` of its labelled range (axis 0)."""
    out = np.zeros_like(gt)
    for v in (int(x) for x in np.unique(gt) if x):
        for s in sorted({support_slice(gt == v, p) for p in positions}):
            out[s][gt[s] == v] = v
    return out


def synpo_command() -> List[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "synpo")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "synpo.cli"]


def run_dataset(folder: str, out: str, cohort_args: List[str], limit=None, log=print, name=None) -> Dict:
    pairs = find_pairs(folder)[:limit]
    name = name or os.path.basename(os.path.normpath(folder))
    rows, runs = [], []
    for ref_img, ref_lab in pairs:
        ref_name = os.path.basename(ref_img).split(".")[0]
        gt_ref, geometry = read_volume(ref_lab, "label", label=True)
        outdir = os.path.join(out, name, "ref_" + ref_name)
        os.makedirs(outdir, exist_ok=True)
        labels_path = os.path.join(outdir, "reference_labels.nii.gz")
        write_volume(reference_labels(gt_ref), geometry, labels_path)
        queries = [img for img, _ in pairs if img != ref_img]
        cmd = synpo_command() + ["cohort", ref_img, labels_path] + queries + ["-o", outdir] + cohort_args
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        segmented = sum(1 for ln in proc.stdout.splitlines() if ln.startswith("[") and ": done in" in ln)
        runs.append({"data": name, "reference": ref_name, "queries": len(queries), "segmented_now": segmented,
                     "seconds": round(seconds, 1), "exit": proc.returncode})
        log("%s ref %s: exit %d, %d volumes segmented in %.1f s (%s)" % (name, ref_name, proc.returncode, segmented,
                                                                      seconds, " ".join(cmd)))
        if proc.returncode not in (0, 1):
            raise SystemExit("synpo cohort failed: %s%s" % (proc.stdout[-2000:], proc.stderr[-2000:]))
        for (img, lab) in pairs:
            if img == ref_img:
                continue
            q_name = os.path.basename(img).split(".")[0]
            pred_path = os.path.join(outdir, q_name + "_synpo.nii.gz")
            if not os.path.exists(pred_path):
                log("  %s: no output (see %s)" % (q_name, os.path.join(outdir, "cohort.csv")))
                continue
            pred, _ = read_volume(pred_path, "output", label=True)
            gt, _ = read_volume(lab, "label", label=True)
            common = sorted(set(int(v) for v in np.unique(gt) if v) & set(int(v) for v in np.unique(gt_ref) if v))
            for v in common:
                dl, dv, fp = score(pred == v, gt == v)
                rows.append({"data": name, "reference": ref_name, "query": q_name, "label": v,
                             "dice_labelled": round(dl, 4), "dice_volume": round(dv, 4), "fp_slices": fp})
                log("  %s <- %s label %d: labelled %.3f, volume %.3f, fp slices %d" % (q_name, ref_name, v, dl, dv, fp))
    return {"rows": rows, "runs": runs}


def summarize(rows: List[dict], runs: List[dict]) -> Dict:
    out = {}
    for data in sorted({r["data"] for r in rows}):
        sel = [r for r in rows if r["data"] == data]
        per_label = {}
        for v in sorted({r["label"] for r in sel}):
            lab = [r for r in sel if r["label"] == v]
            per_label[str(v)] = {"n": len(lab), "dice_labelled": float(np.mean([r["dice_labelled"] for r in lab])),
                                 "dice_volume": float(np.mean([r["dice_volume"] for r in lab]))}
        done = [r for r in runs if r["data"] == data and r["segmented_now"]]
        secs = sum(r["seconds"] for r in done)
        out[data] = {"n": len(sel), "dice_labelled": float(np.mean([r["dice_labelled"] for r in sel])),
                     "dice_volume": float(np.mean([r["dice_volume"] for r in sel])),
                     "fp_slices_per_organ": float(np.mean([r["fp_slices"] for r in sel])),
                     "per_label": per_label,
                     "volumes_per_minute": (60.0 * sum(r["segmented_now"] for r in done) / secs) if secs else None}
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cohort_args = []
    if "--" in argv:
        cohort_args = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="data set folders with image_N / label_N volumes")
    p.add_argument("-o", "--output", default="cohort-quality")
    p.add_argument("--limit", type=int, help="only the first N volumes of each data set")
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    rows, runs = [], []
    for folder, name in zip(args.data, dataset_names(args.data)):
        got = run_dataset(folder, args.output, cohort_args, args.limit, name=name)
        rows += got["rows"]
        runs += got["runs"]
    summary = summarize(rows, runs)
    with open(os.path.join(args.output, "cohort_quality.json"), "w") as handle:
        json.dump({"summary": summary, "runs": runs, "rows": rows, "cohort_args": cohort_args}, handle, indent=1)
    if rows:
        with open(os.path.join(args.output, "cohort_quality.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print("\n| data | (reference, query, organ) | Dice, labelled slices (published protocol's score) | "
          "Dice, whole volume | false-positive slices / organ |\n|---|---|---|---|---|")
    for data, s in summary.items():
        print("| %s | %d | %.3f | %.3f | %.2f |" % (data, s["n"], s["dice_labelled"], s["dice_volume"],
                                                  s["fp_slices_per_organ"]))
    for data, s in summary.items():
        print("\n%s per label: %s" % (data, ", ".join("%s: %.3f / %.3f" % (v, d["dice_labelled"], d["dice_volume"])
                                                   for v, d in s["per_label"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
