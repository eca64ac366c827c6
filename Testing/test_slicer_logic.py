"""The module's MRML logic against real MRML nodes (the `slicer-core` package: Slicer without Qt)."""
import contextlib
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "SynPoSlicer"))

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from conftest import Server, ellipsoid_volume  # noqa: E402
from SynPoSlicerLib import apply as applying  # noqa: E402
from SynPoSlicerLib import mrml  # noqa: E402
from SynPoSlicerLib.engine import RemoteJob  # noqa: E402
from synpo.errors import InputError  # noqa: E402
from synpo.outputs import slice_xy_to_ijk  # noqa: E402


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
def server(tmp_path_factory):
    """A real `synpo serve` process, as the module starts one (LiteMedSAM on the CPU)."""
    folder = tmp_path_factory.mktemp("slicer-server")
    srv = Server(str(folder), "--embedding-cache", str(folder / "emb"))
    yield srv
    srv.stop()


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
    # The direction sent with it (synpo/layout.py): ITK's LPS, unit columns, from the IJK-to-RAS matrix.
    rotation = c["matrix"][:3, :3] / np.array([0.8, 1.3, 4.0])
    assert np.allclose(np.reshape(inputs.direction, (3, 3)), np.diag([-1, -1, 1]) @ rotation)
    ijk = np.array([[3.0, 7.0, 2.0], [10.5, 0.0, 5.0]])
    expected = ijk @ c["matrix"][:3, :3].T + c["matrix"][:3, 3]
    assert np.allclose(mrml.points_ijk_to_ras(c["volume"], ijk), expected)
    # ... and RAS back to IJK through a markups node
    node = c["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "p")
    for p in expected:
        node.AddControlPoint(*p)
    assert np.allclose(mrml.markups_points_ijk(node, c["volume"]), ijk)


def run_job(job, timeout=300):
    deadline = time.time() + timeout
    while job.active() and time.time() < deadline:
        job.step()
        time.sleep(0.05)
    return job


def _preview(c, server):
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = run_job(RemoteJob(server.client(timeout=10), inputs.image, inputs.spacing, inputs.support))
    assert job.state == "done" and job.error == "" and job.result is not None, job.error
    return job, mrml.show_preview(c["volume"], job.result, [c["target"]], ["target"])


def test_a_volume_stored_transposed_previews_as_the_volume_stored_as_drawn(scene_case, server):
    """The case's volume loaded from a file that stores i and j the other way round (its IJK-to-RAS
    columns exchanged with the array's axes): the module sends its direction, and the preview is the
    case's, in this node's layout (the encoders are given the slices as the slice views draw them)."""
    c = scene_case
    given = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])     # (its direction sent, as the module does)
    drawn = run_job(RemoteJob(server.client(timeout=10), given.image, given.spacing, given.support,
                              direction=given.direction))
    assert drawn.state == "done" and drawn.error == "", drawn.error
    T = lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))
    matrix = c["matrix"].copy()
    matrix[:, [0, 1]] = matrix[:, [1, 0]]
    volume = add_volume(c["scene"], T(c["image"]), matrix, "stored transposed")
    seg = c["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation 2")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = add_segment(seg, volume, T(c["paint"]), "target")
    inputs = mrml.extract_inputs(volume, seg, [target])
    assert np.array_equal(inputs.support == 1, T(c["paint"]))
    job = run_job(RemoteJob(server.client(timeout=10), inputs.image, inputs.spacing, inputs.support,
                            direction=inputs.direction))
    assert job.state == "done" and job.error == "", job.error
    assert drawn.result.labels.any() and np.array_equal(job.result.labels, T(drawn.result.labels))
    # (the labels of this small case alone come out the same from the slices as stored; SAM's figures do not)
    figures = lambda result: [(r.label, r.index, r.status, r.score, r.sam_iou) for r in result.records]
    assert figures(job.result) == figures(drawn.result)


