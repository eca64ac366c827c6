"""The module's MRML logic against real MRML nodes (the `slicer-core` package: Slicer without Qt)."""
import os
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "SynPoSlicer"))

import slicer  # noqa: E402  (slicer-core)

from conftest import ellipsoid_volume  # noqa: E402
from SynPoSlicerLib import mrml  # noqa: E402
from SynPoSlicerLib.runner import JobGuard, ModelCache, PreviewJob  # noqa: E402
from synpo.errors import InputError, SynPoError  # noqa: E402
from synpo.outputs import slice_xy_to_ijk  # noqa: E402
from synpo.volume import sam_store  # noqa: E402


def oblique_matrix(spacing=(0.8, 1.3, 4.0), origin=(12.0, -30.0, 5.0), degrees=25.0):
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    m = np.eye(4)
    m[:3, :3] = rot * np.asarray(spacing)
    m[:3, 3] = origin
    return m


def add_volume(scene, array, matrix, name="image"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    mrml._set_ijk_to_ras(node, matrix)
    return node


def add_segment(seg_node, volume_node, mask, name):
    return mrml.write_labels(seg_node, volume_node, mask.astype(np.uint8), {1: name})[1]


@pytest.fixture(scope="module")
def models():
    from synpo.features import SamModel
    return SamModel.load("litemedsam", "cpu"), None, ("sam",)


@pytest.fixture
def scene_case():
    mrml.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)   # as in Slicer's own scene
    image, mask = ellipsoid_volume(shape=(8, 48, 60), centre=(4, 22, 30), radii=(3, 11, 14))
    matrix = oblique_matrix()
    volume = add_volume(scene, image, matrix)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    paint = np.zeros(mask.shape, dtype=bool)
    paint[4] = mask[4]
    target = add_segment(seg, volume, paint, "target")
    other = np.zeros(mask.shape, dtype=bool)
    other[1:7, 2:8, 2:9] = True                      # a 3D segment the user made earlier
    other_id = add_segment(seg, volume, other, "other")
    return dict(scene=scene, volume=volume, seg=seg, target=target, other=other_id, image=image, mask=mask,
                paint=paint, other_mask=other, matrix=matrix)


def test_oblique_anisotropic_volume_round_trips(scene_case):
    c = scene_case
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    assert np.array_equal(inputs.image, c["image"])
    assert np.allclose(inputs.spacing, (0.8, 1.3, 4.0))
    assert np.array_equal(inputs.support == 1, c["paint"])
    assert inputs.axis == 0
    ijk = np.array([[3.0, 7.0, 2.0], [10.5, 0.0, 5.0]])
    expected = ijk @ c["matrix"][:3, :3].T + c["matrix"][:3, 3]
    assert np.allclose(mrml.points_ijk_to_ras(c["volume"], ijk), expected)
    # ... and RAS back to IJK through a markups node
    node = c["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "p")
    for p in expected:
        node.AddControlPoint(*p)
    assert np.allclose(mrml.markups_points_ijk(node, c["volume"]), ijk)


def _preview(c, models):
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    cache = ModelCache()
    cache.models[("litemedsam", "sam", "small", "cpu")] = models
    job = PreviewJob(inputs, cache, "vol", sam="litemedsam", features="sam", device="cpu").run()
    assert job.error is None and job.result is not None
    return job, mrml.show_preview(c["volume"], job.result, [c["target"]], ["target"])


def test_preview_points_land_at_their_ras_positions_and_discard_removes_everything(scene_case, models):
    c = scene_case
    n_before = c["scene"].GetNumberOfNodes()
    job, preview = _preview(c, models)
    result = job.result
    assert preview.positive.GetNumberOfControlPoints() > 0
    rec = next(r for r in result.records if r.positive)
    ijk = slice_xy_to_ijk(rec.positive, rec.index, result.support.axis)
    ras = mrml.points_ijk_to_ras(c["volume"], ijk)
    got = np.array([preview.positive.GetNthControlPointPosition(i) for i in range(len(ras))])
    assert np.allclose(got, ras, atol=1e-4)
    assert preview.positive.GetDisplayNode().GetSelectedColor() == pytest.approx(mrml.POSITIVE_COLOUR)
    conf = slicer.util.arrayFromVolume(preview.confidence)
    assert conf.shape == c["image"].shape and np.allclose(mrml.ijk_to_ras(preview.confidence), c["matrix"])
    # The candidate mask found the object on the slices next to the paint.
    cand = mrml.segment_array(preview.candidates, preview.candidates.GetSegmentation().GetNthSegmentID(0),
                              c["volume"])
    inter = (cand[3:6].astype(bool) & c["mask"][3:6]).sum()
    assert 2 * inter / (cand[3:6].sum() + c["mask"][3:6].sum()) > 0.7
    preview.remove()
    assert c["scene"].GetNumberOfNodes() == n_before
    assert mrml.temporary_nodes(c["scene"]) == []


def test_commit_changes_only_the_chosen_segment_and_undo_restores_it(scene_case, models):
    c = scene_case
    other_before = mrml.segment_array(c["seg"], c["other"], c["volume"])
    target_before = mrml.segment_array(c["seg"], c["target"], c["volume"])
    _, preview = _preview(c, models)
    record = mrml.commit(preview, c["seg"], c["volume"])
    preview.remove()
    target_after = mrml.segment_array(c["seg"], c["target"], c["volume"])
    assert np.array_equal(mrml.segment_array(c["seg"], c["other"], c["volume"]), other_before)
    assert np.array_equal(target_after.astype(bool), preview.labels == 1)
    assert np.array_equal(target_after[4].astype(bool), c["paint"][4])          # the paint is unchanged
    assert target_after.sum() > target_before.sum()
    assert c["seg"].GetSegmentation().GetNumberOfSegments() == 2
    mrml.undo_commit(record)
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]), target_before)
    assert np.array_equal(mrml.segment_array(c["seg"], c["other"], c["volume"]), other_before)
    assert mrml.temporary_nodes(c["scene"]) == []


