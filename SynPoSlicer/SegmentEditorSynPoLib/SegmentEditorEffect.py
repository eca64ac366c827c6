"""The "SynPo" Segment Editor effect: paint one slice where you already paint, Preview, Apply.

The same logic as the SynPo module's panel (SynPoSlicer.sharedLogic): the server, the preview
nodes, re-run and corrections. Apply goes through this effect's own `modifySegmentByLabelmap`,
so the editor's masking settings hold and the editor's Ctrl+Z takes the whole preview back.
Written against Slicer 5.8/5.10's scripted effect API; verified only by reading Slicer's source
(no Slicer application runs where this extension is developed).
"""
import os

import qt
import slicer

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SynPo"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onPoll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons", "SynPoSlicer.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment the selected segment on every slice from the slice(s) you painted, with no "
                "training (SynPo).<p><b>Preview</b> shows the candidate, the confidence map and the prompt "
                "points; correct it by painting or erasing on the 'SynPo candidates' segmentation and press "
                "<b>Update</b>; <b>Apply</b> writes it through the masking settings below, as one undo step; "
                "<b>Cancel</b> leaves no trace. Server and model settings are in the SynPo module.</html>")

    def logic(self):
        import SynPoSlicer
        return SynPoSlicer.sharedLogic()

    def setupOptionsFrame(self):
        row = qt.QHBoxLayout()
        self.previewButton = qt.QPushButton("Preview")
        self.updateButton = qt.QPushButton("Update")
        self.applyButton = qt.QPushButton("Apply")
        self.cancelButton = qt.QPushButton("Cancel")
        for button in (self.previewButton, self.updateButton, self.applyButton, self.cancelButton):
            row.addWidget(button)
        self.scriptedEffect.addOptionsWidget(row)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.previewButton.connect("clicked()", self.onPreview)
        self.updateButton.connect("clicked()", self.onUpdate)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.updateGUIFromMRML()

    def deactivate(self):
        self.timer.stop()

    def updateGUIFromMRML(self):
        logic = self.logic()
        running = logic.active()
        has_preview = logic.preview is not None
        self.previewButton.enabled = not running
        self.updateButton.enabled = has_preview and not running
        self.applyButton.enabled = has_preview and not running
        self.cancelButton.enabled = running or has_preview

    def _inputs(self):
        node = self.scriptedEffect.parameterSetNode()
        volume = node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()
        return volume, node.GetSegmentationNode(), node.GetSelectedSegmentID()

    def onPreview(self):
        logic = self.logic()
        with slicer.util.tryWithErrorDisplay("SynPo could not start the preview.", waitCursor=True):
            settings = qt.QSettings()
            logic.useServer(settings.value("SynPoSlicer/ServerURL", ""), settings.value("SynPoSlicer/TokenFile", ""),
                            settings.value("SynPoSlicer/ServerPython", ""))
            volume, segmentation, segmentId = self._inputs()
            parameters = logic.getParameterNode()
            logic.setDefaultParameters(parameters)
            logic.startPreview(volume, segmentation, [segmentId] if segmentId else [], parameters)
            self.statusLabel.text = logic.message
            self.timer.start()
        self.updateGUIFromMRML()

    def onUpdate(self):
        logic = self.logic()
        with slicer.util.tryWithErrorDisplay("SynPo could not update the preview.", waitCursor=True):
            logic.startUpdate(logic.getParameterNode())
            self.statusLabel.text = logic.message
            self.timer.start()
        self.updateGUIFromMRML()

    def onPoll(self):
        logic = self.logic()
        logic.step()
        self.statusLabel.text = logic.message
        if not logic.active():
            self.timer.stop()
            self.updateGUIFromMRML()

    def onApply(self):
        """One undo step of the Segment Editor, every previewed segment through its masking."""
        from SynPoSlicerLib.apply import oriented_mask, volume_to_segmentation
        logic = self.logic()
        with slicer.util.tryWithErrorDisplay("SynPo could not apply the preview.", waitCursor=True):
            if logic.preview is None:
                raise ValueError("Nothing to apply: run a preview first.")
            _, segmentation, _ = self._inputs()
            matrix = volume_to_segmentation(logic.volumeNode, segmentation)
            self.scriptedEffect.saveStateForUndo()
            for value, segmentId in enumerate(logic.segmentIds, start=1):
                self.scriptedEffect.modifySegmentByLabelmap(
                    segmentation, segmentId, oriented_mask(logic.preview.labels == value, matrix),
                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
            logic.discard()
            self.statusLabel.text = "Applied; Ctrl+Z takes it back."
        self.updateGUIFromMRML()

    def onCancel(self):
        logic = self.logic()
        logic.cancel()
        logic.discard()
        self.statusLabel.text = "Cancelled; nothing was written."
        self.updateGUIFromMRML()
