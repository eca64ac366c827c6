"""Assembly: each label's masks into one label volume (where two labels overlap, the more
confident wins), an enclosed label kept within its encloser, the user's paint kept exactly."""
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .decode import fill_holes
from .result import SliceRecord, VolumeResult
from .support import from_slices


def assemble(run, per_label: list) -> VolumeResult:
    """The VolumeResult of a run (VolumeRun) from its labels' (masks, confidence, records, stage
    seconds, slices computed), in the order of run.support.labels."""
    conf_out: Dict[int, np.ndarray] = {}
    found: Dict[int, Dict[int, np.ndarray]] = {}         # label -> slice -> mask
    records: List[SliceRecord] = []
    computed: set = set()
    for label, (masks, conf, recs, seconds, slices) in zip(run.support.labels, per_label):
        found[label], conf_out[label] = masks, conf
        records += recs
        computed.update(slices)
        for k, v in seconds.items():
            run.timings[k] += v
    vc = run.cfg.volume
    rings = sorted(getattr(run, "rings", {}))
    # Each label's masks as its walks gave them (the steps below replace or drop entries, never
    # change a mask in place): what the assembly overrides of them is kept (VolumeResult.overridden),
    # for the next Update's walks (walk.keep_agreed) when its rule is on; not across patients.
    agree = vc.correction_agree_iou > 0 and vc.correction_keeps_reach and not run.cross
    walked = {label: dict(masks) for label, masks in found.items() if label not in rings} if agree else {}
    enclosing = enclosing_labels(run.paint, run.support.labels)
    if vc.ring_around_enclosed and not run.cross:
        band_around_enclosed(found, getattr(run, "ring_bands", {}), enclosing, run.paint)
    if vc.wall_follow and not run.cross:
        # Before the enclosed labels follow their encloser: a blood pool found where the myocardium's
        # walk ended early still holds the right ventricle there.
        follow_walls(found, records, rings, enclosing, run.paint, run.support.slices)
    if vc.enclosed_follow:
        follow_enclosing(found, records, enclosing, run.support.slices)
    labels_out = _assemble(found, conf_out, (run.n, run.H, run.W), run.support.labels,
                           run.previous_labels)
    if not run.cross:
        # The support slices keep the user's paint exactly: every painted voxel keeps its value.
        for s, p in run.paint.items():
            painted = p != 0
            labels_out[s][painted] = p[painted]
    overridden: Dict[int, Dict[int, np.ndarray]] = {}
    for label, masks in walked.items():
        for t, m in masks.items():
            lost = m & (labels_out[t] != label)
            if lost.any():
                overridden.setdefault(label, {})[t] = lost
    # In the volume as the user gets it (overlaps settled, the paint restored): thin last slices go.
    trimmed = drop_thin_ends(labels_out, records, run.support.labels, run.support.slices, vc.tip_ratio)
    grow = vc.edge_grow and not run.cross and (vc.edge_grow_ct or not str(run.modality).startswith("ct"))
    grown = (grow_edges(labels_out, run.ref, run.paint, run.support.labels, rings, vc.edge_grow_percentiles)
             if grow else {})
    records.sort(key=lambda r: (r.label, r.index))
    axis = run.axis
    conf_out = {v: np.ascontiguousarray(from_slices(c, axis)) if axis else c for v, c in conf_out.items()}
    return VolumeResult(np.ascontiguousarray(from_slices(labels_out, axis)), conf_out, records, run.support,
                        run.modality, list(run.confidence_from), run.timings, sorted(computed), trimmed, grown,
                        overridden)


def band_around_enclosed(found: Dict[int, Dict[int, np.ndarray]], ring_bands: Dict[int, tuple],
                         enclosing: Dict[int, List[int]], paint: Dict[int, np.ndarray]) -> None:
    """A ring's band (rings.ring_label: the band of the supports' thickness around its walked hole)
    drawn around the label it encloses instead (the blood pool within the myocardium), on the slices
    where that label is found or painted: the hole's own walk starts from the ring's supports only,
    the enclosed label's from its own, which a correction may have painted elsewhere
    (volume.ring_around_enclosed). `found` is changed in place."""
    for ring, (band, banded) in ring_bands.items():
        inside = [a for a, encs in enclosing.items() if ring in encs]
        if len(inside) != 1 or ring not in found:
            continue
        a = inside[0]
        for t in banded:
            if t not in found[ring]:
                continue
            hole = found.get(a, {}).get(t)
            if hole is None and t in paint and (paint[t] == a).any():
                hole = paint[t] == a
            if hole is not None and hole.any():
                found[ring][t] = band(t, hole)


