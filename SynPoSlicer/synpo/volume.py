"""SynPo over a whole volume: embed once, confidence for every slice, propagate, assemble.

This module runs the stages (VolumeRun, segment_volume); each idea has its own file:
- embeddings.py: the embedding store (slices embedded once, kept between runs, decoded masks reused);
- walk.py: the walk from a start slice outwards, and walk_rules.py: the stop rules it applies;
- ownership.py: which support's walk gives a slice when a label has several support slices;
- rings.py: a label painted as a band around a hole (the myocardium);
- cross_start.py: where the walk starts when the support was painted on another patient;
- assembly.py: the labels' masks into one label volume.
"""
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .assembly import _assemble, assemble, enclosing_labels, follow_enclosing  # noqa: F401
from .config import SynPoConfig, validate
from .cross_start import cross_start
from .embeddings import (DECODED_KEPT_BYTES, STORAGE_DTYPE, EmbeddingStore, get_store, sam_store,  # noqa: F401
                         store_key)
from .errors import Cancelled, InputError, SynPoError
from .gate import organ_range
from .intensity import normalize, normalize_each_slice
from .ownership import GapConfidence, OwnedConfidence, _propagate, split_gap, walk_ranges  # noqa: F401
from .result import SliceRecord, VolumeResult
from .rings import band_around, find_rings, ring_label, ring_parts, ring_thickness  # noqa: F401
from .slice_confidence import SliceConfidence
from .support import absent_marks, find_support, fit_support, in_plane_spacing, slice_spacing, to_slices
from .walk import (SliceReport, _Context, _record, _search_region, _walk, decode_prompted,  # noqa: F401
                   walk_stride)
from .walk_rules import Judge, judge_step

Progress = Callable[[str, int, int], None]


def confidence_volume(q_stores: Dict[str, EmbeddingStore], r_stores: Dict[str, EmbeddingStore],
                      support_indices: Sequence[int], support_masks: Sequence[np.ndarray],
                      query_indices: Sequence[int], confidence_from: Sequence[str],
                      cfg: SynPoConfig, cross: bool = False) -> np.ndarray:
    """Fused confidence (len(query_indices), H, W) of query slices, from support slices' masks
    (cross: painted on another patient, with confidence.n_prototypes_cross prototypes)."""
    n = len(q_stores[confidence_from[0]].slices)
    return SliceConfidence(q_stores, r_stores, support_indices, support_masks, confidence_from, cfg, n,
                           cross).stack(list(query_indices))


def segment_volume(image: np.ndarray, spacing_ijk, support_label: np.ndarray, sam, dino=None,
                   cfg: SynPoConfig = SynPoConfig(), support_image: Optional[np.ndarray] = None,
                   progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
                   stores: Optional[Dict[str, EmbeddingStore]] = None,
                   confidence_from: Optional[Sequence[str]] = None,
                   embedding_cache: Optional[str] = None,
                   on_slice: Optional[SliceReport] = None,
                   confidence_everywhere: bool = False, axis: Optional[int] = None,
                   absent: Optional[Dict[int, Sequence[int]]] = None,
                   held_ends: Optional[Dict[int, Dict[int, Sequence[int]]]] = None,
                   previous: Optional[np.ndarray] = None,
                   previous_overridden: Optional[Dict[int, Dict[int, np.ndarray]]] = None) -> VolumeResult:
    """Segment every slice of `image` ([k, j, i]) from the paint in `support_label`.

    support_image: the volume the support was painted on, when it is not `image`
    (it must share support_label's grid; the query grid may differ).
    stores: pass the same dict again to reuse the embeddings of an earlier run.
    confidence_from: encoders whose maps are fused, among "sam" and "dinov2"
    (default: both when `dino` is given, else "sam"). SAM always decodes.
    embedding_cache: a folder where embeddings persist between runs (optional).
    on_slice: called with each slice's record and mask as it is decided (SliceReport).
    confidence_everywhere: compute the confidence (and embeddings) of every slice; by default only
    the slices the walks reach are embedded, and the confidence maps are 0 elsewhere
    (VolumeResult.computed lists the slices computed).
    axis: the slicing axis, when known (corrections keep the first support's): then paint on any
    slices across it, adjacent ones included, is support. Else it is found from the paint.
    absent: {label: slices across the axis} where the user says the label is absent (an erased
    false positive): a walk ends there and never crosses it.
    held_ends: {label: {support slice: slices}}: the walks from that support end at those slices
    (a correction painted inside the organ's previous extent keeps the previous run's ends:
    Session.add_support, volume.correction_holds_ends). previous: the previous run's label
    volume ([k, j, i]), against which those supports' walks are judged (walk.keep_previous);
    previous_overridden: its VolumeResult.overridden (the previous walks' own masks, with `previous`:
    walk.keep_agreed).
    """
    run = VolumeRun(image, spacing_ijk, support_label, sam, dino, cfg, support_image, confidence_from, axis, absent,
                    held_ends, previous, previous_overridden)
    return run.segment(progress, cancel, stores if stores is not None else {}, embedding_cache, on_slice,
                       confidence_everywhere)


