"""Slicer's *Fill between slices*, the anchor `synpo evaluate --corrections` compares SynPo with.

What a Slicer user does today without SynPo: paint the organ on a few slices and run the Segment
Editor's *Fill between slices*. That effect (Slicer's
Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/
SegmentEditorFillBetweenSlicesEffect.py, `computePreviewLabelmap`) runs
`vtkITK.vtkITKMorphologicalContourInterpolator` (Libs/vtkITK/vtkITKMorphologicalContourInterpolator.cxx,
a wrapper of ITK's `itk::MorphologicalContourInterpolator`, Albu et al. 2008) with its defaults:
every label, every axis, heuristic alignment on, distance transform off (repeated dilations), cross
structuring element, no extrapolation beyond the outermost painted slices. The same ITK filter
comes from PyPI as `itk-morphologicalcontourinterpolation` (the `evaluate` extra); it is run here
with those settings.

One difference, in Fill between slices' favour: the filter interpolates only from a painted slice
whose neighbours are not painted (Slicer's help: "always leave at least one empty slice between
segmented slices"), so adjacent painted slices, which the simulated annotator may choose, would
leave whole gaps empty. Here each gap between two consecutive painted slices is filled from those
two slices alone (a sub-volume holding only them), which is what the filter does for a gap when
the painted slices are separate, and what a careful user gets.
"""
from typing import Dict, Iterable, Optional

import numpy as np

from .errors import SynPoError


def _filter():
    try:
        import itk
        return itk, itk.MorphologicalContourInterpolator
    except (ImportError, AttributeError):
        raise SynPoError("Fill between slices needs ITK's morphological contour interpolation: "
                         "pip install itk-morphologicalcontourinterpolation (the 'evaluate' extra)") from None


def fill_between_slices(painted: Dict[int, np.ndarray], shape, spacing_kji: Optional[Iterable[float]] = None
                        ) -> np.ndarray:
    """A boolean volume [slices, rows, columns] (slicing axis first): the painted slices as
    painted and every gap between two consecutive painted slices filled by the ITK filter with
    Slicer's settings; nothing beyond the first and last painted slice.

    painted: {slice index: boolean mask of that slice}; spacing_kji: the voxel spacing in the same
    axis order (the filter's dilations are in voxels, the spacing is carried as Slicer does)."""
    itk, interpolator = _filter()
    out = np.zeros(shape, dtype=bool)
    keys = sorted(int(s) for s in painted)
    for s in keys:
        out[s] = painted[s]
    for a, b in zip(keys, keys[1:]):
        if b - a < 2 or not (painted[a].any() and painted[b].any()):
            continue
        block = np.zeros((b - a + 1,) + tuple(shape[1:]), dtype=np.uint8)
        block[0], block[-1] = painted[a], painted[b]
        image = itk.image_from_array(block)
        if spacing_kji is not None:
            image.SetSpacing([float(v) for v in reversed(tuple(spacing_kji))])
        f = interpolator.New(image)
        f.SetLabel(0)
        f.SetAxis(2)                         # ITK's z = the array's first axis, across which it was painted
        f.SetHeuristicAlignment(True)
        f.SetUseDistanceTransform(False)
        f.SetUseBallStructuringElement(False)
        f.SetUseExtrapolation(False)
        f.Update()
        filled = itk.array_from_image(f.GetOutput()) != 0
        out[a + 1:b] |= filled[1:-1]
    return out


def even_slices(first: int, last: int, n: int):
    """n slices spread evenly from `first` to `last` (both included when n >= 2)."""
    if n <= 1:
        return [int(round((first + last) / 2.0))]
    return sorted({int(round(v)) for v in np.linspace(first, last, n)})
