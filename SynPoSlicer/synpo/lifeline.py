"""`synpo serve --parent-pid PID`: the server ends itself when the program that started it is gone.

Slicer starts the local server through its launcher (PythonSlicer runs python-real as its own child,
SynPoSlicerLib/process.py), so the server's direct parent is the launcher, not Slicer: the module
passes Slicer's own process id. When Slicer quits normally the module ends the process tree; when it
crashes or is killed nothing would, and the server would stay with its models in memory. This
watch closes that gap: every `interval` seconds it checks that PID is still the same process
(psutil's creation time where psutil is installed, so a reused PID does not fool it), and calls
`on_exit` once it is not.
"""
import os
import signal
import threading
import time
from typing import Callable, Optional


def _creation_time(pid: int) -> Optional[float]:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:
        return None


def alive(pid: int, created: Optional[float] = None) -> bool:
    """Whether process `pid` exists (and, given `created`, is the same process as then)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return created is None or abs(proc.create_time() - created) < 1e-3
        except psutil.Error:
            return False
    if os.name == "nt":                     # without psutil: no portable check; assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(pid: int, on_exit: Callable[[], None], interval: float = 1.0) -> threading.Thread:
    """Start a daemon thread that calls `on_exit()` once process `pid` has gone. Raises ValueError
    when `pid` is not running now (the caller would be orphaned from the start)."""
    created = _creation_time(pid)
    if not alive(pid, created):
        raise ValueError("--parent-pid %d: no such process" % pid)

    def run():
        while alive(pid, created):
            time.sleep(interval)
        on_exit()

    thread = threading.Thread(target=run, name="synpo-parent-watch", daemon=True)
    thread.start()
    return thread


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on(names=("SIGTERM",)) -> Callable[[], None]:
    """From now on the signals `names` raise KeyboardInterrupt in the main thread, as Ctrl+C does (kill,
    a batch system's scancel, a closed terminal: the command stops as cleanly); returns the function that
    puts the previous handlers back. Outside the main thread (or where a signal does not exist) nothing
    changes, nor for a signal ignored already (`nohup synpo ...` ignores SIGHUP: a closed terminal must
    not end the run)."""
    ignored = [n for n in names if hasattr(signal, n) and signal.getsignal(getattr(signal, n)) is signal.SIG_IGN]
    return _handle([n for n in names if n not in ignored], _raise_interrupt)


def ignore_interrupts(names=("SIGINT", "SIGTERM")) -> Callable[[], None]:
    """From now on the signals `names` are ignored (a step that must finish, such as closing a cluster
    after the first Ctrl+C); returns the function that puts the previous handlers back."""
    return _handle(names, signal.SIG_IGN)


def _handle(names, handler) -> Callable[[], None]:
    previous = {}
    for name in names:
        if hasattr(signal, name):
            try:
                previous[name] = signal.signal(getattr(signal, name), handler)
            except ValueError:                # not the main thread
                pass

    def restore() -> None:
        for name, old in previous.items():
            if old is not None:                # (a handler set outside Python cannot be put back)
                signal.signal(getattr(signal, name), old)
    return restore
