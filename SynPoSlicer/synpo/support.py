"""Reading the user's paint: the slicing axis, the support slices and the targets."""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np

from .errors import InputError

AXIS_NAMES = {0: "k (axial for a standard scan)", 1: "j (coronal)", 2: "i (sagittal)"}


@dataclass(frozen=True)
class Support:
    axis: int                         # array axis of label[k, j, i] across which the paint lies
    labels: List[int]                 # target label values, ascending
    slices: Dict[int, List[int]]      # label -> support slice indices along `axis`


def _occupied(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(mask.any(axis=other))


def _plane_across(mask: np.ndarray, other: int, axis: int, min_side: int = 3) -> Optional[int]:
    """The first slice across `other` holding a painted plane 1 voxel thick across `other` (nothing
    painted on either side of it), at least `min_side` voxels on each of at least `min_side`
    consecutive slices across `axis`: a slice painted across `other` inside paint across `axis`.
    None when there is none (paint on slices across `axis`, adjacent or not, has no such plane
    unless the organ is 1 voxel thin there over 3 slices)."""
    lone = mask.copy()
    before = [slice(None)] * 3
    after = [slice(None)] * 3
    before[other], after[other] = slice(0, -1), slice(1, None)
    lone[tuple(before)] &= ~mask[tuple(after)]
    lone[tuple(after)] &= ~mask[tuple(before)]
    stack = np.moveaxis(lone, (other, axis), (0, 1))       # [slice across other, slice across axis, rest]
    rows = stack.sum(axis=2) >= min_side                   # [other, axis]: enough lone voxels
    for s in np.flatnonzero(rows.sum(axis=1) >= min_side):
        run = best = 0
        for hit in rows[s]:
            run = run + 1 if hit else 0
            best = max(best, run)
        if best >= min_side:
            return int(s)
    return None


def _axis_list(axes: List[int]) -> str:
    names = ["kji"[a] for a in axes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


LABEL_MAX = int(np.iinfo(np.int32).max)      # the assembled label map is int32 (assembly)


def find_support(label: np.ndarray, axis: Optional[int] = None) -> Support:
    """Find the slicing axis and the painted slices.

    The slicing axis is the one across which the paint is thinnest: the fewest painted slices,
    counted per label and summed (adjacent slices, organs painted on neighbouring slices and an
    organ painted on every one of its slices all qualify). Refused when two axes tie (a dot or a
    line: the orientation cannot be told; the message names the tied axes), and when a label is
    also painted on a slice across another axis (two crossing planes).

    axis: the slicing axis when it is known (the first support's, for corrections): then every
    painted slice across it is a support slice.
    Raises InputError for empty, ambiguous or crossing paint.
    """
    if label.ndim != 3:
        raise InputError("support label is %dD; a 3D label map is needed" % label.ndim)
    if np.any(label < 0):
        raise InputError("support label has negative values; label values must be >= 0")
    painted = label != 0
    if not painted.any():
        raise InputError("support label is empty: paint the target on one slice (no non-zero voxel found)")
    labels = sorted(int(v) for v in np.unique(label[painted]))
    if labels[-1] > LABEL_MAX:
        raise InputError("support label value %d is too large; label values must be at most %d"
                         % (labels[-1], LABEL_MAX))
    if axis is not None:
        if axis not in (0, 1, 2):
            raise InputError("the slicing axis must be 0, 1 or 2 (k, j, i), not %r" % (axis,))
        return Support(axis=int(axis), labels=labels,
                       slices={v: [int(s) for s in _occupied(label == v, axis)] for v in labels})
    masks, occupied = {}, {}
    for v in labels:                   # each label's paint cropped to its bounding box
        m = label == v
        occupied[v] = [_occupied(m, a) for a in range(3)]
        masks[v] = m[tuple(slice(o[0], o[-1] + 1) for o in occupied[v])]
    counts = [sum(len(occupied[v][a]) for v in labels) for a in range(3)]
    tied = [a for a in range(3) if counts[a] == min(counts)]
    if len(tied) > 1:
        raise InputError(
            "support paint is ambiguous: it lies on as many slices across %s (%d; %s painted slices along "
            "k, j, i), so the slicing axis cannot be told: paint the target as a 2D region on one slice, "
            "or on a few parallel slices" % (_axis_list(tied), counts[tied[0]], "/".join(map(str, counts))))
    axis = tied[0]
    for v in labels:
        for other in (a for a in range(3) if a != axis):
            s = _plane_across(masks[v], other, axis)
            if s is not None:
                raise InputError(
                    "support paint is not confined to parallel slices: it is thinnest across %s (%s painted "
                    "slices along k, j, i) but label %d is also painted on slice %d across %s: paint the "
                    "target on one slice, or on a few parallel slices"
                    % ("kji"[axis], "/".join(map(str, counts)), v, s + int(occupied[v][other][0]), "kji"[other]))
    slices = {v: [int(s) for s in occupied[v][axis]] for v in labels}
    return Support(axis=axis, labels=labels, slices=slices)


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """View of the volume with the slicing axis first: result[s] is slice s (2D)."""
    return np.moveaxis(volume, axis, 0)


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(stack, 0, axis)


def merge_corrections(support: np.ndarray, marks: Dict[int, Iterable[int]], paint: Optional[np.ndarray],
                      absent: Optional[Dict[int, Iterable[int]]], axis: int):
    """The support and the absent marks after corrections, as a session holds them
    (Session.add_support; the module re-creating a session the server ended, SynPoSlicerLib.logic).

    support: (K, J, I) integer labels, the paint so far; marks: {label: slices} absent so far;
    paint: (K, J, I) labels painted on some slices across `axis` (or None): on each slice where it
    holds a label, that label's paint there replaces its old support paint, and the label's absent
    mark on that slice goes; absent: {label: slices} newly marked absent: each takes the label's paint
    off its slice. Returns (merged support (K, J, I), {label: sorted slices}); the inputs are not changed."""
    merged = np.array(support, copy=True)
    out = {int(v): set(int(t) for t in s) for v, s in (marks or {}).items()}
    if paint is not None:
        merged = merged.astype(np.result_type(merged.dtype, paint.dtype), copy=False)
        m, p = to_slices(merged, axis), to_slices(paint, axis)
        for v in (int(x) for x in np.unique(paint) if x != 0):
            for s in np.flatnonzero((p == v).reshape(len(p), -1).any(1)):
                m[s][m[s] == v] = 0
                m[s][p[s] == v] = v
                out.get(v, set()).discard(int(s))
    m = to_slices(merged, axis)
    for v, slices in (absent or {}).items():
        for s in slices:
            if 0 <= int(s) < len(m):
                m[int(s)][m[int(s)] == int(v)] = 0
        out.setdefault(int(v), set()).update(int(s) for s in slices)
    return merged, {v: sorted(s) for v, s in out.items() if s}


def fit_slices(volume: np.ndarray, axis: int, shape_rc, order: int) -> np.ndarray:
    """`volume` ([k, j, i]) with each slice across `axis` resized to shape_rc (rows, cols), pixel
    centres mapped onto pixel centres: order 1 (bilinear, float32) for an image, 0 (nearest) for a
    label map (its values kept). Another patient's support image (synpo segment --support-image, a
    cohort's reference) is taken to the query's slice size this way: the encoders see each slice
    resized to their own input size anyway, and the pixel grid, not the spacing, is what the
    cross-patient start compared before (slices of one size with other spacings were taken as they are)."""
    stack = to_slices(volume, axis)
    n, h, w = stack.shape
    rows, cols = int(shape_rc[0]), int(shape_rc[1])
    r = np.clip((np.arange(rows) + 0.5) * h / rows - 0.5, 0, h - 1)
    c = np.clip((np.arange(cols) + 0.5) * w / cols - 0.5, 0, w - 1)
    if order == 0:
        ri, ci = np.round(r).astype(np.intp), np.round(c).astype(np.intp)
        out = stack[:, ri[:, None], ci[None, :]]
    else:
        r0, c0 = np.floor(r).astype(np.intp), np.floor(c).astype(np.intp)
        r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
        fr, fc = (r - r0).astype(np.float32)[:, None], (c - c0).astype(np.float32)[None, :]
        x = stack.astype(np.float32, copy=False)
        top = x[:, r0[:, None], c0[None, :]] * (1 - fc) + x[:, r0[:, None], c1[None, :]] * fc
        bottom = x[:, r1[:, None], c0[None, :]] * (1 - fc) + x[:, r1[:, None], c1[None, :]] * fc
        out = top * (1 - fr) + bottom * fr
    return np.ascontiguousarray(from_slices(out, axis))


def fit_support(image: np.ndarray, support_image: np.ndarray, support_label: np.ndarray, support: Support):
    """(support image, support label) with their slices across support.axis at the image's slice
    size (fit_slices; as they are when the sizes agree). InputError when a label's paint is lost in
    the resize (a speck painted on a much larger slice)."""
    axis = support.axis
    want = to_slices(image, axis).shape[1:]
    have = to_slices(support_image, axis).shape[1:]
    if have == want:
        return support_image, support_label
    fitted = fit_slices(support_label, axis, want, 0)
    for v, slices in support.slices.items():
        for s in slices:
            if not (to_slices(fitted, axis)[s] == v).any():
                raise InputError("label %d's paint on slice %d is lost when the support image's slices (%dx%d) are "
                                 "resized to the image's (%dx%d): paint a larger area" % (v, s, have[0], have[1],
                                                                                          want[0], want[1]))
    return fit_slices(support_image, axis, want, 1), fitted


def slice_spacing(spacing_ijk, axis: int) -> float:
    """The spacing between slices taken across array axis `axis` of [k, j, i]."""
    return float(tuple(reversed(tuple(spacing_ijk)))[axis])


def in_plane_spacing(spacing_ijk, axis: int):
    """(row, column) pixel spacing of a slice taken across array axis `axis` of [k, j, i]."""
    spacing_kji = tuple(reversed(tuple(spacing_ijk)))
    rest = [spacing_kji[a] for a in range(3) if a != axis]
    return float(rest[0]), float(rest[1])


def absent_marks(marks: Optional[Dict[int, Iterable[int]]], support: Support, n: int) -> Dict[int, List[int]]:
    """{label: sorted slices where the user says the label is absent}, checked against the support:
    a mark for a label that is not painted, a slice outside the volume, or a slice where the same
    label is painted, is refused."""
    out: Dict[int, List[int]] = {}
    for label, slices in (marks or {}).items():
        label = int(label)
        if label not in support.labels:
            raise InputError("slices marked absent for label %d, which is not painted in the support" % label)
        slices = sorted({int(s) for s in slices})
        bad = [s for s in slices if not 0 <= s < n]
        if bad:
            raise InputError("slice %d marked absent for label %d is outside the volume (0..%d)" % (bad[0], label, n - 1))
        both = sorted(set(slices) & set(support.slices[label]))
        if both:
            raise InputError("slice %d is both painted and marked absent for label %d" % (both[0], label))
        if slices:
            out[label] = slices
    return out


def absent_from_map(marks: np.ndarray, axis: int) -> Dict[int, List[int]]:
    """A label map of absent marks -> {label: slices}: any voxel of value v on slice s (across
    `axis`) says "label v is absent on slice s"."""
    out: Dict[int, List[int]] = {}
    for v in (int(x) for x in np.unique(marks) if x != 0):
        out[v] = [int(s) for s in _occupied(marks == v, axis)]
    return out
