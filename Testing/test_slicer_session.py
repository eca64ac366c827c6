"""How Slicer itself runs the module and the effect, reproduced mechanism by mechanism (issue 24).

Each test names the Slicer (or CTK) source whose behaviour it reproduces:
- the launcher: commontk/AppLauncher Base/ctkAppLauncher.cpp (ctkAppLauncherInternal::runProcess
  starts python-real with a QProcess, forwards no signal, exits when the child exits);
- the scripted-effect loader: Modules/Loadable/Segmentations/EditorEffects/
  qSlicerSegmentEditorScriptedEffect.cxx, setPythonSource (module = folder name, class = file
  name + "Effect"; the file executed as that module, qSlicerScriptedUtils::loadSourceAsModule);
- effect activation: Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx,
  updateEffectsSectionFromMRML (deactivate() on switching effect) and Modules/Scripted/
  SegmentEditor/SegmentEditor.py, SegmentEditorWidget.exit (setActiveEffect(None) on leaving);
- the effect's write in 5.10: qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap delegates
  to vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap with the editor's parameter node.
"""
import contextlib
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import psutil
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.join(HERE, "..", "SynPoSlicer")
sys.path.insert(0, MODULE_DIR)

import slicer  # noqa: E402  (slicer-core)

from test_slicer_logic import (_parameters, add_volume, install_module_stand_ins, run_job, scene_case,  # noqa: E402,F401
                               server)
from SynPoSlicerLib import mrml  # noqa: E402
from SynPoSlicerLib.engine import RemoteJob  # noqa: E402


# ------------------------------------------------------------------ the launcher
LAUNCHER = '''#!{python}
"""A stand-in for CTK's app launcher (PythonSlicer): runs the real interpreter as its child with
the same arguments, forwards no signal and installs no handler (SIGTERM ends it, not its child), exits
with the child's code."""
import subprocess, sys
child = subprocess.Popen([{python!r}] + sys.argv[1:])
while True:
    try:
        sys.exit(child.wait())
    except InterruptedError:
        pass
'''


@pytest.fixture
def launcher(tmp_path):
    path = tmp_path / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _wait_ready(proc, timeout=120):
    deadline = time.time() + timeout
    while not proc.ready():
        assert time.time() < deadline, proc.log_tail()
        time.sleep(0.2)


def _port_open(url):
    host, port = url.split("//")[1].rsplit(":", 1)
    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, int(port))) == 0


