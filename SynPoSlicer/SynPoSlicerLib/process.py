"""Starting and ending a child process tree the way Slicer needs it (Python 3.9, no Qt).

In Slicer the "Python" that starts the local server is `PythonSlicer`, CTK's app launcher
(commontk/AppLauncher, Base/ctkAppLauncher.cpp): it sets up the environment and runs the real
interpreter, `python-real`, as its own child (a QProcess) and waits for it; it forwards no signal.
Terminating the process we started therefore ends only the launcher and leaves the server running
with its models in memory. SlicerMONAIAuto3DSeg met the same (its process.py ends the tree with
psutil: "proc.kill() does not work, that would only stop the launcher"). So here:

- `start_options()`: POSIX: the child starts a new session, so the launcher and everything it starts
  share one process group that can be signalled as a whole. Windows: the console of the console
  program `PythonSlicer.exe` is hidden, as `slicer.util.launchConsoleProcess` does
  (Base/Python/slicer/util.py: STARTUPINFO with STARTF_USESHOWWINDOW and wShowWindow = SW_HIDE).
- `end_tree(proc)`: every descendant (psutil, listed before anything is signalled) and the
  process group, terminated, then killed after a grace period.
- The server also ends itself when the process that started it dies (`synpo serve --parent-pid`,
  synpo/lifeline.py): no orphan after Slicer crashes or is killed.
"""
import os
import signal
import subprocess
import time
from typing import Dict, List, Optional

SW_HIDE = 0
STARTF_USESHOWWINDOW = 1


def start_options(windows: Optional[bool] = None) -> Dict:
    """Keyword arguments for subprocess.Popen: a process group of its own (POSIX) or a hidden
    console window and a new process group (Windows)."""
    if windows is None:
        windows = os.name == "nt"
    if not windows:
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()                                   # type: ignore[attr-defined]
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"startupinfo": info, "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)}


def descendants(pid: int) -> List:
    """psutil.Process objects of every process below `pid` (empty without psutil or once it is gone)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def end_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End `proc` and everything it started (the launcher's `python-real` included): terminate,
    wait up to `grace` seconds, then kill what is left. Safe to call on a process already gone."""
    # Listed first: they are reparented once proc dies. Not once proc has been reaped: its pid may be
    # another process's by then (what it left is in its process group, signalled below).
    children = descendants(proc.pid) if proc.poll() is None else []
    if os.name == "nt" and not children and proc.poll() is None:
        # Without psutil on Windows: taskkill ends the tree (/T) at once (/F).
        subprocess.call(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, **start_options(True))
    group = _process_group(proc)
    _signal_all(proc, children, group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _any_alive(proc, children, group):
        time.sleep(0.05)
    if _any_alive(proc, children, group):
        _signal_all(proc, children, group, getattr(signal, "SIGKILL", signal.SIGTERM))
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _process_group(proc: subprocess.Popen) -> Optional[int]:
    """The child's own process group: started with start_new_session, its group id is its pid (known
    even after the launcher has exited and been reaped); never ours."""
    if os.name == "nt" or not hasattr(os, "killpg"):
        return None
    return proc.pid if proc.pid != os.getpgid(0) else None


def _signal_all(proc, children, group, sig) -> None:
    if group is not None:
        try:
            os.killpg(group, sig)
        except OSError:
            pass
    for child in children:
        try:
            child.send_signal(sig)
        except Exception:                            # psutil.NoSuchProcess, AccessDenied
            pass
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


def _any_alive(proc, children, group=None) -> bool:
    if proc.poll() is None:
        return True
    if group is not None:
        try:
            os.killpg(group, 0)              # some process of the group (python-real) is left
            return True
        except OSError:
            pass
    for child in children:
        try:
            if child.is_running() and child.status() != "zombie":
                return True
        except Exception:
            pass
    return False
