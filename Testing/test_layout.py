"""A slice's in-plane layout (synpo/layout.py): a volume stored with its slices' in-plane axes swapped
is segmented as the same volume stored as viewers draw it, when its direction is known."""
import numpy as np
import pytest

from conftest import ellipsoid_volume
from synpo import features
from synpo.errors import InputError
from synpo.layout import (columns_reversed, display_orientation, in_plane_layout, in_plane_swap, known_direction,
                          rows_reversed, swap_spacing)
from test_models import served_tiny_sam  # noqa: F401  (the fixture: the tiny SAM registered)

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)          # DICOM's axial layout: row 0 anterior, column 0 the right
# The same physical volume stored with i and j exchanged: direction columns i and j swapped.
SWAPPED_IJ = (0, 1, 0, 1, 0, 0, 0, 0, 1)
# The development volumes' layout (CHAOS's direction: row 0 posterior, column 0 the patient's right), and
# the same stored with i and j exchanged.
DRAWN = (1, 0, 0, 0, -1, 0, 0, 0, 1)
DRAWN_SWAPPED = (0, 1, 0, -1, 0, 0, 0, 0, 1)
RAS_STORED = (-1, 0, 0, 0, -1, 0, 0, 0, 1)      # a NIfTI stored RAS (the bundled CT): column 0 the left


def test_which_slices_are_stored_transposed():
    # An axial volume stored as DICOM is (rows along j: posterior, columns along i: left): as drawn.
    assert in_plane_swap(IDENTITY, 0) is None
    assert in_plane_swap((-1, 0, 0, 0, -1, 0, 0, 0, 1), 0) is None        # RAS-stored: flipped, not transposed
    assert in_plane_swap(SWAPPED_IJ, 0) == (1, 2)
    # Its coronal and sagittal slices: rows along k (superior-inferior, drawn vertically) in both.
    assert in_plane_swap(IDENTITY, 1) is None and in_plane_swap(IDENTITY, 2) is None
    # A volume acquired sagittally (k along x), rows along z: its sagittal slices as drawn; another
    # with rows along y has them transposed (drawn with superior up, anterior on the left).
    sagittal_rows_z = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)      # columns: i = y, j = -z, k = x
    assert in_plane_swap(sagittal_rows_z.ravel(), 0) is None
    sagittal_rows_y = sagittal_rows_z[:, [1, 0, 2]]
    assert in_plane_swap(sagittal_rows_y.ravel(), 0) == (1, 2)
    assert in_plane_swap(None, 0) is None
    # Turned 25 degrees in plane: still clearly transposed; 40 degrees: no clear up, as stored.
    def turned(deg):
        a = np.deg2rad(deg)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
        return (rot @ np.reshape(SWAPPED_IJ, (3, 3))).ravel()
    assert in_plane_swap(turned(25), 0) == (1, 2) and in_plane_swap(turned(40), 0) is None
    # The development volumes' own directions (docs/research.md): none is transposed across k.
    cmr = (0.628, 0.507, -0.591, 0.729, -0.116, 0.675, -0.273, 0.854, 0.442)
    assert display_orientation(cmr, 0)[0] is False
    # An oblique cardiac volume (cmr_bssfp's image_2): no slices of it are turned, whatever the axis.
    cmr2 = (0.68, 0.16, -0.71, 0.73, -0.1, 0.67, -0.04, 0.98, 0.19)
    assert display_orientation(cmr2, 1)[0] and display_orientation(cmr2, 2)[0]
    assert [in_plane_swap(cmr2, a) for a in range(3)] == [None, None, None]
    assert swap_spacing((0.5, 0.7, 3.0), (1, 2)) == (0.7, 0.5, 3.0)
    assert swap_spacing((0.5, 0.7, 3.0), (0, 2)) == (3.0, 0.7, 0.5)
    assert swap_spacing((0.5, 0.7, 3.0), (0, 1)) == (0.5, 3.0, 0.7)


