"""Writing a preview into the user's segments the way the Segment Editor does: one undo step.

Scene undo is off in Slicer, so `scene.SaveStateForUndo()` saves nothing. The Segment Editor has
its own history: its logic (vtkSlicerSegmentEditorLogic, Slicer 5.10+; the editor widget's
`saveStateForUndo` before) saves the segmentation once, then every segment is modified through
the editor's masking settings (editable area, editable intensity range, overwrite other segments
or not), so a finished structure the user protected stays as it is. Ctrl+Z in the Segment Editor
takes the whole preview back in one step and nothing else.

Writers (`write(segmentation_node, segment_id, oriented_labelmap)`): the SynPo effect's own
`modifySegmentByLabelmap` (any Slicer, masking honoured), `logic_writer` (Slicer 5.10+'s
vtkSlicerSegmentEditorLogic, masking honoured) and `node_writer` (the segmentation node's own API,
for a Slicer without that logic class, i.e. 5.8's panel: the segment is replaced, other segments
are left as they are). `write_preview` checks first that Slicer will write (`check_writable`) and
afterwards that it did: never "Applied" without a change.
"""
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import slicer
import vtk
from vtk.util import numpy_support

from synpo.errors import InputError


def oriented_mask(mask: np.ndarray, ijk_to_world: np.ndarray):
    """A [k, j, i] boolean array as a vtkOrientedImageData (uint8 0/1) placed by `ijk_to_world`."""
    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_world[r, c]))
    image.SetImageToWorldMatrix(m)
    return image


def on_segmentation_grid(segmentation_node, labelmap):
    """`labelmap` (vtkOrientedImageData in the segmentation node's coordinates) resampled, nearest
    neighbour, onto the segmentation's own grid ("Reference image geometry"; as is where it has none).

    Slicer's effects paint on that grid (qSlicerSegmentEditorAbstractEffect::defaultModifierLabelmap),
    and "Set" assumes it: vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap (5.10; the effect's
    modifySegmentByLabelmap before) clears the segment by thresholding its own labelmap, gives that the
    modifier's image-to-world matrix (SetGeometryFromImageToWorldMatrix) and merges (MODE_MERGE_MIN):
    on another grid (a segmentation oversampled by Specify geometry, or made on another volume) voxels
    of the old segment outside the preview stayed, and vtkSegmentationModifier::AppendLabelmapToSegment
    resampled the other segments sharing its layer onto the volume's coarser grid."""
    reference = _reference_geometry(segmentation_node)
    if reference is None:
        return labelmap
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, out,
                                                                                      False, True)
    return out


def _reference_geometry(segmentation_node):
    """The segmentation's own grid ("Reference image geometry") as an empty vtkOrientedImageData, or
    None where it has none."""
    geometry = segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    if not geometry:
        return None
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, False)
    return image


def volume_to_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """IJK of the volume -> the segmentation node's own coordinates, through both nodes' parent
    transforms (linear ones; a warped volume is refused: harden the transform first)."""
    from SynPoSlicerLib.mrml import ijk_to_ras
    m = vtk.vtkMatrix4x4()
    src, dst = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(src, dst, m):
        raise InputError("the volume and the segmentation are related by a non-linear transform; harden it "
                         "(Data module, right-click, Harden transform) and try again")
    between = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return between @ ijk_to_ras(volume_node)


def has_editor_logic() -> bool:
    """vtkSlicerSegmentEditorLogic exists from Slicer 5.10 (the Segment Editor's logic split)."""
    return hasattr(slicer, "vtkSlicerSegmentEditorLogic")


def editor_logic(scene, segmentation_node, volume_node, editor_node=None):
    """A Segment Editor logic on `segmentation_node` with the editor's masking settings
    (`editor_node`, else a default one: everywhere editable, other segments overwritten).
    Slicer 5.10+ only (has_editor_logic); before, use the effect's writer or node_writer."""
    if not has_editor_logic():
        raise InputError("this Slicer has no vtkSlicerSegmentEditorLogic (before 5.10): apply from the SynPo "
                         "Segment Editor effect, which uses the editor's own undo")
    if editor_node is None:
        editor_node = slicer.vtkMRMLSegmentEditorNode()
        editor_node.SetSingletonTag("SynPoApply")
        editor_node = scene.AddNode(editor_node)
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(volume_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    return logic


def logic_writer(logic) -> Callable:
    """Write through a vtkSlicerSegmentEditorLogic: the editor node's masking settings apply."""
    def write(segmentation_node, segment_id, labelmap):
        # The editable-area mask is built around the editor node's *selected* segment
        # (vtkSlicerSegmentEditorLogic::UpdateMaskLabelmap -> GenerateEditMask): select the one written.
        logic.GetSegmentEditorNode().SetSelectedSegmentID(segment_id)
        logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, logic.ModificationModeSet,
                                      False, False)
    return write


def node_writer() -> Callable:
    """Write through the segmentation node's own API (vtkSlicerSegmentationsModuleLogic::
    SetBinaryLabelmapToSegment, MODE_REPLACE): the segment becomes the labelmap; other segments are
    not modified (overlap allowed). For a Slicer without vtkSlicerSegmentEditorLogic (5.8)."""
    module_logic = slicer.vtkSlicerSegmentationsModuleLogic

    def write(segmentation_node, segment_id, labelmap):
        if not module_logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id,
                                                       module_logic.MODE_REPLACE):
            raise InputError("Slicer refused to write segment %r of %s" % (segment_id, segmentation_node.GetName()))
    return write


