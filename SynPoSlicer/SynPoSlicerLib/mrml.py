"""MRML <-> SynPo engine, without Qt: what the SynPoSlicer module does to the scene.

Everything here works on real MRML nodes (3D Slicer, or the `slicer-core` package in
tests). The engine (`synpo`) never sees a node: volumes become arrays [k, j, i] plus
their IJK-to-RAS matrix, and results come back as arrays and RAS points.

Scene changes are all here:
- `extract_inputs`: volume + painted segments -> arrays (refuses bad input with InputError);
- `PreviewNodes`: the temporary confidence volume, candidate segmentation and the
  two markups point lists (positive green, negative red), and their removal;
- `rerun_slice`: one slice of one label decoded again from the points as the user left them.
Writing the preview into the user's segments is `apply.py` (a Segment Editor undo step).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from synpo.errors import InputError
from synpo.layout import check_direction, known_direction
from synpo.support import find_support

import slicer
import vtk

POSITIVE_COLOUR = (0.1, 0.85, 0.1)
NEGATIVE_COLOUR = (0.95, 0.1, 0.1)
TEMP_ATTRIBUTE = "SynPoSlicer.Temporary"


def register_segmentation_converters() -> None:
    """Register the representation converters as Slicer does at start-up (idempotent).

    Slicer's application registers them; a bare MRML scene (slicer-core) has none,
    and segments cannot hold a binary labelmap without them.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for cls in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if cls not in have and hasattr(slicer, cls):
            factory.RegisterConverterRule(getattr(slicer, cls)())


# ------------------------------------------------------------------ geometry

def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def spacing_ijk(volume_node) -> tuple:
    """Voxel size along i, j, k from the IJK-to-RAS matrix (holds for oblique volumes)."""
    return tuple(float(v) for v in np.linalg.norm(ijk_to_ras(volume_node)[:3, :3], axis=0))


def direction_lps(volume_node) -> Optional[tuple]:
    """The volume's 3x3 direction as ITK (and synpo's files) give it: LPS, row-major, column c the unit
    world vector of index axis c (i, j, k). Sent with the volume: the engine gives the encoders each
    slice with its rows along the axis the slice views draw vertically (synpo/layout.py). None for a
    sheared grid (a shear transform hardened on the volume, a NRRD's non-orthogonal space directions):
    the server refuses a direction whose columns are not orthogonal (layout.check_direction), which
    failed the whole preview; without one its slices are taken as stored, as before directions were sent.
    None too where the placement is a placeholder (a diagonal direction at origin 0: layout.known_direction, as
    `synpo segment` treats the file), so that the same file segments the same in Slicer and from the CLI."""
    m = ijk_to_ras(volume_node)
    try:
        direction = check_direction(np.diag([-1.0, -1.0, 1.0]) @ (m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)))
    except ValueError:
        return None
    return known_direction(direction, m[:3, 3])


def points_ijk_to_ras(volume_node, ijk: np.ndarray) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
    m = ijk_to_ras(volume_node)
    return ijk @ m[:3, :3].T + m[:3, 3]


def geometry_ijk_to_ras(geometry) -> np.ndarray:
    """The IJK-to-RAS matrix of a volume read by `synpo.io.read_volume` (its Geometry: ITK's LPS
    origin, direction and spacing), so that a node made from the array sits where Slicer would
    load the file."""
    m = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    m[:3, :3] = lps_to_ras @ (np.asarray(geometry.direction, float).reshape(3, 3) * np.asarray(geometry.spacing))
    m[:3, 3] = lps_to_ras @ np.asarray(geometry.origin, float)
    return m


