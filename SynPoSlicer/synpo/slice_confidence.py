"""A support's fused confidence over the query slices, computed only where it is asked for.

The walk asks for a slice's confidence when it reaches the slice; only then are the slice's
embeddings computed (EmbeddingStore.ensure) and its maps fused. A kidney painted on a 300-slice
CT costs the kidney's slices (and the slice where each walk stopped), not the volume's.

Each slice's map is computed on its own embeddings and the support's prototypes alone, so it is
the same whichever other slices are computed with it.
"""
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import confidence as conf_mod
from .config import SynPoConfig

CONFIDENCE_CHUNK = 16                  # query slices per similarity / upsampling step


class SliceConfidence:
    """conf[t] -> (H, W) float32 fused confidence of query slice t; `prepare` computes several at once.

    q_stores / r_stores: EmbeddingStores of the query and support volumes by encoder name;
    support_indices, support_masks: the support slices (of r_stores' volume) and their masks;
    cross: the support was painted on another patient (confidence.n_prototypes_cross prototypes).
    """

    def __init__(self, q_stores: Dict, r_stores: Dict, support_indices: Sequence[int],
                 support_masks: Sequence[np.ndarray], confidence_from: Sequence[str], cfg: SynPoConfig,
                 n: int, cross: bool = False):
        from dataclasses import replace
        ccfg = replace(cfg.confidence, n_prototypes=cfg.confidence.n_prototypes_cross) if cross else cfg.confidence
        self.q_stores, self.confidence_from, self.cfg, self.n = q_stores, tuple(confidence_from), cfg, n
        self.protos = {}
        for name in self.confidence_from:
            q, r = q_stores[name], r_stores[name]
            r.ensure(list(support_indices), save=False)
            self.protos[name] = conf_mod.build_prototypes([r.cache[s] for s in support_indices], list(support_masks),
                                                          q.frame, q.encoder.grid, ccfg)
        self.frame = q_stores[self.confidence_from[0]].frame
        self.maps: Dict[int, np.ndarray] = {}
        self.lock = threading.Lock()
        self.seconds = 0.0                      # similarity and fusion, not encoding
        self.progress: Optional[Callable[[int], None]] = None
        self.cancel: Optional[Callable[[], bool]] = None

    def bind(self, progress: Optional[Callable[[int], None]], cancel: Optional[Callable[[], bool]]) -> None:
        """The current run's progress (called with the number of slices embedded) and cancel; when it
        bound them (`bound_at`, time.monotonic(): Session.run keeps the maps its last run used)."""
        self.progress, self.cancel = progress, cancel
        self.bound_at = time.monotonic()

    def release(self) -> None:
        """The run that bound its progress and cancel has ended: let go of them (they are its
        VolumeRun's methods, and the VolumeRun holds the stores that hold this: a cycle that kept a
        deleted session's embeddings and maps until Python's cycle collector ran)."""
        self.progress = self.cancel = None

    def prepare(self, indices: Sequence[int]) -> None:
        """Compute the maps of `indices` not computed yet (and their embeddings)."""
        todo = [int(t) for t in dict.fromkeys(indices) if int(t) not in self.maps]
        if not todo:
            return
        for name in self.confidence_from:
            self.q_stores[name].ensure(todo, self.progress, self.cancel, save=False)
        t0 = time.perf_counter()
        for start in range(0, len(todo), CONFIDENCE_CHUNK):
            chunk = todo[start:start + CONFIDENCE_CHUNK]
            maps = {}
            for name in self.confidence_from:
                q = self.q_stores[name]
                sims = conf_mod.similarity(q.stack(chunk), self.protos[name], q.frame, q.encoder.grid)
                maps[name] = q.frame.grid_map_to_slice(sims, q.encoder.grid)
            fused = conf_mod.fuse(maps, self.cfg.confidence).numpy()
            with self.lock:
                for t, m in zip(chunk, fused):
                    m = np.array(m, dtype=np.float32)
                    m.setflags(write=False)               # shared with results: never modified in place
                    self.maps[t] = m
        self.seconds += time.perf_counter() - t0

    def __getitem__(self, t: int) -> np.ndarray:
        t = int(t)
        if t not in self.maps:
            self.prepare([t])
        return self.maps[t]

    def computed(self) -> List[int]:
        return sorted(self.maps)

    def stack(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W) maps of `indices`, computed as needed."""
        self.prepare(indices)
        out = np.empty((len(indices), self.frame.H, self.frame.W), dtype=np.float32)
        for i, t in enumerate(indices):
            out[i] = self.maps[int(t)]
        return out

    def dense(self) -> np.ndarray:
        """(n, H, W): the computed slices' maps, 0 on the slices never computed."""
        out = np.zeros((self.n, self.frame.H, self.frame.W), dtype=np.float32)
        for t, m in list(self.maps.items()):
            out[t] = m
        return out
