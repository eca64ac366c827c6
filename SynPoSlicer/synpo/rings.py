"""Rings: a label painted as a closed band around a hole (the myocardium around the blood pool).
A box drawn around a ring makes SAM segment the bright hole, not the band, so the hole is walked
as a target of its own and the ring is the band of the support's thickness around it (between
two ring supports, the thickness interpolated between theirs), sector by sector around the hole's
centre as thick as the support's wall there (volume.ring_bins: a septum thinner than the free wall)."""
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .decode import fill_holes
from .gate import apply_gate, organ_range
from .ownership import ADDED, LARGER_KEPT
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
    vc = run.cfg.volume
    previous = getattr(run, "previous_reach", None)
    reach = ring_reach(previous, label) if previous is not None and vc.ring_keeps_reach else (None, None)
    outer, conf_outer = run.segment_target(label, sup_idx, filled, records, seconds, reach=reach[0])
    # A support painted without a hole (the base's open band, the apex) says the hole is not there:
    # the hole's walks end on it as on an absent mark, and past it the filled shape's walk stands
    # (cmr_bssfp image_1: the hole walked from slice 6 on past a 95 px paint on slice 10, and the
    # band around it gave slice 11 1128 px against the truth's 95).
    inner, conf_inner = run.segment_target(label, hole_idx, [holes[s] for s in hole_idx], [], seconds,
                                           reach=reach[1], also_absent=[s for s in sup_idx if s not in holes])
    thickness = thickness_along({s: ring_thickness(sup_masks[sup_idx.index(s)], holes[s], run.spacing_rc)
                                 for s in hole_idx}, vc.ring_thickness)
    profile = thickness_along({s: ring_profile(sup_masks[sup_idx.index(s)], holes[s], run.spacing_rc, vc.ring_bins)
                               for s in hole_idx}, vc.ring_thickness) if vc.ring_bins else (lambda t: None)
    # The band's grey values: each slice normalised on its own where the run has them
    # (volume.ring_grey_per_slice: within a volume, MR), else the volume's.
    grey = getattr(run, "ring_grey", None)
    query = run.query if grey is None else grey
    band_range = (run.target_range(sup_idx, sup_masks) if grey is None
                  else organ_range([grey[s] for s in sup_idx], sup_masks, run.cfg.gate))
    fit = (GreyFit(None if run.cross else np.concatenate([(run.ref if grey is None else grey)[s][m]
                                                          for s, m in zip(sup_idx, sup_masks)]),
                   *vc.ring_fit_range, share=vc.ring_fit_share, sectors=vc.ring_fit_sectors)
           if vc.ring_fit_grey else None)

    def band(t: int, hole: np.ndarray) -> np.ndarray:
        return apply_gate(band_around(hole, thickness(t), run.spacing_rc, profile(t), fit, query[t]),
                          query[t], band_range, run.cfg.gate)

    masks = {t: band(t, inner[t]) if t in inner else m for t, m in outer.items()}
    # The band's rule and the slices it stands on, for the assembly (assembly.band_around_enclosed).
    bands = getattr(run, "ring_bands", None)
    if bands is not None:
        bands[label] = (band, sorted(t for t in outer if t in inner))
    # Where the band stands, the filled shape's mask is not the ring's: its note on pixels added
    # between two supports (ownership.add_agreed) does not describe the slice.
    # Nor does its note on the larger of two walks (ownership.prefer_larger): the pixels it counts are
    # the filled shape's.
    for rec in records:
        if rec.index in inner and (ADDED in rec.reason or LARGER_KEPT in rec.reason):
            rec.reason = "; ".join(part for part in rec.reason.split("; ")
                                   if ADDED not in part and LARGER_KEPT not in part)
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


def ring_reach(previous: np.ndarray, label: int):
    """(filled, hole): the previous run's labels (n, H, W) with the ring's filled shape, and with
    its hole, as `label` on every slice (the ring's own band 0 in the second): what a re-run's walks
    of the ring's filled shape and of its hole keep where they end short of the previous run's
    reach (walk.keep_reach, volume.ring_keeps_reach). Another label inside the hole (the blood
    pool's own label) is the ring's there: the filled shape covers it."""
    band = previous == label
    filled = np.zeros_like(band)
    for t in np.flatnonzero(band.any(axis=(1, 2))):
        filled[t] = fill_holes(band[t])
    outer = np.where(filled, label, previous).astype(previous.dtype)
    inner = np.where(filled & ~band, label, np.where(band, 0, previous)).astype(previous.dtype)
    return outer, inner


