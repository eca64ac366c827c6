"""Decode every n-th slice and interpolate between: Dice and seconds per walk spacing.

    .venv/bin/python benchmarks/thin_slices.py DATA [--slice-mm 1.0] [--walk-mm 0 2 3 4.5]
        [--labels ...] [--limit N] [--set SECTION.FIELD=VALUE ...] [--embedding-cache DIR] [-o report.json]

DATA: a folder of image_N / label_N volumes (or ct / labels). With --slice-mm, each volume and its
labels are first resampled along the slice axis to that thickness (linear / nearest neighbour,
in-plane grid unchanged), as a thin-slice CT would come. Then the intra-volume protocol of
`synpo evaluate` (each organ painted on its middle labelled slice, one run per volume) with
`volume.walk_spacing_mm` at each value (0: every slice decoded), on the same embeddings: whole-volume
Dice, false-positive slices, slices decoded and seconds, per setting, and the change from 0.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.io import write_json  # noqa: E402

from synpo.config import configured  # noqa: E402
from synpo.errors import SynPoError  # noqa: E402
from synpo.evaluate import Variant, evaluate_intra, find_pairs, summarize  # noqa: E402


def resample_slices(path: str, out: str, slice_mm: float, label: bool) -> None:
    """Write `path` resampled along its third axis to slices `slice_mm` thick (same in-plane grid)."""
    image = sitk.ReadImage(path)
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing(), float)
    new_spacing = spacing.copy()
    new_spacing[2] = slice_mm
    new_size = size.copy()
    new_size[2] = int(np.floor((size[2] - 1) * spacing[2] / slice_mm)) + 1
    ref = sitk.Image([int(v) for v in new_size], image.GetPixelID())
    ref.SetSpacing(new_spacing.tolist())
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    sitk.WriteImage(sitk.Resample(image, ref, sitk.Transform(), interp, 0), out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--slice-mm", type=float, help="resample every volume to slices this thick first")
    ap.add_argument("--walk-mm", type=float, nargs="+", default=[0.0, 2.0, 3.0, 4.5])
    ap.add_argument("--labels", type=int, nargs="*")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--embedding-cache", metavar="DIR")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config overrides for every setting (as `synpo segment --set`)")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    pairs = find_pairs(args.data)[: args.limit]
    if not pairs:
        raise SynPoError("no image_N/label_N (or ct/labels) volumes in %s" % args.data)
    from synpo.features import load_models
    sam, dino, use = load_models("litemedsam", "sam", "small", args.device, True)
    base = configured(args.set)
    variants = [Variant("walk %g mm" % mm, base.with_(volume={"walk_spacing_mm": float(mm)})) for mm in args.walk_mm]
    with tempfile.TemporaryDirectory() as folder:
        if args.slice_mm:
            moved = []
            for n, (img, lab) in enumerate(pairs):
                moved.append((os.path.join(folder, "image_%d.nii.gz" % n), os.path.join(folder, "label_%d.nii.gz" % n)))
                resample_slices(img, moved[-1][0], args.slice_mm, False)
                resample_slices(lab, moved[-1][1], args.slice_mm, True)
            pairs = moved
        rows = []
        for v in variants:                     # one setting at a time: its seconds are its own
            t0 = time.perf_counter()
            scores = evaluate_intra(pairs, sam, dino, v.cfg, args.labels, (0.5,), False, lambda msg: None,
                                    confidence_from=use, embedding_cache=args.embedding_cache, variants=[v])
            seconds = time.perf_counter() - t0
            s = summarize(scores)[v.name]
            rows.append({"setting": v.name, "walk_spacing_mm": v.cfg.volume.walk_spacing_mm, "n": s["n"],
                         "dice_volume": s["dice_volume"], "fp_slices_per_organ": s["fp_slices_per_organ"],
                         "seconds": seconds})
            print("%s: whole-volume Dice %.4f, fp slices %.2f, %.1f s" % (v.name, s["dice_volume"],
                                                                        s["fp_slices_per_organ"], seconds), flush=True)
    print("\n| walk spacing | organs | Dice (whole volume) | change | FP slices / organ | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| %g mm | %d | %.4f | %+.4f | %.2f | %.1f |" % (r["walk_spacing_mm"], r["n"], r["dice_volume"],
                                                            r["dice_volume"] - rows[0]["dice_volume"],
                                                            r["fp_slices_per_organ"], r["seconds"]))
    report = {"data": args.data, "slice_mm": args.slice_mm, "rows": rows}
    if args.output:
        write_json(report, args.output)
    return report


if __name__ == "__main__":
    try:
        main()
    except SynPoError as e:
        sys.exit("thin_slices: error: %s" % e)