def _gone(pids, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_the_launcher_stand_in_keeps_the_server_when_only_it_is_terminated(launcher):
    """The mechanism the fix is for: terminating the launcher we started leaves python-real serving."""
    from SynPoSlicerLib.engine import ServerProcess
    from SynPoSlicerLib.process import end_tree
    proc = ServerProcess(launcher, device="cpu", features="sam").start()
    try:
        _wait_ready(proc)
        (real,) = psutil.Process(proc.proc.pid).children()
        proc.proc.terminate()                              # what stop() did before
        assert proc.proc.wait(10) == -signal.SIGTERM      # the launcher has no handler: it ends ...
        time.sleep(0.5)
        assert real.is_running() and _port_open(proc.url)  # ... and python-real, its child, serves on
        real.kill()
    finally:
        if proc.proc is not None:
            end_tree(proc.proc)
        proc.stop()                                        # its folder (token, log) too


def test_only_this_slicers_own_launcher_inherits_its_environment(monkeypatch, tmp_path):
    """'Python for the local server' set to another Slicer's PythonSlicer (a 5.10 beside this 5.8):
    chosen by its file name, it got this Slicer's environment, and CTK's launcher
    (ctkAppLauncherSettings, environment variables) puts its own paths before the inherited ones, so
    this Slicer's python3.9 site-packages and libraries stayed on its paths. Only the launcher that
    slicer.util._executePythonModule would run (shutil.which("PythonSlicer"), the one on Slicer's PATH)
    inherits os.environ; every other Python starts from slicer.util.startupEnvironment."""
    from SynPoSlicerLib.engine import base_environment
    own, other = tmp_path / "this" / "bin", tmp_path / "other" / "bin"
    for folder in (own, other):
        folder.mkdir(parents=True)
        (folder / "PythonSlicer").write_text("#!/bin/sh\n")
        (folder / "PythonSlicer").chmod(0o755)
    (tmp_path / "link").symlink_to(own / "PythonSlicer")
    monkeypatch.setenv("PATH", str(own) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYTHONPATH", "/opt/Slicer-5.8/lib/Python/lib/python3.9/site-packages")
    monkeypatch.setattr(slicer, "app", App(), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: {"AT_START": "1"}, raising=False)
    assert base_environment(str(own / "PythonSlicer"))["PYTHONPATH"].endswith("python3.9/site-packages")
    assert base_environment(str(tmp_path / "link")) == dict(os.environ)       # the same file
    for python in (str(other / "PythonSlicer"), sys.executable):
        assert base_environment(python) == {"AT_START": "1"}, python


def _environment_after_exec(pid, timeout=30.0):
    """The environment a just-started process runs with. Read between its fork and its exec,
    /proc/PID/environ is empty (psutil gives {}: CI saw it once, stop 62), so wait for the exec."""
    deadline = time.monotonic() + timeout
    while True:
        environment = psutil.Process(pid).environ()
        if environment or time.monotonic() > deadline:
            return environment
        time.sleep(0.05)


def test_the_cache_folder_setting_reaches_a_server_the_effect_starts(sandbox, scene_case, monkeypatch, tmp_path):
    """The panel never opened (the effect alone), a Python other than PythonSlicer for the server: it
    starts from slicer.util.startupEnvironment (Slicer's environment when it started, before the
    module set SYNPO_CACHE; qSlicerCoreApplication::startupEnvironment), yet gets the cache folder
    setting (it got ~/.cache/synpo and downloaded the weights there again)."""
    monkeypatch.delenv("SYNPO_CACHE", raising=False)
    at_start = dict(os.environ)
    monkeypatch.setattr(slicer, "app", App(), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(at_start), raising=False)
    folder = str(tmp_path / "models")
    Settings.values = {"SynPoSlicer/CacheFolder": folder, "SynPoSlicer/ServerPython": sys.executable}
    logic = _shared_logic(sandbox, scene_case)
    assert sandbox.prepareServer(logic, *sandbox.serverSettings(), features="sam")
    try:
        logic.serverReady(logic.getParameterNode())
        assert _environment_after_exec(logic.server.proc.pid).get("SYNPO_CACHE") == folder
        first = logic.server
        Settings.values["SynPoSlicer/CacheFolder"] = str(tmp_path / "elsewhere")
        logic.serverReady(logic.getParameterNode())          # another folder: another server
        assert logic.server is not first and not first.running()
        assert _environment_after_exec(logic.server.proc.pid).get("SYNPO_CACHE") == str(tmp_path / "elsewhere")
    finally:
        logic.stopServer()


FAILING_PYTHON = """#!{python}
import sys
with open({starts!r}, "a") as handle:
    handle.write("started\\n")
{body}
"""


def test_a_server_that_dies_while_starting_is_said_once_not_started_again(tmp_path):
    """A local server that exits before it is ready (here as `synpo serve --device cuda` exits where
    there is no CUDA): the preview fails with the server's own words (ServerProcess.ready), and the
    ticks that follow do not start it again (serverReady took its death for a crash after serving and
    started a new one on every tick: 13 servers in a minute, the page on "Starting the SynPo server").
    A server that dies after it has served is started again on the next preview, as before."""
    from synpo.errors import SynPoError
    from SynPoSlicerLib.logic import PARAMETERS, PreviewLogic
    params = type("P", (), {"GetParameter": lambda self, key: PARAMETERS[key]})()
    starts = tmp_path / "starts"

    def python(name, body):
        path = tmp_path / name
        path.write_text(FAILING_PYTHON.format(python=sys.executable, starts=str(starts), body=body))
        path.chmod(0o755)
        return str(path)

    logic = PreviewLogic()
    logic.useServer("", "", python("dies", 'print("synpo: error: --device cuda was asked for, but CUDA is not '
                                           'available here; use --device cpu")\nsys.exit(2)'))
    try:
        deadline = time.time() + 60

        def started():
            return starts.read_text().count("started") if starts.exists() else 0
        with pytest.raises(SynPoError, match=r"stopped while starting \(exit 2\).*CUDA is not available"):
            while not logic.serverReady(params):           # the module's timer ticks
                assert time.time() < deadline and started() <= 1, "started %d times" % started()
                time.sleep(0.05)
        assert started() == 1 and logic.server is None
        # The next preview tries again (the user may have fixed the cause): once.
        with pytest.raises(SynPoError, match="stopped while starting"):
            while not logic.serverReady(params):
                assert time.time() < deadline and started() <= 2, "started %d times" % started()
                time.sleep(0.05)
        assert started() == 2

        # One that serves, then dies: started again.
        starts.write_text("")
        serves = python("serves", 'import time\nready = sys.argv[sys.argv.index("--ready-file") + 1]\n'
                                  'open(ready, "w").write("http://127.0.0.1:9")\ntime.sleep(1.0)')
        logic.useServer("", "", serves)
        while not logic.serverReady(params):
            assert time.time() < deadline
            time.sleep(0.05)
        first = logic.server
        first.proc.wait(30)
        logic.serverReady(params)
        assert logic.server is not first and logic.server.running()
        while started() < 2:                                      # (the new one's first line)
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        logic.stopServer()


def test_a_server_that_never_answers_fails_the_preview_with_its_log(tmp_path, monkeypatch):
    """A local server that never becomes ready (an interpreter stuck importing torch, a GPU driver
    that never answers) showed "Starting the SynPo server..." until the user pressed Cancel. The
    module's timer ticks (poll -> step) now show the seconds it has taken and, once its log has been
    silent for SERVER_START_SECONDS, end it (its whole tree, its folder) with its log's last lines.
    One whose log grows (a model's first download printing its progress) is left to go on."""
    from SynPoSlicerLib import logic as logic_module
    from SynPoSlicerLib.logic import PARAMETERS, PreviewLogic
    params = type("P", (), {"GetParameter": lambda self, key: PARAMETERS[key]})()
    starts = tmp_path / "starts"
    hung = tmp_path / "hung"
    hung.write_text(FAILING_PYTHON.format(python=sys.executable, starts=str(starts), body=(
        'import time\nfor n in range(int(sys.argv[-1])):\n    print("downloading %d %%" % n, flush=True)\n'
        '    time.sleep(0.3)\nprint("importing torch", flush=True)\ntime.sleep(120)')))
    hung.chmod(0o755)
    monkeypatch.setattr(logic_module, "SERVER_START_SECONDS", 1.5)
    for lines in (0, 10):                                   # silent at once; 3 s of progress first
        logic = PreviewLogic()
        logic.useServer("", "", str(hung))
        monkeypatch.setattr(logic, "serverOptions", lambda p: dict(device="cpu", sam="litemedsam", features="sam",
                                                                   extra=[str(lines)]))
        try:
            logic.state, logic._pending = "starting", (None, None, params, "fingerprint")
            logic.poll()                                          # (a tick of the module's timer)
            assert logic.state == "starting" and logic.message == "Starting the SynPo server (0 s)..."
            server = logic.server
            pid, folder = server.proc.pid, server.folder
            deadline = time.time() + 30
            while logic.state == "starting":
                assert time.time() < deadline
                time.sleep(0.1)
                logic.poll()
            waited = time.monotonic() - server.started
            assert logic.state == "failed", logic.message
            assert "its log silent for 1 s" in logic.message and "importing torch" in logic.message
            assert (waited < 3.0) if lines == 0 else (waited > 4.0), waited
            assert logic.server is None and not os.path.exists(folder)
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        finally:
            logic.stopServer()


def test_a_python_that_cannot_start_leaves_no_token_and_a_relative_one_is_found(tmp_path, monkeypatch):
    """ServerProcess with a Python that is not there: the error said so, and its folder (the token)
    stayed behind, one per Preview. A Python given relative to the current folder was looked for in the
    server's own folder (Popen's cwd)."""
    import glob
    import tempfile
    from synpo.errors import SynPoError
    from SynPoSlicerLib.engine import ServerProcess
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SynPoError, match="cannot start the SynPo server with /nonexistent/python3"):
        ServerProcess("/nonexistent/python3").start()
    assert glob.glob(str(tmp_path / "synpo-server-*")) == []
    monkeypatch.chdir(os.path.dirname(sys.executable))
    proc = ServerProcess(os.path.join(".", os.path.basename(sys.executable)))
    try:
        assert proc.python == os.path.abspath(os.path.basename(sys.executable))
    finally:
        proc.stop()


def test_stop_ends_the_whole_tree_behind_a_launcher(launcher):
    from SynPoSlicerLib.engine import ServerProcess
    proc = ServerProcess(launcher, device="cpu", features="sam").start()
    _wait_ready(proc)
    pids = [proc.proc.pid] + [c.pid for c in psutil.Process(proc.proc.pid).children(recursive=True)]
    assert len(pids) == 2
    url = proc.url
    proc.stop()
    assert _gone(pids, 20) and not _port_open(url) and not proc.running()
    assert not os.path.exists(proc.folder)        # the token went with it


SLICER_STAND_IN = '''
import sys, time
sys.path.insert(0, {module_dir!r})
from SynPoSlicerLib.engine import ServerProcess
proc = ServerProcess({launcher!r}, device="cpu", features="sam").start()
while not proc.ready():
    time.sleep(0.2)
with open({out!r}, "w") as handle:
    handle.write("%s %d %s" % (proc.url, proc.proc.pid, proc.folder))
time.sleep(600)
'''


def test_no_server_is_left_when_slicer_is_killed(launcher, tmp_path):
    """Slicer (here a stand-in process that starts the server as the module does) SIGKILLed: the
    server notices (--parent-pid) and exits; the launcher exits with it; the server's folder (its
    token, ready file and log), which Slicer would have removed on a normal stop, goes with it
    (--owned-folder)."""
    out = tmp_path / "started"
    script = tmp_path / "slicer_stand_in.py"
    script.write_text(SLICER_STAND_IN.format(module_dir=os.path.abspath(MODULE_DIR), launcher=launcher, out=str(out)))
    slicer_proc = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 120
        while not out.exists() or not out.read_text():
            assert slicer_proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        url, launcher_pid, folder = out.read_text().split()
        assert os.path.isfile(os.path.join(folder, "token"))
        pids = [int(launcher_pid)] + [c.pid for c in psutil.Process(int(launcher_pid)).children(recursive=True)]
        assert len(pids) == 2 and _port_open(url)
        slicer_proc.kill()
        slicer_proc.wait(10)
        assert _gone(pids, 30), "the server outlived the process that started it"
        assert not _port_open(url)
        assert not os.path.exists(folder), "a dead server's token was left behind"
    finally:
        if slicer_proc.poll() is None:
            slicer_proc.kill()


def test_parent_pid_must_exist():
    from synpo.lifeline import alive, watch_parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert alive(os.getpid()) and not alive(dead.pid)
    with pytest.raises(ValueError, match="no such process"):
        watch_parent(dead.pid, lambda: None)


def test_windows_start_hides_the_console(monkeypatch):
    """slicer.util.launchConsoleProcess (Base/Python/slicer/util.py) hides PythonSlicer.exe's console
    with STARTUPINFO(dwFlags=STARTF_USESHOWWINDOW, wShowWindow=SW_HIDE); so does the server's start."""
    from SynPoSlicerLib.process import start_options

    class StartupInfo:
        dwFlags, wShowWindow = 0, 1
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = start_options(windows=True)
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0
    assert options["creationflags"] & 0x200                  # CREATE_NEW_PROCESS_GROUP
    assert start_options(windows=False) == {"start_new_session": True}


# ------------------------------------------------------------------ the module and the effect in a session
class FakeTimer:
    """qt.QTimer as the logic uses it; the test fires timeout() where Qt's event loop would."""

    def __init__(self):
        self.active, self.callback = False, None

    def setInterval(self, ms):
        pass

    def connect(self, signal_name, callback):
        self.callback = callback

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class Settings:
    values = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


class App:
    """slicer.app's signal connections to Python callables (PythonQt: connect / disconnect by signal
    and callable)."""

    def __init__(self):
        self.connections = []

    def connect(self, signal_name, callback):
        self.connections.append((signal_name, callback))

    def disconnect(self, signal_name, callback):
        self.connections.remove((signal_name, callback))

    def emit(self, signal_name):
        """Qt calls a signal's slots in the order they were connected."""
        for name, callback in list(self.connections):
            if name == signal_name:
                callback()


@pytest.fixture
def sandbox(monkeypatch):
    """Stand-ins for what slicer-core lacks (Qt, the scripted-module base classes, the Segment Editor
    effects package), and sys.modules restored afterwards (reloads must not leak into other tests)."""
    saved = dict(sys.modules)
    Settings.values = {}
    monkeypatch.setattr(slicer, "_synpoSharedLogic", [], raising=False)   # each test's own shared logic
    install_module_stand_ins(monkeypatch, Settings, FakeTimer)

    @contextlib.contextmanager
    def raising(message, waitCursor=False):               # errors reach the test instead of a dialog
        yield
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", raising, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect",
                        types.SimpleNamespace(ModificationModeSet=0), raising=False)
    effects = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", effects)
    pythonqt = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    pythonqt.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    monkeypatch.setitem(sys.modules, "qSlicerSegmentationsEditorEffectsPythonQt", pythonqt)
    spec = importlib.util.spec_from_file_location("SynPoSlicer", os.path.join(MODULE_DIR, "SynPoSlicer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["SynPoSlicer"] = module                     # what the effect's `import SynPoSlicer` finds
    spec.loader.exec_module(module)
    yield module
    for name in list(sys.modules):
        if name not in saved:
            del sys.modules[name]
    sys.modules.update(saved)


def load_scripted_effect(path):
    """qSlicerSegmentEditorScriptedEffect::setPythonSource: the module name is the folder's, the class
    the file's base name (+ "Effect" unless it ends so); PyImport_AddModule(module) and, if that module
    has no such class yet, the file is executed as that module (loadSourceAsModule -> load_source)."""
    module_name = os.path.basename(os.path.dirname(path))
    class_name = os.path.basename(path).split(".")[0]
    if not class_name.endswith("Effect"):
        class_name += "Effect"
    if not path.endswith((".py", ".pyc")):
        return None
    module = sys.modules.get(module_name)
    if module is None or not hasattr(module, class_name):
        spec = importlib.util.spec_from_file_location(module_name, path)
        fresh = importlib.util.module_from_spec(spec)
        if module is not None:                            # load_source re-executes in the existing module
            fresh = module
            fresh.__file__ = path
        sys.modules[module_name] = fresh
        spec.loader.exec_module(fresh)
        module = fresh
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise RuntimeError("Failed to load segment editor scripted effect: class %s was not found in %s"
                           % (class_name, path))
    return cls


class ScriptedEffect:
    """qSlicerSegmentEditorScriptedEffect: setPythonSource instantiates the Python class with itself;
    in Slicer 5.10 its modifySegmentByLabelmap and saveStateForUndo go to the Segment Editor logic on
    the editor's parameter node (set with `editor`)."""
    editor = None

    def __init__(self, parent=None):
        self.python = None

    def setPythonSource(self, path):
        self.python = load_scripted_effect(path)(self)
        return True

    def self(self):
        return self.python

    def parameterSetNode(self):
        return self.editor.GetSegmentEditorNode()

    def saveStateForUndo(self):
        self.editor.SaveStateForUndo()

    def interactionNodeModified(self, interactionNode):
        """qSlicerSegmentEditorScriptedEffect::interactionNodeModified: the Python method if the effect
        has one (the base is not called); else qSlicerSegmentEditorAbstractEffect::interactionNodeModified,
        which deselects the effect (selectEffect("")) in any mode but ViewTransform."""
        method = getattr(self.python, "interactionNodeModified", None)
        if method is not None:
            method(interactionNode)
        elif interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            self.deselected = True

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap, mode):
        self.editor.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, self.editor.ModificationModeSet,
                                            False, False)


