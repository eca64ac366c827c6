"""Rings: a label painted as a closed band around a hole (the myocardium around the blood pool).
A box drawn around a ring makes SAM segment the bright hole, not the band, so the hole is walked
as a target of its own and the ring is the band of the support's thickness around it (between
two ring supports, the thickness interpolated between theirs)."""
from typing import Callable, Dict, List, Sequence

import numpy as np

from .decode import fill_holes
from .gate import apply_gate
from .ownership import ADDED
from .result import SliceRecord


def find_rings(paint: Dict[int, np.ndarray], support, min_hole: float) -> Dict[int, tuple]:
    """{label: (filled shapes of its support slices, {support slice: hole})} of the labels that are
    rings: one of its support slices is a closed band around a hole (the myocardium); a correction
    painted where it is not (the apex) is a filled shape of it. Empty when min_hole is 0."""
    rings = {}
    if min_hole > 0:
        for label in support.labels:
            masks = [paint[s] == label for s in support.slices[label]]
            parts = [ring_parts([m], min_hole) for m in masks]
            if any(p is not None for p in parts):
                rings[label] = ([fill_holes(m) for m in masks],
                                {s: p[1][0] for s, p in zip(support.slices[label], parts) if p is not None})
    return rings


def ring_label(run, label: int, sup_idx: List[int], sup_masks: List[np.ndarray], ring,
               records: List[SliceRecord], seconds: Dict[str, float]):
    """A ring (the myocardium around the blood pool): a box drawn around a ring makes SAM
    segment the bright hole, not the band. So the hole is propagated as a target of its own and
    the ring is the band of the support's thickness around it (thickness_along); the filled shape's
    walk decides where the label is present (its mask stands where no hole is found)."""
    filled, holes = ring
    hole_idx = sorted(holes)
    outer, conf_outer = run.segment_target(label, sup_idx, filled, records, seconds)
    inner, conf_inner = run.segment_target(label, hole_idx, [holes[s] for s in hole_idx], [], seconds)
    thickness = thickness_along({s: ring_thickness(sup_masks[sup_idx.index(s)], holes[s], run.spacing_rc)
                                 for s in hole_idx}, run.cfg.volume.ring_thickness)
    band_range = run.target_range(sup_idx, sup_masks)
    masks = {t: apply_gate(band_around(inner[t], thickness(t), run.spacing_rc), run.query[t], band_range,
                           run.cfg.gate) if t in inner else m for t, m in outer.items()}
    # Where the band stands, the filled shape's mask is not the ring's: its note on pixels added
    # between two supports (ownership.add_agreed) does not describe the slice.
    for rec in records:
        if rec.index in inner and ADDED in rec.reason:
            rec.reason = "; ".join(part for part in rec.reason.split("; ") if ADDED not in part)
    # The hole's map on every slice the filled shape's walk computed: the ring's confidence
    # (which decides overlaps between labels) is then what every slice's maps give.
    conf_inner.prepare(conf_outer.computed())
    computed = sorted(set(conf_outer.computed()) | set(conf_inner.computed()))
    conf = conf_outer.dense() * (1.0 - conf_inner.dense())
    if run.on_slice is not None:             # a ring's slices are known once both walks are done
        for rec in sorted(records, key=lambda r: r.index):
            run.on_slice(rec, masks.get(rec.index, sup_masks[sup_idx.index(rec.index)]
                                         if rec.status == "support" else None))
    return masks, conf, computed


def ring_parts(masks: Sequence[np.ndarray], min_hole: float):
    """(filled shapes, holes) when every mask is a closed band around a hole of at least
    `min_hole` of its filled area, else None."""
    filled = [fill_holes(m) for m in masks]
    holes = [f & ~m for f, m in zip(filled, masks)]
    if all(h.sum() >= min_hole * max(1, f.sum()) for f, h in zip(filled, holes)):
        return filled, holes
    return None


def thickness_along(each: Dict[int, float], mode: str = "interpolated") -> Callable[[int], float]:
    """Slice index -> the band's thickness (mm) there, from each ring support slice's own
    ({support slice: thickness}): "interpolated" linearly between the two supports around a slice
    and the outermost support's beyond them (a correction painted near the base teaches the
    thickness near the base); "mean" their average on every slice."""
    order = sorted(each)
    values = [each[s] for s in order]
    if mode == "mean":
        mean = float(np.mean(values))
        return lambda t: mean
    return lambda t: float(np.interp(t, order, values))


def ring_thickness(ring: np.ndarray, hole: np.ndarray, spacing_rc) -> float:
    """Thickness (mm) of one support slice's ring: the distance T for which the band around its
    hole (`band_around`) has the ring's area (thickness_along goes from slice to slice)."""
    from scipy import ndimage
    d = np.sort(ndimage.distance_transform_edt(~hole, sampling=spacing_rc)[~hole])
    return float(d[min(len(d), int(ring.sum())) - 1])


def band_around(hole: np.ndarray, thickness: float, spacing_rc) -> np.ndarray:
    """The pixels outside `hole` within `thickness` (mm) of it."""
    from scipy import ndimage
    if not hole.any():
        return hole.copy()
    d = ndimage.distance_transform_edt(~hole, sampling=spacing_rc)
    return (d > 0) & (d <= thickness)
