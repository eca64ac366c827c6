"""Whether a walk goes on: the stop rules judged on one decoded slice (walk.py's walks).

A walk outwards from a support decodes the next slice and asks `judge_step` whether the target is
still there. The rules and their thresholds are in config.VolumeConfig; `Step` carries what they
look at, so an instrument (benchmarks/walk_decisions.py) can record the same figures for every
step and compare the steps that continue the organ with the ones that leave it.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

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
    # The walk so far, (area, mean confidence) of each accepted slice from its start (the paint) to
    # prev (last): the trend rules look at how the organ has been changing, not only at one step.
    history: Tuple[Tuple[int, float], ...] = ()
    pixel_mm2: float = 0.0           # one pixel's area in mm^2 (0: unknown)


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
    why = next((why for failed, why in reasons if failed), "")
    return why or ("" if step.first else trend(step, vc))


def large_enough(step: Step, min_cm2: float) -> bool:
    """The walk's start mask (history[0]: the paint) covers at least min_cm2 square centimetres
    (0: any size; an unknown pixel size counts as large enough)."""
    if min_cm2 <= 0 or step.pixel_mm2 <= 0 or not step.history:
        return True
    return step.history[0][0] * step.pixel_mm2 >= 100.0 * min_cm2


def trend(step: Step, vc: VolumeConfig) -> str:
    """The trend rules of a later step (config.VolumeConfig.sudden_area_change, regrow_after,
    falling_ratio): "" or the reason, with the figures that ended the walk."""
    if not step.history:
        return ""
    areas = [a for a, _ in step.history]
    if vc.sudden_area_change > 0 and len(areas) >= 3 and areas[-1] and areas[-2]:
        change, held = step.area / areas[-1], areas[-1] / areas[-2]
        ratio = step.score / step.history[-1][1] if step.history[-1][1] else 1.0
        if change < vc.sudden_area_change and held > vc.sudden_after and ratio < vc.sudden_ratio:
            return "ended abruptly (area %.2f of the previous slice's after %.2f; confidence %.2f)" % (
                change, held, ratio)
    if vc.regrow_after > 0 and len(step.history) > 1 and large_enough(step, vc.regrow_min_cm2):
        # From the paint (regrow_reference "paint") or from the walk's widest mask, the paint included
        # ("peak"): the smallest mask after it, and whether this one outgrows it.
        top = 0 if vc.regrow_reference == "paint" else int(np.argmax(areas))
        later = areas[top + 1:]
        low = min(later) if later else 0
        if later and low < vc.regrow_below * areas[top] and step.area > vc.regrow_after * low:
            return "grew again after tapering (area %.1f x the walk's smallest, %.2f x its %s)" % (
                step.area / max(low, 1), low / max(areas[top], 1), "paint" if top == 0 else "widest mask")
    # The paint's own score (history[0]) is its self-similarity, not a decoded slice's: not counted.
    scores = [c for _, c in step.history[1:]] + [step.score]
    n = vc.falling_steps
    if vc.falling_ratio > 0 and n > 0 and len(scores) > n and all(
            scores[-k] < vc.falling_ratio * scores[-k - 1] for k in range(1, n + 1)):
        return "confidence falling (%s over the last %d slices)" % (
            ", ".join("%.2f" % (scores[-k] / scores[-k - 1]) for k in range(n, 0, -1)), n)
    return ""
