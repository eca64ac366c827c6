"""Unit tests of each engine stage on synthetic inputs whose answer is known."""
import numpy as np
import pytest
import torch

from scipy import ndimage

from synpo import confidence, intensity, prompts, support
from synpo.config import ConfidenceConfig, DecodeConfig, IntensityConfig, PromptConfig, SynPoConfig, validate
from synpo.decode import decode_slice
from synpo.errors import InputError, SynPoError
from synpo.features import Frame
from synpo.io import Geometry
from synpo.outputs import slice_xy_to_ijk
from synpo.prompts import Prompts
from synpo.volume import EmbeddingStore


# ------------------------------------------------------------------ support

def _label(shape=(10, 20, 30)):
    return np.zeros(shape, dtype=np.int32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_support_axis_found_for_each_orientation(axis):
    lab = _label()
    index = [slice(None)] * 3
    index[axis] = 4
    sub = lab[tuple(index)]
    sub[2:6, 3:8] = 7
    found = support.find_support(lab)
    assert found.axis == axis
    assert found.labels == [7]
    assert found.slices == {7: [4]}


def test_support_multi_label_and_k_shot():
    lab = _label()
    lab[2, 5:9, 5:9] = 1
    lab[7, 5:9, 5:9] = 1
    lab[3, 10:14, 10:20] = 2
    found = support.find_support(lab)
    assert found.axis == 0
    assert found.labels == [1, 2]
    assert found.slices == {1: [2, 7], 2: [3]}


def test_support_two_labels_on_adjacent_slices_is_valid():
    lab = _label()
    lab[4, 2:6, 2:6] = 1
    lab[5, 10:14, 10:14] = 2
    assert support.find_support(lab).slices == {1: [4], 2: [5]}


def test_support_three_slices_with_gaps_are_three_supports():
    lab = _label()
    for k in (3, 5, 7):
        lab[k, 5:9, 5:9] = 2
    assert support.find_support(lab).slices == {2: [3, 5, 7]}


def test_support_empty_is_refused():
    with pytest.raises(InputError, match="empty"):
        support.find_support(_label())


def test_support_on_two_orthogonal_planes_is_refused():
    lab = _label()
    lab[5, 2:15, 2:25] = 1        # axial plane
    lab[1:9, 2:15, 12] = 1        # sagittal plane crossing it
    with pytest.raises(InputError, match="not confined to parallel slices.*slice 12 across i"):
        support.find_support(lab)


def test_support_labels_painted_across_different_axes_are_refused():
    lab = _label()
    lab[4, 2:10, 2:10] = 1        # axial
    lab[2:8, 12:18, 25] = 2       # sagittal
    with pytest.raises(InputError, match="label 2 is also painted on slice 25 across i"):
        support.find_support(lab)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_support_every_slice_of_an_organ_lies_across_its_thinnest_axis(axis):
    """Adjacent painted slices, up to the whole organ: the axis with the fewest painted slices."""
    lab = _label((30, 30, 30))
    box = [slice(5, 25)] * 3
    box[axis] = slice(10, 14)                 # 4 adjacent slices across `axis`, 20 x 20 on each
    lab[tuple(box)] = 3
    found = support.find_support(lab)
    assert found.axis == axis
    assert found.slices == {3: [10, 11, 12, 13]}


def test_support_adjacent_slices_and_organs_on_neighbouring_slices():
    """The issue's case: one organ on its middle slice and on two corrected slices, two of them
    adjacent, another organ on the next slices; the paint spans many rows and columns."""
    lab = _label((40, 60, 80))
    for k in (10, 20, 21):
        lab[k, 5:50, 5:70] = 1
    lab[22, 30:40, 10:30] = 2
    lab[23, 30:40, 10:30] = 2
    found = support.find_support(lab)
    assert found.axis == 0
    assert found.slices == {1: [10, 20, 21], 2: [22, 23]}


def test_support_ambiguous_paint_names_the_tied_axes():
    lab = _label()
    lab[3, 4, 2:9] = 1                        # a line: on one slice across k and across j
    with pytest.raises(InputError, match="ambiguous.*across k and j"):
        support.find_support(lab)
    lab = _label()
    lab[3, 4, 5] = 1                          # a dot
    with pytest.raises(InputError, match="ambiguous.*across k, j and i"):
        support.find_support(lab)


def test_in_plane_spacing():
    # spacing is (i, j, k); a slice across k has rows j and columns i
    assert support.in_plane_spacing((0.5, 0.7, 3.0), 0) == (0.7, 0.5)
    assert support.in_plane_spacing((0.5, 0.7, 3.0), 2) == (3.0, 0.7)


# ------------------------------------------------------------------ intensity

def test_intensity_ct_window_and_mr_percentiles():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(4, 16, 16)).astype(np.float32)
    out, modality = intensity.normalize(ct)
    assert modality == "ct"
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[ct <= -160].max() == 0.0 and out[ct >= 240].min() == 1.0     # window 40 +- 200
    mr = rng.random((4, 16, 16)).astype(np.float32) * 800
    out, modality = intensity.normalize(mr)
    assert modality == "mr" and 0.0 <= out.min() and out.max() <= 1.0
    _, forced = intensity.normalize(ct, IntensityConfig(modality="mr"))
    assert forced == "mr"


def test_intensity_windowed_8bit_ct_is_taken_as_it_is():
    rng = np.random.default_rng(1)
    windowed = rng.integers(0, 256, size=(4, 32, 32)).astype(np.float32)   # ~0.4 % at 255 by chance
    windowed[:, :4, :] = 255.0                                             # bone / contrast: saturated
    windowed[:, -8:, :] = 0.0                                              # air
    out, modality = intensity.normalize(windowed)
    assert modality == "ct-windowed"
    np.testing.assert_array_equal(out, windowed / np.float32(255.0))      # no percentile clipping
    # --modality ct on grey values (not HU): the windowed handling, not an HU window on 0-255
    out, forced = intensity.normalize(windowed, IntensityConfig(modality="ct"))
    assert forced == "ct-windowed" and out.max() == 1.0 and np.mean(out == 1.0) < 0.2
    # 8-bit MR-like values rarely at 255: MR, percentiles
    mr8 = rng.integers(0, 200, size=(4, 32, 32)).astype(np.float32)
    mr8[0, 0, 0] = 255.0
    assert intensity.normalize(mr8)[1] == "mr"
    # not integer-valued: never a windowed CT
    assert intensity.guess_modality(windowed + 0.5) == "mr"


# ------------------------------------------------------------------ confidence

def _features_with_object(n=2, grid=16, channels=8, seed=0):
    """Feature maps where cells of a square 'object' share one direction, background another."""
    rng = np.random.default_rng(seed)
    fg_dir, bg_dir = rng.normal(size=channels), rng.normal(size=channels)
    feats = np.tile(bg_dir[:, None, None], (n, 1, grid, grid)).astype(np.float32)
    feats += 0.05 * rng.normal(size=feats.shape).astype(np.float32)
    feats[:, :, 4:9, 5:11] = fg_dir[:, None, None] + 0.05 * rng.normal(size=(n, channels, 5, 6))
    return torch.from_numpy(feats)


def test_confidence_high_on_object_low_elsewhere():
    grid = 16
    feats = _features_with_object(grid=grid)
    frame = Frame.fit(64, 64, (1.0, 1.0), 64)           # 4 pixels per cell
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:36, 20:44] = True                            # the object's cells 4..8 x 5..10
    protos = confidence.build_prototypes([feats[0]], [mask], frame, grid, ConfidenceConfig(n_prototypes=2))
    assert protos.fg_mean > protos.bg_mean
    sim = confidence.similarity(feats[1:], protos, frame, grid)[0]
    assert sim[4:9, 5:11].min() > 0.8
    outside = np.ones((grid, grid), dtype=bool)
    outside[4:9, 5:11] = False
    assert sim.numpy()[outside].max() < 0.2
    up = frame.grid_map_to_slice(sim[None], grid)[0]
    assert up.shape == (64, 64)
    assert up[20:32, 24:40].min() > 0.8


def test_similarity_equals_cosine_scores_of_unit_features():
    # similarity() divides prototype dot products by |f| instead of normalising f: the
    # scores must be the cosine ones (max foreground minus max background), calibrated.
    grid = 16
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.normal(size=(3, 8, grid, grid)).astype(np.float32)).half()
    frame = Frame.fit(48, 64, (1.0, 1.0), 64)            # valid cells: 12 rows x 16 columns
    mask = np.zeros((48, 64), dtype=bool)
    mask[8:30, 10:40] = True
    protos = confidence.build_prototypes([feats[0]], [mask], frame, grid,
                                         ConfidenceConfig(n_prototypes=2, n_background_prototypes=3))
    got = confidence.similarity(feats, protos, frame, grid)
    assert got.shape == (3, 12, 16)
    unit = feats[:, :, :12, :16].float()
    unit = (unit / unit.norm(dim=1, keepdim=True)).permute(0, 2, 3, 1)
    raw = (unit @ protos.vectors.T).max(-1).values - (unit @ protos.background.T).max(-1).values
    want = ((raw - protos.bg_mean) / (protos.fg_mean - protos.bg_mean)).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert 0.0 < float(got.mean()) < 1.0                  # not all clipped: the check compares values


def test_fuse_geometric_mean_vetoes_single_encoder_peak():
    sam = torch.tensor([[[0.9, 0.05]]])
    dino = torch.tensor([[[0.9, 0.95]]])                 # DINOv2 fires on a look-alike
    fused = confidence.fuse({"sam": sam, "dinov2": dino}, ConfidenceConfig(sam_weight=0.5))
    assert fused[0, 0, 0] > 0.85
    assert fused[0, 0, 1] < 0.25
    assert torch.equal(confidence.fuse({"sam": sam}), sam)


class _PoolEncoder:
    """A stand-in encoder: (N, H, W) slices -> (N, 8, grid, grid) pooled features, deterministic."""
    name, grid, device, precision = "pool", 16, torch.device("cpu"), None

    def __init__(self):
        self.calls = 0

    def frame(self, H, W, spacing_rc):
        return Frame.fit(H, W, spacing_rc, 64)

    def embed(self, slices, frame):
        self.calls += len(slices)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(slices).float()[:, None], self.grid)
        return torch.cat([x * (k + 1) - k * 0.3 for k in range(8)], 1)


def test_confidence_volume_in_chunks_equals_one_pass_and_embeddings_kept_in_fp16(monkeypatch, tmp_path):
    from synpo import volume
    img, lab = _ellipsoid_pair()
    enc = _PoolEncoder()
    store = volume.EmbeddingStore(enc, img, enc.frame(64, 64, (1, 1)), 4, str(tmp_path))
    store.ensure(range(len(img)))
    assert enc.calls == len(img) and all(v.dtype == torch.float16 for v in store.cache.values())
    again = volume.EmbeddingStore(enc, img, store.frame, 4, str(tmp_path))     # from the disk cache
    again.ensure(range(len(img)))
    assert enc.calls == len(img) and torch.equal(again.cache[3], store.cache[3])
    # Another runtime's or a GPU's embeddings are kept apart from the CPU's (embeddings.EmbeddingStore).
    paths = {store.disk_path}
    for attribute, value in (("runtime", "openvino"), ("device", torch.device("cuda"))):
        other = _PoolEncoder()
        setattr(other, attribute, value)
        paths.add(volume.EmbeddingStore(other, img, store.frame, 4, str(tmp_path)).disk_path)
    assert len(paths) == 3
    args = ({"sam": store}, {"sam": store}, [5], [lab[5]], range(len(img)), ("sam",), SynPoConfig())
    from synpo import slice_confidence
    monkeypatch.setattr(slice_confidence, "CONFIDENCE_CHUNK", 3)
    small = volume.confidence_volume(*args)
    monkeypatch.setattr(slice_confidence, "CONFIDENCE_CHUNK", 1000)
    whole = volume.confidence_volume(*args)
    assert small.shape == (len(img), 64, 64) and np.array_equal(small, whole)
    assert small[5][lab[5]].mean() > 0.8 and small[5][~lab[5]].mean() < 0.2


def _ellipsoid_pair(n=11):
    zz, yy, xx = np.mgrid[:n, :64, :64]
    lab = ((zz - 5) / 5.5) ** 2 + ((yy - 30) / 14.0) ** 2 + ((xx - 34) / 18.0) ** 2 <= 1
    img = np.where(lab, 0.8, 0.2).astype(np.float32)
    return img, lab


def test_ring_parts_found_only_for_closed_bands():
    from synpo.volume import ring_parts
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    ring, disc = (r >= 6) & (r <= 10), r <= 10
    filled, holes = ring_parts([ring], 0.1)
    assert np.array_equal(filled[0], disc) and np.array_equal(holes[0], disc & ~ring)
    assert ring_parts([disc], 0.1) is None
    open_c = ring & ~((xx > 20) & (abs(yy - 20) < 3))              # a C: the band is cut
    assert ring_parts([open_c], 0.1) is None
    assert ring_parts([ring, disc], 0.1) is None                    # every support slice must be a ring
    assert ring_parts([ring], 0.9) is None                          # hole smaller than asked


@pytest.mark.parametrize("hole_radius, is_ring", [(5.5, False), (7.5, True)])
def test_a_kidney_painted_around_its_sinus_is_not_a_ring(hole_radius, is_ring):
    """A kidney's truth on a slice through its hilum encloses the renal sinus (BTCV: up to 0.18 of
    the filled area); a myocardium's blood pool is 0.26-0.67 of it (cmr_bssfp, ACDC's middle
    slices 0.37-0.67). Painted with its sinus, a kidney walked as a ring came back as a band
    around a walked hole (BTCV image_4's kidney corrected on slice 40: its neighbours 0.92 ->
    0.55). With the default volume.ring_min_hole a sinus of 0.15 is part of a filled organ, a band
    around 0.28 is a ring, through the run's own path (find_support, find_rings)."""
    from synpo.rings import find_rings
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)
    paint = np.zeros((5, 48, 48), np.uint8)
    paint[2][(r <= 14) & (r > hole_radius)] = 1
    fraction = float(((r <= hole_radius)).sum() / (r <= 14).sum())
    assert (fraction < 0.18) if not is_ring else (fraction > 0.26)
    rings = find_rings(paint, support.find_support(paint), SynPoConfig().volume.ring_min_hole)
    assert (1 in rings) == is_ring


def test_enclosing_labels_are_found_only_inside_a_closed_outline_on_shared_slices():
    from synpo.volume import enclosing_labels
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    ring = np.zeros((40, 40), np.uint8)
    ring[(r >= 6) & (r <= 10)] = 1                                   # the myocardium
    ring[r < 6] = 2                                                  # the blood pool inside it
    ring[2:5, 2:5] = 3                                               # something outside
    assert enclosing_labels({4: ring}, [1, 2, 3]) == {2: [1]}
    opened = ring.copy()
    opened[(xx > 20) & (abs(yy - 20) < 3) & (ring == 1)] = 0         # the band cut open: no inside
    assert enclosing_labels({4: opened}, [1, 2, 3]) == {}
    apart = {4: np.where(ring == 2, 0, ring), 5: np.where(ring == 2, 2, 0)}   # never painted together
    assert enclosing_labels(apart, [1, 2, 3]) == {}
    beside = np.where(ring == 2, 0, ring)
    beside[30:34, 30:34] = 2                                         # on a second slice, outside
    assert enclosing_labels({4: ring, 6: beside}, [1, 2, 3]) == {}


def test_an_enclosed_label_ends_where_its_encloser_ends():
    from synpo.result import SliceRecord
    from synpo.volume import follow_enclosing
    m = np.ones((4, 4), bool)
    found = {1: {t: m for t in (1, 2, 3)}, 2: {t: m for t in (1, 2, 3, 5, 6)}}
    records = [SliceRecord(label, t, "present") for label in (1, 2) for t in found[label]]
    follow_enclosing(found, records, {2: [1]}, {1: [4], 2: [4]})
    assert sorted(found[1]) == [1, 2, 3] and sorted(found[2]) == [1, 2, 3]
    dropped = [(r.label, r.index, r.status, r.reason) for r in records if r.status != "present"]
    assert dropped == [(2, 5, "absent", "outside label 1"), (2, 6, "absent", "outside label 1")]


@pytest.mark.parametrize("levels, ratio, expected", [
    ((0.9, 0.9, 0.9, 0.9, 0.55, 0.9), 0.7, [1, 2, 3]),      # a sudden drop ends the walk
    ((0.9, 0.9, 0.9, 0.9, 0.55, 0.9), 0.0, [1, 2, 3, 4, 5]),  # (the rule off)
    ((0.9, 0.9, 0.75, 0.6, 0.6, 0.6), 0.7, [1, 2, 3, 4, 5]),  # a gradual fade does not: each slice
])                                                           # is judged against its neighbour
def test_walk_stops_where_the_confidence_drops(levels, ratio, expected):
    from synpo.volume import _Context, _walk
    conf = np.zeros((6, 40, 40), np.float32)
    for t, level in enumerate(levels):
        conf[t, 10:30, 10:30] = level
    cfg = SynPoConfig().with_(volume={"min_confidence_ratio": ratio})
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(6))
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None)
    masks, records = {}, []
    _walk(ctx, 1, 0, conf[0] > 0.5, 6, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    if expected[-1] == 3:
        assert [(r.index, r.status, r.reason) for r in records[3:]] == [(4, "absent", "confidence drop"),
                                                                          (5, "not reached", "")]


def test_a_walk_stops_at_a_held_end_and_says_why():
    """A correction's walk keeps the previous run's end (volume.correction_holds_ends)."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:, 10:30, 10:30] = 0.9                              # the target on every slice
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    ctx = _Context(_BoxFiller(), store, conf, SynPoConfig(), {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=(5,))
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(masks) == [2, 3, 4]
    assert [(r.index, r.status, r.reason) for r in records[3:]] == [(5, "absent", "previous end kept"),
                                                                      (6, "not reached", ""), (7, "not reached", "")]


def test_a_corrections_walk_that_leaves_the_previous_masks_gives_way_to_them():
    """walk.keep_previous: where a correction's walk parts from the previous run's masks (IoU below
    volume.correction_keep_iou), the previous masks stand from there on, as far as they go."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((9, 40, 40), np.float32)
    conf[:, 10:30, 10:30] = 0.9                              # what the new walk follows
    previous = np.zeros((9, 40, 40), np.uint8)
    previous[1:4, 10:30, 10:30] = 2                          # agrees on slices 1-3
    previous[4:7, 30:38, 30:38] = 2                          # elsewhere on 4-6: the walk left it there
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(9))
    cfg = SynPoConfig().with_(volume={"correction_keep_iou": 0.25})   # (0 by default: config.py)
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=(8,), previous=(previous, 2))
    masks, records = {}, []
    _walk(ctx, 2, 1, conf[1] > 0.5, 9, +1, 10.0, masks, records)
    assert sorted(masks) == [2, 3, 4, 5, 6]
    for t in (4, 5, 6):
        assert np.array_equal(masks[t], previous[t] == 2)
    assert [(r.index, r.status, r.reason) for r in records] == [
        (2, "present", ""), (3, "present", ""), (4, "present", "previous kept"), (5, "present", "previous kept"),
        (6, "present", "previous kept"), (7, "not reached", ""), (8, "not reached", "")]


