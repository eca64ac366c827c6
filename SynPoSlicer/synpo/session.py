"""The session API: one volume embedded once, prompted many times.

In the spirit of segment-anything's `SamPredictor` (`set_image` once, `predict` many times), a
`Session` takes a volume with its voxel spacing once and keeps what every later request can
reuse: the slices' embeddings (computed as runs need them), the confidence maps of each support,
and SAM's decoded masks by their exact inputs. The command line, `synpo evaluate`,
`synpo benchmark`, the server and (through the server) the Slicer module all segment through it.

    models = Models.load("litemedsam", device="cpu")
    session = Session(image, spacing_ijk, models, direction=direction)   # image: [k, j, i], spacing: mm
                                                             # along i, j, k; direction: its 3x3 (layout.py)
    result = session.run(support)                            # support: label map, paint on a few slices
    result = session.add_support(paint_on_another_slice)     # embeddings and untouched slices reused
    mask, iou = session.redecode(label=1, slice_index=12, positive=[[40, 30]], negative=[])

A session is not thread-safe: one request at a time (the server holds a lock per session).
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import SynPoConfig, default_config
from .decode import redecode_with_points
from .errors import InputError, SynPoError
from .intensity import normalize
from .io import check_image_values
from .result import VolumeResult
from .layout import Layout, check_direction, in_plane_layout
from .support import find_support, in_plane_spacing, merge_corrections, to_slices
from .embeddings import Stores
from .slice_confidence import SliceConfidence
from .volume import EmbeddingStore, Progress, SliceReport, check_grids, get_store, segment_volume, store_key


@dataclass
class Models:
    """The loaded models a session segments with (features.load_models)."""
    sam: object
    dino: Optional[object]
    confidence_from: Tuple[str, ...]
    sam_name: str = "litemedsam"
    device: str = "cpu"

    @classmethod
    def load(cls, sam: str = "litemedsam", features: str = "auto", dinov2: str = "small", device: str = "auto",
             precision: str = "auto", quiet: bool = True, runtime: str = "auto") -> "Models":
        from .features import load_models
        s, d, use = load_models(sam, features, dinov2, device, quiet, precision, runtime)
        return cls(s, d, tuple(use), sam, str(s.device))

    @classmethod
    def of(cls, sam, dino=None, confidence_from: Optional[Sequence[str]] = None) -> "Models":
        """Models already loaded; the confidence is fused from both encoders when `dino` is given,
        unless `confidence_from` says otherwise."""
        use = tuple(confidence_from or (("sam", "dinov2") if dino is not None else ("sam",)))
        return cls(sam, dino, use, getattr(sam, "name", "sam"), str(getattr(sam, "device", "cpu")))

    def describe(self) -> dict:
        out = {"sam": self.sam_name, "features": list(self.confidence_from), "device": self.device,
               "runtime": getattr(self.sam, "runtime", "torch"),
               "precision": str(getattr(self.sam, "precision", None) or "fp32").replace("torch.", "")}
        if self.dino is not None and "dinov2" in self.confidence_from:
            out["dinov2"] = str(getattr(self.dino, "name", "")).replace("dinov2-", "")   # small, base, ...
        return out


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    return 0


def check_real(array: np.ndarray, what: str) -> None:
    """InputError unless `array` holds real numbers (not bool, complex or objects)."""
    if not np.issubdtype(array.dtype, np.number) or array.dtype.kind == "c":
        raise InputError("%s has dtype %s; a real scalar volume is needed" % (what, array.dtype))


class Session:
    """One volume and everything computed on it (module docstring)."""

    def __init__(self, image: np.ndarray, spacing_ijk: Sequence[float], models: Models,
                 embedding_cache: Optional[str] = None, direction: Optional[Sequence[float]] = None):
        """direction: the volume's 3x3 direction (ITK's LPS, row-major), when known (layout.known_direction:
        None for a placeholder header): the encoders are then given each slice with its rows along the axis
        viewers draw vertically, an axial slice posterior side up, however the volume is stored (layout.py);
        every input and output stays in the stored layout."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise InputError("the image is %dD; a 3D volume is needed" % image.ndim)
        check_real(image, "the image")
        image = image.astype(np.float32, copy=False)
        check_image_values(image, "the image")
        spacing = tuple(float(s) for s in spacing_ijk)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InputError("the voxel spacing must be 3 positive numbers (mm along i, j, k), not %s"
                             % (list(spacing_ijk),))
        try:
            self.direction = None if direction is None else check_direction(direction)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self.image, self.spacing, self.models = image, spacing, models
        self.embedding_cache = embedding_cache
        # Embeddings, confidence maps, decoded masks (embeddings.py); stores.grown: the server's memory check.
        self.stores: Dict = Stores()
        self.running_since: Optional[float] = None         # when the run in progress started (shed)
        self.support: Optional[np.ndarray] = None          # the last run's support label map
        self.support_image: Optional[np.ndarray] = None
        self.cfg: SynPoConfig = default_config()
        self.result: Optional[VolumeResult] = None
        self.absent: Dict[int, List[int]] = {}              # the last run's absent marks
        self.held: Dict[int, Dict[int, List[int]]] = {}     # the last run's held ends (held_ends)
        self.last_used = time.monotonic()

    # ------------------------------------------------------------------ runs

    def run(self, support: np.ndarray, cfg: Optional[SynPoConfig] = None, support_image: Optional[np.ndarray] = None,
            progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
            on_slice: Optional[SliceReport] = None, confidence_from: Optional[Sequence[str]] = None,
            confidence_everywhere: bool = False, axis: Optional[int] = None,
            absent: Optional[Dict[int, Sequence[int]]] = None,
            held_ends: Optional[Dict[int, Dict[int, Sequence[int]]]] = None,
            previous: Optional[np.ndarray] = None,
            previous_overridden: Optional[Dict[int, Dict[int, np.ndarray]]] = None) -> VolumeResult:
        """Segment the volume from the paint in `support` (a label map on the image's grid, or on
        `support_image`'s when it was painted on another patient's volume: arrays stored in the image's
        axis order and sense, as `io.orient_like` turns them from their files). Embeddings, confidence
        maps and decoded masks of earlier runs are reused wherever this run's inputs leave them valid.
        confidence_from: the encoders whose confidence is fused, if not the models' (an ablation).
        confidence_everywhere: compute the confidence map of every slice, not only of the slices the
        walks reach (which embeds every slice).
        axis: the slicing axis when known (else found from the paint); absent: {label: slices}
        where the label is absent (segment_volume)."""
        self.last_used = started = self.running_since = time.monotonic()
        support = np.asarray(support)
        if support.dtype.kind not in "iub":
            raise InputError("the support label map has dtype %s; integer labels are needed" % support.dtype)
        if support_image is not None:
            support_image = np.asarray(support_image)
            check_real(support_image, "the support image")           # (as the image: a bool one is refused)
            support_image = support_image.astype(np.float32, copy=False)
            check_image_values(support_image, "the support image")
        cfg = cfg if cfg is not None else default_config()
        try:
            layout = Layout(0)
            if not all(self.layout(a).identity for a in range(3)):   # (else the paint is not read twice for its axis)
                check_grids(self.image, support, support_image)     # (its messages in the stored layout)
                layout = self.layout(find_support(support).axis if axis is None else axis)
            result = segment_volume(layout.volume(self.image), layout.spacing(self.spacing), layout.volume(support),
                                    self.models.sam, self.models.dino, cfg,
                                    support_image=layout.volume(support_image), progress=progress, cancel=cancel,
                                    stores=self.stores, confidence_from=tuple(confidence_from or self.models.confidence_from),
                                    embedding_cache=self.embedding_cache,
                                    on_slice=layout.report_back(on_slice), confidence_everywhere=confidence_everywhere,
                                    axis=axis, absent=absent, held_ends=held_ends, previous=layout.volume(previous),
                                    previous_overridden=previous_overridden and
                                    {v: layout.masks(d) for v, d in previous_overridden.items()})
            result = layout.result_back(result)
        finally:
            self.running_since = None
        self.support, self.support_image, self.cfg, self.result = support, support_image, cfg, result
        self._drop_confidence_unused_since(started)
        self.absent = {int(v): sorted(int(t) for t in s) for v, s in (absent or {}).items() if len(s)}
        self.held = {int(v): {int(k): [int(t) for t in ts] for k, ts in d.items()} for v, d in (held_ends or {}).items()}
        self.last_used = time.monotonic()
        return result

    def add_support(self, paint: Optional[np.ndarray] = None, absent: Optional[Dict[int, Sequence[int]]] = None,
                    cfg: Optional[SynPoConfig] = None, progress: Optional[Progress] = None,
                    cancel: Optional[Callable[[], bool]] = None, on_slice: Optional[SliceReport] = None,
                    confidence_everywhere: bool = False) -> VolumeResult:
        """Run again after corrections, on the last run's slicing axis:
        - paint: a label map with labels painted on some slices (any slices, adjacent ones
          included): on each such slice, the label's paint replaces its old support paint there,
          and the slice becomes one of its supports (a walk re-starts from it both ways);
        - absent: {label: slices} where the label is absent (the user erased a false positive):
          the label's walks end there; a mark takes the label's paint off that slice.
        Embeddings, the maps of unchanged supports and decodings the change leaves alone are reused,
        and a walk that agrees with the last run's masks ends there, the last run's masks standing
        beyond it (volume.correction_agree_iou; only under the last run's settings)."""
        if self.support is None:
            raise SynPoError("no support yet: run the session once before adding corrections")
        axis = self.result.support.axis
        if paint is not None:
            paint = np.asarray(paint)
            if paint.shape != self.support.shape:
                raise InputError("the correction's grid %s differs from the support's %s"
                                 % (paint.shape, self.support.shape))
            if paint.dtype.kind not in "iub" or (paint < 0).any():
                raise InputError("the correction must hold integer labels >= 0")
        merged, marks = merge_corrections(self.support, self.absent, paint, absent, axis)
        cfg = cfg if cfg is not None else self.cfg
        # The previous masks stand where a walk agrees with them (volume.correction_agree_iou) only when
        # they came from these settings: after a change of settings every walk goes to its end.
        same = cfg == self.cfg
        result = self.run(merged, cfg if same else cfg.with_(volume={"correction_agree_iou": 0.0}),
                          self.support_image, progress, cancel, on_slice,
                          confidence_everywhere=confidence_everywhere, axis=axis,
                          absent=marks,
                          held_ends=self.held_ends(merged, axis, cfg), previous=self.untrimmed_labels(),
                          previous_overridden=self.result.overridden)
        self.cfg = cfg
        return result

    def untrimmed_labels(self) -> np.ndarray:
        """The last run's labels as its walks and the assembly's overlaps gave them: the rim
        assembly.grow_edges added taken off (VolumeResult.grown) and the voxels assembly.drop_thin_ends
        took off its labels' last slices put back (VolumeResult.trimmed). What a re-run's walks are
        judged against (walk.keep_reach) and whose owner keeps a voxel two labels claim, so a slice the
        trim rule took is walked and trimmed again as before, not re-added by a re-walk that finds no
        previous mask there, and a neighbour's grown rim is no claim on a label's voxels."""
        labels = self.result.labels
        grown = self.result.grown
        if not self.result.trimmed and not grown:
            return labels
        out = np.array(labels, copy=True)
        view = to_slices(out, self.result.support.axis)
        for t, rim in grown.items():
            view[t][rim] = 0
        for label, by_slice in self.result.trimmed.items():
            for t, mask in by_slice.items():
                view[t][mask & (view[t] == 0)] = label
        return out

    def held_ends(self, merged: np.ndarray, axis: int, cfg: Optional[SynPoConfig] = None
                  ) -> Dict[int, Dict[int, List[int]]]:
        """{label: {new support slice: [the previous run's ends]}} for the corrections painted inside
        the label's previous extent on which the previous mask agreed with the new paint
        (IoU >= volume.correction_trust_iou: the previous walk followed the organ there;
        volume.correction_holds_ends): their walks stop one slice past the first and last slice
        the last run found the label on, and are judged against the previous masks."""
        vc = (cfg if cfg is not None else default_config()).volume
        from .result import FOUND
        prev = self.result
        if prev is None or self.support_image is not None or not vc.correction_holds_ends:
            return {}
        m = to_slices(merged, axis)
        n = m.shape[0]
        out: Dict[int, Dict[int, List[int]]] = {}
        for v in prev.support.labels:
            found = [r.index for r in prev.records if r.label == v and r.status in FOUND]
            if not found:
                continue
            lo, hi = min(found), max(found)
            painted = np.flatnonzero((m == v).reshape(n, -1).any(1))
            before = to_slices(prev.labels, axis)
            new = [int(s) for s in painted if s not in prev.support.slices.get(v, ()) and lo <= s <= hi
                   and _iou(before[s] == v, m[s] == v) >= vc.correction_trust_iou]
            ends = [t for t in (lo - 1, hi + 1) if 0 <= t < n]
            if new and ends:
                out[v] = {s: ends for s in new}
        if vc.correction_holds_persist:
            # An earlier correction's ends stay held while it is painted and no paint of its label lies
            # on or past one of them (the user painted the organ there: that end was wrong).
            for v, by_slice in self.held.items():
                painted = set(int(s) for s in np.flatnonzero((m == v).reshape(n, -1).any(1)))
                for s, ends in by_slice.items():
                    if s not in painted or s in out.get(v, {}):
                        continue
                    kept = [e for e in ends if not any((p - e) * (e - s) >= 0 for p in painted)]
                    if kept:
                        out.setdefault(v, {})[s] = kept
        return out

    # ------------------------------------------------------------------ one slice

    def layout(self, axis: int) -> Layout:
        """How the slices across `axis` go to the encoders (layout.in_plane_layout: the identity when the
        volume is stored as the development volumes are, or its direction is unknown)."""
        return in_plane_layout(self.direction, axis, self.image.shape)

    def sam_store(self, axis: int) -> EmbeddingStore:
        """The SAM embeddings of the slices across `axis` (created empty if no run used that axis), in
        the encoders' layout (Session.layout)."""
        sam = self.models.sam
        key = store_key("query", "sam", sam, axis)
        store = self.stores.get(key)
        if store is None:
            layout = self.layout(axis)
            norm, _ = normalize(layout.volume(self.image), self.cfg.intensity)     # (as segment_volume: laid out first)
            slices = np.ascontiguousarray(to_slices(norm, axis))
            store = get_store(self.stores, key, sam, slices, in_plane_spacing(layout.spacing(self.spacing), axis),
                              self.cfg, self.embedding_cache)
        return store

    def redecode(self, slice_index: int, positive, negative, label: Optional[int] = None,
                 axis: Optional[int] = None) -> Tuple[np.ndarray, float]:
        """Decode one slice again from points (x = column, y = row within the slice, as in the
        points JSON) the user moved, added or deleted: (mask (H, W) bool, SAM's IoU). With `label`,
        the label's current mask on that slice (the last result's) widens the box as the user sees it."""
        self.last_used = time.monotonic()
        if axis is None:
            if self.result is None:
                raise SynPoError("no run yet: give the slicing axis to re-decode a slice")
            axis = self.result.support.axis
        if axis not in (0, 1, 2):
            raise InputError("axis must be 0, 1 or 2 (k, j, i), not %r" % (axis,))
        n = self.image.shape[axis]
        if not 0 <= int(slice_index) < n:
            raise InputError("slice %s is outside the volume (0..%d across axis %s)" % (slice_index, n - 1, "kji"[axis]))
        positive = np.asarray(positive, dtype=float).reshape(-1, 2)
        negative = np.asarray(negative, dtype=float).reshape(-1, 2)
        if len(positive) == 0:
            raise InputError("give at least one positive point to re-decode a slice")
        rows, cols = to_slices(self.image, axis).shape[1:]
        for p in (positive, negative):
            if len(p) and not (np.all(np.isfinite(p)) and np.all(p >= -0.5) and np.all(p[:, 0] < cols - 0.5)
                               and np.all(p[:, 1] < rows - 0.5)):
                raise InputError("points must be finite and lie on the slice: x in 0..%d, y in 0..%d"
                                 % (cols - 1, rows - 1))
        store = self.sam_store(axis)
        t = int(slice_index)
        store.ensure([t])
        current = None
        if label is not None and self.result is not None and self.result.support.axis == axis:
            current = to_slices(self.result.labels, axis)[t] == int(label)
        layout = self.layout(axis)                   # (the store's slices are the stored ones in this layout)
        if not layout.identity:
            positive, negative = layout.points(positive), layout.points(negative)
            current = None if current is None else layout.mask(current)
        decoded = redecode_with_points(self.models.sam, store.cache[t], store.frame, positive, negative, current,
                                       self.cfg.decode)
        return layout.mask_back(decoded.mask), float(decoded.iou)

    # ------------------------------------------------------------------ memory

    def _drop_confidence_unused_since(self, started: float) -> None:
        """Forget the confidence maps kept for supports the run started at `started` did not use: a
        correction changes a label's paint, so each Update made a new set of maps beside the old ones,
        which no later run asks for (up to a MB a slice and label on 512 x 512 slices, counted in the
        server's memory budget) and which would be computed again if one did."""
        for key, value in list(self.stores.items()):
            if isinstance(value, SliceConfidence) and getattr(value, "bound_at", started) < started:
                del self.stores[key]

    def shed(self) -> None:
        """Make room within the session (the server's budget, before it refuses the session as too large):
        drop the confidence maps the run in progress has not used (a previous paint's, which this run's end
        would drop anyway), or, with no run in progress (a re-decoding), every confidence map (a later run
        computes again those it needs)."""
        since = self.running_since
        self._drop_confidence_unused_since(float("inf") if since is None else since)

    def memory_bytes(self) -> int:
        """What this session holds: the image, the normalised slices, embeddings, confidence maps,
        kept decodings and the last result. (Read while a run adds to them, from another thread:
        each dict is copied before it is gone through.)"""
        arrays = [self.image, self.support, self.support_image]
        total = 0
        for value in list(self.stores.values()):
            if isinstance(value, EmbeddingStore):
                arrays.append(value.slices)
                total += sum(_nbytes(t) for t in list(value.cache.values()))
                total += value.decoded_bytes + value.prompts.bytes
            elif isinstance(value, SliceConfidence):
                arrays += list(value.maps.values())
            else:
                arrays.append(value)
        if self.result is not None:
            arrays += [self.result.labels] + list(self.result.confidence.values()) + list(self.result.grown.values())
            arrays += [m for kept in (self.result.trimmed, self.result.overridden) for by_slice in kept.values()
                       for m in by_slice.values()]
        seen = {id(a): a for a in arrays if a is not None}         # a map shared by stores and result counts once
        return total + sum(_nbytes(a) for a in seen.values())

    def embedded(self) -> Tuple[int, int, int]:
        """(this volume's slices embedded, bytes of a slice's embeddings (all encoders), bytes more
        with every slice of it embedded): what more embeddings would take (the server's message on
        its budget). Another patient's support volume is left out: only its painted slices are embedded."""
        done, each, more = 0, 0, 0
        for key, value in list(self.stores.items()):
            if isinstance(value, EmbeddingStore) and str(key).startswith("query/"):
                held = list(value.cache.values())
                one = _nbytes(held[0]) if held else 0
                done = max(done, len(held))
                each += one
                more += max(0, len(value.slices) - len(held)) * one
        return done, each, more

    def drop_computed(self) -> None:
        """Drop what was computed on the image (embeddings, confidence maps, decodings: computed again
        when needed), keeping the image, the last support and the last result (the server, where the
        session alone outgrew its memory budget)."""
        grown = getattr(self.stores, "grown", None)
        self.stores = Stores()
        self.stores.grown = grown


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
