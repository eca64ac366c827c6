"""SAM-family image encoders run by OpenVINO on the CPU: LiteMedSAM's default there when installed.

LiteMedSAM's TinyViT encoder, converted once from the loaded PyTorch module
(`openvino.convert_model`) and kept as OpenVINO IR under the model cache, is compiled for the CPU
in fp32: 0.55 s a slice against PyTorch's 1.10 s on the 2-core development CPU (2.0x,
benchmarks/runtime_speed.py), embeddings within 4e-6 of PyTorch's. With the embeddings kept in
float16 (embeddings.py) the walks decide every slice as with PyTorch's: whole-volume Dice equal to
within 0.0001 on every organ-volume of chaos_t2, cmr_bssfp and acdc_cine, no organ's length changed
(benchmarks/stability.py --runtime openvino; docs/research.md). So "auto" takes OpenVINO for
LiteMedSAM on a CPU when the package is importable (the issue's bar: within 0.003 on every
development set), PyTorch otherwise; `--runtime torch` keeps PyTorch. The first use converts
(~16 s); later runs load the IR. A conversion that fails under "auto" falls back to PyTorch.
"""
import hashlib
import os
import threading
import warnings
from typing import Optional

import numpy as np
import torch

from .errors import ModelError

RUNTIMES = ("auto", "torch", "openvino")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# The models whose OpenVINO runs were measured against PyTorch's (module docstring): "auto" takes
# OpenVINO for these only. The SAM ViTs convert too, but no walk of theirs was compared.
AUTO_OPENVINO_MODELS = ("litemedsam",)


def pick_runtime(name: str, device: torch.device, model: str = "litemedsam") -> str:
    """"auto": OpenVINO for a measured model (AUTO_OPENVINO_MODELS) on a CPU when the package is
    installed, else PyTorch. "openvino" asked for explicitly: a CPU and the package, or ModelError."""
    if name not in RUNTIMES:
        raise ModelError("unknown runtime %r; use auto, torch or openvino" % name)
    if name == "auto":
        use = device.type == "cpu" and model in AUTO_OPENVINO_MODELS and available()
        return "openvino" if use else "torch"
    if name == "openvino":
        if device.type != "cpu":
            raise ModelError("--runtime openvino runs on the CPU; use --device cpu or --runtime torch")
        if not available():
            raise ModelError("--runtime openvino needs the openvino package: pip install openvino")
    return name


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class OpenVinoEncoder:
    """encoder(x: (N, 3, S, S) float32 tensor) -> (N, C, g, g) float32 tensor, like the module."""

    def __init__(self, module: torch.nn.Module, input_size: int, name: str, cache: Optional[str] = None):
        import openvino as ov
        self.name = name
        folder = os.path.join(cache or _cache_dir(), "openvino")
        path = os.path.join(folder, "%s-%s.xml" % (name, _weights_digest(module)))
        core = ov.Core()
        if os.path.isfile(path):
            model = core.read_model(path)
        else:
            # Tracing warns about the vendored TinyViT's Python shape checks (constant for one input
            # size): not the user's concern.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ov.convert_model(module.eval(), example_input=torch.zeros(1, 3, input_size, input_size))
            os.makedirs(folder, exist_ok=True)
            tmp = path + ".tmp-%d.xml" % os.getpid()
            ov.save_model(model, tmp, compress_to_fp16=False)
            os.replace(tmp[:-4] + ".bin", path[:-4] + ".bin")        # the weights first, then the graph
            os.replace(tmp, path)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._local = threading.local()          # one infer request per thread: label workers embed at once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # One slice at a time: the traced graph keeps the example's batch of one in its reshapes
        # (and on a CPU a batch buys no speed).
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        outs = [np.array(request.infer({0: array[i:i + 1]})[0], dtype=np.float32) for i in range(len(array))]
        return torch.from_numpy(np.concatenate(outs))


def _cache_dir() -> str:
    from .weights import cache_dir
    return cache_dir()
