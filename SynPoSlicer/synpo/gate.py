"""Intensity gate: a decoded mask keeps only what looks like the painted organ in grey value.

SAM's embedding is coarse (one cell per 4 x 4 pixels of LiteMedSAM's 256 px input) and the
confidence map fires on neighbours of similar texture, so a mask may run on into a touching
neighbour whose grey value differs from the organ's.
The support says what the organ's grey values are, in the same scan:

1. `organ_range`: the quantiles of the lightly smoothed, normalised image under the support
   masks, widened on each side by `margin` x their distance;
2. `apply_gate`: the pixels of a decoded mask whose smoothed value lies outside that range are
   dropped; of what remains, the components of at least `min_component` x the largest are kept
   (by default every one: near an organ's end the gated mask falls apart into pieces that are all
   organ), their holes filled (vessels inside an organ stay), never beyond the decoded mask.

Smoothing (a Gaussian of `sigma_px` pixels) keeps single noisy pixels from being cut.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .config import GateConfig
from .decode import fill_holes
from .errors import InputError

Range = Tuple[float, float]


def _smoothed(image: np.ndarray, sigma: float, box: Optional[Tuple[int, int, int, int]] = None):
    """The image smoothed by a Gaussian of `sigma` pixels, over box (x0, y0, x1, y1; exclusive
    ends) padded by 4 sigma, or over the whole image; returns (crop, y0, x0) of the box's window."""
    H, W = image.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, W, H)
    pad = int(np.ceil(4 * sigma)) if sigma > 0 else 0
    ya, yb, xa, xb = max(0, y0 - pad), min(H, y1 + pad), max(0, x0 - pad), min(W, x1 + pad)
    crop = np.asarray(image[ya:yb, xa:xb], dtype=np.float32)
    if sigma > 0:
        crop = ndimage.gaussian_filter(crop, sigma)
    return crop[y0 - ya:y0 - ya + (y1 - y0), x0 - xa:x0 - xa + (x1 - x0)]


def organ_range(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: GateConfig) -> Optional[Range]:
    """The organ's grey-value range from support slices (normalised images) and their masks; None
    when the gate is off or the masks hold no pixel."""
    if not cfg.enabled:
        return None
    if len(images) != len(masks):
        raise InputError("%d support images for %d support masks" % (len(images), len(masks)))
    values = [_smoothed(img, cfg.sigma_px)[m] for img, m in zip(images, masks) if m.any()]
    if not values:
        return None
    v = np.concatenate(values)
    lo, hi = (float(q) for q in np.quantile(v, cfg.quantiles))
    widen = cfg.margin * (hi - lo)
    return lo - widen, hi + widen


def apply_gate(mask: np.ndarray, image: np.ndarray, rng: Optional[Range], cfg: GateConfig,
               keep: Optional[np.ndarray] = None) -> np.ndarray:
    """`mask` without the pixels outside the organ's range `rng` (module docstring); the mask
    itself when rng is None or the mask is empty. keep: (H, W) bool, pixels of the mask kept
    whatever their grey value (GateConfig.beyond_previous: the neighbouring slice's mask)."""
    if rng is None or not mask.any():
        return mask
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    m = mask[y0:y1, x0:x1]
    values = _smoothed(image, cfg.sigma_px, (x0, y0, x1, y1))
    inside = m & (values >= rng[0]) & (values <= rng[1])
    if keep is not None:
        inside |= m & keep[y0:y1, x0:x1]
    labels, n = ndimage.label(inside)
    out = np.zeros_like(mask)
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    big = np.flatnonzero(sizes >= cfg.min_component * sizes.max()) + 1
    out[y0:y1, x0:x1] = fill_holes(np.isin(labels, big)) & m
    return out
