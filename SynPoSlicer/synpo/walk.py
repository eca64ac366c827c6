"""The walk: from a start slice outwards, one slice at a time, until the target is judged absent.

Each query slice is decoded with prompts taken from its own confidence map, restricted to a search
region around the mask of the slice next to it (towards the start); whether the target is still
there is judged by the stop rules of walk_rules.py. The first slice judged "target absent" ends the
walk in that direction (an organ is one contiguous run of slices), so slices beyond it come out
empty. A neighbouring mask in several pieces is also decoded piece by piece (volume.piece_fraction,
_Context.decode_pieces, grown_together). Who walks which slices, between several starts, is
ownership.py's.
"""
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .config import SynPoConfig
from .embeddings import EmbeddingStore
from .errors import Cancelled
from .gate import apply_gate
from .interpolate import between as interpolate_between, shift_mask
from .prompts import Prompts, _kmeans_points, box_of, select_prompts, top_k_pixels, widen
from .result import SliceRecord
from .slice_confidence import SliceConfidence
from .walk_rules import Judge, Step, judge_step

# Called as each slice's decision is made: (record, its mask in the slice frame or None). Labels are
# walked in parallel threads, so it is called from those threads. A slice reported here is
# provisional: the result may still change it (labels overlapping, an enclosed label outside its
# encloser), and the VolumeResult is what counts.
SliceReport = Callable[[SliceRecord, Optional[np.ndarray]], None]


def _search_region(prev: np.ndarray, margin: float, min_px: int) -> np.ndarray:
    ys, xs = np.nonzero(prev)
    H, W = prev.shape
    region = np.zeros_like(prev, dtype=bool)
    if len(xs) == 0:
        region[:] = True
        return region
    my = max(min_px, int(round(margin * (ys.max() - ys.min() + 1))))
    mx = max(min_px, int(round(margin * (xs.max() - xs.min() + 1))))
    region[max(0, ys.min() - my):min(H, ys.max() + 1 + my), max(0, xs.min() - mx):min(W, xs.max() + 1 + mx)] = True
    return region


def drift_of(before: Optional[np.ndarray], prev: Optional[np.ndarray]):
    """(rows, columns) from before's centre to prev's: how far the walk moved in plane over its last
    step (None without two non-empty masks)."""
    if before is None or prev is None or not before.any() or not prev.any():
        return None
    a, b = np.argwhere(before).mean(0), np.argwhere(prev).mean(0)
    return (float(b[0] - a[0]), float(b[1] - a[1]))


def follows(vc, prev: Optional[np.ndarray], drift) -> bool:
    """Whether a step follows the walk's drift (volume.follow_drift): the mask's centre is expected to
    move by at least volume.drift_min_fraction of the mask's size (the square root of its area) from
    prev's slice to the slice decoded. A thin-slice walk's jump (volume.walk_spacing_mm, 3 mm) spans
    about the distance of one 3 mm slice, on which the fraction was chosen."""
    return bool(vc.follow_drift and prev is not None and drift is not None
                and np.hypot(*drift) >= vc.drift_min_fraction * np.sqrt(prev.sum()))


def _record(label: int, index: int, status: str, prompts: Optional[Prompts] = None, score: float = 0.0,
            sam_iou: float = 0.0, box=None) -> SliceRecord:
    rec = SliceRecord(label, index, status, float(score), float(sam_iou))
    if prompts is not None:
        rec.positive = np.asarray(prompts.positive, dtype=float).tolist()
        rec.negative = np.asarray(prompts.negative, dtype=float).tolist()
        rec.box = [int(v) for v in box] if box is not None else None
    return rec


