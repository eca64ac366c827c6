"""The `synpo web` page: trame-slicer views of one MRML scene and the SynPo panel.

One scene per server process; one tab at a time drives it (tabs.py); its widgets are layout.py's,
an uploaded volume is checked and read by uploads.py. The workflow is SynPoSlicerLib.logic.PreviewLogic (the Slicer
module's own), stepped by an asyncio task instead of a Qt timer; the preview scene is built by
SynPoSlicerLib.mrml and Apply goes through SynPoSlicerLib.apply, as in Slicer.
"""
import asyncio
import os
import tempfile
import time

import numpy as np

from SynPoSlicerLib import apply as applying
from SynPoSlicerLib import mrml
from SynPoSlicerLib.logic import PreviewLogic
from synpo.errors import SynPoError

import slicer  # noqa: E402  (slicer-core)
from trame.app import TrameApp
from trame.app.file_upload import ClientFile
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectNoTool, SegmentationEffectPaint
from trame_slicer.views import SliceLayer

from .layout import build_ui
from .tabs import OneTabAtATime, owner_only
from .uploads import check_upload, read_upload, safe_name

STEP_SECONDS = 0.25          # between two requests of a running preview (the module's timer: 250 ms)


class WebLogic(PreviewLogic):
    """The module's workflow with the page's slice views; an asyncio task for a timer."""

    UNDO_HINT = "'Undo apply' takes it back until you paint, erase or add a segment; Save downloads the segmentation."

    def __init__(self, slicer_app, server_options, start_polling=None):
        PreviewLogic.__init__(self)
        self.slicer_app = slicer_app
        self.options = dict(server_options)
        self.start_polling = start_polling

    def startPolling(self):
        if self.start_polling is not None:
            self.start_polling()

    def serverOptions(self, parameterNode):
        return dict(self.options)

    def slice_views(self):
        return self.slicer_app.view_manager.get_slice_views()

    def showLayers(self, opacity):
        for view in self.slice_views():
            view.set_layer_volume_id(SliceLayer.Foreground, self.preview.confidence.GetID())
            view.set_foreground_opacity(opacity)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()                  # the points and candidates in the 3D view

    def sliceIndexInView(self):
        scene = self.slicer_app.scene
        return self.sliceIndexInViews([scene.GetNodeByID(view.get_view_node_id()) for view in self.slice_views()])

    def setOverlayOpacity(self, value):
        if self.preview is not None:
            for view in self.slice_views():
                view.set_foreground_opacity(value)