def test_corrections_inside_the_previous_extent_hold_its_ends():
    from synpo.result import SliceRecord, VolumeResult
    from synpo.session import Session
    from synpo.support import Support
    session = Session.__new__(Session)
    session.support_image = None
    statuses = {t: "present" for t in range(4, 10)}
    statuses.update({3: "absent", 6: "support", 10: "absent"})
    records = [SliceRecord(1, t, st) for t, st in statuses.items()]
    labels = np.zeros((14, 8, 8), np.uint8)
    labels[4:10, 2:5, 2:6] = 1                               # the previous masks: 9 of 12 pixels agree below
    labels[7, :, :] = 0
    labels[7, 5:8, 5:8] = 1                                  # ... but not on slice 7
    session.result = VolumeResult(labels, {}, records, Support(0, [1], {1: [6]}), "mr", ["sam"], {})
    merged = np.zeros((14, 8, 8), np.int32)
    merged[6, 2:5, 2:5] = 1                                  # the first paint
    merged[8, 2:5, 2:5] = 1                                  # a correction inside slices 4-9 agreeing: holds 3, 10
    merged[7, 2:5, 2:5] = 1                                  # one where the previous walk was elsewhere: free
    merged[12, 2:5, 2:5] = 1                                 # one beyond the extent: free
    session.held = {}
    on = SynPoConfig().with_(volume={"correction_holds_ends": True, "correction_trust_iou": 0.5})
    assert session.held_ends(merged, 0, on) == {1: {8: [3, 10]}}
    off = SynPoConfig().with_(volume={"correction_holds_ends": False})
    assert session.held_ends(merged, 0, off) == {}
    assert session.held_ends(merged, 0) == {1: {7: [3, 10], 8: [3, 10]}}   # today's defaults: no trust gate


@pytest.mark.parametrize("absent, present, interpolated, end", [
    ((), [3, 6, 9, 12, 13], [1, 2, 4, 5, 7, 8, 10, 11], (14, "confidence drop")),   # the end, slice by slice
    ((8,), [3, 6, 7], [1, 2, 4, 5], (8, "marked absent")),                      # never jumps over a mark
])
def test_a_strided_walk_decodes_every_third_slice_and_finds_the_end_slice_by_slice(absent, present, interpolated, end):
    from synpo.volume import _Context, _walk
    n = 20
    conf = np.zeros((n, 40, 40), np.float32)
    for t in range(14):                                      # the organ: slices 0-13, drifting right
        conf[t, 10:30, 8 + t // 2:26 + t // 2] = 0.9
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(n))
    decoded = []
    filler = _BoxFiller()
    real = store.decode
    store.decode = lambda sam, t, prompts, cfg: (decoded.append(t), real(sam, t, prompts, cfg))[1]
    ctx = _Context(filler, store, conf, SynPoConfig(), {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None,
                   absent=absent, stride=3)
    masks, records = {}, []
    _walk(ctx, 1, 0, conf[0] > 0.5, n, +1, 10.0, masks, records)
    by_status = {}
    for r in records:
        by_status.setdefault(r.status, []).append(r.index)
    assert sorted(r.index for r in records) == list(range(1, n))          # every slice once
    assert sorted(by_status["present"]) == present and sorted(by_status["interpolated"]) == interpolated
    assert [(r.index, r.reason) for r in records if r.status == "absent"] == [end]
    assert sorted(masks) == sorted(present + interpolated)
    def iou(t):
        truth = conf[t] > 0.5
        return (masks[t] & truth).sum() / (masks[t] | truth).sum()
    for t in interpolated:                                   # as good as the decoded slices around it
        decoded_around = [iou(u) for u in present if abs(u - t) < 3]
        assert iou(t) >= min(decoded_around) - 0.03, (t, iou(t), decoded_around)
    assert set(decoded) <= set(present) | {end[0], 15, 9}      # a trial jump past the end is decoded, not kept


def test_store_reuses_identical_decodings_and_bounds_what_it_keeps(monkeypatch):
    from synpo import embeddings
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(3))
    region = np.zeros((40, 40), dtype=bool)
    region[10:20, 10:20] = True
    calls = []

    class Counting(_BoxFiller):
        def decode(self, *args, **kwargs):
            calls.append(kwargs["box_xy"])
            return super().decode(*args, **kwargs)

    sam, cfg = Counting(), DecodeConfig(refine=False)
    first = store.decode(sam, 0, Prompts(np.array([[12.0, 12.0]]), np.zeros((0, 2)), (10, 10, 20, 20), region), cfg)
    again = store.decode(sam, 0, Prompts(np.array([[15.0, 15.0]]), np.zeros((0, 2)), (10, 10, 20, 20), region), cfg)
    assert len(calls) == 1 and store.decode_reuses == 1 and store.decodes == 1
    assert np.array_equal(first[0], again[0]) and again[0].sum() == 100 and again[1:] == first[1:]
    store.decode(sam, 1, Prompts(np.array([[12.0, 12.0]]), np.zeros((0, 2)), (10, 10, 20, 20), region), cfg)
    assert len(calls) == 2                                   # another slice: decoded
    monkeypatch.setattr(embeddings, "DECODED_KEPT_BYTES", 2 * 200)   # two 40 x 40 masks (200 bytes each)
    store.decode(sam, 2, Prompts(np.array([[12.0, 12.0]]), np.zeros((0, 2)), (10, 10, 21, 20), region), cfg)
    assert len(store.decoded) == 2 and store.decoded_bytes == 400
    store.decode(sam, 0, Prompts(np.array([[12.0, 12.0]]), np.zeros((0, 2)), (10, 10, 20, 20), region), cfg)
    assert len(calls) == 4                                   # slice 0's mask was the oldest: dropped


def test_cross_patient_confidence_uses_its_own_prototype_count(monkeypatch):
    from synpo import volume
    seen = []

    class Seen(Exception):
        pass

    def record(feats, masks, frame, grid, cfg):
        seen.append(cfg.n_prototypes)
        raise Seen()

    from synpo import slice_confidence
    monkeypatch.setattr(slice_confidence.conf_mod, "build_prototypes", record)
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.encoder = type("Enc", (), {"grid": 8})()
    store.ensure([0])
    cfg = SynPoConfig().with_(confidence={"n_prototypes": 2, "n_prototypes_cross": 7})
    for cross in (False, True):
        with pytest.raises(Seen):
            volume.confidence_volume({"sam": store}, {"sam": store}, [0], [np.ones((40, 40), bool)], [0],
                                     ("sam",), cfg, cross=cross)
    assert seen == [2, 7]
    with pytest.raises(SynPoError, match="n_prototypes_cross"):
        validate(SynPoConfig().with_(confidence={"n_prototypes_cross": 0}))


def test_ring_band_has_the_support_thickness():
    from synpo.volume import band_around, ring_thickness
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 30, xx - 30)
    hole = r < 8
    ring = (r >= 8) & (r < 14)                                       # 6 pixels thick
    assert ring_thickness(ring, hole, (1.0, 1.0)) == pytest.approx(6.0, abs=1.0)
    assert ring_thickness(ring, hole, (2.0, 2.0)) == pytest.approx(12.0, abs=2.0)   # in mm
    band = band_around(r < 10, 6.0, (1.0, 1.0))                     # around a larger hole
    assert not (band & (r < 10)).any()
    assert band[30, 30 + 12] and band[30, 30 + 15] and not band[30, 30 + 17]
    assert not band_around(np.zeros((5, 5), bool), 3.0, (1.0, 1.0)).any()


def test_a_rings_band_keeps_the_supports_thickness_direction_by_direction():
    """volume.ring_bins: a myocardium-like ring 3 px thick on its left (a septum) and 9 px on its
    right around a round blood pool. The uniform band (ring_thickness) is 6 px all round; the band
    with the support's sector profile (rings.ring_profile) has the ring's area, matches the ring far
    better, and around a larger hole on another slice stays thin on the left and thick on the right."""
    from synpo.rings import band_around, ring_profile, ring_thickness
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    hole = r < 10
    outer = np.hypot(yy - 40, xx - 43) < 16                          # 3 px on the left, 9 on the right
    ring = outer & ~hole
    sp = (1.0, 1.0)
    T = ring_thickness(ring, hole, sp)
    profile = ring_profile(ring, hole, sp, 16)
    assert profile.shape == (16,) and profile.min() < 0.7 < 1.3 < profile.max()

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    uniform, shaped = band_around(hole, T, sp), band_around(hole, T, sp, profile)
    assert abs(int(shaped.sum()) - int(ring.sum())) < 0.05 * ring.sum()
    assert dice(shaped, ring) > 0.9 and dice(shaped, ring) > dice(uniform, ring) + 0.08
    big = band_around(r < 14, T, sp, profile)                        # the next slice's larger pool
    row = big[40]
    assert row[40 - 14 - 4] == 0 and row[40 - 14 - 2] and row[40 + 14 + 8] and not row[40 + 14 + 11]
    assert np.array_equal(band_around(hole, T, sp, None), uniform)
    assert np.allclose(ring_profile(np.zeros_like(ring), hole, sp, 8), 1.0)   # nothing to measure: uniform
    # between two ring supports the profile goes as the thickness does (rings.thickness_along)
    from synpo.rings import thickness_along
    a, b = np.full(16, 0.5), np.full(16, 1.5)
    assert np.allclose(thickness_along({0: a, 4: b})(1), 0.75) and np.allclose(thickness_along({0: a, 4: b})(9), 1.5)
    assert np.allclose(thickness_along({0: a, 4: b}, "mean")(1), 1.0) and thickness_along({0: 3.0, 4: 7.0})(1) == 4.0


def _fixed_conf(shape):
    """A target's confidence as ring_label uses it (prepare, computed, dense), all zeros of `shape`."""
    class Conf:
        def prepare(self, indices):
            pass

        def computed(self):
            return []

        def dense(self):
            return np.zeros(shape, np.float32)
    return Conf


@pytest.mark.parametrize("mode", ["interpolated", "mean"])
def test_a_rings_band_between_two_ring_supports_has_the_thickness_between_theirs(mode):
    """rings.ring_label with two ring supports (slices 0 and 4, bands 3 and 7 px thick around the
    same blood pool) and the walked hole on slices 1-3: volume.ring_thickness "interpolated" makes the
    band on slice t as thick as the two supports' interpolated there (4, 5, 6 px), "mean" 5 px on
    every slice; a note of pixels added to the filled shape's mask does not stay on a slice the band
    gives. The walks are replaced by fixed masks (the run's interface, not its models)."""
    from synpo.config import configured
    from synpo.ownership import ADDED, LARGER
    from synpo.result import SliceRecord
    from synpo.rings import band_around, ring_label, ring_thickness, thickness_along
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 30, xx - 30)
    hole = r < 8
    rings = {0: (r >= 8) & (r < 11), 4: (r >= 8) & (r < 15)}

    Conf = _fixed_conf((5, 60, 60))

    class Run:
        cfg = configured(["volume.ring_thickness=%s" % mode, "volume.ring_fit_grey=false"])   # the thickness alone
        spacing_rc, on_slice, query = (1.0, 1.0), None, np.zeros((5, 60, 60), np.float32)

        def segment_target(self, label, idx, masks, records, seconds, reach=None, also_absent=()):
            records.append(SliceRecord(label, 2, "present", reason="previous kept; 12 " + ADDED + "; "
                                       + LARGER % (900, 700)))
            return {t: hole for t in (1, 2, 3)}, Conf()           # the filled shape's walk and the hole's

        def target_range(self, idx, masks):
            return None
    records = []
    masks, _, _ = ring_label(Run(), 1, [0, 4], [rings[0], rings[4]], ([hole | rings[0], hole | rings[4]],
                                                                      {0: hole, 4: hole}), records, {})
    # The filled shape's notes on pixels added between the supports and on the larger of two walks
    # are not the band's: dropped.
    assert [r.reason for r in records] == ["previous kept"]
    along = thickness_along({0: 3.0, 4: 7.0}, mode)
    expected = [4.0, 5.0, 6.0] if mode == "interpolated" else [5.0, 5.0, 5.0]
    assert [along(t) for t in (1, 2, 3)] == expected and along(-1) == along(0) and along(9) == along(4)
    widths = [int(masks[t][30, 30:].sum()) for t in (1, 2, 3)]       # the band's width along a radius
    assert widths == ([4, 5, 6] if mode == "interpolated" else [5, 5, 5])
    assert all(not (masks[t] & hole).any() for t in (1, 2, 3))
    measured = [ring_thickness(rings[s], hole, (1.0, 1.0)) for s in (0, 4)]   # about 3 and 7
    assert np.array_equal(masks[2], band_around(hole, float(np.mean(measured)), (1.0, 1.0)))


def test_a_rings_outer_edge_follows_the_walls_grey_values():
    """rings.GreyFit (volume.ring_fit_grey): the band of the supports' thickness (5 px) around a hole,
    where the wall is 6 px thick on the left (fat outside it, brighter than the wall) and 4 px on the
    right (lung, darker): each sector's edge moves to where the wall's grey values end, within the
    limits (0.8-1.25 of the band's reach). A wall beyond the limits stops at them; without the slice's
    image, or with nothing to go by (no support values and a band too thin for its own), the band
    stays as it was."""
    from scipy import ndimage
    from synpo.rings import GreyFit, band_around
    yy, xx = np.mgrid[:80, :80]
    hole = np.hypot(yy - 40, xx - 40) <= 12
    d = ndimage.distance_transform_edt(~hole)
    wall = (d > 0) & (d <= np.where(xx < 40, 6.0, 4.0))
    image = np.where(hole, 0.9, np.where(wall, 0.5, np.where(xx < 40, 0.95, 0.1)))
    image = image + np.random.default_rng(0).normal(0, 0.02, image.shape)
    plain = band_around(hole, 5.0, (1.0, 1.0))
    fitted = band_around(hole, 5.0, (1.0, 1.0), fit=GreyFit(image[wall]), image=image)
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())          # noqa: E731
    assert dice(plain, wall) < 0.9 and dice(fitted, wall) > 0.99
    left, right = xx < 35, xx > 45
    assert d[plain & left].max() == d[plain & right].max() == 5.0
    assert d[fitted & left].max() == 6.0 and d[fitted & right].max() == 4.0
    tight = band_around(hole, 5.0, (1.0, 1.0), fit=GreyFit(image[wall], 0.9, 1.1), image=image)
    across_row = lambda band: (int(band[40, :40].sum()), int(band[40, 40:].sum()))   # noqa: E731
    assert across_row(plain) == (5, 5) and across_row(fitted) == (6, 4) and across_row(tight) == (5, 4)
    assert 5.0 < d[tight & left].max() <= 5.5                              # held at 1.1 x the reach
    assert np.array_equal(band_around(hole, 5.0, (1.0, 1.0), fit=GreyFit(image[wall])), plain)   # no image
    across = band_around(hole, 5.0, (1.0, 1.0), fit=GreyFit(None), image=image)   # this slice's range alone
    assert dice(across, wall) > dice(plain, wall) + 0.02     # (its band's core takes in some lung: less)
    thin = band_around(hole, 1.0, (1.0, 1.0))
    assert np.array_equal(band_around(hole, 1.0, (1.0, 1.0), fit=GreyFit(None), image=image), thin)
    for reach in (5.0, 4.6, 3.7):            # the limit chosen is the band drawn: no pixel at it lost to rounding
        grey = (d > 0) & (d <= 1.1 * reach)
        fit = GreyFit(np.full(10, 0.5), 0.85, 1.2)
        limits = fit.limits(hole, d, d / reach, (d > 0) & (d <= reach), np.where(grey, 0.5, 0.0), 1.0)
        drawn = band_around(hole, reach, (1.0, 1.0), fit=fit, image=np.where(grey, 0.5, 0.0))
        assert np.array_equal(drawn, (d > 0) & (d / reach <= limits)) and (drawn & ~grey).sum() == 0


def test_a_rings_band_reads_each_slices_own_grey_values():
    """volume.ring_grey_per_slice: intensity.normalize_each_slice scales each slice to its own
    percentiles (a slice twice as dark reads the same; a flat slice keeps the volume's values);
    VolumeRun gives a ring label's run those values on MR within a volume (not on CT, not without a
    ring, not with the option off); rings.ring_label fits the band and its gate's range on them, so
    a slice darker than the paint's gets the band the wall's grey values draw."""
    from scipy import ndimage
    from synpo.config import IntensityConfig, SynPoConfig, configured
    from synpo.intensity import normalize_each_slice
    from synpo.rings import band_around, ring_label
    from synpo.volume import VolumeRun
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 900, (20, 20)).astype(np.float32)
    raw = np.stack([base, base * 0.5 + 20, np.full((20, 20), 7.0, np.float32)])
    fallback = np.full(raw.shape, 0.25, np.float32)
    each = normalize_each_slice(raw, fallback, IntensityConfig())
    assert np.allclose(each[0], each[1], atol=1e-5) and each.min() == 0.0 and each.max() == 1.0
    assert np.array_equal(each[2], fallback[2])
    with pytest.raises(ValueError, match="differ in shape"):
        normalize_each_slice(raw, fallback[:2])

    # The slice 2 is the support's anatomy with the wall 6 px thick on the left, 4 on the right, all
    # of it half as bright: on the volume's values the wall's grey range (from the support, 0.5) is
    # not the slice's (0.25), on the slice's own it is.
    yy, xx = np.mgrid[:80, :80]
    hole = np.hypot(yy - 40, xx - 40) <= 12
    d = ndimage.distance_transform_edt(~hole)
    wall0 = (d > 0) & (d <= 5.0)
    wall2 = (d > 0) & (d <= np.where(xx < 40, 6.0, 4.0))
    def scene(wall, scale):
        return scale * np.where(hole, 0.9, np.where(wall, 0.5, np.where(xx < 40, 0.95, 0.1)))
    query = np.stack([scene(wall0, 1.0), scene(wall2, 0.5), scene(wall2, 0.5)]).astype(np.float32)
    query += rng.normal(0, 0.01, query.shape).astype(np.float32)
    own = np.stack([query[t] / np.percentile(query[t], 99.5) for t in range(3)]).astype(np.float32)
    Conf = _fixed_conf((3, 80, 80))

    class Run:
        cfg = configured([])
        spacing_rc, on_slice, cross, ring_bands = (1.0, 1.0), None, False, {}
        ring_grey = None

        def __init__(self):
            self.query = self.ref = query

        def segment_target(self, label, idx, masks, records, seconds, reach=None, also_absent=()):
            return {t: hole for t in (1, 2)}, Conf()

        def target_range(self, idx, masks):
            from synpo.gate import organ_range
            return organ_range([self.ref[s] for s in idx], masks, self.cfg.gate)
    support = [wall0]
    plain = band_around(hole, 5.0, (1.0, 1.0))
    run = Run()
    volume_wise, _, _ = ring_label(run, 2, [0], support, ([hole | wall0], {0: hole}), [], {})
    run = Run()
    run.ring_grey = own
    slice_wise, _, _ = ring_label(run, 2, [0], support, ([hole | wall0], {0: hole}), [], {})
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())          # noqa: E731
    # On the slice's own values the band follows the wall (the gate keeps it, the fit draws the thin
    # side); on the volume's the gate, set on the paint's brighter wall, cuts into it.
    assert dice(slice_wise[2], wall2) > 0.95 > dice(plain, wall2)
    assert dice(volume_wise[2], wall2) < dice(slice_wise[2], wall2) - 0.1
    assert int(slice_wise[2][40, 40:].sum()) == 4 and int(volume_wise[2][40, 40:].sum()) < 4

    # Which runs get slice-wise values.
    image = np.zeros((4, 40, 40), np.float32)
    image[:] = rng.uniform(0, 300, (4, 40, 40))
    r = np.hypot(*np.mgrid[-20:20, -20:20])
    paint = np.zeros(image.shape, np.int32)
    paint[1][(r >= 6) & (r < 9)] = 2                                   # a ring
    def made(img, lab, cfg=SynPoConfig()):
        return VolumeRun(img, (1.0, 1.0, 1.0), lab, None, None, cfg, None, None, 0, None).ring_grey
    grey = made(image, paint)
    assert grey is not None and grey.shape == image.shape and grey.min() == 0.0 and grey.max() == 1.0
    assert made(image, paint, configured(["volume.ring_grey_per_slice=false"])) is None
    filled = np.where(r < 9, 2, 0)[None].repeat(4, 0) * (np.arange(4) == 1)[:, None, None]
    assert made(image, filled.astype(np.int32)) is None                 # no ring
    ct = np.round(image * 4 - 1000)                                    # Hounsfield units
    assert made(ct, paint) is None