def decode_prompted(sam, store: "EmbeddingStore", t: int, conf: np.ndarray, cfg: SynPoConfig,
                    region: Optional[np.ndarray] = None, expected: Optional[np.ndarray] = None, gate_range=None,
                    timings: Optional[Dict[str, float]] = None, prev: Optional[np.ndarray] = None):
    """SynPo's per-slice step: prompts from slice t's confidence map `conf` (H, W) within `region`
    (select_prompts; the same inputs again reuse the store's PromptCache), SAM's decoding (reused
    when these inputs were decoded before) and the intensity gate (with gate.beyond_previous, only
    on what the mask adds beyond `prev`, the neighbouring slice's mask). Returns (mask, SAM's IoU,
    box, prompts); adds its seconds to timings["prompts"] and timings["decode"] when given."""
    t0 = time.perf_counter()
    cache = getattr(store, "prompts", None)           # an EmbeddingStore's PromptCache (re-runs)
    if cache is None:
        prompts = select_prompts(conf, cfg.prompts, region, expected)
    else:
        prompts = cache.get_or_select(cache.key(t, conf, cfg.prompts, region, expected),
                                      lambda: select_prompts(conf, cfg.prompts, region, expected))
    return decode_given(sam, store, t, prompts, cfg, gate_range, timings, prev, time.perf_counter() - t0)


def decode_given(sam, store: "EmbeddingStore", t: int, prompts: Prompts, cfg: SynPoConfig, gate_range=None,
                 timings: Optional[Dict[str, float]] = None, prev: Optional[np.ndarray] = None,
                 prompt_seconds: float = 0.0):
    """Slice t decoded from the given prompts (reused when decoded before) and gated as in
    decode_prompted: (mask, SAM's IoU, box, prompts); prompt_seconds (choosing the prompts) and the
    decoding's seconds are added to timings when given."""
    t1 = time.perf_counter()
    mask, sam_iou, box = store.decode(sam, t, prompts, cfg.decode)
    if gate_range is not None:
        keep = prev if cfg.gate.beyond_previous and prev is not None and prev.shape == mask.shape else None
        mask = apply_gate(mask, store.slices[t], gate_range, cfg.gate, keep)
    if timings is not None:
        timings["prompts"] += prompt_seconds
        timings["decode"] += time.perf_counter() - t1
    return mask, sam_iou, box, prompts