def _same_results(a, b):
    assert np.array_equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
    assert set(a.confidence) == set(b.confidence)
    for v in a.confidence:
        assert np.array_equal(a.confidence[v], b.confidence[v])
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    for name in ("trimmed", "overridden"):
        x, y = getattr(a, name), getattr(b, name)
        assert {v: sorted(d) for v, d in x.items()} == {v: sorted(d) for v, d in y.items()}
        assert all(np.array_equal(x[v][t], y[v][t]) for v in x for t in x[v])
    assert sorted(a.grown) == sorted(b.grown) and all(np.array_equal(a.grown[t], b.grown[t]) for t in a.grown)
    assert a.support == b.support and a.computed == b.computed


# The same volume stored other ways: (name, the array stored, its spacing, its direction, transposed?,
# rows reversed?, columns reversed?). Each direction places the same voxels where DRAWN places them.
STORED = [
    ("transposed", lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2)), (1.1, 0.8, 3.0), DRAWN_SWAPPED,
     True, False, False),
    ("upside down (DICOM's layout)", lambda a: np.ascontiguousarray(a[:, ::-1]), (0.8, 1.1, 3.0), IDENTITY,
     False, True, False),
    ("transposed and upside down", lambda a: np.ascontiguousarray(np.swapaxes(a[:, ::-1], 1, 2)), (1.1, 0.8, 3.0),
     SWAPPED_IJ, True, True, False),
    ("mirrored (a NIfTI stored RAS)", lambda a: np.ascontiguousarray(a[:, :, ::-1]), (0.8, 1.1, 3.0), RAS_STORED,
     False, False, True),
    ("turned 180 degrees", lambda a: np.ascontiguousarray(a[:, ::-1, ::-1]), (0.8, 1.1, 3.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1),
     False, True, True),
]


@pytest.mark.parametrize("stored_as", STORED, ids=[s[0] for s in STORED])
def test_a_volume_stored_another_way_is_segmented_as_the_same_volume_stored_as_drawn(served_tiny_sam, stored_as):
    """Runs, a correction, a re-decoded slice and the slices reported as they are decided: the volume
    stored with i and j exchanged, or with its rows reversed (anterior side up, as DICOM stores an axial
    slice), or its columns (the patient's left in column 0, as a NIfTI stored RAS), or several of these
    (and its direction saying so) gives exactly the as-drawn volume's results, in its own layout; without
    its direction, other results (the encoders saw other slices)."""
    _, to_stored, stored_spacing, direction, swap, flip, mirror = stored_as
    sam = features.SamModel.load("vit_tiny", "cpu")
    from synpo.session import Models, Session
    image, mask = ellipsoid_volume(shape=(7, 40, 52), centre=(3, 18, 27), radii=(2.5, 9, 14))
    image = image + np.linspace(0, 20, 52)[None, None, :] + np.linspace(0, 9, 40)[None, :, None]   # no symmetry
    support = np.zeros(mask.shape, dtype=np.int32)
    support[3][mask[3]] = 1
    S = to_stored
    spacing = (0.8, 1.1, 3.0)
    back = Back(swap, flip, mirror, 40, 52)

    drawn, reports_a = Session(image, spacing, Models.of(sam), direction=DRAWN), []
    stored, reports_b = Session(S(image), stored_spacing, Models.of(sam), direction=direction), []
    a = drawn.run(support, on_slice=lambda r, m: reports_a.append((r.to_dict(), m)))
    b = stored.run(S(support), on_slice=lambda r, m: reports_b.append((r.to_dict(), m)))
    assert a.labels.any()
    _same_results(a, back.result(b))
    key = lambda item: (item[0]["label"], item[0]["index"], item[0]["status"])
    reports_a, reports_b = sorted(reports_a, key=key), sorted(reports_b, key=key)
    assert [back.record(r) for r, _ in reports_b] == [r for r, _ in reports_a]
    assert all((m is None and n is None) or np.array_equal(m, back.mask(n)) for (_, m), (_, n) in zip(reports_a, reports_b))

    # A correction on another slice (the session's Update) and a slice decoded again from moved points.
    paint = np.zeros_like(support)
    paint[5][mask[5]] = 1
    _same_results(drawn.add_support(paint), back.result(stored.add_support(S(paint))))
    m_a, iou_a = drawn.redecode(4, [[27, 18]], [[5, 5]], label=1)
    m_b, iou_b = stored.redecode(4, back.points([[27, 18]]), back.points([[5, 5]]), label=1)
    assert iou_a == iou_b and np.array_equal(m_a, back.mask(m_b))

    # No direction: the slices as stored (not the as-drawn run), and the as-drawn volume unchanged by it.
    as_stored = Session(S(image), stored_spacing, Models.of(sam)).run(S(support))
    assert not np.array_equal(back.result(as_stored).confidence[1], a.confidence[1])
    _same_results(Session(image, spacing, Models.of(sam)).run(support), a)


