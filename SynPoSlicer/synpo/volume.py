"""SynPo over a whole volume: embed once, confidence for every slice, propagate, assemble.

Propagation: each query slice is decoded with prompts taken from its own
confidence map, restricted to a search region around the mask of the slice
next to it (towards the support). Walking outwards from each support slice, the
first slice judged "target absent" ends the walk in that direction (an organ is
one contiguous run of slices), so slices beyond it come out empty. Between two
support slices, each slice belongs to the nearer support.

Cross-patient (a support painted on another volume): the walk starts at the
query slice, near the supports' relative height, with the most confidence
inside the support mask carried over by the body-to-body mapping (position.py).
"""
import hashlib
import itertools
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import DecodeConfig, SynPoConfig, validate
from .decode import decode_slice, decoder_inputs, fill_holes
from .gate import apply_gate, organ_range
from .interpolate import between as interpolate_between
from .errors import InputError, SynPoError
from .features import batch_size_for
from .intensity import normalize
from .position import expected_region, expected_shape
from .prompts import Prompts, select_prompts
from .result import SliceRecord, VolumeResult
from .slice_confidence import SliceConfidence
from .support import absent_marks, find_support, from_slices, in_plane_spacing, slice_spacing, to_slices
from .walk_rules import Judge, Step, judge_step

Progress = Callable[[str, int, int], None]
# Called as each slice's decision is made: (record, its mask in the slice frame or None). Labels are
# walked in parallel threads, so it is called from those threads. A slice reported here is
# provisional: the result may still change it (labels overlapping, an enclosed label outside its
# encloser), and the VolumeResult is what counts.
SliceReport = Callable[[SliceRecord, Optional[np.ndarray]], None]
STORAGE_DTYPE = torch.float16          # embeddings as kept between runs
DECODED_KEPT_BYTES = 64 << 20         # decoded masks kept per store for re-runs (8 KB each at 256 x 256)


class Cancelled(SynPoError):
    """The caller's cancel() returned True; nothing was produced."""