class _Context:
    """What the per-label propagation needs, bundled."""

    def __init__(self, sam, embeds, conf, cfg, timings, cancel, tick, gate_range=None,
                 on_slice: Optional[SliceReport] = None, absent: Sequence[int] = (), judge: Judge = judge_step,
                 stride: int = 1, spacing_rc=(1.0, 1.0), held: Sequence[int] = (), previous=None,
                 others: Optional[np.ndarray] = None, hard_held: Sequence[int] = (),
                 reach: Optional[np.ndarray] = None, slice_mm: float = 0.0,
                 agree: Optional[Dict[int, np.ndarray]] = None):
        self.sam, self.embeds, self.conf, self.cfg = sam, embeds, conf, cfg
        self.judge = judge
        self.stride, self.spacing_rc = stride, spacing_rc   # walk every stride-th slice (thin slices)
        self.slice_mm = slice_mm                 # the distance between neighbouring slices (0: unknown)
        self.pixel_mm2 = float(spacing_rc[0]) * float(spacing_rc[1])    # one pixel's area (mm^2)
        self.timings, self.cancel, self.tick = timings, cancel, tick
        self.gate_range = gate_range             # the target's grey-value range (gate.py), or None
        self.on_slice = on_slice
        self.absent = set(absent)                # slices the user marked "target absent": walks end there
        self.held = set(held) - self.absent      # the previous run's ends, kept for a correction's walks
        # (slices, label): the previous run's label volume (slicing axis first) for a correction's
        # walks: where such a walk parts from it entirely, the previous masks are kept (keep_previous).
        self.previous = previous
        # The previous run's label volume (slicing axis first) when a held end is not a hard end
        # (volume.correction_collision > 0): past it the walk goes on while its masks stay off the
        # other labels' previous voxels.
        self.others = others if others is not None and cfg.volume.correction_collision > 0 else None
        self.hard_held = set(hard_held) & self.held     # held ends that stay hard even so
        # The previous run's label volume (slicing axis first) in a re-run after corrections
        # (volume.correction_keeps_reach): a walk beyond the outermost support that ends where the
        # previous run still found the label keeps the previous masks from there (keep_reach).
        self.reach = reach
        # With reach, the label's own previous walks (not a ring's derived shapes): {slice: the voxels
        # of its walked mask the assembly gave away} (VolumeResult.overridden; None: off). A walk that
        # agrees with its previous masks ends there and keeps them beyond (keep_agreed).
        self.agree = agree if reach is not None else None

    def previous_own(self, label: int, u: int) -> np.ndarray:
        """The label's own previous walked mask on slice u: its previous voxels and what the
        assembly gave away of its mask there (self.agree)."""
        own = self.reach[u] == label
        extra = self.agree.get(u) if self.agree else None
        return own | extra if extra is not None else own

    def search_min_px(self, history=()) -> int:
        """The search region's least margin (pixels) for the next slice: volume.search_min_px, and
        while the walk's masks grow or hold (the last accepted mask over volume.search_growing_ratio
        x the one before it) at least volume.search_growing_slices x the distance between neighbouring
        slices, in plane (a boundary inclined at 58 degrees to the slices moves in plane by 1.6 x that
        distance from one slice to the next: a growing organ is not cut at the previous mask's box)."""
        vc = self.cfg.volume
        growing = len(history) >= 2 and history[-1][0] > vc.search_growing_ratio * history[-2][0]
        if not growing or vc.search_growing_slices <= 0 or self.slice_mm <= 0:
            return vc.search_min_px
        pixel = float(np.mean(self.spacing_rc)) or 1.0
        return max(vc.search_min_px, int(round(vc.search_growing_slices * self.slice_mm / pixel)))

    def hard_end(self, u: int) -> bool:
        """Slice u ends every walk of this context without decoding (marked absent, or a held end)."""
        return u in self.absent or (u in self.held and (self.others is None or u in self.hard_held))

    def collides(self, label: int, t: int, mask: np.ndarray) -> int:
        """The other label whose previous voxels hold more than correction_collision of `mask` on
        slice t (0: none)."""
        area = int(mask.sum())
        if not area:
            return 0
        under = self.others[t][mask]
        under = under[(under != 0) & (under != label)]
        if len(under) <= self.cfg.volume.correction_collision * area:
            return 0
        values, counts = np.unique(under, return_counts=True)
        return int(values[np.argmax(counts)])

    def near(self, prev: Optional[np.ndarray], start_area: int = 0) -> Optional[np.ndarray]:
        """`prev` grown by volume.overlap_tolerance_mm in plane (what "inside the previous mask"
        means for the overlap rule); not grown where prev has shrunk under
        volume.overlap_tolerance_min_size of the walk's start mask (`start_area` px): an organ's
        tapering end, where a step onto a touching neighbour would hug the last mask."""
        vc = self.cfg.volume
        tol = vc.overlap_tolerance_mm
        if prev is None or tol <= 0 or not prev.any():
            return prev
        if start_area and prev.sum() < vc.overlap_tolerance_min_size * start_area:
            return prev
        return ndimage.distance_transform_edt(~prev, sampling=self.spacing_rc) <= tol

    def prefetch(self, indices: Sequence[int]) -> None:
        """The next slices of a walk are embedded when it reaches them, a batch at a time (a
        confidence given as a ready array, as tests do, needs nothing)."""
        if isinstance(self.conf, SliceConfidence) or hasattr(self.conf, "prepare"):   # (GapConfidence too)
            self.conf.prepare(indices)

    def report(self, rec: SliceRecord, mask: Optional[np.ndarray]) -> None:
        if self.on_slice is not None:
            self.on_slice(rec, mask)

    def decode(self, label: int, t: int, prev: Optional[np.ndarray], min_area: float,
               prev_score: Optional[float] = None, expected: Optional[np.ndarray] = None, first: bool = False,
               tick: bool = True, history=(), drift=None):
        """Decode slice t next to `prev` (the neighbouring mask, None for a first slice) and judge
        whether the target is there (self.judge: walk_rules.judge_step); prev_score is the
        neighbouring mask's mean confidence; expected, the target's guessed shape (select_prompts);
        first: prev is a painted slice; tick: count the slice as done (a walk's trial jump does not);
        history: (area, score) of the walk's accepted slices up to prev (walk_rules.Step.history);
        drift: (rows, columns) the walk's mask is expected to move from prev's slice to t (drift_of;
        None: unknown)."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")
        vc = self.cfg.volume
        # A structure moving in plane (volume.follow_drift): the previous mask moved as the walk's
        # last step moved it widens the search region and counts for the overlap rule.
        moved = shift_mask(prev, drift) if follows(vc, prev, drift) else None
        region = self.region_of(prev, history, moved) if prev is not None else None
        mask, sam_iou, box, prompts = decode_prompted(self.sam, self.embeds, t, self.conf[t], self.cfg,
                                                      region, expected, self.gate_range, self.timings, prev)
        pieces = pieces_of(prev, vc.piece_fraction) if prev is not None else []
        note = ""
        if len(pieces) > 1:
            parts = self.decode_pieces(t, pieces, expected, history, drift if moved is not None else None)
            if grown_together(mask, parts[0], vc.piece_holds):
                note = "%d pieces of the previous mask grown together: decoded as one" % len(pieces)
            else:
                mask, sam_iou, box, prompts = parts
                note = "%d pieces of the previous mask, each decoded" % len(pieces)
        if tick:
            self.tick()

        def judged(mask, sam_iou):
            area = int(mask.sum())
            score = float(self.conf[t][mask].mean()) if area else 0.0
            near = self.near(prev, history[0][0] if history else 0)
            overlap = float(np.logical_and(mask, near).sum() / area) if prev is not None and area else 0.0
            if moved is not None and moved.any() and area:
                overlap = max(overlap, float(np.logical_and(mask, self.near(moved, history[0][0] if history else 0)
                                                            ).sum() / area))
            reason = self.judge(Step(label, t, first, mask, area, prev, min_area, score, prev_score, sam_iou,
                                     overlap, tuple(history), self.pixel_mm2), vc)
            return reason, score, overlap

        reason, score, overlap = judged(mask, sam_iou)
        # Holding its size: a walk's first step (history the paint alone) does; a start without history
        # (cross_start's carried-over guess) is not decoded again.
        if (reason == "left the previous mask" and vc.left_retry > 0 and prev is not None and prev.any()
                and history and (len(history) < 2 or history[-1][0] >= vc.left_retry_holds * history[-2][0])):
            again = self.decode_in_previous_box(t, moved if moved is not None and moved.any() else prev)
            if again is not None and vc.left_retry_holds * prev.sum() <= again[0].sum() <= prev.sum() / max(
                    vc.left_retry_holds, 1e-6):
                why2, score2, overlap2 = judged(again[0], again[1])
                if not why2:
                    mask, sam_iou, box, prompts = again
                    reason, score, overlap = why2, score2, overlap2
                    note = "decoded again in the previous mask's box (the confident region had left it)"
        rec = _record(label, t, "absent" if reason else "present", prompts, score, sam_iou, box)
        rec.overlap_prev, rec.reason = overlap, reason
        if note and not reason:
            rec.reason = note
        return (None if reason else mask), rec

    def decode_in_previous_box(self, t: int, prev: np.ndarray):
        """Slice t decoded with the box of `prev` (the neighbouring mask, or it moved by the walk's
        drift) widened by volume.left_retry of its size, the positives prev's most confident pixels
        on slice t, prev as the prompts' region (the refinement keeps the components that overlap it)
        and as what the intensity gate leaves alone: (mask, SAM's IoU, box, prompts), or None."""
        cfg = self.cfg
        t0 = time.perf_counter()
        conf = self.conf[t]
        positive = top_k_pixels(conf, cfg.prompts.top_k, prev)
        if len(positive) == 0:
            return None
        if cfg.prompts.kmeans:
            positive = _kmeans_points(positive, cfg.prompts.n_positive_points, cfg.prompts.seed)
        box = widen(box_of(prev), cfg.volume.left_retry, prev.shape)
        prompts = Prompts(np.asarray(positive, float), np.zeros((0, 2)), box, prev.copy())
        return decode_given(self.sam, self.embeds, t, prompts, cfg, self.gate_range, self.timings, prev,
                            time.perf_counter() - t0)

    def region_of(self, mask: np.ndarray, history, moved: Optional[np.ndarray] = None) -> np.ndarray:
        """The search region around `mask` (volume.search_margin, search_min_px), and around `moved`
        too (the mask moved with the walk's drift) when given."""
        margin, min_px = self.cfg.volume.search_margin, self.search_min_px(history)
        region = _search_region(mask, margin, min_px)
        if moved is not None and moved.any():
            region = region | _search_region(moved, margin, min_px)
        return region

    def decode_pieces(self, t: int, pieces: List[np.ndarray], expected, history, drift=None):
        """Slice t decoded once per piece of the neighbouring mask (each with the search region of
        its own piece, and of the piece moved by `drift` when the walk follows one): the union of
        the masks, SAM's IoU weighted by their areas, the union of the boxes, the prompts together."""
        out = []
        for piece in pieces:
            region = self.region_of(piece, history, shift_mask(piece, drift) if drift is not None else None)
            out.append(decode_prompted(self.sam, self.embeds, t, self.conf[t], self.cfg, region, expected,
                                       self.gate_range, self.timings, piece))
        mask = np.logical_or.reduce([o[0] for o in out])
        areas = np.array([o[0].sum() for o in out], dtype=float)
        sam_iou = float((areas * [o[1] for o in out]).sum() / areas.sum()) if areas.sum() else \
            float(max(o[1] for o in out))
        boxes = [o[2] for o in out if o[2] is not None]
        box = ((min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)) if boxes else None)
        prompts = Prompts(np.concatenate([np.asarray(o[3].positive, float).reshape(-1, 2) for o in out]),
                          np.concatenate([np.asarray(o[3].negative, float).reshape(-1, 2) for o in out]),
                          box, np.logical_or.reduce([o[3].region for o in out]))
        return mask, sam_iou, box, prompts