def _set_ijk_to_ras(node, matrix: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(m)


# ------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    image: np.ndarray                    # [k, j, i] float32
    support: np.ndarray                  # [k, j, i] int32, label v = segment_ids[v - 1]
    spacing: tuple                       # (i, j, k) mm
    segment_ids: List[str]
    axis: int                            # slicing axis of [k, j, i]
    direction: Optional[tuple] = None    # 3x3 LPS, row-major (direction_lps)


def _parallel_axes(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> bool:
    """True when the two 3x3 direction matrices have the same axes up to order and sign."""
    a = a / np.linalg.norm(a, axis=0)
    b = b / np.linalg.norm(b, axis=0)
    dots = np.abs(a.T @ b)
    return bool(np.all(np.abs(np.sort(dots, axis=1)[:, -1] - 1.0) < tol))


def volume_image(volume_node) -> np.ndarray:
    """The volume's voxels [k, j, i] as float32 (a copy: what is sent to the server)."""
    return slicer.util.arrayFromVolume(volume_node).astype(np.float32)


def extract_inputs(volume_node, segmentation_node, segment_ids: Sequence[str]) -> Inputs:
    """The volume as an array and the chosen segments' paint on the volume's grid.

    Raises InputError with a message for the panel: no volume, a 2D or 4D volume,
    no segment, an empty segment, a segmentation on a non-parallel geometry, paint
    not confined to parallel slices.
    """
    if volume_node is None:
        raise InputError("Select an input volume.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.GetImageData() is None:
        raise InputError("The input must be a scalar volume with image data.")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError("The input volume has %d components per voxel; a scalar (grayscale) volume is needed."
                         % volume_node.GetImageData().GetNumberOfScalarComponents())
    if volume_node.IsA("vtkMRMLMultiVolumeNode") or volume_node.GetAttribute("MultiVolume.NumberOfFrames"):
        raise InputError("The input is a 4D (multi-frame) volume; pick one frame as a 3D volume.")
    dims = volume_node.GetImageData().GetDimensions()
    if min(dims) < 2:
        raise InputError("The input volume is 2D (%s voxels); a 3D volume is needed." % "x".join(map(str, dims)))
    if segmentation_node is None:
        raise InputError("Select a segmentation and paint the target on one slice.")
    if not segment_ids:
        raise InputError("Select the segment(s) to propagate.")
    register_segmentation_converters()
    ref = segmentation_node.GetSegmentation()
    source = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_ids[0]) \
        if hasattr(segmentation_node, "GetBinaryLabelmapInternalRepresentation") else None
    if source is not None:
        d = vtk.vtkMatrix4x4()
        source.GetDirectionMatrix(d)
        seg_dirs = np.array([[d.GetElement(r, c) for c in range(3)] for r in range(3)])
        if not _parallel_axes(seg_dirs, ijk_to_ras(volume_node)[:3, :3]):
            raise InputError("The segmentation was painted on a grid that is not parallel to the input volume's "
                             "(oblique to it); paint with the input volume as the segmentation's source geometry.")
    image = volume_image(volume_node)
    support = np.zeros(image.shape, dtype=np.int32)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    scene = volume_node.GetScene()
    for value, sid in enumerate(segment_ids, start=1):
        if ref.GetSegment(sid) is None:
            raise InputError("Segment %r is not in the segmentation." % sid)
        with _Scratch(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__synpo_support__")
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node)
            mask = slicer.util.arrayFromVolume(labelmap)
            if mask.shape != image.shape:
                raise InputError("The segmentation could not be resampled onto the input volume's grid.")
            mask = mask != 0
        if not mask.any():
            name = ref.GetSegment(sid).GetName()
            raise InputError("Segment '%s' is empty: paint the target on one slice first." % name)
        support[mask & (support == 0)] = value
    support_info = find_support(support)
    return Inputs(image, support, spacing_ijk(volume_node), list(segment_ids), support_info.axis,
                  direction_lps(volume_node))


# ------------------------------------------------------------------ preview nodes

def _remove(scene, node) -> None:
    if node is None or scene is None:
        return
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        dn = node.GetNthDisplayNode(i)
        if dn is not None:
            scene.RemoveNode(dn)
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())
    scene.RemoveNode(node)


class _Scratch:
    """Removes on exit every node added inside the block (the labelmaps and colour tables that
    segment export creates), but the scene's subject hierarchy, which Slicer always has."""

    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def __exit__(self, *exc):
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in self.before \
                    and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                self.scene.RemoveNode(node)
        return False


@dataclass
class PreviewNodes:
    """The temporary nodes of one preview. `remove()` takes every one of them out of the scene."""
    confidence: object = None
    candidates: object = None
    positive: object = None
    negative: object = None
    labels: Optional[np.ndarray] = None          # [k, j, i] candidate labels (the engine's output)
    segment_ids: List[str] = field(default_factory=list)
    candidate_ids: Dict[int, str] = field(default_factory=dict)   # label -> its segment in `candidates`

    def nodes(self) -> list:
        return [n for n in (self.confidence, self.candidates, self.positive, self.negative) if n is not None]

    def remove(self) -> None:
        for node in self.nodes():
            _remove(node.GetScene(), node)
        self.confidence = self.candidates = self.positive = self.negative = None


def _new_node(scene, cls: str, name: str):
    """A temporary node: marked as ours, never saved with the scene."""
    node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(name))
    node.SetAttribute(TEMP_ATTRIBUTE, "1")
    node.SetSaveWithScene(False)
    return node