def enclosing_labels(paint: Dict[int, np.ndarray], labels: Sequence[int], inside: float = 0.95) -> Dict[int, List[int]]:
    """{label: [labels enclosing it]}: B encloses A when A and B are painted together on at least
    one support slice and, on every such slice, at least `inside` of A's paint lies within B's
    paint with its holes filled (the blood pool within the myocardium's ring)."""
    out: Dict[int, List[int]] = {}
    for a in labels:
        for b in labels:
            if a == b:
                continue
            shared = [p for p in paint.values() if (p == a).any() and (p == b).any()]
            if shared and all(np.logical_and(p == a, fill_holes(p == b)).sum() >= inside * (p == a).sum()
                              for p in shared):
                out.setdefault(a, []).append(b)
    return out


def follow_enclosing(found: Dict[int, Dict[int, np.ndarray]], records: List[SliceRecord],
                     enclosing: Dict[int, List[int]], support_slices: Dict[int, List[int]]) -> None:
    """Drop (in place) an enclosed label's masks on slices where a label enclosing it is neither
    found nor painted; their records become "absent" with the reason."""
    for inner, outers in sorted(enclosing.items(), key=lambda kv: len(kv[1])):
        keep = set.intersection(*[set(found[o]) | set(support_slices[o]) for o in outers])
        dropped = set(found[inner]) - keep
        for t in dropped:
            del found[inner][t]
        mark_absent(records, inner, dropped, "outside label %s" % ", ".join(map(str, outers)))


def follow_walls(found: Dict[int, Dict[int, np.ndarray]], records: List[SliceRecord], rings: Sequence[int],
                 enclosing: Dict[int, List[int]], paint: Dict[int, np.ndarray],
                 support_slices: Dict[int, List[int]], near_px: float = 2.0) -> None:
    """Drop (in place) a label's masks on slices where no wall it lies against is found: a label
    whose paint lies within `near_px` of a ring's mask (or paint) on one of its support slices, and
    is not enclosed by it (the right ventricle against the myocardium), is kept only on slices where
    the ring, or a label the ring encloses (the blood pool), is found or painted; its other records
    become "absent" with the reason (volume.wall_follow). A slice the label is painted on stays."""
    for ring in rings:
        wall = [ring] + [a for a, outers in enclosing.items() if ring in outers]
        present = set()
        for w in wall:
            present |= set(found.get(w, {})) | set(support_slices.get(w, ()))
        for label in found:
            if label in wall or ring in enclosing.get(label, ()):
                continue
            if not any(_near(paint[s] == label, _ring_on(found, paint, ring, s), near_px)
                       for s in support_slices.get(label, ())):
                continue
            dropped = {t for t in found[label] if t not in present and t not in support_slices.get(label, ())}
            for t in dropped:
                del found[label][t]
            mark_absent(records, label, dropped, "beyond label %d, which it lies against" % ring)


def _ring_on(found, paint, ring: int, s: int) -> np.ndarray:
    """The ring's voxels on slice s: its mask there, or its paint."""
    m = found.get(ring, {}).get(s)
    return m if m is not None else paint[s] == ring


def _near(a: np.ndarray, b: np.ndarray, px: float) -> bool:
    """Whether some pixel of a lies within px of b (Euclidean, in pixels)."""
    if not a.any() or not b.any():
        return False
    return bool((ndimage.distance_transform_edt(~b)[a] <= px).any())


def drop_thin_ends(labels_out: np.ndarray, records: List[SliceRecord], labels: Sequence[int],
                   support_slices: Dict[int, List[int]], ratio: float) -> Dict[int, Dict[int, np.ndarray]]:
    """In place, on the assembled label volume (slices first): at each end of a label's extent, a
    slice the label was not painted on that holds under `ratio` of the label's pixels on the slice
    next to it (inwards) is cleared of the label; its record becomes "absent" with the reason. Such
    a last slice is mostly a sliver beyond the organ's end or on a neighbour that kept the contested
    voxels (volume.tip_ratio). Returns {label: {slice: (H, W) bool}}, the voxels taken off."""
    trimmed: Dict[int, Dict[int, np.ndarray]] = {}
    if ratio <= 0:
        return trimmed
    # Every label's pixels per slice in one pass over the volume (not one pass per label).
    values = np.sort(np.asarray(labels, dtype=np.int64))
    counts = np.stack([np.bincount(np.searchsorted(values, t[np.isin(t, values)]), minlength=len(values))
                       for t in labels_out]) if len(values) else np.zeros((len(labels_out), 0), np.int64)
    for label in labels:
        areas = counts[:, int(np.searchsorted(values, label))]
        zs = np.flatnonzero(areas)
        if len(zs) < 2:
            continue
        for end, inward in ((int(zs[0]), int(zs[0]) + 1), (int(zs[-1]), int(zs[-1]) - 1)):
            if end in support_slices.get(label, ()) or not areas[inward] or areas[end] >= ratio * areas[inward]:
                continue
            trimmed.setdefault(label, {})[end] = labels_out[end] == label
            labels_out[end][trimmed[label][end]] = 0
            why = "the label's last slice: %d px, %.2f of the slice before it" % (
                areas[end], areas[end] / areas[inward])
            mark_absent(records, label, {end}, why)
    return trimmed


