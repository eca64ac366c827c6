"""How far a reduced-precision encoder moves what SynPo decodes.

For chosen slices of a labelled volume, the SAM encoder runs in fp32 and in each reduced
precision (autocast); every label present on a slice is decoded from its ground-truth box
with each embedding. Reports, per organ-slice and overall: the embedding's relative error
against fp32, the mask's IoU against the fp32 mask, and each mask's Dice against the label.

    python benchmarks/precision_agreement.py IMAGE LABEL [--slices 14,18,22,26]
        [--precisions fp32,fp16,bf16] [--model litemedsam] [--device auto] [-o report.json]

A CPU can run the same autocast (slowly: ~55 s a slice for LiteMedSAM in fp16 or bf16 on two
AVX2 cores). Per slice from ground-truth boxes it chose fp16 as the CUDA default while no GPU was
at hand; whole volumes on a GPU (benchmarks/gpu_check.py, docs/research.md "On a GPU") then
showed fp16 losing Dice and time, and `--precision auto` became fp32.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo import features, io  # noqa: E402
from synpo.decode import iou  # noqa: E402
from synpo.errors import InputError, SynPoError  # noqa: E402
from synpo.evaluate import dice  # noqa: E402
from synpo.intensity import normalize  # noqa: E402
from synpo.prompts import box_of  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("label")
    ap.add_argument("--slices", default="", help="comma-separated slice indices (k); default: 4 evenly spaced "
                                                 "slices of the labelled range")
    ap.add_argument("--precisions", default="fp32,fp16,bf16")
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--device", default="auto")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in DTYPES]
    if unknown:
        ap.error("unknown precision %s; use fp32, fp16, bf16" % ", ".join(unknown))
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")                      # the reference
    image, geometry = io.read_volume(args.image)
    label, _ = io.read_volume(args.label, label=True)
    if label.shape != image.shape:
        raise InputError("label grid %s differs from the image grid %s" % (label.shape, image.shape))
    labelled = np.flatnonzero((label != 0).reshape(len(label), -1).any(1))
    if len(labelled) == 0:
        raise InputError("%s has no labelled voxels" % args.label)
    if args.slices:
        slices = [int(s) for s in args.slices.split(",")]
        bad = [s for s in slices if not 0 <= s < len(label)]
        if bad:
            ap.error("slices %s are outside 0..%d" % (bad, len(label) - 1))
    else:
        slices = sorted(set(np.linspace(labelled[0], labelled[-1], 6).round().astype(int)[1:-1].tolist()))

    device = features.pick_device(args.device)
    sam = features.SamModel.load(args.model, device)
    norm, _ = normalize(image)
    frame = sam.frame(image.shape[1], image.shape[2], geometry.spacing[1:])
    rows = []
    for k in slices:
        emb = {}
        for p in precisions:
            sam.precision = DTYPES[p]
            emb[p] = sam.embed(norm[k:k + 1], frame)[0]
        sam.precision = None
        rel = {p: float((emb[p] - emb["fp32"]).norm() / emb["fp32"].norm()) for p in precisions if p != "fp32"}
        for value in [int(v) for v in np.unique(label[k]) if v != 0]:
            truth = label[k] == value
            box = box_of(truth)
            masks = {p: sam.decode(e, frame, box_xy=box)[0].numpy() > 0 for p, e in emb.items()}
            rows.append({"slice": k, "label": value,
                         "dice": {p: dice(m, truth) for p, m in masks.items()},
                         "iou_vs_fp32": {p: iou(m, masks["fp32"]) for p, m in masks.items() if p != "fp32"},
                         "embedding_rel_error": rel})
    summary = {}
    for p in precisions:
        scores = np.array([r["dice"][p] for r in rows])
        entry = {"mean_dice": float(scores.mean()) if len(scores) else float("nan")}
        if p != "fp32" and rows:
            iou = [r["iou_vs_fp32"][p] for r in rows]
            delta = scores - np.array([r["dice"]["fp32"] for r in rows])
            err = [r["embedding_rel_error"][p] for r in rows]
            entry.update(iou_vs_fp32=[min(iou), max(iou)], dice_change=[float(delta.min()), float(delta.max())],
                         embedding_rel_error=[min(err), max(err)])
        summary[p] = entry
    report = {"image": args.image, "model": args.model, "device": str(device), "slices": slices,
              "rows": rows, "summary": summary}
    for p, e in summary.items():
        line = "%-5s mean Dice %.4f" % (p, e["mean_dice"])
        if "iou_vs_fp32" in e:
            line += ("  mask IoU vs fp32 %.3f-%.3f  Dice change %+.3f..%+.3f  embedding error %.2f-%.2f %%"
                     % (tuple(e["iou_vs_fp32"]) + tuple(e["dice_change"])
                        + tuple(100 * v for v in e["embedding_rel_error"])))
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    try:
        main()
    except SynPoError as exc:
        sys.exit("precision_agreement: %s" % exc)
