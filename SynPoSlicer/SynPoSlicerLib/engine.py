"""The engine out of Slicer's process: a `synpo serve` child process, and runs on it step by step.

Slicer's PythonQt keeps Python's GIL while Qt waits for events, so a Python thread inside Slicer
barely runs. Nothing here uses threads: the module's timer calls `RemoteJob.step()` every few
hundred milliseconds and each step is one short request to the server (a status poll, the
slices decided since the last poll, or the result). Qt-free, Python 3.9, no torch: the server may
run on this machine (started here, with the Python the user configured) or on a team's GPU machine.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from synpo.client import RESENDS, Client, ServerError
from synpo.errors import SynPoError

from SynPoSlicerLib.process import end_tree, start_options

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.dirname(HERE)                 # holds the `synpo` package


def default_python() -> str:
    """Slicer's own Python launcher when there is one (PythonSlicer), else this interpreter."""
    found = shutil.which("PythonSlicer")
    return found or sys.executable


def _same_file(a: str, b: Optional[str]) -> bool:
    return bool(b) and os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def base_environment(python: str) -> dict:
    """The environment the server starts in. Inside Slicer, any Python but this Slicer's own
    PythonSlicer gets the environment Slicer itself was started with (slicer.util.startupEnvironment,
    as launchConsoleProcess does): this Slicer's PYTHONHOME, PYTHONPATH and library paths would break
    it. That holds for another Slicer's PythonSlicer too (a 5.10 beside this 5.8): CTK's launcher
    (ctkAppLauncherSettings, its environment variables) puts its own paths before the values it
    inherits, so this Slicer's site-packages would stay on its path. This Slicer's own launcher is the
    one on PATH, as slicer.util._executePythonModule finds it."""
    slicer = sys.modules.get("slicer")
    in_slicer = slicer is not None and getattr(slicer, "app", None) is not None
    if in_slicer and not _same_file(python, shutil.which("PythonSlicer")):
        startup = getattr(getattr(slicer, "util", None), "startupEnvironment", None)
        if startup is not None:
            return dict(startup())
    return dict(os.environ)


def server_key(python: Optional[str], device: str, sam: str, features: str, extra: Sequence[str] = (),
               environment: Optional[Dict[str, str]] = None) -> tuple:
    """What a local server is started with; a running server serves every preview with the same key."""
    key = (python or default_python(), device, sam, features, tuple(extra))
    return key + (tuple(sorted(environment.items())),) if environment else key


