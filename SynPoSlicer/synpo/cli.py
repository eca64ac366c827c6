"""The `synpo` command line.

    synpo segment IMAGE SUPPORT -o OUT.nii.gz [--support-image REF] [--sam litemedsam|vit_b|vit_l|vit_h]
                  [--features auto|synergy|sam|dinov2] [--dinov2 small|base|large|giant]
                  [--device auto|cpu|cuda] [--confidence-out CONF.nii.gz] [--points-out POINTS.json]
                  [--set SECTION.FIELD=VALUE ...] [--quiet]
    synpo demo [-o DIR]
    synpo cohort REF_IMAGE REF_LABELS QUERY... -o OUTDIR [--scheduler ADDRESS] ...
    synpo evaluate DATA_DIR [-o DIR] ...
    synpo benchmark IMAGE SUPPORT [-o REPORT.json] ...
    synpo download MODEL
    synpo web [--host 127.0.0.1] [--port 8080] [--server URL --token-file F] [--password-file F]

User errors print one line "synpo: error: ..." and exit with status 2; nothing is written.
"""
import argparse
import os
import sys
from typing import List, Optional

from .errors import SynPoError

FEATURE_CHOICES = ("auto", "synergy", "sam", "dinov2")


def add_runtime_option(p) -> None:
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "openvino"),
                   help="the SAM encoder's runtime: auto = OpenVINO for LiteMedSAM on a CPU when installed "
                        "(pip install openvino; 2x faster, the same walks: docs/service.md), else PyTorch")


def add_set_option(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a constant of config.py, e.g. --set prompts.top_k=32 (repeatable; "
                        "values as JSON, null for None)")


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm
    bar = {"bar": None}

    def update(stage: str, done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc="synpo", unit="step", file=sys.stderr, leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()

    def close() -> None:
        if bar["bar"] is not None:
            bar["bar"].close()
    return update, close


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: List[Optional[str]], inputs: List[Optional[str]]) -> None:
    """Refuse, before any work, outputs in a missing folder, on a folder, on an input, on a file the
    user may not write (a write-protected result), or twice the same (through a link too)."""
    outs = [p for p in outputs if p]
    for out in outs:
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise SynPoError("output folder does not exist: %s" % folder)
        if not os.access(folder, os.W_OK | os.X_OK):       # (found after the run, with a traceback)
            raise SynPoError("cannot write to the output folder %s" % folder)
        if os.path.isdir(out):
            raise SynPoError("output path is a folder: %s" % out)
        # (a link is replaced by the new file, its target left as it is: io.publish)
        if os.path.exists(out) and not os.path.islink(out) and not os.access(out, os.W_OK):
            raise SynPoError("output %s exists and is write-protected; choose another name or make it writable"
                             % out)
        for src in inputs:
            if src and _same_file(out, src):
                raise SynPoError("output %s would overwrite the input %s; choose another name" % (out, src))
    real = [os.path.normcase(os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p)))
            for p in outs]
    if sys.platform in ("darwin", "win32"):          # (their usual file systems ignore case; normcase on macOS does not)
        real = [r.casefold() for r in real]
    if len(set(real)) != len(outs):
        raise SynPoError("two outputs have the same path: %s" % ", ".join(
            p for p, r in zip(outs, real) if real.count(r) > 1))


def _on_grid(array, grid, onto, what, onto_what, quiet):
    """io.labels_on_grid, with a note when the file was stored with its axes turned."""
    from .io import labels_on_grid
    try:
        array, turn = labels_on_grid(array, grid, onto, what, onto_what)
    except SynPoError as exc:
        if onto_what != "image":
            raise
        raise SynPoError("%s (paint made on another patient's volume goes with --support-image)" % exc) from None
    if turn and not quiet:
        print("note: the %s file stores the %s's voxels with its axes turned (%s); read in the %s's layout"
              % (what, onto_what, turn, onto_what))
    return array