class Back:
    """A result of the volume stored another way (`swap`: i and j exchanged; `flip`: rows, along j, and
    `mirror`: columns, along i, reversed before the exchange; `rows`, `cols`: the as-drawn slices' height
    and width) on the as-drawn volume's grid: the test's own arithmetic, not layout.Layout's."""

    def __init__(self, swap, flip, mirror, rows, cols):
        self.swap, self.flip, self.mirror, self.rows, self.cols = swap, flip, mirror, rows, cols

    def volume(self, a):
        a = np.swapaxes(a, 1, 2) if self.swap else a
        return np.ascontiguousarray(a[:, ::-1 if self.flip else 1, ::-1 if self.mirror else 1])

    def mask(self, m):
        m = m.T if self.swap else m
        return np.ascontiguousarray(m[::-1 if self.flip else 1, ::-1 if self.mirror else 1])

    def point(self, p):
        x, y = (p[1], p[0]) if self.swap else (p[0], p[1])
        return [self.cols - 1 - x if self.mirror else x, self.rows - 1 - y if self.flip else y]

    def points(self, ps):
        """As-drawn points -> the stored volume's (the same arithmetic: each step is its own inverse)."""
        out = []
        for x, y in ps:
            x, y = self.cols - 1 - x if self.mirror else x, self.rows - 1 - y if self.flip else y
            out.append([y, x] if self.swap else [x, y])
        return out

    def record(self, d):
        d = dict(d)
        d["positive"] = [self.point(p) for p in d["positive"]]
        d["negative"] = [self.point(p) for p in d["negative"]]
        if d["box"] is not None:
            x0, y0, x1, y1 = d["box"]
            if self.swap:
                x0, y0, x1, y1 = y0, x0, y1, x1
            y0, y1 = (self.rows - y1, self.rows - y0) if self.flip else (y0, y1)
            x0, x1 = (self.cols - x1, self.cols - x0) if self.mirror else (x0, x1)
            d["box"] = [x0, y0, x1, y1]
        return d

    def result(self, result):
        import dataclasses
        from synpo.result import SliceRecord
        masks = lambda d: {t: self.mask(m) for t, m in d.items()}
        return dataclasses.replace(
            result, labels=self.volume(result.labels), confidence={v: self.volume(c) for v, c in result.confidence.items()},
            records=[SliceRecord.from_dict(self.record(r.to_dict())) for r in result.records],
            trimmed={v: masks(d) for v, d in result.trimmed.items()}, grown=masks(result.grown),
            overridden={v: masks(d) for v, d in result.overridden.items()})