def test_a_rings_band_is_drawn_around_the_label_it_encloses():
    """volume.ring_around_enclosed (assembly.band_around_enclosed): the ring's hole walked from its
    own supports shrank on slices 1-2 (a myocardium corrected on slice 0 whose hole's walk lost the
    blood pool), while the blood pool's own walk (its label, painted elsewhere) holds it there: the
    band is drawn around the blood pool's mask on those slices, with the ring's thickness, and left as
    it was on a slice where the blood pool is not found (3). rings.ring_label hands the band's rule
    and the slices it stands on to the assembly (run.ring_bands)."""
    from synpo.assembly import band_around_enclosed
    from synpo.config import configured
    from synpo.rings import ring_label
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 30, xx - 30)
    pool, shrunk = r < 10, r < 4
    ring = (r >= 10) & (r < 14)
    Conf = _fixed_conf((5, 60, 60))

    class Run:
        cfg = configured(["volume.ring_fit_grey=false"])            # the band's hole alone
        spacing_rc, on_slice, query = (1.0, 1.0), None, np.zeros((5, 60, 60), np.float32)
        ring_bands = {}

        def segment_target(self, label, idx, masks, records, seconds, reach=None, also_absent=()):
            return {t: shrunk for t in (1, 2, 3)}, Conf()         # the filled shape's walk and the hole's

        def target_range(self, idx, masks):
            return None
    run = Run()
    masks, _, _ = ring_label(run, 2, [0], [ring], ([pool | ring], {0: pool}), [], {})
    assert sorted(run.ring_bands) == [2] and run.ring_bands[2][1] == [1, 2, 3]
    band = run.ring_bands[2][0]
    assert (masks[1] & pool).sum() >= 0.9 * masks[1].sum()          # a small ring inside the pool
    found = {2: dict(masks), 3: {1: pool, 2: pool}}
    band_around_enclosed(found, run.ring_bands, {3: [2]}, {0: np.where(ring, 2, np.where(pool, 3, 0))})
    for t in (1, 2):
        assert np.array_equal(found[2][t], band(t, pool))
        assert not (found[2][t] & pool).any() and (found[2][t] & ring).sum() >= 0.9 * ring.sum()
        assert (found[2][t] & ~ring).sum() <= 0.1 * ring.sum()       # the support's ring, as thick
    assert np.array_equal(found[2][3], masks[3])                    # no blood pool found there: as walked
    # A label the ring does not enclose leaves it alone.
    found = {2: dict(masks), 3: {1: pool}}
    band_around_enclosed(found, run.ring_bands, {}, {})
    assert np.array_equal(found[2][1], masks[1])


@pytest.mark.parametrize("keeps", [True, False])
def test_a_rings_rerun_walks_keep_the_previous_filled_shape_and_hole_where_they_end_short(keeps):
    """volume.ring_keeps_reach (rings.ring_reach, walk.keep_reach): after a correction, the walk of a
    ring's filled shape that judges a slice absent where the previous run still had the ring keeps
    the previous filled shape from there to the previous end (the blood pool's own label inside the
    hole counted as the ring's), and the hole's walk the previous hole; ring_label hands both stacks
    to the walks. Off, the walks get none (a ring's walks kept nothing before)."""
    from synpo.config import configured
    from synpo.rings import ring_label, ring_reach
    from synpo.volume import _Context, _walk
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    previous = np.zeros((8, 40, 40), np.uint8)
    previous[1:6][:, r < 6] = 3                               # the blood pool, its own label
    previous[1:6][:, (r >= 6) & (r < 10)] = 2                 # the myocardium around it, slices 1-5
    previous[1:6, 0:3, 0:3] = 1                               # another label, left alone
    outer, inner = ring_reach(previous, 2)
    assert np.array_equal(outer[1:6] == 2, np.broadcast_to(r < 10, (5, 40, 40)))
    assert np.array_equal(inner[1:6] == 2, np.broadcast_to(r < 6, (5, 40, 40)))
    assert not (inner == 3).any() and (outer[1:6, 0:3, 0:3] == 1).all() and not outer[[0, 6, 7]].any()
    # The filled shape's re-run walk from a paint on slice 1: its look-alike ends at slice 3.
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:4][:, r < 10] = 0.9
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    ctx = _Context(_BoxFiller(), store, conf, SynPoConfig(), {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, reach=outer)
    masks, records = {}, []
    _walk(ctx, 2, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(masks) == [2, 3, 4, 5]
    assert all(np.array_equal(masks[t], r < 10) for t in (4, 5))
    assert [rec.reason for rec in records if rec.index == 4][0].startswith("previous kept (")

    handed = []
    Conf = _fixed_conf((8, 40, 40))

    class Run:
        cfg = configured(["volume.ring_keeps_reach=%s" % str(keeps).lower(), "volume.ring_fit_grey=false"])
        spacing_rc, on_slice, query, previous_reach = (1.0, 1.0), None, np.zeros((8, 40, 40), np.float32), previous

        def segment_target(self, label, idx, masks, records, seconds, reach=None, also_absent=()):
            handed.append(reach)
            return {}, Conf()

        def target_range(self, idx, masks):
            return None
    ring = previous[1] == 2
    ring_label(Run(), 2, [1], [ring], ([r < 10], {1: r < 6}), [], {})
    if keeps:
        assert np.array_equal(handed[0], outer) and np.array_equal(handed[1], inner)
    else:
        assert handed == [None, None]


def test_a_rings_hole_ends_on_a_support_painted_without_a_hole():
    """rings.ring_label: a support of the ring's label painted without a hole (the base's open band,
    the apex: a filled shape of the ring) tells the hole's walks that the hole is absent there
    (segment_target's also_absent, which the walk treats as an absent mark); the filled shape's
    walks get no such mark. Past that support the filled shape's mask stands, not a band around a
    hole walked on from the ring's support (cmr_bssfp image_1's slice 11: 1128 px against 95)."""
    from synpo.config import configured
    from synpo.rings import ring_label
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    ring, sliver = (r >= 6) & (r < 10), (r < 10) & (yy < 14)
    handed = []
    Conf = _fixed_conf((8, 40, 40))

    class Run:
        cfg = configured(["volume.ring_fit_grey=false"])
        spacing_rc, on_slice, query = (1.0, 1.0), None, np.zeros((8, 40, 40), np.float32)

        def segment_target(self, label, idx, masks, records, seconds, reach=None, also_absent=()):
            handed.append((list(idx), list(also_absent)))
            if len(handed) == 1:                                 # the filled shape: slices 2-5
                return {t: (sliver if t == 5 else r < 10) for t in (2, 3, 5)}, Conf()
            # The hole's walk from slice 1 ends on the first slice marked absent (walk.hard_end).
            end = min(also_absent, default=8)
            return {t: r < 6 for t in range(2, 8) if t < end}, Conf()

        def target_range(self, idx, masks):
            return None
    masks, _, _ = ring_label(Run(), 2, [1, 4], [ring, sliver], ([r < 10, sliver], {1: r < 6}), [], {})
    assert handed == [([1, 4], []), ([1], [4])]
    assert np.array_equal(masks[5], sliver)                      # the filled shape's walk, not a band
    assert all(np.array_equal(masks[t] & (r < 6), np.zeros((40, 40), bool)) for t in (2, 3))   # bands there


def test_position_prior_maps_the_support_box_through_the_body_box():
    from synpo.position import body_box, expected_region, expected_shape
    sup = np.zeros((100, 100), np.float32)
    sup[20:80, 10:90] = 0.6                                    # body
    q = np.zeros((120, 160), np.float32)
    q[10:110, 40:140] = 0.7                                    # another body: shifted and larger
    q[0, 0] = 1.0                                              # a stray bright pixel is not the body
    assert body_box(sup) == (20, 10, 80, 90) and body_box(q) == (10, 40, 110, 140)
    organ = np.zeros((100, 100), bool)
    organ[35:50, 15:35] = True                                 # the patient's right, upper part
    region = expected_region(organ, sup, q, 0.0)
    ys, xs = np.nonzero(region)
    # rows (35-20)/60*100+10 = 35 .. (50-20)/60*100+10 = 60; columns (15-10)/80*100+40 = 46.25 .. 71.25
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (35, 60, 46, 72)
    wider = expected_region(organ, sup, q, 0.1)
    assert wider[region].all() and wider.sum() > region.sum() and not wider[:, 100:].any()
    assert expected_region(np.zeros_like(organ), sup, q, 0.1).all()
    assert body_box(np.zeros((5, 6))) == (0, 0, 5, 6)
    # The carried-over shape lands in the same place, scaled like the body (1.667 rows, 1.25
    # columns per support pixel) and inside the expected region.
    shape = expected_shape(organ, sup, q)
    ys, xs = np.nonzero(shape)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (35, 60, 46, 71)
    assert region[shape].all() and abs(int(shape.sum()) - 15 * 20 * 100 / 60 * 100 / 80) <= 30
    assert not expected_shape(np.zeros_like(organ), sup, q).any()


# ------------------------------------------------------------------ prompts

def _disc_map(H=64, W=80, centre=(30, 40), radius=10):
    yy, xx = np.mgrid[:H, :W]
    d = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    return np.clip(1.0 - d / (2 * radius), 0, 1).astype(np.float32), d <= radius


def test_prompts_positives_inside_negatives_outside_and_near():
    conf, disc = _disc_map()
    cfg = PromptConfig(top_k=40, n_positive_points=3, n_negative_points=4, negative_sigma=1.0)
    p = prompts.select_prompts(conf, cfg)
    assert p.positive.shape == (3, 2)
    for x, y in p.positive.astype(int):
        assert disc[y, x]
    assert p.negative.shape == (4, 2)
    dists = []
    for x, y in p.negative.astype(int):
        assert conf[y, x] < cfg.negative_max_confidence
        dists.append(np.hypot(y - 30, x - 40))
    # Gaussian around the target: negatives near it, not in far corners of the slice.
    assert max(dists) < 45
    x0, y0, x1, y1 = p.box
    assert x0 <= 35 and x1 >= 46 and y0 <= 25 and y1 >= 36          # the box covers the confident disc


def test_prompts_are_deterministic_and_seeded():
    conf, _ = _disc_map()
    conf = conf + np.random.default_rng(1).random(conf.shape).astype(np.float32) * 0.05
    a = prompts.select_prompts(conf, PromptConfig(seed=3))
    b = prompts.select_prompts(conf, PromptConfig(seed=3))
    assert np.array_equal(a.positive, b.positive) and np.array_equal(a.negative, b.negative)
    assert a.box == b.box


def test_prompts_without_kmeans_take_the_top_pixels():
    conf, _ = _disc_map()
    p = prompts.select_prompts(conf, PromptConfig(kmeans=False, n_positive_points=2))
    top = prompts.top_k_pixels(conf, 2)
    assert np.array_equal(p.positive, top.astype(float))


def test_prompts_respect_search_region():
    conf, _ = _disc_map()
    conf2, _ = _disc_map(centre=(30, 10), radius=6)
    both = np.maximum(conf, conf2)
    region = np.zeros(both.shape, dtype=bool)
    region[:, :22] = True                                 # only the left object is searched
    p = prompts.select_prompts(both, PromptConfig(), search=region)
    assert (p.positive[:, 0] < 22).all()
    assert p.box[2] <= 22


def test_prompts_keep_the_heavier_component_when_positives_fall_on_two():
    big, _ = _disc_map(centre=(30, 50), radius=12)
    small, _ = _disc_map(centre=(30, 12), radius=6)
    both = np.maximum(big, small)                          # both peak at 1: the top 400 fall on both
    cfg = PromptConfig(top_k=400)
    one = prompts.select_prompts(both, cfg)
    assert one.box[0] >= 35 and (one.positive[:, 0] >= 35).all() and not one.region[:, :20].any()
    spanning = prompts.select_prompts(both, PromptConfig(top_k=400, one_component=False))
    assert spanning.box[0] < 10 and spanning.box[2] > 55


def test_prompts_take_the_component_that_covers_the_expected_shape():
    big, _ = _disc_map(centre=(30, 50), radius=12)
    small, _ = _disc_map(centre=(30, 12), radius=6)
    both = np.maximum(big, small)
    expected = np.zeros(both.shape, dtype=bool)
    expected[24:37, 5:20] = True                           # another patient's organ lay on the left
    p = prompts.select_prompts(both, PromptConfig(top_k=400), expected=expected)
    assert p.box[2] <= 20 and (p.positive[:, 0] < 20).all() and not p.region[:, 30:].any()
    # No confidence inside the guess: the heavier component, as without one.
    nowhere = np.zeros(both.shape, dtype=bool)
    nowhere[60:, 70:] = True
    assert prompts.select_prompts(both, PromptConfig(top_k=400), expected=nowhere).box[0] >= 35
    # one_component off: the guess chooses nothing either.
    spanning = prompts.select_prompts(both, PromptConfig(top_k=400, one_component=False), expected=expected)
    assert spanning.box[0] < 10 and spanning.box[2] > 55


def test_top_k_and_kmeans_repeatable():
    conf = np.zeros((10, 10), dtype=np.float32)
    conf[2, 3], conf[7, 8] = 1.0, 0.9
    assert prompts.top_k_pixels(conf, 2).tolist() == [[3, 2], [8, 7]]
    pts = np.array([[0, 0], [1, 0], [0, 1], [20, 20], [21, 20], [20, 21]])
    c1 = prompts._kmeans_points(pts, 2, seed=0)
    c2 = prompts._kmeans_points(pts, 2, seed=0)
    assert np.array_equal(c1, c2)
    assert sorted(map(tuple, c1.astype(int).tolist()))[0][0] <= 1
    assert sorted(map(tuple, c1.astype(int).tolist()))[1][0] >= 20


def test_prompt_cache_keys_on_every_input_and_bounds_what_it_keeps():
    rng = np.random.default_rng(1)
    conf = rng.random((30, 40)).astype(np.float32)
    region = np.zeros(conf.shape, dtype=bool)
    region[5:20, 8:30] = True
    cfg = PromptConfig()
    cache = prompts.PromptCache()
    key = cache.key(2, conf, cfg, region)
    first = cache.get_or_select(key, lambda: prompts.select_prompts(conf, cfg, region))
    again = cache.get_or_select(key, lambda: pytest.fail("selected again"))
    assert cache.reuses == 1
    assert np.array_equal(first.positive, again.positive) and np.array_equal(first.negative, again.negative)
    assert first.box == again.box and np.array_equal(first.region, again.region)
    again.region[:] = False                          # a hit is the caller's own copy
    assert cache.get_or_select(key, lambda: pytest.fail("selected again")).region.any()
    other = conf.copy()
    other[0, 0] += 1e-6
    moved = region.copy()
    moved[5, 8] = False
    keys = {key, cache.key(3, conf, cfg, region), cache.key(2, other, cfg, region), cache.key(2, conf, cfg, moved),
            cache.key(2, conf, cfg), cache.key(2, conf, cfg, region, region), cache.key(2, conf, PromptConfig(top_k=9),
                                                                                      region)}
    assert len(keys) == 7
    small = prompts.PromptCache(kept_bytes=3 * len(np.packbits(region)))
    for t in range(5):
        small.get_or_select(small.key(t, conf, cfg, region), lambda: prompts.select_prompts(conf, cfg, region))
    assert len(small.entries) == 3 and small.bytes <= small.kept_bytes


def test_top_k_pixels_equals_a_full_stable_sort_with_ties_and_a_region():
    rng = np.random.default_rng(0)
    for trial in range(60):
        conf = (rng.integers(0, 4, (17, 23)) / 3.0).astype(np.float32)      # many equal values
        allowed = rng.random(conf.shape) < 0.6 if trial % 2 else None
        k = int(rng.integers(1, conf.size + 3))
        flat = (conf if allowed is None else np.where(allowed, conf, -np.inf)).ravel()
        order = np.argsort(-flat, kind="stable")[:min(k, int(np.isfinite(flat).sum()))]
        ys, xs = np.unravel_index(order, conf.shape)
        assert prompts.top_k_pixels(conf, k, allowed).tolist() == np.stack([xs, ys], 1).tolist()


def test_fill_holes_equals_scipy():
    from scipy import ndimage
    from synpo.decode import fill_holes
    rng = np.random.default_rng(1)
    for trial in range(200):
        m = rng.random(tuple(rng.integers(1, 25, 2))) < rng.random()
        if trial % 3 == 0:
            m = ndimage.binary_dilation(m)
        assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m))


def test_kmeans_finds_separated_clusters_and_handles_degenerate_sets():
    from synpo.kmeans import kmeans
    rng = np.random.default_rng(3)
    means = np.array([[0.0, 0.0], [40.0, 5.0], [10.0, 50.0]])
    pts = np.concatenate([m + rng.normal(0, 1.0, (30, 2)) for m in means])
    centres = kmeans(pts, 3, seed=0)
    found = sorted(map(tuple, np.round(centres).tolist()))
    want = sorted(map(tuple, np.round([pts[i * 30:(i + 1) * 30].mean(0) for i in range(3)]).tolist()))
    assert found == want
    assert np.array_equal(kmeans(pts, 3, seed=5), kmeans(pts, 3, seed=5))
    same = np.ones((6, 2))                                  # every point identical
    assert np.allclose(kmeans(same, 3), 1.0)
    assert kmeans(pts[:2], 3).shape == (2, 2)               # fewer points than clusters: the points
    with pytest.raises(ValueError):
        kmeans(pts, 0)
    with pytest.raises(ValueError):
        kmeans(pts[:, 0], 2)


# ------------------------------------------------------------------ frames, geometry, config

def test_frame_preserves_physical_aspect():
    f = Frame.fit(30, 120, (3.0, 0.75), 256)             # 90 mm x 90 mm: a square in physical space
    assert f.h == f.w == 256
    f = Frame.fit(100, 200, (1.0, 1.0), 256)
    assert (f.h, f.w) == (128, 256)
    assert np.allclose(f.to_input_xy([[200, 100]]), [[256, 128]])


def test_slice_coordinates_to_voxel_indices():
    assert slice_xy_to_ijk([[5, 7]], 3, axis=0).tolist() == [[5, 7, 3]]
    assert slice_xy_to_ijk([[5, 7]], 3, axis=1).tolist() == [[5, 3, 7]]
    assert slice_xy_to_ijk([[5, 7]], 3, axis=2).tolist() == [[3, 5, 7]]