def test_a_sheared_volume_is_sent_without_a_direction():
    """A volume node whose IJK-to-RAS is sheared (a hardened shear transform; Slicer keeps it): its
    direction would be refused by the server (meta.direction: not orthogonal, a 400 for the whole
    preview), so none is sent and its slices are taken as stored; an oblique one is sent."""
    from synpo.layout import check_direction
    scene = slicer.vtkMRMLScene()
    image = np.zeros((4, 5, 6), np.float32)
    sheared = np.eye(4)
    sheared[:3, :3] = [[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    assert mrml.direction_lps(add_volume(scene, image, sheared, "sheared")) is None
    oblique = mrml.direction_lps(add_volume(scene, image, oblique_matrix(), "oblique"))
    assert check_direction(oblique) == oblique


def test_a_file_read_by_slicer_sends_the_direction_the_cli_sends(tmp_path):
    """A file loaded as Slicer loads it (vtkMRMLVolumeArchetypeStorageNode::ReadData, slicer-core's own
    reader) gives the module the direction `synpo segment` takes from the same file (io.Geometry's
    known_direction): none for a placeholder header (a diagonal direction at origin 0: ITK's default,
    nibabel's np.eye, BTCV's and ACDC's copies), the header's for a DICOM-like placement (its axial slices
    turned posterior side up, layout.rows_reversed), a RAS-stored one and an oblique one."""
    import SimpleITK as sitk
    from synpo.io import read_geometry
    scene = slicer.vtkMRMLScene()
    tilted = tuple(oblique_matrix()[:3, :3].ravel() / np.tile([0.8, 1.3, 4.0], 3))
    cases = [((1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, 0), None),
             ((-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 0), None),
             ((1, 0, 0, 0, 1, 0, 0, 0, 1), (-180.0, -160.0, 40.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
             ((-1, 0, 0, 0, -1, 0, 0, 0, 1), (178.0, -11.3, 94.3), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
             (tilted, (0, 0, 0), tilted)]
    for n, (direction, origin, expected) in enumerate(cases):
        image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
        image.SetSpacing((0.7, 0.8, 3.0))
        image.SetDirection(direction)
        image.SetOrigin(origin)
        path = str(tmp_path / ("v%d.nii.gz" % n))
        sitk.WriteImage(image, path)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        assert storage.ReadData(node)
        sent, cli = mrml.direction_lps(node), read_geometry(path).known_direction
        if expected is None:
            assert sent is None and cli is None, (n, sent, cli)
        else:
            assert np.allclose(sent, expected, atol=1e-5) and np.allclose(cli, expected, atol=1e-5), (n, sent, cli)


def test_the_volume_goes_up_in_short_steps_and_cancel_stops_it(scene_case, server, monkeypatch):
    """The module's timer sends the volume a chunk per tick (PythonQt holds the GIL while Qt idles: a
    Python thread would not run, and one call froze Slicer for seconds on a large CT), then the run's
    support the same way; the status line says how far it is, and Cancel during it leaves no session
    behind."""
    c = scene_case
    monkeypatch.setattr(RemoteJob, "UPLOAD_CHUNK", 2048)
    monkeypatch.setattr(RemoteJob, "UPLOAD_SECONDS", 0.0)     # one chunk per step
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    client = server.client(timeout=10)
    sessions = len(client.json("GET", "/v1/sessions")["sessions"])
    job = RemoteJob(client, inputs.image, inputs.spacing, inputs.support)
    stages = []
    while job.state == "upload":
        job.step()
        stages.append(job.stage)
    assert len(stages) > inputs.image.nbytes // 2048 and stages[0].startswith("sending the volume (")
    starting = 0
    while job.state == "start":                             # the run's support label map: also in steps
        job.step()
        starting += 1
    assert starting > inputs.support.nbytes // 2048 and job.state == "running", job.error
    assert run_job(job).state == "done", job.error
    cancelled = RemoteJob(client, inputs.image, inputs.spacing, inputs.support)
    for _ in range(5):
        cancelled.step()
    cancelled.cancel()
    assert cancelled.state == "cancelled" and cancelled._upload is None
    assert len(client.json("GET", "/v1/sessions")["sessions"]) == sessions + 1     # only the finished job's
    # Cancel once the run's message is sent, before its answer is read: the server started the run;
    # it is found and cancelled, not left running unseen (the session would stay busy for the next preview).
    late = RemoteJob(client, inputs.image + 3.0, inputs.spacing, inputs.support)     # not embedded: a long run
    while not (late.state == "start" and late._upload is not None and late._upload.waiting()):
        assert late.step() in RemoteJob.ACTIVE, late.error
    late.cancel(now=True)                                   # returns at once; the next steps read the answer
    while late.state == "cancelling":
        late.step()
        time.sleep(0.01)
    assert late.state == "cancelled" and late.run_id is not None
    assert client.wait(late.session_id, late.run_id)["state"] == "cancelled"


def test_the_result_comes_down_in_short_steps_and_cancel_stops_it(scene_case, server, monkeypatch):
    """The result too, a step per tick (client.ResultDownload): one call froze Slicer while the server
    packed a large result and Slicer unpacked it. The status line says how far it is; the result is
    the server's; Cancel while it comes down ends the job with nothing shown, and the server forgets
    the message it had packed."""
    c = scene_case
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    client = server.client(timeout=10)
    first = run_job(RemoteJob(client, inputs.image, inputs.spacing, inputs.support))
    monkeypatch.setattr(RemoteJob, "DOWNLOAD_CHUNK", 2048)
    monkeypatch.setattr(RemoteJob, "UPLOAD_SECONDS", 0.0)     # one request or one chunk per step
    for cancel in (False, True):
        job = RemoteJob(client, None, (), inputs.support, session_id=first.session_id)
        while job.state != "fetch":
            assert job.step() in RemoteJob.ACTIVE, job.error
        stages, shown = [], []
        while job.state == "fetch" and not (cancel and len(stages) == 3):
            job.step()
            stages.append(job.stage)
            shown.append(job.done)
        # The bar only goes forward (it fell back when the confidence, larger than the labels, began).
        assert shown == sorted(shown), shown
        if cancel:
            job.cancel(now=True)                                # as the module's Cancel does
            assert job.state == "cancelled" and job.result is None and not job.active()
            # The server forgot the message it had packed for the parts: asked again, it packs it anew.
            again = client.result_download(job.session_id, job.run_id, "max", chunk=2048)
            assert again.step() is None and again.packing and again.total is None
            continue
        assert job.state == "done", job.error
        assert len(stages) > 10 and stages[0].startswith("receiving the result (")
        whole = client.result(job.session_id, job.run_id, "max")
        assert np.array_equal(job.result.labels, whole.labels)
        assert np.array_equal(job.result.confidence[1], whole.confidence[1])


def _stepped_logic(monkeypatch, server, scene):
    """(logic, parameters, client, sessions()) for a preview whose volume goes one 2 KB chunk per step."""
    monkeypatch.setattr(RemoteJob, "UPLOAD_CHUNK", 2048)
    monkeypatch.setattr(RemoteJob, "UPLOAD_SECONDS", 0.0)     # one chunk per step
    logic = _module_logic(monkeypatch)
    logic.useServer(server.url, server.token_file)
    client = server.client(timeout=10)
    return (logic, _parameters(logic, scene), client,
            lambda: set(s["session"] for s in client.json("GET", "/v1/sessions")["sessions"]))


def _step_until_sent(logic, seconds=60):
    """Step a preview until its volume is all sent and the server's answer is due (not read)."""
    deadline = time.time() + seconds
    while not (logic.job is not None and logic.job._upload is not None and logic.job._upload.waiting()):
        assert logic.step() in ("starting", "running") and time.time() < deadline, logic.message


def test_a_cancel_as_the_server_answers_leaves_nothing_unseen(scene_case, server, monkeypatch):
    """Cancel once the volume is sent, before the server's answer is read: the server has made the
    session; the job reads its name, and the module's next preview of this volume uses it (the volume
    is not sent again, no session is left unseen). And Cancel (not at once) while the run ends: the
    result is not fetched, the job ends cancelled."""
    c = scene_case
    logic, params, client, sessions = _stepped_logic(monkeypatch, server, c["scene"])
    volume = add_volume(c["scene"], c["image"] + 7.0, c["matrix"], "cancelled upload")
    before = sessions()
    logic.startPreview(volume, c["seg"], [c["target"]], params)
    _step_until_sent(logic)
    logic.cancel()
    assert logic.state == "cancelled" and not logic.active()
    while logic.settling():                                   # the timer goes on until the answer is read
        logic.poll()
        time.sleep(0.01)
    assert logic.job.state == "cancelled"
    made = sessions() - before
    assert made == {logic.job.session_id}
    messages = []
    logic.startPreview(volume, c["seg"], [c["target"]], params)
    while logic.active():
        logic.step()
        messages.append(logic.message)
        time.sleep(0.02)
    assert logic.state == "previewed", logic.message
    assert any("The volume is on the server already" in m for m in messages), messages
    assert sessions() - before == made
    logic.discard()
    # Cancel without "now" (the next step sends it) while the run ends on the server.
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(client, inputs.image, inputs.spacing, inputs.support)
    while job.state != "running":
        assert job.step() in RemoteJob.ACTIVE, job.error
    job.cancel()
    assert client.wait(job.session_id, job.run_id)["state"] == "done"     # it ended before the cancel went
    assert run_job(job).state == "cancelled" and job.result is None


def test_a_preview_right_after_cancel_waits_for_the_cancelled_upload_and_settling_tells_no_view(
        scene_case, server, monkeypatch):
    """Preview, Cancel once the volume is sent (the server's answer not read yet), Preview again at
    once: the new preview waits for that answer (the session the cancelled upload made) instead of
    sending the volume again; the server holds one new session. A tick that only settles the
    cancelled job tells no view (the panel's message is the user's last action's, e.g. Apply's)."""
    c = scene_case
    logic, params, client, sessions = _stepped_logic(monkeypatch, server, c["scene"])
    volume = add_volume(c["scene"], c["image"] + 11.0, c["matrix"], "previewed again at once")
    before = sessions()
    told = []
    logic.addListener(lambda: told.append(logic.message))
    logic.startPreview(volume, c["seg"], [c["target"]], params)
    _step_until_sent(logic)
    deadline = time.time() + 60
    first, upload = logic.job, logic.job._upload
    held = {"open": False}
    answer = upload.step
    upload.step = lambda: answer() if held["open"] else None  # the server's answer, read when let through
    logic.cancel()
    assert first.state == "cancelling" and logic.settling()
    assert told == ["Cancelled; the scene is unchanged."]     # the views are told at once, not at a tick
    logic.poll()
    for _ in range(3):
        logic.poll()
    assert told == ["Cancelled; the scene is unchanged."] and logic.settling()   # settling alone: nobody
    logic.startPreview(volume, c["seg"], [c["target"]], params)
    for _ in range(3):
        logic.poll()
        assert logic.state == "starting" and logic.job is None, logic.message
    assert "Waiting for the server's answer" in logic.message
    held["open"] = True
    messages = []
    while logic.active():
        logic.poll()
        messages.append(logic.message)
        assert time.time() < deadline + 120, logic.message
        time.sleep(0.02)
    assert logic.state == "previewed", logic.message
    assert first.state == "cancelled" and logic.job.session_id == first.session_id
    assert any("The volume is on the server already" in m for m in messages), messages
    assert sessions() - before == {first.session_id}
    logic.discard()


def test_cancel_never_waits_for_the_servers_answer(monkeypatch, tmp_path):
    """Cancel runs on Slicer's main thread (the panel's and the effect's Cancel, File > Close Scene):
    with the message sent and the server's answer not come, it returns at once; the job reads the
    answer in later steps, for at most SETTLE_SECONDS, and the logic keeps polling meanwhile."""
    class Silent:                                  # an Upload whose answer never comes
        closed = False
        def waiting(self):
            return True
        def step(self):
            return None
        def close(self):
            Silent.closed = True
    monkeypatch.setattr(RemoteJob, "SETTLE_SECONDS", 0.3)
    for state in ("upload", "start"):
        job = RemoteJob(None, None, (), None, session_id="s" if state == "start" else None)
        job.state, job._upload = state, Silent()
        began = time.monotonic()
        job.cancel(now=True)
        assert time.monotonic() - began < 0.05 and job.state == "cancelling" and job.active()
        while job.state == "cancelling":
            job.step()
        assert job.state == "cancelled" and Silent.closed and 0.3 <= time.monotonic() - began < 2.0
    logic = _module_logic(monkeypatch)
    logic.job = RemoteJob(None, None, (), None)
    logic.job.state, logic.job._upload = "upload", Silent()
    logic._pending = (None, [], None, "fingerprint")
    stopped = []
    monkeypatch.setattr(logic, "stopPolling", lambda: stopped.append(True))
    logic.state = "running"
    logic.onSceneClosed()
    assert logic.state == "idle" and logic.settling()
    logic.poll()
    assert not stopped                                  # the timer goes on for the settling job
    time.sleep(0.35)
    logic.poll()
    assert stopped and not logic.settling()
    # A session answered after the server was switched is not recorded for the new one.
    class Answering(Silent):
        def step(self):
            return "old-session"
    assert logic._pending is None                       # (the closed scene's volume is not kept)
    logic.job = RemoteJob(None, None, (), None)
    logic.job.state, logic.job._upload, logic.state = "upload", Answering(), "running"
    logic._pending = (None, [], None, "fingerprint")
    logic.cancel()
    token = tmp_path / "token"
    token.write_text("t")
    logic.useServer("http://127.0.0.1:9", str(token))
    logic.settle()
    assert not logic.settling() and logic.job.session_id == "old-session" and logic._sessions == {}
    logic.job.state, logic.job._upload, logic.job.session_id, logic.state = "upload", Answering(), None, "running"
    logic.cancel()
    logic.settle()
    assert logic._sessions == {"fingerprint": "old-session"}     # (the same server: kept)


def test_preview_points_land_at_their_ras_positions_and_discard_removes_everything(scene_case, server):
    c = scene_case
    n_before = c["scene"].GetNumberOfNodes()
    job, preview = _preview(c, server)
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
    cand = mrml.segment_array(preview.candidates, preview.candidate_ids[1], c["volume"])
    inter = (cand[3:6].astype(bool) & c["mask"][3:6]).sum()
    assert 2 * inter / (cand[3:6].sum() + c["mask"][3:6].sum()) > 0.7
    # Temporary: neither the nodes nor their display nodes are saved with the scene.
    for node in preview.nodes():
        assert not node.GetSaveWithScene()
        for i in range(node.GetNumberOfDisplayNodes()):
            assert not node.GetNthDisplayNode(i).GetSaveWithScene()
    preview.remove()
    assert c["scene"].GetNumberOfNodes() == n_before
    assert mrml.temporary_nodes(c["scene"]) == []


def test_slices_arrive_while_the_server_works(scene_case, server):
    c = scene_case
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(server.client(timeout=10), inputs.image, inputs.spacing, inputs.support)
    arrived = []
    while job.active():
        job.step()
        arrived += job.new_slices()
        time.sleep(0.02)
    assert job.state == "done"
    assert sorted(r.index for r, _ in arrived) == list(range(c["image"].shape[0]))
    for rec, mask in arrived:
        if rec.status == "present":
            assert np.array_equal(mask, job.result.labels[rec.index] == 1)


def test_preview_follows_the_volumes_parent_transform(scene_case, server):
    c = scene_case
    transform = c["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(m)
    c["volume"].SetAndObserveTransformNodeID(transform.GetID())
    c["seg"].SetAndObserveTransformNodeID(transform.GetID())
    job, preview = _preview(c, server)
    for node in preview.nodes():
        assert node.GetTransformNodeID() == transform.GetID()
    # Re-run slice rewrites the candidate there (the server gives the same mask back): it lands where it
    # was, under the transform, so no slice reads as edited and Apply writes the preview unchanged (the
    # labelmap imported outside the candidates' transform was shifted by its inverse: every slice
    # "edited", 2041 voxels moved).
    t = 3
    same = preview.labels[t] == 1
    assert same.any()
    mrml.rerun_slice(preview, c["volume"], 0, t, 1, lambda pos, neg: same)
    assert mrml.shown_labels(preview, c["volume"], 0)[1] == 0
    assert np.array_equal(mrml.shown_labels(preview, c["volume"], 0)[0], job.result.labels)
    # The user removes the candidates' segment: reading them says so (Apply and Update refuse with it).
    preview.candidates.GetSegmentation().RemoveSegment(preview.candidate_ids[1])
    with pytest.raises(InputError, match="was removed"):
        mrml.edited_slices(preview, c["volume"], 0)
    preview.remove()


def _editor(c):
    return applying.editor_logic(c["scene"], c["seg"], c["volume"])


def _finished_structure(c):
    """A segment the user finished earlier that overlaps the organ on slices 3 and 5."""
    done = np.zeros(c["mask"].shape, dtype=bool)
    done[[3, 5], 18:26, 26:34] = True
    assert (done & c["mask"]).any()
    return add_segment(c["seg"], c["volume"], done, "finished"), done


def test_apply_is_one_segment_editor_undo_step(scene_case, server):
    c = scene_case
    finished, done = _finished_structure(c)
    before = {s: mrml.segment_array(c["seg"], s, c["volume"]) for s in (c["target"], c["other"], finished)}
    _, preview = _preview(c, server)
    assert (done & (preview.labels == 1)).any()
    logic = _editor(c)
    logic.GetSegmentEditorNode().SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    applying.apply_labels(logic, c["seg"], c["volume"], preview.labels, [c["target"]])
    preview.remove()
    target_after = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    # "Modify other segments: allow overlap" (OverwriteNone): the finished structure keeps every voxel.
    assert np.array_equal(mrml.segment_array(c["seg"], finished, c["volume"]), before[finished])
    assert np.array_equal(mrml.segment_array(c["seg"], c["other"], c["volume"]), before[c["other"]])
    assert np.array_equal(target_after, preview.labels == 1)
    assert np.array_equal(target_after[4], c["paint"][4])                      # the paint is unchanged
    assert target_after.sum() > before[c["target"]].sum()
    assert logic.CanUndo()
    logic.Undo()                                           # one step takes the whole apply back
    for s, array in before.items():
        assert np.array_equal(mrml.segment_array(c["seg"], s, c["volume"]), array)
    assert c["seg"].GetSegmentation().GetNumberOfSegments() == 3
    assert logic.CanRedo()
    logic.Redo()                                           # and redo applies it again
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool), target_after)
    assert np.array_equal(mrml.segment_array(c["seg"], finished, c["volume"]), before[finished])


def test_apply_overwrites_other_segments_only_when_the_editor_says_so(scene_case, server):
    c = scene_case
    finished, done = _finished_structure(c)
    _, preview = _preview(c, server)
    logic = _editor(c)                                    # the default: overwrite all segments
    applying.apply_labels(logic, c["seg"], c["volume"], preview.labels, [c["target"]])
    after = mrml.segment_array(c["seg"], finished, c["volume"]).astype(bool)
    assert np.array_equal(after, done & ~(preview.labels == 1))
    # "Editable area: outside all segments": the target stays out of the finished structure.
    logic.Undo()
    assert np.array_equal(mrml.segment_array(c["seg"], finished, c["volume"]).astype(bool), done)
    node = logic.GetSegmentEditorNode()
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    applying.apply_labels(logic, c["seg"], c["volume"], preview.labels, [c["target"]])
    target = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    assert np.array_equal(mrml.segment_array(c["seg"], finished, c["volume"]).astype(bool), done)
    assert np.array_equal(target, (preview.labels == 1) & ~done)
    preview.remove()


@pytest.mark.parametrize("writer", ["editor logic", "segmentation node"])
def test_apply_on_a_segmentation_with_its_own_finer_grid(scene_case, writer):
    """A segmentation oversampled x2 (Segment Editor, Specify geometry): Apply makes the target exactly
    the preview, and the other segments on its layer keep their finer voxels. Slicer's "Set"
    (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap) clears the segment on the modifier's grid and
    vtkSegmentationModifier::AppendLabelmapToSegment resamples the shared layer onto it: a modifier
    on the volume's grid left old voxels of the target and coarsened the others."""
    c = scene_case
    fine = c["matrix"] @ np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1.0]])
    shape = tuple(2 * n for n in c["mask"].shape)
    geometry = applying.oriented_mask(np.zeros(shape, dtype=bool), fine)
    seg = c["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    seg.GetSegmentation().SetConversionParameter("Reference image geometry",
                                                 slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    old = np.zeros(shape, dtype=bool)
    old[8:10] = np.repeat(np.repeat(c["paint"][4], 2, 0), 2, 1)            # painted on slice 4 (fine 8, 9)
    other = np.zeros(shape, dtype=bool)
    other[2:5, 3:6, 3:7] = True                                             # finer than the volume's voxels
    ids = []
    for name, array in (("target", old), ("other", other)):
        sid = seg.GetSegmentation().AddEmptySegment(name, name)
        module = slicer.vtkSlicerSegmentationsModuleLogic
        assert module.SetBinaryLabelmapToSegment(applying.oriented_mask(array, fine), seg, sid, module.MODE_REPLACE)
        ids.append(sid)
    shared = seg.GetSegmentation().GetSegment(ids[0]).GetRepresentation("Binary labelmap")
    assert shared is seg.GetSegmentation().GetSegment(ids[1]).GetRepresentation("Binary labelmap")
    labels = np.zeros(c["mask"].shape, dtype=np.uint8)
    labels[1:4][c["mask"][1:4]] = 1                                         # not slice 4: the old paint goes
    if writer == "editor logic":
        logic = applying.editor_logic(c["scene"], seg, c["volume"])
        changed = applying.apply_labels(logic, seg, c["volume"], labels, [ids[0]])
    else:
        changed = applying.write_preview(seg, c["volume"], labels, [ids[0]], applying.node_writer())
    assert changed[ids[0]] > 0
    assert np.array_equal(mrml.segment_array(seg, ids[0], c["volume"]).astype(bool), labels == 1)
    image = seg.GetBinaryLabelmapInternalRepresentation(ids[1])
    assert np.allclose(image.GetSpacing(), 0.5 * np.linalg.norm(c["matrix"][:3, :3], axis=0))
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    extent = image.GetExtent()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    value = seg.GetSegmentation().GetSegment(ids[1]).GetLabelValue()
    kept = np.zeros(shape, dtype=bool)
    kept[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values == value
    assert np.array_equal(kept, other)


def test_apply_refuses_a_removed_segment(scene_case, server):
    c = scene_case
    _, preview = _preview(c, server)
    c["seg"].GetSegmentation().RemoveSegment(c["target"])
    with pytest.raises(InputError, match="no longer"):
        applying.apply_labels(_editor(c), c["seg"], c["volume"], preview.labels, [c["target"]])
    preview.remove()


def test_rerun_one_slice_from_edited_points_on_the_server(scene_case, server):
    c = scene_case
    job, preview = _preview(c, server)
    client, sid = server.client(), job.session_id
    t = 3
    before = preview.labels.copy()
    # The user deletes every point of slice 3 and places one positive point in the object's middle.
    for node in (preview.positive, preview.negative):
        ijk = mrml.markups_points_ijk(node, c["volume"])
        for i in reversed(range(node.GetNumberOfControlPoints())):
            if round(ijk[i, 2]) == t:
                node.RemoveNthControlPoint(i)
    preview.positive.AddControlPoint(*mrml.points_ijk_to_ras(c["volume"], [[30.0, 22.0, t]])[0])
    decode = lambda pos, neg: client.redecode(sid, t, pos, neg, 1, 0)[0]
    used = mrml.rerun_slice(preview, c["volume"], 0, t, 1, decode)
    assert used == 1
    cand = mrml.segment_array(preview.candidates, preview.candidate_ids[1], c["volume"]).astype(bool)
    got = cand[t]
    assert 2 * (got & c["mask"][t]).sum() / (got.sum() + c["mask"][t].sum()) > 0.6
    assert np.array_equal(np.delete(cand, t, 0), np.delete(before == 1, t, 0))     # other slices untouched
    assert np.array_equal(preview.labels, before)                                   # the engine's labels kept
    # The re-decoded slice is the user's correction: Update takes it as a corrected slice.
    paint, absent = mrml.edited_slices(preview, c["volume"], 0)
    changed = not np.array_equal(got, before[t] == 1)
    assert np.array_equal(paint[t] == 1, got if changed else np.zeros_like(got)), changed
    assert not np.delete(paint, t, 0).any() and absent == {}
    # Deleting the last positive point empties the slice: for Update, the organ is absent there.
    preview.positive.RemoveNthControlPoint(preview.positive.GetNumberOfControlPoints() - 1)
    mrml.rerun_slice(preview, c["volume"], 0, t, 1, decode)
    assert not mrml.segment_array(preview.candidates, preview.candidate_ids[1], c["volume"])[t].any()
    assert mrml.edited_slices(preview, c["volume"], 0)[1] == {1: [t]}
    with pytest.raises(InputError, match="not one of the previewed"):
        mrml.rerun_slice(preview, c["volume"], 0, t, 2, decode)
    preview.remove()


def test_edits_in_the_segments_left_count_when_the_user_removed_one(scene_case):
    """Two previewed labels; the user edits one's candidate and deletes the other's segment: reading
    every label refuses (Apply, Update), the edits still there are counted (Discard asks about them)."""
    c = scene_case
    labels = np.zeros(c["mask"].shape, np.uint8)
    labels[2:6, 10:20, 10:20] = 1
    labels[2:6, 25:35, 30:40] = 2
    candidates = c["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "SynPo candidates")
    candidates.SetReferenceImageGeometryParameterFromVolumeNode(c["volume"])
    ids = mrml.write_labels(candidates, c["volume"], labels, {1: "a", 2: "b"})
    preview = mrml.PreviewNodes(candidates=candidates, labels=labels.copy(), segment_ids=["x", "y"], candidate_ids=ids)
    assert mrml.shown_labels(preview, c["volume"], 0)[1] == 0
    edited = labels.copy()
    edited[3][edited[3] == 1] = 0
    mrml.write_labels(candidates, c["volume"], edited, {1: "a"}, {1: ids[1]})
    candidates.GetSegmentation().RemoveSegment(ids[2])
    with pytest.raises(InputError, match="label 2 .* was removed"):
        mrml.shown_labels(preview, c["volume"], 0)
    assert mrml.shown_labels(preview, c["volume"], 0, readable_only=True)[1] == 1


def test_points_of_another_segment_are_not_used_for_a_rerun(scene_case):
    c = scene_case
    node = c["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "p")
    for ijk, tag in (([10.0, 5.0, 3.0], "segment A, slice 3"), ([12.0, 6.0, 3.0], "segment B, slice 3"),
                     ([14.0, 7.0, 3.0], ""), ([16.0, 8.0, 4.0], "segment A, slice 4")):
        i = node.AddControlPoint(*mrml.points_ijk_to_ras(c["volume"], [ijk])[0])
        node.SetNthControlPointDescription(i, tag)
    got = mrml.slice_points(node, c["volume"], 0, 3, "A")
    assert np.allclose(got, [[10.0, 5.0], [14.0, 7.0]], atol=1e-4)


def test_cancelled_run_changes_nothing(scene_case, server):
    c = scene_case
    n_before = c["scene"].GetNumberOfNodes()
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(server.client(timeout=10), inputs.image + 1.0, inputs.spacing, inputs.support)
    job.step()                                   # uploaded
    job.step()                                   # started
    job.cancel()
    run_job(job)
    assert job.state == "cancelled" and job.result is None
    assert c["scene"].GetNumberOfNodes() == n_before
    assert mrml.temporary_nodes(c["scene"]) == []


def test_server_killed_mid_run_gives_a_message_and_an_untouched_scene(scene_case, tmp_path):
    c = scene_case
    srv = Server(str(tmp_path))
    n_before = c["scene"].GetNumberOfNodes()
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(srv.client(timeout=5), inputs.image + 2.0, inputs.spacing, inputs.support)
    job.step()
    job.step()
    srv.proc.kill()
    srv.stop()
    run_job(job, timeout=60)
    assert job.state == "failed" and "cannot reach the SynPo server" in job.error
    assert c["scene"].GetNumberOfNodes() == n_before


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


def test_any_parallel_paint_is_a_support_and_previews(scene_case, server):
    """Paint on adjacent slices, up to every slice of the object: the slicing axis is the one across
    which the paint is thinnest (the engine's find_support, the same code as the CLI and server)."""
    c = scene_case
    adjacent = np.zeros(c["mask"].shape, dtype=bool)
    adjacent[3:5] = c["mask"][3:5]
    sid = add_segment(c["seg"], c["volume"], adjacent, "adjacent")
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [sid])
    assert inputs.axis == 0 and np.array_equal(inputs.support == 1, adjacent)
    job = run_job(RemoteJob(server.client(timeout=10), inputs.image, inputs.spacing, inputs.support))
    assert job.state == "done" and job.error == "", job.error
    assert job.result.support.slices == {1: [3, 4]}
    assert (job.result.labels[2] == 1).any()                  # it walked beyond the painted slices
    # Every slice of the object, seen sagittally thin: painted on 4 adjacent i columns only.
    sagittal = np.zeros(c["mask"].shape, dtype=bool)
    sagittal[:, :, 28:32] = c["mask"][:, :, 28:32]
    sid2 = add_segment(c["seg"], c["volume"], sagittal, "sagittal")
    assert mrml.extract_inputs(c["volume"], c["seg"], [sid2]).axis == 2
    # A dot cannot tell its orientation: the message names the tied axes.
    dot = np.zeros(c["mask"].shape, dtype=bool)
    dot[4, 22, 30] = True
    sid3 = add_segment(c["seg"], c["volume"], dot, "dot")
    with pytest.raises(InputError, match="ambiguous.*across k, j and i"):
        mrml.extract_inputs(c["volume"], c["seg"], [sid3])


def test_update_from_the_users_corrections_of_the_candidates(scene_case, server):
    """The user erases the candidate on one slice and repaints it on another: Update sends the
    repainted slice as a support and the erased one as absent, on the same server session."""
    c = scene_case
    job, preview = _preview(c, server)
    sid = preview.candidates.GetSegmentation().GetNthSegmentID(0)
    edited = (preview.labels == 1).astype(np.uint8)
    present = [t for t in range(len(edited)) if edited[t].any() and t != 4]
    erased, repainted = present[0], present[-1]
    edited[erased] = 0
    edited[repainted] = 0
    edited[repainted, 18:26, 24:36] = 1
    mrml.write_labels(preview.candidates, c["volume"], edited, {1: "target"}, {1: sid})
    paint, absent = mrml.edited_slices(preview, c["volume"], 0)
    assert absent == {1: [erased]}
    assert np.array_equal(np.flatnonzero(paint.reshape(len(paint), -1).any(1)), [repainted])
    assert np.array_equal(paint[repainted] == 1, edited[repainted] == 1)
    update = run_job(RemoteJob(server.client(timeout=10), None, (), paint, session_id=job.session_id, add=True,
                               absent=absent))
    assert update.state == "done", update.error
    result = update.result
    assert repainted in result.support.slices[1] and 4 in result.support.slices[1]
    assert np.array_equal(result.labels[repainted] == 1, edited[repainted] == 1)       # the correction is kept
    assert not (result.labels[erased] == 1).any()
    rec = next(r for r in result.records if r.index == erased)
    assert rec.status == "absent" and rec.reason == "marked absent"
    # The server ended the session (idle past --session-ttl, evicted, restarted): the next Update said
    # "session ... is gone: ...; create it again", which the page and the panel cannot do. It says what
    # is kept and what the user can do.
    server.client().delete_session(job.session_id)
    again = run_job(RemoteJob(server.client(timeout=10), None, (), paint, session_id=job.session_id, add=True,
                              absent=absent))
    assert again.state == "failed" and "no longer holds this preview's volume" in again.error, again.error
    assert again.gone                       # (the module sends the volume again: test_slicer_session)
    assert again.error.count("no longer holds") == 1, again.error          # said once, not wrapped twice
    assert "Apply writes them as drawn" in again.error and "deleted by a client" in again.error
    preview.remove()


@contextlib.contextmanager
def _stalled(server, job):
    """`job` stepped until its run is going, then the server stopped (SIGSTOP: it answers nothing, as a
    swapping or paused server) for the block, and let go on after it."""
    import signal
    while job.state != "running":
        job.step()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield time.time()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGSTOP"), reason="needs SIGSTOP")
def test_a_server_that_stalls_for_seconds_does_not_fail_the_preview(scene_case, server):
    """A server that answers nothing for a few seconds (swapping, stopped, a loaded machine): the preview
    failed at the first poll that took over 5 s. Now a poll that times out is asked again, the stage
    counts the seconds, and the job fails only after STALL_SECONDS without an answer."""
    c = scene_case
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(server.client(timeout=10), inputs.image + 11.0, inputs.spacing, inputs.support)
    stages = []
    with _stalled(server, job) as start:
        while time.time() - start < 5:
            job.step()                                   # each poll gives up after POLL_TIMEOUT (2 s)
            stages.append(job.stage)
    assert job.state == "running" and job.error == "", job.error
    assert any(s.startswith("waiting for the server: no answer for") for s in stages), stages
    assert run_job(job).state == "done", job.error            # the run went on meanwhile
    # Past STALL_SECONDS without an answer the job fails, and says why.
    job = RemoteJob(server.client(timeout=10), None, (), inputs.support, session_id=job.session_id)
    job.STALL_SECONDS = 3.0
    with _stalled(server, job) as start:
        while job.active() and time.time() - start < 20:
            job.step()
    assert job.state == "failed" and job.error.startswith("the SynPo server has not answered for"), job.error
    assert time.time() - start < 10
    server.client().cancel(job.session_id, job.run_id)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGSTOP"), reason="needs SIGSTOP")
def test_a_cancel_a_stalled_server_does_not_answer_is_sent_again(scene_case, server):
    """Cancel while the server does not answer: the cancel request timed out, the job called itself
    cancelled, and the run went on on the server, holding the session (the next preview of that volume
    waited on its 409s). Now the job is "cancelling" and sends the cancel again until the server answers."""
    c = scene_case
    inputs = mrml.extract_inputs(c["volume"], c["seg"], [c["target"]])
    job = RemoteJob(server.client(timeout=10), inputs.image + 23.0, inputs.spacing, inputs.support)
    job.SETTLE_RETRY = 0.5
    with _stalled(server, job) as start:
        job.cancel(now=True)
        assert job.state == "cancelling" and time.time() - start < 4, job.state
        for _ in range(3):
            job.step()                                    # the server still does not answer
        assert job.state == "cancelling"
    deadline = time.time() + 30
    while job.active() and time.time() < deadline:
        job.step()
        time.sleep(0.05)
    assert job.state == "cancelled", (job.state, job.error)
    # (the run is cancelled there, unless it ended in the meantime)
    assert server.client().wait(job.session_id, job.run_id)["state"] in ("cancelled", "done")


@pytest.fixture
def axial_case():
    """An axis-aligned volume (1 x 1 x 2.5 mm) with the organ painted on slice 4, for rendering."""
    mrml.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    image, mask = ellipsoid_volume(shape=(8, 48, 60), centre=(4, 22, 30), radii=(3, 11, 14))
    matrix = np.diag([1.0, 1.0, 2.5, 1.0])
    volume = add_volume(scene, image, matrix)
    volume.CreateDefaultDisplayNodes()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    paint = np.zeros(mask.shape, dtype=bool)
    paint[4] = mask[4]
    target = add_segment(seg, volume, paint, "target")
    return dict(scene=scene, volume=volume, seg=seg, target=target, image=image, mask=mask, paint=paint,
                matrix=matrix)


def _near(shot, pixel, radius=2):
    r, c = pixel
    return shot[max(0, r - radius):r + radius + 1, max(0, c - radius):c + radius + 1].reshape(-1, 3).astype(int)


def test_what_the_user_sees_points_overlay_and_candidate(axial_case, server):
    """The preview scene rendered with Slicer's displayable managers: each point in its colour where
    its RAS position projects, the overlay inside the organ and nowhere the confidence is 0, the
    candidate's outline on the organ."""
    import ctypes.util
    if ctypes.util.find_library("EGL") is None:
        pytest.skip("no EGL library: Slicer's slice view cannot be rendered offscreen here")
    from slice_render import SliceRender
    c = axial_case
    job, preview = _preview(c, server)
    rec = next(r for r in job.result.records if r.status == "present" and len(r.positive) and len(r.negative))
    t = rec.index
    render = SliceRender(c["scene"])
    render.show(c["volume"], preview.confidence, 0.5)
    z = float(mrml.points_ijk_to_ras(c["volume"], [[0.0, 0.0, t]])[0][2])
    shot = render.render(z)
    tags = "segment %s, slice %d" % (c["target"], t)
    for node, want in ((preview.positive, 1), (preview.negative, 0)):
        drawn = 0
        for i in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointDescription(i) != tags:
                continue
            near = _near(shot, render.pixel_of(node.GetNthControlPointPosition(i)))
            hue = near[:, want] - near[:, 1 - want]          # green over red for positives, red over green for negatives
            assert (hue > 60).any() and (near[:, want] > 150).any(), (want, near.max(0))
            drawn += 1
        assert drawn > 0
    # The overlay: the same slice without it (foreground opacity 0) differs inside the organ and not
    # where the confidence is 0.
    render.show(c["volume"], preview.confidence, 0.0)
    preview.candidates.GetDisplayNode().SetVisibility(False)
    preview.positive.GetDisplayNode().SetVisibility(False)
    preview.negative.GetDisplayNode().SetVisibility(False)
    plain = render.render(z)
    render.show(c["volume"], preview.confidence, 0.5)
    overlay = render.render(z)
    conf = slicer.util.arrayFromVolume(preview.confidence)[t]
    inside = [render.pixel_of(mrml.points_ijk_to_ras(c["volume"], [[i, j, t]])[0])
              for j, i in zip(*np.nonzero(conf > 0.7))]
    from scipy import ndimage
    zero_area = ndimage.binary_erosion(conf == 0.0, iterations=1)      # away from the overlay's blended edge
    zero = [render.pixel_of(mrml.points_ijk_to_ras(c["volume"], [[i, j, t]])[0])
            for j, i in zip(*np.nonzero(zero_area))]
    assert inside and zero
    diff = np.abs(overlay.astype(int) - plain.astype(int)).sum(-1)
    assert np.mean([diff[p] > 5 for p in inside]) > 0.8
    assert np.mean([diff[p] > 3 for p in zero]) < 0.05
    # The candidate segment: drawn on the organ's slice, around the organ (fill and outline).
    preview.candidates.GetDisplayNode().SetVisibility(True)
    render.show(c["volume"], None, 0.0)
    with_candidate = render.render(z)
    changed = np.abs(with_candidate.astype(int) - plain.astype(int)).sum(-1) > 20
    organ = np.zeros(changed.shape, bool)
    for j, i in zip(*np.nonzero(preview.labels[t] == 1)):
        organ[render.pixel_of(mrml.points_ijk_to_ras(c["volume"], [[i, j, t]])[0])] = True
    assert changed.any() and organ.any()
    near_organ = ndimage.binary_dilation(organ, iterations=8)
    assert changed[near_organ].mean() > 0.2 and changed[~near_organ].mean() < 0.01
    preview.remove()


def install_module_stand_ins(monkeypatch, settings, timer):
    """What slicer-core lacks for the module file: Qt (QSettings, QTimer given) and the
    scripted-module base classes."""
    import types
    qt = types.ModuleType("qt")
    qt.QSettings, qt.QTimer, qt.QIcon = settings, timer, (lambda *a: None)
    monkeypatch.setitem(sys.modules, "qt", qt)
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
        setattr(base, cls, type(cls, (), {}))
    base.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {"__init__": lambda self: None})
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: None, raising=False)


def _module_logic(monkeypatch):
    """The module's SynPoSlicerLogic on slicer-core: stand-ins only for Qt and the scripted-module
    base classes, which slicer-core does not have."""
    import importlib.util
    import types
    settings = lambda: types.SimpleNamespace(value=lambda key, default=None: default, setValue=lambda *a: None)
    # The logic's timer: these tests step the logic themselves (test_slicer_session.py fires a timer).
    timer = lambda: types.SimpleNamespace(setInterval=lambda ms: None, connect=lambda *a: None,
                                          start=lambda: None, stop=lambda: None)
    install_module_stand_ins(monkeypatch, settings, timer)
    path = os.path.join(os.path.dirname(__file__), "..", "SynPoSlicer", "SynPoSlicer.py")
    spec = importlib.util.spec_from_file_location("SynPoSlicerForTest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SynPoSlicerLogic()


def _parameters(logic, scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SynPo")
    logic.setDefaultParameters(node)
    node.SetParameter("Features", "sam")
    return node


def test_module_logic_previews_through_the_server_and_survives_close_scene(scene_case, server, monkeypatch):
    """The module's own logic, step by step as its timer drives it: a preview through the server; then
    File > Close Scene in the middle of a second run: the run is cancelled, nothing is added to
    the new scene, and the logic is ready for the next preview."""
    c = scene_case
    logic = _module_logic(monkeypatch)
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed", logic.message
    assert logic.preview is not None and "Preview ready" in logic.message
    assert mrml.temporary_nodes(c["scene"])
    logic.discard()
    assert logic.state == "idle" and mrml.temporary_nodes(c["scene"]) == []
    # A second preview, on another volume (not yet embedded: it runs for a while), then Close Scene.
    other = add_volume(c["scene"], c["image"] + 5.0, c["matrix"], "other")
    logic.startPreview(other, c["seg"], [c["target"]], params)
    deadline = time.time() + 120
    while logic.state != "running" or logic.job.state != "running":
        logic.step()
        time.sleep(0.05)
        assert time.time() < deadline
    sid, rid = logic.job.session_id, logic.job.run_id
    logic.onSceneClosed()
    c["scene"].Clear(0)
    assert server.client().wait(sid, rid)["state"] == "cancelled"          # the server's run stopped too
    for _ in range(20):
        logic.step()
        time.sleep(0.05)
    assert logic.state == "idle" and logic.preview is None and not logic.active()
    assert mrml.temporary_nodes(c["scene"]) == []
    # Ready again: a new scene, a new preview.
    again = add_volume(c["scene"], c["image"], c["matrix"], "image")
    seg = c["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(again)
    target = add_segment(seg, again, c["paint"], "target")
    assert logic.process(again, seg, [target], _parameters(logic, c["scene"]), timeout=300) == "previewed"
    logic.discard()


def test_the_module_starts_and_stops_its_own_server():
    """ServerProcess, as the module starts it: a child `synpo serve` on a free loopback port with a
    fresh private token; ready() never waits; stop() ends it."""
    from SynPoSlicerLib.engine import ServerProcess
    proc = ServerProcess(sys.executable, device="cpu", features="sam").start()
    try:
        assert os.stat(proc.token_file).st_mode & 0o777 == 0o600
        deadline = time.time() + 120
        while not proc.ready():
            assert time.time() < deadline, proc.log_tail()
            time.sleep(0.2)
        assert proc.url.startswith("http://127.0.0.1:")
        health = proc.client().health()
        assert health["models"]["device"] == "cpu"
        # Its memory budget is this machine's (three quarters of it, at least synpo serve's default):
        # a large CT alone over the default 8192 MB was refused, by an option the module's user cannot set.
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        assert health["limits"]["max_memory_mb"] == max(8192, total * 3 // 4)
    finally:
        proc.stop()
    assert not proc.running()


def test_an_update_keeps_the_candidates_node_only_for_the_same_labels():
    """show_preview(previous=...) overwrites the previous 'SynPo candidates' node when the update has
    the same labels (the Segment Editor may show it); when a label is gone (its only painted slice
    erased), a new node: the kept one would go on showing that label's old candidate, which Apply
    then writes as empty."""
    import types
    from synpo.support import find_support
    mrml.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    slicer.util.updateVolumeFromArray(volume, np.zeros((6, 20, 20), np.float32))

    def result(labels, support):
        found = find_support(support)
        return types.SimpleNamespace(labels=labels, support=found, records=[],
                                     confidence={v: (labels == v).astype(np.float32) for v in found.labels})
    labels = np.zeros((6, 20, 20), np.int32)
    labels[1:5, 2:8, 2:8] = 1
    labels[1:5, 10:18, 10:18] = 2
    support = np.where(np.arange(6)[:, None, None] == 3, labels, 0)
    first = mrml.show_preview(volume, result(labels, support), ["s1", "s2"], ["liver", "spleen"])
    grown = labels.copy()
    grown[5, 2:8, 2:8] = 1
    second = mrml.show_preview(volume, result(grown, support), ["s1", "s2"], ["liver", "spleen"], previous=first)
    first.remove()
    assert second.candidates.GetScene() is scene and first.candidates is None      # kept, moved over
    assert np.array_equal(mrml.shown_labels(second, volume, 0)[0], grown)
    no_spleen = np.where(grown == 2, 0, grown)
    third = mrml.show_preview(volume, result(no_spleen, np.where(support == 2, 0, support)), ["s1", "s2"],
                              ["liver", "spleen"], previous=second)
    kept = second.candidates
    second.remove()
    assert third.candidates is not kept and kept.GetScene() is None
    assert third.candidates.GetSegmentation().GetNumberOfSegments() == 1
    assert np.array_equal(mrml.shown_labels(third, volume, 0)[0], no_spleen)
    third.remove()
    assert mrml.temporary_nodes(scene) == []


def test_a_server_that_answers_each_poll_in_three_seconds_is_waited_for(monkeypatch):
    """A loaded server that answers every poll, in 3 s: it was polled with a 5 s timeout and the run went on;
    with POLL_TIMEOUT (2 s) every poll gave up before its answer and the job failed after STALL_SECONDS. A
    poll after one that timed out waits longer (up to the client's timeout)."""
    from SynPoSlicerLib import engine
    from synpo.client import ServerError

    class Clock:
        now = 1000.0

        def monotonic(self):
            return self.now

        def perf_counter(self):
            return self.now
    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)

    class Slow:
        timeout = 5.0
        answers = 0

        def status(self, sid, rid, since=0, timeout=None):
            wait = timeout or self.timeout
            if wait < 3.0:
                clock.now += wait
                raise ServerError("cannot reach the SynPo server (timed out)", 0, True)
            clock.now += 3.0
            self.answers += 1
            return {"next": 0, "stage": "walking", "done": self.answers, "total": 40,
                    "state": "done" if self.answers >= 40 else "running"}
    client = Slow()
    job = RemoteJob(client, None, (), None, session_id="s")
    job.state, job.run_id, job._answered = "running", "r", clock.now
    for _ in range(200):
        if job.state != "running":
            break
        job.step()
    assert job.state == "fetch", job.error
    assert clock.now - 1000.0 > RemoteJob.STALL_SECONDS


def test_a_local_server_that_died_during_a_run_is_not_waited_for():
    """The local server stopped (killed, crashed) while a run's polls were timing out (on Windows a refused
    connection can take the 2 s of a poll's timeout): the run waited STALL_SECONDS (60 s) for a process that
    is gone. The logic knows its own server: the preview fails at once, with the server's log."""
    from SynPoSlicerLib.logic import PreviewLogic

    class Dead:
        def running(self):
            return False

        def log_tail(self):
            return "Killed"

    class Stalled:
        state, stage, reused, gone, error, done, total = "running", "", False, False, "", 0, 1
        session_id = None

        def step(self):
            self.stage = "waiting for the server: no answer for 4 s"
            return self.state

        def stalled(self):
            return True

        def active(self):
            return self.state == "running"

        def cancel(self, now=False):
            self.state = "cancelled"

    logic = PreviewLogic()
    logic.server, logic.job, logic.state = Dead(), Stalled(), "running"
    logic.step()
    assert logic.state == "failed" and "stopped" in logic.message and "Killed" in logic.message, logic.message
    assert not logic.job.active()
