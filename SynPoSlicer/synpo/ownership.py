"""Ownership between supports: which start's walk gives each slice when a label has several
support slices, and the confidence that goes with it (each slice's map is its owner's)."""
import bisect
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .decode import iou
from .interpolate import between as interpolate_between
from .result import SliceRecord
from .slice_confidence import SliceConfidence
from .walk import _walk

def walk_ranges(starts: Sequence[int], n: int) -> Dict[int, Tuple[int, int]]:
    """{start: (low, high)}: the walks from `start` go down to low + 1 and up to high - 1; between
    two starts, each slice belongs to the nearer one (the lower one on a tie)."""
    order = sorted(starts)
    out = {}
    for pos, s in enumerate(order):
        low = -1 if pos == 0 else (order[pos - 1] + s) // 2
        high = n if pos == len(order) - 1 else (s + order[pos + 1]) // 2 + 1
        out[s] = (low, high)
    return out


def _propagate(ctx, label: int, n: int, starts: Dict[int, np.ndarray], min_area, records: List[SliceRecord],
               painted: bool = True, ownership: str = "nearest", gap_choice: str = "split",
               larger_wins: bool = False, larger_arrival: float = 0.0) -> Tuple[Dict[int, np.ndarray], Dict[int, int]]:
    """Walk outwards from every start slice; returns (masks {slice: mask}, owner {slice: start whose
    walk gave that slice}). ctx and min_area are one for all starts, or {start: ...}: each support's
    walk with its own confidence and area. painted: the starts are the user's paint (not a decoded
    start slice, as across patients).
    ownership: between two starts, "nearest" gives each slice to the nearer start (walk_ranges);
    "agreement" walks both across the gap and splits it where their masks agree best (split_gap), or
    with gap_choice "paint_shape" gives each slice to the walk closer to the paints' shape there
    (choose_by_paint)."""
    def walk(s, stop, step, into_masks, into_records):
        c = ctx[s] if isinstance(ctx, dict) else ctx
        a = min_area[s] if isinstance(min_area, dict) else min_area
        _walk(c, label, s, starts[s], stop, step, a, into_masks, into_records, painted)

    masks: Dict[int, np.ndarray] = dict(starts)
    order = sorted(starts)
    if ownership == "nearest" or len(order) == 1:
        owner = {}
        for s, (low, high) in walk_ranges(order, n).items():
            walk(s, low, -1, masks, records)
            walk(s, high, +1, masks, records)
            owner.update({t: s for t in range(low + 1, high)})
        return masks, owner
    owner = {s: s for s in order}
    walk(order[0], -1, -1, masks, records)
    walk(order[-1], n, +1, masks, records)
    owner.update({t: order[0] for t in range(order[0])})
    owner.update({t: order[-1] for t in range(order[-1] + 1, n)})
    for s1, s2 in zip(order, order[1:]):
        up, up_records, down, down_records, handed = {}, [], {}, [], {}
        walk(s1, s2, +1, up, up_records)
        walk(s2, s1, -1, down, down_records)
        if gap_choice == "paint_shape":
            c = ctx[s1] if isinstance(ctx, dict) else ctx
            gap = choose_by_paint(s1, s2, up, down, starts[s1], starts[s2], c.spacing_rc)
        else:
            split = split_gap(s1, s2, up, down)
            gap = {t: s1 if t <= split else s2 for t in range(s1 + 1, s2)}
            if larger_wins:
                c = ctx[s1] if isinstance(ctx, dict) else ctx
                gap, handed = prefer_larger(s1, s2, up, down, gap, starts[s1], starts[s2], c.spacing_rc,
                                            larger_arrival)
        masks.update({t: m for t, m in up.items() if gap.get(t) == s1})
        masks.update({t: m for t, m in down.items() if gap.get(t) == s2})
        chosen = [r for r in up_records if gap.get(r.index) == s1] + [r for r in down_records
                                                                       if gap.get(r.index) == s2]
        for r in chosen:
            if r.index in handed:
                note = LARGER % handed[r.index]
                r.reason = "%s; %s" % (r.reason, note) if r.reason else note
        if gap_choice == "split_and_shape":
            c = ctx[s1] if isinstance(ctx, dict) else ctx
            added = add_agreed(s1, s2, up, down, starts[s1], starts[s2], gap, c.spacing_rc)
            notes = {r.index: r for r in chosen}
            for t, (mask, extra) in added.items():
                masks[t] = mask
                if t in notes:
                    note = "%d %s" % (extra, ADDED)
                    notes[t].reason = "%s; %s" % (notes[t].reason, note) if notes[t].reason else note
        records += chosen
        owner.update(gap)
    return masks, owner


