"""`synpo evaluate --corrections N`: a simulated annotator correcting SynPo's preview.

Round 0 is the one-shot run: every organ painted on its middle labelled slice, all organs in one
run. After each run, for every organ, the annotator looks at the slice with the most wrong
pixels that it has not touched yet:
- a labelled slice (the organ is there): it paints the ground truth on it, which becomes one of
  the organ's supports;
- a false-positive slice (the organ is absent, the mask is not): it marks the slice absent.
Then the session runs again (Session.add_support: the same embeddings). Scores: whole-volume
Dice of each organ with every slice painted or marked for it left out (those are the user's, not
SynPo's), false-positive slices, and the seconds of each re-run.
"""
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .io import read_volume


@dataclass
class CorrectionScore:
    volume: str
    label: int
    round: int                # 0 = one-shot, k = after k corrections of this organ
    dice_volume: float        # over the slices neither painted nor marked for this organ
    fp_slices: int
    seconds: float            # the run's wall time (all organs)
    action: str               # what the annotator did before this round: "", "paint N", "absent N", "none"


def worst_slice(pred: np.ndarray, gt: np.ndarray, touched: Set[int]) -> Optional[Tuple[str, int]]:
    """("paint" | "absent", slice) with the most wrong pixels among the slices not touched yet
    (pred and gt: one organ's boolean masks, slices on axis 0), or None when nothing is wrong."""
    best, best_wrong = None, 0
    for t in range(len(gt)):
        if t in touched:
            continue
        if gt[t].any():
            wrong = int(np.logical_xor(pred[t], gt[t]).sum())
            kind = "paint"
        else:
            wrong = int(pred[t].sum())
            kind = "absent"
        if wrong > best_wrong:
            best, best_wrong = (kind, t), wrong
    return best


def scored_without(pred: np.ndarray, gt: np.ndarray, left_out: Set[int]) -> Tuple[float, int]:
    """(Dice over the slices not in left_out, false-positive slices among them)."""
    keep = np.array([t not in left_out for t in range(len(gt))])
    p, g = pred[keep], gt[keep]
    total = p.sum() + g.sum()
    dice = float(2.0 * np.logical_and(p, g).sum() / total) if total else 1.0
    fp = int((p.reshape(len(p), -1).any(1) & ~g.reshape(len(g), -1).any(1)).sum())
    return dice, fp


def evaluate_corrections(pairs: Sequence[tuple], models, cfg, rounds: int, labels: Optional[Sequence[int]] = None,
                         log=print, embedding_cache: Optional[str] = None) -> List[CorrectionScore]:
    from .evaluate import support_slice
    from .session import Session
    scores: List[CorrectionScore] = []
    for img_path, lab_path in pairs:
        image, geom = read_volume(img_path)
        gt, _ = read_volume(lab_path, "label", label=True)
        name = os.path.basename(img_path).split(".")[0]
        wanted = [int(v) for v in np.unique(gt) if v != 0 and (labels is None or v in labels)]
        support = np.zeros_like(gt)
        for v in wanted:
            s = support_slice(gt == v, 0.5)
            support[s][gt[s] == v] = v
        touched: Dict[int, Set[int]] = {v: {support_slice(gt == v, 0.5)} for v in wanted}
        session = Session(image, geom.spacing, models, embedding_cache)
        t0 = time.perf_counter()
        result = session.run(support, cfg, axis=0)
        seconds = time.perf_counter() - t0
        actions = {v: "" for v in wanted}
        for k in range(rounds + 1):
            for v in wanted:
                dice, fp = scored_without(result.labels == v, gt == v, touched[v])
                scores.append(CorrectionScore(name, v, k, dice, fp, seconds, actions[v]))
                log("%s label %d after %d correction(s)%s: dice_volume %.3f fp_slices %d (%.1f s)"
                    % (name, v, k, " (%s)" % actions[v] if actions[v] else "", dice, fp, seconds))
            if k == rounds:
                break
            paint, absent = np.zeros_like(gt), {}
            for v in wanted:
                step = worst_slice(result.labels == v, gt == v, touched[v])
                if step is None:
                    actions[v] = "none"
                    continue
                kind, t = step
                touched[v].add(t)
                actions[v] = "%s %d" % (kind, t)
                if kind == "paint":
                    paint[t][gt[t] == v] = v
                else:
                    absent.setdefault(v, []).append(t)
            t0 = time.perf_counter()
            result = session.add_support(paint if paint.any() else None, absent, cfg)
            seconds = time.perf_counter() - t0
    return scores


def summarize_rounds(scores: Sequence[CorrectionScore]) -> Dict[int, Dict[str, float]]:
    """Per round: mean Dice, false-positive slices per organ, mean seconds per run."""
    out = {}
    for k in sorted({s.round for s in scores}):
        rows = [s for s in scores if s.round == k]
        runs = {(s.volume, s.round): s.seconds for s in rows}
        out[k] = {"n": len(rows), "dice_volume": float(np.mean([s.dice_volume for s in rows])),
                  "fp_slices_per_organ": float(np.mean([s.fp_slices for s in rows])),
                  "seconds_per_run": float(np.mean(list(runs.values())))}
    return out