def cmd_segment(args) -> int:
    from .config import configured
    from .io import read_volume
    from .outputs import write_result
    from .support import find_support

    check_outputs([args.output, args.confidence_out, args.points_out],
                  [args.image, args.support, args.support_image, args.absent, args.token_file])
    for option, path in (("output", args.output), ("--confidence-out", args.confidence_out)):
        # Single-file formats (ITK picks the writer by the lower-case extension): a .mhd / .nhdr header
        # named the temporary file's data file (io.stage_volume).
        if path and not path.endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
            raise SynPoError("%s %s: use a .nii.gz, .nii, .nrrd or .mha file name" % (option, path))
    image, geometry = read_volume(args.image, "image")
    from .io import nifti_placement_note
    placement = nifti_placement_note(args.image, geometry)
    if placement:
        print("synpo: warning: %s" % placement, file=sys.stderr)
    support, sup_geometry = read_volume(args.support, "support label", label=True)
    ref = None
    if args.support_image:
        from .io import orient_like
        ref, ref_geometry = read_volume(args.support_image, "support image")
        support = _on_grid(support, sup_geometry, ref_geometry, "support label", "support image", args.quiet)
        # Stored as the image is stored (another axis order or sense would slice it across another
        # direction, or mirror it against the image).
        ref, support = orient_like(ref, ref_geometry, geometry), orient_like(support, ref_geometry, geometry)
    else:
        support = _on_grid(support, sup_geometry, geometry, "support label", "image", args.quiet)
    found = find_support(support)             # bad paint is reported before any model loads
    if args.confidence_out and len(found.labels) > 1:
        # CONF_label<N> too (one per label, named once the labels are known): one of them on an input
        # replaced the user's support file; on another output, that output.
        from .outputs import confidence_paths
        check_outputs([args.output, args.confidence_out, args.points_out]
                      + list(confidence_paths(args.confidence_out, found.labels).values()),
                      [args.image, args.support, args.support_image, args.absent, args.token_file])
    if ref is not None and not args.quiet:
        from .support import to_slices
        have, want = to_slices(ref, found.axis).shape[1:], to_slices(image, found.axis).shape[1:]
        if have != want:
            print("note: the support image's slices (%dx%d) are resized to the image's (%dx%d)" % (have + want))
    absent = None
    if args.absent:
        from .support import absent_from_map, absent_marks
        marks, marks_geometry = read_volume(args.absent, "absent marks", label=True)
        marks = _on_grid(marks, marks_geometry, geometry, "absent marks", "image", args.quiet)
        absent = absent_from_map(marks, found.axis)
        absent_marks(absent, found, image.shape[found.axis])          # checked before any model loads
    cfg = configured(args.set, args.modality)  # bad settings too
    update, close = _progress(args.quiet)
    # Ended by SIGTERM or SIGHUP (kill, a closed terminal) as by Ctrl+C, local or --server: nothing
    # written, no temporary file left (outputs.write_result), one line.
    from .lifeline import interrupt_on
    restore = interrupt_on(("SIGTERM", "SIGHUP"))
    try:
        try:
            if args.server:
                result = _segment_remote(args, image, geometry, support, ref, update, absent)
            else:
                from .session import Models, Session
                models = Models.load(args.sam, args.features, args.dinov2 or "small", args.device, args.precision,
                                     args.quiet, args.runtime)
                session = Session(image, geometry.spacing, models, args.embedding_cache, geometry.known_direction)
                result = session.run(support, cfg, support_image=ref, progress=update,
                                     confidence_everywhere=args.confidence_all, absent=absent)
        finally:
            close()
        written = write_result(result, geometry, args.output, args.confidence_out, args.points_out, args.image)
    finally:
        restore()
    from .outputs import collapse_warnings
    for line in collapse_warnings(result):
        print("synpo: warning: %s" % line, file=sys.stderr)
    if not args.quiet:
        from .result import FOUND
        found = [r for r in result.records if r.status in FOUND]
        per_label = ""
        if len(result.support.labels) > 1:          # (the slices holding any target; then each label's)
            per_label = " (%s)" % ", ".join("label %d: %d" % (v, sum(r.label == v for r in found))
                                            for v in result.support.labels)
        print("segmented %d label(s) %s across axis %s (%s, features: %s): %d slice(s) with target%s; wrote %s"
              % (len(result.support.labels), result.support.labels, "kji"[result.support.axis],
                 result.modality, "+".join(result.features), len({r.index for r in found}), per_label,
                 ", ".join(written)))
    return 0


