"""Masks between two decoded slices, by shape-based interpolation (thin-slice volumes).

On a volume whose slices are much thinner than an organ changes, the walk decodes every n-th
slice (config.VolumeConfig.walk_spacing_mm) and the slices between two decoded masks are filled
by interpolating their signed distance maps (Raya and Udupa's shape-based interpolation, the
idea behind Slicer's "Fill between slices"): a pixel is inside at fraction w of the way from a
to b when (1 - w) x d_a + w x d_b < 0, d being the signed distance to the mask's edge (negative
inside), in millimetres of the slice's pixel spacing. Both masks are first moved onto the centroid
the intermediate slice should have (w of the way from a's to b's): a shape that shifts by more
than its size between the two slices is carried along instead of vanishing halfway.
"""
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage


def signed_distance(mask: np.ndarray, spacing_rc: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """(H, W) bool -> (H, W) float32: distance to the edge, negative inside, positive outside."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    if mask.all():
        return np.full(mask.shape, -np.inf, np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_rc)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_rc)
    return (outside - inside).astype(np.float32)


def between(a: np.ndarray, b: np.ndarray, n: int, spacing_rc: Sequence[float] = (1.0, 1.0),
            only: Optional[Sequence[int]] = None) -> List[np.ndarray]:
    """The n masks between a and b (exclusive), evenly spaced: [(H, W) bool] * n; with `only`
    (positions 1..n), just those masks, in that order (each one costs two distance maps)."""
    if n <= 0:
        return []
    positions = list(range(1, n + 1)) if only is None else list(only)
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        return [np.zeros(a.shape, bool) for _ in positions]
    ca, cb = np.argwhere(a).mean(axis=0), np.argwhere(b).mean(axis=0)
    out = []
    for i in positions:
        w = i / (n + 1.0)
        da = signed_distance(shift_mask(a, w * (cb - ca)), spacing_rc)
        db = signed_distance(shift_mask(b, (w - 1.0) * (cb - ca)), spacing_rc)
        with np.errstate(invalid="ignore"):         # inf - inf where a moved mask left the slice
            blend = (1.0 - w) * da + w * db
        out.append(np.nan_to_num(blend, nan=1.0) < 0.0)
    return out


def shift_mask(mask: np.ndarray, shift_rc) -> np.ndarray:
    """The mask moved by shift_rc (rows, columns), rounded to whole pixels, nothing wrapping round
    (also the walk's drift: walk._Context.decode)."""
    dr, dc = (int(round(float(v))) for v in shift_rc)
    if dr == 0 and dc == 0:
        return mask
    return ndimage.shift(mask.astype(np.uint8), (dr, dc), order=0, mode="constant", cval=0).astype(bool)
