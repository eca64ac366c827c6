"""The `synpo` command line: bad input gets one clear line, exit status 2, and nothing is written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ellipsoid_volume
from synpo import weights
from synpo.cli import main


def _write(array, path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    image.SetOrigin(origin[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    image, mask = ellipsoid_volume()
    support = np.zeros(mask.shape, dtype=np.uint8)
    support[6][mask[6]] = 1
    return {
        "dir": tmp_path,
        "image": _write(image, tmp_path / "image.nii.gz"),
        "support": _write(support, tmp_path / "support.nii.gz"),
        "out": str(tmp_path / "out.nii.gz"),
        "array": image, "mask": mask, "support_array": support,
    }


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("synpo: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err      # notices may precede the one error line
    assert "Traceback" not in err
    return errors[0]


def _no_outputs(case):
    leftovers = [p for p in os.listdir(case["dir"]) if p.startswith("out") or p.startswith(".tmp")]
    assert leftovers == []


def test_missing_file(case, capsys):
    msg = run_error(capsys, ["segment", str(case["dir"] / "nope.nii.gz"), case["support"], "-o", case["out"]])
    assert "not found" in msg
    _no_outputs(case)


@pytest.mark.parametrize("setting, says", [("prompts.top_k=0", "prompts.top_k must be >= 1"),
                                            ("decode.nope=1", "unknown config field decode.nope"),
                                            ("decode.window_margin=wide", "decode.window_margin wants Optional[float]"),
                                            ("volume.walk_spacing_mm=1e400", "wants float, got inf"),
                                            ("decode.window_margin=NaN", "wants Optional[float], got nan"),
                                            ("top_k=3", "--set wants SECTION.FIELD=VALUE")])
def test_bad_setting(case, capsys, setting, says):
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--set", setting])
    assert says in msg
    _no_outputs(case)


def test_unreadable_file(case, capsys):
    bad = case["dir"] / "bad.nii.gz"
    bad.write_bytes(b"this is not a volume")
    msg = run_error(capsys, ["segment", str(bad), case["support"], "-o", case["out"]])
    assert "cannot read image" in msg
    _no_outputs(case)


def test_a_compressed_file_cut_short_is_refused(case, capsys):
    """ITK reads a .nii.gz or .nii cut short (a download stopped early) without a word, the rest zeros:
    it is refused with one line. A file named .gz that is not gzip is left to the reader."""
    whole = open(case["image"], "rb").read()
    assert whole[:2] == b"\x1f\x8b"
    cut = case["dir"] / "cut.nii.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    msg = run_error(capsys, ["segment", str(cut), case["support"], "-o", case["out"]])
    assert "damaged or cut short" in msg
    _no_outputs(case)
    import gzip
    plain = case["dir"] / "plain.nii.gz"
    plain.write_bytes(gzip.decompress(whole))                     # an uncompressed NIfTI named .nii.gz
    from synpo.io import read_volume
    assert read_volume(str(plain))[0].shape == read_volume(case["image"])[0].shape
    # Uncompressed (.nii) and cut short: ITK fills the rest with zeros as well; its header says the size.
    cut = case["dir"] / "cut.nii"
    cut.write_bytes(gzip.decompress(whole)[:-1])
    msg = run_error(capsys, ["segment", str(cut), case["support"], "-o", case["out"]])
    assert "the file is cut short" in msg and "its header needs" in msg
    _no_outputs(case)
    whole_nii = case["dir"] / "whole.nii"
    whole_nii.write_bytes(gzip.decompress(whole))
    assert np.array_equal(read_volume(str(whole_nii))[0], read_volume(case["image"])[0])
    # The size comes from the datatype, as niftilib reads it: a bitpix that disagrees, or a vox_offset
    # that is no number, is no reason to refuse a file ITK reads whole.
    import struct
    for at, value in ((72, struct.pack("<h", 64)), (108, struct.pack("<f", float("nan")))):
        odd = bytearray(gzip.decompress(whole))
        odd[at:at + len(value)] = value
        whole_nii.write_bytes(bytes(odd))
        assert read_volume(str(whole_nii))[0].shape == read_volume(case["image"])[0].shape


def test_2d_image(case, capsys):
    p = _write(case["array"][0], case["dir"] / "flat.nii.gz")
    assert "2D" in run_error(capsys, ["segment", p, case["support"], "-o", case["out"]])
    _no_outputs(case)


def test_4d_image(case, capsys):
    p = _write(np.stack([case["array"]] * 2), case["dir"] / "4d.nii.gz", spacing=(1, 1, 2, 1), origin=(0, 0, 0, 0))
    assert "4D" in run_error(capsys, ["segment", p, case["support"], "-o", case["out"]])
    _no_outputs(case)


def test_rgb_image(case, capsys):
    rgb = np.repeat(case["array"][..., None], 3, axis=-1)
    p = _write(rgb, case["dir"] / "rgb.nrrd", vector=True)
    assert "RGB" in run_error(capsys, ["segment", p, case["support"], "-o", case["out"]])
    _no_outputs(case)


def test_empty_support(case, capsys):
    p = _write(np.zeros_like(case["support_array"]), case["dir"] / "empty.nii.gz")
    assert "empty" in run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
    _no_outputs(case)


def test_support_on_another_grid(case, capsys):
    p = _write(case["support_array"], case["dir"] / "shifted.nii.gz", origin=(5.0, 0.0, 0.0))
    msg = run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
    assert "differs from the image grid" in msg and "--support-image" in msg
    p = _write(case["support_array"][:, :, :40], case["dir"] / "small.nii.gz")
    assert "differs" in run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
    _no_outputs(case)


def test_support_grid_differs_from_reference(case, capsys):
    ref = _write(case["array"][:, :, :40], case["dir"] / "ref.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--support-image", ref])
    assert "support image grid" in msg
    _no_outputs(case)


def test_paint_not_on_parallel_slices(case, capsys):
    s = case["support_array"].copy()
    s[:, 20:40, 40] = 1
    p = _write(s, case["dir"] / "cross.nii.gz")
    assert "parallel slices" in run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
    _no_outputs(case)


def test_paint_whose_orientation_cannot_be_told_names_the_tied_axes(case, capsys):
    s = np.zeros_like(case["support_array"])
    s[6, 30, 20:40] = 1                       # a line: one slice across k and across j
    p = _write(s, case["dir"] / "line.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
    assert "ambiguous" in msg and "across k and j" in msg
    _no_outputs(case)


def test_nan_and_inf_and_constant_images(case, capsys):
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        a = case["array"].copy()
        a[3, 3, 3] = value
        p = _write(a, case["dir"] / ("%s.mha" % name))     # NIfTI I/O drops NaN
        assert "NaN or infinite" in run_error(capsys, ["segment", p, case["support"], "-o", case["out"]])
    p = _write(np.full(case["array"].shape, 7.0, dtype=np.float32), case["dir"] / "const.nii.gz")
    assert "constant" in run_error(capsys, ["segment", p, case["support"], "-o", case["out"]])
    _no_outputs(case)


def test_unknown_model_and_bad_option(case, capsys):
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--sam", "vit_q"])
    assert "vit_q" in msg
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--features", "clip"])
    assert "clip" in msg
    _no_outputs(case)


def test_model_neither_cached_nor_downloadable(case, capsys, monkeypatch, tmp_path):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = weights.REGISTRY["vit_b"]
    monkeypatch.setitem(weights.REGISTRY, "vit_b", weights.ModelSpec(
        spec.name, spec.family, spec.arch, spec.licence, spec.size_mb,
        url="http://127.0.0.1:%d/sam.pth" % port, filename=spec.filename, sha256=spec.sha256))
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "cache"))
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--sam", "vit_b"])
    assert "cannot download" in msg
    _no_outputs(case)


def test_corrupt_bundled_checkpoint_is_refused(case, capsys, monkeypatch, tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"tampered")
    monkeypatch.setattr(weights, "litemedsam_checkpoint", lambda: str(fake))
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"]])
    assert "checksum mismatch" in msg
    _no_outputs(case)


def test_features_synergy_without_dinov2_weights(case, capsys, monkeypatch, tmp_path):
    """Without the weights and without a way to the hub (an air-gapped site): one line, at once. The
    hub's client retried for about 35 s, printing eleven lines before it."""
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SYNPO_DINOV2_PATH", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://synpo-test-host.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)                  # (conftest sets it)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert main(["segment", case["image"], case["support"], "-o", case["out"], "--features", "synergy"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("synpo: error: DINOv2 weights"), lines
    assert "synpo-test-host.invalid cannot be resolved" in lines[0] and "--features sam" in lines[0]
    _no_outputs(case)
    assert main(["download", "dinov2-small"]) == 2          # (no "--features sam" there: it means nothing)
    said = capsys.readouterr().err
    assert "copy" in said and "--features sam" not in said
    from synpo.features import _hub_unreachable
    assert "cannot be resolved" in _hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")       # (the proxy resolves names)
    assert _hub_unreachable() == ""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _hub_unreachable() == "HF_HUB_OFFLINE is set"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(case, capsys):
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--device", "cuda"])
    assert "CUDA is not available" in msg
    _no_outputs(case)