def check_volume(volume_node) -> None:
    """Refuse where the volume a preview was made for is no longer in the scene (deleted in the Data
    module): reading the candidates on its grid (mrml.segment_array) needs it."""
    if volume_node is None or volume_node.GetScene() is None:
        raise InputError("the volume this preview was made for has been removed; run the preview again")


def check_writable(segmentation_node, volume_node, segment_ids: Sequence[str], editor_node=None) -> None:
    """Refuse, with a message saying what to do, where Slicer would write nothing: the segmentation
    or a segment removed since the preview; "Editable intensity range" on while the segmentation's
    geometry differs from the volume's (qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap
    then returns without writing)."""
    if segmentation_node is None or segmentation_node.GetScene() is None:
        raise InputError("the segmentation this preview was made for has been removed; run the preview again")
    check_volume(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    for sid in segment_ids:
        if segmentation.GetSegment(sid) is None:
            raise InputError("segment %r is no longer in %s; the preview is kept: add the segment again or "
                             "discard the preview" % (sid, segmentation_node.GetName()))
    if editor_node is not None and _intensity_mask_on(editor_node) and not _same_geometry(segmentation_node,
                                                                                           volume_node):
        raise InputError("'Editable intensity range' is on in the Segment Editor and %s's geometry differs from "
                         "%s's, so Slicer would write nothing; turn the intensity range off or set the "
                         "segmentation's geometry to the volume (Segment Editor, Specify geometry)"
                         % (segmentation_node.GetName(), volume_node.GetName()))


def _intensity_mask_on(editor_node) -> bool:
    getter = getattr(editor_node, "GetSourceVolumeIntensityMask", None) or \
        getattr(editor_node, "GetMasterVolumeIntensityMask", None)
    return bool(getter()) if getter is not None else False


def _same_geometry(segmentation_node, volume_node, tol: float = 1e-4) -> bool:
    """Whether the segmentation's labelmap geometry is the volume's (same grid in world space)."""
    image = _reference_geometry(segmentation_node)
    if image is None:
        return True
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    seg_matrix = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    dims = volume_node.GetImageData().GetDimensions()
    same_extent = tuple(extent[1::2][i] - extent[0::2][i] + 1 for i in range(3)) == tuple(dims) and extent[0::2] == (0, 0, 0)
    return same_extent and np.allclose(seg_matrix, volume_to_segmentation(volume_node, segmentation_node), atol=tol)


def write_preview(segmentation_node, volume_node, labels: np.ndarray, segment_ids: Sequence[str], write: Callable,
                  save_state: Optional[Callable] = None) -> Dict[str, int]:
    """Write label v of `labels` ([k, j, i] on the volume's grid) into segment_ids[v - 1] with
    `write`, after ONE `save_state()` (the undo step). Returns the voxels that changed in each
    segment; raises InputError when Slicer wrote nothing although the preview differs from the
    segments (the masking settings excluded every voxel): the caller keeps the preview."""
    from SynPoSlicerLib.mrml import segment_array
    check_writable(segmentation_node, volume_node, segment_ids)
    matrix = volume_to_segmentation(volume_node, segmentation_node)
    before = {sid: segment_array(segmentation_node, sid, volume_node).astype(bool) for sid in segment_ids}
    if save_state is not None:
        save_state()
    for value, sid in enumerate(segment_ids, start=1):
        write(segmentation_node, sid, on_segmentation_grid(segmentation_node, oriented_mask(labels == value, matrix)))
    changed = {sid: int((segment_array(segmentation_node, sid, volume_node).astype(bool) != before[sid]).sum())
               for sid in segment_ids}
    wanted = sum(int(((labels == v) != before[sid]).sum()) for v, sid in enumerate(segment_ids, start=1))
    if wanted and not any(changed.values()):
        raise InputError("Slicer wrote nothing into %s: the Segment Editor's masking settings (editable area, "
                         "editable intensity range) exclude every voxel of the preview; the preview is kept"
                         % segmentation_node.GetName())
    return changed


def show_written(segmentation_node, segment_ids: Sequence[str]) -> List[str]:
    """Show the segments just written where they (or their segmentation) were hidden, and return
    their names: Slicer's effects do not paint into a hidden segment unseen either (qSlicerSegment-
    EditorAbstractEffect::confirmCurrentSegmentVisible asks, then shows the segment and its
    segmentation); an Apply the user asked for is shown, else it looked as if nothing happened."""
    display = segmentation_node.GetDisplayNode()
    if display is None:
        return []
    hidden = [sid for sid in segment_ids if not display.GetVisibility() or not display.GetSegmentVisibility(sid)]
    for sid in hidden:
        display.SetSegmentVisibility(sid, True)
    if hidden:
        display.SetVisibility(True)
    return [segmentation_node.GetSegmentation().GetSegment(sid).GetName() for sid in hidden]


def apply_labels(logic, segmentation_node, volume_node, labels: np.ndarray, segment_ids: Sequence[str],
                 save_state=None) -> Dict[str, int]:
    """write_preview through a vtkSlicerSegmentEditorLogic (Slicer 5.10+), its masking settings
    and, unless `save_state` is given (in Slicer: the Segment Editor widget's saveStateForUndo, so
    that its Ctrl+Z takes the step back), its own undo history. Returns the voxels changed."""
    check_writable(segmentation_node, volume_node, segment_ids, logic.GetSegmentEditorNode())
    return write_preview(segmentation_node, volume_node, labels, segment_ids, logic_writer(logic),
                         save_state or logic.SaveStateForUndo)