EFFECT_FILE = os.path.join(os.path.abspath(MODULE_DIR), "SegmentEditorSynPoLib", "SegmentEditorEffect.py")


def test_the_effect_still_clones_after_a_developer_mode_reload(sandbox):
    effect = ScriptedEffect()
    assert effect.setPythonSource(EFFECT_FILE)              # registerEditorEffect
    assert type(effect.self().clone().self()).__name__ == "SegmentEditorEffect"
    # Developer mode: the panel's setup drops the helper modules; the effect's module is Slicer's.
    effect_module = sys.modules["SegmentEditorSynPoLib"]
    sandbox.reloadHelpers()
    assert sys.modules["SegmentEditorSynPoLib"] is effect_module
    # Even a reload of the package itself (what the old reloadHelpers did) leaves it clonable:
    importlib.reload(sys.modules["SegmentEditorSynPoLib"])
    assert sys.modules["SegmentEditorSynPoLib"].__file__.endswith("__init__.py")
    clone = effect.self().clone()
    assert type(clone.self()).__name__ == "SegmentEditorEffect"


def test_the_effects_cleanup_at_exit_creates_no_logic_when_synpo_was_never_used(sandbox, monkeypatch):
    """Slicer's Segment Editor widget calls each registered effect's cleanup() when it is destroyed, at
    exit too (Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx,
    qMRMLSegmentEditorWidgetPrivate's destructor), and deactivate() on leaving the editor:
    with SynPo never used, neither creates the shared logic (its aboutToQuit connection and scene
    observer) just to remove a listener; once one exists, they stop its progress reaching the effect."""
    app, scene = App(), slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    qt = sys.modules["qt"]

    class Widget:
        def __init__(self, text=""):
            self.text, self.enabled, self.wordWrap = text, True, False

        def connect(self, signal, slot):
            pass

    class Layout:
        def addWidget(self, widget):
            pass
    for name, cls in (("QPushButton", Widget), ("QLabel", Widget), ("QHBoxLayout", Layout)):
        monkeypatch.setattr(qt, name, cls, raising=False)
    monkeypatch.setattr(ScriptedEffect, "addOptionsWidget", lambda self, widget: None, raising=False)
    registered = ScriptedEffect()
    registered.setPythonSource(EFFECT_FILE)                # registerEditorEffect
    # Opening the Segment Editor: qMRMLSegmentEditorWidget::updateEffectList copies every registered
    # effect (qSlicerSegmentEditorEffectFactory::copyEffects -> clone()) and sets each copy up
    # (setupOptionsFrame, which refreshes its buttons); EffectParameterModified reaches updateGUIFromMRML.
    effect = registered.self().clone()
    effect.self().setupOptionsFrame()
    effect.self().updateGUIFromMRML()
    effect.self().activate()                                # chosen, not used: no run to follow
    effect.self().deactivate()
    effect.self().cleanup()
    assert sandbox.existingLogic() is None and app.connections == [] and not scene.HasObserver(scene.StartCloseEvent)
    assert effect.self().previewButton.enabled and not effect.self().applyButton.enabled
    logic = sandbox.sharedLogic()
    effect.self().activate()
    assert effect.self().onLogicProgress in logic._listeners
    effect.self().cleanup()
    assert effect.self().onLogicProgress not in logic._listeners and sandbox.existingLogic() is logic
    sandbox.retireLogic(logic)