def test_output_may_not_overwrite_an_input(case, capsys):
    before = open(case["support"], "rb").read()
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["support"]])
    assert "overwrite the input" in msg
    assert open(case["support"], "rb").read() == before
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", str(case["dir"] / "x" / "o.nii.gz")])
    assert "does not exist" in msg


def test_outputs_and_the_token_file_checked_before_the_run(case, capsys):
    """Each was found only after the whole run (a traceback, nothing written), or not at all: a confidence
    output that is not a volume file, the points written over the server's token file, a token file an
    HTTP header cannot carry."""
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"],
                             "--confidence-out", str(case["dir"] / "conf.txt")])
    assert "--confidence-out" in msg and ".nii.gz" in msg
    token = case["dir"] / "token"
    token.write_text("a-token-of-the-server-0123456789\n")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--server",
                             "http://127.0.0.1:9", "--token-file", str(token), "--points-out", str(token)])
    assert "would overwrite the input" in msg and token.read_text() == "a-token-of-the-server-0123456789\n"
    for content in (b"abc\ndef-0123456789abcdef", b"\xff\xfe-0123456789abcdef"):
        token.write_bytes(content)
        msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--server",
                                 "http://127.0.0.1:9", "--token-file", str(token)])
        assert "does not hold one token" in msg
    assert not os.path.exists(case["out"])


