"""`synpo benchmark`: where the time and memory of a run go.

Runs SynPo three times on the same volume with the same models: the first run
computes every embedding; the repeat runs (new prompt settings, same volume)
reuse them, as a re-run in Slicer or with --embedding-cache does. The first
repeat halves prompts.top_k, which moves the positives but leaves most boxes
alone, so most slices reuse their decoded masks too; the second raises
prompts.box_threshold, which changes every box: it decodes every slice again.
Reports seconds per stage and per slice, wall time, peak RSS, CUDA memory,
device and precision, and writes them as JSON. Labels are walked in parallel
(volume.label_workers): the confidence, prompts and decode seconds are summed
over the workers, so with several labels they can add up to more than the wall
time (assembly is then 0); the wall times and the non-encoder share are wall-clock.
"""
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from typing import Optional

import torch

STAGES = ("intensity", "encode_sam", "encode_dinov2", "confidence", "prompts", "decode", "assembly")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _run(session, support, cfg):
    from .volume import sam_store
    stores, image = session.stores, session.image
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reused_before = sam_store(stores).decode_reuses if stores else 0
    t0 = time.perf_counter()
    result = session.run(support, cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stages = dict(result.timings)
    stages["assembly"] = max(0.0, wall - sum(stages.values()))
    n = image.shape[result.support.axis]
    encoders = stages["encode_sam"] + stages["encode_dinov2"]
    out = {
        "wall_s": wall,
        "decodes_reused": sam_store(stores).decode_reuses - reused_before,
        "slices": n,
        "labels": result.support.labels,
        "stages_s": {k: stages.get(k, 0.0) for k in STAGES},
        "per_slice_ms": {k: 1000.0 * stages.get(k, 0.0) / n for k in STAGES},
        "non_encoder_fraction": (wall - encoders) / wall if wall else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "decoded_slices": sum(r.status in ("present", "absent") for r in result.records),
    }
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    return out, result


def run_benchmark(image_path: str, support_path: str, sam_name: str = "litemedsam", features: str = "auto",
                  dinov2: str = "small", device: str = "auto", precision: str = "auto",
                  output: Optional[str] = None, quiet: bool = False, cfg=None, runtime: str = "auto") -> dict:
    """cfg: the SynPoConfig of the first run (default: the defaults); the repeats change it."""
    from .features import load_models
    from .config import default_config
    from .io import read_volume
    from .session import Models, Session
    image, geometry = read_volume(image_path, "image")
    support, _ = read_volume(support_path, "support label", label=True)
    t0 = time.perf_counter()
    sam, dino, use = load_models(sam_name, features, dinov2, device, quiet, precision, runtime)
    load_s = time.perf_counter() - t0
    dtype = sam.precision
    cfg = default_config() if cfg is None else cfg
    session = Session(image, geometry.spacing, Models.of(sam, dino, use), direction=geometry.known_direction)
    first, result = _run(session, support, cfg)
    # The repeat runs change prompt settings: only decoding work is left to do.
    cfg2 = cfg.with_(prompts={"top_k": cfg.prompts.top_k // 2 or 1})
    repeat, _ = _run(session, support, cfg2)
    cfg3 = cfg.with_(prompts={"box_threshold": min(1.0, cfg.prompts.box_threshold + 0.1)})
    new_boxes, _ = _run(session, support, cfg3)
    report = {
        "image": os.path.abspath(image_path),
        "shape_kji": list(image.shape),
        "sam": sam_name, "features": list(result.features),
        "device": str(sam.device), "device_name": torch.cuda.get_device_name(sam.device)
        if sam.device.type == "cuda" else platform.processor() or platform.machine(),
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "runtime": sam.runtime,
        "model_load_s": load_s,
        "config": asdict(cfg),
        "first": first, "repeat": repeat,
        "repeat_speedup": first["wall_s"] / repeat["wall_s"] if repeat["wall_s"] else float("inf"),
        "repeat_new_boxes": new_boxes,
        "repeat_new_boxes_speedup": first["wall_s"] / new_boxes["wall_s"] if new_boxes["wall_s"] else float("inf"),
    }
    if output:
        with open(output, "w") as handle:
            json.dump(report, handle, indent=1)
    if not quiet:
        print(format_report(report))
    return report


def format_report(r: dict) -> str:
    lines = ["SynPo benchmark: %s, %s slices (k, j, i = %s), labels %s" % (
        os.path.basename(r["image"]), r["first"]["slices"], "x".join(map(str, r["shape_kji"])),
        r["first"]["labels"]),
        "model %s, features %s, device %s (%s), precision %s, torch %s, %d threads" % (
            r["sam"], "+".join(r["features"]), r["device"], r["device_name"], r["precision"], r["torch"],
            r["threads"]),
        "%-14s %12s %12s %12s %12s" % ("stage", "first s", "ms/slice", "repeat s", "new boxes s")]
    for k in STAGES:
        lines.append("%-14s %12.2f %12.1f %12.2f %12.2f" % (
            k, r["first"]["stages_s"][k], r["first"]["per_slice_ms"][k], r["repeat"]["stages_s"][k],
            r["repeat_new_boxes"]["stages_s"][k]))
    lines.append("%-14s %12.2f %12.1f %12.2f %12.2f" % (
        "wall", r["first"]["wall_s"], 1000 * r["first"]["wall_s"] / r["first"]["slices"], r["repeat"]["wall_s"],
        r["repeat_new_boxes"]["wall_s"]))
    lines.append("decoded (label, slice) pairs: %d first, %d repeat (%d masks reused), %d new boxes (%d reused); "
                 "%.0f ms per decoded slice (first run)" % (
                     r["first"]["decoded_slices"], r["repeat"]["decoded_slices"], r["repeat"]["decodes_reused"],
                     r["repeat_new_boxes"]["decoded_slices"], r["repeat_new_boxes"]["decodes_reused"],
                     1000 * r["first"]["stages_s"]["decode"] / max(1, r["first"]["decoded_slices"])))
    lines.append("non-encoder share of the first run: %.1f%%; repeat run %.1fx faster (top_k halved), %.1fx "
                 "(box threshold raised); peak RSS %.0f MB%s" % (
        100 * r["first"]["non_encoder_fraction"], r["repeat_speedup"], r["repeat_new_boxes_speedup"],
        r["repeat_new_boxes"]["peak_rss_mb"],
        ("; CUDA peak %.0f MB" % r["first"]["cuda_peak_mb"]) if "cuda_peak_mb" in r["first"] else ""))
    return "\n".join(lines)
