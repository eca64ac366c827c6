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

The anchor (fill_between.py): Slicer's *Fill between slices* on the same organ's same painted
slices at each round (the one-shot paint plus every correction's paint; a slice marked absent is
not painted), scored the same way. The user's cost: the painted slices each needs to reach a Dice
(COST_DICE), along the rounds, and for Fill between slices also with n slices spread evenly over
the organ (what its users do, choosing the slices themselves).
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
    painted: int = 1          # slices painted for this organ so far (the one-shot slice and the corrections')
    fill_dice: float = float("nan")   # Fill between slices on the same painted slices, scored the same way
    # Fill between slices with n slices spread evenly over the organ: the fewest n reaching each
    # COST_DICE (0 when never, i.e. not before every labelled slice is painted).
    fill_even_090: int = 0
    fill_even_095: int = 0
    # The previous round's prediction scored on this round's slices (the slice just painted or marked
    # left out of both): Dice_k - this is what the correction itself changed on the other slices,
    # Dice_k - Dice_(k-1) also holds the change of the scored slices (nan in round 0).
    dice_before_same: float = float("nan")


COST_DICE = (0.90, 0.95)      # the Dice levels whose cost in painted slices is reported


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


def next_corrections(labels: np.ndarray, gt: np.ndarray, wanted: Sequence[int], touched: Dict[int, Set[int]]
                     ) -> Tuple[np.ndarray, Dict[int, List[int]], Dict[int, Optional[Tuple[str, int]]]]:
    """The simulated annotator's next round: for every organ in `wanted`, its worst_slice among the
    slices not in touched[v] (labels and gt: label volumes, slices on axis 0). Returns the paint (gt
    copied on the slices to paint, else 0), the slices marked absent per organ, and each organ's
    step (None when nothing is wrong), as Session.add_support takes them; touched grows by the steps."""
    paint, absent, steps = np.zeros_like(gt), {}, {}
    for v in wanted:
        step = steps[v] = worst_slice(labels == v, gt == v, touched[v])
        if step is None:
            continue
        kind, t = step
        touched[v].add(t)
        if kind == "paint":
            paint[t][gt[t] == v] = v
        else:
            absent.setdefault(v, []).append(t)
    return paint, absent, steps


def scored_without(pred: np.ndarray, gt: np.ndarray, left_out: Set[int]) -> Tuple[float, int]:
    """(Dice over the slices not in left_out, false-positive slices among them). The Dice is nan once
    no labelled slice is left to score (every one painted: the organ is the user's); 1.0 or 0.0 there
    would say nothing of SynPo and move the means and the steps (the false-positive slices still count)."""
    keep = np.array([t not in left_out for t in range(len(gt))])
    p, g = pred[keep], gt[keep]
    dice = float(2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())) if g.any() else float("nan")
    fp = int((p.any(axis=(1, 2)) & ~g.any(axis=(1, 2))).sum())
    return dice, fp


def fill_dice(gt: np.ndarray, painted: Set[int], left_out: Set[int], spacing_kji=None) -> float:
    """Dice of Fill between slices from the ground truth on `painted`, scored like SynPo."""
    from .fill_between import fill_between_slices
    pred = fill_between_slices({t: gt[t] for t in painted}, gt.shape, spacing_kji)
    return scored_without(pred, gt, left_out)[0]


def even_fill_cost(gt: np.ndarray, spacing_kji=None, levels: Sequence[float] = COST_DICE) -> List[int]:
    """For each level: the fewest slices, spread evenly over the organ's labelled range, from which
    Fill between slices reaches that Dice on the others (0: not before every labelled slice)."""
    from .fill_between import even_slices
    zs = np.flatnonzero(gt.reshape(len(gt), -1).any(1))
    out = [0] * len(levels)
    last = None
    for n in range(1, int(zs[-1] - zs[0]) + 2):
        chosen = even_slices(int(zs[0]), int(zs[-1]), n)
        if chosen == last:
            continue
        last = chosen
        d = fill_dice(gt, set(chosen), set(chosen), spacing_kji)
        for i, level in enumerate(levels):
            if not out[i] and d >= level:
                out[i] = len(chosen)
        if all(out):
            break
    return out


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
        painted: Dict[int, Set[int]] = {v: set(touched[v]) for v in wanted}
        spacing_kji = tuple(reversed(tuple(geom.spacing)))
        cost = {v: even_fill_cost(gt == v, spacing_kji) for v in wanted}
        session = Session(image, geom.spacing, models, embedding_cache, geom.known_direction)
        t0 = time.perf_counter()
        result = session.run(support, cfg, axis=0)
        seconds = time.perf_counter() - t0
        actions = {v: "" for v in wanted}
        before = None
        for k in range(rounds + 1):
            for v in wanted:
                dice, fp = scored_without(result.labels == v, gt == v, touched[v])
                anchor = fill_dice(gt == v, painted[v], touched[v], spacing_kji)
                same = scored_without(before == v, gt == v, touched[v])[0] if before is not None else float("nan")
                scores.append(CorrectionScore(name, v, k, dice, fp, seconds, actions[v], len(painted[v]), anchor,
                                              *cost[v], dice_before_same=same))
                log("%s label %d after %d correction(s)%s: dice_volume %.3f fp_slices %d (%.1f s); "
                    "fill between %d painted slices %.3f"
                    % (name, v, k, " (%s)" % actions[v] if actions[v] else "", dice, fp, seconds,
                       len(painted[v]), anchor))
            if k == rounds:
                break
            paint, absent, steps = next_corrections(result.labels, gt, wanted, touched)
            for v, step in steps.items():
                actions[v] = "none" if step is None else "%s %d" % step
                if step is not None and step[0] == "paint":
                    painted[v].add(step[1])
            t0 = time.perf_counter()
            before = result.labels
            result = session.add_support(paint if paint.any() else None, absent, cfg)
            seconds = time.perf_counter() - t0
    return scores