def test_a_server_url_of_another_service_is_one_line(case, capsys):
    """--server at a port where another program answers {"status": "ok"} (a mistyped port): one line,
    not a KeyError traceback."""
    import http.server
    import threading

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    other = http.server.HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        token = case["dir"] / "token"
        token.write_text("a-token-of-the-server-0123456789")
        msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--server",
                                 "http://127.0.0.1:%d" % other.server_address[1], "--token-file", str(token)])
        assert "not as a SynPo server" in msg
    finally:
        other.shutdown()
    # A plain web server's 404 page at that port: the same (it read "the SynPo server said: File not found").
    import http.server
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    plain = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--server",
                                 "http://127.0.0.1:%d" % plain.server_address[1], "--token-file", str(token)])
        assert "not as a SynPo server" in msg, msg
    finally:
        plain.shutdown()


def test_console_script_exit_status_without_traceback(case):
    """The installed entry point, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "synpo")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "synpo.cli"]
    proc = subprocess.run(cmd + ["segment", case["image"], str(case["dir"] / "missing.nii.gz"), "-o", case["out"]],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("synpo: error: support label file not found")
    assert "Traceback" not in proc.stderr


def test_absent_marks_are_checked_before_any_model_loads(case, capsys):
    marks = np.zeros(case["support_array"].shape, dtype=np.uint8)
    marks[2, 5, 5] = 2                                              # label 2 is not painted
    path = _write(marks, case["dir"] / "marks.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--absent", path])
    assert "label 2, which is not painted" in msg
    marks[2, 5, 5] = 0
    marks[6, 5, 5] = 1                                              # the painted slice itself
    path = _write(marks, case["dir"] / "marks2.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--absent", path])
    assert "both painted and marked absent" in msg
    small = _write(marks[:, :10], case["dir"] / "marks3.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--absent", small])
    assert "absent marks grid" in msg
    _no_outputs(case)


def test_label_values_beyond_int32_are_refused_not_wrapped(case, capsys):
    """A support label 2**32 + 1 (int64) became label 1 when cast to int32, silently; the server took
    such labels and failed after the whole walk. Both refuse it at once."""
    from synpo.errors import InputError
    from synpo.support import find_support
    support = sitk.GetArrayFromImage(sitk.ReadImage(case["support"])).astype(np.int64)
    support[support > 0] = 2 ** 32 + 1
    big = _write(support, case["dir"] / "big_labels.nrrd")
    msg = run_error(capsys, ["segment", case["image"], big, "-o", case["out"]])
    assert "label values beyond" in msg and "4294967297" in msg
    _no_outputs(case)
    with pytest.raises(InputError, match="at most 2147483647"):
        find_support(support)
    from synpo.io import read_volume
    as_float = _write((support > 0).astype(np.float32) * np.float32(2 ** 31), case["dir"] / "float_labels.nrrd")
    with pytest.raises(InputError, match="label values beyond"):            # (float32: 2**31 - 1 == 2**31)
        read_volume(as_float, "support", label=True)


def _two_labels(case):
    two = case["support_array"].copy()
    two[6][:, :40] = np.where(two[6][:, :40] == 1, 2, two[6][:, :40])
    assert set(np.unique(two)) == {0, 1, 2}
    return two


def test_per_label_confidence_files_are_checked_before_any_work(case, capsys):
    """With several labels, --confidence-out CONF also writes CONF_label<N>: those were never checked.
    A support named conf_label2.nii.gz was replaced by a confidence map; `-o seg_label1.nii.gz
    --confidence-out seg.nii.gz` put the label map over label 1's confidence; a link to the same
    folder hid two outputs on one file. Each is now one line before any model loads."""
    two = _two_labels(case)
    support = _write(two, case["dir"] / "conf_label2.nii.gz")
    before = open(support, "rb").read()
    msg = run_error(capsys, ["segment", case["image"], support, "-o", case["out"],
                             "--confidence-out", str(case["dir"] / "conf.nii.gz")])
    assert "would overwrite the input" in msg and "conf_label2.nii.gz" in msg
    assert open(support, "rb").read() == before
    other = _write(two, case["dir"] / "two.nii.gz")
    msg = run_error(capsys, ["segment", case["image"], other, "-o", str(case["dir"] / "seg_label1.nii.gz"),
                             "--confidence-out", str(case["dir"] / "seg.nii.gz")])
    assert "two outputs have the same path" in msg and "seg_label1.nii.gz" in msg
    os.symlink(str(case["dir"]), str(case["dir"] / "here"))
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", str(case["dir"] / "a.nii.gz"),
                             "--confidence-out", str(case["dir"] / "here" / "a.nii.gz")])
    assert "two outputs have the same path" in msg
    assert not [p for p in os.listdir(case["dir"]) if p.startswith(("seg", "a.", ".tmp", "conf.", "out"))]


def test_the_summary_counts_slices_not_label_slices(case, capsys):
    """Two labels on the same slices: "N slice(s) with target" counted each label's slices apart (a
    volume of 11 slices could read 20), then each label's own count."""
    two = _write(_two_labels(case), case["dir"] / "two.nii.gz")
    points = str(case["dir"] / "points.json")
    assert main(["segment", case["image"], two, "-o", case["out"], "--device", "cpu", "--features", "sam",
                 "--points-out", points]) == 0
    out = capsys.readouterr().out
    found = [s for s in json.load(open(points))["slices"] if s["status"] in ("support", "present", "interpolated")]
    per = {v: sum(s["label"] == v for s in found) for v in (1, 2)}
    assert min(per.values()) > 1, per
    line = next(ln for ln in out.splitlines() if ln.startswith("segmented 2 label(s)"))
    assert ": %d slice(s) with target (label 1: %d, label 2: %d);" % (len({s["slice"] for s in found}),
                                                                      per[1], per[2]) in line, line


