"""Measuring SynPo on labelled volumes (intra-volume protocol) against baselines.

For each volume and organ, the support is one ground-truth slice at a relative
position of the organ's labelled range (0.5 = the middle). Scores:
- dice_labelled: 3D Dice over the organ's labelled slices (the literature's);
- dice_volume: 3D Dice over every slice (false positives where the organ is
  absent count);
- fp_slices: slices without the organ on which something was predicted.
Baselines on the same slices: `copy` (support mask copied to every labelled
slice), `persam` (one most-confident positive point and one least-confident
negative point per slice, PerSAM-style, on every slice), `oracle_box` (SAM
given the ground-truth box on every labelled slice: the upper bound of the SAM
model used; for a ring-shaped mask, the filled shape's box minus the hole's).

Cross-patient protocol (the published few-shot benchmarks): the support comes
from the next patient in the list; 3 support slices at 1/6, 1/2, 5/6 of its
labelled range; the query's labelled slices are split into 3 chunks, chunk i
predicted slice by slice from support slice i (`cross_chunks`); Dice over the
query's labelled slices. `cross_volume` is the product's own cross-patient
mode (`--support-image`, the 3 slices as supports, propagation) scored the same
way and over the whole volume.

Ablations (`ablation_variants`): SynPo with one part changed, run on the same
volumes, supports and embeddings as SynPo itself, each scored as its own method.
Every score also keeps the Dice of each labelled slice (`slice_dice`, in slice
order), from which the Dice per position in the organ's range is plotted.
"""
import glob
import os
import time
from dataclasses import dataclass, asdict, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import SynPoConfig
from .decode import DecodeConfig, decode_slice
from .gate import organ_range
from .intensity import normalize
from .io import read_volume
from .layout import Layout, in_plane_layout
from .prompts import Prompts, box_of
from .position import expected_region, expected_shape
from .support import in_plane_spacing, to_slices
from .session import Models, Session
from .volume import EmbeddingStore, confidence_volume, decode_prompted, get_store, ring_parts, sam_store, store_key


