"""Constants chosen on some volumes, scored on others: how much of a figure is tuning.

    .venv/bin/python benchmarks/out_of_sample.py ../shared/data/chaos_t2 ../shared/data/cmr_bssfp \
        ../shared/data/btcv_ct --vary volume.min_overlap 0.4 0.5 0.6 [--vary FIELD V ...] \
        [--embedding-cache DIR] [-o oos.json]

The candidates are the defaults and each listed value of each varied field (one field changed at a
time, as benchmarks/sweep.py). Every candidate runs on every volume of every data set (the
intra-volume protocol of `synpo evaluate`: each organ painted on its middle labelled slice, one
run per volume; whole-volume Dice per organ, its mean per volume). Per data set it prints:
- default: the defaults' figure (in-sample where the defaults were chosen on that data set: the
  CHAOS volumes shaped most of them, the cardiac set some walk rules);
- in-sample: the candidate best on all of the data set's volumes, scored on the same volumes;
- leave-one-volume-out: for each volume, the candidate best on the set's other volumes, scored on
  it (the mean over volumes), and which candidates were chosen;
- other data sets: the candidate best on the other data sets together, scored on this one.
"in-sample minus out-of-sample" is what tuning on the scored volumes adds.
"""
import argparse
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.io import write_json  # noqa: E402

from benchmarks.sweep import variants_for  # noqa: E402
from synpo.config import configured  # noqa: E402
from synpo.errors import SynPoError  # noqa: E402
from synpo.evaluate import check_data_folders, dataset_names, evaluate_intra  # noqa: E402


def mean_dice(scores, by: str = "volume") -> Dict[str, Dict[str, float]]:
    """{candidate: {volume (by="volume") or label (by="label"): mean whole-volume Dice}}: per volume
    over its organs, or per organ over the volumes."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for s in scores:
        out.setdefault(s.method, {}).setdefault(str(getattr(s, by)), []).append(s.dice_volume)
    return {m: {k: float(np.mean(d)) for k, d in groups.items()} for m, groups in out.items()}


def best(table: Dict[str, Dict[str, float]], volumes: List[str]) -> str:
    """The candidate with the highest mean over `volumes` (the defaults win a tie)."""
    names = list(table)
    means = [np.mean([table[m][v] for v in volumes]) for m in names]
    return names[int(np.argmax(means))]


def choose_and_score(tables: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, dict]:
    """Per data set: default, in-sample, leave-one-volume-out and other-data-set figures."""
    out = {}
    for ds, table in tables.items():
        vols = sorted(next(iter(table.values())))
        mean = lambda m, vs: float(np.mean([table[m][v] for v in vs]))   # noqa: E731
        inside = best(table, vols)
        # one volume alone leaves nothing to choose on: no leave-one-out figure
        loo_choice = {v: best(table, [u for u in vols if u != v]) for v in vols} if len(vols) > 1 else {}
        loo = float(np.mean([table[loo_choice[v]][v] for v in vols])) if loo_choice else float("nan")
        others = {d: t for d, t in tables.items() if d != ds}
        other_figure, other_choice = float("nan"), None
        if others:
            names = list(table)
            pooled = [np.mean([np.mean(list(t[m].values())) for t in others.values()]) for m in names]
            other_choice = names[int(np.argmax(pooled))]
            other_figure = mean(other_choice, vols)
        out[ds] = {"volumes": len(vols), "default": mean("default", vols),
                   "in_sample": mean(inside, vols), "in_sample_choice": inside,
                   "leave_one_out": loo, "leave_one_out_choices": loo_choice,
                   "other_datasets": other_figure, "other_datasets_choice": other_choice}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="data folders (image_N / label_N)")
    ap.add_argument("--vary", nargs="+", action="append", default=[], metavar=("FIELD", "VALUE"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--limit", type=int, default=None, help="only the first N volumes of each folder")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--embedding-cache", metavar="DIR")
    ap.add_argument("-o", "--output", help="write the tables and figures as JSON here")
    args = ap.parse_args(argv)
    from synpo.features import load_models
    variants = variants_for(configured(args.set), args.vary)
    found = check_data_folders(args.data, args.limit)
    sam, dino, use = load_models("litemedsam", "sam", "small", args.device, True)
    tables, labels = {}, {}
    for folder, ds in zip(args.data, dataset_names(args.data)):
        pairs = found[folder]
        scores = evaluate_intra(pairs, sam, dino, variants[0].cfg, None, (0.5,), False, lambda msg: None,
                                confidence_from=use, embedding_cache=args.embedding_cache, variants=variants)
        tables[ds] = mean_dice(scores)
        labels[ds] = mean_dice(scores, "label")
        print("%s: %d volumes x %d candidates done" % (ds, len(pairs), len(variants)), flush=True)
    figures = choose_and_score(tables)
    print("\n| data set | volumes | defaults | in-sample best (choice) | leave-one-volume-out | "
          "chosen on the other data sets (choice) | in-sample - out-of-sample |")
    print("|---|---|---|---|---|---|---|")
    for ds, f in figures.items():
        print("| %s | %d | %.4f | %.4f (%s) | %.4f | %.4f (%s) | %+.4f |" % (
            ds, f["volumes"], f["default"], f["in_sample"], f["in_sample_choice"], f["leave_one_out"],
            f["other_datasets"], f["other_datasets_choice"], f["in_sample"] - f["leave_one_out"]))
    print("\nper candidate, mean whole-volume Dice per data set:")
    for name in tables[next(iter(tables))]:
        print("  %-40s %s" % (name, "  ".join("%s %.4f" % (ds, np.mean(list(t[name].values())))
                                              for ds, t in tables.items())))
    print("\nper candidate, mean whole-volume Dice per label:")
    for ds, table in labels.items():
        for name, row in table.items():
            print("  %-12s %-40s %s" % (ds, name, "  ".join("%s %.4f" % (k, d) for k, d in row.items())))
    report = {"candidates": [v.name for v in variants], "tables": tables, "labels": labels,
              "figures": figures}
    if args.output:
        write_json(report, args.output)
    return report


if __name__ == "__main__":
    try:
        main()
    except SynPoError as e:
        sys.exit("out_of_sample: error: %s" % e)