def test_geometry_index_to_lps_and_ras_matches_simpleitk():
    import SimpleITK as sitk
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)     # columns: i -> -y, j -> +x
    g = Geometry((4, 4, 4), (2.0, 3.0, 4.0), (10.0, 20.0, 30.0), direction)
    lps = g.index_to_lps([[1, 1, 1]])[0]
    assert np.allclose(lps, [10 + 3.0, 20 - 2.0, 34.0])
    assert np.allclose(Geometry.to_ras(lps), [-13.0, -18.0, 34.0])
    image = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(direction)
    for ijk in ([0, 0, 0], [1, 2, 3], [0.5, 3.25, 1.0]):
        assert np.allclose(g.index_to_lps([ijk])[0], image.TransformContinuousIndexToPhysicalPoint(ijk))


def test_config_validation_and_overrides():
    cfg = SynPoConfig().with_(prompts={"top_k": 8})
    assert cfg.prompts.top_k == 8
    assert cfg.prompts.n_positive_points == SynPoConfig().prompts.n_positive_points
    assert SynPoConfig().prompts.top_k == PromptConfig().top_k
    with pytest.raises(SynPoError, match="unknown config field"):
        SynPoConfig().with_(prompts={"nope": 1})
    with pytest.raises(SynPoError, match="top_k"):
        validate(SynPoConfig().with_(prompts={"top_k": 0}))
    # Values of the wrong type (as --set parses them) are refused by name, not deep in a stage.
    assert SynPoConfig().with_(decode={"window_margin": None}).decode.window_margin is None
    assert SynPoConfig().with_(decode={"window_margin": 1}).decode.window_margin == 1
    assert SynPoConfig().with_(intensity={"ct_window": (50, 350.0)}).intensity.ct_window == (50, 350.0)
    for section, field_, value, wants in [("decode", "window_margin", "None", r"Optional\[float\]"),
                                          ("prompts", "top_k", 3.5, "int"), ("decode", "refine", 1, "bool"),
                                          ("intensity", "ct_window", (40.0,), r"Tuple\[float, float\]"),
                                          ("intensity", "modality", 3, "str")]:
        with pytest.raises(SynPoError, match="%s.%s wants %s" % (section, field_, wants)):
            SynPoConfig().with_(**{section: {field_: value}})
    with pytest.raises(SynPoError, match="window_margin"):
        validate(SynPoConfig().with_(decode={"window_margin": -0.5}))
    with pytest.raises(SynPoError, match=r"label_workers must be >= 0 \(0: one per CPU thread\)"):
        validate(SynPoConfig().with_(volume={"label_workers": -1}))
    validate(SynPoConfig().with_(volume={"label_workers": 0}))          # auto
    with pytest.raises(SynPoError, match=r"volume.tip_ratio must be in \[0, 1\]"):
        validate(SynPoConfig().with_(volume={"tip_ratio": 1.5}))
    with pytest.raises(SynPoError, match=r"volume.left_retry must be >= 0"):
        validate(SynPoConfig().with_(volume={"left_retry": -0.1}))
    with pytest.raises(SynPoError, match=r"volume.left_retry_holds must be in \[0, 1\]"):
        validate(SynPoConfig().with_(volume={"left_retry_holds": 1.25}))


class _BoxRecorder:
    """A stand-in SAM: records each box it is given and answers with a fixed rectangle mask."""

    def __init__(self, rect):
        self.rect, self.boxes = rect, []

    def decode(self, embedding, frame, box_xy=None, points_xy=None, point_labels=None, mask_logits=None,
               window_margin=None, attend_margin=None, attend_cells=0):
        self.boxes.append(tuple(box_xy))
        x0, y0, x1, y1 = self.rect
        logits = torch.full((frame.H, frame.W), -5.0)
        logits[y0:y1, x0:x1] = 5.0
        return logits, logits, 0.9


@pytest.mark.parametrize("margin, expected", [(0.0, (20, 10, 70, 50)), (0.04, (18, 8, 72, 52))])
def test_refinement_box_is_the_first_mask_box_widened(margin, expected):
    frame = Frame.fit(64, 96, (1.0, 1.0), 96)
    region = np.zeros((64, 96), dtype=bool)
    region[12:40, 25:60] = True
    given = Prompts(np.array([[40.0, 25.0]]), np.zeros((0, 2)), (24, 11, 61, 41), region)
    model = _BoxRecorder((20, 10, 70, 50))                # mask 50 wide, 40 high
    out = decode_slice(model, None, frame, given, DecodeConfig(refine_box_margin=margin))
    assert model.boxes == [(24, 11, 61, 41), expected]    # first the prompt box, then the refinement box
    assert out.mask.sum() == 50 * 40 and out.box == (24, 11, 61, 41)
    with pytest.raises(SynPoError, match="refine_box_margin"):
        validate(SynPoConfig().with_(decode={"refine_box_margin": -0.1}))


def test_decoder_inputs_key_changes_only_with_what_decoding_sees():
    from synpo.decode import decoder_inputs
    region = np.zeros((64, 96), dtype=bool)
    region[12:40, 25:60] = True
    box = (24, 11, 61, 41)
    base = Prompts(np.array([[40.0, 25.0]]), np.array([[5.0, 5.0]]), box, region)
    key = decoder_inputs(base, DecodeConfig())
    # Box-only decoding: other positives inside the region and other negatives change nothing.
    same = Prompts(np.array([[30.0, 20.0], [50.0, 30.0]]), np.array([[90.0, 60.0]]), box, region)
    assert decoder_inputs(same, DecodeConfig()) == key
    # A positive outside the region keeps its own component: a different key.
    outside = Prompts(np.array([[40.0, 25.0], [5.0, 60.0]]), np.zeros((0, 2)), box, region)
    assert decoder_inputs(outside, DecodeConfig()) != key
    other_box = Prompts(base.positive, base.negative, (24, 11, 62, 41), region)
    assert decoder_inputs(other_box, DecodeConfig()) != key
    other_region = region.copy()
    other_region[39, 59] = False
    assert decoder_inputs(Prompts(base.positive, base.negative, box, other_region), DecodeConfig()) != key
    assert decoder_inputs(base, DecodeConfig(refine_blend=0.5)) != key
    # With points given to SAM, every point counts.
    assert decoder_inputs(same, DecodeConfig(use_points=True)) != decoder_inputs(base, DecodeConfig(use_points=True))


class _TwoPasses:
    """A stand-in SAM: the first pass answers +3 on rectangle A (-5 elsewhere), the refinement
    pass +5 on rectangle B inside A (-4 elsewhere)."""

    def __init__(self, a, b):
        self.rects, self.calls = (a, b), 0

    def decode(self, embedding, frame, box_xy=None, points_xy=None, point_labels=None, mask_logits=None,
               window_margin=None, attend_margin=None, attend_cells=0):
        first = self.calls == 0
        self.calls += 1
        x0, y0, x1, y1 = self.rects[0] if first else self.rects[1]
        inside, outside = (3.0, -5.0) if first else (5.0, -4.0)
        logits = torch.full((frame.H, frame.W), outside)
        logits[y0:y1, x0:x1] = inside
        return logits, logits, 0.9


@pytest.mark.parametrize("blend, restored", [(0.0, False), (0.5, False), (0.6, True), (1.0, True)])
def test_refinement_restores_confident_pixels_where_the_blend_of_both_passes_is_foreground(blend, restored):
    # Inside A but outside B the blend is 3 blend - 4 (1 - blend): positive above 4/7. Only the
    # part of A that lies in the confident region (the prompts' region) may come back.
    frame = Frame.fit(64, 96, (1.0, 1.0), 96)
    a, b = (20, 10, 70, 50), (25, 12, 65, 48)               # IoU 0.72: the refinement is kept
    region = np.zeros((64, 96), dtype=bool)
    region[14:30, 15:40] = True                              # reaches into A's left strip, not its top
    given = Prompts(np.array([[30.0, 20.0]]), np.zeros((0, 2)), (24, 11, 61, 41), region)
    out = decode_slice(_TwoPasses(a, b), None, frame, given, DecodeConfig(refine_blend=blend))
    want = np.zeros((64, 96), dtype=bool)
    want[12:48, 25:65] = True                                # B
    if restored:
        want[14:30, 20:25] = True                            # A's left strip, inside the region
    assert np.array_equal(out.mask, want)
    with pytest.raises(SynPoError, match="refine_blend"):
        validate(SynPoConfig().with_(decode={"refine_blend": 1.5}))


class _BoxFiller:
    """A stand-in SAM that segments exactly the box it is given."""

    def decode(self, embedding, frame, box_xy=None, points_xy=None, point_labels=None, mask_logits=None,
               window_margin=None, attend_margin=None, attend_cells=0):
        x0, y0, x1, y1 = box_xy
        logits = torch.full((frame.H, frame.W), -5.0)
        logits[y0:y1, x0:x1] = 5.0
        return logits, logits, 0.9


class _Store(EmbeddingStore):
    """A real store (its decoded-mask memo included) over placeholder embeddings, which the
    stand-in SAMs ignore."""

    def __init__(self, frame):
        super().__init__(None, np.zeros((0, frame.H, frame.W), np.float32), frame, 1)

    def ensure(self, indices, progress=None, cancel=None, save=True):
        self.cache.update({int(t): None for t in indices})


def test_oracle_box_of_a_ring_is_outer_box_minus_hole_box():
    from synpo.evaluate import oracle_box
    gt = np.zeros((3, 40, 40), dtype=np.uint8)
    gt[1, 10:30, 8:32] = 7
    gt[1, 15:25, 14:26] = 0                              # a square ring around a hole
    gt[2, 12:20, 12:20] = 7                              # a solid square
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    plain = oracle_box(_BoxFiller(), store, gt, 7)
    ring_aware = oracle_box(_BoxFiller(), store, gt, 7, ring_min_hole=0.1)
    assert not plain[0].any() and not ring_aware[0].any()
    assert plain[1].sum() == 20 * 24                     # one box: the ring and its hole
    assert np.array_equal(ring_aware[1], gt[1] == 7)      # outer box minus hole box: the ring
    assert np.array_equal(plain[2], gt[2] == 7) and np.array_equal(ring_aware[2], gt[2] == 7)


def test_cuda_out_of_memory_halves_the_encoder_batch_and_goes_on():
    from synpo.volume import EmbeddingStore

    class TightEncoder:
        """Runs out of (pretend) GPU memory on batches of more than 3 slices."""
        name = "tight"
        precision = None

        def __init__(self):
            self.batches = []

        def embed(self, slices, frame):
            if len(slices) > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
            self.batches.append(len(slices))
            return torch.as_tensor(slices[:, None, :4, :4] * 2.0)

    enc = TightEncoder()
    slices = np.random.default_rng(0).random((11, 8, 8)).astype(np.float32)
    store = EmbeddingStore(enc, slices, frame=None, batch_size=16)
    store.ensure(range(11))
    assert store.batch_size == 2 and enc.batches == [2] * 5 + [1]          # 16 -> 8 -> 4 -> 2, then kept
    assert sorted(store.cache) == list(range(11))
    for i in range(11):
        assert torch.allclose(store.cache[i].float(), torch.as_tensor(slices[i, None, :4, :4] * 2.0), atol=1e-3)

    class AlwaysOut(TightEncoder):
        def embed(self, slices, frame):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")

    with pytest.raises(SynPoError, match="out of memory encoding a single slice with tight.*--device cpu"):
        EmbeddingStore(AlwaysOut(), slices, frame=None, batch_size=4).ensure(range(3))


def test_extent_summary_names_the_found_slices_and_why_each_end_stopped():
    from types import SimpleNamespace
    from synpo.outputs import extent_summary
    from synpo.result import SliceRecord, VolumeResult
    recs = [SliceRecord(1, 3, "absent", reason="confidence drop"), SliceRecord(1, 4, "present"),
            SliceRecord(1, 5, "support"), SliceRecord(1, 6, "present"), SliceRecord(1, 7, "absent", reason="too small"),
            SliceRecord(1, 8, "not reached"), SliceRecord(2, 5, "support"), SliceRecord(2, 6, "absent", reason="low SAM IoU"),
            SliceRecord(2, 9, "present"), SliceRecord(3, 0, "absent", reason="too small")]
    result = VolumeResult(np.zeros((10, 2, 2), np.uint8), {}, recs, SimpleNamespace(labels=[1, 2, 3]), "mr", ["sam"], {})
    assert extent_summary(result, {1: "liver"}) == [
        "liver: slices 4-6; ends at 3 (confidence drop) and 7 (too small)",
        "label 2: slices 5, 9; ends at 6 (low SAM IoU)",
        "label 3: not found"]


def test_collapse_warnings_name_a_label_that_came_back_as_its_paint_alone_and_why():
    from types import SimpleNamespace
    from synpo.outputs import collapse_warnings
    from synpo.result import SliceRecord, VolumeResult
    recs = [SliceRecord(1, 4, "absent", reason="confidence drop"), SliceRecord(1, 5, "support"),
            SliceRecord(1, 6, "absent", reason="left the previous mask"), SliceRecord(1, 7, "not reached"),
            SliceRecord(2, 5, "support"), SliceRecord(2, 6, "present"), SliceRecord(2, 7, "absent", reason="too small"),
            SliceRecord(3, 0, "support"), SliceRecord(3, 1, "absent", reason="low SAM IoU")]
    result = VolumeResult(np.zeros((10, 2, 2), np.uint8), {}, recs, SimpleNamespace(labels=[1, 2, 3]), "mr", ["sam"], {})
    lines = collapse_warnings(result, {1: "kidney"})
    assert len(lines) == 2                                  # label 2 grew beyond its paint
    assert lines[0].startswith("kidney: only the painted slice 5 came back")
    assert "at 4 (confidence drop) and 6 (left the previous mask)" in lines[0]
    assert lines[1].startswith("label 3: only the painted slice 0") and "1 (low SAM IoU)" in lines[1]


def test_no_collapse_warning_where_there_was_no_slice_to_walk_to():
    """A one-slice volume, or a label painted on every slice: no walk had a first step, so "the walk
    stopped on its first step, paint a neighbouring slice" would be wrong."""
    from types import SimpleNamespace
    from synpo.outputs import collapse_warnings
    from synpo.result import SliceRecord, VolumeResult
    one = VolumeResult(np.zeros((1, 4, 4), np.uint8), {}, [SliceRecord(1, 0, "support")],
                       SimpleNamespace(labels=[1], axis=0), "ct", ["sam"], {})
    assert collapse_warnings(one) == []
    every = VolumeResult(np.zeros((4, 3, 2), np.uint8), {}, [SliceRecord(1, t, "support") for t in range(2)],
                         SimpleNamespace(labels=[1], axis=2), "ct", ["sam"], {})
    assert collapse_warnings(every) == []                   # axis 2 has 2 slices, both painted
    short = VolumeResult(np.zeros((4, 3, 3), np.uint8), {}, [SliceRecord(1, t, "support") for t in range(2)],
                         SimpleNamespace(labels=[1], axis=2), "ct", ["sam"], {})
    assert len(collapse_warnings(short)) == 1               # slice 2 was there to walk to


def test_redecode_without_positive_points_is_empty_and_calls_no_model():
    """The user deleted every positive point: nothing to decode, an empty mask, background logits."""
    from synpo.decode import redecode_with_points

    class _NoModel:
        def decode(self, *args, **kwargs):
            raise AssertionError("the model was called without a positive point")

    frame = Frame.fit(20, 30, (1.0, 1.0), 32)
    dec = redecode_with_points(_NoModel(), None, frame, np.zeros((0, 2)), np.array([[3.0, 4.0]]))
    assert dec.mask.shape == (20, 30) and not dec.mask.any() and dec.box is None and dec.iou == 0.0
    assert dec.logits.shape == (20, 30) and bool((dec.logits < DecodeConfig().mask_threshold).all())


# ------------------------------------------------------------------ intensity gate

def _organ_and_neighbour():
    """A 60 x 60 slice: an organ of grey value ~0.4 (noisy, with a bright vessel inside it) and,
    touching its right side, a taller neighbour of grey value 0.9."""
    rng = np.random.default_rng(0)
    img = np.full((60, 60), 0.1, np.float32) + rng.normal(0, 0.01, (60, 60)).astype(np.float32)
    img[10:40, 10:30] = 0.4 + rng.normal(0, 0.02, (30, 20))
    img[22:26, 18:22] = 0.9                                  # a vessel inside the organ
    img[5:45, 30:45] = 0.9                                   # the neighbour
    organ = np.zeros((60, 60), bool)
    organ[10:40, 10:30] = True
    return img, organ


def test_gate_range_is_the_support_quantiles_widened_by_the_margin():
    from synpo.config import GateConfig
    from synpo.gate import organ_range
    img = np.tile(np.linspace(0.0, 1.0, 101, dtype=np.float32), (3, 1))
    mask = np.zeros_like(img, dtype=bool)
    mask[:, 20:81] = True                                    # values 0.2 .. 0.8
    cfg = GateConfig(quantiles=(0.0, 1.0), margin=0.5, sigma_px=0.0)
    lo, hi = organ_range([img], [mask], cfg)
    assert lo == pytest.approx(0.2 - 0.3) and hi == pytest.approx(0.8 + 0.3)
    lo, hi = organ_range([img, img], [mask, np.zeros_like(mask)], GateConfig(quantiles=(0.25, 0.75), margin=0.0,
                                                                                sigma_px=0.0))
    assert lo == pytest.approx(0.35) and hi == pytest.approx(0.65)
    assert organ_range([img], [mask], GateConfig(enabled=False)) is None
    assert organ_range([img], [np.zeros_like(mask)], cfg) is None
    with pytest.raises(InputError, match="support images"):
        organ_range([img], [mask, mask], cfg)


def test_gate_drops_a_neighbour_of_another_grey_value_and_keeps_the_organ_with_its_vessels():
    from synpo.config import GateConfig
    from synpo.gate import apply_gate, organ_range
    img, organ = _organ_and_neighbour()
    cfg = GateConfig()
    rng = organ_range([img], [organ], cfg)
    assert rng[1] < 0.9                                      # the vessel is a small part of the support
    spill = organ.copy()
    spill[10:40, 30:45] = True                               # a decoded mask that ran into the neighbour
    spill[50:53, 50:53] = True                               # and a fragment elsewhere in the organ's grey
    img[50:53, 50:53] = 0.4
    out = apply_gate(spill, img, rng, GateConfig(min_component=0.1))
    # The neighbour and the fragment (under a tenth of the largest piece) gone, the vessel kept; a pixel
    # of the neighbour's edge, where the smoothing mixes both grey values, may stay.
    assert (out & organ).sum() == organ.sum() and (out & ~organ).sum() <= 2
    assert not (out & ~spill).any() and not out[51, 51]
    kept = apply_gate(spill, img, rng, cfg)                  # the default: every component in range kept
    assert kept[51, 51] and not kept[20, 35] and (kept & organ).sum() == organ.sum()
    assert apply_gate(spill, img, None, cfg) is spill        # no range: the mask as decoded
    assert not apply_gate(spill, img, (0.95, 1.0), cfg).any()   # nothing in range: nothing left


