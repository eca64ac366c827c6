"""SAM decoding of one slice's prompts, and the refinement pass.

Refinement (DecodeConfig.refine):
1. keep only the connected components of the mask that overlap the prompt
   region (or hold a positive point), and fill holes;
2. decode once more with the box of that mask, widened by refine_box_margin,
   and the first pass's own low-resolution logits as SAM's mask prompt (SAM's
   iterative refinement);
3. restore to it the pixels of the confident region (the prompts' region) that a blend
   of both passes' logits (refine_blend of the first's) calls foreground: the
   mask-prompted pass shrinks what LiteMedSAM already under-segments (spleen), while
   the first pass alone keeps what it over-segments beyond the confident region;
4. keep the refined mask if it overlaps the first well (IoU >= 0.5), else the
   first: a refinement may tighten, never jump elsewhere.
"""
import hashlib
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

from .config import DecodeConfig
from .prompts import Prompts, box_of, widen
from .sam_decoder import OUTSIDE_LOGIT


@dataclass
class Decoded:
    mask: np.ndarray                 # (H, W) bool
    logits: np.ndarray               # (H, W) float32
    iou: float                       # SAM's predicted IoU
    box: Optional[Tuple[int, int, int, int]]  # the box given to SAM (first pass)


def _point_args(prompts: Prompts, cfg: DecodeConfig):
    if not cfg.use_points:
        return None, None
    pts = [p for p in (prompts.positive, prompts.negative) if len(p)]
    if not pts:
        return None, None
    xy = np.concatenate(pts).astype(float)
    labels = np.concatenate([np.ones(len(prompts.positive)), np.zeros(len(prompts.negative))]).astype(int)
    return xy, labels


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes(mask) in one labelling of the background: a background
    pixel stays background iff it is 4-connected through background to the border."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, border[border > 0])


def keep_prompted(mask: np.ndarray, prompts: Prompts) -> np.ndarray:
    """Components of mask that overlap the prompt region or hold a positive point; holes filled."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = set(np.unique(labels[prompts.region & mask]).tolist())
    for x, y in np.asarray(prompts.positive, dtype=int):
        keep.add(int(labels[y, x]))
    keep.discard(0)
    if not keep:
        return np.zeros_like(mask)
    return fill_holes(np.isin(labels, sorted(keep)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def decoder_inputs(prompts: Prompts, cfg: DecodeConfig) -> bytes:
    """A key for everything decode_slice's mask depends on besides the embedding: the box and
    points given to SAM, the prompt region, the positives outside that region (keep_prompted
    keeps their components; those inside it add nothing) and the decode settings. Prompts that
    differ only where decoding cannot see them (more top-k positives inside the same region, other
    negatives with a box-only model) give the same key."""
    box = prompts.box if cfg.use_box else None
    positive = np.asarray(prompts.positive, dtype=float).reshape(-1, 2)
    given = cfg.use_points or box is None
    if not given and len(positive):
        ij = np.clip(positive.astype(int), 0, [prompts.region.shape[1] - 1, prompts.region.shape[0] - 1])
        positive = positive[~prompts.region[ij[:, 1], ij[:, 0]]]
    negative = np.asarray(prompts.negative, dtype=float).reshape(-1, 2) if cfg.use_points else np.zeros((0, 2))
    digest = hashlib.sha1(repr((box, cfg, prompts.region.shape)).encode())
    for part in (np.packbits(prompts.region), positive, negative):
        digest.update(np.ascontiguousarray(part).tobytes() + b"|")
    return digest.digest()


def _nothing(frame) -> Decoded:
    """No prompt to decode: an empty mask, background logits everywhere."""
    return Decoded(np.zeros((frame.H, frame.W), dtype=bool), np.full((frame.H, frame.W), OUTSIDE_LOGIT, np.float32),
                   0.0, None)


def decode_slice(model, embedding, frame, prompts: Prompts, cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    box = prompts.box if cfg.use_box else None
    xy, labels = _point_args(prompts, cfg)
    if box is None and xy is None:
        # Box-free decoding (use_box off): fall back to the positive points.
        xy = np.asarray(prompts.positive, dtype=float)
        labels = np.ones(len(xy), dtype=int)
    if xy is not None and len(xy) == 0 and box is None:
        return _nothing(frame)
    logits, low, score = model.decode(embedding, frame, box_xy=box, points_xy=xy, point_labels=labels,
                                      window_margin=cfg.window_margin, attend_margin=cfg.attend_margin,
                                      attend_cells=cfg.attend_cells)
    logits = logits.numpy()
    mask = logits > cfg.mask_threshold
    if cfg.refine and mask.any():
        mask = keep_prompted(mask, prompts)
        box2 = widen(box_of(mask), cfg.refine_box_margin, mask.shape)
        if box2 is not None:
            logits2, _, score2 = model.decode(embedding, frame, box_xy=box2 if cfg.use_box else None,
                                              points_xy=xy, point_labels=labels, mask_logits=low,
                                              window_margin=cfg.window_margin, attend_margin=cfg.attend_margin,
                                              attend_cells=cfg.attend_cells)
            logits2 = logits2.numpy()
            mask2 = keep_prompted(logits2 > cfg.mask_threshold, prompts)
            if cfg.refine_blend > 0:
                blended = cfg.refine_blend * logits + (1.0 - cfg.refine_blend) * logits2
                restored = keep_prompted(blended > cfg.mask_threshold, prompts) & prompts.region & ~mask2
                if restored.any():
                    mask2 = keep_prompted(mask2 | restored, prompts)
                    logits2 = np.where(restored, blended, logits2)
            if iou(mask, mask2) >= 0.5:
                mask, logits, score = mask2, logits2, score2
    return Decoded(mask, logits.astype(np.float32), score, box)


def redecode_with_points(model, embedding, frame, positive_xy: np.ndarray, negative_xy: np.ndarray,
                         current: Optional[np.ndarray] = None, cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Decode one slice again from points the user moved, added or deleted.

    The box (which box-trained models need) covers the positive points and the
    current mask; the points themselves are given to SAM with their labels.
    """
    positive_xy = np.asarray(positive_xy, dtype=float).reshape(-1, 2)
    negative_xy = np.asarray(negative_xy, dtype=float).reshape(-1, 2)
    if len(positive_xy) == 0:
        return _nothing(frame)
    region = np.zeros((frame.H, frame.W), dtype=bool)
    if current is not None:
        region |= current.astype(bool)
    for x, y in np.clip(np.round(positive_xy), 0, [frame.W - 1, frame.H - 1]).astype(int):
        region[y, x] = True
    prompts = Prompts(positive_xy, negative_xy, box_of(region), region)
    return decode_slice(model, embedding, frame, prompts, replace(cfg, use_points=True))