def ring_parts(masks: Sequence[np.ndarray], min_hole: float):
    """(filled shapes, holes) when every mask is a closed band around a hole of at least
    `min_hole` of its filled area, else None."""
    filled = [fill_holes(m) for m in masks]
    holes = [f & ~m for f, m in zip(filled, masks)]
    if all(h.sum() >= min_hole * max(1, f.sum()) for f, h in zip(filled, holes)):
        return filled, holes
    return None


def thickness_along(each: Dict[int, object], mode: str = "interpolated") -> Callable[[int], object]:
    """Slice index -> the band's thickness (mm) there, from each ring support slice's own
    ({support slice: thickness}): "interpolated" linearly between the two supports around a slice
    and the outermost support's beyond them (a correction painted near the base teaches the
    thickness near the base); "mean" their average on every slice. The same for each support's
    sector profile ({support slice: (bins,) array}, ring_profile): an array per slice."""
    order = sorted(each)
    values = np.array([each[s] for s in order], dtype=float)        # (supports,) or (supports, bins)
    if values.ndim == 1:
        if mode == "mean":
            mean = float(np.mean(values))
            return lambda t: mean
        return lambda t: float(np.interp(t, order, values))
    if mode == "mean":
        profile = values.mean(0)
        return lambda t: profile
    return lambda t: np.array([np.interp(t, order, column) for column in values.T])


def _sector_position(hole: np.ndarray, bins: int) -> np.ndarray:
    """(H, W) each pixel's angle around the hole's centre, in sectors (0..bins), sector b's middle
    at b + 0.5 (angles in pixel rows and columns)."""
    cy, cx = ndimage.center_of_mass(hole)
    yy, xx = np.mgrid[:hole.shape[0], :hole.shape[1]]
    return (np.arctan2(yy - cy, xx - cx) + np.pi) / (2 * np.pi) * bins