def test_walk_gates_each_decoded_mask_with_the_targets_range():
    from synpo.gate import organ_range
    from synpo.volume import _Context, _walk
    img, organ = _organ_and_neighbour()
    conf = np.zeros((4, 60, 60), np.float32)
    conf[:, 10:40, 10:45] = 0.9                              # the confidence fires on both
    cfg = SynPoConfig()
    store = _Store(Frame.fit(60, 60, (1.0, 1.0), 60))
    store.slices = np.stack([img] * 4)
    store.ensure(range(4))
    near = ndimage.binary_dilation(organ, np.ones((3, 3)))  # the organ and the smoothed edge next to it
    walked = {}
    for name, rng in (("gated", organ_range([img], [organ], cfg.gate)), ("not gated", None)):
        ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None, rng)
        masks, records = {}, []
        _walk(ctx, 1, 0, organ, 4, +1, 10.0, masks, records)
        assert sorted(masks) == [1, 2, 3]
        walked[name] = masks
    assert all((organ & ~walked["gated"][t]).sum() == 0 and (walked["gated"][t] & ~near).sum() == 0 for t in (1, 2, 3))
    # Without the gate each slice's mask widens the next one's search region: the walk drifts into the neighbour.
    spilled = [int(walked["not gated"][t][:, 31:].sum()) for t in (1, 2, 3)]
    assert 0 < spilled[0] < spilled[1] < spilled[2]


@pytest.mark.parametrize("beyond_previous", [False, True])
def test_the_gate_keeps_an_organs_own_darker_part_inside_the_previous_mask(beyond_previous):
    """A CT kidney below its middle: a dark medulla opening onto the hilum, absent from the support
    slice, so outside the support's grey-value range. Gated everywhere it is cut away on every slice
    the walk reaches; with gate.beyond_previous only what a mask adds beyond its neighbour's is gated:
    the medulla inside the previous mask stays, the neighbour beside the organ is still dropped."""
    from synpo.gate import organ_range
    from synpo.volume import _Context, _walk
    img, organ = _organ_and_neighbour()
    medulla = np.zeros_like(organ)
    medulla[25:40, 12:24] = True                             # open at the organ's lower edge: no hole
    dark = img.copy()
    dark[medulla] = 0.15
    conf = np.zeros((4, 60, 60), np.float32)
    conf[:, 10:40, 10:45] = 0.9                              # the confidence fires on both
    cfg = SynPoConfig().with_(gate={"beyond_previous": beyond_previous})
    store = _Store(Frame.fit(60, 60, (1.0, 1.0), 60))
    store.slices = np.stack([img, dark, dark, dark])
    store.ensure(range(4))
    rng = organ_range([img], [organ], cfg.gate)
    assert rng[0] > 0.15                                     # the medulla's grey value is outside the range
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None, rng)
    masks, records = {}, []
    _walk(ctx, 1, 0, organ, 4, +1, 10.0, masks, records)
    assert sorted(masks) == [1, 2, 3]
    near = ndimage.binary_dilation(organ, np.ones((3, 3)))
    for t in (1, 2, 3):
        assert (masks[t] & ~near).sum() == 0                 # never the neighbour
        assert (organ & ~medulla & ~masks[t]).sum() == 0     # the bright organ always
        kept = (masks[t] & medulla).sum()                    # (off: its rim, smoothed into the organ's grey)
        assert kept == medulla.sum() if beyond_previous else kept < 0.25 * medulla.sum()


def test_the_first_step_from_the_paint_has_its_own_limits():
    from synpo.config import VolumeConfig
    from synpo.walk_rules import Step, judge_step
    mask, prev = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    mask[:4] = True
    vc = VolumeConfig(min_overlap=0.6, min_overlap_first=0.4, min_confidence_ratio=0.7,
                      min_confidence_ratio_first=0.5)

    def step(first, overlap=0.9, score=0.8, prev_score=1.0):
        return Step(1, 3, first, mask, int(mask.sum()), prev, 1.0, score, prev_score, 0.9, overlap)
    assert judge_step(step(False, overlap=0.5), vc) == "left the previous mask"
    assert judge_step(step(True, overlap=0.5), vc) == ""
    assert judge_step(step(True, overlap=0.3), vc) == "left the previous mask"
    assert judge_step(step(False, score=0.6), vc) == "confidence drop"
    assert judge_step(step(True, score=0.6), vc) == ""
    assert judge_step(step(True, score=0.4), vc) == "confidence drop"
    assert judge_step(Step(1, 3, True, mask, int(mask.sum()), prev, 100.0, 0.8, 1.0, 0.9, 0.9), vc) == "too small"


def test_shape_based_interpolation_moves_and_grows_a_disc_between_two_slices():
    from synpo.interpolate import between
    yy, xx = np.mgrid[:64, :64]
    a = (yy - 20) ** 2 + (xx - 20) ** 2 <= 6 ** 2
    b = (yy - 40) ** 2 + (xx - 40) ** 2 <= 12 ** 2
    mid = between(a, b, 3)
    assert len(mid) == 3 and all(m.dtype == bool for m in mid)
    areas = [m.sum() for m in [a] + mid + [b]]
    assert areas == sorted(areas)                               # it grows monotonically
    cy, cx = np.argwhere(mid[1]).mean(axis=0)
    assert abs(cy - 30) < 1.0 and abs(cx - 30) < 1.0            # halfway, centred
    radius = np.sqrt(mid[1].sum() / np.pi)
    assert abs(radius - 9) < 1.0
    assert between(a, a, 2)[0].tolist() == a.tolist()           # the same shape stays itself
    assert between(a, b, 0) == []
    some = between(a, b, 3, only=[3, 1])                        # just those positions, in that order
    assert [m.tolist() for m in some] == [mid[2].tolist(), mid[0].tolist()]


def test_a_gap_between_two_supports_changes_hands_where_their_walks_agree_best():
    from synpo.volume import split_gap
    box = lambda a, b: np.pad(np.ones((b - a, 4), bool), ((a, 12 - b), (0, 0)))   # noqa: E731
    up = {t: box(0, 6) for t in range(1, 10)}                  # s1's walk: the same shape all the way
    down = {t: box(0, 2 + t // 2) for t in range(1, 10)}        # s2's walk: matches it only at 8, 9
    assert split_gap(0, 10, up, down) == 8
    equal = {t: box(0, 6) for t in range(1, 10)}
    assert split_gap(0, 10, up, equal) == 5                     # everywhere equal: the middle
    assert split_gap(0, 10, {1: box(0, 6), 2: box(0, 6)}, {8: box(0, 6), 9: box(0, 6)}) == 2   # never met
    assert split_gap(0, 10, {}, {5: box(0, 6)}) == 0             # s1's walk stopped at once: s2 owns the gap


def _walk_up(conf, cfg, spacing_rc=(1.0, 1.0)):
    """One walk upwards from slice 0 (painted where conf[0] > 0.5) over the confidence maps `conf`,
    with box prompts decoded as boxes; returns (masks, records). spacing_rc: a pixel's size (mm)."""
    from synpo.walk import _Context, _walk
    n, H, W = conf.shape
    store = _Store(Frame.fit(H, W, (1.0, 1.0), max(H, W)))
    store.ensure(range(n))
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None,
                   spacing_rc=spacing_rc)
    masks, records = {}, []
    _walk(ctx, 1, 0, conf[0] > 0.5, n, +1, 10.0, masks, records)
    return masks, records


@pytest.mark.parametrize("levels, look_ahead, expected, bridged", [
    ((0.9, 0.9, 0.9, 0.55, 0.9, 0.9, 0.9), "off", [1, 2], []),             # one dip ends the walk
    ((0.9, 0.9, 0.9, 0.55, 0.9, 0.9, 0.9), "any", [1, 2, 3, 4, 5, 6], [3]),   # ... not with the look-ahead
    ((0.9, 0.9, 0.9, 0.55, 0.9, 0.9, 0.9), "jump", [1, 2], []),            # (a confidence drop is no jump)
    ((0.9, 0.9, 0.9, 0.55, 0.55, 0.9, 0.9), "any", [1, 2], []),            # two: the organ ended there
    ((0.9, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0), "any", [1, 2, 3], []),           # an abrupt end stays where it is
])
def test_the_look_ahead_bridges_one_bad_slice_but_not_an_end(levels, look_ahead, expected, bridged):
    n = len(levels)
    conf = np.zeros((n, 40, 40), np.float32)
    for t, level in enumerate(levels):
        conf[t, 10:30, 10:30] = level
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"look_ahead": look_ahead}))
    assert sorted(masks) == expected
    assert sorted(r.index for r in records) == list(range(1, n))          # every slice once
    assert [r.index for r in records if r.reason.startswith("bridged")] == bridged
    for t in bridged:                                                     # the shape between its neighbours
        assert np.array_equal(masks[t], masks[t - 1]) and records[t - 1].status == "interpolated"
        assert "confidence drop" in records[t - 1].reason
    if expected[-1] < n - 1:                                              # the slice that ended the walk says why
        end = next(r for r in records if r.index == expected[-1] + 1)
        assert end.status == "absent" and end.reason in ("confidence drop", "too small", "low confidence")


@pytest.mark.parametrize("look_ahead, expected", [("off", [1, 2]), ("jump", [1, 2, 3, 4, 5])])
def test_the_look_ahead_after_a_jump_onto_a_neighbour(look_ahead, expected):
    """Slice 3's confidence lies on a look-alike beside the organ (its mask leaves the previous one);
    slice 4 has the organ again: "jump" bridges slice 3 with the organ's shape, not the look-alike's."""
    n = 6
    conf = np.zeros((n, 40, 40), np.float32)
    conf[:, 5:20, 5:20] = 0.9
    conf[3] = 0.0
    conf[3, 22:37, 22:37] = 0.9                                         # the look-alike, on slice 3 only
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"look_ahead": look_ahead, "search_margin": 2.0}))
    assert sorted(masks) == expected
    third = next(r for r in records if r.index == 3)
    assert third.reason.endswith("left the previous mask") or "left the previous mask" in third.reason
    if look_ahead == "jump":
        assert third.status == "interpolated" and not masks[3][25:35, 25:35].any() and masks[3][8:17, 8:17].all()


def test_after_a_correction_a_voxel_two_labels_claim_stays_with_its_previous_owner():
    """assembly._assemble with the previous run's labels (volume.overlap_keeps_owner): where two
    labels' masks overlap, the label that had the voxel before keeps it, even against a more
    confident newcomer; where the previous run gave it to neither, the more confident one wins."""
    from synpo.assembly import _assemble
    a = np.zeros((1, 6, 6), bool)
    a[0, 1:4, 1:4] = True                                    # label 1 (the neighbour, accepted)
    b = np.zeros((1, 6, 6), bool)
    b[0, 2:5, 2:5] = True                                    # label 2 (a corrected walk running onto it)
    found = {1: {0: a[0]}, 2: {0: b[0]}}
    conf = {1: np.full((1, 6, 6), 0.5, np.float32), 2: np.full((1, 6, 6), 0.9, np.float32)}
    previous = np.zeros((1, 6, 6), np.uint8)
    previous[0, 1:4, 1:4] = 1                                # label 1 had its square
    previous[0, 3, 3] = 0                                    # ... but for one voxel of the overlap
    first = _assemble(found, conf, (1, 6, 6), [1, 2])
    assert (first[0][2:4, 2:4] == 2).all()                   # no previous run: the more confident wins
    again = _assemble(found, conf, (1, 6, 6), [1, 2], previous)
    assert again[0][2, 2] == 1 and again[0][2, 3] == 1 and again[0][3, 2] == 1   # kept by its owner
    assert again[0][3, 3] == 2                               # owned by neither before: confidence decides
    assert (again[0][4, 2:5] == 2).all() and again[0][1, 1] == 1                 # the rest as before



def test_a_labels_edge_grows_by_a_pixel_where_the_grey_values_are_its_paints():
    """assembly.grow_edges (volume.edge_grow): label 1's mask (rows 10-19 of a 20 x 20 organ at rows
    10-29, cols 10-29) grows by one pixel into the background whose grey value lies within its paint's
    10-90th percentile: the row below it (the organ's), not the column beside it (darker, not the
    organ's). A pixel two labels would take stays background; a painted slice and a skipped (ring)
    label are left as they are; the grown pixel never takes another label's."""
    from synpo.assembly import grow_edges
    image = np.full((3, 40, 40), 0.1, np.float32)
    image[:, 10:30, 10:30] = np.linspace(0.55, 0.65, 20)[None, :, None]    # the organ, brighter downwards
    image[:, 10:30, 30] = 0.3                                               # darker tissue beside it
    paint = {0: np.zeros((40, 40), np.uint8)}
    paint[0][10:30, 10:30] = 1
    paint[0][32:36, 10:30] = 2                                              # label 2 painted alike
    image[0, 32:36, 10:30] = np.linspace(0.55, 0.65, 4)[:, None]
    labels = np.zeros((3, 40, 40), np.uint8)
    labels[0] = paint[0]
    labels[1:, 10:20, 10:30] = 1                                            # slices 1-2: the top half found
    labels[2, 21, 10:30] = 2                                                # label 2 right below on slice 2
    before = labels.copy()
    grow_edges(labels, image, paint, [1, 2])
    assert np.array_equal(labels[0], before[0])                             # the painted slice as painted
    grown = (labels[1] == 1) & (before[1] == 0)
    assert np.array_equal(np.argwhere(grown)[:, 0], np.full(20, 20))        # row 20, cols 10-29
    assert not (labels[1][:, 30] == 1).any() and not (labels[1][9] == 1).any()   # beside and above: not the organ
    assert (labels[2][20] == 0).all()                                       # between 1 and 2: both claim it
    assert np.array_equal(np.unique(np.argwhere((labels[2] == 2) & (before[2] == 0))[:, 0]), [22])  # its free side
    labels = before.copy()
    grow_edges(labels, image, paint, [1, 2], skip=[1])                     # label 1 a ring: left as it is
    assert np.array_equal(labels == 1, before == 1) and (labels[2][20, 10:30] == 2).all()   # row 20 now 2's
    narrow = before.copy()
    grow_edges(narrow, image, paint, [1, 2], percentiles=(0.0, 1.0))       # a range that misses row 20
    assert np.array_equal(narrow, before)


@pytest.mark.parametrize("modality, on_ct, grows", [("mr", False, True), ("ct", False, False), ("ct-windowed", False, False),
                                                   ("ct", True, True)])
def test_the_rim_is_grown_on_mr_and_on_ct_only_when_asked(modality, on_ct, grows):
    """assembly.assemble: the rim of volume.edge_grow on an MR volume; on CT only with
    volume.edge_grow_ct (off by default: the bundled CT sample lost Dice with it). The rim is
    recorded in VolumeResult.grown."""
    from types import SimpleNamespace
    from synpo.assembly import assemble
    from synpo.config import configured
    from synpo.support import Support
    n, H, W = 3, 30, 30
    image = np.full((n, H, W), 0.1, np.float32)
    image[:, 5:25, 5:25] = 0.6                                # the organ, as painted
    paint = np.zeros((H, W), np.uint8)
    paint[5:25, 5:25] = 1
    walked = np.zeros((H, W), bool)
    walked[6:24, 6:24] = True                                 # the walk's mask one pixel short all round
    run = SimpleNamespace(cfg=configured(["volume.edge_grow_ct=%s" % str(on_ct).lower()]), cross=False,
                          paint={0: paint}, support=Support(0, [1], {1: [0]}), n=n, H=H, W=W, previous_labels=None,
                          ref=image, modality=modality, axis=0, timings={}, confidence_from=["sam"], rings={},
                          ring_bands={})
    conf = np.zeros((n, H, W), np.float32)
    result = assemble(run, [({1: walked, 2: walked}, conf, [], {}, [1, 2])])
    assert (result.labels[0] == 1).sum() == 400                                  # the paint as painted
    assert (result.labels[1] == 1).sum() == (324 + 4 * 18 if grows else 324)   # the four sides (4-neighbours)
    assert sorted(result.grown) == ([1, 2] if grows else [])