def choose_by_paint(s1: int, s2: int, up: Dict[int, np.ndarray], down: Dict[int, np.ndarray],
                    paint1: np.ndarray, paint2: np.ndarray, spacing_rc=(1.0, 1.0)) -> Dict[int, int]:
    """{slice: s1 or s2} for the slices between supports s1 < s2: where both walks found the target,
    the walk whose mask overlaps the shape interpolated between the two paints more (IoU; the
    nearer support on a tie); where one walk found it, that walk; where neither, the nearer."""
    shapes = interpolate_between(paint1, paint2, s2 - s1 - 1, spacing_rc)
    out = {}
    for t in range(s1 + 1, s2):
        nearer = s1 if t - s1 <= s2 - t else s2
        a, b = up.get(t), down.get(t)
        if a is not None and b is not None:
            ref = shapes[t - s1 - 1]
            ia, ib = iou(a, ref), iou(b, ref)
            out[t] = nearer if ia == ib else (s1 if ia > ib else s2)
        else:
            out[t] = s1 if a is not None else s2 if b is not None else nearer
    return out


# The record's note on a gap slice that prefer_larger handed over against the split.
LARGER_KEPT = "the larger mask kept"
LARGER = "%d px against the other support's walk's %d px: " + LARGER_KEPT


def prefer_larger(s1: int, s2: int, up: Dict[int, np.ndarray], down: Dict[int, np.ndarray],
                  gap: Dict[int, int], paint1: Optional[np.ndarray] = None, paint2: Optional[np.ndarray] = None,
                  spacing_rc=(1.0, 1.0), arrival: float = 0.0
                  ) -> Tuple[Dict[int, int], Dict[int, Tuple[int, int]]]:
    """(gap, handed): {slice: s1 or s2} for the slices between supports s1 < s2 with each slice
    that both walks found given to the walk whose mask is larger there (the split's owner keeps a
    tie), and {slice: (pixels kept, pixels of the other walk)} for those handed over against `gap`.

    Between a support painted where the organ is small (its end) and one where it is large, the
    walk from the small paint grows into the organ a slice at a time (its search region is its
    previous mask's box, widened a little), so it lags where the organ widens quickly; the walk
    from the large paint comes down over the organ as it narrows. Where the two disagree, the
    smaller mask is most often the lagging one (docs/corrections.md, "The larger of two walks").
    A walk that leaked into a neighbour is larger too, and it does not arrive where the other
    paint says the organ is: with `arrival` > 0 (and both paints), a walk takes slices only if its
    mask on the slice next to the other support overlaps the shape interpolated between the two
    paints there (interpolate.between) by IoU >= arrival."""
    takers = {s1: True, s2: True}
    if arrival > 0 and paint1 is not None and paint2 is not None and gap:
        near1, near2 = interpolate_between(paint1, paint2, s2 - s1 - 1, spacing_rc, only=[1, s2 - s1 - 1])
        takers = {s1: up.get(s2 - 1) is not None and iou(up[s2 - 1], near2) >= arrival,
                  s2: down.get(s1 + 1) is not None and iou(down[s1 + 1], near1) >= arrival}
    out, handed = dict(gap), {}
    for t, owner in gap.items():
        a, b = up.get(t), down.get(t)
        other_start = s2 if owner == s1 else s1
        if a is None or b is None or not takers[other_start]:
            continue
        mine, other = (a, b) if owner == s1 else (b, a)
        na, nb = int(mine.sum()), int(other.sum())
        if nb > na:
            out[t] = other_start
            handed[t] = (nb, na)
    return out, handed


# The record's note on a gap slice that add_agreed added to ("N " + ADDED).
ADDED = "px added where the other support's walk and the shape between the paints agree"


