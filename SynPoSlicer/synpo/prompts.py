"""Point (and box) prompts from a confidence map.

- Positive set: the top_k most confident pixels (inside an optional search region).
- Box region: the connected components of {confidence >= box_threshold} that hold
  a positive pixel; the box is their bounding box (box-trained models need it).
- Negative set: pixels of low confidence outside the box region, drawn at random
  with a Gaussian weight of their distance to the target's centre (sigma =
  negative_sigma x the target's radius): most negatives fall *near* the target,
  as the SynPo pilot study found best.
- K-means runs on each set independently; each centre is snapped to the nearest
  member of its set, so a prompt always lies on a pixel of its set.
Everything is seeded: the same map gives the same prompts.
"""
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
from scipy import ndimage

from .config import PromptConfig
from .kmeans import kmeans


@dataclass
class Prompts:
    positive: np.ndarray                 # (n, 2) x (column), y (row) pixel coordinates
    negative: np.ndarray                 # (m, 2)
    box: Optional[Tuple[int, int, int, int]]  # x0, y0, x1, y1 (x1, y1 exclusive) or None
    region: np.ndarray                   # (H, W) bool: the box region (confident components)


def _kmeans_points(points_xy: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(points_xy) == 0 or n == 0:
        return np.zeros((0, 2), dtype=float)
    unique = np.unique(points_xy, axis=0)
    if len(unique) <= n:
        return unique.astype(float)
    centres = kmeans(points_xy, n, seed, n_init=4)
    # Snap each centre to its nearest member so it lies on a pixel of the set.
    d = ((centres[:, None, :] - points_xy[None, :, :]) ** 2).sum(-1)
    return points_xy[d.argmin(1)].astype(float)


def top_k_pixels(conf: np.ndarray, k: int, allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """(k, 2) x, y of the k highest values of conf (ties broken by position, deterministic)."""
    flat = conf.ravel()
    # Only the allowed pixels are ranked (the search region is often a small part of the slice:
    # selecting among all of them, with -inf outside, took most of select_prompts' time).
    where = None if allowed is None else np.flatnonzero(np.asarray(allowed).ravel())
    values = flat if where is None else flat[where]
    k = min(k, int(np.isfinite(values).sum()))
    if k <= 0:
        return np.zeros((0, 2), dtype=int)
    if k < values.size:
        # Partial selection (a full sort of the slice showed in the profile): everything above
        # the k-th largest value, then the ties at that value by pixel index.
        kth = np.partition(values, values.size - k)[values.size - k]
        above = np.flatnonzero(values > kth)
        idx = np.concatenate([above, np.flatnonzero(values == kth)[:k - len(above)]])
    else:
        idx = np.arange(values.size)
    if where is not None:
        idx = where[idx]                             # ascending in both: ties keep the pixel order
    idx = idx[np.lexsort((idx, -flat[idx]))]         # by value, ties to the lower pixel index
    ys, xs = np.unravel_index(idx, conf.shape)
    return np.stack([xs, ys], 1)


def box_of(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def widen(box, fraction: float, shape) -> Optional[Tuple[int, int, int, int]]:
    """Widen an (x0, y0, x1, y1) box by `fraction` of its size on each side, clipped to the slice."""
    if box is None or fraction <= 0:
        return box
    x0, y0, x1, y1 = box
    dx, dy = int(round(fraction * (x1 - x0))), int(round(fraction * (y1 - y0)))
    return max(0, x0 - dx), max(0, y0 - dy), min(shape[1], x1 + dx), min(shape[0], y1 + dy)


def gaussian_negatives(conf: np.ndarray, exclude: np.ndarray, centre_xy, radius: float, n: int,
                       cfg: PromptConfig, rng: np.random.Generator) -> np.ndarray:
    """Sample up to n low-confidence pixels outside `exclude`, weighted by a Gaussian around centre."""
    candidates = (conf < cfg.negative_max_confidence) & ~exclude
    ys, xs = np.nonzero(candidates)
    if len(xs) == 0 or n == 0:
        return np.zeros((0, 2), dtype=int)
    sigma = max(cfg.negative_sigma * radius, 1.0)
    d2 = (xs - centre_xy[0]) ** 2 + (ys - centre_xy[1]) ** 2
    w = np.exp(-d2 / (2.0 * sigma ** 2))
    if w.sum() <= 0 or not np.isfinite(w.sum()):
        w = np.ones_like(w)
    w = w / w.sum()
    take = rng.choice(len(xs), size=min(n, int((w > 0).sum())), replace=False, p=w)
    return np.stack([xs[take], ys[take]], 1)


def select_prompts(conf: np.ndarray, cfg: PromptConfig = PromptConfig(),
                   search: Optional[np.ndarray] = None, expected: Optional[np.ndarray] = None) -> Prompts:
    """Prompts for one slice from its (H, W) confidence map in [0, 1].

    search: optional (H, W) bool region where the target is expected (positives
    and the box region are restricted to it).
    expected: optional (H, W) bool guess of the target's shape (the support mask of
    another patient carried onto this slice). With one_component, when the search
    region holds several confident components, the search narrows to the one with
    the most confidence inside `expected` (when any has some).
    """
    rng = np.random.default_rng(cfg.seed)
    empty = np.zeros(conf.shape, dtype=bool)
    confident = conf >= cfg.box_threshold
    if search is not None:
        confident &= search
    labels, n_components = ndimage.label(confident)
    if expected is not None and cfg.one_component and n_components > 1:
        inside = ndimage.sum(conf * expected, labels, np.arange(1, n_components + 1))
        if inside.max() > 0:
            search = labels == 1 + int(np.argmax(inside))
    pos_set = top_k_pixels(conf, cfg.top_k, search)
    if len(pos_set) == 0:
        return Prompts(np.zeros((0, 2)), np.zeros((0, 2)), None, empty)
    hit = np.unique(labels[pos_set[:, 1], pos_set[:, 0]])
    hit = hit[hit > 0]
    if cfg.one_component and len(hit) > 1:
        # The positives fell on several confident components: take the one with the most
        # confidence mass, and the positives inside it.
        mass = ndimage.sum(conf, labels, hit)
        hit = hit[[int(np.argmax(mass))]]
        pos_set = top_k_pixels(conf, cfg.top_k, labels == hit[0])
    region = np.isin(labels, hit) if len(hit) else empty.copy()
    if not region.any():
        region = empty.copy()
        region[pos_set[:, 1], pos_set[:, 0]] = True
    box = widen(box_of(region), cfg.box_margin, conf.shape)
    area = max(int(region.sum()), 1)
    centre = (pos_set[:, 0].mean(), pos_set[:, 1].mean())
    neg_set = gaussian_negatives(conf, region, centre, np.sqrt(area / np.pi), cfg.n_negative_samples, cfg, rng)
    if cfg.kmeans:
        positive = _kmeans_points(pos_set, cfg.n_positive_points, cfg.seed)
        negative = _kmeans_points(neg_set, cfg.n_negative_points, cfg.seed)
    else:
        positive = pos_set[: cfg.n_positive_points].astype(float)
        negative = neg_set[: cfg.n_negative_points].astype(float)
    return Prompts(positive, negative, box, region)


class PromptCache:
    """Prompts by their exact inputs, for re-runs: a walk that a correction leaves alone asks for
    the same slice with the same confidence map, search region and settings again, and
    select_prompts (seeded, deterministic) would give the same prompts. Kept least recently used
    out first, up to `kept_bytes` (the regions are kept as bits). Thread-safe (labels are walked in
    parallel threads)."""

    def __init__(self, kept_bytes: int = 32 << 20):
        self.kept_bytes = kept_bytes
        self.entries: "OrderedDict[bytes, tuple]" = OrderedDict()
        self.bytes = 0
        self.reuses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(t: int, conf: np.ndarray, cfg: PromptConfig, search: Optional[np.ndarray] = None,
            expected: Optional[np.ndarray] = None) -> bytes:
        """Everything select_prompts' result depends on: slice t's confidence map (H, W), the
        settings, the search region and the expected shape (None or (H, W) bool)."""
        conf = np.ascontiguousarray(conf)
        digest = hashlib.blake2b(repr((int(t), cfg, conf.shape, str(conf.dtype), search is None,
                                       expected is None)).encode(), digest_size=20)
        digest.update(conf.tobytes())
        for part in (search, expected):
            if part is not None:
                digest.update(np.packbits(np.asarray(part, dtype=bool)).tobytes())
        return digest.digest()

    def get_or_select(self, key: bytes, select: Callable[[], Prompts]) -> Prompts:
        """The prompts kept under `key`, or select() kept there."""
        with self._lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                self.reuses += 1
        if hit is not None:
            positive, negative, box, bits, shape = hit
            region = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
            return Prompts(positive.copy(), negative.copy(), box, region)
        prompts = select()
        bits = np.packbits(prompts.region)
        entry = (np.array(prompts.positive, copy=True), np.array(prompts.negative, copy=True), prompts.box, bits,
                 prompts.region.shape)
        with self._lock:
            if key not in self.entries:
                self.entries[key] = entry
                self.bytes += bits.nbytes
            while self.bytes > self.kept_bytes and self.entries:
                self.bytes -= self.entries.popitem(last=False)[1][3].nbytes
        return prompts