class EmbeddingStore:
    """Embeddings of one volume's slices for one encoder, computed once in batches.

    With `disk_dir`, embeddings are also kept on disk under a key made of the
    encoder, its input frame and the slices' bytes, so a later run on the same
    volume (another invocation of the CLI) decodes without re-encoding.
    """

    _serials = itertools.count()

    def __init__(self, encoder, slices: np.ndarray, frame, batch_size: int, disk_dir: Optional[str] = None):
        self.serial = next(EmbeddingStore._serials)          # never reused, unlike id()
        self.encoder, self.slices, self.frame = encoder, slices, frame
        self.batch_size = batch_size
        # Kept in float16 (exact enough for cosine similarity and SAM's decoder, which get them
        # back in float32): half the memory of a volume's embeddings, in RAM and on disk.
        self.cache: Dict[int, torch.Tensor] = {}
        # SAM's decoded masks of these slices by their exact decoder inputs (decode.decoder_inputs):
        # a re-run whose new settings leave a slice's box and region alone reuses its mask.
        self.decoded: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.decoded_bytes = 0
        self.decode_reuses = 0
        self._decoded_lock = threading.Lock()      # labels are walked in parallel threads
        # Slices being encoded by one thread: another thread that needs them waits for them.
        self._claims: Dict[int, threading.Event] = {}
        self._claims_lock = threading.Lock()
        self._dirty = False                        # embeddings not yet on disk
        self.seconds = 0.0
        self.disk_path = None
        if disk_dir:
            digest = hashlib.sha1()
            key = "%s|%s|%s|%s" % (encoder.name, frame, slices.shape, STORAGE_DTYPE)
            if getattr(encoder, "precision", None) is not None:      # reduced-precision embeddings differ
                key += "|%s" % encoder.precision
            if getattr(encoder, "runtime", "torch") != "torch":       # so do another runtime's (by ~1e-6)
                key += "|%s" % encoder.runtime
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(slices).tobytes())
            self.disk_path = os.path.join(disk_dir, "%s-%s.pt" % (encoder.name, digest.hexdigest()[:20]))
            if os.path.isfile(self.disk_path):
                try:
                    self.cache.update(torch.load(self.disk_path, map_location="cpu", weights_only=True))
                except Exception:          # a damaged cache file is recomputed, never trusted
                    self.cache.clear()

    def _save(self) -> None:
        if not self.disk_path:
            return
        os.makedirs(os.path.dirname(self.disk_path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt", dir=os.path.dirname(self.disk_path))
        os.close(fd)
        try:
            torch.save(self.cache, tmp)
            os.replace(tmp, self.disk_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def flush(self) -> None:
        """Write the embeddings computed since the last write to the disk cache (if any)."""
        if self._dirty:
            self._dirty = False
            self._save()

    def ensure(self, indices: Sequence[int], progress: Optional[Callable[[int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None, save: bool = True) -> None:
        """Embed the slices of `indices` not embedded yet, in batches. Thread-safe: a slice that
        another thread is embedding is waited for, not embedded twice. save=False leaves writing
        the disk cache to flush()."""
        with self._claims_lock:
            wanted = [i for i in dict.fromkeys(int(i) for i in indices) if i not in self.cache]
            todo = [i for i in wanted if i not in self._claims]
            theirs = [self._claims[i] for i in wanted if i in self._claims]
            for i in todo:
                self._claims[i] = threading.Event()
        try:
            self._embed(todo, progress, cancel)
        finally:
            with self._claims_lock:
                for i in todo:
                    self._claims.pop(i).set()
        for event in theirs:
            event.wait()
        if any(i not in self.cache for i in wanted):           # another thread failed on them
            self.ensure([i for i in wanted if i not in self.cache], progress, cancel, save)
        if todo:
            self._dirty = True
            if save:
                self.flush()

    def _embed(self, todo: List[int], progress, cancel) -> None:
        start = 0
        while start < len(todo):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            chunk = todo[start:start + self.batch_size]
            t0 = time.perf_counter()
            try:
                feats = self.encoder.embed(self.slices[chunk], self.frame)
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise SynPoError("the GPU ran out of memory encoding a single slice with %s; free GPU memory "
                                     "(other programs, other models) or run on the CPU (the command line's "
                                     "--device cpu)" % self.encoder.name) from exc
                self.batch_size = max(1, self.batch_size // 2)
                continue
            self.seconds += time.perf_counter() - t0
            for i, f in zip(chunk, feats):
                self.cache[i] = f.to(STORAGE_DTYPE, copy=True)
            start += len(chunk)
            if progress:
                progress(len(chunk))

    def stack(self, indices: Sequence[int]) -> torch.Tensor:
        self.ensure(indices)
        return torch.stack([self.cache[i] for i in indices])

    def decode(self, sam, t: int, prompts: Prompts, cfg: DecodeConfig) -> tuple:
        """(mask, SAM's IoU, box) of slice t decoded from `prompts` (decode_slice), or the result of
        an earlier identical decoding (up to DECODED_KEPT_BYTES are kept; least recently used out first)."""
        key = (t, decoder_inputs(prompts, cfg))
        with self._decoded_lock:
            hit = self.decoded.get(key)
            if hit is not None:
                self.decoded.move_to_end(key)
                self.decode_reuses += 1
        if hit is not None:
            bits, iou, box = hit
            shape = (self.frame.H, self.frame.W)
            return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool), iou, box
        self.ensure([t], save=False)
        dec = decode_slice(sam, self.cache[t], self.frame, prompts, cfg)
        bits = np.packbits(dec.mask)
        with self._decoded_lock:
            if key not in self.decoded:
                self.decoded[key] = (bits, dec.iou, dec.box)
                self.decoded_bytes += bits.nbytes
            while self.decoded_bytes > DECODED_KEPT_BYTES:
                self.decoded_bytes -= self.decoded.popitem(last=False)[1][0].nbytes
        return dec.mask, dec.iou, dec.box


def get_store(stores: Dict, key: str, enc, volume_slices: np.ndarray, spacing_rc, cfg: SynPoConfig,
              embedding_cache: Optional[str] = None) -> EmbeddingStore:
    """The store under `key` if it holds these slices in the same frame from the same encoder (a
    model loaded for another device or precision embeds and decodes a little differently), else a
    new one put there."""
    frame = enc.frame(volume_slices.shape[1], volume_slices.shape[2], spacing_rc)
    s = stores.get(key)
    if s is None or s.encoder is not enc or s.frame != frame or (s.slices is not volume_slices
                                         and not np.array_equal(s.slices, volume_slices)):
        batch = batch_size_for(enc.device, getattr(enc, "name", ""), cfg.volume.batch_size)
        s = EmbeddingStore(enc, volume_slices, frame, batch, embedding_cache)
        stores[key] = s
    return s


def store_key(role: str, name: str, enc, axis: int) -> str:
    """Key of a store in a `stores` dict: role is "query" or "support", name "sam" or "dinov2"."""
    return "%s/%s/%s/%d" % (role, name, enc.name, axis)


def sam_store(stores: Dict) -> EmbeddingStore:
    """The query volume's SAM embeddings in a `stores` dict filled by segment_volume."""
    return next(s for k, s in stores.items() if k.startswith("query/sam/"))


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
                    timings: Optional[Dict[str, float]] = None):
    """SynPo's per-slice step: prompts from slice t's confidence map `conf` (H, W) within `region`
    (select_prompts), SAM's decoding (reused when these inputs were decoded before) and the
    intensity gate. Returns (mask, SAM's IoU, box, prompts); adds its seconds to
    timings["prompts"] and timings["decode"] when given."""
    t0 = time.perf_counter()
    prompts = select_prompts(conf, cfg.prompts, region, expected)
    t1 = time.perf_counter()
    mask, sam_iou, box = store.decode(sam, t, prompts, cfg.decode)
    if gate_range is not None:
        mask = apply_gate(mask, store.slices[t], gate_range, cfg.gate)
    if timings is not None:
        timings["prompts"] += t1 - t0
        timings["decode"] += time.perf_counter() - t1
    return mask, sam_iou, box, prompts


class _Context:
    """What the per-label propagation needs, bundled."""

    def __init__(self, sam, embeds, conf, cfg, timings, cancel, tick, gate_range=None,
                 on_slice: Optional[SliceReport] = None, absent: Sequence[int] = (), judge: Judge = judge_step,
                 stride: int = 1, spacing_rc=(1.0, 1.0)):
        self.sam, self.embeds, self.conf, self.cfg = sam, embeds, conf, cfg
        self.judge = judge
        self.stride, self.spacing_rc = stride, spacing_rc   # walk every stride-th slice (thin slices)
        self.timings, self.cancel, self.tick = timings, cancel, tick
        self.gate_range = gate_range             # the target's grey-value range (gate.py), or None
        self.on_slice = on_slice
        self.absent = set(absent)                # slices the user marked "target absent": walks end there

    def prefetch(self, indices: Sequence[int]) -> None:
        """The next slices of a walk are embedded when it reaches them, a batch at a time (a
        confidence given as a ready array, as tests do, needs nothing)."""
        if isinstance(self.conf, SliceConfidence):
            self.conf.prepare(indices)

    def report(self, rec: SliceRecord, mask: Optional[np.ndarray]) -> None:
        if self.on_slice is not None:
            self.on_slice(rec, mask)

    def decode(self, label: int, t: int, prev: Optional[np.ndarray], min_area: float,
               prev_score: Optional[float] = None, expected: Optional[np.ndarray] = None, first: bool = False,
               tick: bool = True):
        """Decode slice t next to `prev` (the neighbouring mask, None for a first slice) and judge
        whether the target is there (self.judge: walk_rules.judge_step); prev_score is the
        neighbouring mask's mean confidence; expected, the target's guessed shape (select_prompts);
        first: prev is a painted slice; tick: count the slice as done (a walk's trial jump does not)."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")
        vc = self.cfg.volume
        region = _search_region(prev, vc.search_margin, vc.search_min_px) if prev is not None else None
        mask, sam_iou, box, prompts = decode_prompted(self.sam, self.embeds, t, self.conf[t], self.cfg, region,
                                                      expected, self.gate_range, self.timings)
        if tick:
            self.tick()
        area = int(mask.sum())
        score = float(self.conf[t][mask].mean()) if area else 0.0
        overlap = float(np.logical_and(mask, prev).sum() / area) if prev is not None and area else 0.0
        reason = self.judge(Step(label, t, first, mask, area, prev, min_area, score, prev_score, sam_iou, overlap), vc)
        rec = _record(label, t, "absent" if reason else "present", prompts, score, sam_iou, box)
        rec.overlap_prev, rec.reason = overlap, reason
        return (None if reason else mask), rec


def _walk(ctx: _Context, label: int, start: int, mask: np.ndarray, stop: int, step: int, min_area: float,
          masks: Dict[int, np.ndarray], records: List[SliceRecord], painted: bool = True) -> None:
    """Walk from `start` (whose mask is `mask`; painted: the user's paint) towards `stop` by `step`
    (+1 or -1). With ctx.stride > 1 (a thin-slice volume) the walk decodes every stride-th slice
    and fills the slices between by shape-based interpolation (interpolate.py); where a strided
    slice is judged absent, the slices up to it are walked one by one, so the organ's end is found
    slice by slice as without a stride."""
    prev, t = mask, start
    prev_score = float(ctx.conf[start][mask].mean()) if mask.any() else None
    single_until = start                         # after a failed jump: single steps up to here

    def ahead(u: int) -> bool:                   # u lies before the end of this walk's range
        return (stop - u) * step > 0

    while True:
        jump = t + step * ctx.stride
        between = range(t + step, jump + step, step)
        if (ctx.stride > 1 and (single_until - t) * step <= 0 and ahead(jump)
                and not any(u in ctx.absent for u in between)):
            ctx.prefetch([jump])
            new, rec = ctx.decode(label, jump, prev, min_area, prev_score, first=painted and t == start, tick=False)
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
                prev, prev_score, t = new, rec.score, jump
                continue
            single_until = jump                  # the organ ends before `jump`: find where, slice by slice
        u = t + step
        if not ahead(u):
            return
        if u in ctx.absent:                      # the user said so: no decoding, the walk ends here
            new, rec = None, _record(label, u, "absent")
            rec.reason = "marked absent"
            ctx.tick()
        else:
            ctx.prefetch([v for v in range(u, stop, step)[:ctx.embeds.batch_size] if v not in ctx.absent]
                         if ctx.stride == 1 else [u])
            new, rec = ctx.decode(label, u, prev, min_area, prev_score, first=painted and t == start)
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
        prev, prev_score, t = new, rec.score, u


def walk_stride(walk_spacing_mm: float, slice_spacing_mm: float) -> int:
    """How many slices a walk's step spans: the most whose thickness stays within walk_spacing_mm
    (1: every slice; 0 mm turns striding off)."""
    if walk_spacing_mm <= 0 or slice_spacing_mm <= 0:
        return 1
    return max(1, int(np.floor(walk_spacing_mm / slice_spacing_mm + 1e-6)))


def walk_ranges(starts: Sequence[int], n: int) -> Dict[int, Tuple[int, int]]:
    """{start: (low, high)}: the walks from `start` go down to low + 1 and up to high - 1; between
    two starts, each slice belongs to the nearer one (the lower one on a tie)."""
    order = sorted(starts)
    out = {}
    for pos, s in enumerate(order):
        low = -1 if pos == 0 else (order[pos - 1] + s) // 2
        high = n if pos == len(order) - 1 else (s + order[pos + 1]) // 2 + 1
        out[s] = (low, high)
    return out


def _propagate(ctx, label: int, n: int, starts: Dict[int, np.ndarray], min_area, records: List[SliceRecord],
               painted: bool = True, ownership: str = "nearest") -> Tuple[Dict[int, np.ndarray], Dict[int, int]]:
    """Walk outwards from every start slice; returns (masks {slice: mask}, owner {slice: start whose
    walk gave that slice}). ctx and min_area are one for all starts, or {start: ...}: each support's
    walk with its own confidence and area. painted: the starts are the user's paint (not a decoded
    start slice, as across patients).
    ownership: between two starts, "nearest" gives each slice to the nearer start (walk_ranges);
    "agreement" walks both across the gap and splits it where their masks agree best (split_gap)."""
    def walk(s, stop, step, into_masks, into_records):
        c = ctx[s] if isinstance(ctx, dict) else ctx
        a = min_area[s] if isinstance(min_area, dict) else min_area
        _walk(c, label, s, starts[s], stop, step, a, into_masks, into_records, painted)

    masks: Dict[int, np.ndarray] = dict(starts)
    order = sorted(starts)
    if ownership == "nearest" or len(order) == 1:
        owner = {}
        for s, (low, high) in walk_ranges(order, n).items():
            walk(s, low, -1, masks, records)
            walk(s, high, +1, masks, records)
            owner.update({t: s for t in range(low + 1, high)})
        return masks, owner
    owner = {s: s for s in order}
    walk(order[0], -1, -1, masks, records)
    walk(order[-1], n, +1, masks, records)
    owner.update({t: order[0] for t in range(order[0])})
    owner.update({t: order[-1] for t in range(order[-1] + 1, n)})
    for s1, s2 in zip(order, order[1:]):
        up, up_records, down, down_records = {}, [], {}, []
        walk(s1, s2, +1, up, up_records)
        walk(s2, s1, -1, down, down_records)
        split = split_gap(s1, s2, up, down)
        masks.update({t: m for t, m in up.items() if t <= split})
        masks.update({t: m for t, m in down.items() if t > split})
        records += [r for r in up_records if r.index <= split] + [r for r in down_records if r.index > split]
        owner.update({t: s1 if t <= split else s2 for t in range(s1 + 1, s2)})
    return masks, owner


def split_gap(s1: int, s2: int, up: Dict[int, np.ndarray], down: Dict[int, np.ndarray]) -> int:
    """Where the gap between starts s1 < s2 changes hands: slices s1 < t <= split from s1's walk up
    (`up`), split < t < s2 from s2's walk down (`down`). Each walk is best near its own start; they
    hand over on the slice where both found the target and their masks agree best (IoU; the slice
    nearest the middle on a tie). Where the walks never met (one stopped before the other's
    reach), each keeps what it found."""
    both = [t for t in range(s1 + 1, s2) if t in up and t in down]
    if not both:
        return max(up, default=s1)
    middle = (s1 + s2) / 2.0

    def agreement(t):
        inter = np.logical_and(up[t], down[t]).sum()
        union = np.logical_or(up[t], down[t]).sum()
        return (inter / union if union else 1.0, -abs(t - middle))
    return max(both, key=agreement)


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
                   absent: Optional[Dict[int, Sequence[int]]] = None) -> VolumeResult:
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
    """
    run = VolumeRun(image, spacing_ijk, support_label, sam, dino, cfg, support_image, confidence_from, axis, absent)
    return run.segment(progress, cancel, stores if stores is not None else {}, embedding_cache, on_slice,
                       confidence_everywhere)


class OwnedConfidence:
    """A target's confidence when each support slice walks with its own maps: slice t's map is
    the one of the support whose walk gave t (owner, from _propagate). SliceConfidence's interface."""

    def __init__(self, confs: Dict[int, SliceConfidence], owner: Dict[int, int], n: int):
        self.confs, self.n = confs, n
        self.owner = dict(owner)

    def prepare(self, indices: Sequence[int]) -> None:
        for s, conf in self.confs.items():
            conf.prepare([t for t in indices if self.owner.get(int(t)) == s])

    def computed(self) -> List[int]:
        return sorted(t for s, c in self.confs.items() for t in c.computed() if self.owner.get(t) == s)

    def dense(self) -> np.ndarray:
        first = next(iter(self.confs.values()))
        out = np.zeros((self.n, first.frame.H, first.frame.W), dtype=np.float32)
        for t in self.computed():
            out[t] = self.confs[self.owner[t]].maps[t]
        return out


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
                 axis: Optional[int], absent: Optional[Dict[int, Sequence[int]]]):
        validate(cfg)
        self.timings = {k: 0.0 for k in ("intensity", "encode_sam", "encode_dinov2", "confidence", "prompts",
                                         "decode")}
        t0 = time.perf_counter()
        if image.ndim != 3:
            raise InputError("image is %dD; a 3D volume is needed" % image.ndim)
        self.cross = cross = support_image is not None
        if not cross and support_label.shape != image.shape:
            raise InputError("support label grid %s differs from the image grid %s"
                             % (support_label.shape, image.shape))
        if cross and support_label.shape != support_image.shape:
            raise InputError("support label grid %s differs from the support image grid %s"
                             % (support_label.shape, support_image.shape))
        self.support = support = find_support(support_label, axis)
        self.absent = absent_marks(absent, support, image.shape[support.axis])
        norm, self.modality = normalize(image, cfg.intensity)
        ref_norm = normalize(support_image, cfg.intensity)[0] if cross else norm
        self.timings["intensity"] = time.perf_counter() - t0

        self.axis = axis = support.axis
        self.query = np.ascontiguousarray(to_slices(norm, axis))
        self.ref = np.ascontiguousarray(to_slices(ref_norm, axis)) if cross else self.query
        del norm, ref_norm                  # (a copy when the slicing axis is not k: keep only one)
        self.n, self.H, self.W = self.query.shape
        if cross and self.ref.shape[1:] != (self.H, self.W):
            raise InputError("the support image's slices are %dx%d but the image's are %dx%d; resample one onto "
                             "the other's in-plane grid" % (self.ref.shape[1], self.ref.shape[2], self.H, self.W))
        self.spacing_rc = in_plane_spacing(spacing_ijk, axis)
        self.stride = walk_stride(cfg.volume.walk_spacing_mm, slice_spacing(spacing_ijk, axis))
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
        self.rings = {}
        if cfg.volume.ring_min_hole > 0:
            for label in support.labels:
                masks = [self.paint[s] == label for s in support.slices[label]]
                parts = [ring_parts([m], cfg.volume.ring_min_hole) for m in masks]
                if any(p is not None for p in parts):
                    self.rings[label] = ([fill_holes(m) for m in masks],
                                         {s: p[1][0] for s, p in zip(support.slices[label], parts) if p is not None})
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
        workers = min(self.cfg.volume.label_workers, len(self.support.labels))
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
        return conf

    def target_range(self, sup_idx: List[int], sup_masks: List[np.ndarray]):
        """The grey-value range of a target's support masks (gate.py); None across patients, whose
        MR grey values are not on this scan's scale, unless gate.cross."""
        if self.cross and not self.cfg.gate.cross:
            return None
        return organ_range([self.ref[s] for s in sup_idx], sup_masks, self.cfg.gate)

    # -- cross-patient priors (position.py)

    def nearest_support(self, t: int, sup_idx: List[int]) -> int:
        """The support slice (its position in sup_idx) at the relative height of the volume
        nearest query slice t's."""
        rel = [abs(s / max(1, len(self.ref) - 1) - t / max(1, self.n - 1)) for s in sup_idx]
        return int(np.argmin(rel))

    def expected_slice_region(self, t: int, sup_idx: List[int], sup_masks: List[np.ndarray]):
        """Where the target is expected on query slice t, from the nearest support slice; None
        when the prior is off."""
        if not self.cfg.volume.position_prior:
            return None
        k = self.nearest_support(t, sup_idx)
        return expected_region(sup_masks[k], self.ref[sup_idx[k]], self.query[t], self.cfg.volume.position_margin)

    def expected_slice_shape(self, t: int, sup_idx: List[int], sup_masks: List[np.ndarray]):
        """The nearest support slice's mask carried onto query slice t; None when the prior is off."""
        if not self.cfg.volume.position_prior:
            return None
        k = self.nearest_support(t, sup_idx)
        return expected_shape(sup_masks[k], self.ref[sup_idx[k]], self.query[t])

    def expected_height(self, t: int, sup_idx: List[int]) -> bool:
        """Whether query slice t lies at a relative height of the volume near the support
        slices' (within position_margin of the volume's extent)."""
        if not self.cfg.volume.position_prior:
            return True
        rel, m, top = t / max(1, self.n - 1), self.cfg.volume.position_margin, max(1, len(self.ref) - 1)
        return min(sup_idx) / top - m <= rel <= max(sup_idx) / top + m

    def cross_start(self, ctx: "_Context", label: int, sup_idx: List[int], sup_masks: List[np.ndarray],
                    conf: SliceConfidence, min_area: float, records: List[SliceRecord]) -> Dict[int, np.ndarray]:
        """Across patients: the walk starts on the slice (at a height near the supports') with the
        most confidence inside the carried-over support mask; without the position prior, the
        largest confident area. One slice's carried-over mask at a time: memory stays a slice's."""
        def start_score(t: int) -> float:
            if not self.expected_height(t, sup_idx) or t in ctx.absent:
                return -1.0
            shape = self.expected_slice_shape(t, sup_idx, sup_masks)
            if shape is None:
                return float((conf[t] >= self.cfg.prompts.box_threshold).sum())
            return float((conf[t] * shape).sum())

        conf.prepare([t for t in range(self.n) if self.expected_height(t, sup_idx)])
        start = int(np.argmax([start_score(t) for t in range(self.n)]))
        first, rec = ctx.decode(label, start, self.expected_slice_region(start, sup_idx, sup_masks), min_area,
                                expected=self.expected_slice_shape(start, sup_idx, sup_masks))
        records.append(rec)
        ctx.report(rec, first)
        if first is None:
            for t in range(self.n):
                if t != start:
                    records.append(_record(label, t, "not reached"))
                    ctx.report(records[-1], None)
                    self.tick()
            return {}
        return {start: first}

    # -- per label

    def segment_target(self, label: int, sup_idx: List[int], sup_masks: List[np.ndarray],
                       records: List[SliceRecord], timings: Dict[str, float],
                       report: Optional[SliceReport] = None):
        """(propagated masks {slice: mask}, its confidence) of one target shape; its stage seconds
        are added to `timings`.

        Within a volume, each support slice's walks use that support alone: its prototypes, its
        area and its grey values. A correction painted later re-starts the walk around itself and
        leaves the rest of the organ as the other supports had it (the same maps, the same decoded
        masks), instead of blending its features into every slice's prototypes."""
        def context(conf, idx, masks):
            return _Context(self.sam, self.q_stores["sam"], conf, self.cfg, timings, self.stopped, self.tick,
                            self.target_range(idx, masks), report, self.absent.get(label, ()), self.judge,
                            self.stride, self.spacing_rc)

        def min_area(masks):
            return self.cfg.volume.min_area_fraction * float(np.mean([m.sum() for m in masks]))

        if self.cross:
            conf = self.confidence_for(sup_idx, sup_masks)
            before = conf.seconds
            ctx = context(conf, sup_idx, sup_masks)
            starts = self.cross_start(ctx, label, sup_idx, sup_masks, conf, min_area(sup_masks), records)
            masks = _propagate(ctx, label, self.n, starts, min_area(sup_masks), records, painted=False)[0] \
                if starts else {}
            if self.everywhere:
                conf.prepare(range(self.n))
            timings["confidence"] += conf.seconds - before
            return masks, conf
        confs = {s: self.confidence_for([s], [m]) for s, m in zip(sup_idx, sup_masks)}
        before = {s: c.seconds for s, c in confs.items()}
        ctxs = {s: context(confs[s], [s], [m]) for s, m in zip(sup_idx, sup_masks)}
        starts = dict(zip(sup_idx, sup_masks))
        for s, m in zip(sup_idx, sup_masks):
            records.append(_record(label, s, "support", score=float(confs[s][s][m].mean())))
            ctxs[s].report(records[-1], m)
            self.tick()
        masks, owner = _propagate(ctxs, label, self.n, starts, {s: min_area([m]) for s, m in starts.items()},
                                  records, ownership=self.cfg.volume.ownership)
        # No prediction of a label on its own support slice: the paint stands there (assemble).
        for s in sup_idx:
            masks.pop(s, None)
        conf = OwnedConfidence(confs, owner, self.n)
        if self.everywhere:
            conf.prepare(range(self.n))
        timings["confidence"] += sum(c.seconds - before[s] for s, c in confs.items())
        return masks, conf

    def ring_label(self, label: int, sup_idx: List[int], sup_masks: List[np.ndarray], ring,
                   records: List[SliceRecord], seconds: Dict[str, float]):
        """A ring (the myocardium around the blood pool): a box drawn around a ring makes SAM
        segment the bright hole, not the band. So the hole is propagated as a target of its own and
        the ring is the band of the support's thickness around it; the filled shape's walk decides
        where the label is present (its mask stands where no hole is found)."""
        filled, holes = ring
        hole_idx = sorted(holes)
        outer, conf_outer = self.segment_target(label, sup_idx, filled, records, seconds)
        inner, conf_inner = self.segment_target(label, hole_idx, [holes[s] for s in hole_idx], [], seconds)
        thickness = ring_thickness([sup_masks[sup_idx.index(s)] for s in hole_idx], [holes[s] for s in hole_idx],
                                   self.spacing_rc)
        band_range = self.target_range(sup_idx, sup_masks)
        masks = {t: apply_gate(band_around(inner[t], thickness, self.spacing_rc), self.query[t], band_range,
                               self.cfg.gate) if t in inner else m for t, m in outer.items()}
        # The hole's map on every slice the filled shape's walk computed: the ring's confidence
        # (which decides overlaps between labels) is then what every slice's maps give.
        conf_inner.prepare(conf_outer.computed())
        computed = sorted(set(conf_outer.computed()) | set(conf_inner.computed()))
        conf = conf_outer.dense() * (1.0 - conf_inner.dense())
        if self.on_slice is not None:             # a ring's slices are known once both walks are done
            for rec in sorted(records, key=lambda r: r.index):
                self.on_slice(rec, masks.get(rec.index, sup_masks[sup_idx.index(rec.index)]
                                             if rec.status == "support" else None))
        return masks, conf, computed

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
                masks, conf, computed = self.ring_label(label, sup_idx, sup_masks, ring, records, seconds)
        except BaseException:
            self.failed.set()
            raise
        return masks, conf, records, seconds, computed

    def assemble(self, per_label: list) -> VolumeResult:
        conf_out: Dict[int, np.ndarray] = {}
        found: Dict[int, Dict[int, np.ndarray]] = {}         # label -> slice -> mask
        records: List[SliceRecord] = []
        computed: set = set()
        for label, (masks, conf, recs, seconds, slices) in zip(self.support.labels, per_label):
            found[label], conf_out[label] = masks, conf
            records += recs
            computed.update(slices)
            for k, v in seconds.items():
                self.timings[k] += v
        if self.cfg.volume.enclosed_follow:
            follow_enclosing(found, records, enclosing_labels(self.paint, self.support.labels), self.support.slices)
        labels_out = _assemble(found, conf_out, (self.n, self.H, self.W), self.support.labels)
        if not self.cross:
            # The support slices keep the user's paint exactly: every painted voxel keeps its value.
            for s, p in self.paint.items():
                painted = p != 0
                labels_out[s][painted] = p[painted]
        records.sort(key=lambda r: (r.label, r.index))
        axis = self.axis
        conf_out = {v: np.ascontiguousarray(from_slices(c, axis)) if axis else c for v, c in conf_out.items()}
        return VolumeResult(np.ascontiguousarray(from_slices(labels_out, axis)), conf_out, records, self.support,
                            self.modality, list(self.confidence_from), self.timings, sorted(computed))


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


def enclosing_labels(paint: Dict[int, np.ndarray], labels: Sequence[int], inside: float = 0.95) -> Dict[int, List[int]]:
    """{label: [labels enclosing it]}: B encloses A when A and B are painted together on at least
    one support slice and, on every such slice, at least `inside` of A's paint lies within B's
    paint with its holes filled (the blood pool within the myocardium's ring)."""
    out: Dict[int, List[int]] = {}
    for a in labels:
        for b in labels:
            if a == b:
                continue
            shared = [p for p in paint.values() if (p == a).any() and (p == b).any()]
            if shared and all(np.logical_and(p == a, fill_holes(p == b)).sum() >= inside * (p == a).sum()
                              for p in shared):
                out.setdefault(a, []).append(b)
    return out


def follow_enclosing(found: Dict[int, Dict[int, np.ndarray]], records: List[SliceRecord],
                     enclosing: Dict[int, List[int]], support_slices: Dict[int, List[int]]) -> None:
    """Drop (in place) an enclosed label's masks on slices where a label enclosing it is neither
    found nor painted; their records become "absent" with the reason."""
    for inner, outers in sorted(enclosing.items(), key=lambda kv: len(kv[1])):
        keep = set.intersection(*[set(found[o]) | set(support_slices[o]) for o in outers])
        dropped = set(found[inner]) - keep
        for t in dropped:
            del found[inner][t]
        for rec in records:
            if rec.label == inner and rec.index in dropped:
                rec.status, rec.reason = "absent", "outside label %s" % ", ".join(map(str, outers))


def ring_parts(masks: Sequence[np.ndarray], min_hole: float):
    """(filled shapes, holes) when every mask is a closed band around a hole of at least
    `min_hole` of its filled area, else None."""
    filled = [fill_holes(m) for m in masks]
    holes = [f & ~m for f, m in zip(filled, masks)]
    if all(h.sum() >= min_hole * max(1, f.sum()) for f, h in zip(filled, holes)):
        return filled, holes
    return None


def ring_thickness(rings: Sequence[np.ndarray], holes: Sequence[np.ndarray], spacing_rc) -> float:
    """Thickness (mm) of the support's rings: the distance T for which the band around the hole
    (`band_around`) has the ring's area, averaged over the support slices."""
    from scipy import ndimage
    out = []
    for r, h in zip(rings, holes):
        d = np.sort(ndimage.distance_transform_edt(~h, sampling=spacing_rc)[~h])
        out.append(float(d[min(len(d), int(r.sum())) - 1]))
    return float(np.mean(out))


def band_around(hole: np.ndarray, thickness: float, spacing_rc) -> np.ndarray:
    """The pixels outside `hole` within `thickness` (mm) of it."""
    from scipy import ndimage
    if not hole.any():
        return hole.copy()
    d = ndimage.distance_transform_edt(~hole, sampling=spacing_rc)
    return (d > 0) & (d <= thickness)


def _assemble(found: Dict[int, Dict[int, np.ndarray]], conf: Dict[int, np.ndarray], shape, labels) -> np.ndarray:
    """One label volume from each label's masks; where masks of two labels overlap, the label
    with the higher confidence there wins (uint8 when the labels fit, else int32)."""
    out = np.zeros(shape, dtype=np.uint8 if max(labels) < 256 else np.int32)
    for t in sorted({t for masks in found.values() for t in masks}):
        best = None
        for label in labels:
            m = found[label].get(t)
            if m is None:
                continue
            c = np.where(m, conf[label][t], -1.0)
            win = m if best is None else m & (c > best)
            out[t][win] = label
            best = c if best is None else np.maximum(best, c)
    return out
