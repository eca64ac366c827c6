"""The cross-patient start: a support painted on another volume. The walk starts at the query
slice, near the supports' relative height, with the most confidence inside the support mask
carried over by the body-to-body mapping (position.py). `run` is the VolumeRun."""
from typing import Dict, List

import numpy as np

from .position import expected_region, expected_shape
from .result import SliceRecord
from .slice_confidence import SliceConfidence
from .walk import _Context, _record


def nearest_support(run, t: int, sup_idx: List[int]) -> int:
    """The support slice (its position in sup_idx) at the relative height of the volume
    nearest query slice t's."""
    rel = [abs(s / max(1, len(run.ref) - 1) - t / max(1, run.n - 1)) for s in sup_idx]
    return int(np.argmin(rel))


def expected_slice_region(run, t: int, sup_idx: List[int], sup_masks: List[np.ndarray]):
    """Where the target is expected on query slice t, from the nearest support slice; None
    when the prior is off."""
    if not run.cfg.volume.position_prior:
        return None
    k = nearest_support(run, t, sup_idx)
    return expected_region(sup_masks[k], run.ref[sup_idx[k]], run.query[t], run.cfg.volume.position_margin)


def expected_slice_shape(run, t: int, sup_idx: List[int], sup_masks: List[np.ndarray]):
    """The nearest support slice's mask carried onto query slice t; None when the prior is off."""
    if not run.cfg.volume.position_prior:
        return None
    k = nearest_support(run, t, sup_idx)
    return expected_shape(sup_masks[k], run.ref[sup_idx[k]], run.query[t])


def expected_height(run, t: int, sup_idx: List[int]) -> bool:
    """Whether query slice t lies at a relative height of the volume near the support
    slices' (within position_margin of the volume's extent)."""
    if not run.cfg.volume.position_prior:
        return True
    rel, m, top = t / max(1, run.n - 1), run.cfg.volume.position_margin, max(1, len(run.ref) - 1)
    return min(sup_idx) / top - m <= rel <= max(sup_idx) / top + m


def cross_start(run, ctx: "_Context", label: int, sup_idx: List[int], sup_masks: List[np.ndarray],
                conf: SliceConfidence, min_area: float, records: List[SliceRecord]) -> Dict[int, np.ndarray]:
    """Across patients: the walk starts on the slice (at a height near the supports') with the
    most confidence inside the carried-over support mask; without the position prior, the
    largest confident area. One slice's carried-over mask at a time: memory stays a slice's."""
    def start_score(t: int) -> float:
        if not expected_height(run, t, sup_idx) or t in ctx.absent:
            return -1.0
        shape = expected_slice_shape(run, t, sup_idx, sup_masks)
        if shape is None:
            return float((conf[t] >= run.cfg.prompts.box_threshold).sum())
        return float((conf[t] * shape).sum())

    conf.prepare([t for t in range(run.n) if expected_height(run, t, sup_idx)])
    start = int(np.argmax([start_score(t) for t in range(run.n)]))
    first, rec = ctx.decode(label, start, expected_slice_region(run, start, sup_idx, sup_masks), min_area,
                            expected=expected_slice_shape(run, start, sup_idx, sup_masks))
    records.append(rec)
    ctx.report(rec, first)
    if first is None:
        for t in range(run.n):
            if t != start:
                records.append(_record(label, t, "not reached"))
                ctx.report(records[-1], None)
                run.tick()
        return {}
    return {start: first}
