"""Intensity normalisation of a whole volume to [0, 1] before the encoders.

CT (Hounsfield units) gets a fixed window; MR gets per-volume percentiles. The
choice is automatic ("auto") unless the config names a modality.
"""
import numpy as np

from .config import IntensityConfig


def guess_modality(volume: np.ndarray) -> str:
    """CT when the values look like Hounsfield units: air near -1000 and integer-valued."""
    sample = volume[::2, ::2, ::2] if volume.size > 2_000_000 else volume
    low = float(np.percentile(sample, 1))
    head = sample[:4]                        # a few slices suffice to see integer (HU) values
    integral = np.allclose(head, np.round(head))
    return "ct" if (low <= -500.0 and integral) else "mr"


def normalize(volume: np.ndarray, cfg: IntensityConfig = IntensityConfig()):
    """Return (float32 volume in [0, 1], modality used)."""
    modality = cfg.modality if cfg.modality != "auto" else guess_modality(volume)
    volume = volume.astype(np.float32, copy=False)
    if modality == "ct":
        centre, width = cfg.ct_window
        low, high = centre - width / 2.0, centre + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(volume, cfg.mr_percentiles))
        if high <= low:
            low, high = float(volume.min()), float(volume.max())
    out = np.clip(volume, low, high)              # one new volume; the rest in place
    out -= low
    out /= max(high - low, 1e-6)
    return out, modality