def summarize_rounds(scores: Sequence[CorrectionScore]) -> Dict[int, Dict[str, float]]:
    """Per round: mean Dice (SynPo, Fill between slices) over the organs with a labelled slice left to
    score ("scored" of "n"), painted slices per organ, false-positive slices per organ, mean seconds
    per run."""
    out = {}
    for k in sorted({s.round for s in scores}):
        rows = [s for s in scores if s.round == k]
        runs = {(s.volume, s.round): s.seconds for s in rows}
        scored = [s for s in rows if s.dice_volume == s.dice_volume]     # a labelled slice left to score
        out[k] = {"n": len(rows), "scored": len(scored),
                  "dice_volume": float(np.mean([s.dice_volume for s in scored])) if scored else float("nan"),
                  "fill_dice": float(np.mean([s.fill_dice for s in scored])) if scored else float("nan"),
                  "painted": float(np.mean([s.painted for s in rows])),
                  "fp_slices_per_organ": float(np.mean([s.fp_slices for s in rows])),
                  "seconds_per_run": float(np.mean(list(runs.values()))),
                  "seconds_max": float(np.max(list(runs.values())))}
    return out


def _organs(scores: Sequence[CorrectionScore]) -> Dict[Tuple[str, int], List[CorrectionScore]]:
    out: Dict[Tuple[str, int], List[CorrectionScore]] = {}
    for s in sorted(scores, key=lambda s: s.round):
        out.setdefault((s.volume, s.label), []).append(s)
    return out


def monotonicity(scores: Sequence[CorrectionScore], tolerance: float = 0.005, floor: float = 0.02
                 ) -> Dict[str, float]:
    """Over every organ and round k >= 1: the share of steps with Dice_k >= Dice_(k-1) - tolerance,
    the steps down by more than `floor`, and the worst step (issue 28's rule, per organ-volume)."""
    # Rounds with nothing left to score (scored_without: nan) have no step.
    organs = [[s for s in rows if s.dice_volume == s.dice_volume] for rows in _organs(scores).values()]
    steps = []
    for rows in organs:
        steps += [b.dice_volume - a.dice_volume for a, b in zip(rows, rows[1:])]
    steps = np.array(steps) if steps else np.zeros(0)
    per_organ = [all(b.dice_volume >= a.dice_volume - tolerance for a, b in zip(r, r[1:])) for r in organs]
    # The same rule on the same slices: each step's change with the slice it painted or marked left out
    # of both rounds (the scored slices' change taken out: a painted slice that was better than the
    # organ's average lowers Dice_k+1 though no other slice changed).
    same = np.array([b.dice_volume - b.dice_before_same for r in organs for b in r[1:]
                     if b.dice_before_same == b.dice_before_same])
    return {"steps": int(len(steps)), "held": float(np.mean(steps >= -tolerance)) if len(steps) else 1.0,
            "organs_held": float(np.mean(per_organ)) if per_organ else 1.0,
            "down_beyond_floor": int((steps < -floor).sum()), "worst": float(steps.min()) if len(steps) else 0.0,
            "same_steps": int(len(same)),
            "held_same": float(np.mean(same >= -tolerance)) if len(same) else float("nan"),
            "down_beyond_floor_same": int((same < -floor).sum())}


def cost(scores: Sequence[CorrectionScore], levels: Sequence[float] = COST_DICE) -> Dict[str, Dict[float, tuple]]:
    """Painted slices to reach each Dice level, per method: (median over organ-volumes, share of
    organ-volumes that reached it). Along the rounds (SynPo; Fill between slices on the same
    slices), a never-reached organ counts as infinite; `fill_even`: n slices spread evenly."""
    organs = list(_organs(scores).values())
    out: Dict[str, Dict[float, tuple]] = {"synpo": {}, "fill_same": {}, "fill_even": {}}
    for i, level in enumerate(levels):
        for method, attr in (("synpo", "dice_volume"), ("fill_same", "fill_dice")):
            need = []
            for rows in organs:
                hit = [r.painted for r in rows if getattr(r, attr) >= level]
                need.append(min(hit) if hit else np.inf)
            out[method][level] = (float(np.median(need)), float(np.mean(np.isfinite(need))))
        even = [float(getattr(rows[0], "fill_even_%03d" % round(level * 100)) or np.inf) for rows in organs]
        out["fill_even"][level] = (float(np.median(even)), float(np.mean(np.isfinite(even))))
    return out