def test_which_axial_slices_are_turned_posterior_side_up_or_mirrored_and_which_headers_say_nothing():
    """rows_reversed: an axial slice stored with row 0 anterior (DICOM's layout: the direction's j column
    along +y, posterior in LPS) goes to the encoders reversed; stored posterior side up (CHAOS, the bundled
    CT) as it is. columns_reversed: one stored with column 0 the patient's left (a NIfTI stored RAS, the
    bundled CT) goes mirrored; DICOM's and CHAOS's (column 0 the right) as they are. Coronal, sagittal and
    oblique slices as stored. known_direction: a diagonal direction at origin 0 (BTCV's ITK default, ACDC's
    nibabel np.eye) is no direction; any other placement is kept."""
    assert rows_reversed(IDENTITY, 0, None) and not rows_reversed(DRAWN, 0, None)    # DRAWN: CHAOS's direction
    assert not rows_reversed(RAS_STORED, 0, None) and rows_reversed((-1, 0, 0, 0, 1, 0, 0, 0, 1), 0, None)
    # Columns: the patient's right in column 0 (DICOM, CHAOS, BTCV's anatomy) stays; a NIfTI stored RAS turns.
    assert not columns_reversed(IDENTITY, 0, None) and not columns_reversed(DRAWN, 0, None)
    assert columns_reversed(RAS_STORED, 0, None) and not columns_reversed(RAS_STORED, 1, None)
    assert not columns_reversed(DRAWN_SWAPPED, 0, (1, 2)) and columns_reversed((0, -1, 0, -1, 0, 0, 0, 0, 1), 0, (1, 2))
    assert rows_reversed(SWAPPED_IJ, 0, (1, 2)) and not rows_reversed(DRAWN_SWAPPED, 0, (1, 2))
    assert not rows_reversed(IDENTITY, 1, None) and not rows_reversed(IDENTITY, 2, None)   # coronal, sagittal
    assert not rows_reversed(None, 0, None)
    tilt = lambda deg: tuple(np.array([[1, 0, 0], [0, np.cos(np.deg2rad(deg)), -np.sin(np.deg2rad(deg))],
                                       [0, np.sin(np.deg2rad(deg)), np.cos(np.deg2rad(deg))]]).ravel())
    assert rows_reversed(tilt(20), 0, None) and not rows_reversed(tilt(35), 0, None)   # tilted about x
    cmr = (0.628, 0.507, -0.591, 0.729, -0.116, 0.675, -0.273, 0.854, 0.442)
    assert [in_plane_layout(cmr, a, (10, 20, 30)).identity for a in range(3)] == [True, True, True]
    layout = in_plane_layout(IDENTITY, 0, (7, 40, 52))
    assert (layout.swap, layout.flip, layout.rows, layout.cols, layout.key) == (None, True, 40, 52, (None, True, False))
    assert in_plane_layout(SWAPPED_IJ, 0, (7, 52, 40)).key == ((1, 2), True, False)
    assert in_plane_layout(RAS_STORED, 0, (7, 40, 52)).key == (None, False, True)

    assert known_direction(IDENTITY, (0, 0, 0)) is None                        # BTCV's
    assert known_direction((-1, 0, 0, 0, -1, 0, 0, 0, 1), (-0.0, -0.0, 0.0)) is None   # ACDC's
    assert known_direction(IDENTITY, (-180.2, -160.0, 40.5)) == tuple(float(x) for x in IDENTITY)   # DICOM's
    assert known_direction(SWAPPED_IJ, (0, 0, 0)) == tuple(float(x) for x in SWAPPED_IJ)   # says something
    assert known_direction(tilt(5), (0, 0, 0)) is not None and known_direction(None, (1, 2, 3)) is None
    assert known_direction(IDENTITY, None) == tuple(float(x) for x in IDENTITY)   # (no origin known: trusted)


def test_a_bad_direction_is_refused():
    from synpo.session import Models, Session
    image = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    for bad, why in [((1, 0, 0), "9 numbers"), ((1, 0, 0, 0, 1, 0, 0, 0, float("nan")), "finite"),
                     ((2, 0, 0, 0, 1, 0, 0, 0, 1), "orthogonal unit")]:
        with pytest.raises(InputError, match=why):
            Session(image, (1, 1, 1), Models.of(None), direction=bad)


def _turned(deg):
    """SWAPPED_IJ turned `deg` degrees in plane (about z)."""
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    return tuple((rot @ np.reshape(SWAPPED_IJ, (3, 3))).ravel())