def _segment_remote(args, image, geometry, support, ref, progress, absent=None):
    """segment through `synpo serve` at args.server: the same result as a local run with the
    server's models (checked against what the command line asked for)."""
    from .client import Client, find_token, run_remote
    if args.embedding_cache:
        raise SynPoError("--embedding-cache is the server's with --server: start it with "
                         "`synpo serve --embedding-cache DIR`")
    from .client import ServerError
    client = Client(args.server, find_token(args.token_file))
    try:
        health = client.health()
    except ServerError as exc:
        if not 400 <= exc.status < 500:
            raise
        health = None                         # (a web server's 404 page: "the SynPo server said: File not found")
    models = health.get("models") if isinstance(health, dict) else None
    if not isinstance(models, dict):
        raise SynPoError("%s answers, but not as a SynPo server (no models in its health answer): is the URL's port "
                         "`synpo serve`'s?" % args.server)
    # (--precision and --runtime were not compared: a local fp16 run refused on a CPU ran in fp32 on a CPU server)
    named = {"bf16": "bfloat16", "fp16": "float16"}           # (Models.describe names torch's dtypes)
    asked = {"sam": args.sam, "device": args.device, "precision": args.precision,
             "runtime": getattr(args, "runtime", "auto")}
    for key, value in asked.items():
        runs = models.get(key)
        if runs is None and key in ("precision", "runtime"):      # (a server from before it said so)
            continue
        if value not in ("auto", runs, named.get(value)) and not (key == "device" and str(runs).startswith(value)):
            raise SynPoError("the server at %s runs %s=%s, not %s; start a server with --%s %s or drop --%s"
                             % (args.server, key, runs, value, key, value, key))
    if args.features in ("sam", "dinov2", "synergy"):
        want = {"sam": ["sam"], "dinov2": ["dinov2"], "synergy": ["sam", "dinov2"]}[args.features]
        if sorted(models.get("features", [])) != sorted(want):      # (synergy: was never equal, always refused)
            raise SynPoError("the server at %s fuses %s features, not --features %s"
                             % (args.server, "+".join(models.get("features", [])), args.features))
    runs_dino = models.get("dinov2")
    if args.dinov2 and runs_dino and "dinov2" in models.get("features", []) and runs_dino != args.dinov2:
        # (--dinov2 large against a server on dinov2-small ran small without a word)
        raise SynPoError("the server at %s runs DINOv2 %s, not --dinov2 %s; start a server with --dinov2 %s"
                         % (args.server, runs_dino, args.dinov2, args.dinov2))
    confidence = "labels" if args.confidence_out else "none"
    # (SIGTERM and SIGHUP end it as Ctrl+C does, cmd_segment: the run cancelled, the session deleted by
    # run_remote; else they stayed on the server until its --session-ttl.)
    return run_remote(client, image, geometry.spacing, support, args.set, args.modality, ref, confidence,
                      progress, args.confidence_all, absent, geometry.known_direction)


def cmd_web(args) -> int:
    try:
        from synpo_web.cli import run
    except ImportError:
        raise SynPoError("synpo web is not part of this installation: pip install 'synpo[web]' from the "
                         "SynPoSlicer repository") from None
    return run(args)


def cmd_serve(args) -> int:
    from .server import run_server
    return run_server(args)


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.output, device=args.device, quiet=args.quiet)
    return 0


def cmd_download(args) -> int:
    from . import weights
    spec = weights.get_spec(args.model)
    if spec.family == "sam":
        print(weights.checkpoint_path(args.model))
    else:
        from .features import DinoEncoder
        DinoEncoder.load(args.model, "cpu", allow_download=True,
                         advice="run `synpo download %s` on a computer with internet access and copy its "
                         "synpo cache's hub folder to %s (or point SYNPO_DINOV2_PATH at the model's folder)"
                         % (args.model, os.path.join(weights.cache_dir(), "hub")))
        print("%s is cached under %s" % (args.model, weights.cache_dir()))
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import run_benchmark
    from .config import configured
    check_outputs([args.output], [args.image, args.support])
    cfg = configured(args.set)
    run_benchmark(args.image, args.support, args.sam, args.features, args.dinov2, args.device, args.precision,
                  args.output, args.quiet, cfg, args.runtime)
    return 0


def cmd_cohort(args) -> int:
    from .cohort import run_cohort
    return run_cohort(args)