def test_developer_reload_gives_one_exception_class_and_stops_the_old_server(sandbox, monkeypatch):
    """slicer.util.reloadScriptedModule re-executes SynPoSlicer.py under the same module name
    (imp.load_module): reproduced by executing the file again in the module's namespace. The old
    logic's aboutToQuit connection and scene observer go with it (each Reload added one more)."""
    import SynPoSlicerLib.engine  # noqa: F401  (loaded before the reload, as in a running Slicer)
    import synpo.client  # noqa: F401
    app, scene = App(), slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    stopped = []
    old = sandbox.sharedLogic()
    assert len(app.connections) == 1 and scene.HasObserver(scene.StartCloseEvent)
    old.stopServer = lambda: stopped.append("server")
    spec = importlib.util.spec_from_file_location("SynPoSlicer", os.path.join(MODULE_DIR, "SynPoSlicer.py"))
    spec.loader.exec_module(sandbox)                        # the Reload button
    assert stopped == ["server"] and app.connections == [] and not scene.HasObserver(scene.StartCloseEvent)
    assert sandbox.sharedLogic() is not old and len(app.connections) == 1
    from SynPoSlicerLib import engine
    from synpo import client, errors
    assert engine.ServerError is client.ServerError
    assert issubclass(engine.ServerError, errors.SynPoError)
    assert sys.modules["SynPoSlicerLib.logic"].PreviewLogic in type(sandbox.sharedLogic()).__mro__
    sandbox.retireLogic(sandbox.sharedLogic())
    assert app.connections == [] and not scene.HasObserver(scene.StartCloseEvent)


def _editor_logic(c, segmentation):
    node = slicer.vtkMRMLSegmentEditorNode()               # not registered with the scene's factory
    node.SetSingletonTag("SegmentEditor")
    node = c["scene"].AddNode(node)
    node.SetAndObserveSegmentationNode(segmentation)
    node.SetAndObserveSourceVolumeNode(c["volume"])
    node.SetSelectedSegmentID(c["target"])
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(c["scene"])
    logic.SetSegmentEditorNode(node)
    return logic


def _shared_logic(module, c):
    """The shared logic, its parameter node in the test's scene (ScriptedLoadableModuleLogic.
    getParameterNode keeps it in slicer.mrmlScene, which slicer-core does not have)."""
    logic = module.sharedLogic()
    params = _parameters(logic, c["scene"])
    logic.getParameterNode = lambda: params
    return logic


def _drive(logic, until, timeout=300):
    """Qt's event loop: the logic's timer fires while it is active."""
    deadline = time.time() + timeout
    while logic._timer is not None and logic._timer.active and not until():
        logic._timer.callback()
        time.sleep(0.05)
        assert time.time() < deadline, logic.message


def _effect_with_server(module, c, server):
    """The SynPo effect as Slicer registers it, on an editor showing the test's segmentation, the panel's
    settings naming `server`; returns (the effect's Python object, the shared logic)."""
    Settings.values = {"SynPoSlicer/ServerURL": server.url, "SynPoSlicer/TokenFile": server.token_file}
    ScriptedEffect.editor = _editor_logic(c, c["seg"])
    effect = ScriptedEffect()
    effect.setPythonSource(EFFECT_FILE)
    return effect.self(), _shared_logic(module, c)


def test_a_run_survives_deactivate_and_apply_writes_the_previewed_segmentation(sandbox, scene_case, server):
    c = scene_case
    python, logic = _effect_with_server(sandbox, c, server)
    python.activate()
    python.onPreview()
    assert logic.active() and logic._timer.active
    _drive(logic, lambda: logic.job is not None and logic.job.state == "running")
    python.deactivate()                                    # the user picks Paint, or leaves the editor
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed", logic.message
    python.activate()                                      # back to SynPo
    # The user corrected the candidates in the editor: the editor now shows that segmentation.
    ScriptedEffect.editor.GetSegmentEditorNode().SetAndObserveSegmentationNode(logic.preview.candidates)
    before = mrml.segment_array(c["seg"], c["target"], c["volume"])
    labels = logic.preview.labels.copy()
    python.onApply()
    after = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    assert np.array_equal(after, labels == 1) and not np.array_equal(after, before.astype(bool))
    assert logic.preview is None and mrml.temporary_nodes(c["scene"]) == []
    assert ScriptedEffect.editor.GetSegmentEditorNode().GetSegmentationNode() is c["seg"]
    ScriptedEffect.editor.Undo()                           # one step takes the whole preview back
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]), before)


def _running_effect(module, c, server, offset):
    """The SynPo effect's Preview of a volume the server has not embedded yet (`offset` added to the
    test's image), driven until it runs there: (the effect's Python object, the shared logic)."""
    python, logic = _effect_with_server(module, c, server)
    other = add_volume(c["scene"], c["image"] + offset, c["matrix"], "not embedded yet")
    ScriptedEffect.editor.GetSegmentEditorNode().SetAndObserveSourceVolumeNode(other)
    python.activate()
    python.onPreview()
    _drive(logic, lambda: logic.job is not None and logic.job.state == "running")
    return python, logic


def test_cancel_after_deactivate_ends_the_run_on_the_server(sandbox, scene_case, server):
    c = scene_case
    python, logic = _running_effect(sandbox, c, server, 7.0)
    python.deactivate()
    sid, rid = logic.job.session_id, logic.job.run_id
    python.activate()
    python.onCancel()
    assert server.client().wait(sid, rid)["state"] == "cancelled"
    assert not logic.active() and mrml.temporary_nodes(c["scene"]) == []


def _previewed_effect(module, c, server):
    """The SynPo effect's Preview, run to its end: (the effect's Python object, the shared logic)."""
    python, logic = _effect_with_server(module, c, server)
    python.statusLabel = types.SimpleNamespace(text="")
    python.activate()
    python.onPreview()
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed", logic.message
    return python, logic


def _edit_candidates(logic, c):
    """The user erases the candidate on one slice (not the painted one) of 'SynPo candidates' in the
    Segment Editor: (that slice, the candidates now)."""
    erase = next(t for t in range(len(logic.preview.labels)) if t != 4 and (logic.preview.labels[t] == 1).any())
    edited = (logic.preview.labels == 1).astype(np.uint8)
    edited[erase] = 0
    mrml.write_labels(logic.preview.candidates, c["volume"], edited, {1: "target"}, {1: logic.preview.candidate_ids[1]})
    return erase, edited