@pytest.mark.parametrize("kept_on_5, ratio, painted, dropped", [
    (4, 0.25, [2], True),        # 4 of 64 px left on the last slice: dropped
    (4, 0.0, [2], False),        # off
    (4, 0.25, [2, 5], False),    # a painted slice is never dropped
    (20, 0.25, [2], False),      # 20 of 64 (0.31): a tip, kept
])
def test_a_labels_last_slice_that_keeps_a_sliver_after_assembly_is_dropped(kept_on_5, ratio, painted, dropped):
    """assembly.drop_thin_ends (volume.tip_ratio): label 1 is walked over slices 0-5 (8 x 8 squares);
    on slice 5 a more confident label 2 covers all but `kept_on_5` of its voxels, so the assembled
    volume keeps a sliver of label 1 there. Label 1's first slice (0) is whole: not touched."""
    from synpo.assembly import _assemble, drop_thin_ends
    from synpo.result import SliceRecord
    n = 6
    one, two = {}, {}
    for t in range(n):
        one[t] = np.zeros((12, 12), bool)
        one[t][2:10, 2:10] = True
    two[5] = np.zeros((12, 12), bool)
    two[5][2:10, 2:10] = True
    two[5][2:2 + kept_on_5 // 4, 2:6] = False               # label 1 keeps kept_on_5 voxels (4 a row)
    conf = {1: np.full((n, 12, 12), 0.5, np.float32), 2: np.full((n, 12, 12), 0.9, np.float32)}
    records = [SliceRecord(1, t, "present") for t in range(n)] + [SliceRecord(2, 5, "present")]
    out = _assemble({1: one, 2: two}, conf, (n, 12, 12), [1, 2])
    assert (out[5] == 1).sum() == kept_on_5
    drop_thin_ends(out, records, [1, 2], {1: painted, 2: [5]}, ratio)
    assert ((out[5] == 1).sum() == 0) == dropped
    assert (out[5] == 2).sum() == 64 - kept_on_5              # the other label keeps its voxels
    assert all((out[t] == 1).sum() == 64 for t in range(5))    # the rest of label 1 untouched
    rec = records[5]
    if dropped:
        assert rec.status == "absent" and rec.reason == "the label's last slice: 4 px, 0.06 of the slice before it"
    else:
        assert rec.status == "present" and rec.reason == ""
    assert all(r.status == "present" for r in records[:5] + records[6:])




@pytest.mark.parametrize("rings, gap, hole_on, dropped", [
    ([2], 1, range(1, 5), [0, 5]),   # the right ventricle against the myocardium's ring: not beyond it
    ([2], 1, range(1, 6), [0]),      # the blood pool found on 5 (the ring's walk ended early): kept there
    ([2], 4, range(1, 5), []),       # 4 px away on its support slice: not against it
    ([], 1, range(1, 5), []),        # no ring (an abdomen): nothing
])
def test_a_label_against_a_rings_outside_is_kept_within_the_walls_extent(rings, gap, hole_on, dropped):
    """assembly.follow_walls (volume.wall_follow): label 2 is a ring (slices 1-4) around label 3 (found
    on `hole_on`); label 1, painted on slice 2 `gap` px from the ring's outside, was walked over 0-5;
    label 4, far from the ring, over 0-5 too."""
    from synpo.assembly import enclosing_labels, follow_walls
    from synpo.result import SliceRecord
    H = W = 24
    ring = np.zeros((H, W), bool)
    ring[4:16, 4:16] = True
    ring[7:13, 7:13] = False                                   # the hole: label 3
    hole = np.zeros((H, W), bool)
    hole[7:13, 7:13] = True
    side = np.zeros((H, W), bool)
    side[4:16, 15 + gap:15 + gap + 4] = True                   # label 1, right of the ring
    far = np.zeros((H, W), bool)
    far[20:23, 1:4] = True                                     # label 4
    paint = {2: np.zeros((H, W), np.uint8)}
    for lab, m in ((2, ring), (3, hole), (1, side), (4, far)):
        paint[2][m] = lab
    found = {2: {t: ring for t in range(1, 5)}, 3: {t: hole for t in hole_on},
             1: {t: side for t in range(6)}, 4: {t: far for t in range(6)}}
    records = [SliceRecord(lab, t, "present") for lab in (1, 4) for t in range(6)]
    enclosing = enclosing_labels(paint, [1, 2, 3, 4])
    assert enclosing == {3: [2]}
    follow_walls(found, records, rings, enclosing, paint, {1: [2], 2: [2], 3: [2], 4: [2]})
    assert sorted(found[1]) == [t for t in range(6) if t not in dropped]
    assert sorted(found[4]) == list(range(6)) and sorted(found[2]) == [1, 2, 3, 4]
    gone = [r for r in records if r.status == "absent"]
    assert [(r.label, r.index) for r in gone] == [(1, t) for t in dropped]
    assert all(r.reason == "beyond label 2, which it lies against" for r in gone)


def test_a_rerun_is_judged_against_the_labels_as_they_were_before_the_trim():
    """Session.untrimmed_labels: the voxels assembly.drop_thin_ends took off (VolumeResult.trimmed)
    are put back into the labels an Update's walks are judged against (walk.keep_reach), on the
    slicing axis of the last run, without overwriting a voxel another label holds; the rim
    assembly.grow_edges gave (VolumeResult.grown) is taken off."""
    from synpo.assembly import drop_thin_ends
    from synpo.result import SliceRecord, VolumeResult
    from synpo.session import Session
    from synpo.support import Support, from_slices
    stack = np.zeros((4, 6, 6), np.uint8)                     # slices first: label 1 on slices 0-3
    stack[:3, 1:5, 1:5] = 1
    stack[3, 1, 1:3] = 1                                      # a 2-voxel last slice
    stack[3, 2, 2] = 2                                        # another label's voxel beside it
    records = [SliceRecord(1, t, "present") for t in range(4)]
    trimmed = drop_thin_ends(stack, records, [1, 2], {1: [1], 2: [3]}, 0.25)
    assert list(trimmed) == [1] and list(trimmed[1]) == [3] and int(trimmed[1][3].sum()) == 2
    assert not (stack[3] == 1).any() and records[3].status == "absent"
    stack[3, 1, 1] = 2                                        # (a voxel another label holds is never overwritten)
    session = Session.__new__(Session)
    axis = 2                                                  # the run sliced along the last array axis
    session.result = VolumeResult(from_slices(stack, axis).copy(), {}, records, Support(axis, [1, 2], {1: [1], 2: [3]}),
                                  "mr", ["sam"], {}, [], trimmed)
    before = np.moveaxis(session.untrimmed_labels(), axis, 0)
    assert before[3, 1, 2] == 1 and before[3, 1, 1] == 2 and before[3, 2, 2] == 2
    assert np.array_equal(before[:3], stack[:3]) and (before[3] != 0).sum() == 3
    assert (session.result.labels != 0).sum() == (stack != 0).sum()   # the result itself is not changed
    session.result.trimmed = {}
    assert session.untrimmed_labels() is session.result.labels
    rim = np.zeros((6, 6), bool)
    rim[0, 1:5] = True                                        # a rim assembly.grow_edges gave label 1 on slice 0
    grown_stack = stack.copy()
    grown_stack[0][rim] = 1
    session.result = VolumeResult(from_slices(grown_stack, axis).copy(), {}, records,
                                  Support(axis, [1, 2], {1: [1], 2: [3]}), "mr", ["sam"], {}, [], trimmed, {0: rim})
    before = np.moveaxis(session.untrimmed_labels(), axis, 0)   # the rim off, the trim put back
    assert not before[0][rim].any() and np.array_equal(before[0], stack[0]) and before[3, 1, 2] == 1


def test_a_corrections_held_ends_stay_held_in_later_rounds_until_paint_lies_past_them():
    """volume.correction_holds_persist: the ends held for a correction in the round it was painted
    stay held when later rounds run (no longer a new support), but an end the user painted the
    label on or beyond is let go."""
    from synpo.result import SliceRecord, VolumeResult
    from synpo.session import Session
    from synpo.support import Support
    session = Session.__new__(Session)
    session.support_image = None
    records = [SliceRecord(1, t, "present") for t in range(4, 10)]
    labels = np.zeros((14, 8, 8), np.uint8)
    labels[4:10, 2:5, 2:5] = 1
    session.result = VolumeResult(labels, {}, records, Support(0, [1], {1: [6, 8]}), "mr", ["sam"], {})
    session.held = {1: {8: [3, 10]}}                         # held when slice 8 was painted, a round ago
    merged = np.zeros((14, 8, 8), np.int32)
    merged[6, 2:5, 2:5] = 1
    merged[8, 2:5, 2:5] = 1
    hold = {"correction_holds_ends": True, "correction_trust_iou": 0.0}
    on = SynPoConfig().with_(volume=dict(hold, correction_holds_persist=True))
    assert session.held_ends(merged, 0, on) == {1: {8: [3, 10]}}
    once = SynPoConfig().with_(volume=dict(hold, correction_holds_persist=False))
    assert session.held_ends(merged, 0, once) == {}          # only the round it was painted
    merged[11, 2:5, 2:5] = 1                                 # painted past the upper end: that end goes
    assert session.held_ends(merged, 0, on) == {1: {8: [3]}}
    merged[8] = 0                                            # its paint gone: nothing held for it
    assert session.held_ends(merged, 0, on) == {}


@pytest.mark.parametrize("collision, others_at, expected, last", [
    (0.0, (10, 30), [2, 3, 4], (5, "absent", "previous end kept")),               # a hard end
    (0.3, (10, 30), [2, 3, 4, 5], (6, "absent", "past the previous end onto label 2")),
    (0.3, (32, 40), [2, 3, 4, 5, 6, 7], None),                                   # beside label 2: goes on
])
def test_a_held_end_made_soft_lets_a_correction_extend_the_organ_but_not_onto_another_label(
        collision, others_at, expected, last):
    """volume.correction_collision: past a held end a correction's walk goes on while its masks stay
    off the other labels' voxels of the previous run."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:, 10:30, 10:30] = 0.9                              # the target on every slice
    others = np.zeros((8, 40, 40), np.uint8)
    others[6:, others_at[0]:others_at[1], 10:30] = 2         # label 2 in the previous run, from slice 6 on
    others[1:5, 10:30, 10:30] = 1                            # the label's own previous masks
    cfg = SynPoConfig().with_(volume={"correction_collision": collision})
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=(5,), others=others)
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    if last is not None:
        assert [(r.index, r.status, r.reason) for r in records if r.index == last[0]] == [last]


def test_the_search_region_widens_while_the_walk_grows():
    """volume.search_growing_slices: the next slice's search region (the previous mask's box grown
    by search_margin, at least search_min_px) takes at least this many slice distances (in plane)
    while the walk's masks grow, so a target growing by more than search_min_px a side is not cut at
    the box; the first step (no trend yet) and a shrinking step keep the ordinary margin."""
    from synpo.volume import _Context, _walk
    got = {}
    for margin in (0.0, 1.6):                                # x 5 mm slices / 1 mm pixels: 8 px
        conf = np.zeros((6, 60, 60), np.float32)
        for t, n in {1: 16, 2: 20, 3: 28, 4: 36, 5: 30}.items():      # grows 8 px a side, then shrinks
            conf[t, 10:10 + n, 10:10 + n] = 0.9
        cfg = SynPoConfig().with_(volume={"search_growing_slices": margin})
        store = _Store(Frame.fit(60, 60, (1.0, 1.0), 60))
        store.ensure(range(6))
        ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None,
                       slice_mm=5.0)
        assert ctx.search_min_px([(10, 0.9), (20, 0.9)]) == (8 if margin else 4)
        assert ctx.search_min_px([(20, 0.9), (10, 0.9)]) == ctx.search_min_px([(20, 0.9)]) == 4
        assert ctx.search_min_px([(20, 0.9), (19, 0.9)]) == (8 if margin else 4)   # holding counts (0.9)
        masks, records = {}, []
        _walk(ctx, 1, 1, conf[1] > 0.5, 6, +1, 10.0, masks, records)
        got[margin] = (masks, conf)
    (off, conf), (on, _) = got[0.0], got[1.6]
    assert (off[2] == on[2]).all()                           # the first step: no trend, the same region
    for t in (3, 4):                                         # growing: cut at 4 px, whole at 8
        assert not off[t][conf[t] > 0.5].all() and on[t][conf[t] > 0.5].all()
    assert on[5].sum() < on[4].sum()                         # shrinking again: the walk follows it


@pytest.mark.parametrize("growth, expected, last", [
    (0.0, [2, 3, 4, 5, 6, 7], None),                                           # off: it goes on
    (1.0, [2, 3, 4, 5], (6, "absent", "past the previous end, growing (area 1.49 of the previous slice's)")),
    (1.5, [2, 3, 4, 5, 6, 7], None),                                           # 1.49 and 1.29: under the limit
])
def test_past_a_held_end_a_correction_walk_ends_where_its_mask_grows(growth, expected, last):
    """volume.correction_past_end_growth: past the previous run's end an organ tapers; a correction's
    mask that grows beyond `growth` x the previous slice's there ends the walk (before the held end,
    slices 2-4, the same growth is let through)."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 60, 60), np.float32)
    sides = {1: 16, 2: 16, 3: 20, 4: 20, 5: 16, 6: 20, 7: 23}  # grows at 3 (before the end) and at 6, 7
    for t, n in sides.items():
        conf[t, 10:10 + n, 10:10 + n] = 0.9
    cfg = SynPoConfig().with_(volume={"correction_past_end_growth": growth, "sudden_area_change": 0.0})
    store = _Store(Frame.fit(60, 60, (1.0, 1.0), 60))
    store.ensure(range(8))
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=(5,), others=np.zeros((8, 60, 60), np.uint8))
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    if last is not None:
        assert [(r.index, r.status, r.reason) for r in records if r.index == last[0]] == [last]


@pytest.mark.parametrize("strict, held, expected", [
    (True, (2,), [], ),                  # the paint was the previous end: ordinary limits, the drop ends it
    (False, (2,), [2, 3, 4, 5]),         # the first step's looser limits let it on
    (True, (), [2, 3, 4, 5]),            # no held end: the first step is a first step
])
def test_past_a_held_end_the_first_step_from_the_paint_gets_the_ordinary_limits(strict, held, expected):
    """volume.correction_strict_past_end: a correction painted on the organ's previous last slice
    walks on past it only if the step passes the ordinary stop rules."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((6, 40, 40), np.float32)
    conf[1, 10:30, 10:30] = 0.9                              # the painted slice
    conf[2:, 10:30, 10:30] = 0.55                            # ratio 0.61: above the first step's 0.5, below 0.7
    cfg = SynPoConfig().with_(volume={"correction_strict_past_end": strict})
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(6))
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=held, others=np.zeros((6, 40, 40), np.uint8))
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 6, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    if not expected:
        assert (records[0].index, records[0].status, records[0].reason) == (2, "absent", "confidence drop")


@pytest.mark.parametrize("hard, expected", [((2,), []), ((), [2, 3, 4, 5])])
def test_a_held_end_next_to_the_paint_can_stay_hard(hard, expected):
    """volume.correction_hard_next: a correction on the organ's previous last slice keeps the end
    next to it hard, though held ends are soft (correction_collision > 0)."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((6, 40, 40), np.float32)
    conf[:, 10:30, 10:30] = 0.9
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(6))
    ctx = _Context(_BoxFiller(), store, conf, SynPoConfig(), {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, held=(2,), others=np.zeros((6, 40, 40), np.uint8), hard_held=hard)
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 6, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    if not expected:
        assert (records[0].index, records[0].status, records[0].reason) == (2, "absent", "previous end kept")


@pytest.mark.parametrize("case, reach, expected", [
    ("ends", True, [2, 3, 4, 5]),           # judged absent on 4 where the previous run went on to 5
    ("ends", False, [2, 3]),
    ("onto", True, [2, 3, 4, 5]),           # on 4 the mask lies half on label 2's previous voxels
    ("onto", False, [2, 3, 4, 5, 6, 7]),
    ("marked", True, [2, 3, 4]),            # ... but never past a slice the user marked absent (5)
])
def test_a_rerun_walk_towards_the_end_keeps_the_previous_reach(case, reach, expected):
    """volume.correction_keeps_reach (walk.keep_reach): a re-run's walk towards the volume's end that
    ends, or runs onto another label's previous voxels, where the previous run still found the
    label keeps the previous masks from there to the previous end."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:8 if case == "onto" else 4, 10:30, 10:30] = 0.9
    previous = np.zeros((8, 40, 40), np.uint8)
    previous[1:4, 10:30, 10:30] = 1
    previous[4:6, 10:20, 10:30] = 1                          # the previous reach: slices 4-5, the upper half
    if case == "onto":
        previous[4:, 20:30, 10:30] = 2                       # label 2 beside it from slice 4 on
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    ctx = _Context(_BoxFiller(), store, conf, SynPoConfig(), {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, absent=(5,) if case == "marked" else (), reach=previous if reach else None)
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(masks) == expected
    assert sorted(r.index for r in records) == list(range(2, 8))          # every slice once
    if case == "marked":
        assert [(r.index, r.status, r.reason) for r in records if r.index >= 4] == [
            (4, "present", "previous kept (confidence drop)"), (5, "absent", "marked absent"), (6, "not reached", ""),
            (7, "not reached", "")]
    elif reach:
        for t in (4, 5):
            assert np.array_equal(masks[t], previous[t] == 1)
        kept = [(r.index, r.status, r.reason) for r in records if r.index in (4, 5, 6)]
        assert kept[0][:2] == (4, "present") and kept[0][2].startswith("previous kept (")
        assert kept[0][2] == ("previous kept (onto label 2)" if case == "onto" else kept[0][2])
        assert kept[1:] == [(5, "present", "previous kept"), (6, "not reached", "")]


@pytest.mark.parametrize("case, grow, stride", [("end", 0.0, 1), ("end", 2.0, 1), ("end", 2.0, 2), ("under", 2.0, 1)])
def test_a_rerun_walk_past_a_paint_does_not_outgrow_the_previous_masks(case, grow, stride):
    """volume.correction_outgrows_previous (walk.keep_reach): a re-run's walk from a paint towards
    the volume's end whose mask on a slice is over that many times the previous run's mask of the
    label there, times what the paint outgrew the previous mask on its own slice, keeps the previous
    masks from that slice to the previous end (a ventricle painted on its last slice: the paint's
    size walked on past the valve plane). Off (0), the walk goes on; and it goes on where the
    previous run was as small on the paint's slice ("under": an organ it under-segmented throughout).
    A walk that jumps `stride` slices at a time (thin slices) steps slice by slice where a jump's
    mask would be kept back, so the same slices are kept."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:6, 10:30, 10:30] = 0.9                             # a 20 x 20 look-alike on slices 0-5
    previous = np.zeros((8, 40, 40), np.uint8)
    previous[1:3, 10:30, 10:30] = 1 if case == "end" else 0
    previous[1:6, 15:25, 15:25] = 1                          # the previous run: 10 x 10 on slices 3-5
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    cfg = SynPoConfig().with_(volume={"correction_outgrows_previous": grow})
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None,
                   lambda k=1: None, reach=previous, stride=stride)
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)       # the paint: 20 x 20 on slice 1
    assert sorted(masks) == [2, 3, 4, 5]
    assert sorted(r.index for r in records) == list(range(2, 8))          # every slice once
    reasons = {r.index: r.reason for r in records}
    if case == "end" and grow:
        assert masks[2].sum() >= 400                                      # as large as before: decoded
        assert all(np.array_equal(masks[t], previous[t] == 1) for t in (3, 4, 5))
        assert reasons[3] == "previous kept (%.2f x the previous mask, the paint 1.00 x)" % (masks[2].sum() / 100.0)
        assert reasons[4] == "previous kept"
    else:
        assert all(masks[t].sum() >= 400 for t in (2, 3, 4, 5)) and not reasons[3]


def test_a_gap_slice_goes_to_the_walk_closer_to_the_shape_between_the_two_paints():
    """ownership.choose_by_paint (volume.gap_choice "paint_shape"): between supports 0 and 6 each
    slice goes to the walk whose mask overlaps the shape interpolated between the paints more; a
    slice only one walk found goes to it; on a tie, to the nearer support."""
    from synpo.ownership import choose_by_paint
    box = lambda a, b: np.pad(np.ones((b - a, 4), bool), ((a, 12 - b), (0, 0)))   # noqa: E731
    paint, off = box(2, 8), box(0, 3)                          # the same paint on both supports
    up = {1: paint, 2: paint, 3: off, 4: paint, 5: off}        # s1's walk, off the organ on 3 and 5
    down = {1: off, 2: off, 3: paint, 4: off, 5: paint}        # s2's walk, off it on 1, 2 and 4
    assert choose_by_paint(0, 6, up, down, paint, paint) == {1: 0, 2: 0, 3: 6, 4: 0, 5: 6}
    assert choose_by_paint(0, 6, up, up, paint, paint) == {1: 0, 2: 0, 3: 0, 4: 6, 5: 6}   # ties: the nearer
    assert choose_by_paint(0, 6, {1: paint}, {4: paint}, paint, paint) == {1: 0, 2: 0, 3: 0, 4: 6, 5: 6}


def test_a_gap_slice_gets_what_the_other_walk_and_the_shape_between_the_paints_agree_on(monkeypatch):
    """ownership.add_agreed (volume.gap_choice "split_and_shape"): between supports 0 and 6 the walks
    hand over where they agree best (split_gap), and each slice's owner gets the pixels that the
    other support's walk and the shape interpolated between the two paints both hold; a pixel only
    one of them holds is not added, and nothing of the owner's mask is taken away. Through
    _propagate, with the walks replaced by fixed masks: the masks, owners and records' reasons."""
    from synpo import ownership
    from synpo.result import SliceRecord
    rows = lambda a, b: np.pad(np.ones((b - a, 12), bool), ((a, 12 - b), (0, 0)))   # noqa: E731
    paint, short = rows(2, 10), rows(2, 6)                     # both paints rows 2-9; a mask that lost 6-9
    up = {1: paint, 2: paint, 3: paint, 4: paint, 5: short}    # support 0's walk
    down = {1: short, 2: short, 3: paint, 4: short, 5: short}  # support 6's walk
    assert ownership.split_gap(0, 6, up, down) == 3            # they agree on 3 and 5; 3 is the middle
    gap = {1: 0, 2: 0, 3: 0, 4: 6, 5: 6}
    added = ownership.add_agreed(0, 6, up, down, paint, paint, gap)
    assert list(added) == [4] and np.array_equal(added[4][0], paint) and added[4][1] == 48
    assert ownership.add_agreed(0, 6, up, down, short, short, gap) == {}       # rows 6-9 not in the shape
    assert ownership.add_agreed(0, 6, up, down, paint, paint, {t: 0 for t in gap}) == {}   # up holds all

    def fake_walk(ctx, label, s, start, stop, step, min_area, into_masks, into_records, painted):
        for t in range(s + step, stop, step):
            into_masks[t] = (up if s == 0 else down)[t]
            into_records.append(SliceRecord(label, t, "present"))

    class Ctx:
        spacing_rc = (1.0, 1.0)
    monkeypatch.setattr(ownership, "_walk", fake_walk)
    note = "48 px added where the other support's walk and the shape between the paints agree"
    for choice, slice_4, reason_4 in (("split", short, ""), ("split_and_shape", paint, note)):
        records = []
        masks, owner = ownership._propagate(Ctx(), 1, 7, {0: paint, 6: paint}, 1.0, records,
                                            ownership="agreement", gap_choice=choice)
        assert [owner[t] for t in range(1, 6)] == [0, 0, 0, 6, 6]
        assert all(np.array_equal(masks[t], paint) for t in (1, 2, 3)) and np.array_equal(masks[5], short)
        assert np.array_equal(masks[4], slice_4)
        assert {r.index: r.reason for r in records} == {1: "", 2: "", 3: "", 4: reason_4, 5: ""}