def physical_memory_mb() -> Optional[int]:
    """This machine's memory in MB, or None where it cannot be read (POSIX sysconf; Windows'
    GlobalMemoryStatusEx)."""
    try:
        if os.name == "nt":
            import ctypes

            class MemoryStatus(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
            status = MemoryStatus()
            status.dwLength = ctypes.sizeof(MemoryStatus)
            if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return None
            total = status.ullTotalPhys
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
    return int(total) >> 20 if total > 0 else None


def local_memory_budget_mb() -> int:
    """--max-memory-mb for the module's own server, which serves this machine's user alone: three
    quarters of the machine's memory, and at least synpo serve's default. (The budget evicts other
    sessions, and refuses a volume that alone needs more: with the default a large CT on a large
    machine was refused, with a server option the module's user cannot set.)"""
    from synpo.server import DEFAULT_MEMORY_MB
    total = physical_memory_mb()
    return max(DEFAULT_MEMORY_MB, total * 3 // 4 if total else 0)


class ServerProcess:
    """`synpo serve` started as a child process on a free loopback port with a fresh token.

    start() returns at once; ready() says whether it accepts requests yet (no waiting); stop() ends
    it and everything it started: in Slicer the child is the PythonSlicer launcher, which runs the
    real interpreter as its own child (process.py). The server watches this process (--parent-pid)
    and exits by itself when it dies. Its output goes to a log file, shown to the user when it fails
    to start. `key` names what the server was started with (Python, model, device, features, the
    variables `environment` adds): the module reuses a running server for every preview with the
    same key."""

    def __init__(self, python: Optional[str] = None, device: str = "auto", sam: str = "litemedsam",
                 features: str = "auto", extra: Sequence[str] = (), parent_pid: Optional[int] = None,
                 environment: Optional[Dict[str, str]] = None):
        python = python or default_python()
        # A path relative to where the caller is, not to the server's folder (Popen's cwd): resolved now.
        self.python = os.path.abspath(python) if (os.sep in python or (os.altsep and os.altsep in python)) else python
        self.key = server_key(python, device, sam, features, extra, environment)
        # Variables set for the server on top of base_environment (the module's cache folder:
        # slicer.util.startupEnvironment is Slicer's environment at its start, without later changes).
        self.environment = dict(environment or {})
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        budget = [] if any(str(o).startswith("--max-memory-mb") for o in extra) else \
            ["--max-memory-mb", str(local_memory_budget_mb())]
        self.options = ["--device", device, "--sam", sam, "--features", features] + budget + list(extra)
        self.folder = tempfile.mkdtemp(prefix="synpo-server-")
        self.token_file = os.path.join(self.folder, "token")
        self.ready_file = os.path.join(self.folder, "ready")
        self.log_file = os.path.join(self.folder, "server.log")
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self.started = 0.0

    def start(self) -> "ServerProcess":
        from synpo.server import make_token_file
        os.makedirs(self.folder, mode=0o700, exist_ok=True)     # again after a stop()
        make_token_file(self.token_file)
        env = base_environment(self.python)
        env.update(self.environment)
        env["PYTHONPATH"] = MODULE_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [self.python, "-m", "synpo.cli", "serve", "--port", "0", "--token-file", self.token_file,
               "--ready-file", self.ready_file, "--parent-pid", str(self.parent_pid),
               "--owned-folder", self.folder] + self.options
        log = open(self.log_file, "w")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.folder, **start_options())
        except OSError as exc:
            log.close()                      # (first: Windows removes no open file)
            shutil.rmtree(self.folder, ignore_errors=True)      # (its token: no credential left behind)
            raise SynPoError("cannot start the SynPo server with %s: %s" % (self.python, exc)) from None
        finally:
            log.close()
        self.started = time.monotonic()
        return self

    def ready(self) -> bool:
        """True once the server accepts requests; SynPoError (with its log's last lines) if it died."""
        if self.url:
            return True
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            raise SynPoError("the SynPo server stopped while starting (exit %s): %s"
                             % (self.proc.returncode, self.log_tail()))
        if os.path.exists(self.ready_file):
            with open(self.ready_file) as handle:
                url = handle.read().strip()
            if url:
                self.url = url
                return True
        return False

    def client(self, timeout: float = 5.0) -> Client:
        with open(self.token_file) as handle:
            return Client(self.url, handle.read().strip(), timeout)

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_file) as handle:
                text = [ln.strip() for ln in handle.read().splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """End the server's whole process tree (not only the launcher we started), then remove its
        folder (token, ready file, log): a stopped server leaves no credential behind. A server that
        failed to start has already put its log's last lines into the error it raised. When the
        program that started it dies instead (a crashed Slicer), the server removes the folder
        itself on its way out (`synpo serve --owned-folder`)."""
        if self.proc is not None:
            end_tree(self.proc)
        self.proc, self.url = None, None
        shutil.rmtree(self.folder, ignore_errors=True)


# A Re-run slice (or an Update) needs the server's session of the preview it corrects; the server ended
# it (idle past --session-ttl, evicted for memory, restarted): said so, with what the user can do (an
# Update sends the volume again: SynPoSlicerLogic._resendUpdate).
SESSION_GONE = ("the server no longer holds this preview's volume (%s). Your corrections are kept on the "
                "candidates: Update sends the volume again and runs from them; Apply writes them as drawn")


class RemoteJob:
    """One preview on a server, advanced by step() from a timer; every step is one short request.

    States: "upload" -> "start" -> "running" -> "fetch" -> "done", or "failed" / "cancelled"; a
    job cancelled while the server's answer to its message is due is "cancelling" until it has read
    it (steps go on, as after any cancel, until the job is no longer active).
    `new_slices()` hands over the slices decided since the last call (record, mask or None), so
    the preview can grow as the server works; `result` is the VolumeResult once done."""

    ACTIVE = ("upload", "start", "running", "fetch", "cancelling")
    UPLOAD_CHUNK = 4 << 20              # bytes compressed or sent at a time (about 0.05 s on a CPU core)
    # Seconds of sending per step(): Slicer's 250 ms timer then leaves the interface a twentieth of a
    # second between steps (clicks, Cancel, repaints) and the volume goes up at most 1.25x slower.
    UPLOAD_SECONDS = 0.2
    # Bytes of the result asked for at a time: a blocking request, so small enough for a slow link
    # (0.8 s at 10 Mbit/s), and decompressed at a time.
    DOWNLOAD_CHUNK = 1 << 20
    # How long a cancelled job looks for the server's answer to a message sent before Cancel.
    SETTLE_SECONDS = 5.0
    # A run's progress is asked for with this timeout (a blocking request on Slicer's thread); a server
    # that does not answer (stalled: swapping, a pause, a loaded machine) is asked again on the next steps,
    # the stage counting the seconds, and the job fails only after STALL_SECONDS without an answer. A poll
    # after one that timed out waits twice as long, up to the client's timeout (a loaded server that
    # answers every poll in 3 s is not taken for a stalled one).
    POLL_TIMEOUT = 2.0
    STALL_SECONDS = 60.0
    SETTLE_RETRY = 5.0                  # seconds between a stalled server's cancel requests (cancel)

    def __init__(self, client: Client, image: Optional[np.ndarray], spacing_ijk, support: Optional[np.ndarray],
                 settings: Sequence[str] = (), session_id: Optional[str] = None, add: bool = False,
                 absent: Optional[dict] = None, axis: Optional[int] = None, direction=None):
        """A new preview (image and support); with session_id a preview on that server session (its
        embeddings reused; the image is sent again only if the server no longer has it); with
        session_id and add=True corrections on the session's last run: support = the corrected
        slices' paint, absent = {label: slices}; `gone` is set when the server no longer holds that
        session. axis: a new preview's slicing axis (else the server finds it from the paint). direction:
        the volume's 3x3 LPS direction (mrml.direction_lps), sent with it."""
        self.client, self.image, self.spacing, self.support = client, image, tuple(spacing_ijk), support
        self.settings, self.add, self.absent, self.axis = list(settings), add, absent, axis
        self.direction = direction
        self.gone = False
        self.session_id = session_id
        self.reused = bool(session_id) and not add      # a new preview on a session already on the server
        self.run_id: Optional[str] = None
        self.state = "start" if session_id else "upload"
        self.stage, self.done, self.total = "connecting", 0, 1
        self.error = ""
        self.result = None
        self._since = 0
        self._arrived: List[Tuple] = []
        self._cancel = False
        self._busy_until = time.monotonic() + 60.0
        self._answered = 0.0                # when the server last answered about the run ("running")
        self._missed = 0                    # polls in a row that timed out
        self._sent_again = False            # the volume was sent again once after its session went mid-run
        self._resent = 0                    # times the volume was sent again, its session gone before its run
        self._retry_at = 0.0                # when a cancel that got no answer is sent again ("cancelling")
        self._upload = None                 # the volume ("upload") or the run ("start") being sent (client.Upload)
        self._download = None               # the result being received (client.ResultDownload), in "fetch"
        self._settling = None               # ("upload" | "start", deadline) while "cancelling"

    def active(self) -> bool:
        return self.state in self.ACTIVE

    def _advance(self, transfer):
        """Step `transfer` (client.Upload or client.ResultDownload) for up to UPLOAD_SECONDS, or until
        it only waits on the server: its answer once done, else None."""
        deadline = time.monotonic() + self.UPLOAD_SECONDS
        answer = transfer.step()
        while answer is None and not transfer.waiting() and time.monotonic() < deadline:
            answer = transfer.step()
        return answer

    def cancel(self, now: bool = False) -> None:
        """Ask the server to stop; the next step says when it has. now: send the request at once
        (the job is about to be dropped, e.g. the scene is closing)."""
        self._cancel = True
        if self.state == "cancelling":
            return
        if self.state in ("upload", "start") and self._upload is not None and self._upload.waiting():
            # The message is sent: the server makes the session ("upload") or starts the run ("start")
            # and answers at once. The answer is read by the next steps (never waited for here: this
            # runs on Slicer's main thread), at most SETTLE_SECONDS: a session is kept for the next
            # preview of this volume (the logic records session_id), a run is cancelled; neither is
            # left on the server unseen.
            self._settling = (self.state, time.monotonic() + self.SETTLE_SECONDS)
            self.state, self.stage = "cancelling", "cancelling"
            return
        if self.state == "fetch" and self._download is not None and now:
            try:                                # the run is done: the server only forgets what it packed
                self.client.cancel(self.session_id, self.run_id)
            except ServerError:
                pass
        if self.state in ("upload", "start", "fetch"):      # (a run done: its result is not fetched)
            if self._upload is not None:
                self._upload.close()
                self._upload = None
            self._download = None
            self.state, self.stage = "cancelled", "cancelled"
        elif now and self.state == "running":
            try:
                self.client.cancel(self.session_id, self.run_id, timeout=min(self.client.timeout, self.POLL_TIMEOUT))
            except ServerError as exc:
                if exc.timed_out:
                    # A stalled server: the cancel is sent again by the next steps (every few seconds, up to
                    # STALL_SECONDS), or the run went on there, holding the session (and a --max-runs slot).
                    self._settling = ("running", time.monotonic() + self.STALL_SECONDS)
                    self._retry_at = time.monotonic() + self.SETTLE_RETRY
                    self.state, self.stage = "cancelling", "cancelling (the server does not answer)"
                    return
            self.state, self.stage = "cancelled", "cancelled"
        self._release()

    def step(self) -> str:
        """Advance by one request; returns the state. Errors end the job with `error` set."""
        origin = self.state
        try:
            if self.state == "cancelling":
                self._settle()
            elif self.state == "upload":
                # A step at a time (client.Upload): a large CT compressed and sent in one call froze
                # Slicer's main thread for seconds, Cancel included.
                if self._upload is None:
                    self._upload = self.client.session_upload(self.image, self.spacing, self.UPLOAD_CHUNK,
                                                              direction=self.direction)
                session = self._advance(self._upload)
                self.done, self.total = self._upload.progress(), 100
                self.stage = "sending the volume (%d %%)" % self.done
                if session is not None:
                    self.session_id, self._upload, self.state = session, None, "start"
                    self.done, self.total = 0, 1
            elif self.state == "start":
                try:
                    # A step at a time as well (client.run_upload): a large CT's support label map took
                    # half a second to pack.
                    if self._upload is None:
                        self._upload = self.client.run_upload(self.session_id, self.support, self.settings,
                                                              add=self.add, absent=self.absent,
                                                              chunk=self.UPLOAD_CHUNK,
                                                              axis=None if self.add else self.axis)
                    run = self._advance(self._upload)
                    if run is None:
                        return self.state
                    self.run_id, self._upload = run, None
                except ServerError as exc:
                    self._upload = None                 # (Upload.step closed its connection)
                    # The server evicted or expired the session this preview meant to reuse: send the
                    # volume again (a correction has nothing to resend: it fails with the message).
                    if exc.status == 409 and time.monotonic() < self._busy_until:
                        # The session's previous run (cancelled a moment ago) is still winding down.
                        self.stage = "waiting for the previous run on the server to stop"
                        return self.state
                    if exc.status != 404 or self.image is None:
                        raise                   # (corrections on a session gone: said below, `gone`)
                    if self._resent >= RESENDS:
                        # Evicted again before every run's request (a team server's budget taken by other
                        # clients' runs): the server's reason, not uploads without end (synpo segment
                        # --server gives up after as many: client.run_remote).
                        raise
                    self._resent += 1
                    self.session_id, self.reused, self.state = None, False, "upload"
                    return self.state
                self.state, self.stage, self._answered = "running", "queued", time.monotonic()
            elif self.state == "running":
                if self._cancel:
                    self.client.cancel(self.session_id, self.run_id)
                try:
                    wait = min(self.client.timeout, self.POLL_TIMEOUT * 2 ** min(self._missed, 8))
                    st = self.client.status(self.session_id, self.run_id, self._since, timeout=wait)
                    self._answered, self._missed = time.monotonic(), 0
                    if st["next"] > self._since:
                        arrived, self._since = self.client.slices(self.session_id, self.run_id, self._since)
                        self._arrived += arrived
                except ServerError as exc:
                    return self._stalled(exc)
                self.stage, self.done, self.total = st["stage"], st["done"], st["total"]
                if st["state"] == "done" and self._cancel:
                    # Cancelled (without now) while the run was ending: its result is not fetched.
                    self.state, self.stage = "cancelled", "cancelled"
                elif st["state"] == "done":
                    self.state = "fetch"
                elif st["state"] in ("failed", "cancelled"):
                    self.state, self.error = st["state"], st["error"]
            elif self.state == "fetch":
                # A step at a time too (client.ResultDownload): the result in one call froze Slicer
                # while the server packed it and Slicer unpacked it (about 3 s for a 300-slice CT).
                if self._download is None:
                    self._download = self.client.result_download(self.session_id, self.run_id, "max",
                                                                 self.DOWNLOAD_CHUNK)
                result = self._advance(self._download)
                self.done, self.total = self._download.progress(), 100
                self.stage = "receiving the result (%d %%)" % self.done
                if result is not None:
                    self.result, self._download = result, None
                    self.state, self.stage = "done", "done"
        except ServerError as exc:
            if self._upload is not None:
                self._upload.close()
                self._upload = None
            self.state, self.error = "failed", str(exc)
            if self.add and exc.status == 404 and self._session_gone(exc):
                # Gone, at the start or after the run started (idle past --session-ttl, evicted, the server
                # restarted, deleted): said so, and the module sends the volume again.
                self.gone, self.error = True, SESSION_GONE % exc
            elif (not self.add and exc.status == 404 and origin in ("running", "fetch") and self.image is not None
                  and not self._sent_again and self._session_gone(exc) and not self._cancel):
                # A preview holds its volume until it ends: sent again once, as at the start ("start").
                self.session_id, self.run_id, self.reused, self._sent_again = None, None, False, True
                self._since, self._arrived, self._download = 0, [], None
                self.state, self.error = "upload", ""
                self.stage = "the server no longer holds the volume: sending it again"
        self._release()
        return self.state

    def _session_gone(self, exc: ServerError) -> bool:
        """A 404 about the session itself (not about one of its runs)."""
        said = str(exc)
        return ("session %s is gone" % self.session_id) in said or ("unknown session %s" % self.session_id) in said

    def _stalled(self, exc: ServerError) -> str:
        """A poll of the run got no answer in time: asked again next step, up to STALL_SECONDS since the
        last answer (the run goes on on the server meanwhile); anything else fails the job (step)."""
        if not exc.timed_out:
            raise exc
        self._missed += 1
        waited = time.monotonic() - self._answered
        if waited >= self.STALL_SECONDS:
            raise ServerError("the SynPo server has not answered for %.0f s: %s" % (waited, exc), 0, True) from None
        self.stage = "waiting for the server: no answer for %.0f s" % waited
        return self.state

    def stalled(self) -> bool:
        """The last poll of the run got no answer in time (the job waits, up to STALL_SECONDS)."""
        return self.state == "running" and self._missed > 0

    def _release(self) -> None:
        """An ended job keeps no copy of the volume or the support (a CT's is hundreds of MB)."""
        if not self.active():
            self.image = self.support = None

    def _settle(self) -> None:
        """A step of "cancelling": the server's answer to the message sent before Cancel, if it has come;
        or (a run's cancel that got no answer) the cancel sent again."""
        origin, deadline = self._settling
        if origin == "running":
            if time.monotonic() < self._retry_at and time.monotonic() < deadline:
                return
            self._retry_at = time.monotonic() + self.SETTLE_RETRY
            try:
                self.client.cancel(self.session_id, self.run_id, timeout=min(self.client.timeout, self.POLL_TIMEOUT))
                done = True
            except ServerError as exc:
                done = not exc.timed_out            # refused (the run or session gone): nothing left to stop
            if done or time.monotonic() >= deadline:
                self.state, self.stage = "cancelled", "cancelled"
            return
        try:
            answer = self._upload.step()
        except ServerError:
            answer, deadline = None, 0.0                       # refused: nothing was made
        if answer is not None and origin == "upload":
            self.session_id = answer
        elif answer is not None:
            self.run_id = answer
            try:
                self.client.cancel(self.session_id, answer)
            except ServerError:
                pass
        if answer is not None or time.monotonic() >= deadline:
            self._upload.close()
            self._upload = None
            self.state, self.stage = "cancelled", "cancelled"

    def new_slices(self) -> List[Tuple]:
        out, self._arrived = self._arrived, []
        return out
