"""The `synpo` command line: bad input gets one clear line, exit status 2, and nothing is written."""
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
    assert "differs from the image grid" in run_error(capsys, ["segment", case["image"], p, "-o", case["out"]])
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
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SYNPO_DINOV2_PATH", raising=False)
    msg = run_error(capsys, ["segment", case["image"], case["support"], "-o", case["out"], "--features", "synergy"])
    assert "--features sam" in msg
    _no_outputs(case)


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
