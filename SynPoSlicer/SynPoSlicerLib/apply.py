"""Writing a preview into the user's segments the way the Segment Editor does: one undo step.

Scene undo is off in Slicer, so `scene.SaveStateForUndo()` saves nothing. The Segment Editor has
its own history: its logic (vtkSlicerSegmentEditorLogic, Slicer 5.10+; the editor widget's
`saveStateForUndo` before) saves the segmentation once, then every segment is modified through
the editor's masking settings (editable area, editable intensity range, overwrite other segments
or not), so a finished structure the user protected stays as it is. Ctrl+Z in the Segment Editor
takes the whole preview back in one step and nothing else.
"""
from typing import Dict, Sequence

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


def editor_logic(scene, segmentation_node, volume_node, editor_node=None):
    """A Segment Editor logic on `segmentation_node` with the editor's masking settings
    (`editor_node`, else a default one: everywhere editable, other segments overwritten)."""
    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
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


def apply_labels(logic, segmentation_node, volume_node, labels: np.ndarray, segment_ids: Sequence[str],
                 save_state=None) -> Dict[str, int]:
    """Write label v of `labels` ([k, j, i] on the volume's grid) into segment_ids[v - 1], in ONE
    undo step, through the masking settings of `logic` (a vtkSlicerSegmentEditorLogic). The undo
    state is saved by `save_state()` (in Slicer: the Segment Editor widget's saveStateForUndo, so
    that its Ctrl+Z takes the step back), else in `logic`'s own history. Returns the voxels given to
    each segment (masking may keep fewer)."""
    segmentation = segmentation_node.GetSegmentation()
    for sid in segment_ids:
        if segmentation.GetSegment(sid) is None:
            raise InputError("segment %r is no longer in %s" % (sid, segmentation_node.GetName()))
    matrix = volume_to_segmentation(volume_node, segmentation_node)
    (save_state or logic.SaveStateForUndo)()
    for value, sid in enumerate(segment_ids, start=1):
        logic.ModifySegmentByLabelmap(segmentation_node, sid, oriented_mask(labels == value, matrix),
                                      logic.ModificationModeSet, False, False)
    return {sid: int((labels == v).sum()) for v, sid in enumerate(segment_ids, start=1)}