def test_the_cohort_s_shared_reference_embeddings_serve_only_a_query_taking_them_in_their_layout(
        served_tiny_sam, monkeypatch):
    """The reference task embeds the reference in the layout its own direction gives; a query whose
    direction lies within orient_like's 40 degrees of it (the reference taken as stored) may give another
    (one plane 25 degrees from the transposed, the other 35: over MAX_TILT_DEGREES). With square slices
    the frames agree, so the shared embeddings were injected beside slices of the other layout and the
    query's run decoded from them: its results must be those it gets embedding the reference itself."""
    from synpo import cohort_task
    from synpo.config import default_config
    from synpo.io import Geometry, turn_of
    from synpo.session import Models, Session
    sam = features.SamModel.load("vit_tiny", "cpu")
    models = Models.of(sam)
    monkeypatch.setattr(cohort_task, "worker_models", lambda: models)
    image, mask = ellipsoid_volume(shape=(7, 40, 40), centre=(3, 18, 22), radii=(2.5, 9, 13))
    image = image + np.linspace(0, 20, 40)[None, None, :]          # not symmetric under the swap
    labels = np.zeros(mask.shape, dtype=np.int32)
    labels[3][mask[3]] = 1
    spacing, cfg = (1.0, 1.0, 3.0), default_config()
    ref_geometry = Geometry((40, 40, 7), spacing, (0.0, 0.0, 0.0), _turned(25))
    for query_direction, shared in ((_turned(35), False), (_turned(25), True)):
        query_geometry = Geometry((40, 40, 7), spacing, (0.0, 0.0, 0.0), query_direction)
        assert turn_of(ref_geometry, query_geometry) == ""             # (segment_query injects them)
        feats = cohort_task.reference_features((image, labels, ref_geometry), cfg, None)
        session = Session(image, spacing, models, direction=query_direction)
        injected = cohort_task.inject_reference(session, feats, image, cfg, spacing)
        alone = Session(image, spacing, models, direction=query_direction)
        _same_results(session.run(labels, cfg, support_image=image), alone.run(labels, cfg, support_image=image))
        assert injected is shared
    assert in_plane_swap(_turned(25), 0) == (1, 2) and in_plane_swap(_turned(35), 0) is None


def test_evaluate_s_baselines_score_a_volume_stored_transposed_as_the_volume_stored_as_drawn(
        served_tiny_sam, tmp_path):
    """evaluate_intra's baselines (persam, oracle_box) decode on the session's embedding store, which
    holds the slices in the encoders' layout: the confidence and truth they are given, and the masks
    they return, must be turned to it and back (a volume stored transposed: a crash on non-square
    slices, other slices' prompts on square ones)."""
    import SimpleITK as sitk
    from synpo.evaluate import evaluate_intra
    sam = features.SamModel.load("vit_tiny", "cpu")
    image, mask = ellipsoid_volume(shape=(7, 40, 52), centre=(3, 18, 27), radii=(2.5, 9, 14))
    image = image + np.linspace(0, 20, 52)[None, None, :]
    T = lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))
    pairs = []
    for name, (img, lab, spacing, direction) in {
            "drawn": (image, mask, (0.8, 1.1, 3.0), DRAWN),
            "stored": (T(image), T(mask), (1.1, 0.8, 3.0), DRAWN_SWAPPED)}.items():
        paths = []
        for what, array in (("image", img), ("label", lab.astype(np.uint8))):
            vol = sitk.GetImageFromArray(array)
            vol.SetSpacing(spacing)
            vol.SetDirection(direction)
            paths.append(str(tmp_path / ("%s_%s.nii.gz" % (what, name))))
            sitk.WriteImage(vol, paths[-1])
        pairs.append(tuple(paths))
    scores = evaluate_intra(pairs, sam, log=lambda *a: None)
    by = {}
    for s in scores:
        by.setdefault(s.method, []).append(s)
    assert {"synpo", "copy", "persam", "oracle_box"} <= set(by)
    for method, (a, b) in by.items():
        assert (a.dice_labelled, a.dice_volume, a.fp_slices) == (b.dice_labelled, b.dice_volume, b.fp_slices), method


