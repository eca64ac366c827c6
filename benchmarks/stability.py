"""Whether the walk's decisions flip on noise: the same volume segmented twice, the second time with
its SAM embeddings perturbed (or encoded by another runtime), per organ-volume.

    .venv/bin/python benchmarks/stability.py ../shared/data/chaos_t2 ../shared/data/cmr_bssfp \
        [--noise 1e-5] [--seed 0] [--runtime openvino] [--limit N] [--set SECTION.FIELD=VALUE ...] \
        --device cpu --embedding-cache /tmp/emb [-o stability.json]

Each volume: every organ painted on its middle labelled slice (the intra protocol of `synpo
evaluate`), one run with today's embeddings (float16 as stored, used in float32), then one run with
each embedding multiplied element-wise by (1 + noise * N(0, 1)), seeded per slice (--noise; the
OpenVINO encoder's embeddings differ from PyTorch's by ~4e-6), or, with --runtime openvino, one
run with the embeddings of that runtime instead. Per organ-volume: the whole-volume Dice of both
runs against the ground truth, its change, the organ's length (slices segmented) in both, and every
slice whose decision differs, with the rule that decided it and the rule's figures in both runs
(a knife-edge decision: a figure near its limit), and, for the first run, every walk's end against
the truth (benchmarks/walk_decisions.py --ends). Per data set: the 95th percentile and the
largest Dice change, and how many organ-volumes change by more than 0.01 and 0.05.
"""
import argparse
import os
import sys
import threading
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from benchmarks.walk_decisions import ends_report, organ_ends  # noqa: E402
from synpo.config import configured  # noqa: E402
from synpo.embeddings import EmbeddingStore, store_key  # noqa: E402
from synpo.evaluate import check_data_folders, dataset_names, dice, middle_paint  # noqa: E402
from synpo.errors import SynPoError  # noqa: E402
from synpo.io import read_volume, write_json  # noqa: E402
from synpo.session import Models  # noqa: E402
from synpo.volume import VolumeRun  # noqa: E402
from synpo.walk_rules import Step, judge_step  # noqa: E402


class NoisyStore(EmbeddingStore):
    """An EmbeddingStore whose embeddings are another store's, each multiplied element-wise by
    (1 + noise * N(0, 1)) with a generator seeded by (seed, slice): the same noise on a slice
    whatever the order the slices are reached in. Kept in float32 (float16 would round 1e-5 away)."""

    def __init__(self, base: EmbeddingStore, noise: float, seed: int):
        super().__init__(base.encoder, base.slices, base.frame, base.batch_size, None)
        self.base, self.noise, self.seed = base, noise, seed

    def ensure(self, indices, progress=None, cancel=None, save=True) -> None:
        wanted = [int(i) for i in indices if int(i) not in self.cache]
        if not wanted:
            return
        self.base.ensure(wanted, progress, cancel, save)
        for i in wanted:
            f = self.base.cache[i].float()
            g = torch.Generator().manual_seed(self.seed * 1000003 + i)
            self.cache[i] = f * (1.0 + self.noise * torch.randn(f.shape, generator=g))


class StepLog:
    """A judge (walk_rules.Judge) that answers as judge_step does and keeps each step's figures."""

    def __init__(self):
        self.steps: Dict[tuple, dict] = {}
        self.lock = threading.Lock()

    def __call__(self, step: Step, vc) -> str:
        why = judge_step(step, vc)
        ratio = step.score / step.prev_score if step.prev_score else float("nan")
        with self.lock:
            self.steps[(step.label, step.index)] = {
                "area/min": step.area / step.min_area if step.min_area else float("nan"), "ratio": ratio,
                "sam_iou": step.sam_iou, "overlap": step.overlap, "first": step.first, "rule": why or "go"}
        return why


def segment(image, geom, support, models: Models, cfg, stores: Dict, cache):
    """(result, StepLog) of one run, as `synpo evaluate` runs it, on `stores`."""
    run = VolumeRun(image.astype(np.float32, copy=False), geom.spacing, support, models.sam, models.dino, cfg,
                    None, models.confidence_from, 0, None)
    run.judge = log = StepLog()
    return run.segment(None, None, stores, cache, None, False), log


def organ_decisions(records, label: int) -> Dict[int, tuple]:
    """{slice: (status, reason)} of one label's records."""
    return {r.index: (r.status, r.reason or "") for r in records if r.label == label}


def compare(name: str, gt: np.ndarray, labels: List[int], a, b, log_a: StepLog, log_b: StepLog) -> List[dict]:
    """Per organ: Dice and length in runs a and b, and the slices decided differently with the
    rules' figures in both runs."""
    rows = []
    for v in labels:
        pa, pb, g = a.labels == v, b.labels == v, gt == v
        da, db = dice(pa, g), dice(pb, g)
        la, lb = int(pa.reshape(len(pa), -1).any(1).sum()), int(pb.reshape(len(pb), -1).any(1).sum())
        ra, rb = organ_decisions(a.records, v), organ_decisions(b.records, v)
        flips = []
        for t in sorted(set(ra) | set(rb)):
            x, y = ra.get(t), rb.get(t)
            if x != y:
                flips.append({"slice": t, "a": x, "b": y, "step_a": log_a.steps.get((v, t)),
                              "step_b": log_b.steps.get((v, t)), "truth": bool(g[t].any())})
        changed = [t for t in range(len(pa)) if not np.array_equal(pa[t], pb[t])]
        rows.append({"volume": name, "label": v, "dice_a": da, "dice_b": db, "dice_change": db - da,
                     "length_a": la, "length_b": lb, "slices_changed": len(changed), "flips": flips})
    return rows


