"""`synpo evaluate --corrections N` without Fill between slices, for choosing correction rules fast:
the same simulated annotator and the same SynPo figures (corrections.evaluate_corrections), plus
every round's label volume and each label's own masks before assembly, saved for
benchmarks/corrections_why.py.

    python benchmarks/corrections_fast.py DATA OUT.pkl ROUNDS [VOLUME,VOLUME] [--labels 1,2,3]
        [--set SECTION.FIELD=VALUE ...]

CPU, LiteMedSAM, SAM features, --embedding-cache /tmp/emb. Prints per volume its organs' Dice per
round, then the mean Dice per round and the monotonicity figures (monotonicity(): held, and held
on the same slices).
"""
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))
from synpo import corrections as C  # noqa: E402
from synpo import session as S  # noqa: E402
from synpo import volume as V  # noqa: E402
from synpo.config import configured  # noqa: E402
from synpo.evaluate import find_pairs  # noqa: E402
from synpo.features import load_models  # noqa: E402
from synpo.session import Models  # noqa: E402


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    data, out, rounds = argv[0], argv[1], int(argv[2])
    rest = argv[3:]
    volumes = rest.pop(0).split(",") if rest and not rest[0].startswith("--") else None
    labels = None
    if "--labels" in rest:                                   # only these labels (as evaluate --labels)
        i = rest.index("--labels")
        labels = [int(v) for v in rest[i + 1].split(",")]
        del rest[i:i + 2]
    cfg = configured([a for a in rest if a != "--set"])
    raw, captured = {}, []
    assemble, run = V.VolumeRun.assemble, S.Session.run

    def assemble_recorded(self, per_label):
        raw["masks"] = {lab: {t: m.copy() for t, m in p[0].items()} for lab, p in zip(self.support.labels, per_label)}
        raw["records"] = [(r.label, r.index, r.status, r.reason) for p in per_label for r in p[2]]
        return assemble(self, per_label)

    def run_recorded(self, *a, **k):
        result = run(self, *a, **k)
        captured.append({"labels": result.labels.copy(), "raw": raw["masks"], "records": raw["records"]})
        return result

    V.VolumeRun.assemble, S.Session.run = assemble_recorded, run_recorded
    C.fill_dice = lambda *a, **k: float("nan")               # no Fill between slices here
    C.even_fill_cost = lambda *a, **k: [0, 0]
    pairs = [p for p in find_pairs(data) if volumes is None or os.path.basename(p[0]).split(".")[0] in volumes]
    models = Models.of(*load_models("litemedsam", "sam", "small", "cpu", True))
    scores, per_volume, t0 = [], [], time.time()
    for pair in pairs:
        captured.clear()
        got = C.evaluate_corrections([pair], models, cfg, rounds, labels, log=lambda *a: None,
                                     embedding_cache=os.environ.get("SYNPO_EMBEDDINGS", "/tmp/emb"))
        scores += got
        name = os.path.basename(pair[0]).split(".")[0]
        per_volume.append((name, [dict(c) for c in captured]))
        print(name, "%.0f s" % (time.time() - t0),
              " ".join("%d:%d:%.3f" % (s.label, s.round, s.dice_volume) for s in got), flush=True)
    with open(out, "wb") as handle:
        pickle.dump({"scores": scores, "caps": per_volume}, handle)
    print("rounds", {k: round(v["dice_volume"], 4) for k, v in C.summarize_rounds(scores).items()})
    print("mono", C.monotonicity(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