def test_apply_writes_the_candidates_as_edited_even_without_update(sandbox, scene_case, server):
    """Paint or erase on the candidates, then Apply without Update: the edit is written as drawn (it
    was dropped: Apply wrote the engine's labels and then removed the edited candidates)."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    erase, edited = _edit_candidates(logic, c)
    assert logic.editedSlices() == 1
    python.onApply()
    after = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    assert not after[erase].any() and np.array_equal(after, edited == 1)
    assert "edits of the candidates on 1 slice(s)" in python.statusLabel.text


def test_the_effects_cancel_stops_an_update_and_asks_before_discarding_edits(sandbox, scene_case, server,
                                                                              monkeypatch):
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    _edit_candidates(logic, c)
    python.onUpdate()
    assert logic.active()
    python.onCancel()                                      # during the Update: the run stops, nothing else
    assert not logic.active() and logic.preview is not None and logic.editedSlices() == 1
    answers = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kw: answers.append(text) or len(answers) > 1, raising=False)
    python.onCancel()                                      # no run: discarding the edits asks first; "Cancel"
    assert len(answers) == 1 and "1 slice(s)" in answers[0] and logic.preview is not None
    python.onCancel()                                      # "OK"
    assert logic.preview is None and mrml.temporary_nodes(c["scene"]) == []


def test_a_new_preview_asks_before_it_replaces_edited_candidates(sandbox, scene_case, server, monkeypatch):
    """Preview again after editing the candidates: the new preview would discard the shown one
    (logic.startPreview) and the edits with it, so the effect asks first (as Discard and Cancel do);
    "Cancel" keeps the preview and the edits, "OK" runs the new preview."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    erase, edited = _edit_candidates(logic, c)
    answers = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kw: answers.append(text) or len(answers) > 1, raising=False)
    python.onPreview()                                     # "Cancel": nothing starts, nothing is lost
    assert len(answers) == 1 and "1 slice(s)" in answers[0] and "new preview" in answers[0]
    assert not logic.active() and logic.editedSlices() == 1
    assert np.array_equal(mrml.segment_array(logic.preview.candidates, logic.preview.candidate_ids[1], c["volume"]),
                          edited)
    python.onPreview()                                     # "OK": the new preview runs
    assert len(answers) == 2
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed" and logic.editedSlices() == 0
    # Where the dialog mostly appears: the editor shows the 'SynPo candidates' the user corrects. The
    # new preview is of the segments the preview was made for (the candidates go with the old one).
    _edit_candidates(logic, c)
    node = ScriptedEffect.editor.GetSegmentEditorNode()
    node.SetAndObserveSegmentationNode(logic.preview.candidates)
    node.SetSelectedSegmentID(logic.preview.candidate_ids[1])
    python.onPreview()
    assert len(answers) == 3 and logic.active() and logic.segmentationNode is c["seg"]
    assert logic.segmentIds == [c["target"]]
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed" and logic.editedSlices() == 0, logic.message
    # The module's logic refuses a preview painted on the candidates, before anything is discarded.
    candidates = logic.preview.candidates
    with pytest.raises(ValueError, match="'SynPo candidates' holds the preview"):
        logic.startPreview(c["volume"], candidates, [logic.preview.candidate_ids[1]], logic.getParameterNode())
    assert logic.preview is not None and logic.preview.candidates is candidates and logic.state == "previewed"
    overlay = logic.preview.confidence                      # a scalar volume every volume selector lists
    with pytest.raises(ValueError, match="the preview's overlay"):
        logic.startPreview(overlay, c["seg"], [c["target"]], logic.getParameterNode())
    assert logic.preview is not None and logic.preview.confidence is overlay and overlay.GetScene() is not None


def test_removed_candidates_apply_refuses_and_cancel_discards(sandbox, scene_case, server, monkeypatch):
    """The user deleted the 'SynPo candidates' node: Apply says so and writes nothing (it cannot show
    what it would write); Cancel discards without asking (no edit is left to lose)."""
    from synpo.errors import InputError
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    before = mrml.segment_array(c["seg"], c["target"], c["volume"])
    c["scene"].RemoveNode(logic.preview.candidates)
    with pytest.raises(InputError, match="candidates' segmentation was removed"):
        python.onApply()
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]), before)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: pytest.fail(text), raising=False)
    python.onCancel()
    assert logic.preview is None and mrml.temporary_nodes(c["scene"]) == []


def test_the_effects_preview_takes_the_dependency_step(sandbox, scene_case, monkeypatch):
    c = scene_case
    asked = []
    monkeypatch.setattr(sandbox, "ensureDependencies", lambda optional=False: asked.append(optional) or False)
    ScriptedEffect.editor = _editor_logic(c, c["seg"])
    effect = ScriptedEffect()
    effect.setPythonSource(EFFECT_FILE)
    _shared_logic(sandbox, c)
    effect.self().onPreview()                              # no server configured: Slicer's own Python
    assert asked == [False] and sandbox.sharedLogic().state == "idle"


def test_two_previews_and_an_update_use_one_server_and_one_upload(sandbox, scene_case, launcher):
    """The local server as the module starts it (behind a launcher), kept for the session."""
    c = scene_case
    Settings.values = {"SynPoSlicer/ServerPython": launcher}
    logic = sandbox.sharedLogic()
    params = _parameters(logic, c["scene"])
    try:
        for attempt in range(2):
            assert sandbox.prepareServer(logic, *sandbox.serverSettings(), features="sam")
            logic.startPreview(c["volume"], c["seg"], [c["target"]], params)
            messages = []
            _drive(logic, lambda: messages.append(logic.message) or not logic.active(), timeout=400)
            assert logic.state == "previewed", logic.message
            assert any("embeddings reused" in m for m in messages) == (attempt == 1), messages
            if attempt == 0:
                first_server, first_pid = logic.server, logic.server.proc.pid
        assert logic.server is first_server and logic.server.proc.pid == first_pid
        # An update: erase the candidate on one slice -> that slice is marked absent.
        slices = [k for k in range(logic.preview.labels.shape[0]) if (logic.preview.labels[k] == 1).any() and k != 4]
        labels = logic.preview.labels.copy()
        labels[slices[0]] = 0
        sid = logic.preview.candidates.GetSegmentation().GetNthSegmentID(0)
        mrml.write_labels(logic.preview.candidates, c["volume"], labels.astype(np.uint8), {1: "target"}, {1: sid})
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.active())
        assert logic.state == "previewed", logic.message
        assert logic.server is first_server
        sessions = logic.client().json("GET", "/v1/sessions")
        assert len(sessions["sessions"]) == 1                 # one upload of the volume
        pids = [first_pid] + [p.pid for p in psutil.Process(first_pid).children(recursive=True)]
        # Other settings (another features choice) restart it, and the old tree is gone.
        params.SetParameter("Features", "auto")
        logic.startPreview(c["volume"], c["seg"], [c["target"]], params)
        _drive(logic, lambda: logic.server is not first_server, timeout=60)
        assert _gone(pids, 20)
    finally:
        logic.discard()
        logic.stopServer()


def _correct(logic, c, change):
    """The user edits 'SynPo candidates' (change(labels) on the target's candidate, uint8)."""
    labels = (logic.preview.labels == 1).astype(np.uint8)
    change(labels)
    sid = logic.preview.candidates.GetSegmentation().GetNthSegmentID(0)
    mrml.write_labels(logic.preview.candidates, c["volume"], labels, {1: "target"}, {1: sid})
    return labels


def test_an_update_whose_session_the_server_ended_sends_the_volume_again(sandbox, scene_case, server, monkeypatch):
    """The server ended the preview's session (idle past --session-ttl, evicted, restarted) while the user
    corrected: the Update failed with 'no longer holds this preview's volume', and the user's only way on was
    Preview again, which drops the corrections. Now the volume is sent again and SynPo runs once from the
    paint and every correction so far (an earlier Update's absent mark included), on the preview's axis."""
    c = scene_case
    logic = sandbox.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    import synpo.support
    merges = []
    merge = synpo.support.merge_corrections
    monkeypatch.setattr(synpo.support, "merge_corrections", lambda *a: merges.append(1) or merge(*a))
    try:
        assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed"
        present = [t for t in range(len(logic.preview.labels)) if (logic.preview.labels[t] == 1).any() and t != 4]
        erased, repainted = present[0], present[-1]
        _correct(logic, c, lambda labels: labels.__setitem__(erased, 0))
        logic.startUpdate(params)                          # on the session: the erased slice marked absent
        _drive(logic, lambda: not logic.active())
        assert logic.state == "previewed" and "no longer held" not in logic.message, logic.message
        assert not merges            # (an Update on the session merges nothing here: a CT's merge took 1 s)
        first = logic.job.session_id

        def repaint(labels):
            labels[repainted] = 0
            labels[repainted, 18:26, 24:36] = 1
        labels = _correct(logic, c, repaint)
        server.client().delete_session(first)              # the server ends it
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.active())
        assert logic.state == "previewed", logic.message
        assert "no longer held this preview's session" in logic.message and logic.job.session_id != first
        assert len(merges) == 2      # the two Updates' corrections, one at a time, as the session merged them
        result = logic.result
        assert result.support.axis == 0 and result.support.slices == {1: sorted([4, repainted])}
        assert np.array_equal(result.labels[repainted] == 1, labels[repainted] == 1)     # the correction
        assert next(r for r in result.records if r.index == erased).reason == "marked absent"   # the earlier one
        # The same as SynPo run on the server from that paint and that mark.
        paint = np.zeros(labels.shape, np.int32)
        paint[4] = c["paint"][4]
        paint[repainted] = labels[repainted]
        fresh = run_job(RemoteJob(server.client(timeout=10), mrml.volume_image(c["volume"]),
                                  mrml.spacing_ijk(c["volume"]), paint, absent={1: [erased]}))
        assert fresh.state == "done", fresh.error
        assert np.array_equal(fresh.result.labels, result.labels)
        # The next Update goes to the new session, without sending the volume again.
        again = logic.job.session_id
        _correct(logic, c, lambda labels: labels.__setitem__(present[1], 0))
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.active())
        assert logic.state == "previewed" and "no longer held" not in logic.message, logic.message
        assert logic.job.session_id == again and logic.job.add
        # The voxels changed since the preview (a filter run in place): not sent in the preview's stead.
        server.client().delete_session(again)
        voxels = slicer.util.arrayFromVolume(c["volume"])
        voxels += 1
        slicer.util.arrayFromVolumeModified(c["volume"])
        _correct(logic, c, lambda labels: labels.__setitem__(present[2], 0))
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.active())
        assert logic.state == "failed" and "the volume has changed since the preview" in logic.message, logic.message
    finally:
        logic.discard()