def _not_saved(node) -> None:
    """The display nodes of a temporary node are not saved with the scene either."""
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        if node.GetNthDisplayNode(i) is not None:
            node.GetNthDisplayNode(i).SetSaveWithScene(False)


def _markups(scene, name: str, colour, ras: np.ndarray, descriptions: Sequence[str]):
    node = _new_node(scene, "vtkMRMLMarkupsFiducialNode", name)
    if hasattr(node, "CreateDefaultDisplayNodes"):
        node.CreateDefaultDisplayNodes()
    # One Modified for all the points (vtkMRMLNode::StartModify / EndModify): each AddControlPoint and
    # SetNthControlPoint* fires its own events otherwise, and the views update for each of a liver's
    # ~450 points on the main thread.
    modifying = node.StartModify()
    try:
        for p, text in zip(ras, descriptions):
            index = node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]))
            node.SetNthControlPointDescription(index, text)
            node.SetNthControlPointLabel(index, "")
    finally:
        node.EndModify(modifying)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*colour)
        display.SetColor(*colour)
        display.SetPointLabelsVisibility(False)
    node.SetLocked(False)
    _not_saved(node)
    return node


def _intact_candidates(preview: Optional["PreviewNodes"], labels) -> bool:
    """Whether `preview`'s candidates segmentation is still in the scene with a segment for each of
    `labels`, and for no other."""
    node = preview.candidates if preview is not None else None
    if node is None or node.GetScene() is None or sorted(preview.candidate_ids) != sorted(labels):
        return False          # (a label the update no longer has would stay shown, stale)
    return all(node.GetSegmentation().GetSegment(preview.candidate_ids[v]) is not None for v in labels)


