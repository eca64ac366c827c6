"""How SynPo's Dice moves with one constant: the instrument behind the README's constants table.

Runs the intra-volume protocol of `synpo evaluate` (support: one ground-truth slice of the same
volume) with the defaults and with each listed value of each varied field, one field changed at a
time, on the same supports and embeddings; prints one row per setting (3D Dice over the organs'
labelled slices and over the whole volume, false-positive slices per organ, means over volumes,
organs and support positions) and per organ label.

    python benchmarks/sweep.py DATA_DIR --vary gate.margin 0 0.1 0.25 0.5 [--vary FIELD V ...]
        [--positions 0.5 ...] [--set SECTION.FIELD=VALUE ...] [--labels ...] [--limit N]
        [--embedding-cache DIR] [--device auto] [-o sweep.json]

Values are read as `--set` reads them (JSON where they parse: `null`, `[0.05, 0.95]`, `false`).
"""
import argparse
import json
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.config import configured, parse_overrides, validate  # noqa: E402
from synpo.errors import SynPoError  # noqa: E402
from synpo.evaluate import Variant, evaluate_intra, find_pairs, summarize, summarize_by_label  # noqa: E402


def variants_for(base, vary: Sequence[Sequence[str]]) -> List[Variant]:
    """The defaults ("default") and one variant per (field, value), named FIELD=VALUE."""
    out = [Variant("default", base)]
    for field_name, *values in vary:
        if not values:
            raise SynPoError("--vary %s needs at least one value" % field_name)
        for value in values:
            setting = "%s=%s" % (field_name, value)
            out.append(Variant(setting, validate(base.with_(**parse_overrides([setting])))))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="folder with image_N / label_N volumes (or ct / labels)")
    ap.add_argument("--vary", nargs="+", action="append", default=[], metavar=("FIELD", "VALUE"),
                    help="a config field (SECTION.FIELD) and the values to try")
    ap.add_argument("--positions", type=float, nargs="*", default=[0.5])
    ap.add_argument("--labels", type=int, nargs="*")
    ap.add_argument("--limit", type=int, default=None, help="only the first N volumes")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a default for every setting")
    ap.add_argument("--features", default="auto", choices=("auto", "synergy", "sam", "dinov2"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--embedding-cache", metavar="DIR")
    ap.add_argument("-o", "--output", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    from synpo.features import load_models
    pairs = find_pairs(args.data)[: args.limit] if os.path.isdir(args.data) else []
    if not pairs:
        raise SynPoError("no image_N/label_N (or ct/labels) volumes in %s" % args.data)
    variants = variants_for(configured(args.set), args.vary)
    sam, dino, use = load_models("litemedsam", args.features, "small", args.device, True)
    scores = evaluate_intra(pairs, sam, dino, variants[0].cfg, args.labels, args.positions, False,
                            lambda msg: None, confidence_from=use, embedding_cache=args.embedding_cache,
                            variants=variants)
    summary, by_label = summarize(scores), summarize_by_label(scores)
    labels = sorted({s.label for s in scores})
    rows = []
    for v in variants:
        per_label = {str(lab): by_label[(v.name, lab)]["dice_volume"] for lab in labels}
        rows.append(dict(setting=v.name, **{k: summary[v.name][k] for k in
                                           ("n", "dice_labelled", "dice_volume", "fp_slices_per_organ")},
                         dice_volume_per_label=per_label))
    print("| setting | Dice labelled | Dice whole volume | FP slices / organ | " +
          " | ".join("label %d" % lab for lab in labels) + " |")
    print("|---|---|---|---|" + "---|" * len(labels))
    for r in rows:
        print("| %s | %.4f | %.4f | %.2f | %s |" % (r["setting"], r["dice_labelled"], r["dice_volume"],
                                                   r["fp_slices_per_organ"],
                                                   " | ".join("%.3f" % x for x in r["dice_volume_per_label"].values())))
    report = {"data": args.data, "positions": args.positions, "set": args.set, "features": list(use), "rows": rows}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    try:
        main()
    except SynPoError as e:
        sys.exit("sweep: error: %s" % e)