def test_an_update_after_the_local_server_died_starts_it_again(sandbox, scene_case, launcher):
    """The local server the module started has died since the preview (killed, out of memory): the Update
    failed with "cannot reach the SynPo server at http://127.0.0.1:PORT", a server the user never
    started. Now the Update starts it again and sends the volume again, from the paint and the corrections."""
    c = scene_case
    Settings.values = {"SynPoSlicer/ServerPython": launcher}
    logic = sandbox.sharedLogic()
    params = _parameters(logic, c["scene"])
    try:
        assert sandbox.prepareServer(logic, *sandbox.serverSettings(), features="sam")
        logic.startPreview(c["volume"], c["seg"], [c["target"]], params)
        _drive(logic, lambda: not logic.active(), timeout=400)
        assert logic.state == "previewed", logic.message
        first = logic.server.proc.pid
        tree = [first] + [p.pid for p in psutil.Process(first).children(recursive=True)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        assert _gone(tree, 20)
        erased = next(t for t in range(len(logic.preview.labels)) if (logic.preview.labels[t] == 1).any() and t != 4)
        _correct(logic, c, lambda labels: labels.__setitem__(erased, 0))
        logic.startUpdate(params)
        messages = []
        _drive(logic, lambda: messages.append(logic.message) or not logic.active(), timeout=400)
        assert logic.state == "previewed", logic.message
        assert any(m.startswith("Starting the SynPo server") for m in messages), messages
        assert "no longer held this preview's session" in logic.message and logic.server.proc.pid != first
        rec = next(r for r in logic.result.records if r.index == erased)
        assert rec.status == "absent" and rec.reason == "marked absent"
    finally:
        logic.discard()
        logic.stopServer()


def test_an_update_after_a_cancelled_resend_sends_the_volume_again(sandbox, scene_case, server):
    """The server ended the session; the Update's resend was cancelled once its volume was on the server
    (a new session, no run on it yet), or failed there. The next Update went to that session: 'nothing to
    add to' (409), read as a previous run winding down, so 60 s of 'waiting' and then a failure. It goes to
    the session whose run the candidates show, so it is sent again."""
    c = scene_case
    logic = sandbox.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    try:
        assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed"
        first = logic.job.session_id
        present = [t for t in range(len(logic.preview.labels)) if (logic.preview.labels[t] == 1).any() and t != 4]
        _correct(logic, c, lambda labels: labels.__setitem__(present[0], 0))
        server.client().delete_session(first)
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.job.add and logic.job.state in ("start", "running"))
        assert logic.job.session_id not in (None, first)
        logic.cancel()
        _drive(logic, lambda: not logic.settling())
        assert logic.state == "cancelled", logic.message
        start = time.time()
        logic.startUpdate(params)
        _drive(logic, lambda: not logic.active(), timeout=40)
        assert logic.state == "previewed", logic.message
        assert "no longer held this preview's session" in logic.message
        assert time.time() - start < 30
        assert next(r for r in logic.result.records if r.index == present[0]).reason == "marked absent"
    finally:
        logic.discard()


def test_apply_without_the_segment_editor_logic_of_5_10(sandbox, scene_case, server, monkeypatch):
    """Slicer 5.8 has no vtkSlicerSegmentEditorLogic: the panel's Apply writes through the
    segmentation node's own API. A target the user had hidden is shown, and the message says so."""
    c = scene_case
    logic = sandbox.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed"
    monkeypatch.delattr(slicer, "vtkSlicerSegmentEditorLogic")
    other_before = mrml.segment_array(c["seg"], c["other"], c["volume"])
    labels = logic.preview.labels.copy()
    c["seg"].CreateDefaultDisplayNodes()
    c["seg"].GetDisplayNode().SetSegmentVisibility(c["target"], False)      # the user hid the target
    message = logic.apply()
    assert "Applied to target" in message and "target was hidden: shown now." in message
    assert c["seg"].GetDisplayNode().GetSegmentVisibility(c["target"])
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool), labels == 1)
    assert np.array_equal(mrml.segment_array(c["seg"], c["other"], c["volume"]), other_before)


def test_apply_refuses_where_slicer_would_write_nothing(sandbox, scene_case, server):
    c = scene_case
    logic = sandbox.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed"
    editor = _editor_logic(c, c["seg"])
    node = editor.GetSegmentEditorNode()
    # "Editable intensity range" excluding every voxel: Slicer writes nothing -> refused, preview kept.
    node.SetSourceVolumeIntensityMask(True)
    node.SetSourceVolumeIntensityMaskRange(1e6, 2e6)
    from synpo.errors import InputError
    with pytest.raises(InputError, match="wrote nothing"):
        logic.apply(editorLogic=editor)
    assert logic.preview is not None
    node.SetSourceVolumeIntensityMask(False)
    c["seg"].GetSegmentation().RemoveSegment(c["target"])
    with pytest.raises(InputError, match="no longer"):
        logic.apply(editorLogic=editor)
    assert logic.preview is not None
    logic.discard()


def test_apply_masks_around_the_segment_it_writes_not_the_one_selected(sandbox, scene_case, server):
    """The editable-area mask is built around the editor node's selected segment
    (vtkSlicerSegmentEditorLogic::UpdateMaskLabelmap -> GenerateEditMask): with "outside all segments",
    writing the target while the user has another segment selected must still protect that one."""
    from test_slicer_logic import _finished_structure
    c = scene_case
    finished, done = _finished_structure(c)
    logic = sandbox.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed"
    labels = logic.preview.labels.copy()
    assert (done & (labels == 1)).any()
    editor = _editor_logic(c, c["seg"])
    node = editor.GetSegmentEditorNode()
    node.SetSelectedSegmentID(finished)                    # the user last worked on "finished"
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    logic.apply(editorLogic=editor)
    assert np.array_equal(mrml.segment_array(c["seg"], finished, c["volume"]).astype(bool), done)
    target = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    assert np.array_equal(target, (labels == 1) & ~done)


# ------------------------------------------------------------------ the user's scene changes under a preview

def _panel_preview(module, c, server):
    """The panel's Preview through `server`, run to its end: (the shared logic, its parameter node)."""
    logic = module.sharedLogic()
    logic.useServer(server.url, server.token_file)
    params = _parameters(logic, c["scene"])
    assert logic.process(c["volume"], c["seg"], [c["target"]], params, timeout=300) == "previewed", logic.message
    return logic, params


def test_a_volume_deleted_under_the_preview_is_said_by_apply_update_and_rerun(sandbox, scene_case, server):
    """The user deletes the scanned volume in the Data module (vtkMRMLScene::RemoveNode: the node
    object lives on, outside the scene) while the preview is shown, then presses Apply, Update or
    Re-run slice: one message each (they raised AttributeError on the missing scene), nothing changed."""
    from synpo.errors import InputError
    c = scene_case
    logic, params = _panel_preview(sandbox, c, server)
    labels = logic.preview.labels.copy()
    c["scene"].RemoveNode(c["volume"])
    for press in (logic.apply, lambda: logic.startUpdate(params), lambda: logic.rerunSlice(3, c["target"])):
        with pytest.raises(InputError, match="the volume this preview was made for has been removed"):
            press()
    assert np.array_equal(logic.preview.labels, labels) and logic.state == "previewed"
    logic.discard()


