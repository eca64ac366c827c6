"""Running SynPo off the GUI thread, Qt-free.

The widget converts nodes to arrays on the main thread (`mrml.extract_inputs`),
starts a `PreviewJob` (a worker thread that only touches arrays), polls
`job.progress` from a timer, and creates nodes from `job.result` back on the main
thread. `cancel()` makes the engine stop at its next slice; a cancelled job has no
result, so the scene is left as it was.
"""
import threading
from typing import Callable, Dict, Optional

from synpo.config import SynPoConfig
from synpo.errors import SynPoError
from synpo.volume import Cancelled, segment_volume


class ModelCache:
    """Loaded models and per-volume embeddings, kept between previews so a re-run only decodes."""

    def __init__(self):
        self.models: Dict[tuple, tuple] = {}
        self.stores: Dict[str, dict] = {}

    def models_for(self, sam: str, features: str, dinov2: str, device: str):
        key = (sam, features, dinov2, device)
        if key not in self.models:
            from synpo.features import load_models
            self.models[key] = load_models(sam, features, dinov2, device, quiet=True)
        return self.models[key]

    def stores_for(self, volume_key: str) -> dict:
        return self.stores.setdefault(volume_key, {})


class PreviewJob:
    def __init__(self, inputs, cache: ModelCache, volume_key: str, cfg: SynPoConfig = SynPoConfig(),
                 sam: str = "litemedsam", features: str = "auto", dinov2: str = "small", device: str = "auto"):
        self.inputs, self.cache, self.volume_key, self.cfg = inputs, cache, volume_key, cfg
        self.options = (sam, features, dinov2, device)
        self.progress = (0, 1)
        self.stage = "starting"
        self.result = None
        self.error: Optional[str] = None
        self.cancelled = False
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _report(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        self.progress = (done, max(total, 1))

    def _download(self, done: int, total) -> None:
        self._report("downloading %s" % self.options[0], done, total or max(done, 1))

    def _work(self) -> None:
        try:
            from synpo import weights
            if not weights.is_cached(self.options[0]):
                # Downloaded here, in the worker: progress in the panel, and Cancel stops it.
                weights.checkpoint_path(self.options[0], progress=self._download, cancel=self._cancel.is_set)
            self.stage = "loading models"
            sam, dino, use = self.cache.models_for(*self.options)
            self.result = segment_volume(self.inputs.image, self.inputs.spacing, self.inputs.support, sam, dino,
                                         self.cfg, progress=self._report, cancel=self._cancel.is_set,
                                         stores=self.cache.stores_for(self.volume_key), confidence_from=use)
        except Cancelled:
            self.cancelled = True
        except SynPoError as exc:
            if self._cancel.is_set():
                self.cancelled = True
            else:
                self.error = str(exc)
        except Exception as exc:                      # reported in the panel, never lost
            self.error = "%s: %s" % (type(exc).__name__, exc)

    def start(self) -> "PreviewJob":
        self._thread = threading.Thread(target=self._work, name="SynPoPreview", daemon=True)
        self._thread.start()
        return self

    def run(self) -> "PreviewJob":
        """Run in the calling thread (tests, scripts)."""
        self._work()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running()


class JobGuard:
    """At most one preview at a time: a second start is refused with a message."""

    def __init__(self):
        self.job: Optional[PreviewJob] = None

    def start(self, make: Callable[[], PreviewJob]) -> PreviewJob:
        if self.job is not None and self.job.running():
            raise SynPoError("A preview is already running; wait for it or cancel it.")
        self.job = make().start()
        return self.job