def _sector_scale(profile: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(H, W) the profile's value at each pixel's angle, linear between sector middles (cyclic)."""
    bins = len(profile)
    pos = position - 0.5
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    return profile[i0 % bins] * (1.0 - f) + profile[(i0 + 1) % bins] * f


def ring_profile(ring: np.ndarray, hole: np.ndarray, spacing_rc, bins: int) -> np.ndarray:
    """(bins,) one support slice's band thickness in each sector around its hole's centre, relative to
    the ring's uniform thickness (ring_thickness): band_around(hole, T, profile=it) has the ring's
    area at T = ring_thickness. A sector the ring does not reach takes the others' mean."""
    d = ndimage.distance_transform_edt(~hole, sampling=spacing_rc)
    position = _sector_position(hole, bins)
    sector = np.minimum(position.astype(int), bins - 1)
    raw = np.full(bins, np.nan)
    for b in range(bins):
        inside = ring & (sector == b)
        if inside.any():
            raw[b] = np.percentile(d[inside], 90)
    if np.isnan(raw).all():
        return np.ones(bins)
    raw[np.isnan(raw)] = np.nanmean(raw)
    outside = d > 0
    T = _with_area(d[outside], ring.sum())
    if T <= 0:
        return np.ones(bins)
    k = _with_area((d / _sector_scale(raw, position))[outside], ring.sum())   # area(d <= k raw) = ring's
    return raw * k / T


def _with_area(values: np.ndarray, area: int) -> float:
    """The least v with `area` of `values` (one per pixel outside the hole) <= v: the limit whose
    band has the ring's area."""
    v = np.sort(values)
    return float(v[min(len(v), int(area)) - 1])


def ring_thickness(ring: np.ndarray, hole: np.ndarray, spacing_rc) -> float:
    """Thickness (mm) of one support slice's ring: the distance T for which the band around its
    hole (`band_around`) has the ring's area (thickness_along goes from slice to slice)."""
    return _with_area(ndimage.distance_transform_edt(~hole, sampling=spacing_rc)[~hole], ring.sum())


def band_around(hole: np.ndarray, thickness: float, spacing_rc, profile: Optional[np.ndarray] = None,
                fit: Optional["GreyFit"] = None, image: Optional[np.ndarray] = None) -> np.ndarray:
    """The pixels outside `hole` within `thickness` (mm) of it; with a sector profile (ring_profile),
    within thickness x the profile at the pixel's angle around the hole's centre. With a GreyFit and
    the slice's (H, W) image, each sector's outer edge moved to where the wall's grey values end
    (GreyFit.limits)."""
    if not hole.any():
        return hole.copy()
    d = ndimage.distance_transform_edt(~hole, sampling=spacing_rc)
    reach = (np.full(hole.shape, float(thickness)) if profile is None else
             thickness * _sector_scale(np.asarray(profile, float), _sector_position(hole, len(profile))))
    band = (d > 0) & (d <= reach)
    if fit is None or image is None or not band.any():
        return band
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(reach > 0, d / reach, np.inf)          # each pixel's place in the band: 1 at its edge
    return (d > 0) & (r <= fit.limits(hole, d, r, band, image, max(spacing_rc)))


class GreyFit:
    """A ring's outer edge from the slice's grey values (volume.ring_fit_grey): the band of the
    supports' thickness is drawn around the walked hole, but a wall is thicker or thinner from
    slice to slice and side to side than the supports'. In each of `sectors` sectors around the
    hole's centre, the band's outer limit (a fraction r of its reach, the band's own limit, each
    pixel at d / reach) goes out from r = low to at most r = high for as long as at least `share`
    of the pixels it takes in lie in the wall's grey range: the limit is where the running sum of
    (in range - share) over the pixels by r is highest. The wall's grey range is the mean of the
    label's support paint's 5th-95th percentile (the ring's and, where painted, its filled shape's)
    and this slice's (the band's pixels at least two pixels, of the coarser in-plane size, out from
    the hole): the supports' alone drifts with the coil's profile away from them.
    support_values None (supports on another scan, whose grey values are on another scale): this
    slice's alone."""

    def __init__(self, support_values: Optional[np.ndarray], low: float = 0.8, high: float = 1.25,
                 share: float = 0.7, sectors: int = 12, percentiles=(5.0, 95.0)):
        self.percentiles = tuple(percentiles)
        self.range = (None if support_values is None or not len(support_values)
                      else np.percentile(np.asarray(support_values, float), self.percentiles))
        self.low, self.high, self.share, self.sectors = float(low), float(high), float(share), int(sectors)

    def grey_range(self, image: np.ndarray, band: np.ndarray, d: np.ndarray, pixel_mm: float):
        """(low, high) of the wall's grey values on this slice, or None (nothing to go by). pixel_mm:
        the coarser in-plane pixel size: the band's core lies at least two of them out."""
        core = band & (d >= 2.0 * pixel_mm)
        here = np.percentile(image[core], self.percentiles) if core.sum() >= 20 else None
        if here is None:
            return None if self.range is None else tuple(self.range)
        return tuple(here if self.range is None else (self.range + here) / 2.0)

    def limits(self, hole: np.ndarray, d: np.ndarray, r: np.ndarray, band: np.ndarray, image: np.ndarray,
               pixel_mm: float) -> np.ndarray:
        """(H, W) the limit on r (each pixel's distance to the hole, d mm, over the band's reach there)
        that each pixel's sector keeps (one value per sector): the band is r <= it."""
        grey = self.grey_range(image, band, d, pixel_mm)
        if grey is None:
            return np.ones(hole.shape)
        lo, hi = grey
        like = (image >= lo) & (image <= hi)
        sector = np.minimum(_sector_position(hole, self.sectors).astype(int), self.sectors - 1)
        out = np.full(hole.shape, 1.0)
        shell = (d > 0) & (r > self.low) & (r <= self.high)
        for b in range(self.sectors):
            side = sector == b
            if not (band & side).any():
                continue                                   # the band does not reach this side: leave it
            inside = shell & side
            rv = r[inside]
            if not len(rv):
                out[side] = self.low
                continue
            order = np.argsort(rv, kind="stable")
            rv, gain = rv[order], np.where(like[inside][order], 1.0 - self.share, -self.share)
            ends = np.r_[np.flatnonzero(np.diff(rv) > 0), len(rv) - 1]     # the last pixel of each r
            scores = np.r_[0.0, np.cumsum(gain)[ends]]
            limits = np.r_[self.low, rv[ends]]
            out[side] = limits[int(np.argmax(scores))]
        return out
