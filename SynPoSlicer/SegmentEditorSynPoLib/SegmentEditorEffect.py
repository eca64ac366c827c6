"""The "SynPo" Segment Editor effect: paint one slice where you already paint, Preview, Apply.

The same logic as the SynPo module's panel (SynPoSlicer.sharedLogic): the server, the preview
nodes, re-run and corrections, and the timer that drives a run (so a run goes on when the Segment
Editor calls deactivate(): the user switched effect or left the editor). Preview takes the same
first steps as the panel's (SynPoSlicer.prepareServer: Python version, packages). Apply writes into
the segmentation and segments the preview was made for, through this effect's own
`modifySegmentByLabelmap`, so the editor's masking settings hold and the editor's Ctrl+Z takes the
whole preview back. Written against Slicer 5.8/5.10's scripted effect API.

How Slicer loads this file (qSlicerSegmentEditorScriptedEffect::setPythonSource): the module name
is the folder's (SegmentEditorSynPoLib), the class is the file's name (+ "Effect" unless it ends
so), and the file is executed as that module. `clone()` must therefore name this file, whatever
`__file__` says after a developer-mode reload of the package (Testing/test_slicer_session.py).
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
        self.statusLabel = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(effectSource().replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons", "SynPoSlicer.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment the selected segment on every slice from the slice(s) you painted, with no "
                "training (SynPo).<p><b>Preview</b> shows the candidate, the confidence map and the prompt "
                "points; correct it by painting or erasing on the 'SynPo candidates' segmentation and press "
                "<b>Update</b>; <b>Apply</b> writes what the candidates show through the masking settings "
                "below, as one undo step; <b>Cancel</b> stops a run, and with no run discards the preview "
                "(nothing written). Server and model settings are in the SynPo module.</html>")

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

    def existingLogic(self):
        """The shared logic if something created it, else None: the Segment Editor widget sets up, shows
        and refreshes every registered effect's copy (qMRMLSegmentEditorWidget::updateEffectList calls
        setupOptionsFrame on each, EffectParameterModified reaches updateGUIFromMRML), SynPo unused
        or not; only the buttons create the logic."""
        import SynPoSlicer
        return SynPoSlicer.existingLogic()

    def activate(self):
        """The user chose SynPo (again): follow the shared logic's run, whichever effect started it."""
        logic = self.existingLogic()
        if logic is not None:
            logic.addListener(self.onLogicProgress)
        self.onLogicProgress()

    def deactivate(self):
        """Another effect or another module: stop showing progress here; the run goes on."""
        self.stopListening()

    def interactionNodeModified(self, interactionNode):
        """Stay active while the user places markups points (the prompt points 'SynPo positive' and
        'SynPo negative' are markups): qSlicerSegmentEditorScriptedEffect::interactionNodeModified calls
        this instead of the base, qSlicerSegmentEditorAbstractEffect::interactionNodeModified, which
        deselects the effect on any mode but ViewTransform to keep an effect that acts on clicks from
        clashing with placement. SynPo acts on no click in the views, so nothing clashes."""

    def cleanup(self):
        """The Segment Editor widget is destroyed (Slicer calls each effect's cleanup, at exit too)."""
        self.stopListening()

    def stopListening(self):
        """No progress shown here from now on; a logic that was never created is not created for it."""
        logic = self.existingLogic()
        if logic is not None:
            logic.removeListener(self.onLogicProgress)

    def updateGUIFromMRML(self):
        if not hasattr(self, "previewButton"):
            return
        logic = self.existingLogic()
        running = logic is not None and logic.active()
        has_preview = logic is not None and logic.preview is not None
        self.previewButton.enabled = not running
        self.updateButton.enabled = has_preview and not running
        self.applyButton.enabled = has_preview and not running
        self.cancelButton.enabled = running or has_preview

    def _inputs(self, logic):
        """(volume, segmentation, segment IDs) to preview: the editor's, or, while it shows the 'SynPo
        candidates' the user was correcting, the segments the current preview was made for (a new
        preview replaces the candidates: it cannot be painted on them)."""
        node = self.scriptedEffect.parameterSetNode()
        segmentation = node.GetSegmentationNode()
        if logic.preview is not None and segmentation is not None and segmentation is logic.preview.candidates:
            return logic.volumeNode, logic.segmentationNode, list(logic.segmentIds)
        volume = node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()
        segmentId = node.GetSelectedSegmentID()
        return volume, segmentation, [segmentId] if segmentId else []

    def onPreview(self):
        import SynPoSlicer
        logic = self.logic()
        if not SynPoSlicer.confirmDiscard(logic, replacing=True):       # a new preview replaces the edited one
            return
        with slicer.util.tryWithErrorDisplay("SynPo could not start the preview.", waitCursor=True):
            parameters = logic.getParameterNode()
            logic.setDefaultParameters(parameters)
            # The panel's first steps too: the Python version check and the dependency install.
            if not SynPoSlicer.prepareServer(logic, *SynPoSlicer.serverSettings(),
                                             features=parameters.GetParameter("Features")):
                return
            volume, segmentation, segmentIds = self._inputs(logic)
            logic.startPreview(volume, segmentation, segmentIds, parameters)
            logic.addListener(self.onLogicProgress)
        self.onLogicProgress()

    def onUpdate(self):
        logic = self.logic()
        with slicer.util.tryWithErrorDisplay("SynPo could not update the preview.", waitCursor=True):
            logic.startUpdate(logic.getParameterNode())
            logic.addListener(self.onLogicProgress)
        self.onLogicProgress()

    def onLogicProgress(self):
        """Called by the shared logic after each step of a run, and when this effect is shown again."""
        if self.statusLabel is not None:
            logic = self.existingLogic()
            self.statusLabel.text = logic.message if logic is not None else ""
        self.updateGUIFromMRML()

    def writeSegment(self, segmentationNode, segmentId, labelmap):
        """The editor's own write, masking settings included (qSlicerSegmentEditorAbstractEffect::
        modifySegmentByLabelmap). Its editable-area mask is built around the parameter node's selected
        segment (qMRMLSegmentEditorWidgetPrivate::updateMaskLabelmap, 5.10's UpdateMaskLabelmap):
        the segment written is selected first."""
        self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(segmentId)
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap,
                                                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def onApply(self):
        """One undo step of the Segment Editor, every previewed segment through its masking, into the
        segmentation the preview was made for (recorded at Preview), even when the editor shows the
        'SynPo candidates' the user was correcting: the editor is switched back to it first, so that
        its masking and its Ctrl+Z concern that segmentation."""
        logic = self.logic()
        with slicer.util.tryWithErrorDisplay("SynPo could not apply the preview.", waitCursor=True):
            if logic.preview is None:
                raise ValueError("Nothing to apply: run a preview first.")
            from SynPoSlicerLib.apply import check_writable
            node = self.scriptedEffect.parameterSetNode()
            target = logic.segmentationNode
            check_writable(target, logic.volumeNode, logic.segmentIds, node)
            selected = node.GetSelectedSegmentID()
            if node.GetSegmentationNode() is not target:
                # The widget then selects the first segment and sets the source volume to the
                # segmentation's reference geometry node, possibly none
                # (qMRMLSegmentEditorWidget::updateWidgetFromSegmentationNode): set both back.
                node.SetAndObserveSegmentationNode(target)
                selected = None
            node.SetAndObserveSourceVolumeNode(logic.volumeNode)
            check_writable(target, logic.volumeNode, logic.segmentIds, node)
            try:
                message = logic.apply(target, write=self.writeSegment,
                                      saveState=self.scriptedEffect.saveStateForUndo)
            finally:
                node.SetSelectedSegmentID(selected if selected else logic.segmentIds[0])
            if self.statusLabel is not None:
                self.statusLabel.text = message
        self.updateGUIFromMRML()

    def onCancel(self):
        """While a run goes on: stop it, as the panel's Cancel does (a cancelled Update keeps the
        preview it was correcting, the user's edits of the candidates included). With no run: discard
        the preview, after asking when the user edited the candidates (the edits would go with it)."""
        import SynPoSlicer
        logic = self.logic()
        if logic.active():
            logic.cancel()
            text = logic.message
        else:
            if not SynPoSlicer.confirmDiscard(logic):
                return
            logic.discard()
            text = "Discarded; nothing was written."
        if self.statusLabel is not None:
            self.statusLabel.text = text
        self.updateGUIFromMRML()


def effectSource():
    """This file's path, from the folder of `__file__`: after a developer-mode reload of the
    SegmentEditorSynPoLib package `__file__` names the package's __init__.py, and Slicer's loader
    would look for a class "__init__Effect" (qSlicerSegmentEditorScriptedEffect::setPythonSource)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegmentEditorEffect.py")