def check_grids(image: np.ndarray, support_label: np.ndarray, support_image: Optional[np.ndarray]) -> None:
    """The support label map on the image's grid, or on the support image's when it was painted on
    another volume (InputError naming both shapes)."""
    if support_image is None and support_label.shape != image.shape:
        raise InputError("support label grid %s differs from the image grid %s" % (support_label.shape, image.shape))
    if support_image is not None and support_label.shape != support_image.shape:
        raise InputError("support label grid %s differs from the support image grid %s"
                         % (support_label.shape, support_image.shape))


class VolumeRun:
    """One segmentation of a volume, in named stages (segment_volume runs them):

    1. __init__: check the inputs, find the support and the absent marks, normalise the
       intensities, take the slices across the slicing axis;
    2. open_stores: the embedding stores (query and, across patients, support), the support
       slices embedded (the query slices are embedded as the walks reach them);
    3. per label (segment_label, in parallel workers): its confidence (confidence_for), its
       start slices (starts), the walks (_propagate), a ring's band (ring_label);
    4. assemble: the labels' masks into one label volume, the paint kept, the records sorted.
    """

    def __init__(self, image: np.ndarray, spacing_ijk, support_label: np.ndarray, sam, dino, cfg: SynPoConfig,
                 support_image: Optional[np.ndarray], confidence_from: Optional[Sequence[str]],
                 axis: Optional[int], absent: Optional[Dict[int, Sequence[int]]],
                 held_ends: Optional[Dict[int, Dict[int, Sequence[int]]]] = None,
                 previous: Optional[np.ndarray] = None,
                 previous_overridden: Optional[Dict[int, Dict[int, np.ndarray]]] = None):
        validate(cfg)
        self.held = {int(v): {int(s): tuple(int(t) for t in ts) for s, ts in d.items()}
                     for v, d in (held_ends or {}).items()} if cfg.volume.correction_holds_ends else {}
        self.bound: List[SliceConfidence] = []           # the confidence maps this run bound (segment)
        self.timings = {k: 0.0 for k in ("intensity", "encode_sam", "encode_dinov2", "confidence", "prompts",
                                         "decode")}
        t0 = time.perf_counter()
        if image.ndim != 3:
            raise InputError("image is %dD; a 3D volume is needed" % image.ndim)
        self.cross = cross = support_image is not None
        check_grids(image, support_label, support_image)
        self.support = support = find_support(support_label, axis)
        if cross:
            support_image, support_label = fit_support(image, support_image, support_label, support)
        self.absent = absent_marks(absent, support, image.shape[support.axis])
        norm, self.modality = normalize(image, cfg.intensity)
        ref_norm = normalize(support_image, cfg.intensity)[0] if cross else norm
        self.timings["intensity"] = time.perf_counter() - t0

        self.axis = axis = support.axis
        self.previous = (to_slices(previous, axis) if previous is not None and self.held
                         and cfg.volume.correction_keep_iou > 0 else None)
        # ... for a held correction's walk past the previous end (volume.correction_collision).
        self.previous_all = (to_slices(previous, axis) if previous is not None and self.held
                             and cfg.volume.correction_collision > 0 else None)
        # The previous run's labels, where two labels' masks overlap (assembly: the previous owner wins).
        self.previous_labels = (to_slices(previous, axis) if previous is not None and not cross
                                and previous.shape == image.shape and cfg.volume.overlap_keeps_owner else None)
        # ... where a re-run's walk towards the volume's end stops short of them (volume.correction_keeps_reach).
        self.previous_reach = (to_slices(previous, axis) if previous is not None and not cross
                               and previous.shape == image.shape and cfg.volume.correction_keeps_reach else None)
        # ... and each label's own walked masks there (with what the assembly overrode of them), which a
        # re-run's walk that agrees with them keeps (volume.correction_agree_iou, walk.keep_agreed).
        self.previous_overridden = previous_overridden or {}
        self.query = np.ascontiguousarray(to_slices(norm, axis))
        self.ref = np.ascontiguousarray(to_slices(ref_norm, axis)) if cross else self.query
        del norm, ref_norm                  # (a copy when the slicing axis is not k: keep only one)
        self.n, self.H, self.W = self.query.shape
        self.spacing_rc = in_plane_spacing(spacing_ijk, axis)
        self.slice_mm = slice_spacing(spacing_ijk, axis)
        self.stride = walk_stride(cfg.volume.walk_spacing_mm, self.slice_mm)
        # Only the painted slices of the support are needed, not a copy of its volume.
        self.paint = {s: np.array(to_slices(support_label, axis)[s])
                      for s in sorted({s for v in support.slices.values() for s in v})}
        if confidence_from is None:
            confidence_from = ("sam", "dinov2") if dino is not None else ("sam",)
        if "dinov2" in confidence_from and dino is None:
            raise SynPoError("DINOv2 confidence was asked for but no DINOv2 encoder was given")
        self.confidence_from = tuple(confidence_from)
        self.sam, self.cfg = sam, cfg
        self.encoders = [("sam", sam)] + ([("dinov2", dino)] if "dinov2" in confidence_from else [])
        # A label is a ring when one of its support slices is a closed band around a hole (the
        # myocardium); a correction painted where it is not (the apex) is a filled shape of it.
        self.rings = find_rings(self.paint, support, cfg.volume.ring_min_hole)
        # A ring's band reads each MR slice's grey values normalised on that slice alone
        # (volume.ring_grey_per_slice; rings.ring_label); None: the query's own.
        self.ring_grey = (normalize_each_slice(to_slices(image, axis), self.query, cfg.intensity)
                          if self.rings and cfg.volume.ring_grey_per_slice and self.modality == "mr" and not cross
                          else None)
        self.ring_bands: Dict[int, tuple] = {}   # ring label -> (band(t, hole), slices banded): rings.ring_label
        self.judge: Judge = judge_step             # the stop rules (an instrument may record them)
        self.failed = threading.Event()           # a label worker failed: the others stop too
        self._done, self._tick_lock = 0, threading.Lock()

    # ------------------------------------------------------------------ progress and cancel

    def tick(self, k: int = 1) -> None:
        with self._tick_lock:                     # called from the label workers too
            self._done += k
            count = self._done
        if self.progress:
            self.progress("segment", count, self.total_work)

    def stopped(self) -> bool:
        return self.failed.is_set() or (self.cancel is not None and bool(self.cancel()))

    # ------------------------------------------------------------------ stages

    def segment(self, progress: Optional[Progress], cancel: Optional[Callable[[], bool]], stores: Dict,
                embedding_cache: Optional[str], on_slice: Optional[SliceReport],
                confidence_everywhere: bool) -> VolumeResult:
        self.progress, self.cancel, self.stores = progress, cancel, stores
        self.on_slice, self.everywhere = on_slice, confidence_everywhere
        total_embed = self.n + (sum(len(v) for v in self.support.slices.values()) if self.cross else 0)
        self.total_work = total_embed * len(self.encoders) + self.n * (len(self.support.labels) + len(self.rings))
        self.open_stores(embedding_cache)
        # Labels are independent: their walks run in parallel threads (torch and most of numpy release
        # the GIL, so one label's prompt selection overlaps another's decoding). Each label's result is
        # what a walk on its own gives.
        workers = label_worker_count(self.cfg.volume.label_workers, len(self.support.labels),
                                     getattr(getattr(self.sam, "device", None), "type", "cpu"))
        try:
            try:
                per_label = _run_labels(self.segment_label, self.support.labels, workers)
            finally:
                for name, _ in self.encoders:        # embeddings computed so far go to the disk cache
                    self.q_stores[name].flush()
                    self.r_stores[name].flush()
                    q0, r0 = self.encode_before[name]
                    self.timings["encode_" + name] += (self.q_stores[name].seconds - q0
                                                       + (self.r_stores[name].seconds - r0 if self.cross else 0.0))
            return self.assemble(per_label)
        finally:
            for conf in self.bound:
                conf.release()

    def open_stores(self, embedding_cache: Optional[str]) -> None:
        self.q_stores, self.r_stores, self.encode_before = {}, {}, {}
        for name, enc in self.encoders:
            q = get_store(self.stores, store_key("query", name, enc, self.axis), enc, self.query, self.spacing_rc,
                          self.cfg, embedding_cache)
            r = q if not self.cross else get_store(self.stores, store_key("support", name, enc, self.axis), enc,
                                                   self.ref, self.spacing_rc, self.cfg, embedding_cache)
            self.q_stores[name], self.r_stores[name] = q, r
            self.encode_before[name] = (q.seconds, r.seconds if self.cross else 0.0)
            # The support slices now; the query slices as the walks reach them (SliceConfidence).
            r.ensure(sorted({s for v in self.support.slices.values() for s in v}), self.tick, self.cancel, save=False)

    def confidence_for(self, sup_idx: List[int], sup_masks: List[np.ndarray]) -> SliceConfidence:
        """The target's confidence over the query slices, computed as asked for. It depends only on
        the support and the confidence settings: a re-run with other prompt or propagation
        settings reuses it (kept beside the embeddings in `stores`)."""
        key = hashlib.sha1(("conf|%s|%s|%s|%s|%s" % (
            sup_idx, self.confidence_from, self.cfg.confidence,
            [self.q_stores[k].serial for k in self.confidence_from],
            [self.r_stores[k].serial for k in self.confidence_from])).encode()
            + b"".join(np.packbits(m).tobytes() for m in sup_masks)).hexdigest()
        conf = self.stores.get("confidence/" + key)
        if conf is None:
            conf = SliceConfidence(self.q_stores, self.r_stores, sup_idx, sup_masks, self.confidence_from, self.cfg,
                                   self.n, self.cross)
            self.stores["confidence/" + key] = conf
        conf.bind(self.tick, self.stopped)
        self.bound.append(conf)                          # (released when the run ends: segment)
        return conf

    def target_range(self, sup_idx: List[int], sup_masks: List[np.ndarray]):
        """The grey-value range of a target's support masks (gate.py); None across patients, whose
        MR grey values are not on this scan's scale, unless gate.cross."""
        if self.cross and not self.cfg.gate.cross:
            return None
        return organ_range([self.ref[s] for s in sup_idx], sup_masks, self.cfg.gate)

    # -- per label (the cross-patient start: cross_start.py; rings: rings.py)

    def segment_target(self, label: int, sup_idx: List[int], sup_masks: List[np.ndarray],
                       records: List[SliceRecord], timings: Dict[str, float],
                       report: Optional[SliceReport] = None, reach: Optional[np.ndarray] = None,
                       also_absent: Sequence[int] = ()):
        """(propagated masks {slice: mask}, its confidence) of one target shape; its stage seconds
        are added to `timings`. `reach`: the previous run's labels as this shape's walks keep them
        where a re-run ends early (keep_reach; default the previous run's own labels, none for a
        ring, whose filled shape and hole rings.ring_reach gives). `also_absent`: slices where this
        shape is absent beside the label's absent marks (a ring's hole: its supports painted without
        a hole), its walks end there as at a mark.

        Within a volume, each support slice's walks use that support alone: its prototypes, its
        area and its grey values. A correction painted later re-starts the walk around itself and
        leaves the rest of the organ as the other supports had it (the same maps, the same decoded
        masks), instead of blending its features into every slice's prototypes."""
        def context(conf, idx, masks):
            held = () if self.cross else self.held.get(label, {}).get(idx[0], ())
            # A ring's filled shape and hole are not the label's ring: judged by their ends only.
            previous = ((self.previous, label) if held and self.previous is not None and label not in self.rings
                        else None)
            return _Context(self.sam, self.q_stores["sam"], conf, self.cfg, timings, self.stopped, self.tick,
                            self.target_range(idx, masks), report,
                            tuple(self.absent.get(label, ())) + tuple(also_absent), self.judge,
                            self.stride, self.spacing_rc, held, previous,
                            self.previous_all if held else None,
                            [e for e in held if abs(e - idx[0]) == 1] if self.cfg.volume.correction_hard_next else (),
                            reach if reach is not None else
                            self.previous_reach if label not in self.rings else None, self.slice_mm,
                            agree=(self.previous_overridden.get(label, {}) if reach is None and label not in self.rings
                                   else None))

        def min_area(masks):
            return self.cfg.volume.min_area_fraction * float(np.mean([m.sum() for m in masks]))

        if self.cross:
            conf = self.confidence_for(sup_idx, sup_masks)
            before = conf.seconds
            ctx = context(conf, sup_idx, sup_masks)
            starts = cross_start(self, ctx, label, sup_idx, sup_masks, conf, min_area(sup_masks), records)
            masks = _propagate(ctx, label, self.n, starts, min_area(sup_masks), records, painted=False)[0] \
                if starts else {}
            if self.everywhere:
                conf.prepare(range(self.n))
            timings["confidence"] += conf.seconds - before
            return masks, conf
        confs = {s: self.confidence_for([s], [m]) for s, m in zip(sup_idx, sup_masks)}
        before = {s: c.seconds for s, c in confs.items()}
        # Between supports, a walk may use the nearer support's map or a blend (volume.gap_confidence).
        walk_conf = (GapConfidence(confs, self.cfg.volume.gap_confidence)
                     if len(confs) > 1 and self.cfg.volume.gap_confidence != "own" else None)
        ctxs = {s: context(walk_conf or confs[s], [s], [m]) for s, m in zip(sup_idx, sup_masks)}
        starts = dict(zip(sup_idx, sup_masks))
        for s, m in zip(sup_idx, sup_masks):
            records.append(_record(label, s, "support", score=float(confs[s][s][m].mean())))
            ctxs[s].report(records[-1], m)
            self.tick()
        masks, owner = _propagate(ctxs, label, self.n, starts, {s: min_area([m]) for s, m in starts.items()},
                                  records, ownership=self.cfg.volume.ownership,
                                  gap_choice=self.cfg.volume.gap_choice,
                                  larger_wins=self.cfg.volume.gap_larger_wins,
                                  larger_arrival=self.cfg.volume.gap_larger_arrival)
        # No prediction of a label on its own support slice: the paint stands there (assemble).
        for s in sup_idx:
            masks.pop(s, None)
        conf = OwnedConfidence(confs, owner, self.n)
        if self.everywhere:
            conf.prepare(range(self.n))
        timings["confidence"] += sum(c.seconds - before[s] for s, c in confs.items())
        return masks, conf

    def segment_label(self, label: int):
        """(masks {slice: mask}, confidence map, records, stage seconds, slices computed) of one label."""
        records: List[SliceRecord] = []
        seconds = {"confidence": 0.0, "prompts": 0.0, "decode": 0.0}
        try:
            sup_idx = self.support.slices[label]
            sup_masks = [self.paint[s] == label for s in sup_idx]
            ring = self.rings.get(label)
            if ring is None:
                masks, conf = self.segment_target(label, sup_idx, sup_masks, records, seconds, self.on_slice)
                computed, conf = conf.computed(), conf.dense()
            else:
                masks, conf, computed = ring_label(self, label, sup_idx, sup_masks, ring, records, seconds)
        except BaseException:
            self.failed.set()
            raise
        return masks, conf, records, seconds, computed

    def assemble(self, per_label: list) -> VolumeResult:
        """The labels' masks into one label volume (assembly.py)."""
        return assemble(self, per_label)


def label_worker_count(setting: int, labels: int, device_type: str = "cpu") -> int:
    """Threads walking labels at once (config.VolumeConfig.label_workers): `setting` when > 0;
    0 (auto): on a CPU as many as the CPU threads torch uses (torch.get_num_threads(): what
    OMP_NUM_THREADS, torch.set_num_threads or `synpo cohort --threads-per-worker` set), each
    then decoding on one thread; on a GPU 2. Never more than the labels."""
    if setting > 0:
        wanted = setting
    elif device_type == "cpu":
        wanted = torch.get_num_threads()
    else:
        wanted = 2
    return max(1, min(wanted, labels))


def _run_labels(segment_label: Callable, labels: Sequence[int], workers: int) -> list:
    """[segment_label(label) for label in labels], in `workers` parallel threads when > 1."""
    if workers <= 1:
        return [segment_label(label) for label in labels]
    # The CPU threads are shared out between the workers: each with all of them made every
    # product of the decoder slower than the overlap gained.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="synpo-label") as pool:
            futures = [pool.submit(segment_label, label) for label in labels]
    finally:
        torch.set_num_threads(threads)
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        # A worker's own error, not the Cancelled it caused in the others.
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    return [f.result() for f in futures]
