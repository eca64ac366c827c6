"""The preview workflow without Qt: one server, one preview, stepped by the application's timer.

Shared by the Slicer module (SynPoSlicer.SynPoSlicerLogic adds what needs Slicer's application:
its settings, its Qt timer, its layout's slice views, its Segment Editor) and by `synpo web`
(synpo_web: slicer-core in a browser page, an asyncio task for a timer). Nothing here waits on the
segmentation: `step()` makes one short request to the server and returns (engine.RemoteJob).
Python 3.9, no torch, no Qt.

The run is driven by the application's timer through `startPolling()` (the module's Qt timer
belongs to the logic, not to a panel or an effect instance, so a run goes on when the Segment
Editor deactivates the effect) and `poll()` (one step, then every listener told). One local server
serves the whole session (restarted only when its settings change), and a volume previewed again
reuses its session on the server (embeddings reused).
"""
import logging

# The panel's settings and their defaults (a vtkMRMLScriptedModuleNode's parameters).
PARAMETERS = {"Model": "litemedsam", "Features": "auto", "TopK": "64", "PositivePoints": "3",
              "NegativePoints": "3", "SearchMargin": "0.07", "IntensityGate": "true", "Opacity": "0.5"}

# A local server that has not answered, and whose log has not grown, for this many seconds is taken for
# hung (an interpreter stuck importing torch, a GPU driver that never answers): the preview fails with
# its log's last lines instead of showing "Starting" until the user cancels. Loading LiteMedSAM and
# torch takes 5-20 s here; the limit leaves room for a first start on a slow disk or behind a virus
# scanner, and a model's first download (SAM ViT-H: 2.5 GB) goes on as long as its progress reaches
# the log.
SERVER_START_SECONDS = 300.0


def volumeFingerprint(inputs):
    """The volume's content and grid, hashed: a preview of the same volume reuses its server session."""
    import hashlib
    digest = hashlib.sha1()
    digest.update(repr((inputs.image.shape, str(inputs.image.dtype), tuple(inputs.spacing),
                        getattr(inputs, "direction", None))).encode())
    digest.update(inputs.image.tobytes())
    return digest.hexdigest()