def grown_together(whole: np.ndarray, pieces: np.ndarray, holds: float) -> bool:
    """Whether the slice decoded as one (`whole`, one box over the previous mask) holds what the
    pieces decoded on their own found (at least `holds` of it) and more (they hold less than `holds`
    of it): pieces of one organ that grow together (a ventricle at its base), where each piece's
    own search region would cut the organ. Otherwise the pieces stand: the whole kept one piece
    (the prompts keep one confident component: a liver's left lobe lost) or lies elsewhere."""
    if not whole.any():
        return False
    both = int(np.logical_and(whole, pieces).sum())
    return both >= holds * int(pieces.sum()) and both < holds * int(whole.sum())


def pieces_of(mask: np.ndarray, fraction: float) -> List[np.ndarray]:
    """The mask's connected pieces of at least `fraction` of the largest, largest first ([mask] when
    fraction <= 0 or the mask is in one piece)."""
    if fraction <= 0:
        return [mask]
    lab, n = ndimage.label(mask)
    if n < 2:
        return [mask]
    sizes = ndimage.sum(mask, lab, np.arange(1, n + 1))
    order = np.argsort(-sizes, kind="stable")
    return [lab == 1 + int(i) for i in order if sizes[i] >= fraction * sizes[order[0]]]


def _walk(ctx: _Context, label: int, start: int, mask: np.ndarray, stop: int, step: int, min_area: float,
          masks: Dict[int, np.ndarray], records: List[SliceRecord], painted: bool = True) -> None:
    """Walk from `start` (whose mask is `mask`; painted: the user's paint) towards `stop` by `step`
    (+1 or -1). With ctx.stride > 1 (a thin-slice volume) the walk decodes every stride-th slice
    and fills the slices between by shape-based interpolation (interpolate.py); where a strided
    slice is judged absent, the slices up to it are walked one by one, so the organ's end is found
    slice by slice as without a stride."""
    prev, t = mask, start
    behind = None                                # (mask, slice) accepted before prev: the walk's drift

    def drift_to(x: int):
        """How far the walk's mask moves in plane from prev's slice to slice x, at the pace of its
        last step (drift_of over the slices between its last two accepted masks, scaled to the
        slices to x): None before two accepted masks."""
        moved = drift_of(behind[0], prev) if behind is not None and behind[1] != t else None
        if moved is None:
            return None
        scale = abs(x - t) / float(abs(t - behind[1]))
        return (moved[0] * scale, moved[1] * scale)
    prev_score = float(ctx.conf[start][mask].mean()) if mask.any() else None
    history = [(int(mask.sum()), prev_score if prev_score is not None else 0.0)]   # Step.history
    single_until = start                         # after a failed jump: single steps up to here
    # A re-run's walk towards the volume's end, beyond the outermost support: keep_reach judges it.
    towards_end = ctx.reach is not None and stop in (-1, len(ctx.reach))
    # How much larger the paint is than the previous run's mask of the label on the paint's slice
    # (keep_reach's volume.correction_outgrows_previous: a walk may outgrow the previous masks by
    # as much as the paint outgrew them; inf where the previous run had nothing there).
    before = int((ctx.reach[start] == label).sum()) if towards_end and painted else 0
    outgrown = max(1.0, mask.sum() / before) if before else float("inf")
    past_held = False                            # past a held end (volume.correction_collision)

    def ahead(u: int) -> bool:                   # u lies before the end of this walk's range
        return (stop - u) * step > 0

    while True:
        jump = t + step * ctx.stride
        between = range(t + step, jump + step, step)
        if (ctx.stride > 1 and (single_until - t) * step <= 0 and ahead(jump)
                and not past_held and not any(u in ctx.absent or u in ctx.held for u in between)):
            ctx.prefetch([jump])
            new, rec = ctx.decode(label, jump, prev, min_area, prev_score, first=painted and t == start, tick=False,
                                  history=history, drift=drift_to(jump))
            if new is not None and towards_end and reach_objection(ctx, label, jump, new, outgrown):
                new = None                       # slice by slice, where keep_reach decides
            if new is not None:
                for u, m in zip(between, interpolate_between(prev, new, ctx.stride - 1, ctx.spacing_rc)):
                    masks[u] = m
                    records.append(_record(label, u, "interpolated"))
                    ctx.report(records[-1], m)
                    ctx.tick()
                records.append(rec)
                ctx.report(rec, new)
                ctx.tick()
                masks[jump] = new
                if agrees(ctx, label, jump, new):
                    keep_agreed(ctx, label, jump, stop, step, masks, records)
                    return
                behind, prev, prev_score, t = (prev, t), new, rec.score, jump
                history.append((int(new.sum()), rec.score))
                continue
            single_until = jump                  # the organ ends before `jump`: find where, slice by slice
        u = t + step
        if not ahead(u):
            return
        past_held = past_held or (u in ctx.held and ctx.others is not None)
        if ctx.hard_end(u):                      # the user said so: no decoding, the walk ends here
            new, rec = None, _record(label, u, "absent")
            rec.reason = "marked absent" if u in ctx.absent else "previous end kept"
            ctx.tick()
        else:
            ctx.prefetch([v for v in range(u, stop, step)[:ctx.embeds.batch_size]
                          if not ctx.hard_end(v)]
                         if ctx.stride == 1 else [u])
            # Past a held end the first step away from the paint gets no looser limits: the previous
            # walk ended there (volume.correction_strict_past_end).
            loose = painted and t == start and not (past_held and ctx.cfg.volume.correction_strict_past_end)
            new, rec = ctx.decode(label, u, prev, min_area, prev_score, first=loose, history=history,
                                  drift=drift_to(u))
            other = ctx.collides(label, u, new) if past_held and new is not None else 0
            if other:                            # past the previous end onto another label's voxels
                new, rec.status, rec.reason = None, "absent", "past the previous end onto label %d" % other
            grow = ctx.cfg.volume.correction_past_end_growth
            change = new.sum() / prev.sum() if past_held and new is not None and grow > 0 else 0.0
            if change > grow and not (painted and t == start):
                # Past where the previous run found the organ's end, an organ tapers; a mask that grows
                # there has left it (CHAOS image_2: a liver correction walked on into the heart). Not
                # the first step from a paint: a decoded mask is compared with decoded masks only.
                new, rec.status = None, "absent"
                rec.reason = "past the previous end, growing (area %.2f of the previous slice's)" % change
            look = ctx.cfg.volume.look_ahead
            if (new is None and (look == "any" or (look == "jump" and rec.reason == "left the previous mask"))
                    and ahead(u + step) and not ctx.hard_end(u + step) and not past_held):
                # One slice judged absent does not end the walk when the slice after it, decoded
                # from the same neighbour, is judged present: slice u gets the shape between them.
                v = u + step
                ctx.prefetch([v])
                after, rec_after = ctx.decode(label, v, prev, min_area, prev_score, first=painted and t == start,
                                              tick=False, history=history, drift=drift_to(v))
                if after is not None:
                    mid = interpolate_between(prev, after, 1, ctx.spacing_rc)[0]
                    rec.status, rec.reason = "interpolated", "bridged (%s; the next slice goes on)" % rec.reason
                    for w, m, r in ((u, mid, rec), (v, after, rec_after)):
                        records.append(r)
                        ctx.report(r, m)
                        masks[w] = m
                    ctx.tick()
                    behind, prev, prev_score, t = (prev, t), after, rec_after.score, v
                    history.append((int(after.sum()), rec_after.score))
                    continue
        if new is not None and ctx.previous is not None and keep_previous(ctx, label, u, new, stop, step, masks,
                                                                          records):
            return
        if (towards_end and not past_held and not ctx.hard_end(u)
                and keep_reach(ctx, label, u, new, prev, stop, step, masks, records, rec, outgrown)):
            return
        records.append(rec)
        ctx.report(rec, new)
        if new is None:
            u += step
            while ahead(u):                      # the organ ended: the rest of this side is empty
                records.append(_record(label, u, "not reached"))
                ctx.report(records[-1], None)
                ctx.tick()
                u += step
            return
        masks[u] = new
        if agrees(ctx, label, u, new):
            keep_agreed(ctx, label, u, stop, step, masks, records)
            return
        behind, prev, prev_score, t = (prev, t), new, rec.score, u
        history.append((int(new.sum()), rec.score))