class SynPoWeb(OneTabAtATime, TrameApp):
    def __init__(self, server=None, max_upload_mb=512.0, server_options=None, remote=None):
        super().__init__(server)
        self.max_upload_mb = float(max_upload_mb)
        self.slicer_app = SlicerApp()
        mrml.register_segmentation_converters()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Axial Primary")
        self.logic = WebLogic(self.slicer_app, server_options or {}, self._start_runner)
        self.remote = tuple(remote) if remote else None
        if self.remote:
            self.logic.useServer(*self.remote)
        self.parameters = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SynPo web")
        self.logic.setDefaultParameters(self.parameters)
        for key, value in (server_options or {}).items():
            if key == "features":
                self.parameters.SetParameter("Features", value)
            if key == "sam":
                self.parameters.SetParameter("Model", value)
        self.volume = None
        self.geometry = None
        self.segmentation = None
        self.apply_logic = None
        self.correcting = False
        self._runner = None
        self._asked = None                # (action, edited slices, preview) the user was asked to confirm
        self._saved = None                # the segments' digest when loaded or last saved (_scene_may_go)
        self._saved_once = False
        self._init_tabs()
        self.preview_started = 0.0
        self._state_defaults()
        self.ui = build_ui(self)

    @property
    def scene(self):
        return self.slicer_app.scene

    @property
    def editor(self):
        return self.slicer_app.segmentation_editor

    # ------------------------------------------------------------------ state
    def _state_defaults(self):
        s = self.state
        s.message, s.error = "Load a volume: upload a NIfTI/NRRD file, or the bundled sample CT.", False
        s.has_volume = s.has_preview = s.running = s.can_undo = s.correcting = False
        s.progress = 0
        s.segments, s.selected_segments, s.active_segment = [], [], None
        s.tool, s.brush = "none", 15.0
        s.opacity = 0.5
        s.preview_seconds = 0.0
        s.upload = None

    def _say(self, text, error=False):
        self.state.message, self.state.error = text, bool(error)

    def _render(self):
        """Ask every view for a new frame (a scene change made outside the views' own events)."""
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _refresh(self):
        """The state the page shows, from the scene and the logic."""
        self._render()
        s = self.state
        s.has_volume = self.volume is not None
        s.has_preview = self.logic.preview is not None
        s.running = self.logic.active()
        done, total = self.logic.progress()
        s.progress = int(round(100.0 * done / max(total, 1))) if (s.running or s.has_preview) else 0
        s.can_undo = bool(self.apply_logic is not None and self.apply_logic.CanUndo())
        s.correcting = self.correcting
        if self.segmentation is not None:
            seg = self.segmentation.GetSegmentation()
            items = [{"title": seg.GetNthSegment(i).GetName(), "value": seg.GetNthSegmentID(i)}
                     for i in range(seg.GetNumberOfSegments())]
        else:
            items = []
        s.segments = items
        ids = [it["value"] for it in items]
        s.selected_segments = [x for x in (s.selected_segments or []) if x in ids]
        if s.active_segment not in ids and not self.correcting:
            s.active_segment = ids[-1] if ids else None

    def _edits_may_go(self, action):
        """True when nothing the user painted or erased on the candidates would be lost by `action`
        (a new preview, Discard, another volume), or when they asked for it a second time with the same
        edits (the page's form of the module's confirmDiscard question)."""
        edited = self.logic.editedSlices()
        if edited == 0 or (self._asked is not None and self._asked[:2] == (action, edited)
                           and self._asked[2] is self.logic.preview):
            self._asked = None
            return True
        self._asked = (action, edited, self.logic.preview)      # (this preview's edits: not an updated one's)
        self._say("Your edits of the candidates on %d slice(s) would be lost: Update carries them through the "
                  "volume, Apply writes them. %s again to discard them." % (edited, action), error=True)
        return False

    def _segments_digest(self, labels=None):
        """A digest of the segments as the page would save them (`labels`: label_map() when already
        made; None without a volume)."""
        import hashlib
        if self.segmentation is None or self.volume is None:
            return None
        seg = self.segmentation.GetSegmentation()
        names = "|".join(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments()))
        labels = self.label_map() if labels is None else labels
        return hashlib.sha1(names.encode("utf-8") + labels.tobytes()).hexdigest()

    def _scene_may_go(self, action):
        """`_edits_may_go` for an action that replaces the whole scene (Load sample, an upload): the
        segments painted or applied since the volume was loaded or last saved would go too (they went
        without a word: the final Apply lost to one click of Load sample), so they are asked about the
        same way."""
        digest = self._segments_digest()
        if digest is None or digest == self._saved:
            return self._edits_may_go(action)
        edited = self.logic.editedSlices()
        key = (action, edited, self.logic.preview, digest)
        if self._asked == key:
            self._asked = None
            return True
        self._asked = key
        lost = "The segments' changes since %s" % ("the last save" if self._saved_once else "loading")
        if edited:
            lost += " and your edits of the candidates on %d slice(s)" % edited
        self._say("%s would be lost (Save NIfTI or Save .seg.nrrd keeps the segments). %s again to discard "
                  "them." % (lost, action), error=True)
        return False

    def _loaded(self):
        """The segments as loaded are the user's starting point: nothing to ask about yet."""
        self._saved, self._saved_once = self._segments_digest(), False

    # ------------------------------------------------------------------ loading
    def _clear(self):
        if self.logic.active():
            self.logic.cancel()
        self.logic.onSceneClosed()
        for node in ([self.segmentation, self.volume] + mrml.temporary_nodes(self.scene)):
            if node is not None and node.GetScene() is not None:
                mrml._remove(self.scene, node)
        self.volume = self.segmentation = self.geometry = self.apply_logic = None
        self.correcting = False
        self._no_tool()

    def _show_volume(self, image, geometry, name):
        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(volume, image)
        mrml._set_ijk_to_ras(volume, mrml.geometry_ijk_to_ras(geometry))
        volume.CreateDefaultDisplayNodes()
        segmentation = self.editor.create_empty_segmentation_node()
        segmentation.SetName("Segmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        self.volume, self.geometry, self.segmentation = volume, geometry, segmentation
        self.slicer_app.display_manager.show_volume_in_slice_background(volume)
        self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
        self.slicer_app.display_manager.set_node_visible_in_group(volume)
        self.slicer_app.display_manager.reset_views()

    def _activate_segmentation(self, node):
        """The editor edits `node` now, on the segment the page shows as chosen (trame-slicer's
        SegmentationEditor.set_active_segmentation makes the first segment active: after Apply or Update,
        paint went into segment 1 while the page showed another)."""
        self.editor.set_active_segmentation(node, self.volume)
        self._edit_segment(self.state.active_segment)

    def _edit_segment(self, sid):
        """The editor paints into the page's segment `sid`: itself in the user's segmentation, its
        candidates while correcting a preview (None when it has none)."""
        if self.correcting and self.logic.preview is not None:
            ids, node = list(self.logic.segmentIds), self.logic.preview.candidates
            target = self.logic.preview.candidate_ids.get(ids.index(sid) + 1) if sid in ids else None
        else:
            target, node = sid, self.segmentation
        if not target or node is None or node.GetSegmentation().GetSegment(target) is None:
            return None                      # (another volume's segment: the editor keeps its first)
        self.editor.set_active_segment_id(target)
        return target

    def _show_slice(self, k):
        """The axial view at slice k of the volume (the painted slice after loading the sample)."""
        ras = mrml.points_ijk_to_ras(self.volume, [[0.0, 0.0, float(k)]])[0]
        for view in self.slicer_app.view_manager.get_slice_views():
            if view.get_orientation() == "Axial":
                view.set_slice_value(float(ras[2]))

    @owner_only
    def load_sample(self):
        from synpo import demo
        from synpo.io import read_volume
        if not self._scene_may_go("Load sample"):
            return
        self._clear()
        image, geometry = read_volume(demo.SAMPLE_IMAGE, "sample image")
        support, _ = read_volume(demo.SAMPLE_SUPPORT, "sample support", label=True)
        self._show_volume(image, geometry, "SynPo sample CT")
        self.volume.GetDisplayNode().SetAutoWindowLevel(False)
        self.volume.GetDisplayNode().SetWindowLevel(400, 40)
        ids = mrml.write_labels(self.segmentation, self.volume, (support != 0).astype(np.uint8), {1: "liver"})
        self.segmentation.GetSegmentation().GetSegment(ids[1]).SetColor(0.9, 0.35, 0.3)     # always the same
        self._activate_segmentation(self.segmentation)
        painted = np.flatnonzero((support != 0).reshape(len(support), -1).any(1))
        if len(painted):
            self._show_slice(int(painted[0]))
        self._refresh()
        self._loaded()
        self.state.selected_segments = [it["value"] for it in self.state.segments]
        self._say("Sample CT loaded with the liver painted on one slice. Add a segment and paint it on this "
                  "slice if you like, then Preview.")

    @owner_only
    def load_upload(self, files):
        """An uploaded volume (one file). Anything wrong: one message; the page keeps working."""
        try:
            if not files:
                return
            upload = ClientFile(files[0] if isinstance(files, list) else files)
            name = safe_name(upload.name)
            check_upload(name, len(upload.content or b""), self.max_upload_mb)
            if not self._scene_may_go("Upload the volume"):      # asked before the file is read
                return
            image, geometry, placement = read_upload(upload.content, name, self.max_upload_mb)
            self._clear()
            self._show_volume(image, geometry, os.path.splitext(name)[0])
            self._activate_segmentation(self.segmentation)
            self._refresh()
            self._loaded()
            self._say("%s loaded (%s voxels). Add a segment and paint the target on one slice, then Preview.%s"
                      % (name, " x ".join(str(n) for n in image.shape[::-1]),
                         "\nNote: %s." % placement if placement else ""))
        except SynPoError as exc:
            self._say(str(exc), error=True)
        finally:
            self.state.upload = None
            self.state.dirty("upload")            # the client set it: clear the field there too

    # ------------------------------------------------------------------ segments and tools
    @owner_only
    def add_segment(self):
        if self.segmentation is None:
            return self._say("Load a volume first.", error=True)
        self.stop_correcting()
        self._forget_apply()
        seg = self.segmentation.GetSegmentation()
        n = seg.GetNumberOfSegments() + 1
        sid = seg.AddEmptySegment("", "segment %d" % n)
        self._activate_segmentation(self.segmentation)
        self.editor.set_active_segment_id(sid)
        self._refresh()
        self.state.active_segment = sid
        self.state.selected_segments = list(self.state.selected_segments or []) + [sid]
        self.set_tool("paint")
        self._say("Paint segment %d on one slice (drag in the axial view; the wheel changes slice)." % n)

    @owner_only
    def set_active_segment(self, sid):
        """The segment chosen on the page; while correcting, one of the previewed segments (its
        candidates are painted)."""
        if not sid or self.segmentation is None:
            return
        if self.correcting and self._edit_segment(sid) is None:
            self._say("While correcting, choose one of the previewed segments (%s)."
                      % ", ".join(self.logic.segmentNames), error=True)
            edited = self.editor.active_segment_id           # the page shows the segment still painted
            for label, cid in self.logic.preview.candidate_ids.items():
                if cid == edited and label <= len(self.logic.segmentIds):
                    self.state.active_segment = self.logic.segmentIds[label - 1]
            return
        if not self.correcting:
            self.editor.set_active_segment_id(sid)

    @owner_only
    def set_tool(self, tool):
        effect = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}.get(tool)
        if effect is None or self.volume is None:
            return self._no_tool()
        if not self.correcting:
            self._forget_apply()
        active = self.editor.set_active_effect_type(effect)
        if active is not None:
            from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode
            active.set_brush_diameter(float(self.state.brush), BrushDiameterMode.Absolute)
        self.state.tool = tool

    @owner_only
    def set_brush(self, value):
        effect = self.editor.active_effect
        if effect is not None and hasattr(effect, "set_brush_diameter"):
            from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode
            effect.set_brush_diameter(float(value), BrushDiameterMode.Absolute)

    # ------------------------------------------------------------------ preview
    @owner_only
    def preview(self):
        if not self._edits_may_go("Preview"):
            return
        try:
            self.stop_correcting()
            ids = list(self.state.selected_segments or [])
            if self.remote:                   # the token read again, as the module's every Preview does
                self.logic.useServer(*self.remote)      # (SynPoSlicer.prepareServer): a restarted server's
            self.preview_started = time.monotonic()
            self.logic.startPreview(self.volume, self.segmentation, ids, self.parameters)
        except (SynPoError, ValueError) as exc:
            return self._say(str(exc), error=True)
        self.set_tool("none")
        self._say(self.logic.message)
        self._start_runner()

    @owner_only
    def update(self):
        try:
            self.preview_started = time.monotonic()
            self.logic.startUpdate(self.parameters)
        except (SynPoError, ValueError) as exc:
            return self._say(str(exc), error=True)
        self.stop_correcting()
        self._say(self.logic.message)
        self._start_runner()

    @owner_only
    def cancel(self):
        self.logic.cancel()
        self._refresh()
        self._say(self.logic.message)

    def _start_runner(self):
        self._refresh()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())

    async def _run(self):
        """The module's timer, as an asyncio task: one short request per tick."""
        while self.logic.active() or self.logic.settling():
            ran = self.logic.active()
            self.logic.poll()
            state = self.logic.state
            with self.state:
                self._refresh()
                # A tick that only settled a cancelled job leaves the page's message alone: it is the
                # user's last action's (Apply, Load sample), not the run's.
                if ran:
                    self._say(self.logic.message, error=state == "failed")
                    if state == "previewed":
                        self.state.preview_seconds = round(time.monotonic() - self.preview_started, 1)
                        self.state.message += "\n(%.0f s from the click)" % self.state.preview_seconds
                        self.logic.setOverlayOpacity(float(self.state.opacity))
            await asyncio.sleep(STEP_SECONDS if self.logic.active() or self.logic.settling() else 0)
        with self.state:
            self._refresh()

    @owner_only
    def set_opacity(self, value):
        self.logic.setOverlayOpacity(float(value))

    @owner_only
    def rerun_slice(self):
        """The slice in the view, decoded again from its points as they are now (of the segment being
        painted if it was previewed, else the first previewed one)."""
        try:
            if self.logic.preview is None:
                raise ValueError("Run a preview first.")
            sid = self.state.active_segment if self.state.active_segment in self.logic.segmentIds \
                else self.logic.segmentIds[0]
            self._say(self.logic.rerunSlice(self.logic.sliceIndexInView(), sid))
        except (SynPoError, ValueError) as exc:
            self._say(str(exc), error=True)

    @owner_only
    def start_correcting(self):
        """Paint / erase on the candidates: the editor works on the 'SynPo candidates' segmentation."""
        if self.logic.preview is None:
            return self._say("Run a preview first.", error=True)
        if self.state.active_segment not in self.logic.segmentIds:
            self.state.active_segment = self.logic.segmentIds[0]
        self.correcting = True
        self._activate_segmentation(self.logic.preview.candidates)
        self.set_tool("paint")
        self._refresh()
        self._say("Correcting %s: paint or erase on its candidates (one slice or more), then Update%s."
                  % (self.logic.segmentNames[self.logic.segmentIds.index(self.state.active_segment)],
                     "; the segment list chooses which previewed segment" if len(self.logic.segmentIds) > 1 else ""))

    def stop_correcting(self):
        if self.correcting:
            self.correcting = False          # (first: the user's segmentation gets the page's segment)
            if self.segmentation is not None:
                self._activate_segmentation(self.segmentation)
            self._no_tool()
            self._refresh()

    def _no_tool(self):
        """The editor drops its tool when the segmentation it edits is switched: the page says so (a
        Paint button shown pressed did nothing, and pressing it again sent nothing)."""
        self.editor.set_active_effect_type(SegmentationEffectNoTool)
        self.state.tool = "none"

    @owner_only
    def apply(self):
        try:
            self.stop_correcting()
            self.apply_logic = applying.editor_logic(self.scene, self.segmentation, self.volume)
            text = self.logic.apply(editorLogic=self.apply_logic)
        except (SynPoError, ValueError) as exc:
            return self._say(str(exc), error=True)
        self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
        self._activate_segmentation(self.segmentation)
        self._no_tool()
        self._refresh()
        self._say(text)

    def _forget_apply(self):
        """The user edits the segments after Apply: 'Undo apply' restores the whole segmentation as it
        was before Apply (vtkSlicerSegmentEditorLogic::Undo), so it would take those edits too; it
        is no longer offered."""
        self.apply_logic = None
        self.state.can_undo = False

    @owner_only
    def undo_apply(self):
        if self.apply_logic is not None and self.apply_logic.CanUndo():
            self.apply_logic.Undo()
            self._say("Apply undone: the segments are as they were before it.")
        self._refresh()

    @owner_only
    def discard(self):
        if not self._edits_may_go("Discard"):
            return
        self.stop_correcting()
        self.logic.discard()
        self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
        self._refresh()
        self._say("Preview discarded; the segments are unchanged.")

    # ------------------------------------------------------------------ saving
    def label_map(self):
        """The segmentation as a label map on the volume's grid: segment n (in the list's order) -> n."""
        seg = self.segmentation.GetSegmentation()
        labels = np.zeros(slicer.util.arrayFromVolume(self.volume).shape, dtype=np.uint8)
        for n in range(seg.GetNumberOfSegments()):
            mask = mrml.segment_array(self.segmentation, seg.GetNthSegmentID(n), self.volume).astype(bool)
            labels[mask & (labels == 0)] = n + 1
        return labels

    @owner_only
    def download(self, kind):
        """The bytes of the segmentation file (kind: 'nifti' label map, or 'seg.nrrd')."""
        if self.segmentation is None:
            self._say("Nothing to save: load a volume and segment it first.", error=True)
            return None
        labels = self.label_map()
        if kind != "nifti" and not labels.any():
            # (Slicer's writer writes no file for segments without a voxel: no download came, and no word)
            self._say("Nothing to save as .seg.nrrd: no segment has been painted yet.", error=True)
            return None
        try:
            with tempfile.TemporaryDirectory(prefix="synpo-web-") as folder:
                if kind == "nifti":
                    from synpo.io import write_volume
                    path = os.path.join(folder, "segmentation.nii.gz")
                    write_volume(labels, self.geometry, path)
                else:
                    path = os.path.join(folder, "segmentation.seg.nrrd")
                    self.slicer_app.io_manager.write_segmentation(self.segmentation, path)
                with open(path, "rb") as handle:
                    data = handle.read()
        except (OSError, SynPoError) as exc:
            self._say("The segmentation could not be saved: %s" % (getattr(exc, "strerror", None) or exc), error=True)
            return None
        self._saved, self._saved_once = self._segments_digest(labels), True
        self._say("Saved the segmentation (%s)." % ("NIfTI label map" if kind == "nifti" else ".seg.nrrd"))
        return self.server.protocol.addAttachment(data)

