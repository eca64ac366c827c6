"""`synpo evaluate`: tables (CSV + Markdown) and plots (PNG) from evaluate.py's scores."""
import csv
import os
import sys
from typing import List

from .errors import SynPoError


def add_arguments(p) -> None:
    p.add_argument("data", help="folder with image_N / label_N volumes (or ct / labels)")
    p.add_argument("-o", "--output", default="synpo-eval", help="folder for results.csv, results.md, plots")
    p.add_argument("--labels", type=int, nargs="*", help="label values to evaluate (default: all)")
    p.add_argument("--protocol", default="intra", choices=("intra", "cross", "both"),
                   help="intra: support slice from the same volume (default); cross: the published "
                        "cross-patient protocol (support from the next volume)")
    p.add_argument("--positions", type=float, nargs="*", default=[0.5],
                   help="support slice positions in the organ's labelled range (default 0.5)")
    p.add_argument("--limit", type=int, default=None, help="only the first N volumes")
    p.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--features", default="auto", choices=("auto", "synergy", "sam", "dinov2"))
    p.add_argument("--dinov2", default="small", choices=("small", "base", "large", "giant"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-baselines", action="store_true", help="SynPo only")
    from .cli import add_runtime_option
    add_runtime_option(p)
    p.add_argument("--ablations", action="store_true",
                   help="intra protocol: also SynPo with one part changed at a time (no intensity gate, no "
                        "refinement, points given to SAM with Gaussian / uniform / no negatives, raw top-k "
                        "instead of K-means, no box; each encoder alone when two are fused)")
    p.add_argument("--corrections", type=int, metavar="N",
                   help="instead of the protocols: a simulated annotator corrects each organ N times (paints the "
                        "ground truth on its worst slice, or marks its worst false-positive slice absent) and "
                        "SynPo runs again after each round; Slicer's Fill between slices runs on the same painted "
                        "slices (needs itk-morphologicalcontourinterpolation); writes corrections.csv / .md / .png")
    p.add_argument("--embedding-cache", metavar="DIR", help="keep embeddings on disk between runs")
    p.add_argument("--quiet", action="store_true")


def write_tables(scores, folder: str) -> List[str]:
    from .evaluate import as_rows, per_slice_rows, summarize, summarize_by_label
    os.makedirs(folder, exist_ok=True)
    written = []
    for rows, filename in ((as_rows(scores), "results.csv"), (per_slice_rows(scores), "per_slice.csv")):
        if rows:
            written.append(os.path.join(folder, filename))
            with open(written[-1], "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
                writer.writeheader()
                writer.writerows(rows)
    summary = summarize(scores)
    lines = ["| method | n | Dice (labelled slices) | Dice (whole volume) | false-positive slices / organ |",
             "|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append("| %s | %d | %.3f | %.3f | %.2f |" % (method, s["n"], s["dice_labelled"], s["dice_volume"],
                                                       s["fp_slices_per_organ"]))
    per_label = ["", "| method | label | Dice (labelled) | Dice (volume) |", "|---|---|---|---|"]
    for (method, label), s in summarize_by_label(scores).items():
        per_label.append("| %s | %d | %.3f | %.3f |" % (method, label, s["dice_labelled"], s["dice_volume"]))
    md_path = os.path.join(folder, "results.md")
    with open(md_path, "w") as handle:
        handle.write("\n".join(lines + per_label) + "\n")
    return [md_path] + written


def plot(scores, folder: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    methods = sorted({s.method for s in scores})
    labels = sorted({s.label for s in scores})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(3.5 + (0.6 + 0.12 * len(methods)) * len(labels), 4))
    width = 0.8 / len(methods)
    for m_i, method in enumerate(methods):
        values = []
        for label in labels:
            sel = [s.dice_volume if np.isfinite(s.dice_volume) else s.dice_labelled
                   for s in scores if s.method == method and s.label == label]
            values.append(float(np.mean(sel)) if sel else 0.0)
        ax.bar(np.arange(len(labels)) + m_i * width, values, width, label=method, color=colours(m_i % 20))
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax.set_xticklabels([str(v) for v in labels])
    ax.set_xlabel("label")
    ax.set_ylabel("Dice (whole volume;\nlabelled slices for cross_chunks)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths = [os.path.join(folder, "dice_per_label.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    from .evaluate import position_profile
    profile = position_profile(scores)
    if profile:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        bins = len(next(iter(profile.values())))
        x = (np.arange(bins) + 0.5) / bins
        for i, key in enumerate(sorted(profile)):
            main_line = key.startswith("synpo @")            # SynPo itself, drawn over its ablations
            ax.plot(x, profile[key], marker="o", markersize=3, label=key,
                    color="black" if main_line else colours(i % 20), linewidth=2.2 if main_line else 1.2,
                    zorder=3 if main_line else 2, linestyle="--" if "@" not in key else "-")
        positions = sorted({s.position for s in scores if np.isfinite(s.position)})
        for pos in positions:
            ax.axvline(pos, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("slice position in the organ's labelled range (0 first, 1 last; dotted: support)")
        ax.set_ylabel("mean Dice of the slices there")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        paths.append(os.path.join(folder, "dice_per_position.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def run_corrections(args, pairs, cfg, sam, dino, use, log) -> int:
    """--corrections N: the simulated annotator (corrections.py), its table and its curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from .corrections import COST_DICE, cost, evaluate_corrections, monotonicity, summarize_rounds
    from .session import Models
    scores = evaluate_corrections(pairs, Models.of(sam, dino, use), cfg, args.corrections, args.labels, log,
                                  args.embedding_cache)
    os.makedirs(args.output, exist_ok=True)
    written = [os.path.join(args.output, name) for name in ("corrections.md", "corrections.csv", "corrections.png")]
    with open(written[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(scores[0].__dict__.keys()))
        writer.writeheader()
        writer.writerows(s.__dict__ for s in scores)
    summary = summarize_rounds(scores)
    name = os.path.basename(os.path.normpath(args.data))
    lines = ["| corrections per organ | organs | painted slices / organ | SynPo Dice | Fill between slices Dice "
             "(same slices) | SynPo - Fill | false-positive slices / organ | seconds per run (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, s in summary.items():
        organs = "%d" % s["n"] if s["scored"] == s["n"] else "%d (%d scored)" % (s["n"], s["scored"])
        lines.append("| %d | %s | %.2f | %.4f | %.4f | %+.4f | %.2f | %.1f (%.1f)%s |"
                     % (k, organs, s["painted"], s["dice_volume"], s["fill_dice"], s["dice_volume"] - s["fill_dice"],
                        s["fp_slices_per_organ"], s["seconds_per_run"], s["seconds_max"],
                        " (first run)" if k == 0 else ""))
    lines += ["", "Whole-volume Dice over the slices neither painted nor marked for the organ (an organ whose "
              "labelled slices are all painted has none left and is not scored); Fill between "
              "slices: Slicer's effect (ITK morphological contour interpolation) on the organ's painted slices.", "",
              "| painted slices to reach | SynPo (median; share reached) | Fill between slices, same slices | "
              "Fill between slices, slices spread evenly |", "|---|---|---|---|"]
    need = cost(scores)
    for level in COST_DICE:
        cells = []
        for method in ("synpo", "fill_same", "fill_even"):
            med, share = need[method][level]
            cells.append("%s; %.0f %%" % ("%.0f" % med if np.isfinite(med) else "not reached", 100 * share))
        lines.append("| Dice %.2f | %s |" % (level, " | ".join(cells)))
    mono = monotonicity(scores)
    lines += ["", "Monotone corrections (per organ and round, Dice_k+1 >= Dice_k - 0.005): %.1f %% of %d steps; "
              "%.1f %% of organ-volumes at every step; %d steps down by more than 0.02; worst step %+.4f."
              % (100 * mono["held"], mono["steps"], 100 * mono["organs_held"], mono["down_beyond_floor"],
                 mono["worst"])]
    if mono["same_steps"]:
        lines += ["On the same slices (the slice painted or marked at step k+1 left out of both rounds: what the "
                  "correction changed elsewhere): %.1f %% of %d steps held; %d down by more than 0.02."
                  % (100 * mono["held_same"], mono["same_steps"], mono["down_beyond_floor_same"])]
    with open(written[0], "w") as handle:
        handle.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [s["painted"] for s in summary.values()]
    ax.plot(x, [s["dice_volume"] for s in summary.values()], marker="o", label="SynPo")
    ax.plot(x, [s["fill_dice"] for s in summary.values()], marker="s", linestyle="--",
            label="Fill between slices (same slices)")
    for k, (xi, s) in enumerate(zip(x, summary.values())):
        ax.annotate("k=%d" % k, (xi, s["dice_volume"]), textcoords="offset points", xytext=(0, 6), fontsize=7,
                    ha="center")
    ax.set_xlabel("painted slices per organ (mean)")
    ax.set_ylabel("Dice, whole volume")
    ax.set_title(name, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(written[2], dpi=100)
    plt.close(fig)
    print(open(written[0]).read())
    print("wrote " + ", ".join(written))
    return 0


def run_evaluate(args) -> int:
    from .features import load_models
    from .config import configured
    from .evaluate import ablation_variants, evaluate_cross, evaluate_intra, find_pairs
    if not os.path.isdir(args.data):
        raise SynPoError("data folder not found: %s" % args.data)
    pairs = find_pairs(args.data)[: args.limit]
    if not pairs:
        raise SynPoError("no image_N/label_N (or ct/labels) volumes in %s" % args.data)
    if args.ablations and args.protocol == "cross":
        raise SynPoError("--ablations runs on the intra-volume protocol: use --protocol intra or both")
    if args.protocol in ("cross", "both") and args.corrections is None and len(pairs) < 2:
        # (checked before any run: with "both" the intra runs were done and then lost to this error)
        raise SynPoError("the cross-patient protocol needs at least 2 volumes (%d found in %s); use --protocol "
                         "intra" % (len(pairs), args.data))
    if args.corrections is not None and args.corrections < 0:
        raise SynPoError("--corrections must be >= 0")
    cfg = configured(args.set)
    sam, dino, use = load_models(args.sam, args.features, args.dinov2, args.device, args.quiet,
                                 runtime=args.runtime)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.corrections is not None:
        return run_corrections(args, pairs, cfg, sam, dino, use, log)
    scores = []
    if args.protocol in ("intra", "both"):
        variants = ablation_variants(cfg, use) if args.ablations else None
        if args.ablations and len(use) < 2:
            log("synpo evaluate: one encoder (%s): the encoder ablations need both SAM and DINOv2" % use[0])
        scores += evaluate_intra(pairs, sam, dino, cfg, args.labels, args.positions, not args.no_baselines, log,
                                 confidence_from=use, embedding_cache=args.embedding_cache, variants=variants)
    if args.protocol in ("cross", "both"):
        scores += evaluate_cross(pairs, sam, dino, cfg, args.labels, log, confidence_from=use,
                                 embedding_cache=args.embedding_cache)
    written = write_tables(scores, args.output) + plot(scores, args.output)
    print(open(written[0]).read())
    print("wrote " + ", ".join(written))
    sys.stdout.flush()
    return 0