def agrees(ctx: _Context, label: int, u: int, new: np.ndarray) -> bool:
    """Whether a re-run's accepted mask on slice u agrees with the previous run's mask of the label
    there (ctx.agree: the label's own previous masks): IoU >= volume.correction_agree_iou (0: never)."""
    limit = ctx.cfg.volume.correction_agree_iou
    if limit <= 0 or ctx.agree is None:
        return False
    old = ctx.previous_own(label, u)
    union = np.logical_or(old, new).sum()
    return bool(union) and np.logical_and(old, new).sum() / union >= limit


def keep_agreed(ctx: _Context, label: int, u: int, stop: int, step: int,
                masks: Dict[int, np.ndarray], records: List[SliceRecord]) -> None:
    """A re-run's walk whose accepted mask on slice u agrees with the previous run's there (agrees)
    has nothing left to change: the walk ends, and the previous masks stand beyond u, undecoded
    (previous_stands). An Update recomputes only the slices a correction changes."""
    previous_stands(ctx, label, u + step, stop, step, masks, records,
                    first_reason="previous kept (the walk agreed with it on slice %d)" % u, own=True)


def previous_stands(ctx: _Context, label: int, u: int, stop: int, step: int, masks: Dict[int, np.ndarray],
                    records: List[SliceRecord], rec: Optional[SliceRecord] = None, first_reason: str = "",
                    own: bool = False) -> None:
    """The previous run's masks of the label (ctx.reach; own: its walks' own masks, previous_own)
    stand from slice u on, towards `stop`, as far as the previous run found the label and no mark or
    held end stops the walk; the rest of this side is absent (a mark, a held end) or not reached.
    rec: slice u's record when u was decoded (and counted) already, reused; first_reason: slice u's
    note ("previous kept" on the others). The kept slices get their confidence maps, as walked
    slices do (the preview's overlay; the assembly's overlaps)."""
    first = u
    kept = {}                                    # slice -> the previous mask kept there
    while (stop - u) * step > 0 and not ctx.hard_end(u) and u not in ctx.held:
        old = ctx.previous_own(label, u) if own else ctx.reach[u] == label
        if not old.any():
            break
        kept[u] = old
        u += step
    ctx.prefetch(list(kept))
    for t, old in kept.items():
        masks[t] = old
        r = rec if t == first and rec is not None else _record(label, t, "present")
        r.status, r.reason = "present", first_reason if t == first and first_reason else "previous kept"
        records.append(r)
        ctx.report(r, old)
        if t != first or rec is None:
            ctx.tick()
    while (stop - u) * step > 0:
        if ctx.hard_end(u):
            r = _record(label, u, "absent")
            r.reason = "marked absent" if u in ctx.absent else "previous end kept"
        else:
            r = _record(label, u, "not reached")
        records.append(r)
        ctx.report(r, None)
        ctx.tick()
        u += step


