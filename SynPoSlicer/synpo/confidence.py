"""Confidence Map Synergy: prototypes from the support, similarity maps, fusion.

For each encoder:
1. The support mask is area-downsampled to the encoder's feature grid; cells
   at least half inside are foreground, cells with no foreground are background.
2. Foreground prototypes: K-means (n_prototypes) over the unit-normalised
   foreground feature vectors of every support slice; background prototypes
   likewise over the support's background cells (n_background_prototypes). The
   score of a query cell = max cosine similarity to a foreground prototype minus
   max cosine similarity to a background prototype: a neighbouring organ that
   appears in the support's background scores low even when it resembles the
   target.
3. Calibration on the support: the mean similarity of its background cells maps
   to 0 and of its foreground cells to 1 (clipped to [0, 1]). This puts the maps
   of different encoders on one scale, keeps absolute values (so a slice without
   the target stays low: no per-slice min-max), and gives thresholds a meaning.
Fusion: weighted geometric mean of the calibrated maps. A pixel is confident
only where both encoders agree: DINOv2's semantic look-alikes far from the
target are vetoed by SAM's low similarity there, and SAM's weak separation is
sharpened by DINOv2. (An arithmetic mean lets one encoder's false peak through
at half strength.)
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from .config import ConfidenceConfig


@dataclass
class Prototypes:
    vectors: torch.Tensor     # (n, C) unit vectors
    fg_mean: float            # mean support foreground score
    bg_mean: float            # mean support background score
    background: Optional[torch.Tensor] = None   # (m, C) unit vectors, or None


def _raw_score(f: torch.Tensor, protos: "Prototypes") -> torch.Tensor:
    """(..., C, cells) features -> (..., cells): dot product with the nearest foreground
    prototype, minus (when background prototypes exist) with the nearest background one.
    Cosine similarities for unit features. Channels first: one matrix product, no copy."""
    score = torch.matmul(protos.vectors, f).max(-2).values
    if protos.background is not None:
        score = score - torch.matmul(protos.background, f).max(-2).values
    return score


def support_cells(mask: np.ndarray, frame, grid: int) -> np.ndarray:
    """Coverage of each cell of the (grid x grid) feature map by the slice mask, cropped to valid cells."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=(frame.h, frame.w), mode="area" if frame.h <= mask.shape[0] else "bilinear")
    m = F.pad(m, (0, frame.size - frame.w, 0, frame.size - frame.h))
    cov = F.adaptive_avg_pool2d(m, grid)[0, 0]
    rows, cols = frame.grid_valid(grid)
    return cov[:rows, :cols].numpy()


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-6)


def _kmeans_vectors(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if len(vectors) <= n:
        return vectors
    # One thread: these fits are small, and scikit-learn's OpenMP threads beside torch's made
    # them 2.5x slower on a 2-core CPU (the same centres either way).
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(vectors)
    return km.cluster_centers_.astype(np.float32)


def build_prototypes(feats: List[torch.Tensor], masks: List[np.ndarray], frame, grid: int,
                     cfg: ConfidenceConfig = ConfidenceConfig()) -> Prototypes:
    """feats: per support slice (C, grid, grid); masks: matching (H, W) boolean masks."""
    rows, cols = frame.grid_valid(grid)
    fg, bg = [], []
    for feat, mask in zip(feats, masks):
        cov = support_cells(mask, frame, grid)
        f = _unit(feat[:, :rows, :cols].float(), 0).reshape(feat.shape[0], -1).T     # (cells, C)
        c = cov.reshape(-1)
        strong = c >= 0.5
        if not strong.any():                       # a thin target: take its best-covered cells
            strong = c >= max(c.max() * 0.5, 1e-6)
        fg.append(f[torch.from_numpy(strong)])
        bg.append(f[torch.from_numpy(c <= 0.0)])
    fg_all = torch.cat(fg).numpy()
    centres = _kmeans_vectors(fg_all, cfg.n_prototypes)
    protos = Prototypes(_unit(torch.from_numpy(centres), 1), 0.0, 0.0)
    bg_all = torch.cat(bg)
    if cfg.n_background_prototypes > 0 and len(bg_all):
        centres = _kmeans_vectors(bg_all.numpy(), cfg.n_background_prototypes)
        protos.background = _unit(torch.from_numpy(centres), 1)
    protos.fg_mean = float(_raw_score(torch.from_numpy(fg_all).T, protos).mean())
    protos.bg_mean = float(_raw_score(bg_all.T, protos).mean()) if len(bg_all) else 0.0
    return protos


def similarity(feats: torch.Tensor, protos: Prototypes, frame, grid: int) -> torch.Tensor:
    """(N, C, grid, grid) -> (N, rows, cols) calibrated similarity in [0, 1] over the valid cells.

    The cosine score of _raw_score, computed as (prototypes @ f) / |f|: the features are
    never normalised as a whole (no normalised copy of the stack).
    """
    rows, cols = frame.grid_valid(grid)
    n, c = feats.shape[:2]
    f = feats[:, :, :rows, :cols].float().reshape(n, c, rows * cols)
    norm = f.norm(dim=1).clamp_min(1e-6)                                   # (N, cells)
    # Cosines are dot products over |f|, and |f| > 0 leaves the max and the difference alone.
    sim = (_raw_score(f, protos) / norm).reshape(n, rows, cols)
    span = max(protos.fg_mean - protos.bg_mean, 1e-3)
    return ((sim - protos.bg_mean) / span).clamp(0.0, 1.0)


def fuse(maps: Dict[str, torch.Tensor], cfg: ConfidenceConfig = ConfidenceConfig()) -> torch.Tensor:
    """Weighted geometric mean of calibrated (N, H, W) maps on the slice grid."""
    if len(maps) == 1:
        return next(iter(maps.values()))
    w_sam = cfg.sam_weight
    sam, dino = maps["sam"].clamp_min(1e-4), maps["dinov2"].clamp_min(1e-4)
    return torch.exp(w_sam * torch.log(sam) + (1.0 - w_sam) * torch.log(dino))
