"""One tab at a time drives the page's scene.

The MRML scene, its views and the SynPo workflow are one per `synpo web` process, while any number
of browser tabs may open the page. The first tab that claims the scene owns it until its connection
closes (a reload closes it first); another tab is covered by a refusal. Everything a tab can send is
held to that: the page's actions (`owner_only`), its state changes (`OneTabAtATime._owner_state`),
its view sizes and mouse events (`OwnerOnlyAreas`), and sends to a tab that went are dropped quietly
(`quiet_when_gone`).
"""


def owner_only(method):
    """A page action that only the page owning the scene may take (another tab's is ignored)."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self._mine():
            return None
        return method(self, *args, **kwargs)
    return guarded


class OwnerOnlyAreas(dict):
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
        return HeldArea(self.page, name, adapter)


class HeldArea:
    """One view area as a tab's RPC reaches it (OwnerOnlyAreas)."""

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


def quiet_when_gone(handler):
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


class OneTabAtATime:
    """The page's side of the rule (a mixin of SynPoWeb, a TrameApp): `_tab` the connection owning the
    scene, `_sizes` each connection's last view sizes, `_areas` the views' areas once the server is
    ready; `claim` is the RPC the page's script (claim_script) calls when it opens."""

    def _init_tabs(self):
        self._tab = None                  # the connection that owns the scene
        self._sizes = {}                  # connection -> {view area: its last size} (HeldArea)
        self._areas = None                # the views' areas, once the server is ready (_watch_connections)

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
            quiet_when_gone(handler)
            # Another tab's own state changes (trame_server's "trame.state.update": its v_models) are not
            # taken: its keyboard reaches the controls under its cover, and its Erase, segment or
            # "Segments to propagate" became the owner's (shown on the owner's page; owner_only stopped
            # only the handlers: the page showed Erase, the editor had no tool).
            if "trame.state.update" in handler.functionMap:
                obj, update = handler.functionMap["trame.state.update"]
                handler.functionMap["trame.state.update"] = (obj, self._owner_state(update))
        for link in protocol.getLinkProtocols():
            if isinstance(getattr(link, "_area_adapters", None), dict):       # trame-rca's StreamManager
                link._area_adapters = self._areas = OwnerOnlyAreas(link._area_adapters, self)

    def _owner_state(self, update):
        def guarded(protocol, changes):
            if self._tab is None or self._owner():
                return update(protocol, changes)
        return guarded


def claim_script(claim: str) -> str:
    """The page's script that claims the scene through the trigger `claim` when it opens: refused, it
    covers the page at once (so that nothing there is clicked) and asks again every second, `tries`
    times (a page just closed or reloaded may not have let go yet)."""
    return (
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
