"""What `synpo serve` holds, without HTTP: models, sessions, runs, the memory budget.

- A `Service` loads the models once and keeps `Session`s (session.py) by id.
- A run is a `Run`: it waits for a compute slot (runs are queued, `max_runs` at a time, so two
  clients never make each other's runs slower than one after the other), reports progress and
  each slice as it is decided, and can be cancelled while queued or running.
- Memory is bounded: when a session is created, as it grows (after each batch of slices a run or
  a re-decoding embeds, in that thread: Service.make_room) and when a run ends, the least recently
  used idle sessions are evicted until the sessions together hold at most `budget_bytes`. A session
  that alone cannot fit is refused (OverBudget): its upload, or the run or re-decoding that grows it
  past the budget (what it computed is dropped; its image and last result stay), evicting nobody
  for it. Sessions running or holding a result their client has yet to fetch are never evicted (the
  sessions can exceed the budget by those until they are idle). A session idle for `ttl_seconds`
  expires. A request naming an evicted or expired session is told so.
"""
import logging
import math
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from .config import configured
from .errors import InputError, SynPoError
from .result import VolumeResult
from .session import Models, Session, check_real
from .volume import Cancelled

log = logging.getLogger("synpo.serve")

RUNS_KEPT = 4                  # runs a session remembers (their state); only the last done one keeps its result
FORGOTTEN_KEPT = 1000          # ids of evicted / expired sessions remembered to say so
# A done run's result that its client has not fetched yet (nor cancelled) keeps its session from eviction
# while the client keeps asking about the session, up to this many seconds after its last request: another
# client's upload or run end evicted it between "done" and the download (the run computed for nobody).
RESULT_GRACE = 120.0


class NotFound(SynPoError):
    """An unknown, evicted or expired session or run (HTTP 404)."""


class Busy(SynPoError):
    """The session is running something already, or a result is not ready (HTTP 409)."""


class OverBudget(SynPoError):
    """A session that alone would hold more than the memory budget, --max-memory-mb (HTTP 400)."""


class Run:
    """One segmentation run of a session, in its own thread."""

    def __init__(self, run_id: str, session_id: str):
        # (the session's id, not its Entry: an Entry holds its runs, and a run holding its Entry made a
        # cycle that kept a deleted or evicted session's memory until Python's cycle collector ran)
        self.id, self.session_id = run_id, session_id
        self.state = "queued"            # queued, running, done, failed, cancelled
        self.stage, self.done, self.total = "queued", 0, 1
        self.error = ""
        self.slices: List[dict] = []     # each decided slice: its record, its mask packed (or None)
        self.result: Optional[VolumeResult] = None
        self.cancel_event = threading.Event()
        self.lock = threading.Lock()
        self.fetched = False             # the result was sent whole (or its last part), or the client cancelled
        self.created = time.time()
        self.seconds = 0.0
        # A result's message being fetched in parts: bytes, "packing", or the error packing raised. Held
        # until its last part is sent or the client cancels; else with the run (not in the memory budget).
        self._packed: Dict[str, object] = {}

    def packed_result(self, key: str, build) -> Optional[bytes]:
        """The message build() gives for `key`, packed once in a thread of its own: None while it
        is being packed (the first call starts it), so that each request for a part of it answers at
        once; an error raised while packing is raised here (once)."""
        with self.lock:
            held = self._packed.get(key)
            if held is None:
                self._packed[key] = "packing"
                threading.Thread(target=self._pack, args=(key, build), daemon=True).start()
                return None
            if isinstance(held, BaseException):
                del self._packed[key]
                raise held
        return None if isinstance(held, str) else held

    def _pack(self, key: str, build) -> None:
        try:
            message = build()
        except BaseException as exc:                # handed to the next request for it
            message = exc
        with self.lock:
            if isinstance(self._packed.get(key), str):      # not dropped (cancelled) meanwhile
                self._packed[key] = message

    def drop_packed(self, key: Optional[str] = None) -> None:
        """Forget a message whose last part was sent, or (no key) every one: the client cancelled
        (a request for it again packs it again)."""
        with self.lock:
            if key is None:
                self._packed.clear()
            else:
                self._packed.pop(key, None)

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = stage, int(done), max(1, int(total))

    def on_slice(self, record, mask) -> None:
        packed = None
        if mask is not None:
            packed = (np.packbits(mask), mask.shape)
        with self.lock:
            self.slices.append({"record": record.to_dict(), "mask": packed})

    def status(self, since: int = 0) -> dict:
        with self.lock:
            new = self.slices[since:]
            n = len(self.slices)
        return {"run": self.id, "session": self.session_id, "state": self.state, "stage": self.stage,
                "done": self.done, "total": self.total, "error": self.error, "seconds": round(self.seconds, 3),
                "slices": [s["record"] for s in new], "next": n}

    def slice_masks(self, since: int = 0):
        """([records], {name: mask}) of the slices decided since `since`; a record's "mask" names its array."""
        with self.lock:
            new = list(enumerate(self.slices))[since:]
        records, arrays = [], {}
        for pos, s in new:
            rec = dict(s["record"])
            rec["mask"] = None
            if s["mask"] is not None:
                bits, shape = s["mask"]
                name = "m%d" % pos
                arrays[name] = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
                rec["mask"] = name
            records.append(rec)
        return records, arrays


