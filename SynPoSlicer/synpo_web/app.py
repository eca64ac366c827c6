"""The `synpo web` page: trame-slicer views of one MRML scene and the SynPo panel.

One scene per server process. The workflow is SynPoSlicerLib.logic.PreviewLogic (the Slicer
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
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectNoTool, SegmentationEffectPaint
from trame_slicer.views import SliceLayer

# One-file formats: an upload is one file, so a header with a detached data file (.nhdr, .mhd) cannot come.
READABLE = (".nii", ".nii.gz", ".nrrd", ".mha")
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


def owner_only(method):
    """A page action that only the page owning the scene may take (another tab's is ignored)."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self._mine():
            return None
        return method(self, *args, **kwargs)
    return guarded


def _check_one_file(path, name):
    """Refuse an uploaded header that names a data file of its own (NRRD's "data file", MetaImage's
    ElementDataFile other than LOCAL): read on the server, an absolute path there gave the page the
    bytes of any file the server's account can read (its token, a key), and /dev/stdin or a FIFO
    froze the page. One upload is one file; its whole header is read (io.header_data_files)."""
    from synpo.io import HEADER_LIMIT, header_data_files
    if not name.lower().endswith((".nrrd", ".mha")):
        return
    files = header_data_files(path)
    if files is None:
        raise SynPoError("%s has a header longer than %d MB; upload a volume with a usual header."
                         % (name, HEADER_LIMIT >> 20))
    detached = [f for f in files if not (name.lower().endswith(".mha") and f.upper() == "LOCAL")]
    if detached:
        raise SynPoError("%s names a separate data file (%s); upload a volume whose voxels are in the same file "
                         "(.nrrd with its data attached, .mha, .nii, .nii.gz)." % (name, detached[0][:80]))


def _safe_name(name):
    base = os.path.basename(str(name or "")).strip() or "volume"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def _without_paths(text, folder, name):
    """A reader's message as the page's user should see it: the upload's name in place of the temporary
    path it was read from on the server (said once: read_volume names the file as `what` and path),
    and no process addresses (ITK's "PNGImageIO(0x55b3...)")."""
    import re
    path = os.path.join(folder, name)
    text = text.replace("%s %s" % (name, path), name).replace(path, name).replace(folder, "")
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", text)


class _OwnerOnlyAreas(dict):
    """trame-rca's view areas (StreamManager._area_adapters, trame_rca/protocol.py: the RPCs
    "trame.rca.size" and "trame.rca.event" look the view up with .get and call its update_size or
    on_interaction) as the page owning the scene sees them. The views and their render windows are
    shared by every tab: a refused tab's view sizes (10 x 10 pixels once its page was replaced) shrank
    the owner's views, and its mouse moved the owner's slices. Another tab's sizes are kept for the
    day it owns the page; its events are dropped."""

    def __init__(self, areas, page):
        dict.__init__(self, areas)
        self.page = page

    def get(self, name, default=None):
        adapter = dict.get(self, name, default)
        if adapter is None:
            return adapter
        return _HeldArea(self.page, name, adapter)


class _HeldArea:
    """One view area as a tab's RPC reaches it (_OwnerOnlyAreas)."""

    def __init__(self, page, name, adapter):
        self.page, self.name, self.adapter = page, name, adapter

    def update_size(self, origin, size):
        self.page._sizes.setdefault(self.page._caller(), {})[self.name] = (origin, size)
        if self.page._owner():
            self.adapter.update_size(origin, size)

    def on_interaction(self, origin, event):
        if self.page._owner():
            self.adapter.on_interaction(origin, event)

    def reset(self):
        if self.page._owner():
            self.adapter.reset()

    def __getattr__(self, attribute):
        return getattr(self.adapter, attribute)


def _quiet_when_gone(handler):
    """wslink's sends to a tab that went while they were on their way (closed, reloaded, its browser
    ended or offline): aiohttp raises ClientConnectionResetError "Cannot write to closing transport"
    (aiohttp/_websocket/writer.py); wslink leaves a published frame's or state's to asyncio ("Task
    exception was never retrieved") and answers an RPC's with an error sent on the same connection, which
    raises again ("Error handling request": WslinkHandler.onCompleteMessage, wslink/protocol.py). Dozens
    of tracebacks on the terminal for a tab closed while its views streamed; the tab is gone, so nothing
    is lost by not sending."""
    for name in ("sendWrappedMessage", "sendWrappedError"):
        send = getattr(handler, name)

        async def quiet(*args, _send=send, **kwargs):
            try:
                return await _send(*args, **kwargs)
            except ConnectionResetError:
                handler.network_monitor.network_call_completed()
        setattr(handler, name, quiet)


class SynPoWeb(TrameApp):
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
        self._tab = None                  # the connection that owns the scene
        self._sizes = {}                  # connection -> {view area: its last size} (_HeldArea)
        self._areas = None                # the views' areas, once the server is ready (_watch_connections)
        self.preview_started = 0.0
        self._state_defaults()
        self._build_ui()

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

    # ------------------------------------------------------------------ tabs
    def claim(self, tab):
        """One page at a time drives the scene: the first connection that claims it owns it until it
        closes (a reload closes it first); any other gets "busy" and shows a refusal."""
        owner = self._caller() or tab      # the connection calling
        if self._tab is None or self._tab == owner:
            self._take(owner)
            return "ok"
        return "busy"

    def _caller(self):
        """The connection whose message is being handled (wslink sets it before every RPC)."""
        web_app = getattr(self.server, "_server", None)
        return getattr(web_app, "last_active_client_id", None)

    def _mine(self):
        """True when the connection calling now owns the scene (claiming it if nobody does)."""
        caller = self._caller()
        if caller is None:
            return True
        if self._tab is None:
            self._take(caller)
        return caller == self._tab

    def _owner(self):
        """True when the connection calling now owns the scene; never claims it (a covered tab's view
        sizes while the owner reloads must not make it the owner: only claim() and actions do)."""
        caller = self._caller()
        return caller is None or caller == self._tab

    def _take(self, owner):
        """`owner` owns the scene from now on: the views take the sizes its page last asked for (asked
        while another tab owned it, they were kept aside)."""
        if self._tab == owner:
            return
        self._tab = owner
        if self._areas is not None:
            for name, (origin, size) in self._sizes.get(owner, {}).items():
                adapter = dict.get(self._areas, name)
                if adapter is not None:
                    adapter.update_size(origin, size)

    def _watch_connections(self, **_):
        protocol = getattr(self.server, "_root_protocol", None)
        if protocol is None:
            return
        closed = protocol.onClose

        def on_close(client_id):
            if client_id == self._tab:
                self._tab = None
            self._sizes.pop(client_id, None)
            return closed(client_id)
        protocol.onClose = on_close
        for handler in getattr(getattr(self.server, "_server", None), "_ws_handlers", ()):
            _quiet_when_gone(handler)
            # Another tab's own state changes (trame_server's "trame.state.update": its v_models) are not
            # taken: its keyboard reaches the controls under its cover, and its Erase, segment or
            # "Segments to propagate" became the owner's (shown on the owner's page; owner_only stopped
            # only the handlers: the page showed Erase, the editor had no tool).
            if "trame.state.update" in handler.functionMap:
                obj, update = handler.functionMap["trame.state.update"]
                handler.functionMap["trame.state.update"] = (obj, self._owner_state(update))
        for link in protocol.getLinkProtocols():
            if isinstance(getattr(link, "_area_adapters", None), dict):       # trame-rca's StreamManager
                link._area_adapters = self._areas = _OwnerOnlyAreas(link._area_adapters, self)

    def _owner_state(self, update):
        def guarded(protocol, changes):
            if self._tab is None or self._owner():
                return update(protocol, changes)
        return guarded

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
            name = _safe_name(upload.name)
            size = len(upload.content or b"")
            if size > self.max_upload_mb * 1024 * 1024:
                raise SynPoError("%s is %.3g MB; this server takes uploads up to %g MB (synpo web "
                                 "--max-upload-mb)." % (name, size / 1048576.0, self.max_upload_mb))
            if not name.lower().endswith(READABLE):
                raise SynPoError("%s is not a volume file this page reads (%s)." % (name, ", ".join(READABLE)))
            if not self._scene_may_go("Upload the volume"):      # asked before the file is read
                return
            from synpo.io import nifti_placement_note, read_volume
            with tempfile.TemporaryDirectory(prefix="synpo-web-") as folder:
                path = os.path.join(folder, name)
                with open(path, "wb") as handle:
                    handle.write(upload.content or b"")
                _check_one_file(path, name)
                self._check_voxels(path, name)
                try:
                    image, geometry = read_volume(path, name)
                except SynPoError as exc:
                    raise SynPoError(_without_paths(str(exc), folder, name)) from None
                except Exception as exc:          # a reader's own error: one line
                    said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise SynPoError("%s could not be read as a volume: %s"
                                     % (name, _without_paths(said, folder, name))) from None
                # (as synpo segment warns: the downloads carry the placement ITK read)
                placement = nifti_placement_note(path, geometry, shown=name)
            if image.ndim != 3:
                raise SynPoError("%s is not a 3D scalar volume." % name)
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

    def _check_voxels(self, path, name):
        """Refuse, from the header alone, a volume larger than one voxel per byte of --max-upload-mb:
        the page holds about 8 bytes per voxel, and a small compressed file can hold a huge mostly
        empty volume (0.15 MB of .nii.gz: 600 x 512 x 512 voxels, 1.2 GB more memory, 10 s of a
        frozen page)."""
        import SimpleITK as sitk
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return                        # not readable: read_volume says why
        size = list(reader.GetSize())
        voxels = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents())
        limit = int(self.max_upload_mb * 1024 * 1024)
        if voxels > limit:
            raise SynPoError("%s holds %s = %d voxels; this server takes volumes up to %d voxels (one per "
                             "byte of synpo web --max-upload-mb)."
                             % (name, " x ".join(str(n) for n in size), voxels, limit))

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

    # ------------------------------------------------------------------ page
    def _upload_handler(self):
        """The file input's handler: a file over the limit is refused in the browser, before it is
        sent (the server checks again)."""
        limit = int(self.max_upload_mb * 1024 * 1024)
        say = ("message = $event.name + ' is ' + ($event.size / 1048576).toFixed(1) + ' MB; this server takes "
               "uploads up to %g MB (synpo web --max-upload-mb).'; error = true; "
               "window.setTimeout(() => { upload = null }, 0)"
               % self.max_upload_mb)
        return "if ($event && !Array.isArray($event) && $event.size > %d) { %s } else { trigger('%s', [$event]) }" % (
            limit, say, self.server.controller.trigger_name(self.load_upload))

    def _build_ui(self):
        ctrl = self.server.controller
        claim = ctrl.trigger_name(self.claim)
        ctrl.on_server_ready.add(self._watch_connections)
        nifti = ctrl.trigger_name(lambda: self.download("nifti"))
        segnrrd = ctrl.trigger_name(lambda: self.download("seg.nrrd"))
        self.state.change("brush")(lambda brush, **_: self.set_brush(brush))
        self.state.change("opacity")(lambda opacity, **_: self.set_opacity(opacity))
        self.state.change("active_segment")(lambda active_segment, **_: self.set_active_segment(active_segment))
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("SynPo")
            layout.root.theme = "dark"
            # One tab at a time: the page claims the scene when it opens; a refused tab says so.
            # Refused at once (a page that covers this one, so that nothing here is clicked), asked again
            # for 8 s (a page just closed or reloaded may not have let go yet); the views stay mounted
            # under the cover (their sizes and events reach the server but not the owner's views:
            # _OwnerOnlyAreas).
            client.Script(
                "window.synpoTab = window.synpoTab || Math.random().toString(36).slice(2);\n"
                "window.synpoClaim = function (trigger, tries) {\n"
                "  trigger('%s', [window.synpoTab]).then(function (answer) {\n"
                "    var cover = document.getElementById('synpo-cover');\n"
                "    if (answer === 'ok') {\n"
                "      if (cover) { cover.remove(); }\n"
                "      document.body.setAttribute('data-synpo', 'owner');\n"
                "      return;\n"
                "    }\n"
                "    if (!cover) {\n"
                "      cover = document.createElement('div');\n"
                "      cover.id = 'synpo-cover';\n"
                "      cover.style.cssText = 'position: fixed; inset: 0; z-index: 100000; background: #202020; "
                "color: #eee';\n"
                "      cover.innerHTML = '<p id=\"synpo-refused\" style=\"font: 18px sans-serif; margin: 2em\">"
                "SynPo web is open in another tab or browser: one page at a time works on its scene. Close "
                "the other page (or start another synpo web on another port) and reload.</p>';\n"
                "      document.body.appendChild(cover);\n"
                "    }\n"
                "    if (tries > 0) {\n"
                "      window.setTimeout(function () { window.synpoClaim(trigger, tries - 1); }, 1000);\n"
                "    }\n"
                "  });\n"
                "};\n" % claim)
            client.ClientTriggers(mounted="window.synpoClaim(trigger, 8)")
            with layout.drawer as drawer:
                drawer.width = 340
                with v3.VContainer(classes="pa-3"):
                    with v3.VRow(dense=True, classes="ma-0"):
                        v3.VBtn("Load sample", id="synpo-sample", click=self.load_sample, size="small",
                                disabled=("running",), classes="mr-2")
                        v3.VFileInput(id="synpo-upload", v_model=("upload", None), label="Upload a volume",
                                      density="compact", hide_details=True, accept=",".join(READABLE),
                                      disabled=("running",),
                                      update_modelValue=self._upload_handler())
                    v3.VDivider(classes="my-2")
                    v3.VSelect(id="synpo-active", label="Segment to paint", items=("segments",),
                               v_model=("active_segment",), density="compact", hide_details=True,
                               disabled=("!has_volume",))
                    with v3.VRow(dense=True, classes="ma-0 mt-2"):
                        v3.VBtn("Add segment", id="synpo-add", click=self.add_segment, size="small",
                                disabled=("!has_volume || running",), classes="mr-1")
                        with v3.VBtnToggle(v_model=("tool",), density="compact", mandatory=True,
                                           update_modelValue=(self.set_tool, "[$event]")):
                            v3.VBtn("Paint", value="paint", id="synpo-paint", size="small")
                            v3.VBtn("Erase", value="erase", id="synpo-erase", size="small")
                            v3.VBtn("View", value="none", id="synpo-view", size="small")
                    v3.VSlider(id="synpo-brush", label="Brush (mm)", v_model=("brush",), min=2, max=60, step=1, density="compact",
                               hide_details=True, thumb_label=True, classes="mt-2")
                    v3.VDivider(classes="my-2")
                    v3.VSelect(id="synpo-selected", label="Segments to propagate", items=("segments",),
                               v_model=("selected_segments",), multiple=True, chips=True, density="compact",
                               hide_details=True, disabled=("!has_volume",))
                    with v3.VRow(dense=True, classes="ma-0 mt-2"):
                        v3.VBtn("Preview", id="synpo-preview", click=self.preview, color="primary", size="small",
                                disabled=("!has_volume || running",), classes="mr-1")
                        v3.VBtn("Cancel", id="synpo-cancel", click=self.cancel, size="small",
                                disabled=("!running",))
                    v3.VProgressLinear(id="synpo-progress", model_value=("progress",), height=8,
                                       color=("running ? 'amber' : 'green'",), classes="mt-2")
                    with html.Div(id="synpo-opacity"):
                        v3.VSlider(label="Overlay", v_model=("opacity",), min=0, max=1, step=0.05,
                                   density="compact", hide_details=True, disabled=("!has_preview",), classes="mt-2")
                    with v3.VRow(dense=True, classes="ma-0 mt-1"):
                        v3.VBtn("Correct", id="synpo-correct", click=self.start_correcting, size="small",
                                disabled=("!has_preview || running",), classes="mr-1")
                        v3.VBtn("Update", id="synpo-update", click=self.update, size="small",
                                disabled=("!has_preview || running",), classes="mr-1")
                        v3.VBtn("Re-run slice", id="synpo-rerun", click=self.rerun_slice, size="small",
                                disabled=("!has_preview || running",))
                    with v3.VRow(dense=True, classes="ma-0 mt-2"):
                        v3.VBtn("Apply", id="synpo-apply", click=self.apply, color="success", size="small",
                                disabled=("!has_preview || running",), classes="mr-1")
                        v3.VBtn("Discard", id="synpo-discard", click=self.discard, size="small",
                                disabled=("!has_preview || running",), classes="mr-1")
                        v3.VBtn("Undo apply", id="synpo-undo", click=self.undo_apply, size="small",
                                disabled=("!can_undo",))
                    v3.VDivider(classes="my-2")
                    with v3.VRow(dense=True, classes="ma-0"):
                        v3.VBtn("Save NIfTI", id="synpo-save-nifti", size="small", classes="mr-1",
                                disabled=("!has_volume",),
                                click="utils.download('segmentation.nii.gz', trigger('%s'), "
                                      "'application/octet-stream')" % nifti)
                        v3.VBtn("Save .seg.nrrd", id="synpo-save-seg", size="small", disabled=("!has_volume",),
                                click="utils.download('segmentation.seg.nrrd', trigger('%s'), "
                                      "'application/octet-stream')" % segnrrd)
                    html.Pre("{{ message }}", id="synpo-message",
                             style=("error ? 'color: #ff6b6b; white-space: pre-wrap; font-size: 12px' : "
                                    "'white-space: pre-wrap; font-size: 12px'",),
                             classes="mt-3")
            with layout.content:
                with v3.VContainer(fluid=True, classes="fill-height pa-0"):
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout
