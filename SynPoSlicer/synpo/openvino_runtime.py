"""SAM-family image encoders run by OpenVINO on the CPU (`--runtime openvino`, opt-in).

LiteMedSAM's TinyViT encoder, converted once from the loaded PyTorch module
(`openvino.convert_model`) and kept as OpenVINO IR under the model cache, is compiled for the CPU
in fp32: measured on the 2-core development CPU, 0.99 s a slice against PyTorch's 1.87 s, with
embeddings within 2e-6 of PyTorch's. Those differences are enough to move a few walk decisions:
on the CHAOS volumes 326 of 338 label-slices came out identical, the smallest IoU 0.65
(docs/service.md), so `auto` keeps PyTorch, the runtime every figure was measured with. The
first use converts (~16 s); later runs load the IR.
"""
import hashlib
import os
import threading
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


def pick_runtime(name: str, device: torch.device) -> str:
    """"auto": PyTorch (OpenVINO's masks are not all PyTorch's: module docstring)."""
    if name not in RUNTIMES:
        raise ModelError("unknown runtime %r; use auto, torch or openvino" % name)
    if name == "auto":
        return "torch"
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
            with torch.no_grad():
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
