"""Every tunable constant of SynPo, in one place.

The SynPo paper does not publish its constants. The values below were chosen by
measurement on ../shared/data/chaos_t2 (see README, "Choice of constants"); each
field says what it does. Change them through `SynPoConfig(...)` or
`dataclasses.replace`, never by editing the stage modules.
"""
import json
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from .errors import SynPoError


@dataclass(frozen=True)
class IntensityConfig:
    # "auto": CT when the volume looks like Hounsfield units, MR otherwise.
    modality: str = "auto"
    # CT window (centre, width) in HU: a soft-tissue abdominal window.
    ct_window: Tuple[float, float] = (40.0, 400.0)
    # MR: per-volume percentile normalisation to [0, 1].
    mr_percentiles: Tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class ConfidenceConfig:
    # Foreground prototypes per support mask (K-means over its feature vectors);
    # the similarity of a query pixel is the max over prototypes.
    n_prototypes: int = 3
    # ... when the support was painted on another patient (cross-patient): more prototypes cover
    # more of the support's appearance, which another patient's organ matches less closely.
    # CHAOS cross-patient, published protocol / product mode (labelled slices): 3: 0.798 / 0.804,
    # 4: 0.806 / 0.786, 5: 0.805 / 0.748, 6: 0.814 / 0.760 (8: 0.810 published); the product
    # mode flips whole organs on its start slice, so it moves in steps of ~0.04. Within a volume
    # more did not help (CHAOS whole volume 0.908 at 3; 0.906 / 0.909 / 0.898 at 4 / 5 / 6).
    n_prototypes_cross: int = 4
    # Background prototypes (K-means over the support's background cells); a query
    # cell's score is its foreground similarity minus its background similarity.
    # 0 = foreground similarity alone.
    n_background_prototypes: int = 8
    # Fusion weight of the SAM map in the weighted geometric mean (DINOv2 gets 1 - w).
    sam_weight: float = 0.5


@dataclass(frozen=True)
class PromptConfig:
    # Positives: the top_k most confident pixels inside the search region.
    top_k: int = 64
    # Negatives: n_negative_samples pixels drawn from low-confidence pixels with a
    # Gaussian weight on their distance to the target, sigma = negative_sigma x the
    # target's radius (the paper's finding: near negatives beat far ones).
    n_negative_samples: int = 64
    negative_sigma: float = 1.0
    negative_max_confidence: float = 0.3
    # K-means clusters (prompt points) per set.
    n_positive_points: int = 3
    n_negative_points: int = 3
    # K-means centres as prompts (SynPo); False = the highest-confidence positives and
    # the first negatives drawn, unclustered (an ablation).
    kmeans: bool = True
    seed: int = 0
    # A pixel is "confident" (enters the box region) above this calibrated confidence.
    box_threshold: float = 0.5
    # When the top-k positives fall on several confident components, keep only the one
    # with the most confidence mass (else the box spans them all). CHAOS: false-positive
    # slices per organ 1.10 -> 0.85, whole-volume Dice 0.9057 -> 0.9039; cross-patient better.
    one_component: bool = True
    # The box is widened by this fraction of its size on each side (LiteMedSAM and
    # SAM were trained on boxes jittered around the object).
    box_margin: float = 0.0


@dataclass(frozen=True)
class DecodeConfig:
    # Give SAM the box (box-trained models such as LiteMedSAM need it).
    use_box: bool = True
    # Give SAM the K-means points as well.
    use_points: bool = False
    # Refinement: keep the components touching the prompts, fill holes, then one
    # more SAM pass prompted by the box of that mask and its own logits.
    refine: bool = True
    # The refinement box is the first mask's bounding box widened by this fraction of its
    # size on each side (MedSAM-style models are trained on boxes a little larger than
    # the object; a tight box makes them under-segment).
    refine_box_margin: float = 0.04
    # Pixels of the confident region where refine_blend x the first pass's logits +
    # (1 - refine_blend) x the refinement pass's are foreground are restored to the refined
    # mask (0 = the refinement pass alone).
    refine_blend: float = 0.4
    mask_threshold: float = 0.0
    # With a box, SAM's mask logits are formed only within the box widened by this fraction
    # of its size on each side (plus one embedding cell); the rest of the slice is
    # background. The upscaling is ~40% of the decoder's arithmetic and a box covers a few
    # percent of a slice. None: logits over the whole slice.
    window_margin: Optional[float] = 0.5
    # With a box, SAM's two-way transformer is given only the embedding cells within the box
    # widened by this fraction of its size on each side (at least the decoding window above)
    # and grown to at least attend_cells a side: its arithmetic is linear in the cells it
    # sees. None: every cell (off: a speed option that changes the masks). Two passes of
    # LiteMedSAM on one CPU thread, BTCV truth boxes: 81 ms -> 30 / 41 ms with 0.5 / 0.5 and
    # 40 cells; BTCV 13-organ first runs 26-35 s -> 18-23 s. benchmarks/out_of_sample.py
    # --vary decode.attend_margin 0.5 1.0 2.0, CHAOS / cmr_bssfp / ACDC / BTCV 13 organs against
    # 0.9104 / 0.8669 / 0.8930 / 0.7711: 0.9090 / 0.8650 / 0.8936 / 0.7543, 0.9099 / 0.8677 /
    # 0.8929 / 0.7632, 0.9104 / 0.8672 / 0.8929 / 0.7687; at 0.5 with attend_cells 24 / 32 / 40
    # BTCV 0.7630 / 0.7665 / 0.7682 (its oesophagus 0.708 -> 0.684, left adrenal 0.631 -> 0.600:
    # small structures' walks lean on the whole slice).
    attend_margin: Optional[float] = None
    attend_cells: int = 0