@pytest.mark.parametrize("name", ["seg.mhd", "seg.nhdr"])
def test_outputs_with_a_separate_data_file_are_refused(case, capsys, name):
    """A .mhd / .nhdr output's header named the temporary file's data file (.tmp-...-seg.zraw), left
    hidden beside it and lost when the header was copied."""
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", str(case["dir"] / name)])
    assert "use a .nii.gz, .nii, .nrrd or .mha file name" in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes any file")
def test_a_write_protected_output_is_refused(case, capsys):
    protected = case["dir"] / "protected.nii.gz"
    protected.write_bytes(b"the user's result")
    protected.chmod(0o444)
    assert "write-protected" in run_error(capsys, ["segment", case["image"], case["support"], "-o", str(protected)])
    assert protected.read_bytes() == b"the user's result"


def test_outputs_appear_all_or_none_and_keep_a_replaced_files_permissions(tmp_path, monkeypatch):
    """Ctrl+C (or an error) while the outputs were written left the first ones written (and said
    "nothing was written"), or a .tmp- file; each output is now staged beside its place, and all are
    renamed into place once every one is written. A replaced private (0600) output stayed 0644."""
    from synpo import io, outputs
    from synpo.io import Geometry
    from synpo.result import VolumeResult
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    support = type("S", (), {"labels": [1]})()
    result = type("R", (VolumeResult,), {})
    fake = result.__new__(result)
    fake.__dict__.update(labels=labels, confidence={1: labels.astype(np.float32)}, support=support)
    seg, conf = tmp_path / "seg.nii.gz", tmp_path / "conf.nii.gz"
    staged = io.stage_volume
    calls = []

    def interrupted(array, geometry, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return staged(array, geometry, path)
    monkeypatch.setattr(io, "stage_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_result(fake, geometry, str(seg), str(conf))
    assert os.listdir(str(tmp_path)) == []
    monkeypatch.setattr(io, "stage_volume", staged)
    seg.write_bytes(b"old")
    seg.chmod(0o600)
    assert outputs.write_result(fake, geometry, str(seg), str(conf)) == [str(conf), str(seg)]
    assert oct(seg.stat().st_mode & 0o777) == "0o600" and io.read_volume(str(seg), label=True)[0].sum() == labels.sum()
    assert sorted(os.listdir(str(tmp_path))) == ["conf.nii.gz", "seg.nii.gz"]


def test_a_sheared_or_complex_volume_is_one_line(case, capsys):
    """A sheared direction matrix (non-orthogonal, read as such from .mha): the outputs were written on
    an orthogonal grid elsewhere, and the points JSON disagreed with them. Complex voxels were called
    "RGB/vector"."""
    image = sitk.GetImageFromArray(case["array"])
    image.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sheared = str(case["dir"] / "sheared.mha")
    sitk.WriteImage(image, sheared)
    assert "sheared" in run_error(capsys, ["segment", sheared, case["support"], "-o", case["out"]])
    complex_image = sitk.GetImageFromArray(case["array"].astype(np.complex64))
    path = str(case["dir"] / "complex.nii.gz")          # (.mha stores it as 2 channels)
    sitk.WriteImage(complex_image, path)
    assert "complex voxels" in run_error(capsys, ["segment", path, case["support"], "-o", case["out"]])
    _no_outputs(case)


def test_a_support_stored_with_its_axes_turned_is_read_on_the_image_grid(case):
    """The same voxels stored with an axis reversed or two axes swapped (one tool writes LPS-ordered
    files, another RAS-ordered) were refused as "another grid", with a hint (--support-image) that
    failed too. They are turned to the image's layout; other voxels are still refused."""
    from synpo.io import on_same_grid, read_volume
    image = sitk.ReadImage(case["support"])
    for turned in (sitk.Flip(image, [True, False, False]), sitk.PermuteAxes(image, [1, 0, 2]),
                   sitk.Flip(sitk.PermuteAxes(image, [2, 1, 0]), [False, True, True])):
        path = str(case["dir"] / "turned.nrrd")
        sitk.WriteImage(turned, path)
        array, grid = read_volume(path, label=True)
        _, image_grid = read_volume(case["image"])
        assert np.array_equal(on_same_grid(array, grid, image_grid), case["support_array"])
    shifted = _write(case["support_array"], case["dir"] / "shifted.nii.gz", origin=(5.0, 0.0, 0.0))
    array, grid = read_volume(shifted, label=True)
    assert on_same_grid(array, grid, image_grid) is None


def test_a_flipped_support_segments_as_the_original(case, capsys):
    flipped = str(case["dir"] / "flipped.nii.gz")
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(case["support"]), [True, False, False]), flipped)
    assert main(["segment", case["image"], case["support"], "-o", case["out"], "--device", "cpu",
                 "--features", "sam"]) == 0
    other = str(case["dir"] / "other.nii.gz")
    assert main(["segment", case["image"], flipped, "-o", other, "--device", "cpu", "--features", "sam"]) == 0
    assert "read in the image's layout" in capsys.readouterr().out
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(case["out"])),
                          sitk.GetArrayFromImage(sitk.ReadImage(other)))


