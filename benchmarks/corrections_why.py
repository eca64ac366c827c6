"""Why a correction made an organ worse: for every step of a benchmarks/corrections_fast.py run
whose Dice fell by more than 0.005, the slices that got worse (more wrong pixels than before, the
painted and marked slices left out) and why:
- "overlap": the label's own walk gave the same or a better mask there; the assembly gave its
  voxels to another label;
- "walk": its own walk changed the slice for the worse; "between" two supports, or "outside"
  (beyond its outermost support on that side);
and the steps whose fall came only from the scoring (the previous prediction, scored without the
slice just painted or marked, was no better: no other slice got worse).

    python benchmarks/corrections_why.py DATA RUN.pkl
"""
import collections
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))
from synpo.corrections import scored_without  # noqa: E402
from synpo.evaluate import label_of, support_slice  # noqa: E402
from synpo.io import read_volume  # noqa: E402


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    data, run = argv
    with open(run, "rb") as handle:
        saved = pickle.load(handle)
    organs = collections.defaultdict(dict)
    for s in saved["scores"]:
        organs[(s.volume, s.label)][s.round] = s
    pixels, steps = collections.Counter(), collections.Counter()
    for name, caps in saved["caps"]:
        gt, _ = read_volume(label_of(data, name), "label", label=True)
        for (volume, label), rows in sorted(organs.items()):
            if volume != name:
                continue
            g = gt == label
            supports = {support_slice(g, 0.5)}
            touched = set(supports)
            for k in range(1, len(rows)):
                action = rows[k].action
                if action and action != "none":
                    kind, t = action.split()
                    touched.add(int(t))
                    if kind == "paint":
                        supports.add(int(t))
                steps["steps"] += 1
                if rows[k].dice_volume >= rows[k - 1].dice_volume - 0.005:
                    continue
                steps["fell"] += 1
                same = scored_without(caps[k - 1]["labels"] == label, g, touched)[0]
                if rows[k].dice_volume >= same - 0.005:
                    steps["fell by the scoring only"] += 1
                print("%s label %d after %d: %.3f -> %.3f (%s), supports %s"
                      % (volume, label, k, rows[k - 1].dice_volume, rows[k].dice_volume, action, sorted(supports)))
                before, after = caps[k - 1], caps[k]
                for t in range(len(g)):
                    if t in touched:
                        continue
                    w0 = int(((before["labels"][t] == label) ^ g[t]).sum())
                    w1 = int(((after["labels"][t] == label) ^ g[t]).sum())
                    if w1 - w0 < 50:
                        continue
                    r0, r1 = (c["raw"].get(label, {}).get(t) for c in (before, after))
                    r0 = np.zeros_like(g[t]) if r0 is None else r0
                    r1 = np.zeros_like(g[t]) if r1 is None else r1
                    why = "overlap" if ((r1 ^ g[t]).sum() <= (r0 ^ g[t]).sum()) else "walk"
                    where = "between" if any(s < t for s in supports) and any(s > t for s in supports) else "outside"
                    pixels[(why, where)] += w1 - w0
                    print("   slice %2d: truth %5d px, wrong %5d -> %5d px (%s, %s)" % (t, g[t].sum(), w0, w1, why, where))
    print("steps:", dict(steps))
    print("wrong pixels added on the slices that got worse:", {"%s %s" % k: v for k, v in pixels.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