class PreviewLogic:
    """The workflow in explicit states:

    idle -> starting (a local `synpo serve` is starting) -> running (the preview's RemoteJob steps)
    -> previewed (preview nodes in the scene) -> idle after apply or discard; failed / cancelled
    leave the scene as it was. The engine never runs in this process: `step()` makes one short
    request to the server and returns, so the application's thread never waits on the segmentation.

    Hooks for the application: startPolling / stopPolling (its timer, which calls `poll()`),
    showLayers / setOverlayOpacity (its slice views), segmentEditorWidget (its Segment Editor),
    serverOptions (a local server's options), UNDO_HINT (how the user takes Apply back).
    """

    UNDO_HINT = "Ctrl+Z in the Segment Editor takes it back."

    def __init__(self):
        self.state = "idle"
        self.message = ""
        self.preview = None
        self.result = None
        self.job = None
        self.server = None               # SynPoSlicerLib.engine.ServerProcess when started here
        self._serverLog = None           # (server, its log's size, when it last grew): serverStarting
        self.remote = None               # (url, token) of a configured server
        self.pythonForServer = None
        self._pending = None             # the inputs of a preview waiting for the server
        self._sessions = {}              # volume fingerprint -> session id on the current server
        self._settling = []              # (job, fingerprint, server epoch): cancelled jobs still reading an answer
        self._serverEpoch = 0            # which server the sessions are on: changed by useServer, stopServer
        self._fingerprints = {}          # (volume node id, its image's MTime) -> fingerprint: hashed once
        self._listeners = []             # views of the run told after each step (panel, effect instances)
        self._told = None                # (state, message) the listeners were last told
        self.volumeNode = None
        self.segmentationNode = None     # the segmentation the preview was made for: Apply writes there
        self.segmentIds, self.segmentNames = [], []
        self._sent = None                # (axis, {label: its candidates' slice digests}) as an Update read them
        self._painted = None             # {label: its segment's labelmap_mtime at Preview} (the paint: _given)
        self._given = None               # what the server's session was given: the paint at Preview (sparse:
                                         # shape, flat indices, labels) and each Update's corrections since
                                         # ((flat indices, labels), {label: absent slices}): _resendUpdate
                                         # merges them (kept, not merged at each Update: a CT's full-volume
                                         # merge took a second of Slicer's thread)
        self._update = None              # an Update's: (_given with its corrections; settings; why resent)
        self._givenTo = None             # the server session that ran them (the one the candidates show): an
                                         # Update goes there (a resend cancelled or failed after its upload
                                         # left a session without a run: 'nothing to add to')
        self._waiting = None             # an Update waiting for the local server to start again

    def setDefaultParameters(self, node):
        for key, value in PARAMETERS.items():
            if not node.GetParameter(key):
                node.SetParameter(key, value)

    # -- environment
    def deviceDescription(self):
        if self.remote is not None:
            return "server %s" % self.remote[0]
        return "a SynPo server on this computer, started on the first preview"

    def useServer(self, url="", tokenFile="", python=""):
        """An empty url: SynPo starts its own server (with `python`, or Slicer's) on the first
        preview and keeps it for the session: later previews, updates and re-runs use the same one
        (restarted only when the Python, model, device or features change; serverReady). Else the
        server at url with the token in tokenFile (no torch needed here)."""
        from synpo.client import find_token
        remote = (url, find_token(tokenFile or None)) if url else None
        if remote != self.remote:
            self._sessions = {}              # sessions live on the server they were made on
            self._serverEpoch += 1           # (and a cancelled job settling now is not recorded)
        if remote is not None:
            self.stopServer()                # the local server is no longer used
        self.remote = remote
        self.pythonForServer = python or None

    def client(self, timeout=5.0):
        from synpo.client import Client
        if self.remote is not None:
            return Client(self.remote[0], self.remote[1], timeout)
        return self.server.client(timeout)

    def stopServer(self):
        """End the local server and everything it started (a launcher's python-real too)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
            self._sessions = {}
            self._serverEpoch += 1

    def serverOptions(self, parameterNode):
        """ServerProcess keyword arguments of a server started here (a hook)."""
        return dict(device="auto", sam=parameterNode.GetParameter("Model"),
                    features=parameterNode.GetParameter("Features"))

    def serverReady(self, parameterNode):
        """True when a server answers; starts the local one if needed (never waits for it). A
        running local server is reused unless it was started with other settings or has died after
        serving. One that dies while starting (CUDA asked for where there is none, a Python without
        SynPo) is not started again: SynPoError with its log's last lines (ServerProcess.ready), and
        the next preview tries afresh."""
        if self.remote is not None:
            return True
        from SynPoSlicerLib.engine import ServerProcess, server_key
        options = self.serverOptions(parameterNode)
        if self.server is not None and (self.server.key != server_key(self.pythonForServer, **options)
                                        or (self.server.url and not self.server.running())):
            self.stopServer()
        if self.server is None:
            self.server = ServerProcess(self.pythonForServer, **options).start()
        try:
            return self.server.ready()
        except Exception:
            self.stopServer()                # (its folder and log go: the error holds the log's end)
            raise

    def serverStarting(self):
        """The message while the local server starts, with the seconds it has taken; SynPoError (the
        server stopped, with its log's last lines) once it has neither answered nor written to its
        log for SERVER_START_SECONDS."""
        import os
        import time
        from synpo.errors import SynPoError
        now, server = time.monotonic(), self.server
        try:
            size = os.path.getsize(server.log_file)
        except OSError:
            size = 0
        seen = self._serverLog
        if seen is None or seen[0] is not server or seen[1] != size:
            seen = self._serverLog = (server, size, now if seen is not None and seen[0] is server else server.started)
        if now - seen[2] > SERVER_START_SECONDS:
            tail = server.log_tail()
            self.stopServer()
            raise SynPoError("the SynPo server did not answer within %d s of its start, its log silent for %d s, "
                             "and was stopped%s; check 'Python for the local server' and try again"
                             % (now - server.started, SERVER_START_SECONDS,
                                (" (its log: %s)" % tail) if tail else " (its log is empty)"))
        return "Starting the SynPo server (%d s)..." % (now - server.started)

    # -- who drives the run, who watches it
    def addListener(self, callback):
        if callback not in self._listeners:
            self._listeners.append(callback)

    def removeListener(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)

    def startPolling(self):
        """Called when a run starts: the application's timer should now call poll() regularly
        (a hook; `process()` and the web app step the logic themselves)."""

    def stopPolling(self):
        """Called by poll() once the run has ended (a hook)."""

    def poll(self):
        """One timer tick: cancelled jobs settled, a step, then every listener told (on a tick of a run,
        or when the state or message changed: a tick that only settles a cancelled job leaves the views,
        and what the user's last action wrote there, alone); polling stops once nothing is left to do.
        Settling comes first: a preview queued just after Cancel finds the session the cancelled upload
        made (step() waits for it, at most RemoteJob.SETTLE_SECONDS) instead of sending the volume again."""
        import logging
        ran = self.active()
        try:
            self.settle()
        except Exception as exc:
            logging.warning("SynPo: a cancelled run's answer could not be read: %s" % exc)
            self._settling = []
        try:
            self.step()
        except Exception as exc:             # anything step() does not expect ends the run, once
            logging.exception("SynPo: the run failed")
            self.state, self.message = "failed", "SynPo failed: %s" % exc
        if ran or (self.state, self.message) != self._told:
            self._tell()
        if not self.active() and not self.settling():
            self.stopPolling()

    def _tell(self):
        """Every listener (the panel, the effect's copies) told the state and message as they are now."""
        import logging
        self._told = (self.state, self.message)
        for callback in list(self._listeners):
            try:
                callback()
            except Exception as exc:             # a closed view must not stop the run
                logging.warning("SynPo: a view of the run failed to update: %s" % exc)

    # -- preview
    def settings(self, parameterNode):
        """The panel's settings as the engine's --set overrides (validated by the server)."""
        return ["prompts.top_k=%d" % int(parameterNode.GetParameter("TopK")),
                "prompts.n_positive_points=%d" % int(parameterNode.GetParameter("PositivePoints")),
                "prompts.n_negative_points=%d" % int(parameterNode.GetParameter("NegativePoints")),
                "volume.search_margin=%s" % float(parameterNode.GetParameter("SearchMargin")),
                "gate.enabled=%s" % ("false" if parameterNode.GetParameter("IntensityGate") == "false" else "true")]

    def fingerprint(self, volumeNode, inputs):
        """volumeFingerprint, computed once per state of the volume node (a large CT's hash costs
        a fraction of a second on the GUI thread; a second preview of it costs nothing)."""
        image = volumeNode.GetImageData()
        key = (volumeNode.GetID(), image.GetMTime() if image is not None else 0, volumeNode.GetMTime())
        if key not in self._fingerprints:
            self._fingerprints = {key: volumeFingerprint(inputs)}        # only the latest is kept
        return self._fingerprints[key]

    def startPreview(self, volumeNode, segmentationNode, segmentIds, parameterNode):
        """Check the inputs and queue a preview; `step()` carries it out."""
        from SynPoSlicerLib import mrml
        if self.state in ("starting", "running"):
            raise ValueError("A preview is already running; wait for it or cancel it.")
        if self.preview is not None and segmentationNode is not None and segmentationNode is self.preview.candidates:
            raise ValueError("'SynPo candidates' holds the preview: choose the segmentation you painted the "
                             "target on (or press Update to run again from your corrections of the candidates).")
        if self.preview is not None and volumeNode is not None and volumeNode in self.preview.nodes():
            raise ValueError("'%s' is the preview's overlay: choose the scanned volume as the input."
                             % volumeNode.GetName())
        # The inputs first: a bad input leaves the current preview (and the user's edits of it) as it is.
        inputs = mrml.extract_inputs(volumeNode, segmentationNode, segmentIds)
        self.discard()
        self.volumeNode, self.segmentationNode, self.segmentIds = volumeNode, segmentationNode, list(segmentIds)
        self.segmentNames = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in segmentIds]
        # The paint as sent (its voxels' flat indices and labels: one pass over the volume, and the paint is a
        # slice or a few): what the server's session was given (_resendUpdate), and what Apply compares the
        # previewed segments with, to keep the user's paint and erasing in them since (_paintSincePreview).
        import numpy as np
        where = np.flatnonzero(inputs.support)
        values = inputs.support.reshape(-1)[where]
        self._given, self._update, self._givenTo = ((inputs.support.shape, where, values), ()), None, None
        self._painted = {v: mrml.labelmap_mtime(segmentationNode, sid)
                         for v, sid in enumerate(self.segmentIds, start=1)}
        self._pending = (inputs, self.settings(parameterNode), parameterNode, self.fingerprint(volumeNode, inputs))
        self._waiting = None
        self.state, self.message = "starting", "Starting the SynPo server..."
        self.job = None
        self.startPolling()

    def step(self):
        """Advance the current preview by one short request. Returns the state."""
        from synpo.errors import SynPoError
        try:
            if self.state == "starting" and self._waiting is not None:
                if self.serverReady(self._waiting[4]):
                    waiting, self._waiting = self._waiting, None
                    self._runUpdate(*waiting[:4])
                else:
                    self.message = self.serverStarting()
            elif self.state == "starting":
                inputs, settings, parameterNode, fingerprint = self._pending
                if fingerprint not in self._sessions and any(
                        f == fingerprint and epoch == self._serverEpoch for _, f, epoch in self._settling):
                    self.message = "Waiting for the server's answer to the cancelled upload of this volume..."
                elif self.serverReady(parameterNode):
                    from SynPoSlicerLib.engine import RemoteJob
                    known = self._sessions.get(fingerprint)
                    self.job = RemoteJob(self.client(), inputs.image, inputs.spacing, inputs.support, settings,
                                         session_id=known, direction=inputs.direction)
                    # The job holds the volume's copy now (until it ends); only the fingerprint stays here.
                    self._pending = (None, None, None, fingerprint)
                    self.state = "running"
                    self.message = ("The volume is on the server already: embeddings reused." if known
                                    else "Sending the volume to the server...")
                else:
                    self.message = self.serverStarting()
            elif self.state == "running":
                self.job.step()
                self._rememberSession()
                if self.job.stalled() and self.remote is None and self.server is not None \
                        and not self.server.running():
                    # (a poll of a dead local server can time out rather than be refused: not waited for)
                    tail = self.server.log_tail()
                    self.job.cancel(now=True)
                    raise SynPoError("the SynPo server on this computer stopped during the run%s; Preview (or "
                                     "Update) starts it again" % ((" (its log: %s)" % tail) if tail else ""))
                self.message = "SynPo: %s%s" % (self.job.stage, " (embeddings reused)" if self.job.reused else "")
                if self.job.state == "done":
                    self.finishPreview()
                elif self.job.state == "failed" and self.job.gone and self._resendUpdate():
                    pass
                elif self.job.state in ("failed", "cancelled"):
                    self._update = None
                    self.state = self.job.state
                    self.message = ("Cancelled; the scene is unchanged." if self.job.state == "cancelled"
                                    else "SynPo failed: %s" % self.job.error)
        except (SynPoError, ValueError) as exc:
            self.state, self.message = "failed", "SynPo failed: %s" % exc
        return self.state

    def _rememberSession(self, job=None, fingerprint=None):
        """The server session that holds a preview's volume (the current job's, else `job`'s), for
        the next preview of that volume."""
        job = self.job if job is None else job
        if fingerprint is None and self._pending is not None:
            fingerprint = self._pending[3]
        if job is not None and job.session_id and fingerprint is not None:
            self._sessions[fingerprint] = job.session_id

    def _cancelJob(self):
        """Cancel the current job now. One whose message the server is answering just then reads
        the answer in later ticks (poll: the server's new session is kept for the next preview, a
        run it started is cancelled), without holding Slicer's main thread meanwhile."""
        self.job.cancel(now=True)
        self._rememberSession()                       # a volume sent before Cancel is not sent again
        entry = (self.job, self._pending[3] if self._pending is not None else None, self._serverEpoch)
        if self.job.state == "cancelling" and entry not in self._settling:
            self._settling.append(entry)

    def settling(self):
        """Cancelled jobs are still reading the server's answer: the timer should go on (poll)."""
        return bool(self._settling)

    def settle(self, seconds=0.0):
        """A step of each cancelled job still reading an answer; with `seconds`, until they are done or
        that long has passed (a logic about to go: developer-mode Reload)."""
        import time
        deadline = time.monotonic() + seconds
        while True:
            for entry in list(self._settling):
                job, fingerprint, epoch = entry
                job.step()
                if job.state != "cancelling":
                    self._settling.remove(entry)
                    if epoch == self._serverEpoch:       # not a session of a server no longer used
                        self._rememberSession(job, fingerprint)
            if not self._settling or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def startUpdate(self, parameterNode):
        """Run again from the user's edits of the candidates (mrml.edited_slices): corrected slices
        become supports, emptied slices are marked absent; the same server session, so only what
        the corrections change is computed again. `step()` carries it out."""
        import numpy as np
        from SynPoSlicerLib import apply as applying
        from SynPoSlicerLib import mrml
        if self.preview is None or self.job is None:
            raise ValueError("Run a preview first, then edit the SynPo candidates segmentation.")
        applying.check_volume(self.volumeNode)
        self._refuseAddedSegments("Update")
        # The candidates as sent (each segment read once): what the user changes on them while the Update
        # runs is kept (finishPreview).
        sent = {}
        paint, absent = mrml.edited_slices(self.preview, self.volumeNode, self.result.support.axis, digests=sent)
        if not paint.any() and not absent:
            raise ValueError("No corrections yet: paint or erase on the 'SynPo candidates' segmentation first.")
        self._sent = (self.result.support.axis, sent)
        settings = self.settings(parameterNode)
        # The session's support after these corrections, as the server merges them: sent again with the
        # volume should the server have ended the session (_resendUpdate).
        first, corrections = self._given
        where = np.flatnonzero(paint)
        self._update = ((first, corrections + ((where, paint.reshape(-1)[where], absent),)), settings, None)
        session = self._givenTo or self.job.session_id
        painted = np.moveaxis(paint, self.result.support.axis, 0)
        corrected = int(painted.reshape(len(painted), -1).any(1).sum())
        self.message = "Updating from %d corrected and %d emptied slice(s)..." % (
            corrected, sum(len(v) for v in absent.values()))
        if self.remote is None and (self.server is None or not self.server.running()):
            # The local server has gone (killed, out of memory): started again first (step); the session
            # went with it, so the Update then sends the volume again (_resendUpdate).
            self._waiting = (paint, absent, settings, session, parameterNode)
            self.state = "starting"
        else:
            self._runUpdate(paint, absent, settings, session)
        self.startPolling()

    def _runUpdate(self, paint, absent, settings, session):
        """The Update's corrections sent to `session` (startUpdate; step, once a local server is up again)."""
        from SynPoSlicerLib.engine import RemoteJob
        self.job = RemoteJob(self.client(), None, (), paint, settings, session_id=session, add=True, absent=absent)
        self.state = "running"

    def _resendUpdate(self):
        """An Update whose session the server no longer holds (idle past its --session-ttl, evicted for
        memory, the server restarted): the volume is sent again, and SynPo runs once from the paint and
        every correction so far with the absent marks (synpo.support.merge_corrections, as the server
        merged them), on the preview's slicing axis. False when that cannot be (the volume is gone)."""
        import types
        import numpy as np
        from SynPoSlicerLib import mrml
        from SynPoSlicerLib.engine import RemoteJob
        from synpo.support import merge_corrections
        if self._update is None or self._update[2] is not None or self.volumeNode is None \
                or self.volumeNode.GetScene() is None:
            return False
        ((shape, where, values), corrections), settings, _ = self._update
        image, spacing = mrml.volume_image(self.volumeNode), mrml.spacing_ijk(self.volumeNode)
        direction = mrml.direction_lps(self.volumeNode)
        sent = self._pending[3] if self._pending is not None else None
        if image.shape != tuple(shape) or sent is None or self.fingerprint(
                self.volumeNode, types.SimpleNamespace(image=image, spacing=spacing, direction=direction)) != sent:
            # (hashed once per state of the node: an unchanged volume costs nothing here)
            self.job.error = ("the server no longer holds this preview's volume, and the volume has changed since "
                              "the preview: Preview again (Apply writes your corrections as drawn)")
            return False
        axis = self.result.support.axis
        support, marks = np.zeros(shape, values.dtype), {}
        support.reshape(-1)[where] = values
        for where, values, absent in corrections:          # one at a time, as the session merged them
            paint = np.zeros(shape, values.dtype)
            paint.reshape(-1)[where] = values
            support, marks = merge_corrections(support, marks, paint, absent, axis)
            del paint
        self._update = self._update[:2] + (self.job.error,)
        self.job = RemoteJob(self.client(), image, spacing, support, settings, absent=marks, axis=axis,
                             direction=direction)
        self.message = ("The server no longer held this preview's session: sending the volume again; SynPo runs "
                        "once from your paint and every correction...")
        return True

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
        while (self.active() or self.settling()) and time.time() < deadline:
            self.settle()                    # first, as poll() does
            self.step()
            time.sleep(0.1)
        return self.state

    def cancel(self):
        """Stop the current run, on the server too: the cancel request is sent now, or, where the
        server's answer naming the run is still due, read by the next poll() (settling(); a caller
        with no timer calls settle(seconds))."""
        if self.job is not None and self.job.active():
            self._cancelJob()
            self.state, self.message = "cancelled", "Cancelled; the scene is unchanged."
        elif self.state == "starting":
            self._waiting = None
            self.state, self.message = "cancelled", "Cancelled; the scene is unchanged."
        else:
            return
        self._tell()          # now, not at the next tick: the views' next action (Apply) is not overwritten

    def finishPreview(self, opacity=0.5):
        """Build the preview nodes from the finished job (main thread)."""
        from SynPoSlicerLib import mrml
        from synpo.outputs import changed_slices, collapse_warnings, extent_summary
        from synpo.result import FOUND
        if self.volumeNode is None or self.volumeNode.GetScene() is None:
            self.state, self.message = "cancelled", "The volume was closed; nothing was shown."
            return
        before, self.result = (self.result if self.preview is not None else None), self.job.result
        # An update replaces the preview it corrected, in the same 'SynPo candidates' node (the
        # Segment Editor may show it: mrml.show_preview).
        previous = self.preview
        during, sent, self._sent = None, self._sent, None
        update, self._update = self._update, None
        if update is not None:                       # the session now holds these (or the one sent again)
            self._given = update[0]
        self._givenTo = self.job.session_id
        if previous is not None:
            self.saveCandidatesForUndo(previous.candidates)
            if sent is not None:          # the candidates now: the user may have edited them while it ran
                during = mrml.changed_since(previous, self.volumeNode, sent[0], sent[1])
        self.preview = mrml.show_preview(self.volumeNode, self.result, self.segmentIds, self.segmentNames,
                                         previous=previous)
        if previous is not None:
            previous.remove()
        kept = mrml.carry_edits(self.preview, self.volumeNode, sent[0], during) if during else 0
        self.showLayers(opacity)
        present = sum(r.status in FOUND for r in self.result.records)
        names = {i + 1: name for i, name in enumerate(self.segmentNames)}
        self.state = "previewed"
        self.message = ("Preview ready: target on %d slice(s). Green/red points are the prompts; move them and "
                        "'Re-run slice'; paint or erase on the candidates and Update to carry corrections through the "
                        "volume; then Apply (what the candidates show) or Discard.\n%s"
                        % (present, "\n".join(extent_summary(self.result, names))))
        for line in collapse_warnings(self.result, names):
            self.message += "\nWarning: " + line
        if before is not None:                       # after Update: what the corrections changed
            self.message = "Updated: %d slice(s) changed.\n%s" % (len(changed_slices(before, self.result)),
                                                                  self.message)
        if update is not None and update[2] is not None:
            self.message = ("The server no longer held this preview's session, so the volume was sent again and "
                            "SynPo ran once from your paint and every correction (slices no correction touched "
                            "may differ from an Update on the session).\n%s" % self.message)
        if kept:
            self.message = ("Your edits of the candidates made while the Update ran (%d slice(s)) are kept: "
                            "Update again to carry them through the volume.\n%s" % (kept, self.message))

    def saveCandidatesForUndo(self, candidates):
        """Before an Update (or a Re-run slice) rewrites the candidates in place: when the Segment Editor
        shows them, its undo state is saved, so that Ctrl+Z takes back the Update (the user's corrected
        candidates come back) rather than the user's last stroke as well. The editor's history keeps the states
        saved before any change made outside it (vtkSegmentationHistory::OnSegmentationModified only
        drops the redo states): without this, one Ctrl+Z after an Update restored the first preview
        without the correction, while the points and confidence were the Update's.
        (qMRMLSegmentEditorWidget::saveStateForUndo saves its segmentation's state: the history's in
        5.8, vtkSlicerSegmentEditorLogic::SaveStateForUndo's in 5.10.)"""
        editor = self.segmentEditorWidget()
        node = editor.mrmlSegmentEditorNode() if editor is not None else None
        if node is not None and candidates is not None and node.GetSegmentationNode() is candidates:
            editor.saveStateForUndo()

    def showLayers(self, opacity):
        """The confidence over the volume in the application's slice views (a hook)."""

    def setOverlayOpacity(self, value):
        """The confidence layer's opacity in the application's slice views (a hook)."""

    def sliceIndexInViews(self, sliceNodes):
        """The slice (across the preview's slicing axis) at the centre of the first of `sliceNodes`
        (vtkMRMLSliceNode) that shows those slices (the axial view for axial paint)."""
        import numpy as np
        from SynPoSlicerLib import mrml
        axis = self.result.support.axis
        normal = mrml.ijk_to_ras(self.volumeNode)[:3, 2 - axis]
        normal = normal / np.linalg.norm(normal)
        best, best_dot = None, 0.9
        for node in sliceNodes:
            m = node.GetSliceToRAS()
            dot = abs(float(np.dot([m.GetElement(r, 2) for r in range(3)], normal)))
            if dot > best_dot:
                best, best_dot = node, dot
        if best is None:
            raise ValueError("No slice view shows the preview's slices; set a view to the painted orientation.")
        m = best.GetSliceToRAS()
        centre = [m.GetElement(r, 3) for r in range(3)]
        return int(round(mrml.ras_to_ijk(self.volumeNode, centre)[0][2 - axis]))

    def rerunSlice(self, sliceIndex, segmentId):
        """Decode one slice of one previewed segment again, on the server, from the points as the
        user left them."""
        from SynPoSlicerLib import apply as applying
        from SynPoSlicerLib import mrml
        if self.preview is None:
            raise ValueError("Run a preview first.")
        if segmentId not in self.segmentIds:
            raise ValueError("Select one of the previewed segments.")
        applying.check_volume(self.volumeNode)
        label = self.segmentIds.index(segmentId) + 1
        axis = self.result.support.axis
        from synpo.client import ServerError
        from SynPoSlicerLib.engine import SESSION_GONE
        client, sid = self.client(timeout=30.0), self.job.session_id
        decode = lambda pos, neg: client.redecode(sid, sliceIndex, pos, neg, label, axis)[0]
        try:
            candidates = self.preview.candidates                          # Ctrl+Z: this slice back
            used = mrml.rerun_slice(self.preview, self.volumeNode, axis, sliceIndex, label, decode,
                                    before_write=lambda: self.saveCandidatesForUndo(candidates))
        except ServerError as exc:
            if exc.status == 404 and "session" in str(exc):
                raise ServerError(SESSION_GONE % exc, 404) from None
            raise
        return ("Slice %d of %s decoded again from %d point(s): a correction, as paint there would be (Update "
                "carries it through the volume)." % (sliceIndex, self.segmentNames[label - 1], used))

    def segmentEditorWidget(self):
        """The application's Segment Editor widget, whose masking settings and undo Apply uses (a
        hook: None where there is none)."""
        return None

    def apply(self, segmentationNode=None, editorLogic=None, saveState=None, write=None):
        """Write the preview, as the candidates show it (the user's paint and erasing there included,
        mrml.shown_labels: an edit not carried through by Update is written as drawn, never dropped),
        into the segmentation and segments it was made for (recorded at
        Preview, whatever node the panel or the Segment Editor shows now): one Segment Editor undo
        step, through the editor's masking settings where this Slicer has them (apply.py). Refused,
        with the preview kept, where Slicer would write nothing; then the preview is removed.

        `write(segmentationNode, segmentId, orientedLabelmap)`: the writer (the SynPo effect passes
        its own modifySegmentByLabelmap); else Slicer 5.10+'s vtkSlicerSegmentEditorLogic with the
        editor's masking, else (Slicer 5.8) the segmentation node's own API."""
        from SynPoSlicerLib import apply as applying
        from SynPoSlicerLib import mrml
        if self.preview is None:
            raise ValueError("Nothing to apply: run a preview first.")
        applying.check_volume(self.volumeNode)
        # What the candidates show: the user's edits there are written as drawn, even without Update
        # (read first: nothing is switched or written when the candidates cannot be read).
        labels, edited = mrml.shown_labels(self.preview, self.volumeNode, self.result.support.axis)
        target = self.segmentationNode if self.segmentationNode is not None else segmentationNode
        self._refuseAddedSegments("Apply")
        since = self._paintSincePreview(labels, target)
        editor = self.segmentEditorWidget() if write is None and editorLogic is None else None
        selected = None
        if editor is not None:
            editorNode = editor.mrmlSegmentEditorNode()
            # Without a Segment Editor logic (Slicer 5.8) the node's API writes: no masking to check.
            masking = editorNode if applying.has_editor_logic() else None
            applying.check_writable(target, self.volumeNode, self.segmentIds, masking)
            if editorNode.GetSegmentationNode() is target:
                selected = editorNode.GetSelectedSegmentID()
            # The editor's undo saves the segmentation it shows: show the target first, so that its
            # Ctrl+Z restores the target (not the candidates the user may have been correcting).
            # Switching selects the first segment and sets the source volume to the segmentation's
            # reference geometry node (qMRMLSegmentEditorWidget::updateWidgetFromSegmentationNode):
            # the volume is set back; the selection is restored after writing.
            editor.setSegmentationNode(target)
            editor.setSourceVolumeNode(self.volumeNode) if hasattr(editor, "setSourceVolumeNode") \
                else editor.setMasterVolumeNode(self.volumeNode)
            saveState = saveState or editor.saveStateForUndo
            if masking is not None:
                applying.check_writable(target, self.volumeNode, self.segmentIds, editorNode)
                editorLogic = applying.editor_logic(target.GetScene(), target, self.volumeNode, editorNode)
        elif editorLogic is not None:
            applying.check_writable(target, self.volumeNode, self.segmentIds, editorLogic.GetSegmentEditorNode())
        if write is None:
            if editorLogic is None and applying.has_editor_logic():
                editorLogic = applying.editor_logic(target.GetScene(), target, self.volumeNode)
            write = applying.logic_writer(editorLogic) if editorLogic is not None else applying.node_writer()
            if saveState is None and editorLogic is not None:
                saveState = editorLogic.SaveStateForUndo
        try:
            changed = applying.write_preview(target, self.volumeNode, labels, self.segmentIds, write, saveState)
        finally:
            if editor is not None:
                editor.mrmlSegmentEditorNode().SetSelectedSegmentID(selected or self.segmentIds[0])
        shown = applying.show_written(target, self.segmentIds)
        names = ", ".join(self.segmentNames)
        self.appliedVoxels = sum(changed.values())
        self.discard()
        edits = (" Your edits of the candidates on %d slice(s) were written as drawn (Update would have carried "
                 "them through the volume)." % edited) if edited else ""
        if since:
            edits += (" Your paint and erasing in %s since the preview (%d voxel(s)) are kept."
                      % (names, since))
        if shown:
            edits += " %s %s hidden: shown now." % (", ".join(shown), "was" if len(shown) == 1 else "were")
        return "Applied to %s (%d voxel(s) changed): %s%s" % (names, sum(changed.values()), self.UNDO_HINT, edits)

    def _refuseAddedSegments(self, action):
        """InputError when the user added and painted a segment of their own in 'SynPo candidates': Apply
        writes only the previewed segments, and Apply, Discard or an Update that cannot reuse the node
        remove the candidates, that segment included."""
        from SynPoSlicerLib import mrml
        from synpo.errors import InputError
        extra = mrml.extra_segments(self.preview, self.volumeNode, self.result.support.axis)
        if extra:
            raise InputError("'SynPo candidates' holds %s, not a previewed segment; %s would not write it, and "
                             "'SynPo candidates' is removed afterwards, that segment included. Copy it into your "
                             "segmentation (Segmentations module, Copy/move segments) or delete it, then %s."
                             % (", ".join("'%s'" % name for name, _ in extra), action, action))

    def _paintSincePreview(self, labels, target):
        """What the user painted or erased in the previewed segments themselves since Preview, put onto
        `labels` (what Apply writes, [k, j, i]): painted voxels the preview leaves empty are written,
        erased voxels of the user's paint are not written back. Returns the voxels so changed."""
        import numpy as np
        from SynPoSlicerLib import mrml
        if not self._painted or target is None or target is not self.segmentationNode or target.GetScene() is None:
            return 0
        changed = 0
        _, where, values = self._given[0]            # the paint at Preview
        for v, sid in enumerate(self.segmentIds, start=1):
            if v not in self._painted or target.GetSegmentation().GetSegment(sid) is None:
                continue                      # (check_writable says so)
            mtime = self._painted[v]
            if mtime is not None and mrml.labelmap_mtime(target, sid) == mtime:
                continue                      # not painted since: no full-volume read
            now = mrml.segment_array(target, sid, self.volumeNode).astype(bool)
            was = np.zeros(now.shape, bool)
            was.reshape(-1)[where[values == v]] = True
            added, removed = now & ~was & (labels == 0), was & ~now & (labels == v)
            labels[added], labels[removed] = v, 0
            changed += int(added.sum() + removed.sum())
        return changed

    def editedSlices(self):
        """How many slices of the candidates the user painted or erased on since the preview, in the
        segments still there (0 without a preview, or when the user removed the candidates: nothing
        left to lose)."""
        from SynPoSlicerLib import mrml
        from synpo.errors import InputError
        if self.preview is None or self.volumeNode is None or self.volumeNode.GetScene() is None:
            return 0
        try:
            axis = self.result.support.axis
            return (mrml.shown_labels(self.preview, self.volumeNode, axis, readable_only=True)[1]
                    + sum(n for _, n in mrml.extra_segments(self.preview, self.volumeNode, axis)))
        except InputError:
            return 0

    def discard(self):
        if self.preview is not None:
            self.preview.remove()
            self.preview = None
        if self.state in ("previewed", "failed", "cancelled"):
            self.state = "idle"
        if not self.active():         # the run's arrays (a volume's labels and confidence) are not kept after it
            self.result, self.job, self._pending, self._sent, self._painted = None, None, None, None, None
            self._given, self._update, self._givenTo, self._waiting = None, None, None, None

    def onSceneClosed(self):
        """File > Close Scene: the preview's nodes are gone with the scene; a run is cancelled. The
        server and its sessions stay (a volume loaded again is recognised by its content)."""
        if self.job is not None and self.job.active():
            self._cancelJob()
        self.preview, self.volumeNode, self.result, self.job, self._pending = None, None, None, None, None
        self.segmentationNode, self._sent, self._painted, self._given, self._update = None, None, None, None, None
        self._waiting, self._givenTo = None, None
        self.state, self.message = "idle", ""
        self._tell()          # the views' buttons: no preview to Apply or Update any more