def test_server_running_another_dinov2_is_refused_when_one_was_asked(case, capsys, monkeypatch):
    """`--features synergy --dinov2 large` against a server on DINOv2 small ran small without a word
    (the health answer did not say which DINOv2, and it was not compared)."""
    from synpo.client import Client
    health = {"models": {"sam": "litemedsam", "features": ["sam", "dinov2"], "dinov2": "small", "device": "cpu"}}
    monkeypatch.setattr(Client, "health", lambda self: health)
    monkeypatch.setenv("SYNPO_TOKEN", "a-token-of-sixteen-characters")
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--server",
                             "http://127.0.0.1:9", "--features", "synergy", "--dinov2", "large"])
    assert "runs DINOv2 small, not --dinov2 large" in msg
    # (--features synergy against a synergy server was refused: the two lists compared in another order)
    from synpo import client as client_module
    monkeypatch.setattr(client_module, "run_remote", lambda *a, **k: (_ for _ in ()).throw(SystemExit("reached")))
    with pytest.raises(SystemExit, match="reached"):
        main(["segment", case["image"], case["support"], "-o", case["out"], "--server", "http://127.0.0.1:9",
              "--features", "synergy", "--dinov2", "small"])
    _no_outputs(case)


def test_a_headers_data_files_are_read_to_its_end(tmp_path):
    """io.header_data_files (the web upload's check, the cohort's file stamps): a header padded past
    the part read (64 KB of comment lines before `data file:`) hid the line from the upload check,
    and ITK then read the named file. The whole header is read; one beyond HEADER_LIMIT is None."""
    from synpo.io import HEADER_LIMIT, header_data_files
    pad = "".join("# padding line %d %s\n" % (n, "x" * 60) for n in range(1200))          # ~90 KB
    nrrd = tmp_path / "a.nrrd"
    nrrd.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\n%sdata file: /etc/passwd\n\n" % pad)
    assert header_data_files(nrrd) == ["/etc/passwd"]
    mha = tmp_path / "a.mha"
    mha.write_text("ObjectType = Image\n%sElementDataFile = /etc/passwd\n" % pad.replace("#", "Comment ="))
    assert header_data_files(mha) == ["/etc/passwd"]
    mha.write_text("ObjectType = Image\nElementDataFile: /etc/passwd\n")      # (MetaIO takes ":" too)
    assert header_data_files(mha) == ["/etc/passwd"]
    old_mac = tmp_path / "d.nrrd"                                                # (CR line ends)
    old_mac.write_bytes(b"NRRD0004\rtype: uint8\rdimension: 3\rsizes: 2 2 2\rencoding: raw\r\r" + bytes(HEADER_LIMIT))
    assert header_data_files(old_mac) == []
    attached = tmp_path / "b.nrrd"
    attached.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n" + bytes(8))
    assert header_data_files(attached) == []
    endless = tmp_path / "c.nrrd"
    endless.write_text("NRRD0004\n" + "# x\n" * (HEADER_LIMIT // 4 + 10))
    assert header_data_files(endless) is None


def test_nohup_keeps_a_run_through_a_closed_terminal():
    """`nohup synpo segment ...` ignores SIGHUP; interrupt_on made it raise KeyboardInterrupt again, so
    a closed terminal ended the run. A signal ignored already stays ignored."""
    import signal
    from synpo.lifeline import interrupt_on
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        restore = interrupt_on(("SIGTERM", "SIGHUP"))
        try:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        finally:
            restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


def _small_result():
    """(a 6 x 5 x 4 grid, a result of one label on it) for write_result, without a run."""
    from synpo.io import Geometry
    from synpo.result import VolumeResult
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    fake = VolumeResult.__new__(VolumeResult)
    fake.__dict__.update(labels=labels, confidence={1: labels.astype(np.float32)},
                         support=type("S", (), {"labels": [1]})())
    return geometry, fake


def test_a_rename_refused_midway_names_what_was_written(tmp_path, monkeypatch):
    from synpo import io, outputs
    from synpo.errors import InputError
    geometry, fake = _small_result()
    real = os.replace
    calls = []

    def refused(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(InputError, match=r"cannot write .*seg.nii.gz: Operation not permitted; already written: "
                                         r".*conf.nii.gz"):
        outputs.write_result(fake, geometry, str(tmp_path / "seg.nii.gz"), str(tmp_path / "conf.nii.gz"))
    assert sorted(os.listdir(str(tmp_path))) == ["conf.nii.gz"]           # no temporary file left


def test_an_output_that_is_a_link_is_replaced_not_refused(case, capsys):
    """A dangling link (or one into a read-only folder) as an output was refused as write-protected;
    publish replaces the link itself, never its target."""
    from synpo.cli import check_outputs
    link = case["dir"] / "link.nii.gz"
    os.symlink(str(case["dir"] / "missing" / "x.nii.gz"), str(link))
    check_outputs([str(link)], [case["image"]])
    from synpo.io import write_json
    target = case["dir"] / "read_only_target.json"
    target.write_text("{}")
    target.chmod(0o444)
    os.remove(str(link))
    os.symlink(str(target), str(link))
    write_json({"a": 1}, str(link))                 # the link replaced by the user's own file
    assert not os.path.islink(str(link)) and os.stat(str(link)).st_mode & 0o200 and target.read_text() == "{}"


def test_reference_labels_stored_turned_are_read_on_the_reference_grid(case):
    from synpo.cohort_task import read_reference
    turned = str(case["dir"] / "turned_labels.nrrd")
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(case["support"]), [False, True, False]), turned)
    _, labels, _ = read_reference(case["image"], turned)
    assert np.array_equal(labels, case["support_array"])


def test_a_nifti_with_two_placements_is_said(case, capsys):
    """A NIfTI whose qform and sform disagree (rewritten by another tool after a resampling): the volume
    is read by one of them (ITK's choice) and the outputs carry that one, so a viewer using the other
    shows them elsewhere; a warning names both and the one used. A header whose two agree says
    nothing."""
    import struct
    from synpo.io import nifti_placement_note, read_volume
    image = sitk.GetImageFromArray(case["array"])
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    agree = str(case["dir"] / "agree.nii")
    sitk.WriteImage(image, agree)
    assert nifti_placement_note(agree, read_volume(agree)[1]) == ""
    header = bytearray(open(agree, "rb").read())
    assert struct.unpack("<2h", header[252:256]) == (1, 1)
    srow = list(struct.unpack("<12f", header[280:328]))
    srow[3] += 30.0                                        # the sform's x offset moved by 30 mm
    header[280:328] = struct.pack("<12f", *srow)
    two = str(case["dir"] / "two.nii")
    open(two, "wb").write(bytes(header))
    _, geometry = read_volume(two)
    note = nifti_placement_note(two, geometry)
    used = "sform" if abs(geometry.origin[0] - 10.0) > 1.0 else "qform"
    assert "30.0 mm" in note and "read by its %s" % used in note, note
    srow = list(struct.unpack("<12f", bytes(header[280:328])))
    srow[3] -= 30.0
    for row in range(3):                                   # the sform's i and j axes swapped, same offset
        srow[4 * row], srow[4 * row + 1] = srow[4 * row + 1], srow[4 * row]
    header[280:328] = struct.pack("<12f", *srow)
    turned = str(case["dir"] / "turned.nii")
    open(turned, "wb").write(bytes(header))
    _, geometry = read_volume(turned)
    read_by = "sform" if not np.allclose(geometry.direction, image.GetDirection(), atol=1e-3) else "qform"
    assert "0.0 mm" in nifti_placement_note(turned, geometry) and "read by its %s" % read_by in \
        nifti_placement_note(turned, geometry)
    empty = _write(np.zeros_like(case["support_array"]), case["dir"] / "empty.nii.gz")
    assert main(["segment", two, empty, "-o", case["out"]]) == 2
    err = capsys.readouterr().err
    assert "synpo: warning: %s" % note in err


def test_a_nifti_without_a_voxel_size_is_said(case):
    """pixdim 0 and no sform: ITK reads 1 mm without a word (the walk then judged the slices as thin)."""
    import struct
    from synpo.io import nifti_placement_note, read_volume
    path = str(case["dir"] / "nosize.nii")
    sitk.WriteImage(sitk.GetImageFromArray(case["array"]), path)
    header = bytearray(open(path, "rb").read())
    header[88:92] = struct.pack("<f", 0.0)                  # pixdim[3]
    header[252:256] = struct.pack("<2h", 0, 0)               # no qform, no sform
    open(path, "wb").write(bytes(header))
    note = nifti_placement_note(path, read_volume(path)[1])
    assert "no voxel size along k (pixdim 0)" in note and "1x1x1 mm" in note, note


def test_an_output_that_cannot_be_staged_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A name that is legal but too long once the temporary prefix is added, or a full disk, ended
    `synpo segment` with a traceback (status 1) after the whole run; now one InputError (cli: one
    `synpo: error:` line, status 2) and no file, temporary or not, is left."""
    import errno
    from synpo import io, outputs
    from synpo.errors import InputError
    geometry, fake = _small_result()
    long_name = str(tmp_path / ("s" * 240 + ".nii.gz"))             # 247 characters: + ".tmp-XXXXXXXX-" > 255
    with pytest.raises(InputError, match=r"cannot write .*\.nii\.gz: File name too long"):
        outputs.write_result(fake, geometry, long_name, str(tmp_path / "conf.nii.gz"))
    assert os.listdir(str(tmp_path)) == []

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    staged = io.stage_file
    monkeypatch.setattr(io, "stage_file", lambda path, write: staged(
        path, disk_full if os.fspath(path).endswith("seg.nii.gz") else write))
    with pytest.raises(InputError, match=r"cannot write .*seg\.nii\.gz: No space left on device"):
        outputs.write_result(fake, geometry, str(tmp_path / "seg.nii.gz"), str(tmp_path / "conf.nii.gz"))
    assert os.listdir(str(tmp_path)) == []
