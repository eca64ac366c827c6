"""How a slice is laid out: as viewers draw it, and as the encoders are given it.

The encoders see a slice as a 2D array, and the walk's decisions follow what they see: the same volume
stored another way segments differently. The development sets stored with each slice's two in-plane
axes exchanged scored 0.040 / 0.014 / 0.012 lower (CHAOS / ACDC / cmr_bssfp whole-volume Dice;
docs/research.md, "A slice's in-plane layout"). A volume's direction says which array axis a viewer
draws vertically, and every development volume is stored with its rows along that axis; so a session
that knows its volume's direction gives the encoders each slice with its rows along it, however the
volume is stored, and brings the results back to the stored layout. A volume stored as the
development volumes are is untouched.

The sense of an axial slice is turned as well (rows_reversed, columns_reversed): the encoders are given it
posterior side up with the patient's right in column 0, as CHAOS and BTCV are stored (CHAOS upside down:
0.892 against 0.918; mirrored: 0.880; BTCV's four large organs mirrored: 0.931 against 0.949). A DICOM
series (anterior side up, as viewers draw it) has its rows reversed, a NIfTI stored RAS its columns.
Coronal, sagittal and oblique slices keep their sense: nothing measured says which suits them. A header that
does not say where its volume lies (known_direction: a diagonal direction at origin 0, as BTCV's and ACDC's
copies carry) gives no direction at all, and its slices go as stored.

`direction` is ITK's 3x3 direction (LPS, row-major: column c is the world direction of index axis c,
i, j, k). A RAS direction (Slicer's IJK-to-RAS without its spacing) must be turned into LPS first (its
first two rows negated: SynPoSlicerLib.mrml.direction_lps), as the sense of the anterior-posterior axis counts.
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


def _axial_vectors(direction, axis: int, swap):
    """(LPS vector of the encoders' rows, of their columns) for axial slices within MAX_TILT_DEGREES of
    the axial plane, else None (coronal, sagittal, oblique slices, no direction)."""
    if direction is None:
        return None
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    rows_axis, cols_axis, right, down = _drawn_axes(d, axis)
    if right != (1, 0, 0) or down != (0, 1, 0):          # not an axial slice
        return None
    rows_vec = d[:, 2 - (cols_axis if swap else rows_axis)]
    cols_vec = d[:, 2 - (rows_axis if swap else cols_axis)]
    near = np.cos(np.deg2rad(MAX_TILT_DEGREES))
    if abs(rows_vec[1]) < near or abs(cols_vec[0]) < near:
        return None
    return rows_vec, cols_vec


def rows_reversed(direction: Optional[Sequence[float]], axis: int, swap: Optional[Tuple[int, int]]) -> bool:
    """Whether the slices across `axis` (their axes `swap` exchanged first) are to be given to the
    encoders upside down: axial slices stored with row 0 anterior (DICOM's layout, as viewers draw them),
    turned posterior side up, as every development volume whose header says where it lies is stored (and
    BTCV's anatomy: docs/research.md, "A slice's in-plane layout"). CHAOS's MR stored anterior side up scores
    0.892 against 0.918. Coronal, sagittal and oblique slices (more than MAX_TILT_DEGREES off) are left as
    stored: nothing measured says which way suits them."""
    vectors = _axial_vectors(direction, axis, swap)
    return vectors is not None and bool(vectors[0][1] > 0)     # rows run towards posterior: row 0 anterior


def columns_reversed(direction: Optional[Sequence[float]], axis: int, swap: Optional[Tuple[int, int]]) -> bool:
    """Whether the axial slices across `axis` are to be given to the encoders mirrored: stored with column 0
    on the patient's left (a RAS-stored NIfTI), turned to the patient's right in column 0, as DICOM stores
    and viewers draw them (radiological), and as CHAOS and BTCV are stored (CHAOS mirrored: 0.880 against
    0.918; BTCV's liver, kidneys and spleen 0.931 against 0.949; the bundled CT, stored RAS, 0.9252 mirrored
    against 0.9248). Other slices as rows_reversed."""
    vectors = _axial_vectors(direction, axis, swap)
    return vectors is not None and bool(vectors[1][0] < 0)     # columns run towards the right (LPS -x)


def known_direction(direction: Optional[Sequence[float]], origin: Optional[Sequence[float]]):
    """`direction`, or None where a header does not say where the volume lies: a diagonal direction (each
    index axis along its own world axis, either way) with the origin at 0 is what a writer puts when it
    knows nothing (ITK's default, nibabel's np.eye(4): BTCV's and ACDC's copies here, whose anatomy BTCV's
    puts upside down). A client sends the server this, and gives it to a Session, so that such a volume's
    slices go to the encoders as stored. (Axes exchanged, or any tilt, say something: kept.)"""
    if direction is None:
        return None
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    diagonal = np.allclose(d - np.diag(np.diag(d)), 0.0, atol=1e-6)
    if origin is not None and diagonal and np.allclose(np.asarray(origin, dtype=float), 0.0, atol=1e-6):
        return None
    return tuple(float(x) for x in d.ravel())


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the slices across `axis` of a [k, j, i] volume go to the encoders: the array axes `swap`
    exchanged (in_plane_swap), then each slice's rows reversed (`flip`: rows_reversed) and its columns
    (`mirror`: columns_reversed). `rows`, `cols`: a slice's height and width in the encoders' layout.
    Points are (x = column, y = row) with pixel centres at integers; boxes (x0, y0, x1, y1) with x1, y1
    one past the last pixel (prompts.box_of). The identity when all three are off."""
    axis: int
    swap: Optional[Tuple[int, int]] = None
    flip: bool = False
    rows: int = 0
    mirror: bool = False
    cols: int = 0

    @property
    def identity(self) -> bool:
        return self.swap is None and not self.flip and not self.mirror

    @property
    def key(self):
        """What two volumes' layouts must share for one's slice embeddings to stand for the other's."""
        return (None if self.swap is None else tuple(self.swap), self.flip, self.mirror)

    def _reversed_axes(self) -> Tuple[int, ...]:
        """The array axes reversed in the encoders' layout (the same before and after the swap)."""
        rows_axis, cols_axis = [a for a in range(3) if a != self.axis]
        return tuple(a for a, on in ((rows_axis, self.flip), (cols_axis, self.mirror)) if on)

    def volume(self, array: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """A [k, j, i] array (or None) as the encoders take it (a view, or a copy where rows are reversed)."""
        if array is None or self.identity:
            return array
        if self.swap is not None:
            array = np.swapaxes(array, *self.swap)
        # (a reversed view has negative strides, which torch.from_numpy refuses: a copy)
        flipped = self._reversed_axes()
        return np.ascontiguousarray(np.flip(array, flipped)) if flipped else array

    def volume_back(self, array: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """An array in the encoders' layout back in the stored one (contiguous; itself for the identity)."""
        if array is None or self.identity:
            return array
        flipped = self._reversed_axes()
        if flipped:
            array = np.flip(array, flipped)
        return np.ascontiguousarray(array if self.swap is None else np.swapaxes(array, *self.swap))

    def spacing(self, spacing_ijk: Sequence[float]) -> Tuple[float, ...]:
        """The (i, j, k) spacing in the encoders' layout (a reversal keeps it)."""
        return swap_spacing(spacing_ijk, self.swap)

    def mask(self, m: np.ndarray) -> np.ndarray:
        """A slice's (H, W) array, stored layout -> the encoders'."""
        m = m.T if self.swap is not None else m
        return np.ascontiguousarray(m[::-1 if self.flip else 1, ::-1 if self.mirror else 1])

    def mask_back(self, m: np.ndarray) -> np.ndarray:
        """A slice's array, the encoders' layout -> stored."""
        m = m[::-1 if self.flip else 1, ::-1 if self.mirror else 1]
        return np.ascontiguousarray(m.T if self.swap is not None else m)

    def masks(self, by_slice: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
        return by_slice if self.identity else {t: self.mask(m) for t, m in by_slice.items()}

    def masks_back(self, by_slice: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
        return by_slice if self.identity else {t: self.mask_back(m) for t, m in by_slice.items()}

    def points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) points (x, y), stored layout -> the encoders'."""
        p = np.asarray(points, dtype=float).reshape(-1, 2)
        p = p[:, ::-1] if self.swap is not None else p
        return np.stack([self.cols - 1 - p[:, 0] if self.mirror else p[:, 0],
                         self.rows - 1 - p[:, 1] if self.flip else p[:, 1]], axis=1)

    def _point_back(self, p):
        x, y = (self.cols - 1 - p[0]) if self.mirror else p[0], (self.rows - 1 - p[1]) if self.flip else p[1]
        return [y, x] if self.swap is not None else [x, y]

    def _box_back(self, box):
        if box is None:
            return None
        x0, y0, x1, y1 = box
        if self.flip:
            y0, y1 = self.rows - y1, self.rows - y0
        if self.mirror:
            x0, x1 = self.cols - x1, self.cols - x0
        return [y0, x0, y1, x1] if self.swap is not None else [x0, y0, x1, y1]

    def record_back(self, record):
        """A SliceRecord with its points and box in the stored layout."""
        if self.identity:
            return record
        return dataclasses.replace(record, positive=[self._point_back(p) for p in record.positive],
                                   negative=[self._point_back(p) for p in record.negative],
                                   box=self._box_back(record.box))

    def report_back(self, on_slice):
        """A walk's slice report (walk.SliceReport) in the stored layout, for a run in the encoders' layout."""
        if on_slice is None or self.identity:
            return on_slice
        return lambda record, mask: on_slice(self.record_back(record), None if mask is None else self.mask_back(mask))

    def result_back(self, result):
        """A VolumeResult computed in the encoders' layout, in the stored one: its label and confidence
        volumes, its records' points and boxes, its per-slice masks (trimmed, grown, overridden). Slice
        indices and the support are the same in both."""
        if self.identity:
            return result
        return dataclasses.replace(
            result, labels=self.volume_back(result.labels),
            confidence={v: self.volume_back(c) for v, c in result.confidence.items()},
            records=[self.record_back(r) for r in result.records],
            trimmed={v: self.masks_back(d) for v, d in result.trimmed.items()}, grown=self.masks_back(result.grown),
            overridden={v: self.masks_back(d) for v, d in result.overridden.items()})


def in_plane_layout(direction: Optional[Sequence[float]], axis: int, shape: Sequence[int]) -> Layout:
    """The Layout of the slices across `axis` of a volume of `shape` ([k, j, i]) with this direction."""
    swap = in_plane_swap(direction, axis)
    rows_axis, cols_axis = [a for a in range(3) if a != axis]
    return Layout(axis, swap, rows_reversed(direction, axis, swap), int(shape[cols_axis if swap else rows_axis]),
                  columns_reversed(direction, axis, swap), int(shape[rows_axis if swap else cols_axis]))
