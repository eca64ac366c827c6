"""Replay a `synpo evaluate --corrections` run for one volume and print, slice by slice, one label's
masks, statuses and reasons after rounds K-1 and K (what a correction changed, and why).

    python benchmarks/corrections_replay.py DATA VOLUME LABEL K CSV
    e.g. python benchmarks/corrections_replay.py ../shared/data/chaos_t2 image_2 4 2 /tmp/corr/base_chaos_t2/corrections.csv

Runs on the CPU with LiteMedSAM and --embedding-cache /tmp/emb, the default config (add settings
with SYNPO_SET="volume.correction_holds_ends=true", space-separated).
"""
import collections
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SynPoSlicer"))
from synpo.io import read_volume
from synpo.evaluate import support_slice
from synpo.session import Session, Models
from synpo.features import load_models
from synpo.config import configured
from synpo.corrections import scored_without
data, vol, label, upto = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
csvp = sys.argv[5]
rows = [r for r in csv.DictReader(open(csvp)) if r['volume'] == vol]
acts = collections.defaultdict(dict)
for r in rows: acts[int(r['round'])][int(r['label'])] = r['action']
image, geom = read_volume("%s/%s.nii.gz" % (data, vol)); gt, _ = read_volume("%s/%s.nii.gz" % (data, vol.replace('image', 'label')), "label", label=True)
wanted = sorted(acts[0])
sam, dino, use = load_models("litemedsam", "sam", "small", "cpu", True)
cfg = configured(os.environ.get("SYNPO_SET", "").split())
support = np.zeros_like(gt); touched = {}
for v in wanted:
    s = support_slice(gt == v, 0.5); support[s][gt[s] == v] = v; touched[v] = {s}
session = Session(image, geom.spacing, Models.of(sam, dino, use), os.environ.get("SYNPO_EMBEDDINGS", "/tmp/emb"))
res = session.run(support, cfg, axis=0)
results = [res]
for k in range(1, upto + 1):
    paint, absent = np.zeros_like(gt), {}
    for v in wanted:
        a = acts[k][v]
        if a == "none": continue
        kind, t = a.split(); t = int(t); touched[v].add(t)
        if kind == "paint": paint[t][gt[t] == v] = v
        else: absent.setdefault(v, []).append(t)
    res = session.add_support(paint if paint.any() else None, absent, cfg); results.append(res)
g = gt == label
for k in (upto - 1, upto):
    print("round", k, "dice", scored_without(results[k].labels == label, g, touched[label]))
recs = {k: {r.index: r for r in results[k].records if r.label == label} for k in (upto - 1, upto)}
print("touched", sorted(touched[label]), "action", acts[upto][label])
for t in range(len(g)):
    a, b = results[upto - 1].labels[t] == label, results[upto].labels[t] == label
    def d(p): s = p.sum() + g[t].sum(); return 2 * (p & g[t]).sum() / s if s else 1.0
    ra, rb = recs[upto - 1].get(t), recs[upto].get(t)
    print("%3d gt %5d | %5d %.2f %-10s %-22s | %5d %.2f %-10s %s" % (t, g[t].sum(), a.sum(), d(a), ra.status if ra else '-', ra.reason if ra else '', b.sum(), d(b), rb.status if rb else '-', rb.reason if rb else ''))
