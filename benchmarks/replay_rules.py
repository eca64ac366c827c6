"""Candidate stop rules replayed on recorded walks: how each would end every walk, in seconds.

    .venv/bin/python benchmarks/walk_decisions.py ../shared/data/chaos_t2 ../shared/data/cmr_bssfp \
        ../shared/data/acdc_cine --embedding-cache /tmp/emb -o steps.csv
    .venv/bin/python benchmarks/replay_rules.py steps.csv [NAME ...]
    .venv/bin/python benchmarks/walk_decisions.py ... --rules -o steps-rules.csv
    .venv/bin/python benchmarks/replay_rules.py --rules steps-rules.csv

walk_decisions.py steers every walk by the ground truth and records each step's figures up to and
including its first wrong step (a mask with Dice < 0.5 against the organ on its slice, or a slice
without the organ). Each walk is replayed here with the configured rules (the recorded `rule`
column) plus a candidate rule: the walk ends on the first step either judges absent. Per data set:
walks ended on their first wrong step ("right"), before it ("too short", with the go-slices lost),
or not at all ("too far": the wrong slice accepted; "onto absent" when the organ is absent there,
the false-positive slices the issue counts), and the go-steps the candidate alone stops. A walk
whose every step continues its organ (it reached the volume's end) is right when nothing stops it.

With --rules (a CSV of the configured rules' own walks, every step recorded past the organ's end
too), per data set: the absent slices the walks accepted that the candidate would remove, the
labelled slices it would lose (in brackets those whose mask matched the organ), and the walks it cuts.
Ring labels (the myocardium) count their filled-shape and hole walks apart.

The candidates (each a function of one recorded row and its walk's history: Step.history) are
listed in CANDIDATES; a name on the command line replays only those. Figures: docs/research.md,
"Where organs end: rules on the walk's trend".
"""
import argparse
import csv
import math
from collections import defaultdict
from typing import Callable, Dict, List

RATIO, OVERLAP, SAM_IOU, AREA = 0.7, 0.6, 0.5, 0.05     # config.VolumeConfig's later-step limits


