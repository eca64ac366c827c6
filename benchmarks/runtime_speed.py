"""LiteMedSAM's image encoder on the CPU: PyTorch, OpenVINO and ONNX Runtime side by side.

    .venv/bin/python benchmarks/runtime_speed.py [--slices 8] [--repeats 3] [-o report.json]

Each runtime embeds the same real slices (the bundled CT, normalised as a run normalises it) one
at a time, fp32, after a warm-up; it prints seconds per slice, the speed-up over PyTorch, the
largest difference of its embeddings from PyTorch's, and the encoder's GFLOP/s against this CPU's
fp32 peak (cores x clock x 32 FLOP per cycle: two 256-bit FMA pipes per core, as AVX2 and Zen 4's
AVX-512 both give; the clock from /proc/cpuinfo). The encoder's FLOPs are counted by PyTorch's
FlopCounterMode on one slice. ONNX Runtime needs `pip install onnxruntime onnx` (the model is
exported with torch.onnx.export once, into a temporary folder); a runtime that is not installed is
skipped and said so.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))

from synpo.io import write_json  # noqa: E402

from synpo import demo  # noqa: E402
from synpo.features import SamModel, to_input  # noqa: E402
from synpo.intensity import normalize  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.support import in_plane_spacing  # noqa: E402


def peak_gflops() -> float:
    mhz = 0.0
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.lower().startswith("cpu mhz"):
                mhz = max(mhz, float(line.split(":")[1]))
    return (os.cpu_count() or 1) * mhz / 1000.0 * 32.0


def encoder_gflop(module: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / 1e9


def onnx_runner(module: torch.nn.Module, x: torch.Tensor, folder: str):
    import onnxruntime as ort
    path = os.path.join(folder, "encoder.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the tracer's notes on TinyViT's shape asserts
        torch.onnx.export(module, (x,), path, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0])


def openvino_runner(module: torch.nn.Module, size: int, folder: str):
    from synpo.openvino_runtime import OpenVinoEncoder
    return OpenVinoEncoder(module, size, "litemedsam", cache=folder)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    sam = SamModel.load("litemedsam", "cpu", allow_download=False)
    image, geometry = read_volume(demo.SAMPLE_IMAGE)
    norm = normalize(image)[0]
    picks = np.linspace(0, len(norm) - 1, args.slices).astype(int)
    frame = sam.frame(norm.shape[1], norm.shape[2], in_plane_spacing(geometry.spacing, 0))
    inputs = [to_input(norm[k:k + 1], frame, torch.device("cpu")) for k in picks]
    module = sam.net.image_encoder.eval()
    gflop = encoder_gflop(module, inputs[0])
    peak = peak_gflops()
    runners = {"torch": lambda t: module(t)}
    skipped = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, make in (("openvino", lambda: openvino_runner(module, sam.input_size, folder)),
                           ("onnxruntime", lambda: onnx_runner(module, inputs[0], folder))):
            try:
                runners[name] = make()
            except ImportError as e:
                skipped[name] = "not installed (%s)" % e.name
        rows, reference = [], None
        for name, run in runners.items():
            with torch.no_grad():
                run(inputs[0])                                    # warm-up
                outs = [run(t) for t in inputs]
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    for t in inputs:
                        run(t)
                seconds = (time.perf_counter() - t0) / (args.repeats * len(inputs))
            if reference is None:
                reference = outs
            diff = max(float((a - b).abs().max()) for a, b in zip(outs, reference))
            rows.append({"runtime": name, "s_per_slice": seconds, "max_abs_diff_vs_torch": diff,
                         "gflops": gflop / seconds, "share_of_peak": gflop / seconds / peak})
    base = rows[0]["s_per_slice"]
    print("LiteMedSAM encoder, %.1f GFLOP per slice; CPU fp32 peak %.0f GFLOP/s (%d cores)"
          % (gflop, peak, os.cpu_count() or 1))
    print("| runtime | s / slice | speed-up | GFLOP/s | of peak | max |diff| vs PyTorch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %.3f | %.2f x | %.1f | %.0f %% | %.1e |" % (r["runtime"], r["s_per_slice"], base / r["s_per_slice"],
                                                             r["gflops"], 100 * r["share_of_peak"],
                                                             r["max_abs_diff_vs_torch"]))
    for name, why in skipped.items():
        print("%s: skipped, %s" % (name, why))
    report = {"gflop_per_slice": gflop, "peak_gflops": peak, "rows": rows, "skipped": skipped}
    if args.output:
        write_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