def keep_previous(ctx: _Context, label: int, u: int, new: np.ndarray, stop: int, step: int,
                  masks: Dict[int, np.ndarray], records: List[SliceRecord]) -> bool:
    """A correction's walk judged against what it replaces (volume.correction_keep_iou): where its
    mask on slice u overlaps the previous run's mask of the label there by less than the IoU
    limit, it has left the organ the previous walk followed; the walk ends and the previous masks
    stand from u on (as far as the previous run found the label). True when it ended (slice u,
    decoded, is counted done already)."""
    stack, value = ctx.previous
    old = stack[u] == value
    if not old.any():
        return False
    union = np.logical_or(old, new).sum()
    if union and np.logical_and(old, new).sum() / union >= ctx.cfg.volume.correction_keep_iou:
        return False
    first = u
    while (stop - u) * step > 0:
        old = stack[u] == value
        if not old.any():
            break
        masks[u] = old
        rec = _record(label, u, "present")
        rec.reason = "previous kept"
        records.append(rec)
        ctx.report(rec, old)
        if u != first:
            ctx.tick()
        u += step
    if u == first:
        return False
    while (stop - u) * step > 0:
        records.append(_record(label, u, "not reached"))
        ctx.report(records[-1], None)
        ctx.tick()
        u += step
    return True