@dataclass
class Score:
    volume: str
    label: int
    method: str
    position: float
    dice_labelled: float
    dice_volume: float
    fp_slices: int
    seconds: float
    # Dice of each of the organ's labelled slices, in slice order (written to per_slice.csv).
    slice_dice: Tuple[float, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Variant:
    """One SynPo configuration scored as its own method (`name`): SynPo itself or an ablation."""
    name: str
    cfg: SynPoConfig
    confidence_from: Optional[Tuple[str, ...]] = None    # None: the run's own


def ablation_variants(cfg: SynPoConfig, confidence_from: Sequence[str]) -> List[Variant]:
    """SynPo (`cfg`) and its ablations, each with one part changed (README, Evaluation).

    The encoder ablations (each encoder's confidence alone) exist only when the run fuses two
    encoders (`confidence_from` holds both)."""
    points = {"use_points": True}
    changes = [
        ("no_gate", {"gate": {"enabled": False}}),
        ("no_refine", {"decode": {"refine": False}}),
        ("box_points", {"decode": points}),                                   # + Gaussian negatives, K-means
        ("box_points_uniform_neg", {"decode": points, "prompts": {"negative_sigma": 1e6}}),
        ("box_points_no_neg", {"decode": points, "prompts": {"n_negative_points": 0}}),
        ("box_points_raw_topk", {"decode": points, "prompts": {"kmeans": False}}),
        ("points", {"decode": dict(points, use_box=False)}),
        ("points_uniform_neg", {"decode": dict(points, use_box=False), "prompts": {"negative_sigma": 1e6}}),
        ("points_no_neg", {"decode": dict(points, use_box=False), "prompts": {"n_negative_points": 0}}),
        ("points_raw_topk", {"decode": dict(points, use_box=False), "prompts": {"kmeans": False}}),
    ]
    out = [Variant("synpo", cfg)] + [Variant("synpo-" + name, cfg.with_(**c)) for name, c in changes]
    if len(tuple(confidence_from)) > 1:
        out += [Variant("synpo-%s_only" % name, cfg, (name,)) for name in confidence_from]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def score(pred: np.ndarray, gt: np.ndarray, axis: int = 0):
    """(dice over gt's labelled slices, dice over the volume, false-positive slice count)."""
    p, g = to_slices(pred, axis), to_slices(gt, axis)
    labelled = g.reshape(len(g), -1).any(1)
    fp = int((p.reshape(len(p), -1).any(1) & ~labelled).sum())
    return dice(p[labelled], g[labelled]), dice(p, g), fp


def slice_dices(pred: np.ndarray, gt: np.ndarray, axis: int = 0) -> Tuple[float, ...]:
    """The Dice of each slice on which gt is labelled, in slice order."""
    p, g = to_slices(pred, axis), to_slices(gt, axis)
    return tuple(dice(p[t], g[t]) for t in np.flatnonzero(g.reshape(len(g), -1).any(1)))


def scored(volume: str, label: int, method: str, position: float, pred: np.ndarray, gt: np.ndarray,
           seconds: float) -> Score:
    """The Score of a predicted mask against the ground truth (both boolean, slices on axis 0)."""
    return Score(volume, label, method, position, *score(pred, gt), seconds, slice_dices(pred, gt))


def position_profile(scores: Sequence[Score], bins: int = 10) -> Dict[str, np.ndarray]:
    """Mean slice Dice per bin of position in the organ's labelled range (0 = its first labelled
    slice, 1 = its last), per method and support position ("synpo @0.50"); NaN where no slice."""
    groups: Dict[str, List[List[float]]] = {}
    for s in scores:
        if not s.slice_dice:
            continue
        key = s.method if not np.isfinite(s.position) else "%s @%.2f" % (s.method, s.position)
        sums = groups.setdefault(key, [[] for _ in range(bins)])
        n = len(s.slice_dice)
        for i, d in enumerate(s.slice_dice):
            sums[min(bins - 1, int(bins * (i + 0.5) / n))].append(d)
    return {k: np.array([np.mean(b) if b else np.nan for b in v]) for k, v in groups.items()}


def support_slice(gt_mask: np.ndarray, position: float, axis: int = 0) -> int:
    zs = np.flatnonzero(to_slices(gt_mask, axis).reshape(gt_mask.shape[axis], -1).any(1))
    return int(zs[min(len(zs) - 1, int(position * len(zs)))])


def middle_paint(gt: np.ndarray, position: float = 0.5) -> Tuple[np.ndarray, List[int]]:
    """(support, labels): every label of `gt` (K, H, W) painted with its truth on the slice at
    `position` of its labelled range (the intra protocol's support), and the labels painted."""
    labels = [int(v) for v in np.unique(gt) if v != 0]
    support = np.zeros_like(gt)
    for v in labels:
        s = support_slice(gt == v, position)
        support[s][gt[s] == v] = v
    return support, labels


PAIR_EXTENSIONS = (".nii.gz", ".nii")


def find_pairs(folder: str, warn=None) -> List[tuple]:
    """(image, label) pairs named image_N / label_N (or ct / labels) in a folder, in the order of
    the image file names. Only the file name is renamed to find the label (a folder whose path holds
    "image_" is no matter), and the label may be stored compressed or not whatever the image is.
    An image without its label is left out with a line to `warn` (default: stderr), not silently."""
    import sys
    pairs = []
    for img in sorted(glob.glob(os.path.join(glob.escape(folder), "image_*.nii*"))):
        base = os.path.basename(img)
        ext = next((e for e in PAIR_EXTENSIONS if base.endswith(e)), None)
        if ext is None or not os.path.isfile(img):
            continue
        stem = "label_" + base[len("image_"):-len(ext)]
        found = [os.path.join(os.path.dirname(img), stem + e) for e in (ext,) + PAIR_EXTENSIONS]
        lab = next((f for f in found if os.path.isfile(f)), None)
        if lab is None:
            (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(
                "%s has no %s.nii(.gz) beside it: left out" % (img, stem))
            continue
        pairs.append((img, lab))
    if not pairs and os.path.exists(os.path.join(folder, "ct.nii.gz")):
        pairs.append((os.path.join(folder, "ct.nii.gz"), os.path.join(folder, "labels.nii.gz")))
    return pairs


def volume_name(image_path: str) -> str:
    """The name a volume's rows carry ("image_7" for image_7.nii.gz or image_7.nii)."""
    return os.path.basename(image_path).split(".")[0]


def label_of(folder: str, name: str) -> str:
    """The label file of volume `name` (volume_name) in a data folder, whatever its extension
    (find_pairs); the benchmarks that re-read a run's ground truth rebuilt it as name + ".nii.gz"."""
    from .errors import InputError
    for img, lab in find_pairs(folder, warn=lambda m: None):
        if volume_name(img) == name:
            return lab
    raise InputError("no image/label pair named %s in %s" % (name, folder))


def dataset_names(folders: Sequence[str]) -> List[str]:
    """A name for each data folder, unique among them: its own name ("chaos_t2"), with its parent's
    ("a/data", "b/data") where two folders share it, and "#2", "#3"... for a folder given twice: the
    benchmarks key their tables by it, and two folders of one name were merged or overwritten."""
    paths = [os.path.normpath(os.path.abspath(f)) for f in folders]
    parts = [p.split(os.sep) for p in paths]
    names = [p[-1] for p in parts]
    for depth in range(2, max(len(p) for p in parts) + 1) if parts else ():
        clash = {n for n, p in zip(names, paths) if len({q for m, q in zip(names, paths) if m == n}) > 1}
        if not clash:
            break
        names = ["/".join(p[-depth:]).lstrip("/") if n in clash else n for n, p in zip(names, parts)]
    out: List[str] = []
    for n in names:
        k = sum(o == n or o.startswith(n + "#") for o in out)
        out.append("%s#%d" % (n, k + 1) if k else n)
    return out


def check_data_folders(folders: Sequence[str], limit: Optional[int] = None) -> Dict[str, List[tuple]]:
    """{folder: its pairs (find_pairs, the first `limit`)} for the benchmarks, checked before any run:
    a folder with no pair (a wrong path, files named otherwise) is refused up front, not after
    minutes spent on the folders before it. Raises SynPoError."""
    from .errors import SynPoError
    out = {}
    for folder in folders:
        if not os.path.isdir(folder):
            raise SynPoError("data folder not found: %s" % folder)
        out[folder] = find_pairs(folder)[:limit]
        if not out[folder]:
            raise SynPoError("no image_N/label_N volumes in %s" % folder)
    return out


def oracle_box(sam, store, gt: np.ndarray, label: int, ring_min_hole: Optional[float] = None) -> np.ndarray:
    """SAM with the ground-truth box on every labelled slice (axis 0).

    ring_min_hole: a slice whose mask is a closed band around a hole (ring_parts) is
    decoded as the filled shape's box minus the hole's box, both ground truth: a box
    around a ring makes SAM segment what it encloses, so one box is no upper bound there.
    """
    def decode_box(t, m):
        p = Prompts(np.zeros((0, 2)), np.zeros((0, 2)), box_of(m), m)
        return decode_slice(sam, store.cache[t], store.frame, p, DecodeConfig(refine=False)).mask

    out = np.zeros(gt.shape, dtype=bool)
    for t in range(gt.shape[0]):
        m = gt[t] == label
        if not m.any():
            continue
        store.ensure([t])
        parts = ring_parts([m], ring_min_hole) if ring_min_hole is not None else None
        if parts is None:
            out[t] = decode_box(t, m)
        else:
            out[t] = decode_box(t, parts[0][0]) & ~decode_box(t, parts[1][0])
    return out


def persam(sam, store, conf: np.ndarray) -> np.ndarray:
    """PerSAM-style: one positive (most confident) and one negative (least confident) point per slice."""
    out = np.zeros(conf.shape, dtype=bool)
    store.ensure(range(conf.shape[0]))
    for t in range(conf.shape[0]):
        c = conf[t]
        pos = np.unravel_index(np.argmax(c), c.shape)
        neg = np.unravel_index(np.argmin(c), c.shape)
        p = Prompts(np.array([[pos[1], pos[0]]], float), np.array([[neg[1], neg[0]]], float), None,
                    np.zeros(c.shape, bool))
        out[t] = decode_slice(sam, store.cache[t], store.frame, p,
                              DecodeConfig(use_box=False, use_points=True, refine=False)).mask
    return out


def evaluate_intra(pairs: Sequence[tuple], sam, dino=None, cfg: SynPoConfig = SynPoConfig(),
                   labels: Optional[Sequence[int]] = None, positions: Sequence[float] = (0.5,),
                   baselines: bool = True, log=print, confidence_from=None,
                   embedding_cache: Optional[str] = None,
                   variants: Optional[Sequence[Variant]] = None) -> List[Score]:
    """Intra-volume protocol (module docstring). `variants`: the SynPo configurations to score,
    each as its own method on the same supports and embeddings (default: SynPo with `cfg`); the
    baselines use the first one's confidence maps."""
    variants = list(variants) if variants else [Variant("synpo", cfg)]
    scores: List[Score] = []
    for img_path, lab_path in pairs:
        image, geom = read_volume(img_path)
        gt, _ = read_volume(lab_path, "label", label=True)
        name = os.path.basename(img_path).split(".")[0]
        present = [int(v) for v in np.unique(gt) if v != 0]
        wanted = [v for v in (labels or present) if v in present]
        session = Session(image, geom.spacing, Models.of(sam, dino, confidence_from), embedding_cache,
                          direction=geom.known_direction)
        stores = session.stores
        for pos in positions:
            support = np.zeros_like(gt)
            for v in wanted:
                s = support_slice(gt == v, pos)
                support[s][gt[s] == v] = v
            results = {}
            for variant in variants:
                t0 = time.perf_counter()
                # The baselines take the first variant's confidence on every slice.
                everywhere = baselines and variant is variants[0]
                result = session.run(support, variant.cfg, confidence_from=variant.confidence_from,
                                     confidence_everywhere=everywhere)
                results[variant.name] = result
                secs = time.perf_counter() - t0
                for v in wanted:
                    scores.append(scored(name, v, variant.name, pos, result.labels == v, gt == v, secs))
                    log("%s label %d pos %.2f %s: dice_labelled %.3f dice_volume %.3f fp_slices %d"
                        % (name, v, pos, variant.name, scores[-1].dice_labelled, scores[-1].dice_volume,
                           scores[-1].fp_slices))
            if baselines:
                first = results[variants[0].name]
                # The session's store holds the slices across k in the encoders' layout (layout.py): the
                # baselines' maps and truth go to it in that layout, their masks come back in the file's.
                layout = session.layout(0)
                for v in wanted:
                    s = support_slice(gt == v, pos)
                    labelled = (gt == v).reshape(len(gt), -1).any(1)
                    copy = np.zeros(gt.shape, dtype=bool)
                    copy[labelled] = gt[s] == v
                    scores.append(scored(name, v, "copy", pos, copy, gt == v, 0.0))
                    pred = layout.volume_back(persam(sam, sam_store(stores), layout.volume(first.confidence[v])))
                    scores.append(scored(name, v, "persam", pos, pred, gt == v, 0.0))
        if baselines:
            store, layout = sam_store(stores), session.layout(0)
            for v in wanted:
                t0 = time.perf_counter()
                pred = layout.volume_back(oracle_box(sam, store, layout.volume(gt), v, cfg.volume.ring_min_hole))
                scores.append(scored(name, v, "oracle_box", float("nan"), pred, gt == v, time.perf_counter() - t0))
    return scores


def _means(rows: Sequence[Score]) -> Dict[str, float]:
    return {
        "n": len(rows),
        "dice_labelled": float(np.nanmean([r.dice_labelled for r in rows])),
        "dice_volume": float(np.nanmean([r.dice_volume for r in rows]))
        if any(np.isfinite(r.dice_volume) for r in rows) else float("nan"),
        "fp_slices_per_organ": float(np.mean([r.fp_slices for r in rows])),
    }


def summarize(scores: Sequence[Score]) -> Dict[str, Dict[str, float]]:
    """Per method: n, mean Dice over labelled slices and over the volume, false-positive slices per organ."""
    return {method: _means([s for s in scores if s.method == method]) for method in sorted({s.method for s in scores})}


def summarize_by_label(scores: Sequence[Score]) -> Dict[tuple, Dict[str, float]]:
    """The same means per (method, label), for the (method, label) pairs that have scores."""
    keys = sorted({(s.method, s.label) for s in scores})
    return {k: _means([s for s in scores if (s.method, s.label) == k]) for k in keys}


def as_rows(scores: Sequence[Score]) -> List[dict]:
    """One row a score, without its per-slice Dice (per_slice_rows)."""
    rows = []
    for s in scores:
        row = asdict(s)
        del row["slice_dice"]
        rows.append(row)
    return rows


def per_slice_rows(scores: Sequence[Score]) -> List[dict]:
    """One row per labelled slice of every score: its rank among the organ's labelled slices,
    its relative position in that range (0 first, 1 last) and its Dice."""
    rows = []
    for s in scores:
        n = len(s.slice_dice)
        for i, d in enumerate(s.slice_dice):
            rows.append({"volume": s.volume, "label": s.label, "method": s.method, "position": s.position,
                         "slice_rank": i, "relative_position": i / (n - 1) if n > 1 else 0.5, "dice": d})
    return rows


def _stores_for(image: np.ndarray, spacing, sam, dino, cfg: SynPoConfig, confidence_from,
                embedding_cache, layout: Optional[Layout] = None) -> Dict[str, EmbeddingStore]:
    """Embedding stores of a volume's axial slices ("sam" and, if used, "dinov2"), all computed, in the
    encoders' layout `layout` (a layout.Layout across k: Session.layout(0); as stored when None), with the
    slices a Session's run takes (the volume laid out, then normalised: segment_volume)."""
    layout = layout if layout is not None else Layout(0)
    norm = np.ascontiguousarray(to_slices(normalize(layout.volume(image), cfg.intensity)[0], 0))
    spacing_rc = in_plane_spacing(layout.spacing(spacing), 0)
    out: Dict[str, EmbeddingStore] = {}
    for name, enc in (("sam", sam), ("dinov2", dino)):
        if name == "sam" or name in confidence_from:
            out[name] = get_store({}, name, enc, norm, spacing_rc, cfg, embedding_cache)
            out[name].ensure(range(len(norm)))
    return out


def evaluate_cross(pairs: Sequence[tuple], sam, dino=None, cfg: SynPoConfig = SynPoConfig(),
                   labels: Optional[Sequence[int]] = None, log=print, confidence_from=None,
                   embedding_cache: Optional[str] = None) -> List[Score]:
    """The cross-patient protocol; support from the next volume in the list."""
    confidence_from = confidence_from or (("sam", "dinov2") if dino is not None else ("sam",))
    vols = [read_volume(i) + (read_volume(l, "label", label=True)[0],) for i, l in pairs]
    names = [os.path.basename(i).split(".")[0] for i, _ in pairs]
    # Each volume's slices across k in the encoders' layout, as the product's Session takes them (layout.py):
    # the chunks decode on these stores, and the Session reuses them (get_store: only for the same slices).
    layouts = [in_plane_layout(g.known_direction, 0, img.shape) for img, g, _ in vols]
    stores = [_stores_for(img, g.spacing, sam, dino, cfg, confidence_from, embedding_cache, layout)
              for (img, g, _), layout in zip(vols, layouts)]
    scores: List[Score] = []
    for qi in range(len(vols)):
        si = (qi + 1) % len(vols)
        if si == qi:
            break
        q_img, q_geom, q_gt = vols[qi]
        s_img, _, s_gt = vols[si]
        q_layout, s_layout = layouts[qi], layouts[si]
        q_gt_l, s_gt_l = q_layout.volume(q_gt), s_layout.volume(s_gt)       # (the chunks' truth, as their stores)
        common = sorted(set(np.unique(q_gt)) & set(np.unique(s_gt)) - {0})
        wanted = [int(v) for v in common if labels is None or v in labels]
        unpainted = sorted(int(v) for v in set(np.unique(q_gt)) - set(np.unique(s_gt)) - {0}
                           if labels is None or v in labels)
        if unpainted:
            log("%s <- %s: label(s) %s absent from the support volume: not scored for this query"
                % (names[qi], names[si], ", ".join(map(str, unpainted))))
        support_label = np.zeros_like(s_gt)
        for v in wanted:
            t0 = time.perf_counter()
            s_slices = [support_slice(s_gt == v, p) for p in (1 / 6, 1 / 2, 5 / 6)]
            q_lab = np.flatnonzero((q_gt == v).reshape(len(q_gt), -1).any(1))
            pred = np.zeros(q_gt_l.shape, dtype=bool)
            for s_idx, chunk in zip(s_slices, np.array_split(q_lab, 3)):
                if len(chunk) == 0:
                    continue
                conf = confidence_volume(stores[qi], stores[si], [s_idx], [s_gt_l[s_idx] == v], chunk,
                                         confidence_from, cfg, cross=True)
                # The intensity gate across patients only when asked for (gate.cross), as segment_volume.
                rng = (organ_range([stores[si]["sam"].slices[s_idx]], [s_gt_l[s_idx] == v], cfg.gate)
                       if cfg.gate.cross else None)
                for c, t in zip(conf, chunk):
                    region = shape = None
                    if cfg.volume.position_prior:
                        s_slice, q_slice = stores[si]["sam"].slices[s_idx], stores[qi]["sam"].slices[int(t)]
                        region = expected_region(s_gt_l[s_idx] == v, s_slice, q_slice, cfg.volume.position_margin)
                        shape = expected_shape(s_gt_l[s_idx] == v, s_slice, q_slice)
                    pred[t] = decode_prompted(sam, stores[qi]["sam"], int(t), c, cfg, region, shape, rng)[0]
            pred = q_layout.volume_back(pred)
            dl, _, _ = score(pred, q_gt == v)
            scores.append(Score(names[qi], v, "cross_chunks", float("nan"), dl, float("nan"), 0,
                                time.perf_counter() - t0, slice_dices(pred, q_gt == v)))
            for s_idx in s_slices:
                support_label[s_idx][s_gt[s_idx] == v] = v
            log("%s <- %s label %d cross_chunks: dice_labelled %.3f" % (names[qi], names[si], v, dl))
        if not wanted:
            continue
        t0 = time.perf_counter()
        # The product's cross-patient mode, on the embeddings computed above (slices across k).
        reuse = {}
        for name, enc in (("sam", sam), ("dinov2", dino)):
            if name in stores[qi]:
                reuse[store_key("query", name, enc, 0)] = stores[qi][name]
                reuse[store_key("support", name, enc, 0)] = stores[si][name]
        session = Session(q_img, q_geom.spacing, Models.of(sam, dino, confidence_from), direction=q_geom.known_direction)
        session.stores.update(reuse)
        result = session.run(support_label, cfg, support_image=s_img)
        for v in wanted:
            scores.append(scored(names[qi], v, "cross_volume", float("nan"), result.labels == v, q_gt == v,
                                 time.perf_counter() - t0))
            log("%s <- %s label %d cross_volume: dice_labelled %.3f dice_volume %.3f fp_slices %d"
                % (names[qi], names[si], v, scores[-1].dice_labelled, scores[-1].dice_volume, scores[-1].fp_slices))
    return scores