def run_volume(img: str, lab: str, models: Models, other: Models, cfg, noise: float, seed: int,
               cache) -> tuple:
    image, geom = read_volume(img)
    gt, _ = read_volume(lab, "label", label=True)
    support, labels = middle_paint(gt)
    stores: Dict = {}
    a, log_a = segment(image, geom, support, models, cfg, stores, cache)
    if other is not None:                    # the same volume through another runtime's encoder
        b, log_b = segment(image, geom, support, other, cfg, {}, cache)
    else:
        key = store_key("query", "sam", models.sam, a.support.axis)
        b, log_b = segment(image, geom, support, models, cfg, {key: NoisyStore(stores[key], noise, seed)}, cache)
    name = os.path.basename(img).split(".")[0]
    ends = organ_ends(a.records, gt, labels, cfg)
    for r in ends:
        r["volume"] = name
    return compare(name, gt, labels, a, b, log_a, log_b), ends


def summary(rows: List[dict]) -> dict:
    d = np.abs([r["dice_change"] for r in rows])
    length = np.abs([r["length_b"] - r["length_a"] for r in rows])
    return {"organ_volumes": len(rows), "p95": float(np.percentile(d, 95)), "max": float(d.max()),
            "over_0.01": int((d > 0.01).sum()), "over_0.05": int((d > 0.05).sum()),
            "length_changed": int((length > 0).sum()), "length_change_max": int(length.max()),
            "mean_dice_a": float(np.mean([r["dice_a"] for r in rows])),
            "mean_dice_b": float(np.mean([r["dice_b"] for r in rows]))}


def _fmt(decision, step) -> str:
    if decision is None:
        return "-"
    out = decision[0] + (" [%s]" % decision[1] if decision[1] else "")
    if step:
        out += " (area/min %.3f, ratio %.4f, SAM IoU %.4f, overlap %.4f%s)" % (
            step["area/min"], step["ratio"], step["sam_iou"], step["overlap"], ", first" if step["first"] else "")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="data folders (image_N / label_N)")
    ap.add_argument("--noise", type=float, default=1e-5, help="relative noise on every embedding element")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runtime", choices=("openvino",), help="compare with this runtime's embeddings instead")
    ap.add_argument("--limit", type=int, default=None, help="only the first N volumes of each folder")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--embedding-cache", metavar="DIR")
    ap.add_argument("-o", "--output", help="write every organ-volume's figures as JSON here")
    args = ap.parse_args(argv)
    cfg = configured(args.set)
    try:
        found = check_data_folders(args.data, args.limit)
    except SynPoError as e:
        raise SystemExit("stability: error: %s" % e)
    models = Models.load("litemedsam", "sam", "small", args.device, "auto", True, "torch")
    other = Models.load("litemedsam", "sam", "small", args.device, "auto", True, args.runtime) \
        if args.runtime else None
    out = {}
    for folder, dataset in zip(args.data, dataset_names(args.data)):
        rows: List[dict] = []
        ends: List[dict] = []
        for img, lab in found[folder]:
            got, got_ends = run_volume(img, lab, models, other, cfg, args.noise, args.seed, args.embedding_cache)
            for r in got:
                print("%s %s label %d: Dice %.4f -> %.4f (%+.4f), length %d -> %d" % (
                    dataset, r["volume"], r["label"], r["dice_a"], r["dice_b"], r["dice_change"],
                    r["length_a"], r["length_b"]), flush=True)
                for f in r["flips"]:
                    print("    slice %d (organ %s): %s  |  %s" % (f["slice"], "there" if f["truth"] else "absent",
                                                           _fmt(f["a"], f["step_a"]), _fmt(f["b"], f["step_b"])),
                          flush=True)
            rows += got
            ends += got_ends
        out[dataset] = {"summary": summary(rows), "rows": rows, "ends": ends,
                        "ends_summary": ends_report(ends, dataset + " (run a)")}
    print("\n| data set | organ-volumes | mean Dice (a / b) | p95 abs Dice change | max | > 0.01 | > 0.05 "
          "| length changed (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, d in out.items():
        s = d["summary"]
        print("| %s | %d | %.4f / %.4f | %.4f | %.4f | %d | %d | %d (%d) |" % (
            dataset, s["organ_volumes"], s["mean_dice_a"], s["mean_dice_b"], s["p95"], s["max"], s["over_0.01"],
            s["over_0.05"], s["length_changed"], s["length_change_max"]))
    allrows = [r for d in out.values() for r in d["rows"]]
    if len(out) > 1:
        s = summary(allrows)
        print("| all | %d | %.4f / %.4f | %.4f | %.4f | %d | %d | %d (%d) |" % (
            s["organ_volumes"], s["mean_dice_a"], s["mean_dice_b"], s["p95"], s["max"], s["over_0.01"],
            s["over_0.05"], s["length_changed"], s["length_change_max"]))
    if args.output:
        write_json(out, args.output)
    return out


if __name__ == "__main__":
    main()