def test_rerun_slice_takes_no_points_from_a_markups_list_the_user_deleted(sandbox, scene_case, server):
    """The user deletes 'SynPo negative' (to drop the red points) and presses Re-run slice: the removed
    node's object still holds its control points; they are not sent to the decoder."""
    c = scene_case
    logic, _ = _panel_preview(sandbox, c, server)
    t = next(r.index for r in logic.result.records if len(r.negative) and len(r.positive))
    negative = logic.preview.negative
    c["scene"].RemoveNode(negative)
    assert negative.GetScene() is None and negative.GetNumberOfControlPoints() > 0
    sent = []

    def decode(pos, neg):
        sent.append((len(pos), len(neg)))
        return np.zeros(logic.preview.labels.shape[1:], bool)
    mrml.rerun_slice(logic.preview, c["volume"], logic.result.support.axis, t, 1, decode)
    assert len(sent) == 1 and sent[0][0] > 0 and sent[0][1] == 0
    logic.discard()


def test_rerun_slice_keeps_the_users_edits_on_the_other_slices(sandbox, scene_case, server, monkeypatch):
    """The user erases the candidate on one slice, then moves a point on another and presses Re-run
    slice: that slice is decoded again, and the erased slice stays erased (the whole segment was
    rewritten from the preview's labels, dropping the edit without a word); both are corrections that
    Update carries through the volume (the re-decoded slice was walked over again, its fix lost);
    Ctrl+Z in the Segment Editor showing the candidates takes back the Re-run only."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    editor = ScriptedEffect.editor
    editor.GetSegmentEditorNode().SetAndObserveSegmentationNode(logic.preview.candidates)
    monkeypatch.setattr(logic, "segmentEditorWidget", lambda: EditorWidget(editor))
    from synpo.errors import InputError
    first = logic.preview.labels == 1
    editor.SaveStateForUndo()                              # the Erase effect, before its stroke
    erase, edited = _edit_candidates(logic, c)
    t = next(r.index for r in logic.result.records if len(r.positive) and r.index != erase)
    axis = logic.result.support.axis

    def fails(pos, neg):
        raise InputError("the server said no")
    real = mrml.rerun_slice
    monkeypatch.setattr(mrml, "rerun_slice", lambda *args, **kw: real(*args[:5], fails, **kw))
    with pytest.raises(InputError):                        # a Re-run that fails changes nothing
        logic.rerunSlice(t, c["target"])
    assert np.array_equal(mrml.segment_array(logic.preview.candidates, logic.preview.candidate_ids[1], c["volume"]),
                          edited)
    new = np.zeros(logic.preview.labels.shape[1:], bool)
    new[:4, :4] = True                                     # the re-decoded slice: something else
    monkeypatch.setattr(mrml, "rerun_slice", lambda *args, **kw: real(*args[:5], lambda pos, neg: new, **kw))
    logic.rerunSlice(t, c["target"])
    candidates, sid = logic.preview.candidates, logic.preview.candidate_ids[1]
    shown = np.moveaxis(mrml.segment_array(candidates, sid, c["volume"]).astype(bool), axis, 0)
    assert not shown[erase].any(), "Re-run slice dropped the erased slice"
    assert np.array_equal(shown[t], new)
    expected = np.moveaxis(edited == 1, axis, 0).copy()
    expected[t] = new
    assert np.array_equal(shown, expected) and logic.editedSlices() == 2
    paint, absent = mrml.edited_slices(logic.preview, c["volume"], axis)
    assert absent == {1: [erase]} and np.array_equal(np.moveaxis(paint, axis, 0)[t] == 1, new)
    editor.Undo()                                          # Ctrl+Z: the Re-run only
    assert np.array_equal(mrml.segment_array(candidates, sid, c["volume"]), edited)
    editor.Undo()                                          # again: the erase
    assert np.array_equal(mrml.segment_array(candidates, sid, c["volume"]).astype(bool), first)
    logic.discard()


def test_a_closed_scene_or_an_ended_run_keeps_no_copy_of_the_volume(sandbox, scene_case, server):
    """File > Close Scene (StartCloseEvent -> onSceneClosed) before the server was reached: the copy
    of the volume made for the upload goes (it was held until the next preview: 8 bytes per voxel).
    A finished run's job keeps no copy either, and Discard lets go of the run's result."""
    c = scene_case
    logic = sandbox.sharedLogic()
    params = _parameters(logic, c["scene"])
    logic.startPreview(c["volume"], c["seg"], [c["target"]], params)
    assert logic._pending[0] is not None
    logic.onSceneClosed()
    assert logic._pending is None and logic.job is None
    logic, _ = _panel_preview(sandbox, scene_case, server)
    assert logic.job.image is None and logic.job.support is None and logic._pending[0] is None
    logic.discard()
    assert logic.result is None and logic.job is None


def test_update_keeps_the_candidates_node_the_segment_editor_shows(sandbox, scene_case, server):
    """The user corrects 'SynPo candidates' in the Segment Editor (its node shows that segmentation)
    and presses Update: the same node holds the updated candidates. A new node replacing it cleared
    the editor node's reference (vtkMRMLScene::RemoveNode removes references to a removed node), so
    qMRMLSegmentEditorWidget::updateWidgetFromMRML disabled the effects, SynPo's Apply included."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    _edit_candidates(logic, c)
    editor = ScriptedEffect.editor.GetSegmentEditorNode()
    candidates, ids = logic.preview.candidates, dict(logic.preview.candidate_ids)
    editor.SetAndObserveSegmentationNode(candidates)
    python.onUpdate()
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed", logic.message
    assert logic.preview.candidates is candidates and candidates.GetScene() is c["scene"]
    assert editor.GetSegmentationNode() is candidates and logic.preview.candidate_ids == ids
    shown = mrml.segment_array(candidates, ids[1], c["volume"]).astype(bool)
    assert np.array_equal(shown, logic.result.labels == 1) and logic.editedSlices() == 0
    assert len(mrml.temporary_nodes(c["scene"])) == 4          # the old overlay and points went
    logic.discard()
    assert mrml.temporary_nodes(c["scene"]) == []


class EditorWidget:
    """qMRMLSegmentEditorWidget of 5.10 (Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx):
    saveStateForUndo() calls its logic's SaveStateForUndo (vtkSlicerSegmentEditorLogic), which saves the
    state of the segmentation its parameter node shows."""

    def __init__(self, logic):
        self.logic = logic

    def mrmlSegmentEditorNode(self):
        return self.logic.GetSegmentEditorNode()

    def saveStateForUndo(self):
        self.logic.SaveStateForUndo()