def add_agreed(s1: int, s2: int, up: Dict[int, np.ndarray], down: Dict[int, np.ndarray],
               paint1: np.ndarray, paint2: np.ndarray, gap: Dict[int, int], spacing_rc=(1.0, 1.0)
               ) -> Dict[int, Tuple[np.ndarray, int]]:
    """{slice: ((H, W) bool mask, pixels added)} for the slices between supports s1 < s2 that both
    walks found, where the other walk adds something: the owning walk's mask (gap: {slice: s1 or
    s2}, split_gap's) plus the pixels that the other support's walk and the shape interpolated
    between the two paints (interpolate.between) both hold. Nothing of the owner's mask is taken
    away; a pixel only one of the two other witnesses holds is not added."""
    pairs = {t: (up[t], down[t]) if gap.get(t) == s1 else (down[t], up[t])
             for t in range(s1 + 1, s2) if t in up and t in down}
    candidates = [t for t, (own, other) in pairs.items() if (other & ~own).any()]
    if not candidates:
        return {}
    # The shape only where the other walk holds something the owner does not (a distance map each).
    shapes = interpolate_between(paint1, paint2, s2 - s1 - 1, spacing_rc, only=[t - s1 for t in candidates])
    out = {}
    for t, shape in zip(candidates, shapes):
        own, other = pairs[t]
        extra = other & shape & ~own
        if extra.any():
            out[t] = (own | extra, int(extra.sum()))
    return out


def split_gap(s1: int, s2: int, up: Dict[int, np.ndarray], down: Dict[int, np.ndarray]) -> int:
    """Where the gap between starts s1 < s2 changes hands: slices s1 < t <= split from s1's walk up
    (`up`), split < t < s2 from s2's walk down (`down`). Each walk is best near its own start; they
    hand over on the slice where both found the target and their masks agree best (IoU; the slice
    nearest the middle on a tie). Where the walks never met (one stopped before the other's
    reach), each keeps what it found."""
    both = [t for t in range(s1 + 1, s2) if t in up and t in down]
    if not both:
        return max(up, default=s1)
    middle = (s1 + s2) / 2.0

    def agreement(t):
        inter = np.logical_and(up[t], down[t]).sum()
        union = np.logical_or(up[t], down[t]).sum()
        return (inter / union if union else 1.0, -abs(t - middle))
    return max(both, key=agreement)


class OwnedConfidence:
    """A target's confidence when each support slice walks with its own maps: slice t's map is
    the one of the support whose walk gave t (owner, from _propagate). SliceConfidence's interface."""

    def __init__(self, confs: Dict[int, SliceConfidence], owner: Dict[int, int], n: int):
        self.confs, self.n = confs, n
        self.owner = dict(owner)

    def prepare(self, indices: Sequence[int]) -> None:
        for s, conf in self.confs.items():
            conf.prepare([t for t in indices if self.owner.get(int(t)) == s])

    def computed(self) -> List[int]:
        return sorted(t for s, c in self.confs.items() for t in c.computed() if self.owner.get(t) == s)

    def dense(self) -> np.ndarray:
        first = next(iter(self.confs.values()))
        out = np.zeros((self.n, first.frame.H, first.frame.W), dtype=np.float32)
        for t in self.computed():
            out[t] = self.confs[self.owner[t]].maps[t]
        return out


class GapConfidence:
    """A target's confidence for walks between supports (volume.gap_confidence): slice t between
    supports s1 < t < s2 gets the nearer support's map ("nearest") or both maps weighted by the
    distance ("blend"); on a support and beyond the outermost ones, that support's own map.
    Shared by every walk of the target (SliceConfidence's interface for the walk)."""

    def __init__(self, confs: Dict[int, SliceConfidence], mode: str = "blend"):
        self.confs, self.mode = confs, mode
        self.order = sorted(confs)

    def weights(self, t: int) -> Dict[int, float]:
        order = self.order
        if t <= order[0]:
            return {order[0]: 1.0}
        if t >= order[-1]:
            return {order[-1]: 1.0}
        i = bisect.bisect_right(order, t)
        s1, s2 = order[i - 1], order[i]
        if t == s1:
            return {s1: 1.0}
        w2 = (t - s1) / float(s2 - s1)
        if self.mode == "nearest":
            return {s1 if w2 <= 0.5 else s2: 1.0}
        return {s1: 1.0 - w2, s2: w2}

    def prepare(self, indices: Sequence[int]) -> None:
        for s, conf in self.confs.items():
            conf.prepare([t for t in indices if s in self.weights(int(t))])

    def __getitem__(self, t: int) -> np.ndarray:
        w = self.weights(int(t))
        if len(w) == 1:
            (s, _), = w.items()
            return self.confs[s][t]
        out = sum(np.float32(wt) * self.confs[s][t] for s, wt in w.items())
        return np.asarray(out, dtype=np.float32)
