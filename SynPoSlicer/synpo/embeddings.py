"""The embedding store: a volume's slice embeddings for one encoder, computed once in batches,
kept (float16) between runs in memory and optionally on disk, with SAM's decoded masks of those
slices kept for re-runs whose inputs did not change."""
import hashlib
import itertools
import os
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .config import DecodeConfig, SynPoConfig
from .decode import decode_slice, decoder_inputs
from .errors import Cancelled, SynPoError
from .features import batch_size_for
from .prompts import PromptCache, Prompts

STORAGE_DTYPE = torch.float16          # embeddings as kept between runs
DECODED_KEPT_BYTES = 64 << 20         # decoded masks kept per store for re-runs (8 KB each at 256 x 256)


class Stores(dict):
    """A session's stores by key (embedding stores, confidence maps), with `grown`: None, or what
    each embedding store in it calls after it has stored a batch of new embeddings, in the thread
    that computed them (the server's memory budget, service.py: it may raise, which stops that
    request or run). Only stores got through get_store are told."""
    grown: Optional[Callable[[], None]] = None


class EmbeddingStore:
    """Embeddings of one volume's slices for one encoder, computed once in batches.

    With `disk_dir`, embeddings are also kept on disk under a key made of the
    encoder, its input frame and the slices' bytes, so a later run on the same
    volume (another invocation of the CLI) decodes without re-encoding.
    """

    _serials = itertools.count()

    def __init__(self, encoder, slices: np.ndarray, frame, batch_size: int, disk_dir: Optional[str] = None):
        self.serial = next(EmbeddingStore._serials)          # never reused, unlike id()
        self.encoder, self.slices, self.frame = encoder, slices, frame
        self.batch_size = batch_size
        # Kept in float16 (exact enough for cosine similarity and SAM's decoder, which get them
        # back in float32): half the memory of a volume's embeddings, in RAM and on disk.
        self.cache: Dict[int, torch.Tensor] = {}
        # SAM's decoded masks of these slices by their exact decoder inputs (decode.decoder_inputs):
        # a re-run whose new settings leave a slice's box and region alone reuses its mask.
        self.decoded: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.decoded_bytes = 0
        self.decode_reuses = 0
        self.decodes = 0                           # slices decoded (not reused), for the benchmarks
        self._decoded_lock = threading.Lock()      # labels are walked in parallel threads
        # The prompts of these slices by their exact inputs (walk.decode_prompted): a re-run's walks
        # that a correction leaves alone skip the prompt selection too.
        self.prompts = PromptCache(DECODED_KEPT_BYTES // 2)
        # Slices being encoded by one thread: another thread that needs them waits for them.
        self._claims: Dict[int, threading.Event] = {}
        self._claims_lock = threading.Lock()
        self._dirty = False                        # embeddings not yet on disk
        self.grown: Optional[Callable[[], None]] = None     # called after each batch stored (Stores.grown)
        self.seconds = 0.0
        self.disk_path = None
        if disk_dir:
            digest = hashlib.sha1()
            key = "%s|%s|%s|%s" % (encoder.name, frame, slices.shape, STORAGE_DTYPE)
            if getattr(encoder, "precision", None) is not None:      # reduced-precision embeddings differ
                key += "|%s" % encoder.precision
            if getattr(encoder, "runtime", "torch") != "torch":       # so do another runtime's (by ~1e-6)
                key += "|%s" % encoder.runtime
            if getattr(getattr(encoder, "device", None), "type", "cpu") != "cpu":   # and a GPU's (IEEE fp32:
                key += "|%s" % encoder.device.type                    # Dice within 3e-4 of the CPU's, research.md)
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(slices).tobytes())
            self.disk_path = os.path.join(disk_dir, "%s-%s.pt" % (encoder.name, digest.hexdigest()[:20]))
            if os.path.isfile(self.disk_path):
                try:
                    self.cache.update(torch.load(self.disk_path, map_location="cpu", weights_only=True))
                except Exception:          # a damaged cache file is recomputed, never trusted
                    self.cache.clear()

    def _save(self) -> None:
        if not self.disk_path:
            return
        os.makedirs(os.path.dirname(self.disk_path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt", dir=os.path.dirname(self.disk_path))
        os.close(fd)
        try:
            torch.save(self.cache, tmp)
            os.replace(tmp, self.disk_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def flush(self) -> None:
        """Write the embeddings computed since the last write to the disk cache (if any)."""
        if self._dirty:
            self._dirty = False
            self._save()

    def ensure(self, indices: Sequence[int], progress: Optional[Callable[[int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None, save: bool = True) -> None:
        """Embed the slices of `indices` not embedded yet, in batches. Thread-safe: a slice that
        another thread is embedding is waited for, not embedded twice. save=False leaves writing
        the disk cache to flush()."""
        with self._claims_lock:
            wanted = [i for i in dict.fromkeys(int(i) for i in indices) if i not in self.cache]
            todo = [i for i in wanted if i not in self._claims]
            theirs = [self._claims[i] for i in wanted if i in self._claims]
            for i in todo:
                self._claims[i] = threading.Event()
        try:
            self._embed(todo, progress, cancel)
        finally:
            with self._claims_lock:
                for i in todo:
                    self._claims.pop(i).set()
        for event in theirs:
            event.wait()
        if any(i not in self.cache for i in wanted):           # another thread failed on them
            self.ensure([i for i in wanted if i not in self.cache], progress, cancel, save)
        if todo:
            self._dirty = True
            if save:
                self.flush()

    def _embed(self, todo: List[int], progress, cancel) -> None:
        start = 0
        while start < len(todo):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            chunk = todo[start:start + self.batch_size]
            t0 = time.perf_counter()
            try:
                feats = self.encoder.embed(self.slices[chunk], self.frame)
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise SynPoError("the GPU ran out of memory encoding a single slice with %s; free GPU memory "
                                     "(other programs, other models) or run on the CPU (the command line's "
                                     "--device cpu)" % self.encoder.name) from exc
                self.batch_size = max(1, self.batch_size // 2)
                continue
            self.seconds += time.perf_counter() - t0
            for i, f in zip(chunk, feats):
                self.cache[i] = f.to(STORAGE_DTYPE, copy=True)
            start += len(chunk)
            if self.grown is not None:
                self.grown()
            if progress:
                progress(len(chunk))

    def stack(self, indices: Sequence[int]) -> torch.Tensor:
        self.ensure(indices)
        return torch.stack([self.cache[i] for i in indices])

    def decode(self, sam, t: int, prompts: Prompts, cfg: DecodeConfig) -> tuple:
        """(mask, SAM's IoU, box) of slice t decoded from `prompts` (decode_slice), or the result of
        an earlier identical decoding (up to DECODED_KEPT_BYTES are kept; least recently used out first)."""
        key = (t, decoder_inputs(prompts, cfg))
        with self._decoded_lock:
            hit = self.decoded.get(key)
            if hit is not None:
                self.decoded.move_to_end(key)
                self.decode_reuses += 1
        if hit is not None:
            bits, iou, box = hit
            shape = (self.frame.H, self.frame.W)
            return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool), iou, box
        self.ensure([t], save=False)
        dec = decode_slice(sam, self.cache[t], self.frame, prompts, cfg)
        bits = np.packbits(dec.mask)
        with self._decoded_lock:
            self.decodes += 1
            if key not in self.decoded:
                self.decoded[key] = (bits, dec.iou, dec.box)
                self.decoded_bytes += bits.nbytes
            while self.decoded_bytes > DECODED_KEPT_BYTES:
                self.decoded_bytes -= self.decoded.popitem(last=False)[1][0].nbytes
        return dec.mask, dec.iou, dec.box


def get_store(stores: Dict, key: str, enc, volume_slices: np.ndarray, spacing_rc, cfg: SynPoConfig,
              embedding_cache: Optional[str] = None) -> EmbeddingStore:
    """The store under `key` if it holds these slices in the same frame from the same encoder (a
    model loaded for another device or precision embeds and decodes a little differently), else a
    new one put there. It calls the `grown` of `stores` (a Stores) as it grows."""
    frame = enc.frame(volume_slices.shape[1], volume_slices.shape[2], spacing_rc)
    s = stores.get(key)
    new = s is None or s.encoder is not enc or s.frame != frame or (s.slices is not volume_slices
                                                                  and not np.array_equal(s.slices, volume_slices))
    if new:
        batch = batch_size_for(enc.device, getattr(enc, "name", ""), cfg.volume.batch_size)
        s = EmbeddingStore(enc, volume_slices, frame, batch, embedding_cache)
        stores[key] = s
    s.grown = getattr(stores, "grown", None)
    if new and s.cache and s.grown is not None:     # embeddings read from the disk cache
        try:
            s.grown()
        except SynPoError:
            # More than the budget holds (a run refused for it left them there): not taken; the slices
            # a run or re-decoding needs are computed again, the budget checked as they are.
            s.cache.clear()
    return s


def store_key(role: str, name: str, enc, axis: int) -> str:
    """Key of a store in a `stores` dict: role is "query" or "support", name "sam" or "dinov2"."""
    return "%s/%s/%s/%d" % (role, name, enc.name, axis)


def sam_store(stores: Dict) -> EmbeddingStore:
    """The query volume's SAM embeddings in a `stores` dict filled by segment_volume."""
    return next(s for k, s in stores.items() if k.startswith("query/sam/"))