class Entry:
    """A session with its id, its runs and its lock (one run or re-decoding at a time)."""

    def __init__(self, session_id: str, session: Session, meta: dict):
        self.id, self.session, self.meta = session_id, session, meta
        self.runs: "OrderedDict[str, Run]" = OrderedDict()
        self.lock = threading.Lock()
        self.created = time.time()
        self.touched = time.monotonic()

    def busy(self) -> bool:
        return self.lock.locked() or any(r.state in ("queued", "running") for r in self.runs.values())

    def awaiting_fetch(self) -> bool:
        """A done run's result not fetched yet by a client still asking (RESULT_GRACE): not evicted."""
        return time.monotonic() - self.touched < RESULT_GRACE and any(
            r.state == "done" and r.result is not None and not r.fetched for r in list(self.runs.values()))


class Service:
    def __init__(self, models: Models, budget_bytes: int = 8 << 30, ttl_seconds: float = 3600.0,
                 max_runs: int = 1, embedding_cache: Optional[str] = None):
        self.models = models
        self.budget_bytes, self.ttl_seconds = int(budget_bytes), float(ttl_seconds)
        self.embedding_cache = embedding_cache
        self.entries: "OrderedDict[str, Entry]" = OrderedDict()
        self.forgotten: "OrderedDict[str, str]" = OrderedDict()      # id -> why it is gone
        self.lock = threading.Lock()
        self.budget_lock = threading.Lock()     # one eviction pass at a time (a run's label workers grow at once)
        self.slots = threading.Semaphore(max(1, int(max_runs)))
        self.evictions = 0

    # ------------------------------------------------------------------ sessions

    def create(self, image: np.ndarray, spacing, meta: Optional[dict] = None, direction=None) -> Entry:
        session = Session(image, spacing, self.models, self.embedding_cache, direction)
        size = session.memory_bytes()
        if size > self.budget_bytes:            # (nothing evicted for it)
            raise OverBudget("the volume takes %s in memory as float32, over this server's memory budget "
                             "(--max-memory-mb %d) before any slice is embedded; start synpo serve with a larger "
                             "--max-memory-mb, or send a smaller volume (cropped to the organ)"
                             % (_mb(size), self.budget_bytes >> 20))
        entry = Entry(secrets.token_hex(8), session, dict(meta or {}))
        ref = weakref.ref(entry)                # (the session holds this: no cycle through the entry)
        session.stores.grown = lambda: self._grown(ref())
        with self.lock:
            self.entries[entry.id] = entry
        log.info("session %s created: %s voxels", entry.id, "x".join(str(s) for s in image.shape[::-1]))
        self.enforce_budget(keep=entry.id)
        return entry

    def get(self, session_id: str) -> Entry:
        self.expire()
        with self.lock:
            entry = self.entries.get(session_id)
            if entry is None:
                why = self.forgotten.get(session_id)
                if why:
                    raise NotFound("session %s is gone: %s; create it again" % (session_id, why))
                raise NotFound("unknown session %s" % session_id)
            self.entries.move_to_end(session_id)
            entry.touched = time.monotonic()
            return entry

    def delete(self, session_id: str) -> None:
        self._forget(self.get(session_id), "deleted by a client")       # (its runs cancelled there)

    def _forget(self, entry: Entry, why: str, unless=None) -> bool:
        """Remove the session (its runs cancelled); not when unless(entry), checked under the lock
        that start_run registers its runs under. Whether it was removed here."""
        with self.lock:
            if unless is not None and unless(entry):
                return False
            removed = self.entries.pop(entry.id, None) is not None
            if removed:
                self.forgotten[entry.id] = why
                while len(self.forgotten) > FORGOTTEN_KEPT:
                    self.forgotten.popitem(last=False)
            runs = list(entry.runs.values())
        for run in runs:                 # (a run started as it was removed computes nothing for nobody)
            run.cancel_event.set()
        if removed:
            log.info("session %s removed: %s", entry.id, why)
        return removed

    def memory_bytes(self) -> int:
        with self.lock:
            entries = list(self.entries.values())
        return sum(e.session.memory_bytes() for e in entries)

    def enforce_budget(self, keep: Optional[str] = None) -> None:
        """Evict the least recently used idle sessions (never `keep`, never a busy one, nor one whose
        finished run's result its client has yet to fetch) until the sessions hold at most the budget."""
        with self.budget_lock:
            with self.lock:
                entries = list(self.entries.values())           # least recently used first
            self._evict(entries, {e.id: e.session.memory_bytes() for e in entries}, keep)

    def _evict(self, entries: List[Entry], sizes: Dict[str, int], keep: Optional[str]) -> None:
        total = sum(sizes.values())
        for e in entries:
            if total <= self.budget_bytes:
                break
            if e.id == keep:
                continue
            # (busy: a run registered or a re-decoding started, which checks its session is still held)
            if self._forget(e, "evicted to keep the server within its memory budget (--max-memory-mb %d)"
                            % (self.budget_bytes >> 20), unless=lambda x: x.busy() or x.awaiting_fetch()):
                self.evictions += 1
                total -= sizes[e.id]

    def make_room(self, entry: Entry) -> None:
        """The budget as `entry`'s session grows, in the thread growing it (a run's, a re-decoding's),
        after each batch of slices it embeds: the least recently used idle sessions are evicted until
        the sessions fit (enforce_budget); OverBudget when this session alone holds more than the
        budget, after it has dropped the confidence maps it can do without (Session.shed; what it would
        need said; nobody is evicted for it)."""
        with self.budget_lock:
            with self.lock:
                if self.entries.get(entry.id) is not entry:     # deleted or expired meanwhile: cancelled
                    return
                entries = list(self.entries.values())
            sizes = {e.id: e.session.memory_bytes() for e in entries}
            if sizes[entry.id] > self.budget_bytes:
                entry.session.shed()                 # (confidence maps of a paint no longer used first)
                sizes[entry.id] = entry.session.memory_bytes()
            if sizes[entry.id] > self.budget_bytes:
                raise OverBudget(self._too_big(entry, sizes[entry.id]))
            self._evict(entries, sizes, keep=entry.id)

    def _grown(self, entry: Optional[Entry]) -> None:
        if entry is not None:
            self.make_room(entry)

    def _too_big(self, entry: Entry, size: int) -> str:
        done, each, more = entry.session.embedded()
        need = size + more
        return ("session %s needs more memory than this server's budget (--max-memory-mb %d): it holds %s with %d "
                "slices embedded (%s a slice), about %s with every slice embedded; start synpo serve with "
                "--max-memory-mb %d or more, or send a smaller volume (cropped to the organ)"
                % (entry.id, self.budget_bytes >> 20, _mb(size), done, _mb(each), _mb(need),
                   max(math.ceil(need / 2 ** 20), (self.budget_bytes >> 20) + 1)))

    def start_reaper(self, every: float = 30.0) -> None:
        """Expire idle sessions every `every` seconds, requests or not (a daemon thread)."""
        def loop():
            while True:
                time.sleep(every)
                self.expire()
        threading.Thread(target=loop, name="synpo-reaper", daemon=True).start()

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            stale = [e for e in self.entries.values() if now - e.touched > self.ttl_seconds and not e.busy()]
        for e in stale:
            self._forget(e, "expired after %d s unused (--session-ttl)" % self.ttl_seconds)

    # ------------------------------------------------------------------ runs

    def start_run(self, entry: Entry, support: Optional[np.ndarray], settings: dict,
                  support_image: Optional[np.ndarray] = None, add: bool = False) -> Run:
        cfg = configured(settings.get("set") or [], settings.get("modality"))     # bad settings: 400 now
        if support is None and not (add and settings.get("absent")):
            raise InputError("the run needs a support label map (array 'support'), or absent marks to add")
        if add and entry.session.support is None:
            raise Busy("nothing to add to: start a run on this session before adding support slices")
        last = entry.session.result
        if add and settings.get("axis") is not None and last is not None and settings["axis"] != last.support.axis:
            raise InputError("meta.axis %d: corrections ('add') run on the session's slicing axis, %d"
                             % (settings["axis"], last.support.axis))
        if support_image is not None:              # (else the run failed in its thread, after a 202)
            check_real(np.asarray(support_image), "the support image")
        if not add and support is not None:
            shape = support_image.shape if support_image is not None else entry.session.image.shape
            if tuple(support.shape) != tuple(shape):
                raise InputError("the support grid %s differs from the %s grid %s"
                                 % (tuple(support.shape), "support image" if support_image is not None else "image",
                                    tuple(shape)))
        with self.lock:                          # two requests at once: one run, one 409
            if self.entries.get(entry.id) is not entry:      # deleted, evicted or expired meanwhile
                raise NotFound("session %s is gone: %s; create it again"
                               % (entry.id, self.forgotten.get(entry.id, "removed")))
            if entry.busy():
                raise Busy("session %s is busy with another run; wait for it or cancel it" % entry.id)
            run = Run(secrets.token_hex(6), entry.id)
            entry.runs[run.id] = run
            while len(entry.runs) > RUNS_KEPT:
                entry.runs.popitem(last=False)
        threading.Thread(target=self._execute, args=(entry, run, support, cfg, support_image, add, settings),
                         name="synpo-run-%s" % run.id, daemon=True).start()
        return run

    def _execute(self, entry: Entry, run: Run, support, cfg, support_image, add: bool, settings: dict) -> None:
        # Queued until a compute slot is free; a cancel (or the session's deletion) ends it while it waits.
        while not self.slots.acquire(timeout=0.2):
            if run.cancel_event.is_set():
                run.state = run.stage = "cancelled"
                return
        try:
            if run.cancel_event.is_set():
                run.state = run.stage = "cancelled"
                return
            with entry.lock:
                run.state, run.stage = "running", "starting"
                t0 = time.perf_counter()
                try:
                    kwargs = dict(progress=run.progress, cancel=run.cancel_event.is_set, on_slice=run.on_slice,
                                  confidence_everywhere=bool(settings.get("confidence_all")))
                    absent = settings.get("absent") or None
                    if add:
                        run.result = entry.session.add_support(support, absent, cfg, **kwargs)
                    else:
                        run.result = entry.session.run(support, cfg, support_image, absent=absent,
                                                        axis=settings.get("axis"), **kwargs)
                    run.state = run.stage = "done"
                    # The session's memory counts its last result only (Session.memory_bytes): an earlier
                    # run's is dropped, not kept outside --max-memory-mb (its result: "no longer kept").
                    for other in list(entry.runs.values()):
                        if other is not run and other.result is not None:
                            other.result = None
                except Cancelled:
                    run.state = run.stage = "cancelled"
                except OverBudget as exc:                 # (its embeddings so far over the budget: dropped)
                    entry.session.drop_computed()
                    run.state, run.stage, run.error = "failed", "failed", str(exc)
                except SynPoError as exc:
                    run.state, run.stage, run.error = "failed", "failed", str(exc)
                except Exception as exc:                  # reported to the client, never lost
                    log.exception("run %s failed", run.id)
                    run.state, run.stage, run.error = "failed", "failed", "%s: %s" % (type(exc).__name__, exc)
                run.seconds = time.perf_counter() - t0
                entry.touched = time.monotonic()
        finally:
            self.slots.release()
        log.info("run %s of session %s: %s in %.1f s", run.id, entry.id, run.state, run.seconds)
        self.enforce_budget(keep=entry.id)          # (its client is about to fetch the result)

    def get_run(self, entry: Entry, run_id: str) -> Run:
        run = entry.runs.get(run_id)
        if run is None:
            raise NotFound("unknown run %s of session %s" % (run_id, entry.id))
        return run

    def redecode(self, entry: Entry, slice_index: int, positive, negative, label=None, axis=None):
        if not entry.lock.acquire(blocking=False):
            raise Busy("session %s is busy with a run; re-decode when it has finished" % entry.id)
        try:
            with self.lock:                      # evicted or deleted since the request found it
                if self.entries.get(entry.id) is not entry:
                    raise NotFound("session %s is gone: %s; create it again"
                                   % (entry.id, self.forgotten.get(entry.id, "removed")))
            try:
                return entry.session.redecode(slice_index, positive, negative, label, axis)
            except OverBudget:
                entry.session.drop_computed()
                raise
        finally:
            entry.lock.release()

    def describe(self, entry: Entry) -> dict:
        s = entry.session
        return {"session": entry.id, "shape_kji": list(s.image.shape), "spacing_ijk": list(s.spacing),
                "memory_mb": round(s.memory_bytes() / 2 ** 20, 2),
                "runs": [{"run": r.id, "state": r.state} for r in entry.runs.values()],
                "has_result": s.result is not None}

    def sessions(self) -> Dict[str, Entry]:
        with self.lock:
            return dict(self.entries)


def _mb(size: int) -> str:
    return "%.1f MB" % (size / 2 ** 20)