def test_a_gap_slice_goes_to_the_larger_of_the_two_walks_masks(monkeypatch):
    """ownership.prefer_larger (volume.gap_larger_wins): between a support painted where the organ is
    small (0) and one where it is large (6), the walk up from the small paint lags behind an organ that
    widens (each step may grow only by the search margin); the walks agree best on slice 5, so the
    split hands the whole gap to the lagging walk. With gap_larger_wins each slice both walks found
    goes to the larger mask, and its record says so; a tie stays with the split's owner. A walk that
    leaked over the whole slice is larger too: with volume.gap_larger_arrival it takes nothing, as
    its mask next to the small paint (slice 1) is far from the shape between the two paints there.
    Through _propagate, with the walks replaced by fixed masks."""
    from synpo import ownership
    from synpo.result import SliceRecord
    rows = lambda a, b: np.pad(np.ones((b - a, 12), bool), ((a, 20 - b), (0, 0)))   # noqa: E731
    organ = {0: rows(8, 10), 1: rows(6, 12), 2: rows(4, 14), 3: rows(2, 16), 4: rows(1, 18), 5: rows(0, 19),
             6: rows(0, 20)}
    up = {1: rows(7, 11), 2: rows(6, 12), 3: rows(5, 13), 4: rows(3, 16), 5: rows(1, 18)}   # lagging
    down = {t: organ[t] for t in range(1, 6)}
    leak = {t: rows(0, 20) for t in range(1, 6)}
    assert ownership.split_gap(0, 6, up, down) == 5 and ownership.split_gap(0, 6, up, leak) == 5
    gap = {t: 0 for t in range(1, 6)}
    handed_all = {t: (int(organ[t].sum()), int(up[t].sum())) for t in range(1, 6)}
    assert ownership.prefer_larger(0, 6, up, down, gap) == ({t: 6 for t in gap}, handed_all)
    assert ownership.prefer_larger(0, 6, up, dict(up), gap) == (gap, {})          # a tie: the split's owner
    assert ownership.prefer_larger(0, 6, up, down, gap, organ[0], organ[6], arrival=0.3)[0] == {t: 6 for t in gap}
    assert ownership.prefer_larger(0, 6, up, leak, gap)[0] == {t: 6 for t in gap}
    assert ownership.prefer_larger(0, 6, up, leak, gap, organ[0], organ[6], arrival=0.3) == (gap, {})
    assert ownership.prefer_larger(5, 6, {}, {}, {}, organ[5], organ[6], arrival=0.3) == ({}, {})   # no gap

    class Ctx:
        spacing_rc = (1.0, 1.0)
    for walked_down, larger, arrival, owners in ((down, False, 0.0, [0] * 5), (down, True, 0.0, [6] * 5),
                                                 (down, True, 0.3, [6] * 5), (leak, True, 0.3, [0] * 5)):
        def fake_walk(ctx, label, s, start, stop, step, min_area, into_masks, into_records, painted):
            walked = up if s == 0 else walked_down
            for t in range(s + step, stop, step):
                into_masks[t] = walked[t]
                into_records.append(SliceRecord(label, t, "present"))
        monkeypatch.setattr(ownership, "_walk", fake_walk)
        records = []
        masks, owner = ownership._propagate(Ctx(), 1, 7, {0: organ[0], 6: organ[6]}, 1.0, records,
                                            ownership="agreement", gap_choice="split", larger_wins=larger,
                                            larger_arrival=arrival)
        assert [owner[t] for t in range(1, 6)] == owners
        reasons = {r.index: r.reason for r in records}
        assert sorted(reasons) == [1, 2, 3, 4, 5]                 # one record a slice, the owner's
        if owners[0] == 6:
            assert all(np.array_equal(masks[t], organ[t]) for t in range(1, 6))
            assert reasons == {t: ownership.LARGER % handed_all[t] for t in range(1, 6)}
        else:
            assert all(np.array_equal(masks[t], up[t]) for t in range(1, 6)) and not any(reasons.values())


def test_a_walk_between_two_supports_uses_both_supports_maps_by_distance():
    """ownership.GapConfidence (volume.gap_confidence): between supports 2 and 6, slice 3 gets 3/4 of
    support 2's map and 1/4 of support 6's ("blend") or support 2's alone ("nearest"); on and beyond
    the supports, each support's own map."""
    from synpo.ownership import GapConfidence

    class Maps:                                                # a support's maps: its index everywhere
        def __init__(self, s):
            self.s, self.asked = s, []

        def prepare(self, indices):
            self.asked += list(indices)

        def __getitem__(self, t):
            return np.full((2, 2), float(self.s), np.float32)
    confs = {2: Maps(2), 6: Maps(6)}
    blend = GapConfidence(confs, "blend")
    assert blend[3][0, 0] == 0.75 * 2 + 0.25 * 6 and blend[4][0, 0] == 4.0
    assert blend[0][0, 0] == 2.0 and blend[2][0, 0] == 2.0 and blend[6][0, 0] == 6.0 and blend[9][0, 0] == 6.0
    nearest = GapConfidence(confs, "nearest")
    assert [nearest[t][0, 0] for t in range(1, 9)] == [2, 2, 2, 2, 6, 6, 6, 6]
    blend.prepare([1, 3, 7])                                   # each support computes the slices it weighs
    assert confs[2].asked == [1, 3] and confs[6].asked == [3, 7]


@pytest.mark.parametrize("tolerance, expected", [(0.0, [1]), (2.0, [1, 2, 3, 4, 5])])
def test_the_overlap_rule_measures_a_small_structures_move_in_mm(tolerance, expected):
    """A small structure moving 2 px (2 mm) a slice (a vein, an adrenal gland cut obliquely) leaves
    half of its own previous mask: the overlap rule ends its walk, unless the previous mask is grown
    by volume.overlap_tolerance_mm before the overlap is measured (the walk's drift left out: it
    follows such a move too, test_a_walk_follows_a_structure_that_moves_in_plane)."""
    n = 6
    conf = np.zeros((n, 40, 40), np.float32)
    for t in range(n):
        conf[t, 18:22, 8 + 2 * t:12 + 2 * t] = 0.9
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"overlap_tolerance_mm": tolerance,
                                                                "follow_drift": False}))
    assert sorted(masks) == expected
    if expected[-1] < n - 1:
        assert next(r for r in records if r.index == expected[-1] + 1).reason == "left the previous mask"


@pytest.mark.parametrize("retry, tapering, expected", [
    (0.0, False, [1, 2]),                 # off: the confident blob beside the vein ends the walk
    (0.01, False, [1, 2, 3, 4, 5]),       # decoded again in the previous mask's box: the vein goes on
    (0.01, True, [1, 2]),                 # a structure that was shrinking is not decoded again
])
def test_a_step_that_left_the_previous_mask_is_decoded_again_in_its_box(retry, tapering, expected):
    """A vein of constant size whose confidence dips just under prompts.box_threshold on slice 3,
    where a small confident blob sits beside it in the search region: the prompts' box is the
    blob's, the mask leaves the previous one and the walk ends ("left the previous mask"). With
    volume.left_retry the slice is decoded once more in the previous mask's box (widened by that
    fraction) and kept, since it passes every rule; not where the walk's masks were shrinking
    (volume.left_retry_holds: the last mask under that fraction of the one before it, an organ's
    end). (The stand-in SAM fills its box, so the widening is kept under a pixel here.)"""
    n = 6
    conf = np.zeros((n, 40, 40), np.float32)
    for t in range(n):
        rows = slice(16, 24) if not (tapering and t >= 2) else slice(18, 22)
        conf[t, rows, 10:18] = 0.49 if t == 3 else 0.65
    conf[3, 14:18, 19:22] = 0.9                                   # the blob beside the vein
    cfg = SynPoConfig().with_(volume={"left_retry": retry, "left_retry_holds": 0.8, "follow_drift": False})
    masks, records = _walk_up(conf, cfg)
    assert sorted(masks) == expected
    third = next(r for r in records if r.index == 3)
    if expected[-1] == 2:
        assert third.reason == "left the previous mask"
    else:
        assert third.status == "present" and third.reason.startswith("decoded again in the previous mask's box")
        assert np.array_equal(masks[3], conf[3] == np.float32(0.49))  # the vein, not the blob


def _moving_bar(n, step=5, width=8):
    """Confidence maps of a 4 x `width` bar moving `step` px a slice to the right (a vein or an
    adrenal gland cut obliquely): slice t holds it at columns 4 + step * t ..."""
    conf = np.zeros((n, 30, 60), np.float32)
    for t in range(n):
        conf[t, 12:16, 4 + step * t:4 + step * t + width] = 0.9
    return conf


@pytest.mark.parametrize("follow, expected", [(False, [1, 2, 3]), (True, [1, 2, 3, 4, 5, 6])])
def test_a_walk_follows_a_structure_that_moves_in_plane(follow, expected):
    """A small structure moving further than the search margin each slice: its masks are cut at the
    previous mask's search region, lag behind and leave the previous mask (the walk ends at slice 3).
    With volume.follow_drift the search region and the overlap rule also take the previous mask
    moved as the walk's last step moved it (walk.drift_of): the walk follows the bar to the volume's
    end with whole masks."""
    n = 7
    conf = _moving_bar(n)
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"follow_drift": follow}))
    assert sorted(masks) == expected
    if follow:
        assert all(np.array_equal(masks[t], conf[t] > 0.5) for t in range(2, n))
    else:
        assert masks[3].sum() < (conf[3] > 0.5).sum()                   # cut at the search region
        assert next(r for r in records if r.index == 4).reason == "left the previous mask"


@pytest.mark.parametrize("follow", [False, True])
def test_a_thin_slice_walk_follows_the_drift_at_its_own_pace(follow):
    """A thin-slice walk decodes every third slice (walk._Context.stride, volume.walk_spacing_mm) and
    its drift is per jump: a bar moving 2 px a slice moves 6 px a jump, beyond the search margin.
    Without the drift the jumps' masks are cut at the search region and a failed jump falls back to
    single steps; with it every jump holds and decodes the whole bar from slice 6 on (a single step
    would take the drift's pace scaled to one slice: walk._walk's drift_to)."""
    from synpo.walk import _Context, _walk
    n = 13
    conf = _moving_bar(n, step=2)
    store = _Store(Frame.fit(30, 60, (1.0, 1.0), 60))
    store.ensure(range(n))
    cfg = SynPoConfig().with_(volume={"follow_drift": follow})
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None,
                   stride=3)
    masks, records = {}, []
    _walk(ctx, 1, 0, conf[0] > 0.5, n, +1, 10.0, masks, records)
    assert sorted(masks) == list(range(1, n))
    decoded = [r.index for r in records if r.status == "present"]
    whole = [t for t in range(5, n) if np.array_equal(masks[t], conf[t] > 0.5)]
    if follow:                                   # every jump holds: 4 decodes, the whole bar from slice 5
        assert decoded == [3, 6, 9, 12] and whole == list(range(5, n))
    else:                                        # a jump cut short, single steps, a cut mask on slice 9
        assert decoded == [3, 4, 5, 6, 9, 10, 11, 12] and 9 not in whole


@pytest.mark.parametrize("follow", [False, True])
def test_a_structure_in_pieces_is_followed_piece_by_piece(follow):
    """Two bars moving 5 px a slice: the neighbouring mask is in two pieces, decoded piece by piece
    (volume.piece_fraction), each piece's search region moved with the walk's drift too: followed
    whole to the end with the drift; without it the pieces' masks are cut and the walk ends."""
    n = 8
    conf = np.zeros((n, 40, 80), np.float32)
    for t in range(n):
        conf[t, 6:10, 4 + 5 * t:12 + 5 * t] = 0.9
        conf[t, 28:32, 4 + 5 * t:12 + 5 * t] = 0.9
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"follow_drift": follow}))
    if follow:
        assert sorted(masks) == list(range(1, n))
        assert all(np.array_equal(masks[t], conf[t] > 0.5) for t in range(2, n))
    else:
        assert sorted(masks) == [1, 2, 3]
        assert next(r for r in records if r.index == 4).reason == "left the previous mask"


def test_the_drift_threshold_is_on_the_move_to_the_slice_decoded():
    """walk.follows: a 10 x 10 mask (size 10) is followed from a move of 2 px to the slice decoded
    (0.2 of its size) on, whatever the slices between (a thin-slice walk's 3-slice jump moving 3 px
    is followed, a single step of 1 px is not), and never with volume.follow_drift off."""
    from synpo.walk import follows
    vc = SynPoConfig().volume
    prev = np.zeros((30, 30), bool)
    prev[5:15, 5:15] = True
    assert follows(vc, prev, (0.0, 2.0)) and follows(vc, prev, (0.0, 3.0))
    assert not follows(vc, prev, (1.0, 1.0)) and not follows(vc, prev, (0.0, 1.0))
    assert not follows(SynPoConfig().with_(volume={"follow_drift": False}).volume, prev, (0.0, 9.0))
    assert not follows(vc, prev, None)


def test_the_drift_is_the_last_steps_move_and_a_moved_mask_does_not_wrap():
    from synpo.walk import drift_of, shift_mask
    a = np.zeros((10, 10), bool)
    a[2:4, 2:4] = True
    b = np.roll(a, (3, -1), (0, 1))
    assert drift_of(a, b) == (3.0, -1.0)
    assert drift_of(None, b) is None and drift_of(a, np.zeros_like(a)) is None
    assert np.array_equal(shift_mask(a, (3, -1)), b)
    assert not shift_mask(a, (0, 9)).any() and shift_mask(a, (0, 7))[2:4, 9].all()
    assert shift_mask(a, (0, 7)).sum() == 2 and not shift_mask(a, (-12, 0)).any()


@pytest.mark.parametrize("follow", [False, True])
def test_a_structure_that_stops_moving_is_no_license_to_jump(follow):
    """The drift is the walk's own last move: a bar that moved and then holds still keeps its walk; a
    look-alike appearing off the bar's path beyond the tolerance still ends the walk, with the drift
    or without it."""
    n = 6
    conf = _moving_bar(n, step=3)
    conf[4] = 0.0
    conf[4, 20:24, 4:12] = 0.9                                           # off the path, 8 rows below
    cfg = SynPoConfig().with_(volume={"follow_drift": follow, "search_margin": 2.0})
    masks, records = _walk_up(conf, cfg)
    assert sorted(masks) == [1, 2, 3]
    assert next(r for r in records if r.index == 4).reason == "left the previous mask"


@pytest.mark.parametrize("tolerance", [0.0, 2.0])
def test_a_jump_onto_a_look_alike_beyond_the_tolerance_still_ends_the_walk(tolerance):
    n = 6
    conf = np.zeros((n, 40, 40), np.float32)
    conf[:, 5:20, 5:20] = 0.9
    conf[3] = 0.0
    conf[3, 22:37, 22:37] = 0.9                                         # the look-alike, 3 px away: beyond 2 mm
    cfg = SynPoConfig().with_(volume={"search_margin": 2.0, "overlap_tolerance_mm": tolerance})
    masks, records = _walk_up(conf, cfg)
    assert sorted(masks) == [1, 2]
    assert next(r for r in records if r.index == 3).reason == "left the previous mask"


def _squares(sizes, levels, n=None):
    """Confidence maps of a square target centred on (20, 20): slice t holds a sizes[t]-pixel square
    at confidence levels[t] (size 0: nothing)."""
    n = n or len(sizes)
    conf = np.zeros((n, 40, 40), np.float32)
    for t, (size, level) in enumerate(zip(sizes, levels)):
        a = 20 - size // 2
        conf[t, a:a + size, a:a + size] = level
    return conf


@pytest.mark.parametrize("sizes, levels, sudden, expected", [
    # A ventricle ends at the valve plane: its full-size masks end on slice 4, where the walk finds a
    # small look-alike (the atrium's edge) at 0.81 of its confidence: no single rule stops it.
    ((20, 20, 20, 20, 8, 8), (0.9, 0.9, 0.9, 0.9, 0.6, 0.6), 0.0, [1, 2, 3, 4, 5]),
    ((20, 20, 20, 20, 8, 8), (0.9, 0.9, 0.9, 0.9, 0.6, 0.6), 0.5, [1, 2, 3]),
    # A taper shrinks as much on one step, but after steps that shrank too: the walk goes on to its tip.
    ((20, 20, 16, 12, 6, 4), (0.9, 0.9, 0.9, 0.9, 0.75, 0.75), 0.5, [1, 2, 3, 4, 5]),
    # The same sudden shrink with the confidence held (an organ's own narrow end): the walk goes on.
    ((20, 20, 20, 20, 8, 8), (0.9, 0.9, 0.9, 0.9, 0.9, 0.9), 0.5, [1, 2, 3, 4, 5]),
])
def test_a_walk_whose_organ_ends_abruptly_stops_at_the_sudden_shrink(sizes, levels, sudden, expected):
    """volume.sudden_area_change: a shrink under the limit right after a step that held its size,
    with the confidence falling, ends the walk; a taper (shrinking step after step) does not."""
    masks, records = _walk_up(_squares(sizes, levels), SynPoConfig().with_(volume={"sudden_area_change": sudden}))
    assert sorted(masks) == expected
    if expected == [1, 2, 3]:
        end = next(r for r in records if r.index == 4)
        assert end.status == "absent" and end.reason == \
            "ended abruptly (area 0.13 of the previous slice's after 1.00; confidence 0.81)"


@pytest.mark.parametrize("levels, falling, expected", [
    # The walk slides onto a similar neighbour whose confidence fades slice by slice: each step
    # passes the confidence-drop limit (0.7 of its neighbour), the trend does not.
    ((0.95, 0.95, 0.84, 0.74, 0.65, 0.57), 0.0, [1, 2, 3, 4, 5]),
    ((0.95, 0.95, 0.84, 0.74, 0.65, 0.57), 0.9, [1, 2]),
    # One lower slice inside the organ (its confidence back on the next) is no trend.
    ((0.95, 0.95, 0.84, 0.84, 0.95, 0.95), 0.9, [1, 2, 3, 4, 5]),
    # An abrupt end stays where it is.
    ((0.95, 0.95, 0.95, 0.0, 0.0, 0.0), 0.9, [1, 2]),
])
def test_a_walk_whose_confidence_keeps_falling_ends_where_the_trend_is_clear(levels, falling, expected):
    """volume.falling_ratio: the confidence fell on each of the last falling_steps (2) steps."""
    masks, records = _walk_up(_squares((20,) * 6, levels), SynPoConfig().with_(volume={"falling_ratio": falling}))
    assert sorted(masks) == expected
    if expected == [1, 2] and levels[3] > 0:
        end = next(r for r in records if r.index == 3)
        assert end.status == "absent" and end.reason == "confidence falling (0.88, 0.88 over the last 2 slices)"