@dataclass(frozen=True)
class VolumeConfig:
    # Propagation: a query slice's search region is the previous slice's mask
    # dilated by this fraction of its bounding-box size (at least search_min_px).
    search_margin: float = 0.07
    # A neighbouring mask (or paint) in several pieces, each at least this fraction of the largest:
    # the slice is decoded once per piece too, each with its own piece's search region, and its mask
    # is their union (walk._Context.decode_pieces). 0: off (the prompts keep the heavier confident
    # component, and a lobe beside the organ's main piece was lost from the first step: BTCV image_0's
    # liver 0.880 -> 0.973). benchmarks/out_of_sample.py --vary volume.piece_fraction, without
    # piece_holds, CHAOS / cmr_bssfp / ACDC / BTCV 13 organs: 0: 0.9105 / 0.8657 / 0.8912 / 0.7595;
    # 0.01 and 0.02: BTCV 0.7713; 0.05: 0.9104 / 0.8657 / 0.8909 / 0.7714; 0.15: 0.9105 / 0.8657 /
    # 0.8909 / 0.7686; 0.3: 0.9105 / 0.8657 / 0.8912 / 0.7672. Chosen on BTCV (the other sets have
    # almost no organ in pieces and cannot choose it).
    piece_fraction: float = 0.05
    # ... unless the slice decoded as one (as without pieces) holds at least this fraction of what
    # the pieces found and more (walk.grown_together): pieces that grow into one organ. Without it
    # the pieces rule cost cmr_bssfp's corrections 0.004-0.006 at k = 1-3 (a right ventricle painted
    # at its base in two pieces, one ventricle on the next slice: image_5 after 1 correction 0.836 ->
    # 0.773); with 0.9, no k lower than without the pieces rule, and BTCV 0.7711 (liver 0.939 ->
    # 0.962, portal and splenic veins 0.378 -> 0.487), CHAOS 0.9104, cmr_bssfp 0.8657, ACDC 0.8912.
    # Other tests of "grown together", tried and dropped: docs/research.md, "An organ in pieces".
    piece_holds: float = 0.9
    search_min_px: int = 4
    # ... and while the walk's masks grow, at least this many times the distance to the next slice
    # (in plane, mm -> pixels; walk._Context.search_min_px). 0: off. A growing organ (a heart's base)
    # was cut at the previous mask's box: search_min_px 8 everywhere gave ACDC 0.8775 -> 0.8939 but
    # CHAOS 0.9110 -> 0.8843 (walks past the ends) and BTCV 0.7595 -> 0.7391; 8 px only while growing
    # still cost BTCV (3 mm slices) 0.009, hence the unit: the slice distance. benchmarks/out_of_sample.py
    # ACDC / cmr_bssfp / CHAOS / BTCV 13 organs --vary volume.search_growing_slices 0.8 1.2 1.6:
    # 0 (before) 0.8775 / 0.8640 / 0.9110 / 0.7595; 0.8: 0.8783 / 0.8620 / 0.9112 / 0.7595;
    # 1.2: 0.8894 / 0.8632 / 0.9115 / 0.7595; 1.6: 0.8910 / 0.8647 / 0.9109 / 0.7594. Chosen on the
    # other three sets, every set takes 1.6 (ACDC +0.0135, cmr_bssfp +0.0007, CHAOS -0.0001, BTCV
    # -0.0001; the largest volume drop -0.007, cmr image_6; ACDC image_6 0.778 -> 0.919). The unit was
    # picked after BTCV's loss at 8 px had been seen: BTCV is no clean out-of-sample check of it.
    search_growing_slices: float = 1.6
    # "Growing": the last accepted mask's area over this multiple of the one before it. 0.9 (holding
    # counts): a correction's paint is the exact organ and SAM's next mask a little smaller, so with
    # 1.0 a walk from a new support never counted as growing (ACDC image_6's LV after 1 correction
    # 0.959 -> 0.709: slice 2 cut at the box again). out_of_sample.py --vary volume.search_growing_ratio
    # 0.9 0.8 (ACDC / cmr / CHAOS / BTCV): 1.0 0.8910 / 0.8647 / 0.9109 / 0.7594; 0.9 0.8912 / 0.8657 /
    # 0.9105 / 0.7595; 0.8 0.8909 / 0.8673 / 0.8905 / 0.7597 (CHAOS -0.02: not taken). Corrections
    # (corrections_fast.py, 5 rounds) 1.0 -> 0.9: ACDC after 1 / 2 / 3 0.8956 / 0.9114 / 0.9190 ->
    # 0.9029 / 0.9137 / 0.9203; cmr_bssfp 0.8614 / 0.8855 / 0.8985 -> 0.8617 / 0.8857 / 0.8987.
    search_growing_ratio: float = 0.9
    # "Target absent" when the decoded mask is smaller than min_area_fraction of
    # the support mask's area, or its mean confidence is below min_confidence.
    min_area_fraction: float = 0.05
    min_confidence: float = 0.0
    # ... or when SAM's own predicted IoU is below min_sam_iou, or less than
    # min_overlap of the mask lies inside the previous slice's mask (a jump to a
    # neighbouring structure rather than the organ continuing).
    # min_sam_iou: 0.6 until the walks were measured against the truth (benchmarks/walk_decisions.py):
    # on the CHAOS and cardiac walks no step that continues its organ has SAM's IoU below 0.625,
    # so 0.6 sat on a knife edge; 0.5 leaves a margin below all of them and scores the same there
    # (CHAOS 0.9112 -> 0.9110, cardiac 0.8622 -> 0.8622). BTCV's small structures continue with
    # IoUs down to 0.38: 0.705 -> 0.727 (false-positive slices 0.98 -> 1.11). 0.4, chosen on BTCV
    # (with overlap_tolerance_mm 2, benchmarks/out_of_sample.py): BTCV 13 organs 0.7402 -> 0.7589,
    # scored on the others: CHAOS 0.9082 -> 0.9078, cardiac 0.8618 -> 0.8618, ACDC 0.8766 -> 0.8763.
    min_sam_iou: float = 0.4
    min_overlap: float = 0.6
    # ... on the first step away from a painted slice. Chosen on the CHAOS and cardiac walks
    # (benchmarks/walk_decisions.py): no first step there leaves the organ (96 of 96 continue it),
    # and those steps' overlap is >= 0.684 and their confidence ratio >= 0.861, so the first-step
    # limits sit well below both (a first step of a small organ moves further, relative to its
    # size, than the 0.6 limit allows: two BTCV-like kidneys stopped at 0.55-0.58).
    min_overlap_first: float = 0.4
    # A step judged "left the previous mask" decoded once more with the previous mask's box (moved
    # with the walk's drift) widened by this fraction of its size, the positives the previous mask's
    # most confident pixels on the slice (walk._Context.decode_in_previous_box), and kept when it
    # passes every rule ("decoded again in the previous mask's box"). 0: off. A small structure whose
    # confidence dips under prompts.box_threshold on one slice while a confident neighbour lies in
    # the search region (BTCV image_4's vena cava: 7 of its 113 px over 0.5 on slice 55, the box
    # drawn round a 12 px blob beside it) ended there, 31 labelled slices short.
    # Twenty-fifth session, benchmarks/out_of_sample.py on the four sets (docs/research.md, "A step
    # that left the previous mask, decoded again"): ungated, 0.1 gave BTCV 13 organs 0.7753 ->
    # 0.7775 but CHAOS 0.9179 -> 0.9154 (kidneys walked past their ends); with left_retry_holds 0.8,
    # --vary volume.left_retry 0.05 0.1 0.15 0.25: BTCV 0.7787 / 0.7789 / 0.7778 / 0.7753, CHAOS /
    # cmr_bssfp / ACDC unchanged at every value (0.9179 / 0.8805 / 0.9023). Chosen on BTCV (the
    # only set it changes; leave-one-volume-out 0.7775). Left off: it costs the Updates (BTCV, all 13
    # organs corrected once, benchmarks/correction_rerun.py: after the Update 0.8310 -> 0.8288, 0.8286
    # with the size bound below) and adds absent slices segmented (1.78 -> 2.03 per organ: the vena
    # cava followed past where its label stops).
    left_retry: float = 0.0
    # ... only while the walk's masks hold their size: the previous mask at least this fraction of the
    # one before it (a walk's first step, from the paint, counts as holding), and the mask decoded
    # again within this fraction and its inverse of the previous one (an organ's tapering end is not
    # decoded again; nor is a neighbour taken in with it: the
    # upper bound, added after BTCV image_2's aorta took 477 px where the truth has 208 in an Update,
    # gives BTCV 0.7780 on the first run, the other sets unchanged). With left_retry 0.1, --vary
    # volume.left_retry_holds 0.6 0.8 0.9: CHAOS 0.9154 (neither test) -> 0.9176 / 0.9179 / 0.9179, BTCV
    # 0.7775 -> 0.7791 / 0.7789 / 0.7788, cmr_bssfp 0.8803 -> 0.8805, ACDC 0.9023 throughout.
    # Chosen on CHAOS (0.8, the lowest that gives its defaults back).
    left_retry_holds: float = 0.8
    # The overlap above is measured against the previous slice's mask grown by this many mm in
    # plane (0: the mask itself). An organ's outline moves between slices by a distance, not by a
    # fraction of its size: a small or oblique structure (an adrenal gland, a vein) leaves its own
    # previous mask by most of its width while a liver barely moves. Chosen with
    # benchmarks/out_of_sample.py (0 / 2 / 4 / 8 mm), whole-volume Dice CHAOS / cardiac / ACDC / BTCV
    # (13 organs): 0.9110 / 0.8622 / 0.8623 / 0.7270 -> 2 mm 0.9082 / 0.8618 / 0.8766 / 0.7402 (4 mm
    # 0.9077 / 0.8618 / 0.8763 / 0.7413, 8 mm 0.9055 / 0.8618 / 0.8763 / 0.7393): ACDC's right
    # ventricles and BTCV's small structures went on where they had ended early; the cost, CHAOS
    # -0.003 (one kidney's walk past its end, image_5), is under the 0.005 a rule may cost a set.
    # 2 mm is what CHAOS, cardiac and ACDC choose together, 4 mm what any three sets with BTCV
    # choose; the two differ by <= 0.0011 on every set, and 2 mm costs CHAOS least (docs/research.md,
    # "The overlap rule in mm").
    overlap_tolerance_mm: float = 2.0
    # ... only while the previous mask keeps at least this fraction of the walk's start mask's area
    # (0: always). Past a tapering end a step onto a touching neighbour hugs the last, small mask
    # and the grown mask lets it through (CHAOS: absent slices segmented 0.80 -> 1.50 per organ at 2 mm
    # with no limit). benchmarks/out_of_sample.py with 2 mm and the sudden-end rule, CHAOS / cardiac /
    # ACDC / BTCV 13 organs: no limit 0.9081 / 0.8636 / 0.8781 / 0.7584; 0.25: 0.9110 / 0.8640 / 0.8782
    # / 0.7584; 0.5: 0.9110 / 0.8640 / 0.8775 / 0.7595 (0 mm: 0.9110 / 0.8640 / 0.8638 / 0.7396). 0.5 is
    # what the other three sets choose for CHAOS, cardiac and ACDC (0.25 for BTCV): with it the
    # tolerance costs no set anything against 0 mm.
    overlap_tolerance_min_size: float = 0.5
    # A structure that moves in plane from slice to slice (a vein, the pancreas, an adrenal gland
    # cut obliquely) moves further than the search margin and leaves its previous mask: its masks
    # were cut at the search region and the overlap rule ended its walk. With follow_drift, once the
    # walk's last step moved the mask's centre by at least drift_min_fraction of the mask's size
    # (sqrt of its area), the previous mask moved by that step also widens the next slice's search
    # region (each piece's, for a mask in pieces) and counts for the overlap rule (walk.drift_of,
    # walk.follows; on thin slices the move per jump, 3 mm as on BTCV's slices). A large
    # organ's centre moves with its shape, by a small fraction of its size: it is left alone.
    # benchmarks/out_of_sample.py-style runs (each organ painted on its middle slice, saved runs
    # compared), whole-volume Dice CHAOS / cmr_bssfp / ACDC / BTCV 13 organs: off 0.9105 / 0.8755 /
    # 0.8932 / 0.7712; fraction 0: 0.9076 / 0.8755 / 0.8938 / 0.7760; 0.1: 0.9086 / 0.8756 / 0.8938 /
    # 0.7755; 0.2: 0.9105 / 0.8755 / 0.8939 / 0.7749; 0.3 / 0.4: BTCV 0.7703 / 0.7699. Chosen on the
    # other three sets, cmr_bssfp, ACDC and BTCV take 0.2 and CHAOS takes 0 (0.9076, -0.0029); 0.2
    # costs no set. Following only a drift beyond the search margin: 0.9086 / 0.8756 / 0.8935 /
    # 0.7699 (docs/research.md, "A structure that moves in plane").
    follow_drift: bool = True
    drift_min_fraction: float = 0.2
    # ... or when the mask's mean confidence falls below this fraction of the previous
    # slice's (the support's, for the first step): a sudden drop means the walk has left the
    # organ for a look-alike beside it (the left atrium above the left ventricle). 0 = off.
    min_confidence_ratio: float = 0.7
    # ... on the first step away from a painted slice: the paint's own mean confidence is its
    # self-similarity (its prototypes come from it), not a decoded slice's (min_overlap_first).
    min_confidence_ratio_first: float = 0.5
    # Trend rules (issue 25: where an organ ends). No single step figure separates the steps that
    # continue an organ from the ones past its end (docs/research.md); these read the walk so far
    # (walk_rules.Step.history). Both OFF: measured with `benchmarks/out_of_sample.py
    # ../shared/data/chaos_t2 ../shared/data/cmr_bssfp ../shared/data/acdc_cine --vary ...`, whole-volume
    # Dice CHAOS / cardiac / ACDC, defaults 0.9110 / 0.8622 / 0.8623.
    # A fading end: the mean confidence fell under falling_ratio of the slice before on each of the
    # last falling_steps decoded steps, this one included ("confidence falling"). 0 = off.
    # 0.9: 0.9104 / 0.8623 / 0.8640; absent slices segmented per organ 0.80 / 0.81 / 0.29 -> 0.60 /
    # 0.76 / 0.26, labelled slices missed 0.85 / 0.19 / 0.62 -> 1.15 / 0.24 / 0.64 (a trade, not a
    # gain: the liver's and spleen's tapering ends fade the same way). 0.93: 0.8811 / 0.8607 / 0.8454.
    falling_ratio: float = 0.0
    falling_steps: int = 2
    # An abrupt end: a later step whose mask shrinks under sudden_area_change x the previous slice's
    # right after a step that held its size (area change over sudden_after), with the confidence
    # ratio under sudden_ratio: the ventricles end at the valve plane, an organ's end onto a smaller
    # look-alike, not a taper, which shrinks step after step ("ended abruptly"). 0 = off.
    # The form was found in cmr_bssfp's walks past the base; the grid on a replay of the recorded walks
    # of all three sets (benchmarks/replay_rules.py); the values by `benchmarks/out_of_sample.py
    # ../shared/data/chaos_t2 ../shared/data/cmr_bssfp ../shared/data/acdc_cine --vary
    # volume.sudden_area_change 0.5 0.6 0.7` (sudden_after 0.8), whole-volume Dice CHAOS / cardiac /
    # ACDC: off 0.9110 / 0.8622 / 0.8623; 0.5: 0.9102 / 0.8646 / 0.8642; 0.6: 0.9092 / 0.8654 / 0.8631;
    # 0.7: 0.9039 / 0.8668 / 0.8631 (chosen on the other two sets: cardiac and ACDC 0.5, CHAOS 0.7,
    # which costs CHAOS 0.0071, over the 0.005 bar). Then `--vary volume.sudden_after 0.9` at 0.5:
    # 0.9112 / 0.8640 / 0.8642 against 0.8's 0.9102 / 0.8646 / 0.8642; chosen on the other two sets
    # the cardiac set and ACDC get 0.9, CHAOS 0.8. Taken: 0.5 after 0.9, no set below the rule off
    # (+0.0002 / +0.0018 / +0.0019; docs/research.md, issue 25).
    sudden_area_change: float = 0.5
    sudden_after: float = 0.9
    sudden_ratio: float = 0.95
    # Re-growth after a taper: once the walk's masks have shrunk under regrow_below of the paint's
    # area, a mask over regrow_after x the walk's smallest one is a neighbour, not the organ growing
    # again ("grew again after tapering"). 0 = off. 1.3: 0.9110 / 0.8638 / 0.8623: one organ changes
    # (cmr_bssfp image_1's right ventricle past the base, into the atrium: RV absent slices 1.29 ->
    # 1.14 per organ), nothing on CHAOS or ACDC: chosen on one volume, nothing out of sample. 1.6 and
    # 2.0 change no walk on any set (benchmarks/replay_rules.py --rules).
    # Twenty-second session (issue 25, docs/research.md "One peak for a large organ"): measured from
    # the walk's widest mask, the paint included (regrow_reference "peak"; "paint": from the paint as
    # above), for organs whose paint covers at least regrow_min_cm2 square centimetres: a liver
    # tapering to its dome or its caudal tip while the walk's masks grow again onto the heart or the
    # bowel (CHAOS image_5's liver, both ends). On the truth's own areas, walked the same way from the
    # middle slice (benchmarks/truth_walks.py), the rule at 1.1-1.3 never cuts any of the 13
    # development organ-volumes with a paint over 60 cm^2 (10 livers, a spleen, two stomachs); ungated
    # it cuts 18 of 148 (BTCV's vessels, oesophagus and a 33 cm^2 stomach; no cardiac or CHAOS organ).
    # `benchmarks/out_of_sample.py ../shared/data/chaos_t2 ../shared/data/btcv_ct --set
    # volume.regrow_reference=peak --set volume.regrow_below=0.8 --set volume.regrow_min_cm2=60 --vary
    # volume.regrow_after 1.2 1.3 1.5`:
    # chaos_t2 0.9138 -> 0.9180 / 0.9179 / 0.9148 (liver 0.866 -> 0.882; one volume changes), btcv_ct
    # 0.7753 unchanged; no cardiac paint reaches 60 cm^2 (largest 41).
    regrow_after: float = 1.3
    regrow_below: float = 0.8
    regrow_reference: str = "peak"
    regrow_min_cm2: float = 60.0
    # A label's last slice after assembly: at each end of a label's extent in the assembled label
    # volume (overlapping labels' voxels given to the more confident one, the paint restored), a slice
    # that is not painted and keeps under tip_ratio x the label's area on the slice next to it is
    # dropped (assembly.drop_thin_ends; its record says so). 0 = off. Chosen on btcv_ct (0.15 / 0.2 /
    # 0.25 / 0.3 / 0.4: Dice 0.7711 / 0.7711 / 0.7712 / 0.7711 / 0.7708, absent slices segmented per
    # organ 1.57 / 1.55 / 1.54 / 1.54 / 1.54 against 1.58 off). On the others Dice moves by <= 0.0001
    # (chaos_t2 0.9104 -> 0.9105), CHAOS's absent slices 0.75 -> 0.50 per organ, labelled slices
    # missed 1.00 -> 1.10; cmr_bssfp unchanged, acdc_cine one slice missed more. An Update's walks are
    # judged against the labels before the trim (Session.untrimmed_labels). Corrections (3 rounds):
    # Dice after k within 0.0015 of the rule off on every set. docs/research.md, "A label's last
    # slice" (sixteenth session).
    tip_ratio: float = 0.25
    # Look-ahead: when a slice is judged absent, the next slice is decoded from the same neighbour;
    # if it is judged present, the walk goes on and the slice between gets the shape between them
    # (status "interpolated", reason "bridged (...)"): one bad slice inside an organ does not end it.
    # "off"; "jump": only after "left the previous mask"; "any": after any rule (not a user's mark).
    look_ahead: str = "off"
    # Between two supports of a target (a correction and the first paint): "nearest" gives each
    # slice to the nearer support; "agreement" walks both across the gap and hands over where their
    # masks agree best (volume.split_gap). `synpo evaluate --corrections 3`, whole volume after
    # 0 / 1 / 2 / 3 corrections per organ, nearest -> agreement: CHAOS 0.9028 / 0.8963 / 0.8911 /
    # 0.9274 -> 0.9028 / 0.9144 / 0.8960 / 0.9296; cardiac 0.8419 / 0.8250 / 0.8505 / 0.8809 ->
    # 0.8419 / 0.8599 / 0.8840 / 0.8982 (one support: no gap, nothing changes).
    ownership: str = "agreement"
    # Corrections (issue 28, docs/corrections.md). Measured with the simulated annotator
    # (`synpo evaluate DATA --corrections 5 --device cpu --features sam`), chosen on chaos_t2 and
    # cmr_bssfp, reported on acdc_cine; Dice after k = 1..5 corrections, and the steps that kept
    # Dice_k+1 >= Dice_k - 0.005 per organ:
    #   before:           CHAOS 0.9143 / 0.8959 / 0.9296 / 0.9315 / 0.9374, 91.0 %, worst step -0.340;
    #                     cmr_bssfp 0.8599 / 0.8840 / 0.8976 / 0.9019 / 0.9139, 86.7 %
    #   + overlap owner:  CHAOS 0.9146 / 0.9228 / 0.9299 / 0.9317 / 0.9365, 91.0 %, worst -0.054;
    #                     cmr_bssfp 0.8601 / 0.8841 / 0.8980 / 0.9040 / 0.9139, 86.7 %
    #   + soft held ends: CHAOS 0.9146 / 0.9234 / 0.9301 / 0.9317 / 0.9365, 91.0 %, worst -0.042;
    #                     cmr_bssfp 0.8601 / 0.8841 / 0.8980 / 0.9046 / 0.9148, 86.7 %
    #   + hard next end:  CHAOS 0.9146 / 0.9231 / 0.9292 / 0.9314 / 0.9356, 91.0 %, worst -0.042;
    #     (today)         cmr_bssfp 0.8704 / 0.8905 / 0.8998 / 0.9053 / 0.9109, 87.6 %, worst -0.092
    # (the first run, k = 0, is unchanged: 0.9025 / 0.8419.)
    #
    # After a correction, a voxel claimed by two labels' masks goes to the label that had it in the
    # previous run, when that label is one of them (else the more confident label, as in a first run):
    # a corrected walk that runs onto a neighbouring organ does not take the neighbour's accepted
    # voxels (CHAOS image_2: a spleen correction's walk onto the kidney took the kidney from 0.929
    # to 0.588; now 0.937).
    overlap_keeps_owner: bool = True
    # A correction painted inside a label's previous extent, where the previous run's mask agreed
    # with the new paint (IoU >= correction_trust_iou), keeps the previous run's ends (its walks stop
    # one slice past them: a spleen correction cannot walk onto the kidney below the spleen) and its
    # walks are judged against the previous masks: where one overlaps them by less than
    # correction_keep_iou it ends and the previous masks stand beyond (walk.keep_previous; 0 = off).
    # Hard ends (correction_collision 0) held only in the round of the correction, with keep 0.25
    # and trust 0.5 (the first version): CHAOS 0.9132 / 0.9224 / 0.9008 / 0.9314 / 0.9358, 86.0 % of
    # the steps; without the keep and trust rules 88.0 %, cmr_bssfp 85.7 % (k = 2: 0.8768, 0.007
    # under the defaults then: a correction's true extension of an organ the previous walk had cut
    # short is lost, CHAOS image_8's liver 0.836 -> 0.823). Held in the later rounds too and with the
    # overlap owner: CHAOS 88.0 %, cmr_bssfp 87.6 % (0.8704 / 0.8904 / 0.9003 / 0.9052 / 0.9109).
    # Today the end is soft (correction_collision), held in every later round (correction_holds_persist),
    # for every correction inside the extent (trust 0), without keep_previous (keep 0).
    correction_holds_ends: bool = True
    # ... and a correction's held ends stay held in the later rounds (while no paint of its label lies
    # on or past them), not only in the round it was painted.
    correction_holds_persist: bool = True
    # With correction_holds_ends: > 0 makes a held end soft: a correction's walk goes on past it while
    # no more than this fraction of its mask lies on another label's voxels of the previous run (a
    # spleen correction may extend the spleen, not walk onto the kidney below it). 0: a hard end.
    # Swept (corrections_fast.py, the defaults before correction_keeps_reach): 0.2, 0.3, 0.4 and 0.5
    # give the same Dice to 4 decimals at every k and the same steps held (CHAOS 91 %, cmr_bssfp
    # 87.6 %): no walk past a held end had 20-50 % of its mask on another label. Kept at 0.3; against
    # the overlap owner alone it changed 3 organ-steps, all up
    # (CHAOS image_2 spleen after 2 corrections 0.818 -> 0.831; cmr_bssfp image_1 myocardium after 4
    # and 5: 0.799 -> 0.813, 0.807 -> 0.827).
    correction_collision: float = 0.3
    # Past a soft held end, a correction's first step away from its paint is judged by the ordinary
    # stop rules, not the first step's looser ones (a correction on the organ's previous last slice).
    # OFF: `benchmarks/corrections_fast.py` with it on changed 2 organ-steps of 205 on chaos_t2 and
    # cmr_bssfp (CHAOS Dice after 4 / 5 corrections 0.9317 / 0.9365 -> 0.9320 / 0.9366; cmr_bssfp the
    # same), not the right-ventricle case it was made for (docs/corrections.md).
    correction_strict_past_end: bool = False
    # Past a soft held end, a correction's walk ends where its mask grows beyond this multiple of the
    # previous slice's mask (an organ tapers past where the previous run found its end); not on the
    # first step from the paint (SAM's mask against the user's exact paint). 0: off.
    # Chosen on chaos_t2 (image_2's liver after 4 corrections walked on into the heart), reported on
    # the others: `benchmarks/corrections_fast.py DATA OUT 5 --set volume.correction_past_end_growth=1.0`
    # against 0 (btcv_ct: 3 rounds, --labels 1,2,3,6). It ended one walk on each of CHAOS, ACDC and
    # BTCV (growths 1.05, 1.08, 1.05), none on cmr_bssfp: CHAOS after 4 0.9326 -> 0.9333 (worst step
    # -0.042 -> -0.029), acdc_cine after 5 0.9178 -> 0.9201 (image_10's RV 0.734 -> 0.827), btcv_ct
    # after 3 0.9551 -> 0.9555 (steps held 93.3 -> 95.0 %); every other figure the same.
    correction_past_end_growth: float = 1.0
    # A correction painted on the organ's previous first or last slice keeps the end next to it hard
    # (the previous walk found nothing there; the paint says nothing about it). Measured with
    # `benchmarks/corrections_fast.py DATA OUT 5 --set volume.correction_hard_next=true` against the
    # soft ends alone: cmr_bssfp 0.8601 / 0.8841 / 0.8980 / 0.9046 / 0.9148 -> 0.8704 / 0.8905 /
    # 0.8998 / 0.9053 / 0.9109, steps held 86.7 -> 87.6 %, worst step -0.130 -> -0.092 (the right
    # ventricle painted on its previous last slice no longer walks into the atrium: image_6 0.709 ->
    # 0.884); CHAOS 0.9146 / 0.9234 / 0.9301 / 0.9317 / 0.9365 -> 0.9146 / 0.9231 / 0.9292 / 0.9314 /
    # 0.9356, 91.0 % held either way (no set down by more than 0.005 at any k).
    correction_hard_next: bool = True
    correction_keep_iou: float = 0.0
    correction_trust_iou: float = 0.0
    # In a re-run after corrections, a walk beyond the label's outermost support that judges the label
    # absent on a slice where the previous run found it, or whose mask there lies on another label's
    # previous voxels (more than correction_collision of it), the previous mask there continuing the
    # walk's (overlap >= min_overlap_first of its area), keeps the previous masks from there to the
    # previous end: a correction that re-starts the walk near an end does not take back the reach
    # the previous walk had (walk.keep_reach; a CHAOS spleen correction's walk ran onto the kidney
    # one slice before the previous end, the spleen lost that slice: 0.872 -> 0.831).
    # `benchmarks/corrections_fast.py DATA OUT 5 --set volume.correction_keeps_reach=true` against
    # the defaults before it (Dice after k = 1..5; steps held; steps down by more than 0.02):
    #   CHAOS 0.9146 / 0.9231 / 0.9292 / 0.9314 / 0.9356, 91 %, 3 -> 0.9165 / 0.9251 / 0.9332 / 0.9334 /
    #   0.9371, 95 %, 1; cmr_bssfp 0.8704 / 0.8905 / 0.8998 / 0.9053 / 0.9109, 87.6 %, 5 -> 0.8690 /
    #   0.8891 / 0.9003 / 0.9055 / 0.9101, 88.6 %, 5 (one organ changed: image_5's right ventricle kept
    #   a previous slice past its end, 0.864 -> 0.835 after 1); reported on acdc_cine: the same figures
    #   to 4 decimals (0.8976 / 0.9105 / 0.9159 / 0.9254 / 0.9199, 87.1 %); btcv_ct (spleen, kidneys,
    #   liver, 3 rounds) 0.9542 / 0.9557 / 0.9567 -> 0.9544 / 0.9556 / 0.9566, 95 % either way.
    correction_keeps_reach: bool = True
    # ... and where that walk's mask is over this many times the previous run's mask of the label on
    # the same slice, times what the paint outgrew the previous run's mask on the paint's own slice
    # (that factor taken as at least 1; G 0: off, else >= 1): a paint near an organ's end carries the
    # paint's size past the organ
    # (cmr_bssfp: a right ventricle painted on its last slice below the valve plane walked on into the
    # atrium with masks 2.2-3.2 x the previous run's there: "previous kept (3.18 x the previous mask,
    # the paint 1.40 x)"), while an organ the previous run under-segmented throughout grows about as
    # much as its paint did (btcv_ct image_0's right kidney: 2.5-3.2 x beyond a paint 2.4 x).
    # `benchmarks/corrections_fast.py DATA OUT 5 --set volume.correction_outgrows_previous=G`, Dice
    # after k = 1..5; steps held; steps down by more than 0.02; worst step:
    #   off: CHAOS 0.9185 / 0.9291 / 0.9303 / 0.9351 / 0.9376, 92 %, 1, -0.028; cmr_bssfp 0.8617 / 0.8857 /
    #        0.8987 / 0.9045 / 0.9134, 84.8 %, 5, -0.115
    #   1.5: CHAOS 0.9185 / 0.9308 / 0.9317 / 0.9357 / 0.9375, 92 %, 0, -0.014; cmr_bssfp 0.8686 / 0.8887 /
    #        0.8987 / 0.9053 / 0.9131, 86.7 %, 3, -0.025
    #   2.0: CHAOS 0.9185 / 0.9308 / 0.9303 / 0.9351 / 0.9370, 91 %, 1; cmr_bssfp 0.8670 / 0.8887 / 0.8987 /
    #        0.9045 / 0.9134, 85.7 %, 4
    # Part of the reach rule (nothing without correction_keeps_reach); on a ring label's walks (its
    # filled shape's and its hole's) since ring_keeps_reach, measured with it there.
    # Chosen on chaos_t2 and cmr_bssfp (each prefers 1.5; no k below "off" by more than 0.0003),
    # reported on acdc_cine (the same figures as off: no walk there outgrew its previous masks so) and
    # btcv_ct (docs/corrections.md). Without the paint's factor (G x the previous mask alone, 2.0) it
    # cost btcv_ct image_0's right kidney 0.966 -> 0.893 after 1 correction.
    correction_outgrows_previous: float = 1.5
    # In a re-run after corrections, a walk whose accepted mask on a slice agrees with the previous
    # run's mask of the label there (its own walked mask, VolumeResult.overridden given back; IoU >=
    # correction_agree_iou) ends: from there on the correction changes nothing, and the previous
    # masks stand beyond, undecoded (walk.keep_agreed: "previous kept (the walk agreed with it on
    # slice N)"). Not on a ring's filled shape or hole (their previous shapes are derived from the
    # ring: applied to them it cost cmr_bssfp 0.8961 -> 0.8907 after 1); needs correction_keeps_reach
    # (its previous labels). 0: off. An Update recomputes only what a correction changes (issue 28,
    # item 5): BTCV, every one of the 13 organs corrected at once (`benchmarks/correction_rerun.py
    # ../shared/data/btcv_ct --set volume.correction_agree_iou=V`, 2-core CPU; a first version that
    # compared with the assembled labels), off / 0.95 / 0.9: slices decoded per Update 207-304 /
    # 64-211 / 64-176, seconds mean 14.3 / 8.1 / 7.5, max 19.2 / 12.9 / 10.9, the organs' Dice after the
    # Update 0.8312 / 0.8310 / 0.8311; as built (0.9, the walks' own masks, kept slices' confidence
    # maps computed) 64-167 slices, 7.7 / 10.8 s, 0.8310. `benchmarks/corrections_fast.py DATA OUT 3 --set
    # volume.correction_agree_iou=V`, Dice after k = 1 / 2 / 3, steps held (on the same slices):
    #   off: chaos_t2 0.9254 / 0.9316 / 0.9349, 96.7 % (95.0 %); cmr_bssfp 0.8961 / 0.9122 / 0.9260,
    #        98.4 % (100 %); acdc_cine 0.9211 / 0.9259 / 0.9341, 88.9 % (95.2 %); btcv_ct (liver, kidneys,
    #        spleen) 0.9563 / 0.9562 / 0.9572, 98.3 % (98.3 %)
    #   0.95: 0.9257 / 0.9316 / 0.9349, 100 % (98.3 %); 0.8958 / 0.9120 / 0.9256, 98.4 % (100 %);
    #        0.9213 / 0.9268 / 0.9352, 89.7 % (96.8 %); 0.9562 / 0.9568 / 0.9570, 98.3 % (98.3 %)
    #   0.9: 0.9252 / 0.9313 / 0.9351, 100 % (100 %); 0.8953 / 0.9107 / 0.9256, 100 % (100 %);
    #        0.9211 / 0.9267 / 0.9350, 89.7 % (97.6 %); 0.9561 / 0.9569 / 0.9577, 100 % (100 %)
    #   as built (0.9): 0.9252 / 0.9314 / 0.9352, 100 % (100 %); 0.8952 / 0.9106 / 0.9249, 98.4 %
    #        (100 %); 0.9210 / 0.9263 / 0.9347, 89.7 % (97.6 %); 0.9561 / 0.9569 / 0.9577, 100 % (100 %)
    # No set moves by more than 0.0016 at any k and no set holds fewer steps; 0.9 is the fastest.
    # The first run is untouched (no previous run).
    correction_agree_iou: float = 0.9
    # Measured with `benchmarks/corrections_fast.py DATA OUT 5 --set volume.correction_keeps_reach=true
    # volume.gap_choice=paint_shape` (or gap_confidence=blend / nearest) against correction_keeps_reach
    # alone (docs/corrections.md): paint_shape CHAOS 95 -> 96 % of the steps held but cmr_bssfp 88.6 ->
    # 86.7 % (7 steps down by more than 0.02, against 5); blend CHAOS 95 -> 92 %, cmr_bssfp 88.6 ->
    # 84.8 %; nearest CHAOS 95 -> 90 %, Dice after 1 0.9165 -> 0.9075. All left off.
    # Between two supports (ownership "agreement"): "split" hands the gap over at one slice where the
    # two walks agree best (split_gap); "paint_shape" gives each slice of the gap, where both walks
    # found the target, to the walk whose mask agrees better (IoU) with the shape interpolated
    # between the two supports' paint (ownership.choose_by_paint): the walk closer to what both
    # paints say the organ is there. (Only after corrections: a first run has one support a label.)
    # "split_and_shape" (the default): split, and on each slice of the gap the owning walk's mask gets
    # the pixels that the other support's walk and the shape between the two paints both hold
    # (ownership.add_agreed; nothing of the owner's mask is taken away; the record says how many were
    # added). `benchmarks/corrections_fast.py DATA OUT 5 --set volume.gap_choice=G` (btcv_ct 3 rounds,
    # --labels 1,2,3,6), Dice after k = 1..5, steps held, down by more than 0.02, split -> split_and_shape:
    #   chaos_t2  0.9185 / 0.9308 / 0.9317 / 0.9357 / 0.9375, 92 %, 0 -> 0.9193 / 0.9313 / 0.9330 /
    #             0.9365 / 0.9383, 95 %, 0 (worst step -0.014 -> -0.012)
    #   cmr_bssfp 0.8686 / 0.8887 / 0.8987 / 0.9053 / 0.9131, 86.7 %, 3 -> 0.8697 / 0.8900 / 0.8990 /
    #             0.9081 / 0.9154, 89.5 %, 4 (worst -0.025 -> -0.032)
    # chosen on those two (higher at every k on both), reported on acdc_cine 0.9029 / 0.9137 / 0.9203 /
    # 0.9247 / 0.9201 -> 0.9030 / 0.9139 / 0.9206 / 0.9249 / 0.9213 (86.2 % held either way) and btcv_ct
    # 0.9554 / 0.9557 / 0.9570 -> 0.9555 / 0.9557 / 0.9570 (98.3 % either way). A majority of the three
    # (both walks and the shape) took pixels away too: CHAOS after 1 0.9066 (image_5's liver between a
    # mid paint and a tip paint 0.809 -> 0.632: the shape between them is far smaller than the liver in
    # the middle); weighted by the distance to each support, 0.9071 (docs/corrections.md).
    gap_choice: str = "split_and_shape"
    # After the split ("split" or "split_and_shape"), each slice of the gap that both walks found goes
    # to the walk whose mask is larger there (ownership.prefer_larger; the record says so): a walk from
    # a paint where the organ is small (a correction at its end) grows into it by the search margin a
    # step and lags where it widens fast (cmr_bssfp image_1's right ventricle painted on slice 5, 257
    # px: 597 / 952 px on slices 6 / 7 against 1119 / 1516 in the truth, the walk from slice 8 1077 /
    # 1469; the split gave both slices to the lagging walk, 0.888 -> 0.853 after the third correction).
    # LiteMedSAM's masks run small, so on cmr_bssfp the larger of two walks was the better on 18 of the
    # 40 organ-rounds where they differ and the worse on none (/tmp replay of the corrections' gaps).
    gap_larger_wins: bool = True
    # ... only for a walk whose mask on the slice next to the other support overlaps the shape
    # interpolated between the two paints there by IoU >= this (it arrived where the other paint says
    # the organ is). A walk that leaked into a neighbour is larger too: CHAOS image_5's liver walked
    # down from slice 19 into the heart, 7300-8400 px on slices 8-13 next to a paint of 1282 px on
    # slice 7 (IoU with the shape there 0.17); with every walk allowed (0) its second correction fell
    # 0.890 -> 0.812 and CHAOS after k = 1..3 was 0.9202 / 0.9257 / 0.9301 (one step down by 0.037).
    # On the replayed gaps any limit in 0.2-0.3 kept all of cmr_bssfp's gain and 0.2-0.5 all of CHAOS's.
    # `benchmarks/corrections_fast.py DATA OUT.pkl 3 --set volume.gap_larger_wins=B` (btcv_ct --labels
    # 1,2,3,6), Dice after k = 0..3, steps held (on the same slices), down by more than 0.02:
    #   cmr_bssfp off 0.8570 / 0.8856 / 0.9021 / 0.9098, 95.2 % (93.7 %), 1 -> 0.8570 / 0.8874 /
    #             0.9054 / 0.9158, 96.8 % (98.4 %), 0
    #   chaos_t2  off 0.9021 / 0.9195 / 0.9312 / 0.9331, 96.7 %, 0 -> 0.9021 / 0.9208 / 0.9319 / 0.9346,
    #             100 %, 0 (worst step -0.012 -> -0.004)
    # chosen on those two; reported on acdc_cine 0.8786 / 0.9143 / 0.9221 / 0.9321 -> 0.8786 / 0.9143 /
    # 0.9229 / 0.9333 (92.9 % (96.8 %), 4 either way) and btcv_ct 0.9474 / 0.9567 / 0.9565 / 0.9575 ->
    # 0.9474 / 0.9563 / 0.9562 / 0.9572 (98.3 %, 0 either way). No first run changes (one support a
    # label). 0: every walk.
    gap_larger_arrival: float = 0.3
    # The confidence a walk uses on a slice between two supports: "own" (its support's prototypes),
    # "nearest" (the nearer support's, whichever walks), "blend" (both supports' maps weighted by
    # the distance: a corrected slice teaches the slices near it). Beyond the outermost support
    # every option is the outermost support's own map (ownership.GapConfidence).
    gap_confidence: str = "own"
    # Thin slices: a walk decodes every n-th slice, n the most slices within this thickness (mm),
    # and fills the slices between by shape-based interpolation (interpolate.py); the organ's ends
    # are still found slice by slice. 0 = decode every slice. Slices of 3 mm and more (every
    # development volume) are all decoded; the bundled CT resampled to 1 mm slices, 5 organs
    # (benchmarks/thin_slices.py): every slice 0.8690 in 358 s, 2 mm 0.8632 in 178 s, 3 mm 0.9051
    # in 188 s (walks of 1 mm steps meet the stop rules three times as often as the 3 mm steps
    # they were set on, and end early more often).
    walk_spacing_mm: float = 3.0
    # A label painted inside another label's outline on every support slice (the blood pool
    # inside the myocardium, a lesion inside its organ) is kept only on slices where that
    # enclosing label is present: it cannot outlast what encloses it.
    enclosed_follow: bool = True
    # A label painted against a ring's outside (within 2 px of the ring's mask on its support
    # slice, not enclosed by it: the right ventricle against the myocardium) is kept only on slices
    # where the ring or what it encloses is found (assembly.follow_walls). Only rings (ring_min_hole)
    # trigger it. cmr_bssfp 0.8669 -> 0.8755 (absent slices per organ 0.76 -> 0.38, no labelled
    # slice lost), acdc_cine 0.8929 -> 0.8932, chaos_t2 and btcv_ct unchanged; corrections on
    # cmr_bssfp 92.1 -> 95.2 % of steps held (docs/research.md, "A wall's extent", sixteenth session).
    wall_follow: bool = True
    # Rings: a label whose support masks are closed bands around a hole of at least this
    # fraction of the filled area (the myocardium around the blood pool) is segmented as
    # the band of the support's thickness around the propagated hole (0 = never): a box
    # drawn around a ring makes SAM segment the hole, not the band. 0.2: the labels' own holes
    # (benchmarks' truth, slices of >= 20 px): a myocardium's blood pool is 0.26-0.67 of the filled
    # area on cmr_bssfp, 0.37-0.67 on ACDC's middle slices (4 of its 126 holed slices under 0.2, at
    # the apex and base); a kidney's truth through the hilum encloses the renal sinus, up to 0.18 on
    # BTCV (13 of 67 holed slices over 0.1). At 0.1 a kidney corrected on such a slice was walked as
    # a ring (BTCV image_4: its neighbours 0.92 -> 0.55). benchmarks/corrections_fast.py, 0.1 -> 0.2
    # (0.25 the same on BTCV): BTCV 3 rounds (labels 1,2,3,6) after 1 / 2 / 3 0.9515 / 0.9521 /
    # 0.9555 -> 0.9554 / 0.9557 / 0.9570, steps held 95.0 -> 98.3 %, worst -0.050 -> -0.013;
    # cmr_bssfp (5 rounds) the same to 4 decimals; ACDC after 4 / 5 0.9254 / 0.9202 -> 0.9247 /
    # 0.9201, the rest the same. No middle-slice paint of the four sets has a hole in 0.1-0.2:
    # `synpo evaluate` is unchanged there.
    ring_min_hole: float = 0.2
    # A ring's band around its walked hole is as thick as the ring supports': "mean" their average on
    # every slice (the only choice before the seventh session), "interpolated" linearly between the
    # two ring supports around a slice (the outermost one's beyond them): a correction painted near
    # the base or the apex teaches the thickness there. One ring support (a first run): the same.
    # `benchmarks/corrections_fast.py DATA OUT 5 --set volume.ring_thickness=interpolated`, Dice after
    # k = 1..5, steps held, down by more than 0.02, mean -> interpolated; chosen on acdc_cine (14
    # volumes, the larger ring set), reported on cmr_bssfp:
    #   acdc_cine 0.9030 / 0.9139 / 0.9206 / 0.9249 / 0.9213, 86.2 % (same slices 95.2 %), 14 ->
    #             0.9036 / 0.9161 / 0.9216 / 0.9258 / 0.9207, 86.7 % (96.2 %), 14
    #   cmr_bssfp 0.8697 / 0.8900 / 0.8990 / 0.9081 / 0.9154, 89.5 %, 4 ->
    #             0.8697 / 0.8903 / 0.9012 / 0.9096 / 0.9142, 89.5 %, 5
    # (the myocardium alone: acdc_cine 0.8247 / 0.8367 / 0.8463 / 0.8599 / 0.8534 -> 0.8265 / 0.8424 /
    # 0.8494 / 0.8619 / 0.8528; cmr_bssfp 0.8212 / 0.8465 / 0.8561 / 0.8729 / 0.8876 -> 0.8212 / 0.8476 /
    # 0.8627 / 0.8768 / 0.8826). No ring on chaos_t2 or btcv_ct (docs/corrections.md).
    ring_thickness: str = "interpolated"
    # ... and, with ring_bins > 0, as thick direction by direction as the ring supports are: the
    # support's band thickness in ring_bins sectors around its hole's centre (rings.ring_profile,
    # the 90th percentile of the ring's distances to the hole in each sector, scaled so that the
    # band around the support's own hole has the ring's area) scales the band on every slice, between
    # ring supports as ring_thickness says (a septum thinner than the lateral wall stays so). 0: the
    # same thickness all round. Around the true blood pool (ground truth only, each set's middle
    # slice as support): cmr_bssfp myocardium 0.875 all round, 0.891 / 0.893 / 0.892 with 8 / 16 /
    # 32 sectors; acdc_cine 0.878, 0.883 / 0.882 / 0.880. `benchmarks/out_of_sample.py
    # ../shared/data/cmr_bssfp ../shared/data/acdc_cine --vary volume.ring_bins 8 16`: whole volume
    # 0.8657 / 0.8912 (0) -> 0.8669 / 0.8930 (8) / 0.8668 / 0.8922 (16); each set's choice made on the
    # other is 8. Corrections (`benchmarks/corrections_fast.py DATA OUT 5 --set volume.ring_bins=8`),
    # k = 0..5, steps held, down by more than 0.02: cmr_bssfp 0.8459 / 0.8697 / 0.8903 / 0.9016 /
    # 0.9109 / 0.9142, 89.5 %, 5 -> 0.8472 / 0.8711 / 0.8934 / 0.9043 / 0.9121 / 0.9215, 89.5 %, 3;
    # acdc_cine 0.8756 / 0.9036 / 0.9161 / 0.9216 / 0.9258 / 0.9207, 86.7 %, 14 -> 0.8776 / 0.9084 /
    # 0.9226 / 0.9296 / 0.9351 / 0.9322, 87.6 %, 13. No ring on chaos_t2 or btcv_ct. The wall's
    # percentile per sector, 75 / 90 / 100 (`--vary` on the same two sets, built and removed): cmr_bssfp
    # 0.8670 / 0.8669 / 0.8666, acdc_cine 0.8930 / 0.8930 / 0.8932: flat; 90 stays.
    ring_bins: int = 8
    # A ring's outer edge fitted to the slice's grey values (rings.GreyFit): in ring_fit_sectors
    # sectors around the hole, the band's limit moves between ring_fit_range[0] and [1] of its
    # reach for as long as ring_fit_share of the pixels it takes in lie in the wall's grey range
    # (the mean of the label's support paint's 5-95th percentile and the slice's band's own). Where the
    # myocardium's band went wrong (cmr_bssfp, saved runs): 8050 of its wrong pixels lay outside
    # the wall, 7581 of the wall's missed ones were left to the background; an oracle of one
    # thickness per slice gave 0.8164 -> 0.849, one per sector 0.906. Measured with
    # `/tmp/s16/dump.py`-style saved runs (each organ painted on its middle slice; the myocardium's
    # whole-volume Dice, cmr_bssfp / acdc_cine, from 0.8164 / 0.8367):
    #   range 0.8-1.25 0.8184 / 0.8502; 0.7-1.25 0.8162 / 0.8462; 0.8-1.4 0.8070 / 0.8451;
    #   0.85-1.25 0.8182 / 0.8520; 0.85-1.2 0.8224 / 0.8514; 0.9-1.15 0.8239 / 0.8505;
    #   (0.8-1.25) share 0.5 0.8156 / 0.8458, 0.8 0.8180 / 0.8484; 16 sectors 0.8193 / 0.8495.
    # Each set's best range chosen on the other: cmr_bssfp gets 0.85-1.25 (+0.0018), acdc_cine
    # 0.9-1.15 (+0.0138); 0.85-1.2 taken, between them and within 0.0015 of each set's best. Whole
    # volume (every label): cmr_bssfp 0.8755 -> 0.8776, acdc_cine 0.8939 -> 0.8989; no other set has a
    # ring (chaos_t2 and btcv_ct label volumes identical). Corrections (`benchmarks/corrections_fast.py
    # DATA OUT 3`), Dice after k = 0..3, held (same slices), down by more than 0.02: cmr_bssfp 0.8570 /
    # 0.8874 / 0.9054 / 0.9158, 96.8 % (98.4 %), 0 -> 0.8595 / 0.8910 / 0.9063 / 0.9195, 96.8 %
    # (98.4 %), 0; acdc_cine 0.8786 / 0.9143 / 0.9229 / 0.9333, 92.9 % (96.8 %), 4 -> 0.8846 / 0.9187 /
    # 0.9254 / 0.9350, 91.3 % (98.4 %), 5, all 11 falls the scoring's (corrections_why.py).
    ring_fit_grey: bool = True
    # ... and a ring's band (its grey fit and its gate's range) reads each slice's grey values
    # normalised on that slice alone (its own intensity.mr_percentiles; intensity.normalize_each_slice),
    # not the volume's: within a volume, on MR.
    # Measured with `synpo evaluate DATA --no-baselines --device cpu --features sam` (whole volume, the
    # means of results.csv; twentieth session, `/tmp` wrappers, then as built): cmr_bssfp 0.8804 ->
    # 0.8805, acdc_cine 0.8994 -> 0.9023 (its myocardium 0.8514 -> 0.8598), chaos_t2 and btcv_ct
    # without a ring. Chosen on cmr_bssfp (+0.0001), reported on acdc_cine. Corrections
    # (`benchmarks/corrections_fast.py DATA OUT 3 --set volume.ring_grey_per_slice=false|true`), Dice
    # after k = 0..3, held (same slices), down by more than 0.02: cmr_bssfp 0.8630 / 0.8959 / 0.9118 /
    # 0.9255, 96.8 % (98.4 %), 0 -> 0.8631 / 0.8961 / 0.9122 / 0.9260, 98.4 % (100 %), 0; acdc_cine
    # 0.8853 / 0.9205 / 0.9269 / 0.9351, 89.7 % (96.0 %), 3 (0) -> 0.8886 / 0.9211 / 0.9259 / 0.9341,
    # 88.9 % (95.2 %), 3 (0). Every grey-value rule on slice-wise values (gate, rim, ring): chaos_t2
    # 0.9133, cmr_bssfp 0.8802, acdc_cine 0.9039 (not taken: CHAOS and cmr_bssfp lower); the encoder
    # given slice-wise values too: 0.9021 / 0.8731 / 0.9036, the encoder alone 0.9041 / 0.8728 /
    # 0.8991 (docs/research.md).
    ring_grey_per_slice: bool = True
    # Each label's mask grown by one pixel into the background whose grey value lies within the
    # edge_grow_percentiles of the label's paint on the nearest support slice (assembly.grow_edges;
    # rings excluded, painted slices kept; the rim is not what an Update's walks are judged against):
    # LiteMedSAM's masks run a little small. Offline on saved runs (each organ painted on its middle
    # slice; rings left out), mean whole-volume Dice chaos_t2 / cmr_bssfp / acdc_cine / btcv_ct 13 from
    # 0.9105 / 0.8776 / 0.8989 / 0.7753: percentiles 5-95 0.9146 / 0.8811 / 0.8989 / 0.7749; 10-90
    # 0.9137 / 0.8804 / 0.8994 / 0.7762; 15-85 0.9126 / 0.8798 / 0.8995 / 0.7766; 20-80 0.9116 / 0.8794
    # / 0.8996 / 0.7765; 25-75 0.9113 / 0.8790 / 0.8995 / 0.7763; 2-98 0.9141 / 0.8814 / 0.8983 / 0.7723;
    # two pixels at 10-90 0.9133 / 0.8813 / 0.8978 / 0.7730; the myocardium grown too (5-95) cost it
    # 0.0018 / 0.0045. Each set's percentiles chosen on the other three: 10-90 for chaos_t2 and
    # cmr_bssfp, 5-95 for acdc_cine and btcv_ct (+0.0000, -0.0004); 10-90 taken, the best mean over
    # the four (0.8674; 5-95 0.8674, 15-85 0.8671) and above the defaults on every set. In the pipeline
    # (`synpo evaluate`): 0.9138 / 0.8804 / 0.8994, and on CT (edge_grow_ct) btcv_ct 0.7763 (liver,
    # kidneys and spleen 0.9505 -> 0.9504; oesophagus 0.708 -> 0.689, gallbladder 0.780 -> 0.772,
    # portal and splenic veins 0.481 -> 0.491, adrenals 0.591 / 0.646 -> 0.603 / 0.650).
    edge_grow: bool = True
    # ... on CT too ("ct" and "ct-windowed" volumes). Off: on CT the rim gave btcv_ct +0.0010 (its
    # oesophagus and gallbladder lose, a thin tube's rim being its neighbour's wall) and cost the
    # bundled CT sample (`synpo demo`, 5 organs) 0.925 -> 0.917, while every MR set gained.
    edge_grow_ct: bool = False
    edge_grow_percentiles: Tuple[float, float] = (10.0, 90.0)
    ring_fit_range: Tuple[float, float] = (0.85, 1.2)
    ring_fit_share: float = 0.7
    ring_fit_sectors: int = 12
    # After a correction, a ring's walks (its filled shape's and its hole's) keep the previous run's
    # filled shape and hole where they end short of the previous run's reach, as the other labels'
    # walks do (correction_keeps_reach; rings.ring_reach): a myocardium corrected on slice 4 whose
    # filled shape's walk judged slice 0 "too small" lost slice 0, and its blood pool with it (acdc_cine
    # image_6, where it does not act: the filled shape's walk had shrunk to 221 px on slice 1, under
    # min_overlap_first of the previous 2302 px on slice 0). `benchmarks/corrections_fast.py DATA OUT 5
    # --set volume.ring_keeps_reach=B`, k = 0..5, steps held, down by more than 0.02, worst step,
    # false -> true: acdc_cine 0.8776 / 0.9084 / 0.9226 / 0.9296 / 0.9351 / 0.9322, 87.6 %, 13, -0.128
    # -> ... / 0.9351, 87.6 %, 12, -0.067 (one organ-step: image_8's myocardium after 5, 0.760 ->
    # 0.882); cmr_bssfp 0.8472 / 0.8711 / 0.8934 / 0.9043 / 0.9121 / 0.9215, 89.5 %, 3 either way. No
    # ring on chaos_t2 or btcv_ct; a first run has no previous run: one-shot figures cannot change.
    ring_keeps_reach: bool = True
    # A ring's band is drawn around the label it encloses (the blood pool inside the myocardium) on
    # the slices where that label is found or painted, instead of around the hole walked from the
    # ring's own supports (assembly.band_around_enclosed): after corrections the two walks start
    # from different paints, and a hole walked from a myocardium's correction can lose the blood
    # pool that the pool's own walk, painted nearby, holds (acdc_cine image_6's myocardium after 2
    # corrections 0.700 -> 0.877). A first run: both walks start from the same paint (no slice
    # changed on cmr_bssfp or ACDC). `benchmarks/corrections_fast.py DATA OUT 3 --set
    # volume.ring_around_enclosed=B`, k = 0..3, steps held, down by more than 0.02, false -> true:
    # acdc_cine 0.8786 / 0.9121 / 0.9153 / 0.9280, 92.1 %, 6 -> 0.8786 / 0.9143 / 0.9221 / 0.9321,
    # 92.9 %, 4 (chosen here); cmr_bssfp 0.8570 / 0.8857 / 0.9028 / 0.9091, 95.2 %, 1 -> 0.8570 /
    # 0.8856 / 0.9021 / 0.9098, 95.2 %, 1. No ring on chaos_t2 or btcv_ct.
    ring_around_enclosed: bool = True
    # Cross-patient (a support from another volume): prompts are searched only where the
    # support's box falls relative to the body (position.py), widened by position_margin
    # x the query body's size.
    position_prior: bool = True
    position_margin: float = 0.1
    # Encoder batch size on CPU; on CUDA it is sized to free memory. On a CPU a
    # batch buys no speed (LiteMedSAM, 2 cores: 1.47 s/slice at batch 1, 1.93 at 2,
    # 2.18 at 8) and costs memory (activations: ~0.35 GB per slice in the batch).
    batch_size: int = 1
    # Labels (organs) walked at the same time, in threads: one label's prompt selection and
    # mask clean-up (numpy) run while another's SAM decoder runs (torch). 2-core CPU,
    # decoding 24 slices: one at a time 2.08 s, two workers 1.66 s. 0 = auto (volume.label_worker_count):
    # on a CPU one worker per CPU thread torch uses (at most one per label), each decoding on one
    # thread: the decoder hardly gains from a second thread of its own, the labels do. BTCV
    # image_2, every organ's first correction at once (13 labels, 304 slices decoded; /tmp script
    # over Session.add_support on the 2-core development CPU): 1 worker with both threads 26.3 s,
    # 2 workers with one each 14.9-16.1 s, 3 / 4 workers (more than the cores) 16.4 / 18.3 s. On a
    # GPU 2, as before (not measured there). Not measured beyond 2 cores (no such machine here).
    label_workers: int = 0


