"""Turning a VolumeResult into files: label map, confidence volume(s), points JSON."""
import os
from typing import Dict, List

import numpy as np

from .errors import InputError
from .io import Geometry
from .result import FOUND, VolumeResult

CONVENTION = {
    "ijk": "0-based voxel index (i, j, k) of IMAGE; i is the fastest-varying (column) axis",
    "lps": "physical millimetres, LPS (ITK, DICOM, SimpleITK)",
    "ras": "physical millimetres, RAS (3D Slicer's scene; NIfTI's convention)",
    "slice_xy": "x = column, y = row within the slice array taken across `axis`",
}


def slice_xy_to_ijk(xy, slice_index: int, axis: int) -> np.ndarray:
    """(N, 2) slice pixel coordinates -> (N, 3) voxel (i, j, k)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    kji = np.zeros((len(xy), 3))
    rest = [a for a in range(3) if a != axis]
    kji[:, axis] = slice_index
    kji[:, rest[0]] = xy[:, 1]   # row
    kji[:, rest[1]] = xy[:, 0]   # column
    return kji[:, ::-1]


def _points(xy, slice_index: int, axis: int, geometry: Geometry) -> List[dict]:
    if len(xy) == 0:
        return []
    ijk = slice_xy_to_ijk(xy, slice_index, axis)
    lps = geometry.index_to_lps(ijk)
    ras = Geometry.to_ras(lps)
    return [{"ijk": [round(float(v), 3) for v in a], "lps": [round(float(v), 3) for v in b],
             "ras": [round(float(v), 3) for v in c]} for a, b, c in zip(ijk, lps, ras)]


def points_document(result: VolumeResult, geometry: Geometry, image_path: str = "") -> Dict:
    axis = result.support.axis
    slices = []
    for rec in result.records:
        entry = {"label": rec.label, "slice": rec.index, "status": rec.status,
                 "score": round(rec.score, 4), "sam_iou": round(rec.sam_iou, 4),
                 "overlap_prev": round(rec.overlap_prev, 4), "reason": rec.reason,
                 "positive": _points(rec.positive, rec.index, axis, geometry),
                 "negative": _points(rec.negative, rec.index, axis, geometry), "box": None}
        if rec.box is not None:
            x0, y0, x1, y1 = rec.box
            corners = _points([[x0, y0], [x1 - 1, y1 - 1]], rec.index, axis, geometry)
            entry["box"] = {"min": corners[0], "max": corners[1], "slice_xyxy": [x0, y0, x1, y1]}
        slices.append(entry)
    return {"format": "synpo-points/1", "image": image_path, "convention": CONVENTION,
            "axis": "kji"[axis], "axis_index_kji": axis, "labels": result.support.labels,
            "modality": result.modality, "features": result.features, "confidence_slices": result.computed,
            "warnings": collapse_warnings(result), "slices": slices}


def changed_slices(before: VolumeResult, after: VolumeResult) -> List[int]:
    """The slices (across the later run's slicing axis) on which an update changed any label:
    what the preview reports after Update (empty when the grids differ: nothing comparable)."""
    if before.labels.shape != after.labels.shape:
        return []
    axis = after.support.axis
    a, b = np.moveaxis(before.labels, axis, 0), np.moveaxis(after.labels, axis, 0)
    return [int(t) for t in np.flatnonzero((a != b).reshape(len(a), -1).any(1))]


def extent_summary(result: VolumeResult, names: Dict[int, str] = None) -> List[str]:
    """One line per label: the slices where it was found and why each end of its walk stopped,
    e.g. "liver: slices 12-35; ends at 11 (confidence drop) and 36 (too small)"."""
    lines = []
    for label in result.support.labels:
        recs = sorted((r for r in result.records if r.label == label), key=lambda r: r.index)
        found = [r.index for r in recs if r.status in FOUND]
        name = (names or {}).get(label, "label %d" % label)
        if not found:
            lines.append("%s: not found" % name)
            continue
        runs, start = [], found[0]
        for a, b in zip(found, found[1:] + [None]):
            if b != a + 1:
                runs.append("%d-%d" % (start, a) if a > start else "%d" % a)
                start = b
        edges = {i - 1 for i in found} | {i + 1 for i in found}
        ends = ["%d (%s)" % (r.index, r.reason or "absent") for r in recs
                if r.status == "absent" and r.index in edges]
        lines.append("%s: slice%s %s%s" % (name, "s" if len(found) > 1 else "", ", ".join(runs),
                                           "; ends at " + " and ".join(ends) if ends else ""))
    return lines


def collapse_warnings(result: VolumeResult, names: Dict[int, str] = None) -> List[str]:
    """One line per label whose result is its painted slice(s) alone (every walk stopped on its
    first step), with the reason each first step gave; [] when every label grew beyond its paint."""
    lines = []
    slices = result.labels.shape[getattr(result.support, "axis", 0)]
    for label in result.support.labels:
        recs = sorted((r for r in result.records if r.label == label), key=lambda r: r.index)
        painted = [r.index for r in recs if r.status == "support"]
        if not painted or any(r.status in FOUND and r.status != "support" for r in recs):
            continue
        if not {p + d for p in painted for d in (-1, 1)} & (set(range(slices)) - set(painted)):
            continue                          # nothing to walk to: a one-slice volume, or every slice painted
        first = ["%d (%s)" % (r.index, r.reason or "absent") for r in recs
                 if r.status == "absent" and any(abs(r.index - p) == 1 for p in painted)]
        name = (names or {}).get(label, "label %d" % label)
        lines.append("%s: only the painted slice%s %s came back: the walk stopped on its first step%s. Paint the "
                     "target on a neighbouring slice as well, or check that the paint covers it"
                     % (name, "s" if len(painted) > 1 else "", ", ".join(map(str, painted)),
                        ", at " + " and ".join(first) if first else ""))
    return lines


def confidence_paths(path: str, labels: List[int]) -> Dict[int, str]:
    """CONF gets the max over labels; with several labels, CONF_label<N> gets each."""
    paths = {}
    if len(labels) > 1:
        base, ext = path, ""
        for e in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if path.endswith(e):
                base, ext = path[: -len(e)], e
        for v in labels:
            paths[v] = "%s_label%d%s" % (base, v, ext)
    return paths


def max_confidence(result: VolumeResult) -> np.ndarray:
    """The labels' confidence maps merged by their maximum (float32), without stacking them."""
    maps = [result.confidence[v] for v in result.support.labels]
    out = np.array(maps[0], dtype=np.float32)
    for m in maps[1:]:
        np.maximum(out, m, out=out)
    return out


def write_result(result: VolumeResult, geometry: Geometry, out: str, confidence_out: str = None,
                 points_out: str = None, image_path: str = "", before_publish=None) -> List[str]:
    """Every output written to a temporary file beside it first, then all put in place: an error or an
    interruption (Ctrl+C) while they are written leaves none of them, old or half-new (one written,
    the next one failing, left a new confidence beside an old segmentation). `before_publish`, if
    given, is called with the staged [(temporary file, path)] before the first is put in place (a
    cohort task records them: cohort_pending); if it raises, none is. Returns the paths."""
    from . import io as _io
    staged = []                   # (temporary file, path)
    try:
        if confidence_out:
            staged.append((_io.stage_volume(max_confidence(result), geometry, confidence_out), confidence_out))
            for v, p in confidence_paths(confidence_out, result.support.labels).items():
                staged.append((_io.stage_volume(result.confidence[v], geometry, p), p))
        if points_out:
            document = points_document(result, geometry, os.path.abspath(image_path) if image_path else "")
            staged.append((_io.stage_json(document, points_out), points_out))
        # uint8 when the labels fit (assembly.py)
        staged.append((_io.stage_volume(result.labels, geometry, out), out))
        if before_publish is not None:
            before_publish(list(staged))
        # The renames, with Ctrl+C / kill ignored (milliseconds: one pressed then is dropped; in the main
        # thread only: a cohort's workers write in theirs), so that no interruption leaves some outputs
        # replaced.
        from .lifeline import ignore_interrupts
        restore = ignore_interrupts(("SIGINT", "SIGTERM", "SIGHUP"))
        try:
            for n, (tmp, path) in enumerate(staged):
                try:
                    _io.publish(tmp, path)
                except InputError as exc:
                    done = [p for t, p in staged[:n]]
                    raise InputError("%s%s" % (exc, "; already written: %s" % ", ".join(done) if done else "")) \
                        from None
                staged[n] = ("", path)
        finally:
            restore()
    except BaseException:
        _io.discard_staged([tmp for tmp, _ in staged if tmp])
        raise
    return [path for _, path in staged]