def grow_edges(labels_out: np.ndarray, images: np.ndarray, paint: Dict[int, np.ndarray], labels: Sequence[int],
               skip: Sequence[int] = (), percentiles=(10.0, 90.0)) -> Dict[int, np.ndarray]:
    """In place, on the assembled label volume (slices first, images the same slices' grey values):
    each label's mask grows by one pixel (4-neighbours) into the background pixels whose grey value
    lies within the percentiles of the label's paint on the nearest support slice. A pixel two labels
    would take stays background; the painted slices and the `skip` labels (rings, whose edge
    rings.GreyFit draws) are left as they are. LiteMedSAM's masks run a little small (between two
    supports the larger of two walks was the better one on 18 of cmr_bssfp's 40 organ-rounds and the
    worse on none), and the rim they miss looks like the organ's paint (volume.edge_grow). Returns
    {slice: (H, W) bool}, the pixels given (VolumeResult.grown: a re-run's walks are judged against
    the labels without them)."""
    ranges, grown = {}, {}                   # label -> {support slice: (low, high)}
    for label in labels:
        if label in skip:
            continue
        values = {s: images[s][p == label] for s, p in paint.items() if (p == label).any()}
        own = {s: np.percentile(v, percentiles) for s, v in values.items() if len(v) >= 20}
        if not own and values:                # only slivers painted: all of them together
            own = {min(values): np.percentile(np.concatenate(list(values.values())), percentiles)}
        if own:
            ranges[label] = own
    if not ranges:
        return grown
    painted = {s: set(int(v) for v in np.unique(p) if v) for s, p in paint.items()}
    for t, slice_labels in enumerate(labels_out):
        present = [v for v in ranges if v not in painted.get(t, ())]
        if not present or not slice_labels.any():
            continue
        free = slice_labels == 0
        claims = np.zeros(free.shape, np.int16)
        winner = np.zeros_like(slice_labels)
        boxes = ndimage.find_objects(slice_labels)            # box of label v at boxes[v - 1]
        H, W = free.shape
        for label in present:
            box = boxes[label - 1] if label - 1 < len(boxes) else None
            if box is None:
                continue
            # The label's box and one pixel round it: the rim lies there.
            r0, r1 = max(box[0].start - 1, 0), min(box[0].stop + 1, H)
            c0, c1 = max(box[1].start - 1, 0), min(box[1].stop + 1, W)
            mask = slice_labels[r0:r1, c0:c1] == label
            # The nearest support's paint (the lower on a tie): MR grey values drift along the volume,
            # and a correction's paint speaks for the slices near it, as its walk does.
            lo, hi = ranges[label][min(ranges[label], key=lambda s: (abs(s - t), s))]
            grey = images[t][r0:r1, c0:c1]
            rim = ndimage.binary_dilation(mask) & free[r0:r1, c0:c1] & (grey >= lo) & (grey <= hi)
            claims[r0:r1, c0:c1] += rim
            winner[r0:r1, c0:c1][rim] = label
        take = claims == 1
        if take.any():
            slice_labels[take] = winner[take]
            grown[t] = take
    return grown


def mark_absent(records: List[SliceRecord], label: int, slices, why: str) -> None:
    """The records of `label` on `slices` become "absent", with the reason `why`."""
    for rec in records:
        if rec.label == label and rec.index in slices:
            rec.status, rec.reason = "absent", why


def _assemble(found: Dict[int, Dict[int, np.ndarray]], conf: Dict[int, np.ndarray], shape, labels,
              previous: Optional[np.ndarray] = None) -> np.ndarray:
    """One label volume from each label's masks; where masks of two labels overlap, the label
    with the higher confidence there wins (uint8 when the labels fit, else int32). With `previous`
    (the last run's label volume, slices first: a re-run after corrections), a voxel two labels
    claim goes to the label that had it in the last run, when that label is one of them
    (volume.overlap_keeps_owner): a correction's walk does not take an accepted neighbour's voxels."""
    out = np.zeros(shape, dtype=np.uint8 if max(labels) < 256 else np.int32)
    for t in sorted({t for masks in found.values() for t in masks}):
        best = None
        claims = np.zeros(shape[1:], dtype=np.int16) if previous is not None else None
        claimed_by_previous = np.zeros(shape[1:], dtype=bool) if previous is not None else None
        for label in labels:
            m = found[label].get(t)
            if m is None:
                continue
            c = np.where(m, conf[label][t], -1.0)
            win = m if best is None else m & (c > best)
            out[t][win] = label
            best = c if best is None else np.maximum(best, c)
            if claims is not None:
                claims += m
                claimed_by_previous |= m & (previous[t] == label)
        if claims is not None:
            keep = (claims > 1) & claimed_by_previous
            out[t][keep] = previous[t][keep]
    return out