def test_rerun_one_slice_from_edited_points(scene_case, models):
    c = scene_case
    job, preview = _preview(c, models)
    store = sam_store(job.cache.stores_for("vol"))
    t = 3
    before = preview.labels.copy()
    # The user deletes every point of slice 3 and places one positive point in the object's middle.
    for node in (preview.positive, preview.negative):
        ijk = mrml.markups_points_ijk(node, c["volume"])
        for i in reversed(range(node.GetNumberOfControlPoints())):
            if round(ijk[i, 2]) == t:
                node.RemoveNthControlPoint(i)
    preview.positive.AddControlPoint(*mrml.points_ijk_to_ras(c["volume"], [[30.0, 22.0, t]])[0])
    used = mrml.rerun_slice(preview, c["volume"], 0, t, models[0], store)
    assert used == 1
    got = preview.labels[t] == 1
    assert 2 * (got & c["mask"][t]).sum() / (got.sum() + c["mask"][t].sum()) > 0.6
    assert np.array_equal(np.delete(preview.labels, t, 0), np.delete(before, t, 0))    # other slices untouched
    cand = mrml.segment_array(preview.candidates, preview.candidates.GetSegmentation().GetNthSegmentID(0),
                              c["volume"])
    assert np.array_equal(cand.astype(bool), preview.labels == 1)                   # the preview layer follows
    # Deleting the last positive point empties the slice.
    preview.positive.RemoveNthControlPoint(preview.positive.GetNumberOfControlPoints() - 1)
    mrml.rerun_slice(preview, c["volume"], 0, t, models[0], store)
    assert not (preview.labels[t] == 1).any()
    preview.remove()


def test_cancelled_run_changes_nothing(scene_case, models):
    c = scene_case
    n_before = c["scene"].GetNumberOfNodes()
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    cache = ModelCache()
    cache.models[("litemedsam", "sam", "small", "cpu")] = models
    job = PreviewJob(inputs, cache, "vol", features="sam", device="cpu")
    job.cancel()
    job.start().wait(60)
    assert job.cancelled and job.result is None and job.error is None
    assert c["scene"].GetNumberOfNodes() == n_before
    assert mrml.temporary_nodes(c["scene"]) == []


def test_running_twice_at_once_is_refused():
    release = threading.Event()

    class SlowJob(PreviewJob):
        def __init__(self):
            super().__init__(None, ModelCache(), "x")

        def _work(self):
            release.wait(10)

    guard = JobGuard()
    guard.start(SlowJob)
    with pytest.raises(SynPoError, match="already running"):
        guard.start(SlowJob)
    release.set()
    guard.job.wait(10)
    guard.start(SlowJob)            # once finished, a new preview may start
    release.set()


def test_bad_inputs_get_messages(scene_case):
    c = scene_case
    scene = c["scene"]
    with pytest.raises(InputError, match="Select an input volume"):
        mrml.extract_inputs(None, c["seg"], [c["target"]])
    with pytest.raises(InputError, match="Select a segmentation"):
        mrml.extract_inputs(c["volume"], None, [c["target"]])
    with pytest.raises(InputError, match="Select the segment"):
        mrml.extract_inputs(c["volume"], c["seg"], [])
    empty = c["seg"].GetSegmentation().AddEmptySegment("", "empty")
    with pytest.raises(InputError, match="'empty' is empty"):
        mrml.extract_inputs(c["volume"], c["seg"], [empty])
    # Paint on two non-parallel planes.
    cross = c["paint"].copy()
    cross[:, 10:30, 30] = True
    cross_id = add_segment(c["seg"], c["volume"], cross, "cross")
    with pytest.raises(InputError, match="parallel slices"):
        mrml.extract_inputs(c["volume"], c["seg"], [cross_id])
    # A 2D volume.
    flat = add_volume(scene, c["image"][:1], c["matrix"], "flat")
    with pytest.raises(InputError, match="2D"):
        mrml.extract_inputs(flat, c["seg"], [c["target"]])
    # A 4D volume (vector components per voxel, as a multi-frame volume is stored).
    vec = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "vec")
    slicer.util.updateVolumeFromArray(vec, np.stack([c["image"]] * 3, axis=-1))
    with pytest.raises(InputError, match="components"):
        mrml.extract_inputs(vec, c["seg"], [c["target"]])
    # A segmentation painted on a grid rotated against the volume's.
    other_scene_vol = add_volume(scene, c["image"], oblique_matrix(degrees=60.0), "rotated")
    seg2 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg2")
    seg2.SetReferenceImageGeometryParameterFromVolumeNode(other_scene_vol)
    sid = add_segment(seg2, other_scene_vol, c["paint"], "painted elsewhere")
    with pytest.raises(InputError, match="not parallel"):
        mrml.extract_inputs(c["volume"], seg2, [sid])