def show_preview(volume_node, result, segment_ids: Sequence[str], names: Sequence[str] = (),
                 previous: Optional["PreviewNodes"] = None) -> PreviewNodes:
    """Create the preview nodes for a `synpo.volume.VolumeResult` computed on `volume_node`.

    previous: the preview this one replaces (an Update). Its 'SynPo candidates' segmentation, where
    it still holds every label's segment, is kept and its segments overwritten, not replaced by a new
    node: the Segment Editor may be showing it while the user corrects (removing a node clears the
    editor node's reference to it, vtkMRMLScene::RemoveNode, and qMRMLSegmentEditorWidget then
    disables the effects or deactivates the effect). On success that node moves from `previous` to
    the new preview; the caller removes what is left of `previous`."""
    from synpo.outputs import max_confidence, slice_xy_to_ijk
    scene = volume_node.GetScene()
    matrix = ijk_to_ras(volume_node)
    preview = PreviewNodes(labels=result.labels.copy(), segment_ids=list(segment_ids))
    reuse = _intact_candidates(previous, result.support.labels)
    try:
        conf = max_confidence(result)
        preview.confidence = _new_node(scene, "vtkMRMLScalarVolumeNode", "SynPo confidence")
        slicer.util.updateVolumeFromArray(preview.confidence, conf)
        _set_ijk_to_ras(preview.confidence, matrix)
        if hasattr(preview.confidence, "CreateDefaultDisplayNodes"):
            preview.confidence.CreateDefaultDisplayNodes()
        display = preview.confidence.GetDisplayNode()
        if display is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(1.0, 0.5)
            # Where the confidence is 0 (and on slices never computed) the overlay is transparent:
            # the image shows through unchanged, as it was before the preview.
            display.SetApplyThreshold(True)
            display.SetAutoThreshold(False)
            display.SetLowerThreshold(1e-3)
            display.SetUpperThreshold(1.0)
            colour = (scene.GetFirstNodeByName("Inferno") or scene.GetFirstNodeByName("PET-Heat")
                      or scene.GetFirstNodeByName("ColdToHotRainbow"))
            if colour is not None:
                display.SetAndObserveColorNodeID(colour.GetID())

        pos_ras, pos_txt, neg_ras, neg_txt = [], [], [], []
        for rec in result.records:
            tag = "segment %s, slice %d" % (segment_ids[rec.label - 1] if rec.label - 1 < len(segment_ids)
                                            else rec.label, rec.index)
            for xy, ras_list, txt in ((rec.positive, pos_ras, pos_txt), (rec.negative, neg_ras, neg_txt)):
                if len(xy):
                    ras_list.append(points_ijk_to_ras(volume_node, slice_xy_to_ijk(xy, rec.index,
                                                                                   result.support.axis)))
                    txt.extend([tag] * len(xy))
        preview.positive = _markups(scene, "SynPo positive", POSITIVE_COLOUR,
                                    np.concatenate(pos_ras) if pos_ras else np.zeros((0, 3)), pos_txt)
        preview.negative = _markups(scene, "SynPo negative", NEGATIVE_COLOUR,
                                    np.concatenate(neg_ras) if neg_ras else np.zeros((0, 3)), neg_txt)
        # Last: a kept candidates node is overwritten only once everything else is made.
        wanted = {v: (names[v - 1] if v - 1 < len(names) else "label %d" % v) for v in result.support.labels}
        if reuse:
            preview.candidate_ids = write_labels(previous.candidates, volume_node, result.labels, wanted,
                                                 previous.candidate_ids)
        else:
            preview.candidates = _new_node(scene, "vtkMRMLSegmentationNode", "SynPo candidates")
            preview.candidates.CreateDefaultDisplayNodes()            # shown in the slice views
            preview.candidates.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            preview.candidate_ids = write_labels(preview.candidates, volume_node, result.labels, wanted)
    except Exception:
        preview.remove()                  # what this call created; a kept candidates node stays `previous`'s
        raise
    if reuse:
        preview.candidates, previous.candidates = previous.candidates, None
    for node in preview.nodes():
        _not_saved(node)
        # In the volume's own coordinates: under the volume's parent transform, they move with it.
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return preview


def ras_to_ijk(volume_node, ras) -> np.ndarray:
    """(N, 3) RAS millimetres -> (N, 3) continuous voxel indices (i, j, k) of the volume."""
    ras = np.atleast_2d(np.asarray(ras, dtype=float)).reshape(-1, 3)
    inv = np.linalg.inv(ijk_to_ras(volume_node))
    return ras @ inv[:3, :3].T + inv[:3, 3]


def markups_points_ijk(markups_node, volume_node) -> np.ndarray:
    """Control points of a markups node as continuous voxel indices (i, j, k) of the volume."""
    n = markups_node.GetNumberOfControlPoints()
    return ras_to_ijk(volume_node, [markups_node.GetNthControlPointPosition(i) for i in range(n)])