def test_ctrl_z_after_an_update_gives_back_the_corrected_candidates(sandbox, scene_case, server, monkeypatch):
    """The user erases a slice of 'SynPo candidates' in the Segment Editor (Paint / Erase save the
    editor's undo state first), presses Update, then Ctrl+Z: the candidates as the user corrected them
    come back. The editor's history keeps the states saved before a change made outside it
    (vtkSegmentationHistory::OnSegmentationModified drops only the redo states), so Ctrl+Z brought
    back the first preview without the correction, under the Update's points and confidence."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    editor = ScriptedEffect.editor
    editor.GetSegmentEditorNode().SetAndObserveSegmentationNode(logic.preview.candidates)
    monkeypatch.setattr(logic, "segmentEditorWidget", lambda: EditorWidget(editor))
    first = logic.preview.labels.copy()
    editor.SaveStateForUndo()                              # the Erase effect, before its stroke
    erase, edited = _edit_candidates(logic, c)
    python.onUpdate()
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed", logic.message
    candidates, sid = logic.preview.candidates, logic.preview.candidate_ids[1]
    updated = logic.result.labels == 1
    assert np.array_equal(mrml.segment_array(candidates, sid, c["volume"]).astype(bool), updated)
    assert not np.array_equal(edited, first)               # (the erase changed something to get back)
    editor.Undo()                                          # Ctrl+Z
    shown = mrml.segment_array(candidates, sid, c["volume"]).astype(bool)
    assert np.array_equal(shown, edited == 1), "Ctrl+Z did not give back the corrected candidates"
    assert not shown[erase].any()
    editor.Undo()                                          # again: the first preview, as before the stroke
    assert np.array_equal(mrml.segment_array(candidates, sid, c["volume"]).astype(bool), first == 1)
    logic.discard()


def test_reloading_as_slicer_util_does_retires_the_previous_logic(sandbox, monkeypatch):
    """slicer.util.reloadScriptedModule (Base/Python/slicer/util.py, 5.10+: importlib.util.
    module_from_spec + exec_module, a new module object put in sys.modules) called from the Python
    console or a developer tool, without the panel's onReload: the new module's globals know nothing
    of the previous execution; the logic it left (server, preview, aboutToQuit connection, scene
    observer) is retired all the same, and the effect's `import SynPoSlicer` gets one new logic."""
    app, scene = App(), slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    old = sandbox.sharedLogic()
    stopped = []
    old.stopServer = lambda: stopped.append("server")
    old.startPolling()                                     # its timer was running (a run just cancelled)
    spec = importlib.util.spec_from_file_location("SynPoSlicer", os.path.join(MODULE_DIR, "SynPoSlicer.py"))
    fresh = importlib.util.module_from_spec(spec)
    sys.modules["SynPoSlicer"] = fresh
    spec.loader.exec_module(fresh)
    assert stopped == ["server"] and app.connections == [] and not scene.HasObserver(scene.StartCloseEvent)
    assert not old._timer.active
    new = sys.modules["SynPoSlicer"].sharedLogic()
    assert new is not old and len(app.connections) == 1 and sandbox.existingLogic() is new
    fresh.retireLogic(new)


def test_placing_a_prompt_point_leaves_the_effect_selected(sandbox):
    """The user clicks the Markups toolbar's place button to add a point to 'SynPo positive': the
    interaction node goes to Place mode and the Segment Editor tells the active effect
    (qMRMLSegmentEditorWidget observes the interaction node and calls interactionNodeModified). The
    base implementation deselects the effect; SynPo, which acts on no click, stays selected."""
    effect = ScriptedEffect()
    assert effect.setPythonSource(EFFECT_FILE)
    interaction = slicer.vtkMRMLInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.Place)
    effect.interactionNodeModified(interaction)
    assert not getattr(effect, "deselected", False)
    effect.python = types.SimpleNamespace()                  # an effect without the override is deselected
    effect.interactionNodeModified(interaction)
    assert effect.deselected


def test_quitting_slicer_cancels_a_run_on_a_team_server(sandbox, scene_case, server, monkeypatch):
    """The user quits Slicer while a preview runs on a SynPo server given by URL. Qt emits
    QCoreApplication::aboutToQuit and calls its slots in connection order: first Slicer's own
    (Base/QTCore/qSlicerCoreApplication.cxx, qSlicerCoreApplication::onAboutToQuit: unloadModules,
    the module widgets' cleanup(); Python is finalized only later, in ~qSlicerCoreApplicationPrivate),
    then the shared logic's. Nothing reads the run afterwards: it is cancelled on the server, not left
    running to its end there (holding one of the server's run slots, --max-runs, for other users)."""
    c = scene_case
    app = App()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    python, logic = _running_effect(sandbox, c, server, 9.0)
    sid, rid = logic.job.session_id, logic.job.run_id
    python.cleanup()                                       # Slicer's slot first: widgets cleaned up
    app.emit("aboutToQuit()")
    assert server.client().wait(sid, rid)["state"] == "cancelled"
    assert not logic._timer.active
    sandbox.retireLogic(logic)


def test_edits_made_while_an_update_runs_are_kept(sandbox, scene_case, server):
    """The user presses Update and, while it runs (Slicer stays usable: the run is stepped by a timer),
    erases the candidate on another slice: the Update's candidates keep that edit (they overwrote the
    whole candidates segmentation with the server's labels, dropping it without a word), and it counts
    as an edit of the updated preview (Update again carries it, Discard asks)."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    erase, edited = _edit_candidates(logic, c)
    python.onUpdate()
    assert logic.active()
    # What the Update keeps of the candidates it read: a digest of each slice, not the masks (13 segments
    # of a 512 x 512 x 300 CT held as bool arrays are 1 GB for the whole run)
    assert logic._sent and all(isinstance(d, list) and isinstance(d[0], bytes) for d in logic._sent[1].values())
    later = next(t for t in range(len(edited)) if t not in (erase, 4) and edited[t].any())
    during = edited.copy()
    during[later] = 0                                      # the user's stroke while the Update runs
    candidates, sid = logic.preview.candidates, logic.preview.candidate_ids[1]
    mrml.write_labels(candidates, c["volume"], during, {1: "target"}, {1: sid})
    _drive(logic, lambda: not logic.active())
    assert logic.state == "previewed", logic.message
    shown = mrml.segment_array(logic.preview.candidates, logic.preview.candidate_ids[1], c["volume"]).astype(bool)
    assert not shown[erase].any()
    assert not shown[later].any(), "the Update overwrote the edit made while it ran"
    assert logic.editedSlices() >= 1
    logic.discard()


def test_apply_keeps_what_the_user_painted_in_the_segment_after_the_preview(sandbox, scene_case, server):
    """After Preview the user paints more of the target in the segment itself (the segmentation the
    preview was made for, not the candidates), then presses Apply: that paint stays. Apply set the
    segment to the preview ("Set"), erasing the paint made since without a word."""
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    labels = logic.preview.labels.copy()
    now = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    extra = np.zeros_like(now)
    extra[1, 40:46, 50:58] = True                          # a stroke away from every candidate
    assert not (extra & (labels != 0)).any()
    mrml.write_labels(c["seg"], c["volume"], (now | extra).astype(np.uint8), {1: "target"}, {1: c["target"]})
    python.onApply()
    after = mrml.segment_array(c["seg"], c["target"], c["volume"]).astype(bool)
    assert after[extra].all(), "Apply erased the paint made in the segment since the preview"
    assert np.array_equal(after & ~extra, labels == 1)


def test_a_segment_the_user_added_to_the_candidates_is_not_dropped_without_a_word(sandbox, scene_case, server,
                                                                                 monkeypatch):
    """The Segment Editor shows 'SynPo candidates'; the user adds a segment there and paints it (taking
    it for their segmentation). Apply wrote the previewed segments only and removed the candidates with
    that segment in them, and Discard did not ask: the paint went without a word. Apply now refuses,
    naming the segment, and Discard asks."""
    from synpo.errors import InputError
    c = scene_case
    python, logic = _previewed_effect(sandbox, c, server)
    candidates = logic.preview.candidates
    extra = np.zeros(logic.preview.labels.shape, np.uint8)
    extra[2:4, 5:9, 5:9] = 1
    mrml.write_labels(candidates, c["volume"], extra, {1: "tumor"})
    before = mrml.segment_array(c["seg"], c["target"], c["volume"])
    with pytest.raises(InputError, match="tumor"):         # it went with the candidates, nowhere written
        python.onApply()
    with pytest.raises(InputError, match="'tumor', not a previewed segment; Update would not write it"):
        logic.startUpdate(logic.getParameterNode())
    assert logic.preview is not None and candidates.GetScene() is c["scene"]
    assert np.array_equal(mrml.segment_array(c["seg"], c["target"], c["volume"]), before)
    assert logic.editedSlices() == 2, "the added segment's paint is not counted"
    answers = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: answers.append(text) and False,
                        raising=False)
    python.onCancel()                                      # no run: Discard, asked first; "Cancel"
    assert len(answers) == 1 and logic.preview is not None
    logic.discard()