def keep_reach(ctx: _Context, label: int, u: int, new: Optional[np.ndarray], prev: np.ndarray, stop: int,
               step: int, masks: Dict[int, np.ndarray], records: List[SliceRecord], rec: SliceRecord,
               outgrown: float = float("inf")) -> bool:
    """A re-run's walk towards the volume's end judged the label absent on slice u (new None, rec
    says why), or its mask there should give way to the previous run's (reach_objection: on another
    label's previous voxels, or outgrowing the previous mask), where the previous run found the
    label, its mask there continuing the walk's (overlap with it >= volume.min_overlap_first of its
    area): the previous masks stand from u on, as far as the previous run found the label (and no mark or held end
    stops it): a correction does not take back an accepted reach (volume.correction_keeps_reach).
    True when it kept them (rec, slice u's record, is changed to say so)."""
    stack = ctx.reach
    old = stack[u] == label
    area = int(old.sum())
    if not area or np.logical_and(old, prev).sum() < ctx.cfg.volume.min_overlap_first * area:
        return False
    why = rec.reason
    if new is not None:
        why = reach_objection(ctx, label, u, new, outgrown)
        if not why:
            return False
    previous_stands(ctx, label, u, stop, step, masks, records, rec, "previous kept (%s)" % why)
    return True


def reach_objection(ctx: _Context, label: int, u: int, new: np.ndarray, outgrown: float) -> str:
    """Why a re-run's mask `new` on slice u should give way to the previous run's (keep_reach), or "":
    it lies on another label's previous voxels (more than volume.correction_collision of it), or it
    is over volume.correction_outgrows_previous x `outgrown` x the previous run's mask of the label
    there (`outgrown`: what the walk's paint outgrew the previous mask on its own slice, >= 1)."""
    old = int((ctx.reach[u] == label).sum())
    if not old or not new.any():
        return ""
    under = ctx.reach[u][new]
    under = under[(under != 0) & (under != label)]
    if len(under) > ctx.cfg.volume.correction_collision * new.sum():
        values, counts = np.unique(under, return_counts=True)
        return "onto label %d" % int(values[np.argmax(counts)])
    grow = ctx.cfg.volume.correction_outgrows_previous
    if grow > 0 and new.sum() > grow * outgrown * old:
        # The walk from a paint carries the paint's size onto a slice where the previous run's mask
        # was far smaller, by more than the paint corrected the previous run on its own slice: near an
        # organ's end (a ventricle at its base) that is the paint's shape walked past the organ; an
        # organ the previous run under-segmented throughout grows by about the paint's own factor.
        return "%.2f x the previous mask, the paint %.2f x" % (new.sum() / old, outgrown)
    return ""


def walk_stride(walk_spacing_mm: float, slice_spacing_mm: float) -> int:
    """How many slices a walk's step spans: the most whose thickness stays within walk_spacing_mm
    (1: every slice; 0 mm turns striding off)."""
    if walk_spacing_mm <= 0 or slice_spacing_mm <= 0:
        return 1
    return max(1, int(np.floor(walk_spacing_mm / slice_spacing_mm + 1e-6)))