def slice_points(node, volume_node, axis: int, slice_index: int, segment_id: str) -> np.ndarray:
    """(n, 2) slice coordinates (x = column, y = row) of a markups node's points on one slice that
    belong to `segment_id`: the points SynPo placed for it, and the points the user added (which
    have no description). A list the user deleted (no longer in the scene: its object still holds
    its points) has none."""
    if node is None or node.GetScene() is None:
        return np.zeros((0, 2))
    in_plane = [a for a in (0, 1, 2) if a != 2 - axis]          # (x, y) columns of (i, j, k)
    p = markups_points_ijk(node, volume_node)
    keep = []
    for i in range(len(p)):
        tag = node.GetNthControlPointDescription(i) or ""
        mine = tag == "" or tag.startswith("segment %s," % segment_id)
        if mine and abs(round(p[i, 2 - axis]) - slice_index) < 0.5:
            keep.append(i)
    return p[keep][:, in_plane] if keep else np.zeros((0, 2))


def rerun_slice(preview: "PreviewNodes", volume_node, axis: int, slice_index: int, label: int, decode,
                before_write=None) -> int:
    """Decode one slice of one label again from the preview's markups points (as the user moved,
    added or deleted them) and update the candidate segment there. `decode(positive, negative)`
    returns the slice's new (H, W) mask (the server's re-decode). Returns the number of points used.
    Only that slice of the candidate segment changes: the user's paint and erasing on its other
    slices stay. The re-decoded slice is the user's correction, as paint there would be (the
    engine's labels, `preview.labels`, are left as they were): Update carries it through the volume
    as a corrected (or emptied) slice instead of walking over it, Apply writes it, Discard asks.
    `before_write()`: called once the new mask is there, just before the candidates change (the
    Segment Editor's undo state: a decode that fails saves none. 5.8's qMRMLSegmentEditorWidget::
    saveStateForUndo adds a state each call, vtkSegmentationHistory::SaveState: an empty step before
    the user's stroke; slicer-core's 5.10 logic was seen to leave no such step)."""
    if not 1 <= label <= len(preview.segment_ids):
        raise InputError("label %d is not one of the previewed segments" % label)
    segment_id = preview.segment_ids[label - 1]
    n = preview.labels.shape[axis]
    if not 0 <= slice_index < n:
        raise InputError("slice %d is outside the volume (0..%d)" % (slice_index, n - 1))
    sid = candidate_segment(preview, label)       # first: nothing changes where it cannot be written
    pos = slice_points(preview.positive, volume_node, axis, slice_index, segment_id)
    neg = slice_points(preview.negative, volume_node, axis, slice_index, segment_id)
    engine = np.moveaxis(preview.labels, axis, 0)[slice_index]
    mask = decode(pos, neg) if len(pos) else np.zeros(engine.shape, bool)
    _write_slices(preview, volume_node, sid, axis, {slice_index: mask & ((engine == 0) | (engine == label))},
                  before_write)
    return len(pos) + len(neg)


def _write_slices(preview: "PreviewNodes", volume_node, sid: str, axis: int, slices: Dict[int, np.ndarray],
                  before_write=None) -> None:
    """Candidate segment `sid` as the user left it, with `slices` ({slice across `axis`: (H, W) mask})
    replaced: the user's paint and erasing on its other slices stay."""
    shown = segment_array(preview.candidates, sid, volume_node)
    view = np.moveaxis(shown, axis, 0)
    for t, mask in slices.items():
        view[t] = mask
    if before_write is not None:
        before_write()
    name = preview.candidates.GetSegmentation().GetSegment(sid).GetName()
    write_labels(preview.candidates, volume_node, shown, {1: name}, {1: sid})


