"""Seconds of an Update after one correction (issue 28, item 5: <= 10 s on CPU for the development
volumes): per volume, the one-shot run (every organ painted on its middle labelled slice), then the
simulated annotator's first correction of every organ (corrections.worst_slice: its worst slice
painted or marked absent) and the re-run through Session.add_support, timed. Prints the load
average before and after (the development machine is shared).

    python benchmarks/correction_rerun.py DATA [DATA ...] [--one-at-a-time] [--set SECTION.FIELD=VALUE ...]

--one-at-a-time: the same corrections, one organ per Update, in label order (a Slicer user who
paints one organ's correction and presses Update, then the next): the seconds of each Update.
Each run also prints the slices SAM decoded (not reused): the work, without the shared CPU's noise;
and, for Updates of every organ at once, the organs' mean whole-volume Dice before and after the
Update (a rule that saves work must not cost quality).

CPU, LiteMedSAM, SAM features, --embedding-cache /tmp/emb (SYNPO_EMBEDDINGS to change it).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))
from synpo.config import configured  # noqa: E402
from synpo.corrections import next_corrections  # noqa: E402
from synpo.evaluate import dice, find_pairs, middle_paint, support_slice  # noqa: E402
from synpo.features import load_models  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402
from synpo.volume import sam_store  # noqa: E402


def main(argv):
    sets = argv[argv.index("--set") + 1:] if "--set" in argv else []
    folders = argv[:argv.index("--set")] if "--set" in argv else argv
    one_at_a_time = "--one-at-a-time" in folders
    folders = [f for f in folders if f != "--one-at-a-time"]
    if not folders:
        print(__doc__)
        return 2
    cfg = configured(sets)
    sam, dino, use = load_models("litemedsam", "sam", "small", "cpu", True)
    models = Models.of(sam, dino, use)
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    reruns, dices = [], []
    for folder in folders:
        for img, lab in find_pairs(folder):
            image, geom = read_volume(img)
            gt, _ = read_volume(lab, "label", label=True)
            support, wanted = middle_paint(gt)
            session = Session(image, geom.spacing, models, os.environ.get("SYNPO_EMBEDDINGS", "/tmp/emb"))
            t0 = time.perf_counter()
            result = session.run(support, cfg, axis=0)
            first = time.perf_counter() - t0
            paint, absent, _ = next_corrections(result.labels, gt, wanted,
                                                {v: {support_slice(gt == v, 0.5)} for v in wanted})
            name = "%s %s" % (os.path.basename(os.path.normpath(folder)), os.path.basename(img).split(".")[0])
            if one_at_a_time:
                each, decoded = [], []
                for v in wanted:
                    mine = np.where(paint == v, paint, 0)
                    if not mine.any() and v not in absent:
                        continue
                    before = sam_store(session.stores).decodes
                    t0 = time.perf_counter()
                    session.add_support(mine if mine.any() else None, {v: absent[v]} if v in absent else {}, cfg)
                    each.append(time.perf_counter() - t0)
                    decoded.append(sam_store(session.stores).decodes - before)
                reruns.extend(each)
                print("%s: %d organs, first run %.1f s, Updates correcting one organ each: %s s (slices decoded: %s)"
                      % (name, len(wanted), first, " ".join("%.1f" % x for x in each),
                         " ".join(str(x) for x in decoded)), flush=True)
                continue
            before = sam_store(session.stores).decodes
            t0 = time.perf_counter()
            updated = session.add_support(paint if paint.any() else None, absent, cfg)
            again = time.perf_counter() - t0
            reruns.append(again)
            scores = [float(np.mean([dice(r.labels == v, gt == v) for v in wanted])) for r in (result, updated)]
            dices.append(scores)
            print("%s: %d organs, first run %.1f s (%d slices decoded), Update after one correction %.1f s "
                  "(%d slices decoded); mean whole-volume Dice %.4f -> %.4f" % (
                      name, len(wanted), first, before, again, sam_store(session.stores).decodes - before,
                      *scores), flush=True)
    print("Update after %s: mean %.1f s, max %.1f s over %d Updates"
          % ("one organ's correction" if one_at_a_time else "every organ's first correction at once",
             float(np.mean(reruns)), float(np.max(reruns)), len(reruns)))
    if dices:
        print("mean whole-volume Dice over the organs, first run -> Update: %.4f -> %.4f (every organ scored on "
              "every slice, the painted ones included)" % tuple(np.mean(dices, axis=0)))
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
