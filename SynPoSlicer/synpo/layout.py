"""How a slice is laid out: as viewers draw it, and as the encoders are given it.

The encoders see a slice as a 2D array, and the walk's decisions follow what they see: the same volume
stored another way segments differently. The development sets stored with each slice's two in-plane
axes exchanged scored 0.040 / 0.014 / 0.012 lower (CHAOS / ACDC / cmr_bssfp whole-volume Dice;
docs/research.md, "A slice's in-plane layout"). A volume's direction says which array axis a viewer
draws vertically, and every development volume is stored with its rows along that axis; so a session
that knows its volume's direction gives the encoders each slice with its rows along it, however the
volume is stored, and brings the results back to the stored layout. A volume stored as the
development volumes are is untouched.

The sense of each axis (a slice stored upside down or mirrored) is left as stored, although it
matters as well (a slice turned 180 degrees: cmr_bssfp -0.026, ACDC -0.009): the development copies'
directions do not all say which way is up (BTCV's identity direction puts its anatomy upside down),
so a rule on the sense would turn volumes that are right as stored.

`direction` is ITK's 3x3 direction (LPS, row-major: column c is the world direction of index axis c,
i, j, k); a RAS direction (Slicer's IJK-to-RAS without its spacing) gives the same layout, as only the
axes' alignment counts here.
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def check_direction(direction) -> Tuple[float, ...]:
    """`direction` as 9 floats (ValueError with what is wrong: not 9 finite numbers, or not a rotation
    up to reflection: columns not of unit length and orthogonal within 1e-3)."""
    try:
        d = np.asarray(direction, dtype=float).reshape(3, 3)
    except (TypeError, ValueError):
        raise ValueError("the direction must be 9 numbers (a 3x3 matrix, row-major), not %r" % (direction,)) from None
    if not np.all(np.isfinite(d)):
        raise ValueError("the direction must be finite numbers")
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise ValueError("the direction's columns must be orthogonal unit vectors (a rotation or a reflection)")
    return tuple(float(x) for x in d.ravel())


def _drawn_axes(d: np.ndarray, axis: int):
    """(rows axis, columns axis, LPS vector drawn rightwards, LPS vector drawn downwards) of the slices
    across array axis `axis`, by the anatomical plane nearest to them (display_orientation)."""
    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    normal = int(np.argmax(np.abs(d[:, 2 - axis])))    # 0: x (sagittal), 1: y (coronal), 2: z (axial)
    right, down = {2: ((1, 0, 0), (0, 1, 0)), 1: ((1, 0, 0), (0, 0, -1)), 0: ((0, 1, 0), (0, 0, -1))}[normal]
    return rows_axis, cols_axis, right, down


def display_orientation(direction, axis: int):
    """How a slice across array axis `axis` of [k, j, i] is drawn as viewers draw it: returns
    (transpose, flip_x, flip_y) for an image whose rows are the slice's first in-plane axis.

    Axial slices with anterior up and the patient's right on the image's left (radiological
    convention, as 3D Slicer), coronal with superior up and the right on the left, sagittal with
    superior up and anterior on the left; `direction` is ITK's 3x3 (LPS) direction, row-major."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    rows_axis, cols_axis, right, down = _drawn_axes(d, axis)
    col_vec, row_vec = d[:, 2 - cols_axis], d[:, 2 - rows_axis]    # LPS vector of array axis a: column 2 - a
    transpose = bool(abs(np.dot(row_vec, right)) > abs(np.dot(col_vec, right)))
    if transpose:
        col_vec, row_vec = row_vec, col_vec
    return transpose, bool(np.dot(col_vec, right) < 0), bool(np.dot(row_vec, down) < 0)


# A slice is turned only when its stored axes lie within this angle of the displayed ones (exchanged):
# an oblique plane (a cardiac short axis) has no clear up, and a rule on the nearest anatomical plane
# would turn it or not on a few degrees of its planning (cmr_bssfp's j-slices lie 42-46 degrees off).
MAX_TILT_DEGREES = 30.0


def in_plane_swap(direction: Optional[Sequence[float]], axis: int) -> Optional[Tuple[int, int]]:
    """The two array axes of [k, j, i] to swap so that the slices across `axis` have their rows along
    the axis viewers draw vertically (display_orientation's transpose), or None: already so, no
    direction known, or a plane oblique by more than MAX_TILT_DEGREES (the slices as stored).
    Swapping two axes other than `axis` keeps the slicing axis where it is, and slice t the same slice."""
    if direction is None:
        return None
    if not display_orientation(direction, axis)[0]:
        return None
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    rows_axis, cols_axis, right, down = _drawn_axes(d, axis)
    near = np.cos(np.deg2rad(MAX_TILT_DEGREES))
    if abs(np.dot(d[:, 2 - rows_axis], right)) < near or abs(np.dot(d[:, 2 - cols_axis], down)) < near:
        return None
    return rows_axis, cols_axis


def swap_spacing(spacing_ijk: Sequence[float], swap: Optional[Tuple[int, int]]) -> Tuple[float, ...]:
    """The (i, j, k) spacing of the volume with array axes `swap` of [k, j, i] exchanged."""
    s = [float(x) for x in spacing_ijk]
    if swap is not None:
        a, b = 2 - swap[0], 2 - swap[1]
        s[a], s[b] = s[b], s[a]
    return tuple(s)


def swapped(array: Optional[np.ndarray], swap: Optional[Tuple[int, int]]) -> Optional[np.ndarray]:
    """`array` ([k, j, i], or None) with array axes `swap` exchanged (a view; itself when no swap)."""
    return array if array is None or swap is None else np.swapaxes(array, *swap)


def swapped_masks(by_slice: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
    """{slice: (H, W) mask} in the other layout: each slice's mask transposed. (Slice t across the
    axis is the same slice in both layouts; its 2D array is the other's transpose.)"""
    return {t: np.ascontiguousarray(m.T) for t, m in by_slice.items()}


def swapped_record(record):
    """A SliceRecord with its points (x = column, y = row) and box (x0, y0, x1, y1) in the other layout."""
    box = record.box
    return dataclasses.replace(
        record, positive=[[p[1], p[0]] for p in record.positive], negative=[[p[1], p[0]] for p in record.negative],
        box=None if box is None else [box[1], box[0], box[3], box[2]])


def swapped_report(on_slice, swap: Optional[Tuple[int, int]]):
    """A walk's slice report (walk.SliceReport) in the stored layout, for a run in the encoders' layout."""
    if on_slice is None or swap is None:
        return on_slice
    return lambda record, mask: on_slice(swapped_record(record), None if mask is None else mask.T)


def swapped_result(result, swap: Optional[Tuple[int, int]]):
    """A VolumeResult of the volume with array axes `swap` exchanged, in the stored layout: its label
    and confidence volumes, its records' points and boxes, its per-slice masks (trimmed, grown,
    overridden). Slice indices and the support are the same in both."""
    if swap is None:
        return result
    back = lambda a: np.ascontiguousarray(swapped(a, swap))
    return dataclasses.replace(
        result, labels=back(result.labels), confidence={v: back(c) for v, c in result.confidence.items()},
        records=[swapped_record(r) for r in result.records],
        trimmed={v: swapped_masks(d) for v, d in result.trimmed.items()}, grown=swapped_masks(result.grown),
        overridden={v: swapped_masks(d) for v, d in result.overridden.items()})