@dataclass(frozen=True)
class GateConfig:
    # Intensity gate (gate.py): pixels of a decoded mask whose smoothed grey value lies outside
    # the support organ's range are dropped. The range: the `quantiles` of the support masks'
    # values, widened on each side by `margin` x their distance. Only within a volume (a support
    # painted on this scan): another scan's MR grey values are not on the same scale.
    enabled: bool = True
    quantiles: Tuple[float, float] = (0.02, 0.98)
    margin: float = 0.25
    # Gaussian smoothing of the image before the comparison, in pixels.
    sigma_px: float = 1.0
    # Of the gated mask, components of at least this fraction of the largest are kept. 0 (every
    # component): near an organ's end the gated mask falls apart into pieces that are all organ
    # (CHAOS, support at 1/6 of the organ: 0.1 -> 0.7566 whole volume, 0 -> 0.7672; at 1/2 the same).
    min_component: float = 0.0
    # The gate for a support painted on another scan too (its range from that scan).
    cross: bool = False
    # Only what a walk's mask adds beyond the neighbouring slice's mask is gated; the pixels inside
    # it are kept whatever their grey value (an organ whose other slices hold tissue the support
    # slice lacks: a CT kidney's darker medulla and pelvis below or above a cortex-only support).
    # OFF: BTCV image_0's right kidney 0.831 -> 0.943 (liver, kidneys, spleen 0.945 -> 0.950), but
    # benchmarks/out_of_sample.py, whole volume, CHAOS / cardiac / ACDC / BTCV (13 organs): 0.9110 /
    # 0.8622 / 0.8623 / 0.7270 -> 0.9088 / 0.8612 / 0.8660 / 0.7285: out of sample it nets nothing
    # (docs/research.md, issue 25).
    beyond_previous: bool = False


