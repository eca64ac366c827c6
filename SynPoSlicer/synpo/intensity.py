"""Intensity normalisation of a whole volume to [0, 1] before the encoders.

Three kinds of volume, each reported by name in the result (`modality`):
- "ct": Hounsfield units, cut to a fixed soft-tissue window;
- "ct-windowed": a CT already windowed and stored as 8-bit grey values (0-255; the few-shot
  literature's BTCV copies): taken as it is, 0 -> 0 and 255 -> 1, no percentile clipping;
- "mr": per-volume percentiles.
The choice is automatic ("auto") unless the config names a modality; "ct" asked for a volume
whose values are not Hounsfield units means a windowed CT.
"""
import numpy as np

from .config import IntensityConfig


# A windowed CT saturates at the window's top (bone, contrast): 1.2-2.5 % of the voxels of the
# BTCV volumes sit at 255. MR volumes clipped at a percentile hold far fewer at their maximum
# (CHAOS T2 0.10-0.24 %, cardiac bSSFP <= 0.09 %).
WINDOWED_TOP_FRACTION = 0.005


def _sample(volume: np.ndarray) -> np.ndarray:
    return volume[::2, ::2, ::2] if volume.size > 2_000_000 else volume


def looks_like_hu(volume: np.ndarray) -> bool:
    """Hounsfield units: air near -1000 and integer values."""
    sample = _sample(volume)
    head = sample[:4]                        # a few slices suffice to see integer (HU) values
    return float(np.percentile(sample, 1)) <= -500.0 and bool(np.allclose(head, np.round(head)))


def looks_windowed(volume: np.ndarray) -> bool:
    """A CT windowed to 8 bits: integer values within 0-255 that reach 255, with a saturated top."""
    sample = _sample(volume)
    head = sample[:4]
    if float(sample.min()) < 0.0 or float(sample.max()) != 255.0 or not np.allclose(head, np.round(head)):
        return False
    return float(np.mean(sample == 255.0)) >= WINDOWED_TOP_FRACTION


def guess_modality(volume: np.ndarray) -> str:
    """"ct" (Hounsfield units), "ct-windowed" (8-bit windowed CT) or "mr" (anything else)."""
    if looks_like_hu(volume):
        return "ct"
    return "ct-windowed" if looks_windowed(volume) else "mr"


def normalize(volume: np.ndarray, cfg: IntensityConfig = IntensityConfig()):
    """Return (float32 volume in [0, 1], modality used: "ct", "ct-windowed" or "mr")."""
    if cfg.modality == "auto":
        modality = guess_modality(volume)
    elif cfg.modality == "ct" and not looks_like_hu(volume):
        modality = "ct-windowed"             # a CT, but its values are grey levels, not HU
    else:
        modality = cfg.modality
    volume = volume.astype(np.float32, copy=False)
    if modality == "ct":
        centre, width = cfg.ct_window
        low, high = centre - width / 2.0, centre + width / 2.0
    elif modality == "ct-windowed":
        low, high = (0.0, 255.0) if float(volume.min()) >= 0.0 and float(volume.max()) <= 255.0 \
            else (float(volume.min()), float(volume.max()))
    else:
        low, high = (float(v) for v in np.percentile(volume, cfg.mr_percentiles))
        if high <= low:
            low, high = float(volume.min()), float(volume.max())
    return _clip_scale(volume, low, high), modality


def _clip_scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values (float32) cut to [low, high] and scaled to [0, 1]: one new array, the rest in place."""
    out = np.clip(values, low, high)
    out -= low
    out /= max(high - low, 1e-6)
    return out


def normalize_each_slice(slices: np.ndarray, fallback: np.ndarray, cfg: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """slices (n, H, W), an MR volume's raw values with the slicing axis first -> (n, H, W) float32 in
    [0, 1], each slice cut to its own `cfg.mr_percentiles` and scaled (the way LiteMedSAM's training
    images were). A slice whose two percentiles are equal keeps `fallback`'s (n, H, W) values (the
    volume's normalisation). Used for a ring's grey values (volume.ring_grey_per_slice)."""
    if slices.shape != fallback.shape:
        raise ValueError("slices %s and fallback %s differ in shape" % (slices.shape, fallback.shape))
    out = np.empty(slices.shape, np.float32)
    for s in range(slices.shape[0]):
        plane = slices[s].astype(np.float32, copy=False)
        low, high = (float(v) for v in np.percentile(plane, cfg.mr_percentiles))
        out[s] = fallback[s] if high <= low else _clip_scale(plane, low, high)
    return out