def cmd_evaluate(args) -> int:
    from .evaluate_cli import run_evaluate
    return run_evaluate(args)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 like every other error."""

    def error(self, message):
        self.exit(2, "synpo: error: %s (see %s --help)\n" % (message, self.prog))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="synpo", description="SynPo: a whole-volume segmentation from one "
                                     "labelled slice, training-free (SAM + DINOv2 prompts).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    seg = sub.add_parser("segment", help="segment IMAGE from the paint in SUPPORT")
    seg.add_argument("image", help="3D scalar volume (NIfTI, NRRD, MHA, ...)")
    seg.add_argument("support", help="label map on IMAGE's grid (or REF's) with the target painted on one slice")
    seg.add_argument("-o", "--output", required=True, help="output label map (same geometry as IMAGE)")
    seg.add_argument("--support-image", metavar="REF", help="the volume SUPPORT was painted on, if not IMAGE")
    seg.add_argument("--absent", metavar="MARKS",
                     help="a label map on IMAGE's grid: a voxel of value N on a slice says label N is absent "
                          "there (an erased false positive); the walk ends at such a slice")
    seg.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    seg.add_argument("--features", default="auto", choices=FEATURE_CHOICES,
                     help="confidence from SAM+DINOv2 (synergy), one of them, or auto: synergy when DINOv2 "
                          "weights are on disk, else sam (default)")
    seg.add_argument("--dinov2", default=None, choices=("small", "base", "large", "giant"),
                     help="DINOv2's size (default small; with --server, the server's, checked when given)")
    seg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    seg.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                     help="encoder precision: auto = fp32 (IEEE, no TF32) on CUDA and CPU")
    seg.add_argument("--modality", default=None, choices=("ct", "mr"),
                     help="override the automatic choice (CT in Hounsfield units: a soft-tissue window; a CT already "
                          "windowed to 8-bit grey values is taken as it is and reported as ct-windowed; MR: "
                          "percentiles). The run prints which it used")
    add_runtime_option(seg)
    seg.add_argument("--confidence-out", metavar="CONF", help="write the fused confidence map (float volume)")
    seg.add_argument("--confidence-all", action="store_true",
                     help="compute the confidence of every slice (embeds every slice); by default only the slices "
                          "the walk reaches are computed, and CONF is 0 elsewhere")
    seg.add_argument("--points-out", metavar="POINTS", help="write prompt points and boxes per slice (JSON)")
    seg.add_argument("--embedding-cache", metavar="DIR",
                     help="keep image embeddings in DIR so a re-run on the same volume only decodes")
    seg.add_argument("--server", metavar="URL",
                     help="run on a `synpo serve` server (http://HOST:PORT) instead of in this process; the "
                          "outputs are the same")
    seg.add_argument("--token-file", metavar="FILE",
                     help="the server's token (default: $SYNPO_TOKEN, else the file `synpo serve` writes)")
    add_set_option(seg)
    seg.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    seg.set_defaults(func=cmd_segment)

    from .server import add_arguments as add_serve_arguments
    serve = sub.add_parser("serve", help="run the engine as an HTTP server for Slicer and other clients",
                           description="Hold models and per-volume sessions for clients (`synpo segment --server`, "
                           "the Slicer module). Limits: request bodies up to --max-body-mb (413 beyond), sessions "
                           "within --max-memory-mb (least recently used idle sessions evicted beyond, also while a run "
                           "embeds slices; a volume, run or re-decoding that alone needs more is refused), sessions "
                           "unused for --session-ttl seconds deleted, --max-runs runs computed at once (the rest "
                           "queue). Every request but GET /v1/health needs the token.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    web = sub.add_parser("web", help="SynPo in a browser page (paint, preview, correct, apply, save) on Slicer's "
                                     "MRML: needs the web extra (trame-slicer, slicer-core)",
                         description="Serve a page that segments through a `synpo serve` server (started here "
                                     "unless --server). Loopback only unless --host comes with --password-file.")
    try:                                   # options only: no Slicer or trame import
        from synpo_web.cli import add_arguments as add_web_arguments
    except ImportError:                    # the engine alone (e.g. inside the Slicer extension)
        add_web_arguments = None
    if add_web_arguments is not None:
        add_web_arguments(web)
    web.set_defaults(func=cmd_web)

    demo = sub.add_parser("demo", help="run on the bundled CT sample, offline, and write a montage")
    demo.add_argument("-o", "--output", default="synpo-demo", help="output folder (default: synpo-demo)")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    dl = sub.add_parser("download", help="fetch a model into the cache")
    dl.add_argument("model", help="vit_b, vit_l, vit_h, dinov2-small, dinov2-base, ...")
    dl.set_defaults(func=cmd_download)

    bench = sub.add_parser("benchmark", help="time each stage, first run vs repeat run, peak memory")
    bench.add_argument("image")
    bench.add_argument("support")
    bench.add_argument("-o", "--output", help="write the figures as JSON")
    bench.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    bench.add_argument("--features", default="auto", choices=FEATURE_CHOICES)
    bench.add_argument("--dinov2", default="small", choices=("small", "base", "large", "giant"))
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bench.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="encoder precision: auto = fp32 (IEEE, no TF32) on CUDA and CPU")
    add_set_option(bench)
    add_runtime_option(bench)
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_benchmark)

    cohort = sub.add_parser("cohort", help="segment many volumes from one labelled reference, on Dask",
                            description="Segment each QUERY from the slices painted in REF_LABELS on REF_IMAGE "
                            "(as `synpo segment QUERY REF_LABELS --support-image REF_IMAGE`), one Dask task per "
                            "volume, on a local cluster or --scheduler's; writes OUTDIR/<name>_synpo.nii.gz and "
                            "OUTDIR/cohort.csv, and a re-run skips the volumes done with the same settings. "
                            "Exit status: 0 all done, 1 some failed, 2 usage error, 130 interrupted (docs/cohort.md).")
    from .cohort import add_arguments as add_cohort_arguments
    add_cohort_arguments(cohort)
    add_set_option(cohort)
    cohort.set_defaults(func=cmd_cohort)

    ev = sub.add_parser("evaluate", help="measure SynPo and baselines on labelled volumes")
    from .evaluate_cli import add_arguments
    add_arguments(ev)
    add_set_option(ev)
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                 # usage errors (2) and --help (0)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SynPoError as exc:
        sys.stderr.write("synpo: error: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("synpo: interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
