"""Whether a walk goes on: the stop rules judged on one decoded slice (walk.py's walks).

A walk outwards from a support decodes the next slice and asks `judge_step` whether the target is
still there. The rules and their thresholds are in config.VolumeConfig; `Step` carries what they
look at, so an instrument (benchmarks/walk_decisions.py) can record the same figures for every
step and compare the steps that continue the organ with the ones that leave it.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .config import VolumeConfig


@dataclass
class Step:
    """One decoded slice of a walk (masks are (H, W) bool in the slice frame)."""
    label: int
    index: int                       # the slice decoded
    first: bool                      # the first step away from a painted slice (prev is the paint)
    mask: np.ndarray
    area: int                        # pixels in mask
    prev: Optional[np.ndarray]       # the neighbouring slice's mask (None: a start without one)
    min_area: float                  # pixels: the "too small" limit for this target
    score: float                     # mean confidence inside mask
    prev_score: Optional[float]      # ... inside prev (on prev's slice)
    sam_iou: float                   # SAM's own predicted IoU of the mask
    overlap: float                   # fraction of mask inside prev


# judge(step, volume config) -> "" (the target goes on) or the reason it is judged absent.
Judge = Callable[[Step, VolumeConfig], str]


def judge_step(step: Step, vc: VolumeConfig) -> str:
    """The first rule that fails, or "" when the target is judged present."""
    ratio = vc.min_confidence_ratio_first if step.first else vc.min_confidence_ratio
    overlap = vc.min_overlap_first if step.first else vc.min_overlap
    reasons = [
        (step.area < step.min_area, "too small"),
        (step.score < vc.min_confidence, "low confidence"),
        (step.prev_score is not None and step.score < ratio * step.prev_score, "confidence drop"),
        (step.sam_iou < vc.min_sam_iou, "low SAM IoU"),
        (step.prev is not None and step.overlap < overlap, "left the previous mask"),
    ]
    return next((why for failed, why in reasons if failed), "")
