"""The `synpo web` page's widgets (Vuetify 3 through trame): a drawer of controls bound to a
SynPoWeb's state and handlers, and the views' grid. Element ids (`synpo-*`) are what the browser
tests drive."""
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3

from .tabs import claim_script
from .uploads import READABLE


def upload_handler(page):
    """The file input's handler: a file over the limit is refused in the browser, before it is
    sent (the server checks again)."""
    limit = int(page.max_upload_mb * 1024 * 1024)
    say = ("message = $event.name + ' is ' + ($event.size / 1048576).toFixed(1) + ' MB; this server takes "
           "uploads up to %g MB (synpo web --max-upload-mb).'; error = true; "
           "window.setTimeout(() => { upload = null }, 0)"
           % page.max_upload_mb)
    return "if ($event && !Array.isArray($event) && $event.size > %d) { %s } else { trigger('%s', [$event]) }" % (
        limit, say, page.server.controller.trigger_name(page.load_upload))

def build_ui(page):
    """The page: its drawer of controls over `page` (a SynPoWeb), the views' grid; returns the layout."""
    ctrl = page.server.controller
    claim = ctrl.trigger_name(page.claim)
    ctrl.on_server_ready.add(page._watch_connections)
    nifti = ctrl.trigger_name(lambda: page.download("nifti"))
    segnrrd = ctrl.trigger_name(lambda: page.download("seg.nrrd"))
    page.state.change("brush")(lambda brush, **_: page.set_brush(brush))
    page.state.change("opacity")(lambda opacity, **_: page.set_opacity(opacity))
    page.state.change("active_segment")(lambda active_segment, **_: page.set_active_segment(active_segment))
    with SinglePageWithDrawerLayout(page.server, full_height=True) as layout:
        layout.title.set_text("SynPo")
        layout.root.theme = "dark"
        # One tab at a time: the page claims the scene when it opens; a refused tab says so.
        # Refused at once (a page that covers this one, so that nothing here is clicked), asked again
        # for 8 s (a page just closed or reloaded may not have let go yet); the views stay mounted
        # under the cover (their sizes and events reach the server but not the owner's views:
        # tabs.OwnerOnlyAreas).
        client.Script(claim_script(claim))
        client.ClientTriggers(mounted="window.synpoClaim(trigger, 8)")
        with layout.drawer as drawer:
            drawer.width = 340
            with v3.VContainer(classes="pa-3"):
                with v3.VRow(dense=True, classes="ma-0"):
                    v3.VBtn("Load sample", id="synpo-sample", click=page.load_sample, size="small",
                            disabled=("running",), classes="mr-2")
                    v3.VFileInput(id="synpo-upload", v_model=("upload", None), label="Upload a volume",
                                  density="compact", hide_details=True, accept=",".join(READABLE),
                                  disabled=("running",),
                                  update_modelValue=upload_handler(page))
                v3.VDivider(classes="my-2")
                v3.VSelect(id="synpo-active", label="Segment to paint", items=("segments",),
                           v_model=("active_segment",), density="compact", hide_details=True,
                           disabled=("!has_volume",))
                with v3.VRow(dense=True, classes="ma-0 mt-2"):
                    v3.VBtn("Add segment", id="synpo-add", click=page.add_segment, size="small",
                            disabled=("!has_volume || running",), classes="mr-1")
                    with v3.VBtnToggle(v_model=("tool",), density="compact", mandatory=True,
                                       update_modelValue=(page.set_tool, "[$event]")):
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
                    v3.VBtn("Preview", id="synpo-preview", click=page.preview, color="primary", size="small",
                            disabled=("!has_volume || running",), classes="mr-1")
                    v3.VBtn("Cancel", id="synpo-cancel", click=page.cancel, size="small",
                            disabled=("!running",))
                v3.VProgressLinear(id="synpo-progress", model_value=("progress",), height=8,
                                   color=("running ? 'amber' : 'green'",), classes="mt-2")
                with html.Div(id="synpo-opacity"):
                    v3.VSlider(label="Overlay", v_model=("opacity",), min=0, max=1, step=0.05,
                               density="compact", hide_details=True, disabled=("!has_preview",), classes="mt-2")
                with v3.VRow(dense=True, classes="ma-0 mt-1"):
                    v3.VBtn("Correct", id="synpo-correct", click=page.start_correcting, size="small",
                            disabled=("!has_preview || running",), classes="mr-1")
                    v3.VBtn("Update", id="synpo-update", click=page.update, size="small",
                            disabled=("!has_preview || running",), classes="mr-1")
                    v3.VBtn("Re-run slice", id="synpo-rerun", click=page.rerun_slice, size="small",
                            disabled=("!has_preview || running",))
                with v3.VRow(dense=True, classes="ma-0 mt-2"):
                    v3.VBtn("Apply", id="synpo-apply", click=page.apply, color="success", size="small",
                            disabled=("!has_preview || running",), classes="mr-1")
                    v3.VBtn("Discard", id="synpo-discard", click=page.discard, size="small",
                            disabled=("!has_preview || running",), classes="mr-1")
                    v3.VBtn("Undo apply", id="synpo-undo", click=page.undo_apply, size="small",
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
                page.layout_manager.initialize_layout_grid(layout)
    return layout