@dataclass(frozen=True)
class SynPoConfig:
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def with_(self, **sections) -> "SynPoConfig":
        """Replace fields inside sections: cfg.with_(prompts={"top_k": 32})."""
        updated = {}
        for name, changes in sections.items():
            if not hasattr(self, name):
                raise SynPoError("unknown config section %r" % name)
            section = getattr(self, name)
            hints = get_type_hints(type(section))
            for key, value in changes.items():
                if not hasattr(section, key):
                    raise SynPoError("unknown config field %s.%s" % (name, key))
                if not _fits(value, hints[key]):
                    raise SynPoError("config field %s.%s wants %s, got %r" % (
                        name, key, hints[key].__name__ if isinstance(hints[key], type)
                        else str(hints[key]).replace("typing.", ""), value))
            updated[name] = replace(section, **changes)
        return replace(self, **updated)


def _fits(value, hint) -> bool:
    """Whether a value suits a field annotated `hint` (an int where a float goes is fine)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_fits(v, a) for v, a in zip(value, args)))
    if hint is float:              # (finite: json reads 1e400 and "Infinity" as inf, NaN as nan)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def validate(cfg: SynPoConfig) -> SynPoConfig:
    """Reject nonsense values with a clear message."""
    p, c, v = cfg.prompts, cfg.confidence, cfg.volume
    checks = [
        (p.top_k >= 1, "prompts.top_k must be >= 1"),
        (p.n_positive_points >= 1, "prompts.n_positive_points must be >= 1"),
        (p.n_negative_points >= 0, "prompts.n_negative_points must be >= 0"),
        (p.negative_sigma > 0, "prompts.negative_sigma must be > 0"),
        (0.0 <= p.box_threshold <= 1.0, "prompts.box_threshold must be in [0, 1]"),
        (cfg.decode.refine_box_margin >= 0.0, "decode.refine_box_margin must be >= 0"),
        (0.0 <= cfg.decode.refine_blend <= 1.0, "decode.refine_blend must be in [0, 1]"),
        (cfg.decode.window_margin is None or cfg.decode.window_margin >= 0.0,
         "decode.window_margin must be >= 0 (or None: the whole slice)"),
        (cfg.decode.attend_margin is None or cfg.decode.attend_margin >= 0.0,
         "decode.attend_margin must be >= 0 (or None: every embedding cell)"),
        (cfg.decode.attend_cells >= 0, "decode.attend_cells must be >= 0"),
        (c.n_prototypes >= 1, "confidence.n_prototypes must be >= 1"),
        (c.n_prototypes_cross >= 1, "confidence.n_prototypes_cross must be >= 1"),
        (0.0 <= c.sam_weight <= 1.0, "confidence.sam_weight must be in [0, 1]"),
        (v.batch_size >= 1, "volume.batch_size must be >= 1"),
        (v.label_workers >= 0, "volume.label_workers must be >= 0 (0: one per CPU thread)"),
        (0.0 <= v.piece_fraction <= 1.0, "volume.piece_fraction must be in [0, 1]"),
        (0.0 < v.piece_holds <= 1.0, "volume.piece_holds must be in (0, 1]"),
        (0.0 <= v.ring_min_hole < 1.0, "volume.ring_min_hole must be in [0, 1)"),
        (v.ring_thickness in ("mean", "interpolated"), "volume.ring_thickness must be mean or interpolated"),
        (v.ring_bins == 0 or v.ring_bins >= 3, "volume.ring_bins must be 0 (off) or at least 3 sectors"),
        (len(v.ring_fit_range) == 2 and 0.0 < v.ring_fit_range[0] <= 1.0 <= v.ring_fit_range[1],
         "volume.ring_fit_range must be [low, high] with 0 < low <= 1 <= high"),
        (0.0 < v.ring_fit_share < 1.0, "volume.ring_fit_share must be in (0, 1)"),
        (len(v.edge_grow_percentiles) == 2 and 0.0 <= v.edge_grow_percentiles[0] < v.edge_grow_percentiles[1] <= 100.0,
         "volume.edge_grow_percentiles must be [low, high] with 0 <= low < high <= 100"),
        (v.ring_fit_sectors >= 3, "volume.ring_fit_sectors must be at least 3"),
        (0.0 <= v.min_confidence_ratio <= 1.0, "volume.min_confidence_ratio must be in [0, 1]"),
        (0.0 <= v.min_confidence_ratio_first <= 1.0, "volume.min_confidence_ratio_first must be in [0, 1]"),
        (0.0 <= v.min_overlap_first <= 1.0, "volume.min_overlap_first must be in [0, 1]"),
        (v.left_retry >= 0.0, "volume.left_retry must be >= 0"),
        (0.0 <= v.left_retry_holds <= 1.0, "volume.left_retry_holds must be in [0, 1]"),
        (v.overlap_tolerance_mm >= 0.0, "volume.overlap_tolerance_mm must be >= 0"),
        (0.0 <= v.overlap_tolerance_min_size <= 1.0, "volume.overlap_tolerance_min_size must be in [0, 1]"),
        (v.ownership in ("nearest", "agreement"), "volume.ownership must be nearest or agreement"),
        (0.0 <= v.gap_larger_arrival <= 1.0, "volume.gap_larger_arrival must be in [0, 1]"),
        (v.look_ahead in ("off", "jump", "any"), "volume.look_ahead must be off, jump or any"),
        (v.gap_choice in ("split", "paint_shape", "split_and_shape"),
         "volume.gap_choice must be split, paint_shape or split_and_shape"),
        (v.gap_confidence in ("own", "nearest", "blend"), "volume.gap_confidence must be own, nearest or blend"),
        (0.0 <= v.falling_ratio <= 1.0, "volume.falling_ratio must be in [0, 1] (0: off)"),
        (v.falling_steps >= 1, "volume.falling_steps must be >= 1"),
        (0.0 <= v.sudden_area_change <= 1.0, "volume.sudden_area_change must be in [0, 1] (0: off)"),
        (0.0 <= v.tip_ratio <= 1.0, "volume.tip_ratio must be in [0, 1] (0: off)"),
        (v.sudden_after >= 0.0, "volume.sudden_after must be >= 0"),
        (v.sudden_ratio >= 0.0, "volume.sudden_ratio must be >= 0"),
        (v.regrow_after == 0.0 or v.regrow_after > 1.0, "volume.regrow_after must be 0 (off) or > 1"),
        (v.drift_min_fraction >= 0.0, "volume.drift_min_fraction must be >= 0"),
        (0.0 < v.regrow_below <= 1.0, "volume.regrow_below must be in (0, 1]"),
        (v.regrow_reference in ("paint", "peak"), "volume.regrow_reference must be paint or peak"),
        (v.regrow_min_cm2 >= 0.0, "volume.regrow_min_cm2 must be >= 0"),
        (v.search_growing_slices >= 0.0, "volume.search_growing_slices must be >= 0 (0: off)"),
        (v.search_growing_ratio > 0.0, "volume.search_growing_ratio must be > 0"),
        (v.correction_past_end_growth >= 0.0, "volume.correction_past_end_growth must be >= 0 (0: off)"),
        (v.correction_outgrows_previous == 0.0 or v.correction_outgrows_previous >= 1.0,
         "volume.correction_outgrows_previous must be 0 (off) or >= 1"),
        (0.0 <= v.correction_keep_iou <= 1.0, "volume.correction_keep_iou must be in [0, 1]"),
        (0.0 <= v.correction_agree_iou <= 1.0, "volume.correction_agree_iou must be in [0, 1] (0: off)"),
        (0.0 <= v.correction_trust_iou <= 1.0, "volume.correction_trust_iou must be in [0, 1]"),
        (0.0 <= v.correction_collision <= 1.0, "volume.correction_collision must be in [0, 1]"),
        (v.walk_spacing_mm >= 0.0, "volume.walk_spacing_mm must be >= 0 (0: every slice)"),
        (0.0 <= cfg.gate.quantiles[0] < cfg.gate.quantiles[1] <= 1.0,
         "gate.quantiles must be two fractions, low < high, in [0, 1]"),
        (cfg.gate.margin >= 0.0, "gate.margin must be >= 0"),
        (cfg.gate.sigma_px >= 0.0, "gate.sigma_px must be >= 0"),
        (0.0 <= cfg.gate.min_component <= 1.0, "gate.min_component must be in [0, 1]"),
        (cfg.intensity.modality in ("auto", "ct", "mr"), "intensity.modality must be auto, ct or mr"),
    ]
    for ok, message in checks:
        if not ok:
            raise SynPoError(message)
    return cfg


# `synpo cohort` on a local cluster: torch threads per worker process (one volume at a time each);
# the workers are the cores / this. CHAOS, reference image_1, 4 volumes, 2 busy cores (docs/cohort.md):
# 1 worker x 2 threads 233.8 s, 2 workers x 1 thread 237.6 s: no difference measured; 1 keeps the most
# volumes in flight.
COHORT_THREADS_PER_WORKER = 1

DEFAULT_CONFIG = SynPoConfig()


def default_config(modality: Optional[str] = None) -> SynPoConfig:
    cfg = DEFAULT_CONFIG
    if modality is not None:
        cfg = cfg.with_(intensity={"modality": modality})
    return validate(cfg)


def parse_overrides(items: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """["prompts.top_k=32", "decode.window_margin=null"] -> {"prompts": {"top_k": 32}, ...}
    (values are read as JSON where they parse as JSON; lists become tuples)."""
    out: Dict[str, Dict[str, object]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SynPoError("--set wants SECTION.FIELD=VALUE, got %r" % item)
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        out.setdefault(section, {})[name] = parsed
    return out


def configured(items: Sequence[str] = (), modality: Optional[str] = None) -> SynPoConfig:
    """The defaults with command-line overrides (--set SECTION.FIELD=VALUE) applied, validated."""
    cfg = default_config(modality)
    overrides = parse_overrides(items)
    return validate(cfg.with_(**overrides)) if overrides else cfg