def candidate_segment(preview: "PreviewNodes", label: int) -> str:
    """The ID of label's segment in the candidates segmentation; InputError when the user removed the
    candidates node or that segment (the candidates can no longer be read)."""
    node, sid = preview.candidates, preview.candidate_ids.get(label)
    if node is None or node.GetScene() is None:
        raise InputError("The 'SynPo candidates' segmentation was removed: Preview again, or Discard.")
    if sid is None or node.GetSegmentation().GetSegment(sid) is None:
        raise InputError("The segment of label %d in 'SynPo candidates' was removed: Preview again, or Discard."
                         % label)
    return sid


def _edits(preview: "PreviewNodes", volume_node, axis: int, readable_only: bool = False,
           digests: Optional[Dict[int, List[bytes]]] = None):
    """(label, slice, the label's mask there now) for each slice (across the preview's axis) on which
    the user changed the label's segment of the candidates segmentation since the preview;
    readable_only: the labels whose segment the user removed are left out (else InputError).
    digests: filled with {label: slice_digests of its segment as read} (one segment held at a time)."""
    for label in sorted(preview.candidate_ids):
        try:
            sid = candidate_segment(preview, label)
        except InputError:
            if readable_only:
                continue
            raise
        now = np.moveaxis(segment_array(preview.candidates, sid, volume_node).astype(bool), axis, 0)
        if digests is not None:
            digests[label] = slice_digests(now)
        was = np.moveaxis(preview.labels == label, axis, 0)
        for t in np.flatnonzero((now != was).reshape(len(now), -1).any(1)):
            yield label, int(t), now[t]


def edited_slices(preview: "PreviewNodes", volume_node, axis: int, digests: Optional[Dict[int, List[bytes]]] = None):
    """What the user changed in the candidates segmentation since the preview, per label and slice
    (across the preview's axis): (paint [k, j, i] with each corrected slice's new mask as its label
    value, {label: slices the user emptied}: the organ is absent there). digests: as for _edits."""
    paint = np.zeros(preview.labels.shape, dtype=preview.labels.dtype)
    absent: Dict[int, List[int]] = {}
    target = np.moveaxis(paint, axis, 0)
    for label, t, now in _edits(preview, volume_node, axis, digests=digests):
        if now.any():
            target[t][now] = label
        else:
            absent.setdefault(label, []).append(t)
    return paint, absent


def slice_digests(mask_t: np.ndarray) -> List[bytes]:
    """A digest of each slice of `mask_t` (bool, the slicing axis first): which slices changed, without
    keeping the volume (13 segments of a 512 x 512 x 300 CT held as masks are 1 GB)."""
    import hashlib
    return [hashlib.blake2b(np.packbits(s).tobytes(), digest_size=16).digest() for s in mask_t]


def changed_since(preview: "PreviewNodes", volume_node, axis: int,
                  digests: Dict[int, List[bytes]]) -> Dict[int, Dict[int, np.ndarray]]:
    """{label: {slice: its mask now}} of the slices (across `axis`) of each candidate segment that
    differ from `digests` (edited_slices' of an Update: the edits the user made while it ran). One
    segment is read at a time; only the changed slices are kept."""
    out = {}
    for label in sorted(preview.candidate_ids):
        if label not in digests:
            continue
        try:
            sid = candidate_segment(preview, label)
        except InputError:
            continue
        now = np.moveaxis(segment_array(preview.candidates, sid, volume_node).astype(bool), axis, 0)
        was = digests[label]
        slices = {t: now[t].copy() for t, d in enumerate(slice_digests(now)) if t >= len(was) or d != was[t]}
        if slices:
            out[label] = slices
    return out


def carry_edits(preview: "PreviewNodes", volume_node, axis: int, edits: Dict[int, Dict[int, np.ndarray]]) -> int:
    """Write onto `preview`'s candidates each slice (across `axis`) of `edits` (changed_since of an
    older preview: the edits the user made while an Update ran). Returns the number of slices written."""
    kept = 0
    for label, slices in edits.items():
        if label not in preview.candidate_ids or not slices:
            continue
        _write_slices(preview, volume_node, candidate_segment(preview, label), axis, slices)
        kept += len(slices)
    return kept


