"""`synpo serve` and `synpo segment --server` with real processes on 127.0.0.1 (LiteMedSAM on the CPU)."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
from scipy import ndimage
import pytest
import SimpleITK as sitk

from conftest import Server, ellipsoid_volume, save_volume as write, synpo_cmd
from synpo import wire
from synpo.client import ServerError
from synpo.cli import main

SHAPE = (8, 48, 56)                     # few slices: LiteMedSAM encodes about 2.5 s a slice on a 2-core CPU


def volume(seed=0, shape=SHAPE):
    image, mask = ellipsoid_volume(shape=shape, centre=(shape[0] // 2, 24, 28), radii=(shape[0] / 2 - 0.5, 12, 15),
                                   seed=seed)
    support = np.zeros(mask.shape, dtype=np.uint8)
    support[shape[0] // 2][mask[shape[0] // 2]] = 1
    return image, support


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    srv = Server(str(folder), "--embedding-cache", str(folder / "emb"), "--max-body-mb", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    image, support = volume()
    return {"dir": folder, "image": write(image, folder / "image.nii.gz"),
            "support": write(support, folder / "support.nii.gz"), "array": image, "support_array": support}


@pytest.fixture(scope="module")
def remote_run(server, files):
    """`synpo segment --server` on the case, run first (it fills the server's embedding cache)."""
    out = files["dir"] / "remote"
    out.mkdir()
    proc = subprocess.run(synpo_cmd() + ["segment", files["image"], files["support"], "-o", str(out / "seg.nii.gz"),
                                         "--points-out", str(out / "points.json"),
                                         "--confidence-out", str(out / "conf.nii.gz"),
                                         "--server", server.url, "--token-file", server.token_file],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def raw(server, method, path, body=b"", headers=None, chunked=False):
    """(status, JSON or bytes) of one request made by hand."""
    u = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    if chunked:
        conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers=headers or {}, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def auth(server, **more):
    return dict({"Authorization": "Bearer " + server.token}, **more)


def session_count(server):
    return len(server.client().json("GET", "/v1/sessions")["sessions"])


# ---------------------------------------------------------------------- the contract

def test_health_needs_no_token_and_says_what_runs(server):
    status, body = raw(server, "GET", "/v1/health")
    assert status == 200 and body["status"] == "ok" and body["api"] == 1
    assert body["models"]["sam"] == "litemedsam" and body["models"]["device"] == "cpu"
    assert body["limits"]["max_body_mb"] == 2
    status, body = raw(server, "HEAD", "/v1/health")        # a monitor's probe: 200, no body
    assert status == 200 and body == b""


def test_generated_token_file_is_private(server):
    assert os.stat(server.token_file).st_mode & 0o777 == 0o600
    assert len(server.token) >= 32


@pytest.mark.parametrize("headers, says", [({}, "needs a token"), ({"Authorization": "Bearer nope-nope-nope"}, "wrong token"),
                                           ({"Authorization": "Basic abc"}, "needs a token")])
def test_missing_or_wrong_token_is_refused_and_changes_nothing(server, headers, says):
    image, _ = volume()
    before = session_count(server)
    body = wire.pack({"image": image}, {"spacing": [1, 1, 2]})
    status, answer = raw(server, "POST", "/v1/sessions", body, dict(headers, **{"Content-Type": wire.CONTENT_TYPE}))
    assert status == 401 and says in answer["error"]
    status, answer = raw(server, "GET", "/v1/sessions", headers=headers)
    assert status == 401
    assert session_count(server) == before


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_gets_413(server, chunked):
    before = session_count(server)
    big = np.random.default_rng(0).normal(size=(40, 128, 128)).astype(np.float32)     # ~2.4 MB, incompressible
    body = wire.pack({"image": big}, {"spacing": [1, 1, 1]})
    assert len(body) > 2 << 20
    status, answer = raw(server, "POST", "/v1/sessions", body, auth(server, **{"Content-Type": wire.CONTENT_TYPE}),
                         chunked=chunked)
    assert status == 413 and "--max-body-mb" in answer["error"]
    assert session_count(server) == before
    if not chunked:        # the client's create_session (synpo segment --server) says so, not "cannot reach"
        assert "the request body is %.1f MB" % (len(body) / 2 ** 20) in answer["error"]      # (not rounded down to 2)
        big = np.random.default_rng(1).normal(size=(40, 256, 400)).astype(np.float32)    # 16 MB
        with pytest.raises(ServerError) as err:
            server.client().create_session(big, (1, 1, 1))
        assert err.value.status == 413 and "--max-body-mb" in str(err.value)


def _finish(upload, limit=100000):
    """Step an Upload as the Slicer module's timer does; (its answer, the steps it took)."""
    for steps in range(1, limit):
        answer = upload.step()
        if answer is not None:
            return answer, steps
    raise AssertionError("the upload never ended")


def test_a_session_sent_a_step_at_a_time_is_the_same_session(server):
    """client.Upload, as the Slicer module sends a volume (short steps on its timer, never one long
    call): the session holds the image, and refusals read as they do for create_session."""
    client = server.client()
    image = np.random.default_rng(3).normal(size=(6, 40, 50)).astype(np.float32)
    upload = client.session_upload(image, (0.8, 0.8, 2.5), chunk=4096)
    sid, steps = _finish(upload)
    assert steps > 2 * image.nbytes // 4096 - 4          # compressed, then sent, a chunk per step
    assert upload.progress() == 100
    info = client.session(sid)
    assert info["shape_kji"] == [6, 40, 50] and info["spacing_ijk"] == [0.8, 0.8, 2.5]
    before = session_count(server)
    with pytest.raises(ServerError, match="HTTP 401") as refused:
        _finish(server.client(token="wrong").session_upload(image, (1, 1, 1), chunk=4096))
    assert refused.value.status == 401
    big = np.random.default_rng(0).normal(size=(40, 128, 128)).astype(np.float32)     # over the 2 MB limit
    with pytest.raises(ServerError, match="--max-body-mb") as refused:
        _finish(client.session_upload(big, (1, 1, 1), chunk=65536))
    assert refused.value.status == 413 and session_count(server) == before
    # Cancelled half way (the connection closed mid-body): no session, and no traceback in the log.
    cancelled = client.session_upload(image, (1, 1, 1), chunk=4096)
    while cancelled.sent < 3 * 4096:
        assert cancelled.step() is None
    cancelled.close()
    time.sleep(1.0)
    assert session_count(server) == before
    with open(server.log.name) as log:
        assert "Exception in ASGI application" not in log.read()


def test_a_step_of_an_upload_never_waits_for_a_slow_link():
    """A server that takes the connection but reads nothing (a link slower than the body): each step
    hands the socket what it takes without waiting and returns (sendall of a 4 MB chunk blocked the
    step, Slicer's interface with it, until the link had carried it all)."""
    import socket as sockets
    from synpo.client import Client
    listener = sockets.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        client = Client("http://127.0.0.1:%d" % listener.getsockname()[1], "token", timeout=30.0)
        image = np.random.default_rng(5).normal(size=(40, 256, 256)).astype(np.float32)    # 10 MB, incompressible
        upload = client.session_upload(image, (1, 1, 1), chunk=4 << 20)
        while upload.body is None or upload.conn is None:
            upload.step()
        longest, sent = 0.0, []
        for _ in range(20):
            started = time.monotonic()
            assert upload.step() is None
            longest = max(longest, time.monotonic() - started)
            sent.append(upload.sent)
        assert longest < 0.5 and 0 < sent[-1] < len(upload.body) and sent[-1] == sent[-5]     # stalled, not blocked
        upload.close()
    finally:
        listener.close()


def test_a_session_sent_a_step_at_a_time_over_https(tmp_path):
    """TLS 1.3 sends session tickets after the handshake: the socket is readable with no answer in it.
    Taken for the answer, the upload stopped sending and waited until the server's timeout."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = Server(str(tmp_path), "--tls-cert", cert, "--tls-key", key)
    try:
        assert srv.url.startswith("https://")
        from synpo.client import Client
        client = Client(srv.url, srv.token, timeout=20.0, cafile=cert)
        image = np.random.default_rng(4).normal(size=(6, 40, 50)).astype(np.float32)
        started = time.monotonic()
        sid, steps = _finish(client.session_upload(image, (1.0, 1.0, 2.0), chunk=8192))
        assert time.monotonic() - started < 15.0 and steps > image.nbytes // 8192
        assert client.session(sid)["shape_kji"] == [6, 40, 50]
        with pytest.raises(ServerError, match="HTTP 401"):
            _finish(Client(srv.url, "wrong", timeout=20.0, cafile=cert).session_upload(image, (1, 1, 1), chunk=8192))
        # Without the certificate (a self-signed one): the server is there, its certificate is not trusted
        # (the message asked "is `synpo serve` running there?"); SSL_CERT_FILE is the documented way.
        for call in (lambda c: c.health(), lambda c: _finish(c.session_upload(image, (1, 1, 1), chunk=8192))):
            with pytest.raises(ServerError, match=r"certificate this computer does not trust .*SSL_CERT_FILE"):
                call(Client(srv.url, srv.token, timeout=20.0))
    finally:
        srv.stop()


@pytest.mark.parametrize("body, meta, says", [
    (b"not a message", None, "not a SynPo wire message"),
    (None, {"spacing": [1, 1]}, "meta.spacing must be 3 numbers"),
    (None, {"spacing": [1, 1, -2]}, "voxel spacing must be 3 positive numbers"),
    (None, {"spacing": [1, True, 2]}, "meta.spacing must be 3 numbers"),          # (read as 1 mm)
    (None, {"spacing": [1, "2", 2]}, "meta.spacing must be 3 numbers"),
    ("constant", {"spacing": [1, 1, 2]}, "constant"),
    ("2d", {"spacing": [1, 1, 2]}, "3D volume is needed"),
    ("empty", {"spacing": [1, 1, 2]}, "is empty"),                        # (a 500 before)
    ("deep", None, "not valid JSON"),                                     # a header nested 100,000 deep (a 500)
    (None, {"spacing": [1, 1, 2], "direction": [1, 0, 0]}, "meta.direction must be 9 numbers"),
    (None, {"spacing": [1, 1, 2], "direction": [1, 0, 0, 0, 1, 0, 0, 0, True]}, "meta.direction must be 9 numbers"),
    (None, {"spacing": [1, 1, 2], "direction": [1, 0, 0, 0, 2, 0, 0, 0, 1]}, "orthogonal unit vectors"),
])
def test_malformed_sessions_get_400_with_one_line(server, body, meta, says):
    import struct
    image, _ = volume()
    if body == "empty":
        body = wire.pack({"image": np.zeros((0, 16, 16), np.float32)}, meta)
    elif body == "deep":
        header = b"[" * 100000
        body = wire.MAGIC + struct.pack(">I", len(header)) + header
    if body is None:
        body = wire.pack({"image": image}, meta)
    elif body == "constant":
        body = wire.pack({"image": np.ones(SHAPE, np.float32)}, meta)
    elif body == "2d":
        body = wire.pack({"image": image[0]}, meta)
    status, answer = raw(server, "POST", "/v1/sessions", body, auth(server, **{"Content-Type": wire.CONTENT_TYPE}))
    assert status == 400 and says in answer["error"] and "\n" not in answer["error"]


def test_unknown_session_and_bad_settings(server):
    c = server.client()
    with pytest.raises(ServerError) as err:
        c.status("0123456789abcdef", "abc")
    assert err.value.status == 404 and "unknown session" in str(err.value)
    image, support = volume()
    sid = c.create_session(image, (1, 1, 2))
    try:
        with pytest.raises(ServerError) as err:
            c.start_run(sid, support, ["prompts.top_k=0"])
        assert err.value.status == 400 and "prompts.top_k must be >= 1" in str(err.value)
        with pytest.raises(ServerError) as err:
            c.start_run(sid, support[:, :10])
        assert err.value.status == 400 and "support grid" in str(err.value)
    finally:
        c.delete_session(sid)
    with pytest.raises(ServerError) as err:
        c.session(sid)
    assert err.value.status == 404 and "deleted" in str(err.value)


def test_empty_support_fails_the_run_with_the_engines_message(server):
    c = server.client()
    image, support = volume()
    sid = c.create_session(image, (1, 1, 2))
    rid = c.start_run(sid, np.zeros_like(support))
    st = c.wait(sid, rid)
    assert st["state"] == "failed" and "support label is empty" in st["error"]
    with pytest.raises(ServerError) as err:
        c.result(sid, rid)
    assert err.value.status == 409 and "failed" in str(err.value)
    c.delete_session(sid)


# ---------------------------------------------------------------------- results

def test_segment_through_the_server_equals_a_local_run(server, files, remote_run, capsys):
    out, proc = remote_run
    assert "segmented 1 label(s)" in proc.stdout
    local = files["dir"] / "local"
    local.mkdir()
    # Local, in this process, on the embeddings the server left in its disk cache (the same bytes).
    code = main(["segment", files["image"], files["support"], "-o", str(local / "seg.nii.gz"), "--points-out",
                 str(local / "points.json"), "--confidence-out", str(local / "conf.nii.gz"), "--device", "cpu",
                 "--features", "sam", "--embedding-cache", os.path.join(server.folder, "emb"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(local / "seg.nii.gz")))
    assert a.sum() > files["support_array"].sum() * 3          # more than the painted slice came back
    assert np.array_equal(a, b)
    ca = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "conf.nii.gz")))
    cb = sitk.GetArrayFromImage(sitk.ReadImage(str(local / "conf.nii.gz")))
    assert np.array_equal(ca, cb)
    pa, pb = json.load(open(str(out / "points.json"))), json.load(open(str(local / "points.json")))
    assert pa["slices"] == pb["slices"]
    image = sitk.ReadImage(files["image"])
    seg = sitk.ReadImage(str(out / "seg.nii.gz"))
    assert seg.GetSpacing() == image.GetSpacing() and seg.GetOrigin() == image.GetOrigin()


def test_a_volume_stored_transposed_segments_as_the_volume_stored_as_drawn(server, files, remote_run, tmp_path):
    """The case's volume stored with i and j exchanged (its direction saying so, as a file converted
    another way may be): `synpo segment --server` sends its direction, the server gives the encoders its
    slices as the case's (synpo/layout.py), and the outputs are the case's, in the file's layout.
    (The case's header is a placeholder, identity at origin 0: its slices go as stored. The copy is placed
    as the development volumes are, at ORIGIN: once turned, posterior side up, the patient's right in
    column 0.)"""
    out, _ = remote_run
    T = lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))
    ORIGIN = (5.0, 7.0, 9.0)
    paths = {}
    for name, array in (("image", files["array"]), ("support", files["support_array"])):
        img = sitk.GetImageFromArray(T(array))
        img.SetSpacing((1.0, 1.0, 2.0))
        img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))         # column i is -y, column j is +x
        img.SetOrigin(ORIGIN)
        paths[name] = str(tmp_path / ("%s.nii.gz" % name))
        sitk.WriteImage(img, paths[name])
    code = main(["segment", paths["image"], paths["support"], "-o", str(tmp_path / "seg.nii.gz"),
                 "--points-out", str(tmp_path / "points.json"), "--server", server.url,
                 "--token-file", server.token_file, "--quiet"])
    assert code == 0
    case = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg.nii.gz")))
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    assert case.sum() > files["support_array"].sum() * 3 and np.array_equal(T(case), stored)
    pa, pb = json.load(open(str(out / "points.json"))), json.load(open(str(tmp_path / "points.json")))
    assert [(s["slice"], s["status"]) for s in pa["slices"]] == [(s["slice"], s["status"]) for s in pb["slices"]]
    # The same points, i and j exchanged as indices, and where the copy's header places the case's voxels.
    ijk = lambda doc: [[p["ijk"] for p in s["positive"]] for s in doc["slices"]]
    assert [[[p[1], p[0], p[2]] for p in s] for s in ijk(pa)] == ijk(pb) and any(ijk(pa))
    placed = [[[ORIGIN[0] + p["ijk"][0], ORIGIN[1] - p["ijk"][1], ORIGIN[2] + 2 * p["ijk"][2]]
               for p in s["positive"] + s["negative"]] for s in pa["slices"]]
    assert np.allclose(sum(placed, []), sum([[p["lps"] for p in s["positive"] + s["negative"]] for s in pb["slices"]], []))


def test_paint_on_adjacent_slices_is_a_support_through_the_server_and_locally(server, files, remote_run, tmp_path,
                                                                              capsys):
    """Any parallel paint is a support: the organ painted on two adjacent slices and a third one
    (the issue's refused second round) runs through `synpo segment --server` and locally, alike."""
    _, mask = ellipsoid_volume(shape=SHAPE, centre=(SHAPE[0] // 2, 24, 28), radii=(SHAPE[0] / 2 - 0.5, 12, 15))
    paint = np.zeros(mask.shape, dtype=np.uint8)
    for k in (2, 4, 5):
        paint[k][mask[k]] = 1
    support = write(paint, tmp_path / "adjacent.nii.gz")
    outs = []
    for where, extra in (("remote", ["--server", server.url, "--token-file", server.token_file]),
                         ("local", ["--device", "cpu", "--features", "sam", "--embedding-cache",
                                    os.path.join(server.folder, "emb")])):
        out = tmp_path / ("%s.nii.gz" % where)
        code = main(["segment", files["image"], support, "-o", str(out), "--points-out",
                     str(tmp_path / ("%s.json" % where)), "--quiet"] + extra)
        assert code == 0, capsys.readouterr().err
        outs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    assert np.array_equal(outs[0], outs[1])
    for k in (2, 4, 5):
        assert np.array_equal(outs[0][k] == 1, mask[k])          # each painted slice kept exactly
    points = json.load(open(str(tmp_path / "remote.json")))
    statuses = {s["slice"]: s["status"] for s in points["slices"] if s["label"] == 1}
    assert [k for k, st in sorted(statuses.items()) if st == "support"] == [2, 4, 5]
    assert outs[0][3].any()                                      # the slice between them was decided


def test_outputs_get_the_users_usual_permissions(remote_run):
    out, _ = remote_run
    mask = os.umask(0)
    os.umask(mask)
    for name in ("seg.nii.gz", "points.json", "conf.nii.gz"):
        assert os.stat(str(out / name)).st_mode & 0o777 == 0o666 & ~mask


def test_slices_are_reported_as_they_are_decided(server, files, remote_run):
    c = server.client()
    sid = c.create_session(files["array"], (1, 1, 2))
    rid = c.start_run(sid, files["support_array"])
    c.wait(sid, rid)
    got, nxt = c.slices(sid, rid)
    result = c.result(sid, rid)
    assert nxt == len(got) == SHAPE[0]                       # every slice's decision, once
    assert sorted(r.index for r, _ in got) == list(range(SHAPE[0]))
    for rec, mask in got:
        final = result.labels[rec.index] == 1
        if rec.status == "support":
            assert mask is not None and np.array_equal(mask, final)
        elif rec.status == "present":
            # The decided mask; the result adds at most the one-pixel rim of volume.edge_grow
            # (assembly.grow_edges, after every slice is decided) around it.
            assert mask is not None and not (mask & ~final).any()
            assert not (final & ~ndimage.binary_dilation(mask)).any() and mask.sum() > 0.8 * final.sum()
        else:
            assert mask is None and not final.any()
    more, again = c.slices(sid, rid, since=nxt)
    assert more == [] and again == nxt
    c.delete_session(sid)


def test_a_result_fetched_a_step_at_a_time_is_the_result(server, files, remote_run):
    """client.ResultDownload (the Slicer module's fetch, a step per timer tick): the first request
    only starts the packing (202, at once), then parts of `chunk` bytes, then the message
    decompressed a chunk a step; the same VolumeResult as result(). A server that answers the whole
    message at once (before parts existed) is taken as it is; a bad offset is refused."""
    c = server.client()
    sid = c.create_session(files["array"], (1, 1, 2))
    rid = c.start_run(sid, files["support_array"])
    c.wait(sid, rid)
    whole = c.result(sid, rid, "max")
    download = c.result_download(sid, rid, "max", chunk=1024)
    assert download.step() is None and download.total is None         # packing started: nothing yet
    got, steps = None, 0
    while got is None:
        got, steps = download.step(), steps + 1
        assert steps < 10000
    assert download.total > 4 * 1024 and steps > download.total // 1024   # in parts, then unpacked in steps
    for old in (got, None):
        if old is None:                                # a server without parts: the offset is not sent on
            exchange = c.exchange
            c.exchange = lambda method, path, *a, **k: exchange(method, path.split("&offset=")[0], *a, **k)
            old_download = c.result_download(sid, rid, "max", chunk=1024)
            while old is None:
                old = old_download.step()
            assert old_download.total == old_download.received and old_download.total > 4 * 1024
            del c.exchange
        assert np.array_equal(old.labels, whole.labels)
        assert np.array_equal(old.confidence[1], whole.confidence[1])
        assert [r.to_dict() for r in old.records] == [r.to_dict() for r in whole.records]
    with pytest.raises(ServerError, match="offset must be"):
        c.exchange("GET", "/v1/sessions/%s/runs/%s/result?offset=-1" % (sid, rid))
    c.delete_session(sid)


def test_redecode_through_the_server_equals_a_local_redecode(server, files, remote_run):
    from synpo.session import Models, Session
    c = server.client()
    sid = c.create_session(files["array"], (1, 1, 2))
    rid = c.start_run(sid, files["support_array"])
    c.wait(sid, rid)
    t = SHAPE[0] // 2 + 1
    pos, neg = [[28.0, 24.0], [24.0, 20.0]], [[5.0, 5.0]]
    mask, iou = c.redecode(sid, t, pos, neg, label=1)
    local = Session(files["array"], (1, 1, 2), Models.load("litemedsam", "sam", device="cpu"),
                    embedding_cache=os.path.join(server.folder, "emb"))
    local.run(files["support_array"])
    lmask, liou = local.redecode(t, pos, neg, label=1)
    assert mask.any() and np.array_equal(mask, lmask) and abs(iou - liou) < 1e-6
    with pytest.raises(ServerError) as err:
        c.redecode(sid, SHAPE[0] + 3, pos, neg)
    assert err.value.status == 400 and "outside the volume" in str(err.value)
    with pytest.raises(ServerError) as err:
        c.redecode(sid, t, [], neg)
    assert err.value.status == 400 and "positive point" in str(err.value)
    # Points off the slice, not numbers, or beyond any click count: 400, one line (a 500 before; 100,000
    # points made SAM ask for 320 GB).
    for bad_pos, says in (([[-500.0, -500.0]], "lie on the slice"), ([[float("nan"), 1.0]], "finite"),
                          ([[1.0, 1.0]] * 300, "at most")):
        with pytest.raises(ServerError) as err:
            c.redecode(sid, t, bad_pos, neg)
        assert err.value.status == 400 and says in str(err.value), str(err.value)
    c.delete_session(sid)


def test_two_clients_with_separate_sessions_at_once(server, files, remote_run):
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(remote_run[0] / "seg.nii.gz")))
    results, errors = {}, []

    def one(name):
        try:
            c = server.client()
            sid = c.create_session(files["array"], (1, 1, 2))
            rid = c.start_run(sid, files["support_array"])
            st = c.wait(sid, rid)
            results[name] = (sid, st["state"], c.result(sid, rid).labels)
            c.delete_session(sid)
        except Exception as exc:               # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results["a"][0] != results["b"][0]
    for name in "ab":
        assert results[name][1] == "done" and np.array_equal(results[name][2], expected)


def test_cancel_mid_run(server):
    c = server.client()
    image, support = volume(seed=7, shape=(14, 48, 56))       # not in the embedding cache: encoding takes seconds
    sid = c.create_session(image, (1, 1, 2))
    rid = c.start_run(sid, support)
    deadline = time.time() + 120
    while True:
        st = c.status(sid, rid)
        if st["state"] == "running" and st["done"] > 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert st["state"] == "running"
    c.cancel(sid, rid)
    st = c.wait(sid, rid)
    assert st["state"] == "cancelled" and st["done"] < st["total"]
    with pytest.raises(ServerError) as err:
        c.result(sid, rid)
    assert err.value.status == 409 and "cancelled" in str(err.value)
    c.delete_session(sid)


def test_a_second_run_on_a_busy_session_is_refused(server):
    c = server.client()
    image, support = volume(seed=8, shape=(12, 48, 56))
    sid = c.create_session(image, (1, 1, 2))
    rid = c.start_run(sid, support)
    with pytest.raises(ServerError) as err:
        c.start_run(sid, support)
    assert err.value.status == 409 and "busy" in str(err.value)
    c.cancel(sid, rid)
    c.wait(sid, rid)
    c.delete_session(sid)


# ---------------------------------------------------------------------- limits and failures

def test_sessions_beyond_the_memory_budget_are_evicted(tmp_path):
    srv = Server(str(tmp_path), "--max-memory-mb", "1")
    try:
        c = srv.client()
        image, _ = volume(shape=(40, 48, 56))                   # 430 KB as float32: two fit in 1 MB, three do not
        ids = [c.create_session(image + i, (1, 1, 2)) for i in range(3)]
        listing = c.json("GET", "/v1/sessions")
        assert [s["session"] for s in listing["sessions"]] == ids[1:] and listing["evictions"] == 1
        assert listing["memory_mb"] <= 1
        with pytest.raises(ServerError) as err:
            c.session(ids[0])
        assert err.value.status == 404 and "memory budget" in str(err.value)
        c.session(ids[1])                                      # used: now the most recent
        c.create_session(image, (1, 1, 2))
        left = [s["session"] for s in c.json("GET", "/v1/sessions")["sessions"]]
        assert ids[1] in left and ids[2] not in left
    finally:
        srv.stop()


def test_server_killed_mid_run_gives_the_client_a_clear_error(tmp_path):
    srv = Server(str(tmp_path))
    image, support = volume(seed=9, shape=(16, 48, 56))
    img, sup = write(image, tmp_path / "i.nii.gz"), write(support, tmp_path / "s.nii.gz")
    out = tmp_path / "out.nii.gz"
    cli = subprocess.Popen(synpo_cmd() + ["segment", img, sup, "-o", str(out), "--server", srv.url, "--token-file",
                                          srv.token_file, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        c = srv.client()
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = [r for s in c.json("GET", "/v1/sessions")["sessions"] for r in s["runs"] if r["state"] == "running"]
            if runs:
                break
            time.sleep(0.1)
        assert runs
        srv.proc.send_signal(signal.SIGKILL)
        _, err = cli.communicate(timeout=120)
    finally:
        srv.stop()
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("synpo: error: cannot reach the SynPo server at %s" % srv.url), err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(str(tmp_path)) if p.startswith(".tmp")]


def test_server_errors_reach_the_cli_as_one_line_and_nothing_is_written(server, files, capsys, tmp_path):
    out = tmp_path / "o.nii.gz"
    code = main(["segment", files["image"], files["support"], "-o", str(out), "--server", server.url,
                 "--token-file", server.token_file, "--sam", "vit_b"])
    err = capsys.readouterr().err
    assert code == 2 and "runs sam=litemedsam, not vit_b" in err and not out.exists()
    code = main(["segment", files["image"], files["support"], "-o", str(out), "--server", server.url,
                 "--token-file", server.token_file, "--precision", "fp16"])      # (ran in fp32 without a word)
    err = capsys.readouterr().err
    assert code == 2 and "runs precision=fp32, not fp16" in err and not out.exists()
    bad = tmp_path / "bad-token"
    bad.write_text("x" * 40)
    code = main(["segment", files["image"], files["support"], "-o", str(out), "--server", server.url,
                 "--token-file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("synpo: error: the SynPo server said: wrong token (HTTP 401)")
    assert not out.exists()
    code = main(["segment", files["image"], files["support"], "-o", str(out), "--server", "http://127.0.0.1:9",
                 "--token-file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach the SynPo server at http://127.0.0.1:9" in err and not out.exists()


def test_absent_marks_that_are_not_lists_are_refused(server):
    """meta.absent {"1": "12"}: 400 (the string was read as slices 1 and 2); a bool support image and a
    slice index `true` are refused as well."""
    c = server.client()
    image, support = volume()
    sid = c.create_session(image, (1, 1, 2))
    try:
        for absent in ({"1": "12"}, {"1": [1.5]}, {"1": [True]}):          # (1.5 was read as slice 1)
            body = wire.pack({"support": support}, {"absent": absent})
            status, answer = raw(server, "POST", "/v1/sessions/%s/runs" % sid, body,
                                 auth(server, **{"Content-Type": wire.CONTENT_TYPE}))
            assert status == 400 and "meta.absent must map labels to lists" in answer["error"], answer
        body = wire.pack({"support": support, "support_image": image > image.mean()}, {})
        status, answer = raw(server, "POST", "/v1/sessions/%s/runs" % sid, body,
                             auth(server, **{"Content-Type": wire.CONTENT_TYPE}))
        assert status == 400 and "the support image has dtype bool" in answer["error"], answer
        status, answer = raw(server, "POST", "/v1/sessions/%s/redecode" % sid, json.dumps(
            {"slice": True, "positive": [[3, 4]]}).encode(), auth(server, **{"Content-Type": "application/json"}))
        assert status == 400 and "slice must be an integer" in answer["error"], answer
    finally:
        c.delete_session(sid)


def test_a_new_run_takes_its_slicing_axis_from_meta(server):
    """meta.axis (what the module gives when it sends a preview's volume again with every correction):
    paint that cannot tell its own axis (a dot) runs across the given one; anything but 0, 1, 2 is
    refused."""
    c = server.client()
    image, _ = volume()
    dot = np.zeros(image.shape, np.uint8)
    dot[image.shape[0] // 2, 24, 28] = 1
    sid = c.create_session(image, (1, 1, 2))
    try:
        for axis in (3, -1, "0", True, 1.0):
            body = wire.pack({"support": dot}, {"axis": axis})
            status, answer = raw(server, "POST", "/v1/sessions/%s/runs" % sid, body,
                                 auth(server, **{"Content-Type": wire.CONTENT_TYPE}))
            assert status == 400 and "meta.axis must be 0, 1 or 2" in answer["error"], (axis, answer)
        rid = c.start_run(sid, dot)                            # (no axis: the dot is ambiguous)
        st = c.wait(sid, rid)
        assert st["state"] == "failed" and "ambiguous" in st["error"], st
        upload = c.run_upload(sid, dot, axis=0)
        rid, _ = _finish(upload)
        st = c.wait(sid, rid)
        assert st["state"] == "done", st
        assert c.result(sid, rid).support.axis == 0
        # Corrections run on the session's axis: another one is refused, not silently ignored.
        body = wire.pack({"support": dot}, {"mode": "add", "axis": 1})
        status, answer = raw(server, "POST", "/v1/sessions/%s/runs" % sid, body,
                             auth(server, **{"Content-Type": wire.CONTENT_TYPE}))
        assert status == 400 and "session's slicing axis, 0" in answer["error"], answer
    finally:
        c.delete_session(sid)


def test_a_second_server_on_a_busy_port_leaves_the_first_ones_token(server, tmp_path):
    """`synpo serve` again on the port of a running one, writing the same token file (both default to
    ~/.cache/synpo/server-token and port 8765): refused with one line, and the running server's
    clients keep their token (the refused one had written a new token first)."""
    before = open(server.token_file).read()
    port = server.url.rsplit(":", 1)[1]
    proc = subprocess.run(synpo_cmd() + ["serve", "--port", port, "--token-out", server.token_file, "--device",
                                         "cpu", "--features", "sam"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot listen" in proc.stderr, proc.stderr
    assert open(server.token_file).read() == before
    assert server.client().json("GET", "/v1/sessions") is not None                # the token still works


def test_a_token_no_client_can_send_is_refused_at_start(tmp_path):
    """A UTF-8 token file started the server, and every request was 401: an HTTP header carries printable
    ASCII, which clients hold the token to (client.find_token)."""
    from synpo.errors import SynPoError
    from synpo.server import read_token_file
    path = tmp_path / "token"
    path.write_text("p\u00e4sswort-f\u00fcr-den-server-1234", encoding="utf-8")
    with pytest.raises(SynPoError, match="printable ASCII"):
        read_token_file(str(path))
    path.write_text("an-ascii-token-1234567")
    assert read_token_file(str(path)) == "an-ascii-token-1234567"


def test_servers_without_a_token_file_share_the_default_one(tmp_path, monkeypatch):
    """Two `synpo serve` without --token-file on one machine (on two ports) both wrote a fresh token
    to the default file ~/.cache/synpo/server-token: the first one's clients, reading that file
    (`synpo segment --server URL` without --token-file), were refused (401). The second now keeps
    the token the file holds; a file others may read is not trusted (a fresh token)."""
    from synpo.client import Client, find_token
    env = dict(os.environ, SYNPO_CACHE=str(tmp_path / "cache"))
    env.pop("SYNPO_TOKEN", None)
    procs, urls = [], []
    try:
        for n in range(2):
            ready = tmp_path / ("ready%d" % n)
            procs.append(subprocess.Popen(synpo_cmd() + ["serve", "--port", "0", "--device", "cpu", "--features",
                                                         "sam", "--ready-file", str(ready), "--parent-pid",
                                                         str(os.getpid())], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
            deadline = time.time() + 120
            while not ready.exists() or not ready.read_text().strip():
                assert procs[-1].poll() is None and time.time() < deadline, procs[-1].stderr.read()
                time.sleep(0.1)
            urls.append(ready.read_text().strip())
        token_file = tmp_path / "cache" / "server-token"
        monkeypatch.setenv("SYNPO_CACHE", env["SYNPO_CACHE"])
        monkeypatch.delenv("SYNPO_TOKEN", raising=False)
        token = find_token()                                # as a client without --token-file reads it
        for url in urls:
            assert Client(url, token).json("GET", "/v1/sessions") is not None
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    from synpo.server import reusable_token
    assert reusable_token(str(token_file)) == token
    token_file.chmod(0o644)                                 # readable by others: not reused
    assert reusable_token(str(token_file)) is None
    token_file.chmod(0o600)
    token_file.write_text("short\n")
    assert reusable_token(str(token_file)) is None and reusable_token(str(tmp_path / "none")) is None


@pytest.mark.parametrize("argv, says", [
    (["--session-ttl", "nan"], "--session-ttl must be a number of seconds > 0"),
    (["--session-ttl", "inf"], "--session-ttl must be a number of seconds > 0"),
    (["--tls-cert", "GARBAGE", "--tls-key", "GARBAGE"], "cannot be loaded"),
    (["--ready-file", "missing/ready"], "give a file in an existing folder"),
    (["--token-out", "."], "give a file in an existing folder"),
])
def test_bad_serve_options_are_one_line_before_anything_starts(tmp_path, argv, says):
    """Each was a traceback (after the ready file named a dead server, for a bad certificate) or, for
    nan / inf, a server whose health answer was a 500."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    argv = [str(garbage) if a == "GARBAGE" else str(tmp_path / a) if a.startswith("missing") else a for a in argv]
    proc = subprocess.run(synpo_cmd() + ["serve", "--port", "0", "--token-out", str(tmp_path / "t")] + argv,
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr


def test_a_server_stopped_during_a_run_exits_cleanly(tmp_path):
    """Ctrl+C while a run is inside the encoder: exit status 0 (the interpreter's finalisation under the
    run's thread aborted the process: exit 134, "terminate called without an active exception")."""
    srv = Server(str(tmp_path))
    try:
        c = srv.client()
        image, support = volume(seed=11, shape=(14, 48, 56))
        sid = c.create_session(image, (1, 1, 2))
        rid = c.start_run(sid, support)
        deadline = time.time() + 120
        while c.status(sid, rid)["done"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_non_loopback_host_without_a_token_file_is_refused_at_start(tmp_path):
    proc = subprocess.run(synpo_cmd() + ["serve", "--host", "0.0.0.0", "--port", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("synpo: error: --host 0.0.0.0 is reachable from other machines: give --token-file")


def test_an_owned_folder_must_hold_the_token_file_and_go_with_a_parent_pid(tmp_path):
    """--owned-folder is removed when the --parent-pid process has gone: refused unless it is the
    folder of --token-file (a mistyped path never removes a user's folder), and without --parent-pid."""
    import argparse
    from synpo.errors import SynPoError
    from synpo.server import add_arguments, check_arguments, make_token_file
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    folder = tmp_path / "synpo-server-x"
    folder.mkdir()
    token = str(folder / "token")
    make_token_file(token)
    me = str(os.getpid())
    check_arguments(parser.parse_args(["--token-file", token, "--parent-pid", me, "--owned-folder", str(folder)]))
    for argv in (["--token-file", token, "--owned-folder", str(folder)],                    # no parent
                 ["--token-file", token, "--parent-pid", me, "--owned-folder", str(tmp_path)],  # not its folder
                 ["--parent-pid", me, "--owned-folder", str(folder)],                         # no token file
                 ["--token-file", token, "--parent-pid", me, "--owned-folder", str(folder / "none")]):
        with pytest.raises(SynPoError, match="--owned-folder DIR goes with --parent-pid, and DIR must be the folder"):
            check_arguments(parser.parse_args(argv))
    assert os.path.isfile(token)
    # The parent gone before the server checked it (3D Slicer closed while it started): the folder and its
    # token go too (nobody else is left to remove them).
    import subprocess
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(SynPoError, match="no such process"):
        check_arguments(parser.parse_args(["--token-file", token, "--parent-pid", str(gone.pid),
                                           "--owned-folder", str(folder)]))
    assert not folder.exists()


def test_client_side_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import synpo.client, synpo.wire, synpo.outputs, synpo.result, synpo.io\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------- the service's bookkeeping, in process

def _service_case(budget=1 << 30):
    """A Service without models (its runs fail at once) and one small session: the bookkeeping only."""
    from synpo.service import Service
    service = Service(None, budget, 600.0, 1, None)
    image, support = volume(seed=3, shape=(6, 24, 28))
    return service, service.create(image, (1, 1, 2)), support


def _until(predicate, seconds=10.0):
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.02)
    return predicate()


def test_a_run_cancelled_while_queued_ends_at_once():
    """--max-runs 1 (the default): a run queued behind another session's is cancelled when asked, not
    when the other run ends (its session stayed busy, and the module's next Preview waited on it)."""
    service, entry, support = _service_case()
    service.slots.acquire()                    # another session's run holds the only compute slot
    try:
        run = service.start_run(entry, support, {})
        assert _until(lambda: run.state == "queued", 2.0) and entry.busy()
        run.cancel_event.set()                 # (DELETE .../runs/ID)
        assert _until(lambda: run.state == "cancelled", 5.0), run.state
        assert not entry.busy()
    finally:
        service.slots.release()


def test_the_session_whose_run_just_ended_is_not_evicted_before_its_client_reads_it():
    service, entry, support = _service_case()
    service.budget_bytes = 1                                   # every session is over this budget now
    run = service.start_run(entry, support, {})
    assert _until(lambda: run.state in ("done", "failed"), 10.0), run.state
    time.sleep(0.2)                                            # (the budget is enforced after the state)
    assert service.get(entry.id) is entry and service.get_run(entry, run.id) is run


def test_a_run_on_a_session_removed_meanwhile_is_refused():
    """The session is deleted (or evicted, expired) while a run's body arrives: the run is refused
    with the reason, not computed for nobody while it holds the compute slot."""
    from synpo.service import NotFound
    service, entry, support = _service_case()
    service.delete(entry.id)
    with pytest.raises(NotFound, match="is gone: deleted by a client"):
        service.start_run(entry, support, {})


def test_only_the_last_result_is_kept_as_the_memory_budget_counts_it(monkeypatch):
    """Session.memory_bytes counts the session's last result: an earlier run's whole result (1.2 GB for a
    512 x 512 x 300 CT with per-label confidence) was kept beside it, outside --max-memory-mb."""
    import types
    service, entry, support = _service_case()
    monkeypatch.setattr(entry.session, "run", lambda *a, **k: types.SimpleNamespace(labels=np.zeros(3)))
    runs = []
    for _ in range(2):
        runs.append(service.start_run(entry, support, {}))
        assert _until(lambda: runs[-1].state == "done", 10.0), runs[-1].state
    assert runs[0].result is None and runs[1].result is not None


# ---------------------------------------------------------------------- a team server shared by clients, in process

class _AppServer:
    """create_app over a model-free Service on a free loopback port, in this process (a run's result
    is a stub: the bookkeeping and the clients' handling of it only, no model loaded)."""

    def __init__(self, service, token="team-token-0123456789"):
        import socket
        import uvicorn
        from synpo.server import create_app
        self.service, self.token = service, token
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, token, 64 << 20), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        assert _until(lambda: self.server.started, 10.0)

    def client(self, timeout=10.0):
        from synpo.client import Client
        return Client(self.url, self.token, timeout)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def _stub_runs(monkeypatch):
    """Session.run gives at once a result of the paint's slice (a VolumeResult, as the server sends it)."""
    from synpo.result import VolumeResult
    from synpo.session import Session
    from synpo.support import Support

    def run(self, support, cfg=None, support_image=None, absent=None, axis=None, **kwargs):
        k = int(np.flatnonzero(support.any(axis=(1, 2)))[0])
        self.support = support
        self.result = VolumeResult((support > 0).astype(np.uint8), {1: (support > 0).astype(np.float32)}, [],
                                   Support(axis=0, labels=[1], slices={1: [k]}), "ct", ["stub"], {})
        return self.result
    monkeypatch.setattr(Session, "run", run)


def _step_until(job, states, seconds=20.0):
    deadline = time.time() + seconds
    while job.state not in states and job.active() and time.time() < deadline:
        job.step()
    return job.state


def test_a_done_runs_result_is_not_evicted_by_another_clients_upload_before_it_is_fetched(monkeypatch):
    """A team server with a budget for one session: client A's run is done, and client B's volume
    arrives before A has fetched the result. A's session was evicted then (idle, least recently used):
    A's preview failed with 'session ... is gone: evicted', the run computed for nobody. Held until
    fetched (or cancelled, or RESULT_GRACE after the client's last request), then evictable."""
    from synpo.service import Service
    from SynPoSlicerLib.engine import RemoteJob
    _stub_runs(monkeypatch)
    image_a, support_a = volume(seed=5, shape=(6, 24, 28))
    image_b, support_b = volume(seed=6, shape=(6, 24, 28))
    one = image_a.astype(np.float32).nbytes
    app = _AppServer(Service(None, int(one * 1.5), 600.0, 1, None))
    try:
        a = RemoteJob(app.client(), image_a, (1, 1, 2), support_a)
        assert _step_until(a, ("fetch",)) == "fetch", (a.state, a.error)
        b = app.client()
        sid_b = b.create_session(image_b, (1, 1, 2))           # another client's upload, over the budget
        assert _step_until(a, ("done",)) == "done", a.error
        assert np.array_equal(a.result.labels, (support_a > 0).astype(np.uint8))
        # Fetched: the next upload may evict it (the budget holds again).
        sid_b = b.create_session(image_b + 1, (1, 1, 2))
        listing = b.json("GET", "/v1/sessions")
        assert [s["session"] for s in listing["sessions"]] == [sid_b], listing
        # A result cancelled (the module's Cancel while it was fetched) is not held either.
        rid = b.start_run(sid_b, support_b)
        assert b.wait(sid_b, rid, interval=0.05)["state"] == "done"
        b.cancel(sid_b, rid)
        sid_c = b.create_session(image_b + 2, (1, 1, 2))
        assert [s["session"] for s in b.json("GET", "/v1/sessions")["sessions"]] == [sid_c]
    finally:
        app.stop()


def test_segment_server_sends_the_volume_again_when_another_clients_upload_evicts_it_before_its_run(monkeypatch):
    """`synpo segment --server` (client.run_remote) on a team server with a small --max-memory-mb: its
    session is idle between its upload and its run's request, and another client's upload arriving
    then evicted it; the command failed with 'session ... is gone: evicted', where the Slicer module
    (RemoteJob) sends the volume again. It sends it again too (a few times at most)."""
    from synpo import client as client_module
    from synpo.service import Service
    _stub_runs(monkeypatch)
    image, support = volume(seed=7, shape=(6, 24, 28))
    other, _ = volume(seed=8, shape=(6, 24, 28))
    app = _AppServer(Service(None, int(image.astype(np.float32).nbytes * 1.5), 600.0, 1, None))
    try:
        c, b = app.client(), app.client()
        start, raced = client_module.Client.start_run, []

        def racing(self, sid, *args, **kwargs):
            if len(raced) < 1:                  # the other client's volume lands first, once
                raced.append(b.create_session(other + len(raced), (1, 1, 2)))
            return start(self, sid, *args, **kwargs)
        monkeypatch.setattr(client_module.Client, "start_run", racing)
        result = client_module.run_remote(c, image, (1, 1, 2), support)
        assert np.array_equal(result.labels, (support > 0).astype(np.uint8)) and raced
        # Evicted before every try: a clear failure, not a loop.
        monkeypatch.setattr(client_module.Client, "start_run", lambda self, sid, *a, **k: (
            b.create_session(other, (1, 1, 2)), start(self, sid, *a, **k))[1])
        with pytest.raises(ServerError, match="gone: evicted"):
            client_module.run_remote(c, image, (1, 1, 2), support)
    finally:
        app.stop()


def test_an_update_whose_session_goes_while_it_runs_or_fetches_is_told_so(monkeypatch):
    """An Update (RemoteJob add=True) whose session the server no longer holds once its run has started
    (the team server restarted, the session deleted or evicted before the result was fetched): the job
    failed with the bare 404 and `gone` unset, so the module neither said what to do nor sent the volume
    again (SynPoSlicerLogic._resendUpdate), as it does when the session is gone at the Update's start."""
    from synpo.service import Service
    from SynPoSlicerLib.engine import RemoteJob
    _stub_runs(monkeypatch)
    image, support = volume(seed=9, shape=(6, 24, 28))
    app = _AppServer(Service(None, 1 << 30, 600.0, 1, None))
    try:
        c = app.client()
        sid = c.create_session(image, (1, 1, 2))
        rid = c.start_run(sid, support)
        assert c.wait(sid, rid, interval=0.05)["state"] == "done"
        monkeypatch.setattr(app.service.entries[sid].session, "add_support",
                            lambda *a, **k: app.service.entries[sid].session.result)
        for stop_at in ("running", "fetch"):
            job = RemoteJob(c, None, (), support, session_id=sid, add=True)
            assert _step_until(job, (stop_at,)) == stop_at, job.error
            c.delete_session(sid)              # (the server restarted: "unknown session" alike)
            assert _step_until(job, ()) == "failed"
            assert job.gone and "no longer holds this preview's volume" in job.error, job.error
            sid = c.create_session(image, (1, 1, 2))
            rid = c.start_run(sid, support)
            assert c.wait(sid, rid, interval=0.05)["state"] == "done"
            monkeypatch.setattr(app.service.entries[sid].session, "add_support",
                                lambda *a, **k: app.service.entries[sid].session.result)
    finally:
        app.stop()


def test_a_preview_whose_session_goes_while_it_runs_or_fetches_sends_the_volume_again(monkeypatch):
    """A new preview holds its volume until it ends; its session gone once the run started (the server
    restarted at the same URL, the session deleted) failed it with the bare 404. It sends the volume
    again, once, as it does when a session it meant to reuse is gone at the start."""
    from synpo.service import Service
    from SynPoSlicerLib.engine import RemoteJob
    _stub_runs(monkeypatch)
    image, support = volume(seed=11, shape=(6, 24, 28))
    app = _AppServer(Service(None, 1 << 30, 600.0, 1, None))
    try:
        c = app.client()
        for stop_at in ("running", "fetch"):
            job = RemoteJob(c, image, (1, 1, 2), support)
            assert _step_until(job, (stop_at,)) == stop_at, job.error
            first = job.session_id
            c.delete_session(first)
            assert _step_until(job, ()) == "done", job.error
            assert job.session_id not in (None, first) and job.image is None
            assert np.array_equal(job.result.labels, (support > 0).astype(np.uint8))
        # Once: gone again after that, the preview fails with the server's reason.
        job = RemoteJob(c, image, (1, 1, 2), support)
        assert _step_until(job, ("running",)) == "running", job.error
        c.delete_session(job.session_id)
        job.step()
        assert job.state == "upload" and job.stage.startswith("the server no longer holds the volume"), job.stage
        assert _step_until(job, ("running",)) == "running", job.error
        c.delete_session(job.session_id)
        assert _step_until(job, ()) == "failed" and "deleted by a client" in job.error, job.error
    finally:
        app.stop()


def test_a_preview_whose_volume_is_evicted_before_every_run_gives_up_with_the_servers_reason(monkeypatch):
    """The module's preview (RemoteJob) on a team server whose budget other clients' runs keep taking:
    its session evicted between its upload and its run's request, every time. It sent the volume
    again without end; it gives up after client.RESENDS uploads more, with the server's reason, as
    `synpo segment --server` does."""
    from synpo.client import RESENDS
    from synpo.service import NotFound, Service
    from SynPoSlicerLib.engine import RemoteJob
    _stub_runs(monkeypatch)
    image, support = volume(seed=12, shape=(6, 24, 28))
    service = Service(None, 1 << 30, 600.0, 1, None)
    created, create = [], service.create

    def counted(*args, **kwargs):
        created.append(1)
        return create(*args, **kwargs)

    def evicted(entry, *args, **kwargs):
        service._forget(entry, "evicted to keep the server within its memory budget (--max-memory-mb 1)")
        raise NotFound("session %s is gone: %s; create it again" % (entry.id, service.forgotten[entry.id]))
    monkeypatch.setattr(service, "create", counted)
    monkeypatch.setattr(service, "start_run", evicted)
    app = _AppServer(service)
    try:
        job = RemoteJob(app.client(), image, (1, 1, 2), support)
        assert _step_until(job, ()) == "failed"
        assert len(created) == RESENDS + 1 and "memory budget" in job.error, (len(created), job.error)
    finally:
        app.stop()


# ---------------------------------------------------------------------- the memory budget while a session grows

MB = 1 << 20
POINT = [[14, 12]]                       # a positive point on a 24 x 28 slice (x = column, y = row)


@pytest.fixture(scope="module")
def tiny_models(tiny_sam_checkpoint):
    """The tiny random SAM ViT (conftest) loaded as vit_b: each slice's embeddings take 2 MiB
    (256 x 64 x 64, float16), whatever the slice's size."""
    from synpo import features
    from synpo.session import Models
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(features.SAM_VIT_ARCHS, "vit_b", (32, 2, 2, (1,)))
        mp.setenv("SYNPO_VIT_B_CHECKPOINT", tiny_sam_checkpoint)
        yield Models.of(features.SamModel.load("vit_b", "cpu"))


def _watch_memory(monkeypatch, service):
    """The sessions' memory each time a run reports progress (after each slice it embeds)."""
    from synpo.service import Run
    seen, progress = [], Run.progress

    def watched(self, stage, done, total):
        seen.append(service.memory_bytes())
        progress(self, stage, done, total)
    monkeypatch.setattr(Run, "progress", watched)
    return seen


def test_a_redecode_that_embeds_a_slice_evicts_idle_sessions_beyond_the_budget(tiny_models):
    """POST .../redecode on a slice whose embeddings the session does not hold embeds it: the session
    grew past --max-memory-mb and nothing was evicted (the budget was enforced only when a session was
    created or a run ended)."""
    from synpo.service import NotFound, Service
    image, _ = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 5 * MB, 600.0, 1, None)
    a = service.create(image, (1, 1, 2))
    for t in (0, 1):                                           # two slices embedded: 4 MB
        service.redecode(a, t, POINT, [], axis=0)
    b = service.create(image + 1, (1, 1, 2))
    assert set(service.sessions()) == {a.id, b.id}
    mask, _ = service.redecode(b, 2, POINT, [], axis=0)        # 2 MB more: over 5 MB with A's
    assert mask.shape == (24, 28)
    assert service.memory_bytes() <= service.budget_bytes
    assert list(service.sessions()) == [b.id] and service.evictions == 1
    with pytest.raises(NotFound, match="memory budget"):
        service.get(a.id)


def test_a_redecode_the_budget_cannot_hold_fails_in_one_line_and_leaves_the_others(tiny_models):
    """A session that alone would outgrow --max-memory-mb: the re-decoding is refused with the option
    and what the session needs; no other session is evicted for it, and the session stays usable."""
    from synpo.errors import SynPoError
    from synpo.service import Service
    image, _ = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 3 * MB, 600.0, 1, None)
    other = service.create(image + 1, (1, 1, 2))
    a = service.create(image, (1, 1, 2))
    service.redecode(a, 0, POINT, [], axis=0)                  # 2 MB: fits
    with pytest.raises(SynPoError, match=r"--max-memory-mb 3\b") as refused:
        service.redecode(a, 1, POINT, [], axis=0)              # 4 MB: not within 3 MB, whatever is evicted
    assert "\n" not in str(refused.value) and "MB" in str(refused.value)
    assert set(service.sessions()) == {other.id, a.id} and service.evictions == 0
    assert service.memory_bytes() <= service.budget_bytes
    mask, _ = service.redecode(a, 1, POINT, [], axis=0)        # the session is still there for the next one
    assert mask.shape == (24, 28) and service.memory_bytes() <= service.budget_bytes


def test_a_run_evicts_idle_sessions_as_it_embeds_not_when_it_ends(tiny_models, monkeypatch):
    """A run embeds slice after slice: the sessions together stayed over --max-memory-mb until it ended
    (an idle session was evicted only then). They stay within it after each slice embedded."""
    from synpo.service import Service
    image, support = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 15 * MB, 600.0, 1, None)
    idle = service.create(image + 1, (1, 1, 2))
    for t in range(3):                                         # 6 MB
        service.redecode(idle, t, POINT, [], axis=0)
    entry = service.create(image, (1, 1, 2))
    seen = _watch_memory(monkeypatch, service)
    run = service.start_run(entry, support, {"confidence_all": True})     # every slice embedded: 12 MB
    assert _until(lambda: run.state in ("done", "failed", "cancelled"), 300.0), run.state
    assert run.state == "done", run.error
    assert seen and max(seen) <= service.budget_bytes, [round(s / MB, 1) for s in seen]
    assert list(service.sessions()) == [entry.id] and service.evictions == 1
    assert service.memory_bytes() <= service.budget_bytes


def test_a_run_the_budget_cannot_hold_fails_in_one_line_and_leaves_the_others(tiny_models, monkeypatch):
    """A session that alone outgrows --max-memory-mb as its run embeds: the run fails with the option and
    what the session would need (it went on to its end over the budget); the other sessions stay, and
    the session stays (its image; what it computed is dropped) for a run that fits."""
    from synpo.service import Service
    image, support = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 7 * MB, 600.0, 1, None)
    other = service.create(image + 1, (1, 1, 2))
    entry = service.create(image, (1, 1, 2))
    seen = _watch_memory(monkeypatch, service)
    run = service.start_run(entry, support, {"confidence_all": True})     # every slice embedded: 12 MB
    assert _until(lambda: run.state in ("done", "failed", "cancelled"), 300.0), run.state
    assert run.state == "failed", run.state
    assert re.search(r"--max-memory-mb 7\b", run.error), run.error
    assert re.search(r"about 12\.\d MB with every slice embedded; .* --max-memory-mb 13 or more", run.error), run.error
    assert max(seen) <= service.budget_bytes, [round(s / MB, 1) for s in seen]
    assert set(service.sessions()) == {other.id, entry.id} and service.evictions == 0
    assert service.memory_bytes() <= service.budget_bytes and entry.session.result is None
    mask, _ = service.redecode(entry, 3, POINT, [], axis=0)
    assert mask.shape == (24, 28)


def test_confidence_maps_a_session_can_do_without_go_before_it_is_refused_for_the_budget(tiny_models):
    """Confidence maps kept from an earlier paint (a run drops them only when it ends) or for the next
    Update count in the budget; a session they put over it was refused although it fits without them.
    They are dropped first (Session.shed); those the run in progress uses stay."""
    from synpo.service import Service
    from synpo.slice_confidence import SliceConfidence
    image, _ = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 9 * MB, 600.0, 1, None)
    entry = service.create(image, (1, 1, 2))
    service.redecode(entry, 0, POINT, [], axis=0)              # 2 MB of embeddings
    stale = SliceConfidence.__new__(SliceConfidence)
    stale.maps, stale.bound_at = {t: np.zeros((512, 512), np.float32) for t in range(6)}, 0.0      # 6 MB
    entry.session.stores["confidence/earlier"] = stale
    assert entry.session.memory_bytes() > 7 * MB
    mask, _ = service.redecode(entry, 1, POINT, [], axis=0)    # 2 MB more: over 9 MB with the old maps
    assert mask.shape == (24, 28) and "confidence/earlier" not in entry.session.stores
    assert service.memory_bytes() <= service.budget_bytes
    # During a run, the maps it has used since it started stay (those of its own paint).
    entry.session.running_since = 1.0
    used = SliceConfidence.__new__(SliceConfidence)
    used.maps, used.bound_at = {0: np.zeros((8, 8), np.float32)}, 2.0
    entry.session.stores["confidence/now"], entry.session.stores["confidence/earlier"] = used, stale
    entry.session.shed()
    assert "confidence/now" in entry.session.stores and "confidence/earlier" not in entry.session.stores


def test_a_volume_the_budget_cannot_hold_is_refused_at_upload(monkeypatch):
    """An image alone over --max-memory-mb was kept (no session could ever run on it within the
    budget): the upload is refused in one line, naming the option, and nothing is evicted for it."""
    from synpo.errors import SynPoError
    from synpo.service import Service
    small, _ = volume(seed=3, shape=(6, 24, 28))
    big = np.concatenate([volume(seed=4, shape=(40, 48, 56))[0]] * 3)       # 1.3 MB as float32
    service = Service(None, 1 * MB, 600.0, 1, None)
    kept = service.create(small, (1, 1, 2))
    with pytest.raises(SynPoError, match=r"--max-memory-mb 1\b"):
        service.create(big, (1, 1, 2))
    assert list(service.sessions()) == [kept.id] and service.evictions == 0
    app = _AppServer(Service(None, 1 * MB, 600.0, 1, None))
    try:
        with pytest.raises(ServerError, match="--max-memory-mb 1") as refused:
            app.client().create_session(big, (1, 1, 2))
        assert refused.value.status == 400
        assert app.client().json("GET", "/v1/sessions")["sessions"] == []
    finally:
        app.stop()


def test_embeddings_on_disk_beyond_the_budget_do_not_refuse_a_redecode_that_fits(tiny_models, monkeypatch, tmp_path):
    """--embedding-cache: a run the budget cannot hold fails, and the embeddings it computed before it
    outgrew the budget go to the disk cache all the same. Read back whole into the next store of that
    volume, they put the session over the budget at once: every later re-decoding (one slice, 2 MB) and
    run on that volume was refused, for good (the file stays). Embeddings read from the disk that the
    budget cannot hold are left there and computed as needed instead."""
    from synpo.service import Service
    image, support = volume(seed=3, shape=(6, 24, 28))
    service = Service(tiny_models, 7 * MB, 600.0, 1, str(tmp_path / "emb"))
    entry = service.create(image, (1, 1, 2))
    run = service.start_run(entry, support, {"confidence_all": True})     # every slice embedded: 12 MB
    assert _until(lambda: run.state in ("done", "failed", "cancelled"), 300.0), run.state
    assert run.state == "failed" and "--max-memory-mb 7" in run.error, run.error
    assert os.listdir(str(tmp_path / "emb"))                  # (what it computed, on the disk)
    mask, _ = service.redecode(entry, 3, POINT, [], axis=0)   # 2 MB: fits
    assert mask.shape == (24, 28) and service.memory_bytes() <= service.budget_bytes
    again = service.create(image, (1, 1, 2))                  # the volume sent again (another session)
    mask, _ = service.redecode(again, 2, POINT, [], axis=0)
    assert mask.shape == (24, 28)