def test_the_trend_rules_leave_the_first_step_alone_and_read_the_walks_history():
    from synpo.config import VolumeConfig
    from synpo.walk_rules import Step, judge_step
    vc = VolumeConfig(falling_ratio=0.9, regrow_after=1.3, regrow_below=0.5, regrow_reference="paint")
    mask, prev = np.ones((4, 4), bool), np.ones((4, 4), bool)

    def step(first, area, score, history):
        return Step(1, 3, first, mask, area, prev, 1.0, score, history[-1][1], 0.9, 1.0, tuple(history))
    # falling: the paint's self-similarity (history[0]) is not one of the steps counted
    assert judge_step(step(False, 100, 0.72, [(100, 1.0), (100, 0.8)]), vc) == ""
    assert judge_step(step(False, 100, 0.64, [(100, 1.0), (100, 0.9), (100, 0.8)]), vc) == \
        "confidence falling (0.89, 0.80 over the last 2 slices)"
    assert judge_step(step(True, 100, 0.64, [(100, 1.0), (100, 0.9), (100, 0.8)]), vc) == ""   # next to the paint
    assert judge_step(step(False, 100, 0.75, [(100, 1.0), (100, 0.9), (100, 0.8)]), vc) == ""  # one fall only
    # regrow: the walk's smallest mask (not the paint) under half the paint's area, then 1.3 x it
    assert judge_step(step(False, 140, 0.8, [(300, 0.8), (200, 0.8), (100, 0.8)]), vc).startswith(
        "grew again after tapering (area 1.4")
    assert judge_step(step(False, 120, 0.8, [(300, 0.8), (200, 0.8), (100, 0.8)]), vc) == ""   # not 1.3 x
    assert judge_step(step(False, 140, 0.8, [(150, 0.8), (110, 0.8), (100, 0.8)]), vc) == ""   # never tapered
    # sudden: under 0.5 x the previous mask right after a step that held (> 0.8 x), confidence < 0.95 x
    sd = VolumeConfig(sudden_area_change=0.5)
    assert judge_step(step(False, 40, 0.8, [(300, 0.9), (100, 0.9), (95, 0.9)]), sd).startswith("ended abruptly")
    assert judge_step(step(False, 40, 0.8, [(300, 0.9), (150, 0.9), (95, 0.9)]), sd) == ""   # already shrinking
    assert judge_step(step(False, 40, 0.87, [(300, 0.9), (100, 0.9), (95, 0.9)]), sd) == ""  # confidence held
    assert judge_step(step(False, 50, 0.8, [(300, 0.9), (100, 0.9), (95, 0.9)]), sd) == ""   # 0.53 x: not under
    assert judge_step(step(False, 40, 0.8, [(100, 0.9), (95, 0.9)]), sd) == ""               # the paint's step


def test_regrowth_measured_from_the_widest_mask_and_only_for_a_large_organ():
    """volume.regrow_reference "peak": the walk's widest mask (paint included) is the reference, so an
    organ that grew past its paint and then tapered is caught growing again; regrow_min_cm2: only a
    walk whose paint covers that many square centimetres (pixel_mm2 from the volume's spacing)."""
    from synpo.config import VolumeConfig
    from synpo.walk_rules import Step, judge_step
    mask, prev = np.ones((4, 4), bool), np.ones((4, 4), bool)

    def step(area, history, pixel_mm2=1.0):
        return Step(1, 3, False, mask, area, prev, 1.0, 0.8, 0.8, 0.9, 1.0, tuple(history), pixel_mm2)
    # the paint 6000 px, the walk widens to 10000, tapers to 5000 (over half the paint), then 7000
    walk = [(6000, 0.8), (8000, 0.8), (10000, 0.8), (7500, 0.8), (5000, 0.8)]
    paint = VolumeConfig(regrow_after=1.3, regrow_below=0.8, regrow_reference="paint", regrow_min_cm2=0)
    peak = VolumeConfig(regrow_after=1.3, regrow_below=0.8, regrow_reference="peak", regrow_min_cm2=0)
    assert judge_step(step(7000, walk), paint) == ""          # 5000 is not under 0.8 x the paint's 6000
    assert judge_step(step(7000, walk), peak) == \
        "grew again after tapering (area 1.4 x the walk's smallest, 0.50 x its widest mask)"
    assert judge_step(step(6000, walk), peak) == ""           # 1.2 x the smallest: not over 1.3 x
    # the slices before the widest mask are not "after" it: a walk still growing is left alone
    assert judge_step(step(12000, walk[:3]), peak) == ""
    # the gate: 6000 px of 1 mm^2 is 60 cm^2; at 0.5 mm^2 a pixel the same walk is 30 cm^2
    gated = VolumeConfig(regrow_after=1.3, regrow_below=0.8, regrow_reference="peak", regrow_min_cm2=50)
    assert judge_step(step(7000, walk), gated).startswith("grew again after tapering")
    assert judge_step(step(7000, walk, pixel_mm2=0.5), gated) == ""
    with pytest.raises(SynPoError, match="regrow_reference"):
        validate(SynPoConfig().with_(volume={"regrow_reference": "widest"}))


@pytest.mark.parametrize("regrow, expected", [(0.0, [1, 2, 3, 4, 5]), (1.3, [1, 2, 3])])
def test_a_walk_that_grows_again_after_its_organ_tapered_has_reached_a_neighbour(regrow, expected):
    """volume.regrow_after: the organ tapers to a tip (slices 1-3); beyond it a touching neighbour of
    the same look grows again slice by slice, each mask mostly inside the previous one."""
    sizes = (20, 16, 12, 8, 10, 12, 14)
    masks, records = _walk_up(_squares(sizes, (0.9,) * 7), SynPoConfig().with_(volume={
        "regrow_after": regrow, "regrow_below": 0.5, "regrow_reference": "paint", "regrow_min_cm2": 0.0,
        "overlap_tolerance_mm": 0.0}))
    assert sorted(masks) == expected
    if regrow:
        end = next(r for r in records if r.index == 4)
        assert end.status == "absent" and end.reason.startswith("grew again after tapering (area 1.")


@pytest.mark.parametrize("reference, pixel_mm, expected", [
    ("paint", 1.0, [1, 2, 3, 4, 5, 6]),    # the taper never fell under 0.8 x the paint: not seen
    ("peak", 1.0, [1, 2, 3, 4]),           # under 0.8 x the widest mask, then 1.3 x: the neighbour
    ("peak", 0.5, [1, 2, 3, 4, 5, 6]),     # the same walk at half the pixel size: under 1 cm^2, left alone
])
def test_a_large_organ_that_widened_past_its_paint_stops_where_a_neighbour_grows(reference, pixel_mm, expected):
    """A liver painted below its widest slice: its walk widens (14 -> 20 px squares), tapers to its
    dome (16, 14) and, beyond, a touching neighbour of the same look (the heart) grows (17, 19).
    volume.regrow_reference "peak" measures the taper from the widest mask; regrow_min_cm2 keeps
    the rule to organs whose paint covers that many square centimetres (here 1.5: 196 px of 1 mm^2)."""
    cfg = SynPoConfig().with_(volume={"regrow_after": 1.3, "regrow_below": 0.8, "regrow_reference": reference,
                                      "regrow_min_cm2": 1.5})
    masks, records = _walk_up(_squares((14, 18, 20, 16, 14, 17, 19), (0.9,) * 7), cfg, (pixel_mm, pixel_mm))
    assert sorted(masks) == expected
    if expected[-1] == 4:
        end = next(r for r in records if r.index == 5)
        assert end.status == "absent" and end.reason == \
            "grew again after tapering (area 1.4 x the walk's smallest, 0.53 x its widest mask)"


@pytest.mark.parametrize("min_size, expected", [(0.0, [1, 2, 3, 4, 5]), (0.25, [1, 2, 3])])
def test_the_overlap_tolerance_is_not_given_past_a_tapering_end(min_size, expected):
    """volume.overlap_tolerance_min_size: the organ tapers (20, 16, 12, 8 px squares); on slice 4 a
    touching neighbour of the same look sits 4 px aside, half inside the last mask, all of it
    within 2 mm of it. Once the mask has shrunk under the fraction of the paint, the overlap is
    measured on the mask itself and the walk ends there."""
    conf = _squares((20, 16, 12, 8, 0, 0), (0.9,) * 6)
    conf[4:, 16:24, 20:28] = 0.9                                       # the neighbour, 4 px to the right
    cfg = SynPoConfig().with_(volume={"overlap_tolerance_mm": 2.0, "overlap_tolerance_min_size": min_size})
    masks, records = _walk_up(conf, cfg)
    assert sorted(masks) == expected
    if expected[-1] == 3:
        assert next(r for r in records if r.index == 4).reason == "left the previous mask"


@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_a_target_in_two_pieces_is_followed_piece_by_piece_until_they_grow_together(fraction):
    """volume.piece_fraction: a neighbouring mask in several pieces (each at least this fraction of
    the largest) is decoded piece by piece too, each with its own piece's search region, and the
    slice's mask is their union, unless the slice decoded as one (one box over the previous mask)
    holds what the pieces found and more: there the pieces have grown together. Off (0), the prompts
    keep the heavier confident component and the smaller piece is lost from the first step (a
    liver's left lobe beside the right lobe, BTCV image_0)."""
    from synpo.walk import pieces_of
    conf = np.zeros((6, 60, 60), np.float32)
    for t in range(6):
        conf[t, 10:30, 5:25] = 0.9                            # the large piece
    for t in (0, 1, 2):
        conf[t, 12:22, 40:48] = 0.9                           # the small piece, apart
    for t in (3, 4, 5):
        conf[t, 12:22, 25:48] = 0.9                           # ... grown into the large one
    masks, records = _walk_up(conf, SynPoConfig().with_(volume={"piece_fraction": fraction}))
    small = np.zeros((60, 60), bool)
    small[12:22, 40:48] = True
    if fraction:
        for t in (1, 2):                                      # both pieces (the refinement box's
            want = conf[t] > 0.5                              # margin adds a pixel), nothing between
            assert masks[t][want].all() and not masks[t][~ndimage.binary_dilation(want, np.ones((3, 3)))].any()
            assert len(records[t - 1].positive) > 3           # the prompts of both pieces
            assert records[t - 1].reason == "2 pieces of the previous mask, each decoded"
        # Slice 3: one box over both pieces finds them and the part between: decoded as one.
        assert records[2].reason == "2 pieces of the previous mask grown together: decoded as one"
        for t in (3, 4, 5):
            assert len(pieces_of(masks[t], fraction)) == 1 and masks[t][conf[t] > 0.5].all()
    else:
        assert not masks[1][small].any()                      # the small piece is gone from the first step
        assert all(r.reason == "" for r in records if r.status == "present")
    assert [len(p) for p in (pieces_of(conf[0] > 0.5, 0.05), pieces_of(conf[0] > 0.5, 0.5),
                             pieces_of(conf[0] > 0.5, 0.0))] == [2, 1, 1]
    with pytest.raises(SynPoError, match="piece_fraction"):
        validate(SynPoConfig().with_(volume={"piece_fraction": 1.5}))


def test_pieces_grown_together_only_where_the_whole_holds_them_and_more():
    """walk.grown_together: the slice decoded as one replaces the pieces' union only where it holds
    that union and more (a ventricle's two pieces at its base, one ventricle on the next slice); not
    where it kept one piece of them (a liver's lobe lost) or lies elsewhere."""
    from synpo.walk import grown_together
    a = np.zeros((20, 40), bool)
    a[5:15, 2:12] = True                                      # piece A's mask
    b = np.zeros((20, 40), bool)
    b[5:15, 28:34] = True                                     # piece B's mask
    union = a | b
    organ = np.zeros((20, 40), bool)
    organ[4:16, 1:35] = True                                  # one organ over both and between
    elsewhere = np.zeros((20, 40), bool)
    elsewhere[0:4, 0:40] = True
    assert grown_together(organ, union, 0.9)                  # holds the pieces and more
    assert not grown_together(a, union, 0.9)                  # one piece of them
    assert not grown_together(elsewhere, union, 0.9)          # another structure
    assert not grown_together(union.copy(), union, 0.9)       # the same: the pieces stand
    assert not grown_together(np.zeros_like(a), union, 0.9)
    with pytest.raises(SynPoError, match="piece_holds"):
        validate(SynPoConfig().with_(volume={"piece_holds": 0.0}))


@pytest.mark.parametrize("case", ["off", "on", "stride", "marked", "ring", "assembled", "overridden"])
def test_a_rerun_walk_that_agrees_with_the_previous_run_keeps_its_masks_beyond(case):
    """volume.correction_agree_iou (walk.keep_agreed): a re-run's walk whose accepted mask agrees
    with the previous run's mask of the label on that slice (IoU at or over the limit) ends there:
    the previous masks stand beyond it, as far as the previous run found the label and no mark stops
    it, undecoded (an Update recomputes only what the correction changes); a walk that jumps two
    slices at a time (thin slices) the same from the slice it jumped to. Not for a ring's filled
    shape or hole (agree None: their previous shapes are derived from the ring, not what their walks
    gave). The previous masks are the label's own walked masks: where the assembly gave a strip of
    them to label 2, the assembled labels alone do not agree ("assembled"), the walk's own masks
    (VolumeResult.overridden given back) do, and the strip is kept as the label's ("overridden")."""
    from synpo.volume import _Context, _walk
    conf = np.zeros((8, 40, 40), np.float32)
    conf[:, 10:30, 10:30] = 0.9                              # the stand-in SAM decodes rows / columns 9-30 here
    previous = np.zeros((8, 40, 40), np.uint8)
    previous[1:4, 9:31, 9:31] = 1                            # the previous run: the same square ...
    previous[4:7, 11:33, 9:31] = 1                           # ... then moved 2 rows (IoU 0.83), up to slice 6
    strip = np.zeros((40, 40), bool)
    strip[9:31, 25:31] = True
    if case in ("assembled", "overridden"):
        previous[2:4][:, strip] = 2                          # the assembly gave label 2 a strip of label 1's masks
    store = _Store(Frame.fit(40, 40, (1.0, 1.0), 40))
    store.ensure(range(8))
    cfg = SynPoConfig().with_(volume={"correction_agree_iou": 0.0 if case == "off" else 0.9})
    ctx = _Context(_BoxFiller(), store, conf, cfg, {"prompts": 0.0, "decode": 0.0}, None, lambda k=1: None,
                   absent=(5,) if case == "marked" else (), reach=previous,
                   agree=None if case == "ring" else {2: strip, 3: strip} if case == "overridden" else {},
                   stride=2 if case == "stride" else 1)
    masks, records = {}, []
    _walk(ctx, 1, 1, conf[1] > 0.5, 8, +1, 10.0, masks, records)
    assert sorted(r.index for r in records) == list(range(2, 8))          # every slice once
    got = {r.index: (r.status, r.reason) for r in records}
    square = np.zeros((40, 40), bool)
    square[9:31, 9:31] = True                                # what the stand-in decodes
    if case in ("off", "ring", "assembled"):
        assert all(np.array_equal(masks[t], square) for t in range(2, 8))
        assert not any("agreed" in r.reason for r in records) and all(r.reason == "" for r in records)
        return
    kept_from = 4 if case == "stride" else 3
    assert np.array_equal(masks[kept_from - 1], square) and 2 in masks       # decoded (2: interpolated, stride)
    assert [got[t] for t in range(2, kept_from)] == ([("interpolated", ""), ("present", "")] if case == "stride"
                                                     else [("present", "")])
    last = 4 if case == "marked" else 6
    for t in range(kept_from, last + 1):
        note = "previous kept (the walk agreed with it on slice %d)" % (kept_from - 1) if t == kept_from else ""
        own = (previous[t] == 1) | (strip if case == "overridden" and t == 3 else False)
        assert np.array_equal(masks[t], own) and got[t] == ("present", note or "previous kept")
    if case == "marked":
        assert got[5] == ("absent", "marked absent") and 5 not in masks and 6 not in masks
    assert got[7] == ("not reached", "") and 7 not in masks


def test_the_assembly_records_what_it_overrides_of_each_labels_walked_masks():
    """assembly.assemble -> VolumeResult.overridden: where two labels' walked masks overlap and the
    more confident label takes the voxels, the other label's lost voxels are kept per slice (an
    Update's walks compare with each label's own masks, walk.keep_agreed); the winner, and slices
    without a loss, hold nothing."""
    from types import SimpleNamespace
    from synpo.assembly import assemble
    from synpo.config import configured
    from synpo.support import Support
    n, H, W = 3, 30, 30
    image = np.full((n, H, W), 0.5, np.float32)
    paint = np.zeros((H, W), np.uint8)
    paint[2:12, 2:12] = 1
    paint[14:24, 2:12] = 2
    one, two = np.zeros((H, W), bool), np.zeros((H, W), bool)
    one[2:14, 2:12] = True                                    # label 1's walk reaches two rows into label 2's
    two[12:24, 2:12] = True
    run = SimpleNamespace(cfg=configured(["volume.edge_grow=false", "volume.tip_ratio=0"]), cross=False,
                          paint={0: paint}, support=Support(0, [1, 2], {1: [0], 2: [0]}), n=n, H=H, W=W,
                          previous_labels=None, ref=image, modality="mr", axis=0, timings={}, confidence_from=["sam"],
                          rings={}, ring_bands={})
    conf1, conf2 = np.full((n, H, W), 0.4, np.float32), np.full((n, H, W), 0.6, np.float32)
    result = assemble(run, [({1: one, 2: one.copy()}, conf1, [], {}, [1, 2]),
                            ({1: two, 2: two.copy()}, conf2, [], {}, [1, 2])])
    assert (result.labels[1] == 2).sum() == 120 and (result.labels[1] == 1).sum() == 100
    assert sorted(result.overridden) == [1] and sorted(result.overridden[1]) == [1, 2]
    lost = np.zeros((H, W), bool)
    lost[12:14, 2:12] = True
    assert all(np.array_equal(result.overridden[1][t], lost) for t in (1, 2))


def test_a_sessions_memory_counts_the_masks_its_result_keeps_for_the_next_update():
    """Session.memory_bytes (the server's eviction budget) counts the masks a result keeps for the
    next Update beside its labels: the trimmed tips, the grown rims and what the assembly overrode
    of each label's walked masks (VolumeResult.trimmed, grown, overridden), and the confidence maps
    kept in its stores."""
    from synpo.result import VolumeResult
    from synpo.session import Session
    from synpo.support import Support
    session = Session.__new__(Session)
    session.image, session.support, session.support_image, session.stores = np.zeros((4, 8, 8), np.float32), None, None, {}
    session.result = VolumeResult(np.zeros((4, 8, 8), np.uint8), {}, [], Support(0, [1], {1: [1]}), "mr", ["sam"], {})
    bare = session.memory_bytes()
    session.result.trimmed = {1: {3: np.zeros((8, 8), bool)}}
    session.result.grown = {2: np.zeros((8, 8), bool)}
    session.result.overridden = {1: {0: np.zeros((8, 8), bool), 2: np.zeros((8, 8), bool)}}
    assert session.memory_bytes() == bare + 4 * 64
    # The confidence maps a session keeps in its stores for the next run count too (they counted 0).
    from synpo.slice_confidence import SliceConfidence
    conf = SliceConfidence.__new__(SliceConfidence)
    conf.maps = {0: np.zeros((8, 8), np.float32), 3: np.zeros((8, 8), np.float32)}
    session.stores["confidence/x"] = conf
    assert session.memory_bytes() == bare + 4 * 64 + 2 * 256
