"""Where a target should lie in another patient's slice: a position prior for cross-patient use.

Two patients' organs differ in size and in where the body lies in the field of
view, but they sit at similar places *relative to the body*: the right kidney
on the patient's right, the spleen high on the left. The support mask's box is
expressed in the coordinates of the support slice's body box and mapped into
the query slice's body box, then widened by a margin (a fraction of the query
body's size). Prompts are searched only there, which keeps similar-looking
structures on the other side (left vs right kidney) from being taken. The
support mask carried over by the same mapping (expected_shape) chooses among
confident look-alikes inside that region: the one that covers the carried-over
shape best (the spleen, not the left kidney beneath it).
"""
from typing import Tuple

import numpy as np
from scipy import ndimage

Box = Tuple[int, int, int, int]        # y0, x0, y1, x1 (exclusive)


def body_box(image: np.ndarray, level: float = 0.1) -> Box:
    """Box of the largest connected region brighter than `level` in a [0, 1] slice (the body);
    the whole slice when nothing is."""
    fg = image > level
    labels, n = ndimage.label(fg)
    H, W = image.shape
    if n == 0:
        return 0, 0, H, W
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _body_mapping(support_image: np.ndarray, query_image: np.ndarray):
    """Per axis (rows, columns): (support body start, query body start, query body size,
    query/support body size ratio)."""
    sy0, sx0, sy1, sx1 = body_box(support_image)
    qy0, qx0, qy1, qx1 = body_box(query_image)
    qh, qw = max(1, qy1 - qy0), max(1, qx1 - qx0)
    return (sy0, qy0, qh, qh / max(1, sy1 - sy0)), (sx0, qx0, qw, qw / max(1, sx1 - sx0))


def expected_region(support_mask: np.ndarray, support_image: np.ndarray, query_image: np.ndarray,
                    margin: float) -> np.ndarray:
    """Boolean (H, W) region of the query slice where the support's target is expected."""
    ys, xs = np.nonzero(support_mask)
    H, W = query_image.shape
    region = np.zeros((H, W), dtype=bool)
    if len(ys) == 0:
        region[:] = True
        return region
    (sy0, qy0, qh, ry), (sx0, qx0, qw, rx) = _body_mapping(support_image, query_image)
    y0 = qy0 + (ys.min() - sy0) * ry - margin * qh
    y1 = qy0 + (ys.max() + 1 - sy0) * ry + margin * qh
    x0 = qx0 + (xs.min() - sx0) * rx - margin * qw
    x1 = qx0 + (xs.max() + 1 - sx0) * rx + margin * qw
    r0, r1 = int(np.clip(np.floor(y0), 0, H)), int(np.clip(np.ceil(y1), 0, H))
    c0, c1 = int(np.clip(np.floor(x0), 0, W)), int(np.clip(np.ceil(x1), 0, W))
    region[r0:r1, c0:c1] = True
    return region


def expected_shape(support_mask: np.ndarray, support_image: np.ndarray, query_image: np.ndarray) -> np.ndarray:
    """The support mask carried onto the query slice by the same body-to-body mapping: a
    guess of the target's shape and place (its size may be off by the patients' difference)."""
    (sy0, qy0, _, ry), (sx0, qx0, _, rx) = _body_mapping(support_image, query_image)
    H, W = query_image.shape
    # Nearest-neighbour sampling: each query pixel centre mapped back into the support slice.
    rows = np.floor(sy0 + (np.arange(H) + 0.5 - qy0) / ry).astype(int)
    cols = np.floor(sx0 + (np.arange(W) + 0.5 - qx0) / rx).astype(int)
    h, w = support_mask.shape
    out = np.zeros((H, W), dtype=bool)
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out[np.ix_(ok_r, ok_c)] = support_mask[np.ix_(rows[ok_r], cols[ok_c])]
    return out