def load(path: str) -> Dict[tuple, List[dict]]:
    """{(dataset, volume, label, direction): the walk's steps in order}."""
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        for k in ("slice", "label"):
            r[k] = int(r[k])
        for k in ("score", "ratio", "sam_iou", "overlap", "area_change", "area_frac", "dice", "grey_z",
                  "grey_sd_ratio"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
        r["first"] = r["first"] == "True"
        r["areas"] = [int(a) for a in r["hist_areas"].split(";")] if r.get("hist_areas") else []
        r["scores"] = [float(c) for c in r["hist_scores"].split(";")] if r.get("hist_scores") else []
        r["area"] = r["area_frac"]       # as a fraction of the paint's area
    by_label = defaultdict(list)
    for r in rows:
        by_label[(r["dataset"], r["volume"], r["label"])].append(r)
    walks = {}
    for key, steps in by_label.items():
        firsts = [r["slice"] for r in steps if r["first"]]
        if len(firsts) == 2:
            support = sum(firsts) // 2
        else:       # a support on the volume's edge: one walk
            others = [r["slice"] for r in steps if not r["first"]]
            f = firsts[0]
            support = f - (1 if not others or others[0] > f else -1)
        for r in steps:
            d = 1 if r["slice"] > support else -1
            # a ring's two walks (its filled shape and its hole) start from different areas
            walks.setdefault(key + (d, r["areas"][0] if r["areas"] else 0), []).append(r)
    for w in walks.values():
        w.sort(key=lambda r: len(r["areas"]))
    return walks


def area_now(r) -> float:
    return r["area_change"] * r["areas"][-1] if r["areas"] and math.isfinite(r["area_change"]) else float("nan")


# -- candidates: row -> True when the target is judged absent (on top of the configured rules)

def trend(shrink: float, drop: float, n: int = 2) -> Callable:
    """A tapering end: the area shrank by `shrink` or more on each of the last n steps (this one
    included) and the confidence fell on this step below `drop` x the previous slice's."""
    def rule(r):
        a = r["areas"] + [area_now(r)]
        if len(a) < n + 1:
            return False
        shrinking = all(a[-k] < shrink * a[-k - 1] for k in range(1, n + 1))
        return shrinking and r["ratio"] < drop
    return rule


def trend_conf(drop: float, n: int = 2) -> Callable:
    """The confidence fell on each of the last n steps, each below `drop` x the one before."""
    def rule(r):
        s = r["scores"] + [r["score"]]
        if r["first"] or len(s) < n + 2:      # the paint's own score is not a decoded slice's
            return False
        return all(s[-k] < drop * s[-k - 1] for k in range(1, n + 1))
    return rule


def vote(margin_ratio: float, margin_overlap: float, margin_iou: float, area_x: float, k: int = 2) -> Callable:
    """Near-misses: a step within a margin of k or more of the limits is judged absent."""
    def rule(r):
        if r["first"]:
            return False
        near = [r["ratio"] < RATIO + margin_ratio, r["overlap"] < OVERLAP + margin_overlap,
                r["sam_iou"] < SAM_IOU + margin_iou, r["area_frac"] < AREA * area_x]
        return sum(bool(x) for x in near) >= k
    return rule


def product(limit: float) -> Callable:
    """The step figures' product: confidence ratio x overlap x area change (capped at 1)."""
    def rule(r):
        if r["first"]:
            return False
        return r["ratio"] * r["overlap"] * min(1.0, r["area_change"]) < limit
    return rule


def grey(z: float) -> Callable:
    """The mask's mean grey value more than z standard deviations (of the paint's) from the paint's."""
    return lambda r: math.isfinite(r["grey_z"]) and abs(r["grey_z"]) > z


def regrow(grow: float, tapered: float) -> Callable:
    """Re-growth after a taper: the walk's smallest mask so far is under `tapered` x the paint's
    area and this mask is over `grow` x that smallest."""
    def rule(r):
        a = r["areas"]
        if len(a) < 2:
            return False
        low = min(a[1:])
        return low < tapered * a[0] and area_now(r) > grow * low
    return rule


def taper_overlap(limit: float, below: float, grow: float = 0.0) -> Callable:
    """Past the widest slice (the last accepted mask under `below` x the walk's largest) less than
    `limit` of the mask inside the previous one (grown as for the overlap rule), and (grow > 0) the
    mask over `grow` x the previous one: an organ past its widest slice lies within its previous
    outline (CHAOS image_5's liver walking into the heart: area 1.23 x, 0.79 inside)."""
    def rule(r):
        a = r["areas"]
        return (not r["first"] and len(a) >= 2 and a[-1] < below * max(a) and r["overlap"] < limit
                and r["area_change"] > grow)
    return rule


def drop(change: float, ratio: float, frac: float = 1e9) -> Callable:
    """One step's sharp shrink with a confidence fall: area change under `change`, confidence ratio
    under `ratio` (and the mask under `frac` x the paint's area)."""
    return lambda r: (not r["first"] and r["area_change"] < change and r["ratio"] < ratio
                      and r["area_frac"] < frac)


def faded_holding(c: float, hold: float) -> Callable:
    """faded (against the walk's median) while the mask does not shrink under `hold` x the previous
    one: a look-alike keeps its size, a tapering organ's end shrinks as its confidence falls."""
    f = faded(c, "median")
    return lambda r: f(r) and r["area_change"] >= hold


def faded(c: float, ref: str = "max") -> Callable:
    """The mask's confidence under c x the walk's best (or median) decoded slice's so far: a
    gradual fade that no single step's ratio shows."""
    import statistics

    def rule(r):
        s = r["scores"][1:]
        if r["first"] or not s:
            return False
        base = max(s) if ref == "max" else statistics.median(s)
        return r["score"] < c * base
    return rule


def sudden(change: float, before: float, ratio: float = 9.0) -> Callable:
    """An abrupt end: the mask shrinks under `change` x the previous one on this step after the
    previous step held (its area change over `before`): a valve plane, not a taper (and the
    confidence ratio under `ratio`)."""
    def rule(r):
        a = r["areas"]
        if r["first"] or len(a) < 3:
            return False
        return r["area_change"] < change and a[-1] > before * a[-2] and r["ratio"] < ratio
    return rule


def none(r) -> bool:
    return False


CANDIDATES: Dict[str, Callable] = {"configured": none}
for s in (0.9, 0.8, 0.7):
    for d in (1.0, 0.95, 0.9, 0.85):
        CANDIDATES["trend shrink<%.2f x2, ratio<%.2f" % (s, d)] = trend(s, d)
    CANDIDATES["trend shrink<%.2f x3, ratio<0.95" % s] = trend(s, 0.95, 3)
for d in (0.97, 0.95, 0.93, 0.9):
    CANDIDATES["conf falls <%.2f x2" % d] = trend_conf(d)
    CANDIDATES["conf falls <%.2f x3" % d] = trend_conf(d, 3)
for m in (0.05, 0.1, 0.15):
    CANDIDATES["vote margin %.2f (ratio, overlap, iou), area x2" % m] = vote(m, m, m, 2.0)
    CANDIDATES["vote margin %.2f, area x3" % m] = vote(m, m, m, 3.0)
    CANDIDATES["vote3 margin %.2f, area x3" % m] = vote(m, m, m, 3.0, 3)
for lim in (0.3, 0.4, 0.5):
    CANDIDATES["product < %.1f" % lim] = product(lim)
for z in (1.0, 1.5, 2.0, 3.0):
    CANDIDATES["grey |z| > %.1f" % z] = grey(z)
for c in (0.65, 0.7, 0.75, 0.8, 0.85):
    CANDIDATES["faded < %.2f x walk's best" % c] = faded(c)
    CANDIDATES["faded < %.2f x walk's median" % c] = faded(c, "median")
    for h in (0.6, 0.8):
        CANDIDATES["faded < %.2f x median, area change >= %.1f" % (c, h)] = faded_holding(c, h)
for c in (0.4, 0.5, 0.6):
    for d in (0.85, 0.9, 0.95, 1.0):
        CANDIDATES["drop area<%.1f, ratio<%.2f" % (c, d)] = drop(c, d)
    for f in (0.2, 0.3):
        CANDIDATES["drop area<%.1f, frac<%.1f" % (c, f)] = drop(c, 9.0, f)
        CANDIDATES["drop area<%.1f, ratio<0.95, frac<%.1f" % (c, f)] = drop(c, 0.95, f)
for c in (0.5, 0.6, 0.7):
    for b in (0.8, 0.9):
        CANDIDATES["sudden area<%.1f after >%.1f" % (c, b)] = sudden(c, b)
        CANDIDATES["sudden area<%.1f after >%.1f, ratio<0.95" % (c, b)] = sudden(c, b, 0.95)
for o in (0.8, 0.85, 0.9):
    for b in (0.8, 0.6, 0.4):
        CANDIDATES["taper overlap < %.2f, last < %.1f x largest" % (o, b)] = taper_overlap(o, b)
        for g in (1.1, 1.2):
            CANDIDATES["taper overlap < %.2f, last < %.1f x largest, grows > %.1f" % (o, b, g)] = taper_overlap(o, b, g)
for g in (1.1, 1.2, 1.3, 1.6, 2.0):
    for t in (0.3, 0.5, 0.7, 1.0):
        CANDIDATES["regrow > %.1f x low, low < %.1f paint" % (g, t)] = regrow(g, t)


def replay(walks, rule: Callable) -> Dict[str, dict]:
    out: Dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for key, steps in walks.items():
        f = out[key[0]]
        f["walks"] += 1
        wrong = next((i for i, r in enumerate(steps) if r["truth"] == "stop"), None)
        for r in steps:
            if r["truth"] == "go" and not r["first"] and rule(r):
                f["go stopped by it"] += 1
            if r["truth"] == "stop" and rule(r):
                f["wrong stopped by it"] += 1
        end = next((i for i, r in enumerate(steps) if r["rule"] != "go" or rule(r)), None)
        if wrong is None:
            if end is None:
                f["right"] += 1
            else:
                f["too short"] += 1
                f["slices short"] += len(steps) - end
        elif end is None or end > wrong:
            f["too far"] += 1
            if steps[wrong]["organ_present"] != "True":
                f["onto absent"] += 1
        elif end == wrong:
            f["right"] += 1
        else:
            f["too short"] += 1
            f["slices short"] += wrong - end
    return out


def replay_rules(walks, rule: Callable) -> Dict[str, dict]:
    """Walks recorded with --rules (the configured rules walking, every step recorded up to the one
    that ended it): the slices a candidate takes away. Each walk now ends on the first step the
    configured rules or the candidate judge absent; of the slices it no longer accepts, those
    without the organ (absent slices segmented before) and those with it (labelled slices lost)."""
    out: Dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for key, steps in walks.items():
        f = out[key[0]]
        f["walks"] += 1
        end = next((i for i, r in enumerate(steps) if r["rule"] != "go"), len(steps))
        new = next((i for i, r in enumerate(steps[:end]) if rule(r)), end)
        for r in steps[:end]:
            f["absent accepted" if r["organ_present"] != "True" else "present accepted"] += 1
        cut = steps[new:end]
        f["absent removed"] += sum(r["organ_present"] != "True" for r in cut)
        f["present lost"] += sum(r["organ_present"] == "True" for r in cut)
        f["good lost"] += sum(r["truth"] == "go" for r in cut)
        f["walks cut"] += bool(cut)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", help="walk_decisions.py -o CSV")
    ap.add_argument("names", nargs="*", help="candidates to replay (default: all)")
    ap.add_argument("--rules", action="store_true", help="the CSV holds the configured rules' walks "
                    "(walk_decisions.py --rules): count the slices each candidate takes away")
    args = ap.parse_args(argv)
    walks = load(args.steps)
    names = args.names or list(CANDIDATES)
    sets = sorted({k[0] for k in walks})
    if args.rules:
        print("%-48s " % "candidate" + " | ".join("%-34s" % s for s in sets))
        print("%-48s " % "" + " | ".join("%-34s" % "absent -removed/of, present lost (go)" for _ in sets))
        for name in names:
            res = replay_rules(walks, CANDIDATES[name])
            print("%-48s " % name + " | ".join(
                "%3d/%3d  %3d (%3d) cut %2d        " % (res[s]["absent removed"], res[s]["absent accepted"],
                                                      res[s]["present lost"], res[s]["good lost"],
                                                      res[s]["walks cut"]) for s in sets))
        return
    print("%-48s " % "candidate" + " | ".join("%-40s" % s for s in sets))
    print("%-48s " % "" + " | ".join("%-40s" % "far(absent)/right/short(slices) go-stop wrong-stop" for _ in sets))
    for name in names:
        res = replay(walks, CANDIDATES[name])
        cells = []
        for s in sets:
            f = res[s]
            cells.append("%2d(%2d) / %2d / %2d(%2d)  %3d  %3d" % (f["too far"], f["onto absent"], f["right"],
                                                                 f["too short"], f["slices short"],
                                                                 f["go stopped by it"], f["wrong stopped by it"])
                         + " " * 9)
        print("%-48s " % name + " | ".join(cells))


if __name__ == "__main__":
    main()
