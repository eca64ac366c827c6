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


def _is_sparse(indices: np.ndarray) -> bool:
    """Painted slices count as separate supports: one or two, no two adjacent, or at most half the span."""
    if len(indices) <= 2 or np.all(np.diff(indices) > 1):
        return True
    span = int(indices[-1] - indices[0] + 1)
    return len(indices) <= span // 2


def find_support(label: np.ndarray, axis: Optional[int] = None) -> Support:
    """Find the axis across which the paint is confined and the painted slices.

    axis: the slicing axis when it is known (the first support's, for corrections): then every
    painted slice across it is a support slice, adjacent ones included.
    Raises InputError for empty paint or paint not confined to parallel slices.
    """
    if label.ndim != 3:
        raise InputError("support label is %dD; a 3D label map is needed" % label.ndim)
    if np.any(label < 0):
        raise InputError("support label has negative values; label values must be >= 0")
    painted = label != 0
    if not painted.any():
        raise InputError("support label is empty: paint the target on one slice (no non-zero voxel found)")
    labels = sorted(int(v) for v in np.unique(label[painted]))
    if axis is not None:
        if axis not in (0, 1, 2):
            raise InputError("the slicing axis must be 0, 1 or 2 (k, j, i), not %r" % (axis,))
        return Support(axis=int(axis), labels=labels,
                       slices={v: [int(s) for s in _occupied(label == v, axis)] for v in labels})
    counts = [len(_occupied(painted, a)) for a in range(3)]
    # An axis qualifies when each label's paint is confined to separate slices across it.
    candidates = [a for a in np.argsort(counts, kind="stable")
                  if all(_is_sparse(_occupied(label == v, a)) for v in labels)]
    if not candidates:
        raise InputError(
            "support paint is not confined to parallel slices (it covers %s consecutive slices along "
            "k, j, i): paint the target on one slice, or on a few separate parallel slices"
            % "/".join(str(c) for c in counts))
    axis = int(candidates[0])
    slices = {v: [int(s) for s in _occupied(label == v, axis)] for v in labels}
    return Support(axis=axis, labels=labels, slices=slices)


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """View of the volume with the slicing axis first: result[s] is slice s (2D)."""
    return np.moveaxis(volume, axis, 0)


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(stack, 0, axis)


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