def extra_segments(preview: "PreviewNodes", volume_node, axis: int) -> List[tuple]:
    """[(name, slices painted across `axis`)] of the segments the user added to the candidates
    segmentation and painted (not previewed ones: Apply does not write them, Discard removes them)."""
    node = preview.candidates
    if node is None or node.GetScene() is None:
        return []
    ours = set(preview.candidate_ids.values())
    segmentation = node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        if sid in ours:
            continue
        mask = np.moveaxis(segment_array(node, sid, volume_node).astype(bool), axis, 0)
        slices = int(mask.reshape(len(mask), -1).any(1).sum())
        if slices:
            out.append((segmentation.GetNthSegment(i).GetName(), slices))
    return out


def shown_labels(preview: "PreviewNodes", volume_node, axis: int, readable_only: bool = False):
    """The candidates as the user sees them: the preview's labels ([k, j, i]) with every slice the
    user painted or erased on the candidates segmentation as it is now (a label painted over
    another's voxels takes them), and how many slices were edited. What Apply writes, so that an
    edit not carried through the volume by Update is written as drawn, not dropped."""
    out = np.array(preview.labels, copy=True)
    view = np.moveaxis(out, axis, 0)
    edited = set()
    for label, t, now in _edits(preview, volume_node, axis, readable_only):
        view[t][view[t] == label] = 0
        view[t][now] = label
        edited.add(t)
    return out, len(edited)


# ------------------------------------------------------------------ writing segments

def write_labels(segmentation_node, volume_node, labels: np.ndarray, names: Dict[int, str],
                 segment_ids: Optional[Dict[int, str]] = None) -> Dict[int, str]:
    """Write each label value of `labels` ([k, j, i] on the volume's grid) into a segment.

    segment_ids maps label values to existing segments to overwrite; others get new
    segments named from `names`. Returns label -> segment ID.
    """
    register_segmentation_converters()
    scene = volume_node.GetScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    out = {}
    for value, name in names.items():
        sid = (segment_ids or {}).get(value)
        if sid is None:
            sid = segmentation.AddEmptySegment("", name)
        with _Scratch(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__synpo_labels__")
            slicer.util.updateVolumeFromArray(labelmap, (labels == value).astype(np.uint8))
            _set_ijk_to_ras(labelmap, ijk_to_ras(volume_node))
            # In the segmentation's own coordinates: the import maps the labelmap's world position
            # into the segmentation's frame (vtkSlicerSegmentationsModuleLogic::
            # ImportLabelmapToSegmentationNode), so a labelmap outside the transform the candidates
            # follow would land shifted by its inverse.
            labelmap.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
                raise InputError("Could not write segment %r." % sid)
        out[value] = sid
    return out


def labelmap_mtime(segmentation_node, segment_id: str):
    """The modification time of a segment's binary labelmap (None without one): while it is the same,
    so are the segment's voxels (painting or erasing modifies it; a shared layer's is modified by any of
    its segments', which only costs a read)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    rep = segment.GetRepresentation(name) if segment is not None else None
    return rep.GetMTime() if rep is not None else None


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment as a [k, j, i] uint8 array on the volume's grid."""
    register_segmentation_converters()
    scene = volume_node.GetScene()
    with _Scratch(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__synpo_read__")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                            volume_node)
        return (slicer.util.arrayFromVolume(labelmap) != 0).astype(np.uint8)


def temporary_nodes(scene) -> list:
    """Every node this module created and has not removed (for tests and clean-up)."""
    out = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(TEMP_ATTRIBUTE) == "1" or (node.GetName() or "").startswith("__synpo_"):
            out.append(node)
    return out