def test_an_update_gives_the_walks_the_last_run_s_overridden_masks_in_either_layout(monkeypatch):
    """Session.add_support hands segment_volume the last run's VolumeResult.overridden (walk.keep_agreed:
    a walk that agrees with its own previous masks keeps them), in the encoders' layout: for a volume
    stored as drawn (or of no known direction) as they are, for one stored transposed each mask turned.
    (They were dropped for every volume not turned.)"""
    import synpo.session as session_module
    from synpo.result import VolumeResult
    from synpo.session import Models, Session
    from synpo.support import find_support
    own = lambda shape: (np.arange(shape[1] * shape[2]).reshape(shape[1:]) % 3) == 0     # in the run's layout
    seen = []

    def segment_volume(image, spacing, support, sam, dino, cfg, **kw):
        seen.append(kw)
        return VolumeResult(np.zeros(image.shape, np.uint8), {}, [], find_support(support, kw.get("axis")), "mr",
                            ["sam"], {}, overridden={1: {2: own(image.shape)}})
    monkeypatch.setattr(session_module, "segment_volume", segment_volume)
    image = np.random.default_rng(0).normal(size=(5, 6, 8)).astype(np.float32)
    support, paint = np.zeros(image.shape, np.int32), np.zeros(image.shape, np.int32)
    support[2, 1:4, 2:6] = 1
    paint[3, 1:4, 2:6] = 1
    for direction, run_shape in ((None, (5, 6, 8)), (IDENTITY, (5, 6, 8)), (SWAPPED_IJ, (5, 8, 6))):
        session = Session(image, (1.0, 1.0, 2.0), Models.of(None), direction=direction)
        first = session.run(support)
        assert first.overridden[1][2].shape == (6, 8)            # (in the stored layout)
        session.add_support(paint)
        given = seen[-1]["previous_overridden"]
        assert given is not None and sorted(given) == [1] and sorted(given[1]) == [2], direction
        assert np.array_equal(given[1][2], own(run_shape)), direction


CROSS_ORIGIN = (5.0, 7.0, 9.0)         # (not a placeholder: layout.known_direction keeps the direction)


@pytest.mark.parametrize("stored_as", STORED, ids=[s[0] for s in STORED])
def test_evaluate_cross_scores_a_pair_stored_another_way_as_the_pair_stored_as_drawn(served_tiny_sam, tmp_path,
                                                                                   stored_as):
    """Two volumes stored as drawn, and the same two stored transposed, upside down (DICOM's axial layout)
    or both, with directions saying so: every method of evaluate_cross scores them alike, and the
    product's run reuses the embeddings computed for the chunks (the slices are embedded once per volume).
    (The stores were built from the slices as stored: the chunks were decoded in another layout than the
    product's run took, and the run embedded every slice again.)"""
    import SimpleITK as sitk
    from synpo.evaluate import evaluate_cross
    _, to_stored, stored_spacing, direction = stored_as[:4]
    sam = features.SamModel.load("vit_tiny", "cpu")
    embedded = []
    embed = sam.embed
    sam.embed = lambda slices, frame: embedded.append(len(slices)) or embed(slices, frame)
    volumes = []
    for seed, centre in ((0, (3, 18, 27)), (1, (3, 21, 24))):
        image, mask = ellipsoid_volume(shape=(7, 40, 52), centre=centre, radii=(2.5, 9, 14), seed=seed)
        volumes.append((image + np.linspace(0, 20, 52)[None, None, :] + np.linspace(0, 9, 40)[None, :, None], mask))
    scores, counts = {}, {}
    for name, S, spacing, d in (("drawn", lambda a: a, (0.8, 1.1, 3.0), DRAWN),
                                ("stored", to_stored, stored_spacing, direction)):
        pairs = []
        for n, (image, mask) in enumerate(volumes):
            paths = []
            for what, array in (("image", image), ("label", mask.astype(np.uint8))):
                vol = sitk.GetImageFromArray(S(array))
                vol.SetSpacing(spacing)
                vol.SetDirection(d)
                vol.SetOrigin(CROSS_ORIGIN)
                paths.append(str(tmp_path / ("%s_%s_%d.nii.gz" % (what, name, n))))
                sitk.WriteImage(vol, paths[-1])
            pairs.append(tuple(paths))
        del embedded[:]
        scores[name] = [(s.method, s.label) + tuple(None if x != x else x for x in (s.dice_labelled, s.dice_volume))
                        + (s.fp_slices, s.slice_dice) for s in evaluate_cross(pairs, sam, log=lambda *a: None)]
        counts[name] = sum(embedded)
    assert {m for m, *_ in scores["drawn"]} == {"cross_chunks", "cross_volume"}
    assert scores["stored"] == scores["drawn"]
    assert counts["drawn"] == counts["stored"] == 2 * 7
