"""`synpo cohort`: one labelled reference segments a cohort of volumes, one Dask task per volume.

    synpo cohort REF_IMAGE REF_LABELS QUERY... -o OUTDIR [--workers N] [--threads-per-worker T]
                 [--scheduler ADDRESS] [--confidence] [--points] [model and --set options as `synpo segment`]

The reference's labels are painted on a few slices of REF_IMAGE (several labels, several slices
per label); each query volume is segmented from them as `synpo segment QUERY REF_LABELS
--support-image REF_IMAGE` would, with the same outputs. What Dask adds:

- a `distributed.LocalCluster` on this machine by default (worker processes = cores / threads per
  worker, each with a stated memory limit), or any running cluster with --scheduler (a Slurm one
  through dask-jobqueue: docs/cohort.md);
- the models loaded once per worker (`SynPoModels`, a worker plugin; a restarted worker loads
  them again), the reference's support slices embedded once (one task) and shared by all;
- one task per query volume; the console prints a line per finished volume, and the dashboard's address.

Nothing lost, nothing twice: every output file appears complete or not at all (synpo.io writes a
temporary file and renames it); OUTDIR/cohort.csv, rewritten atomically after every volume, holds a
row per volume with a hash of the settings, and a re-run skips the volumes done with the same
settings (and the same query file) whose outputs are all there; a worker that dies mid-task leaves
a temporary file at most (removed when the volume is done again) and Dask runs its task again; a
volume that cannot be read or segmented is a row with its error and the others go on; Ctrl+C (or
SIGTERM) cancels the tasks, closes the cluster and keeps the rows written so far.

Exit status: 0 every volume done, 1 some failed, 2 usage error (nothing started), 130 interrupted.
"""
import csv
import glob
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from .errors import SynPoError
from .lifeline import ignore_interrupts, interrupt_on
from .weights import sha256_of

PLUGIN_NAME = "synpo-models"
CSV_NAME = "cohort.csv"
COLUMNS = ["name", "status", "organs_found", "slices_per_organ", "warnings", "seconds", "settings_hash", "error",
           "query", "query_stamp", "outputs", "reference_turn", "output_stamps"]
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files that sit beside volumes and are none: left out of a pattern's matches.
NOT_VOLUMES = (".json", ".bval", ".bvec", ".txt", ".tsv", ".csv", ".raw", ".raw.gz", ".zraw", ".md", ".pdf")

UNKNOWN_OUTPUTS = "?"                # a row from a table written before the `outputs` column, not yet in a run
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------- inputs and outputs

def volume_name(path: str) -> str:
    base = os.path.basename(path)
    for ext in VOLUME_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base.split(".")[0]


def expand_queries(items: List[str], exclude: List[str], outdir: str) -> List[str]:
    """QUERY arguments -> volume files: a file as it is, a folder's volume files (not recursive),
    a glob pattern's matches; sorted within each argument, duplicates once. Files in OUTDIR and
    the `exclude` files (the reference labels) are left out of folders and patterns."""
    out: List[str] = []
    seen = set()
    skip = {os.path.realpath(p) for p in exclude}
    out_real = os.path.realpath(outdir)

    def add(path: str, listed: bool) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        if listed and (real in skip or os.path.dirname(real) == out_real):
            return
        seen.add(real)
        out.append(path)

    for item in items:
        if os.path.isdir(item):
            if os.path.realpath(item) == out_real:     # (its volumes left out in silence beside other queries)
                raise SynPoError("the query folder %s is the output folder (-o), whose volumes are taken for outputs; "
                                 "choose another output folder" % outdir)
            try:
                listed = os.listdir(item)
            except OSError as exc:
                raise SynPoError("cannot list the query folder %s: %s" % (item, exc.strerror or exc)) from None
            files = sorted(os.path.join(item, f) for f in listed
                           if f.lower().endswith(VOLUME_EXTENSIONS) and not f.startswith("."))
            if not files:
                raise SynPoError("query folder %s holds no volume files (%s)" % (item, ", ".join(VOLUME_EXTENSIONS)))
            for f in files:
                add(f, True)
        elif os.path.exists(item):
            add(item, False)
        elif glob.has_magic(item):
            # Not the files beside a volume: "sub-01*" also matches a BIDS sidecar (.json), "case*" a
            # detached header's data file (.raw); any other file ITK reads (.gipl, .vtk, ...) is taken.
            matched = sorted(f for f in glob.glob(item) if os.path.isfile(f))
            files = [f for f in matched if not f.lower().endswith(NOT_VOLUMES)]
            if not files:
                raise SynPoError("no file matches the query pattern %s%s" % (
                    item, " (only %s)" % ", ".join(os.path.basename(f) for f in matched[:3]) if matched else ""))
            for f in files:
                add(f, True)
        else:
            raise SynPoError("query file not found: %s" % item)
    if not out:
        raise SynPoError("no query volumes (the reference labels and files in the output folder are left out)")
    return out


def output_paths(outdir: str, name: str, confidence: bool, points: bool, labels: List[int]) -> Dict[str, str]:
    """The files one query gets: labels (always), confidence (and one per label when several), points."""
    from .outputs import confidence_paths
    paths = {"labels": os.path.join(outdir, name + "_synpo.nii.gz")}
    if confidence:
        paths["confidence"] = os.path.join(outdir, name + "_confidence.nii.gz")
        for v, p in confidence_paths(paths["confidence"], labels).items():
            paths["confidence_label%d" % v] = p
    if points:
        paths["points"] = os.path.join(outdir, name + "_points.json")
    return paths


def file_stamp(path: str) -> str:
    """size:mtime of a query file: a replaced file is segmented again on a re-run. A detached header
    (.nhdr, .mhd) adds its data file's: the voxels can change with the header untouched."""
    st = os.stat(path)
    stamp = "%d:%d" % (st.st_size, st.st_mtime_ns)
    data = _data_file(path)
    if data is not None and os.path.isfile(data):
        st = os.stat(data)
        stamp += "+%d:%d" % (st.st_size, st.st_mtime_ns)
    return stamp


def _data_file(path: str) -> Optional[str]:
    """The one data file a detached NRRD (`data file:`) or MetaImage (`ElementDataFile =`) header names,
    beside it; None for other files, LIST or pattern forms, or a header that cannot be read."""
    from .io import header_data_files
    if not path.lower().endswith((".nhdr", ".mhd")):
        return None
    try:
        files = header_data_files(path)
    except OSError:
        return None
    if not files:
        return None
    value = files[0]
    if not value or " " in value or value.upper() in ("LIST", "LOCAL"):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), value)


def settings_hash(args, cfg) -> str:
    """What decides a volume's outputs, hashed: the models asked for, the configuration with its
    overrides and the reference files' content. (Which outputs are asked for is not in it: a volume
    is done again when one of the files asked for now is missing.)"""
    from . import __version__
    settings = {
        "synpo": __version__, "sam": args.sam, "features": args.features, "dinov2": args.dinov2,
        "precision": args.precision, "runtime": args.runtime, "config": asdict(cfg),
        "reference": [sha256_of(args.ref_image), sha256_of(args.ref_labels)],
        "confidence_all": bool(args.confidence_all),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_rows(path: str) -> Dict[str, dict]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:      # (a spreadsheet may add a BOM)
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "name" not in reader.fieldnames or "settings_hash" not in reader.fieldnames:
                raise SynPoError("%s is not a synpo cohort table (no name / settings_hash columns); choose "
                                 "another output folder" % path)
            legacy = "outputs" not in reader.fieldnames     # a table from before the column: see _migrated
            rows = {}
            for row in reader:
                rows[row["name"]] = {c: row.get(c, "") or "" for c in COLUMNS}
                if legacy:
                    rows[row["name"]]["outputs"] = UNKNOWN_OUTPUTS
            return rows
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise SynPoError("cannot read %s: %s" % (path, exc)) from None


def write_rows(path: str, rows: Dict[str, dict]) -> None:
    """The whole table, atomically (a temporary file renamed over it: io.publish)."""
    from .io import publish, stage_file

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for name in sorted(rows):
                writer.writerow(rows[name])
    try:
        publish(stage_file(path, write), path)
    except OSError as exc:            # a full disk, a folder made read-only: one line, not a traceback
        raise SynPoError("cannot write %s: %s (the outputs written so far are kept; run the same command "
                         "again once it can be written)" % (path, exc.strerror or exc)) from None


def remove_stale_temporaries(paths) -> None:
    """Temporary files synpo.io left for these outputs (a process killed before its rename): exactly
    mkstemp's ".tmp-" + its random part (letters, digits, "_": no "-") + "-" + the output's name. A
    wider pattern (".tmp-*-b_synpo.nii.gz") also matched volume "x-b"'s file being written."""
    import re
    for path in paths:
        folder, base = os.path.split(os.path.abspath(path))
        exact = re.compile(r"\.tmp-[A-Za-z0-9_]+-" + re.escape(base))
        for tmp in glob.glob(os.path.join(glob.escape(folder), ".tmp-*-" + glob.escape(base))):
            if not exact.fullmatch(os.path.basename(tmp)):
                continue
            try:
                os.unlink(tmp)
            except OSError:
                pass


class FolderLock:
    """One cohort at a time writes an OUTDIR (an flock on OUTDIR/.cohort.lock; released when the
    process ends, however it ends)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".cohort.lock")
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:              # pragma: no cover - not POSIX: no lock
            return self
        try:
            self.handle = open(self.path, "a")
        except OSError as exc:
            raise SynPoError("cannot write to the output folder %s: %s" % (os.path.dirname(self.path),
                                                                        exc.strerror or exc)) from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise SynPoError("another synpo cohort is writing to %s; wait for it or choose another output folder"
                             % os.path.dirname(self.path)) from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()


# --------------------------------------------------------------------------- on the workers

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:                      # the module imports without Dask; running a cohort needs it
    WorkerPlugin = object


class SynPoModels(WorkerPlugin):
    """Loads the models once per worker (again on a worker that restarts); tasks take them from
    the worker (worker_models)."""

    idempotent = False

    def __init__(self, spec: dict, threads: Optional[int], local: bool = False):
        self.spec, self.threads, self.local = dict(spec), threads, local
        self.models = None

    async def setup(self, worker):
        import asyncio
        import signal
        import torch
        if self.local:
            # A local cluster's worker processes share the terminal's process group: Ctrl+C reached them too,
            # and a second one interrupted their closing (a traceback). The command closes them itself.
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            except ValueError:           # (not the process's main thread: left as it is)
                pass
        threads = self.threads
        if not threads:                  # the cores this process may use, shared by its task slots
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // max(1, worker.state.nthreads))
        torch.set_num_threads(int(threads))
        from .session import Models
        loop = asyncio.get_running_loop()     # the worker's event loop keeps answering meanwhile
        self.models = await loop.run_in_executor(None, lambda: Models.load(quiet=True, **self.spec))

    def teardown(self, worker):
        self.models = None


def worker_models():
    from distributed import get_worker
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.models is None:
        raise SynPoError("the worker has no SynPo models (its plugin failed to load them; see the worker's log)")
    return plugin.models


def _reference_slices(ref_image, cfg, axis: int):
    """The reference's normalised slices across the slicing axis, as VolumeRun takes them."""
    import numpy as np
    from .intensity import normalize
    from .support import to_slices
    return np.ascontiguousarray(to_slices(normalize(ref_image, cfg.intensity)[0], axis))


def reference_features(reference, cfg, embedding_cache: Optional[str]) -> dict:
    """Task: the reference's support slices embedded by each encoder, once for the whole cohort.
    Returns {"models": what the worker loaded, "axis", "modality" (the reference's, as guessed: the
    query rows compare theirs), "encoders": {name: (frame, {slice: fp16 embedding})}}; a query task
    whose frame matches uses them (inject_reference)."""
    from .features import batch_size_for
    from .intensity import guess_modality
    from .support import find_support, in_plane_spacing
    from .volume import EmbeddingStore
    ref_image, ref_labels, ref_geometry = reference
    models = worker_models()
    support = find_support(ref_labels)
    slices = _reference_slices(ref_image, cfg, support.axis)
    spacing_rc = in_plane_spacing(ref_geometry.spacing, support.axis)
    wanted = sorted({s for v in support.slices.values() for s in v})
    out = {}
    for name, enc in (("sam", models.sam), ("dinov2", models.dino)):
        if name == "sam" or name in models.confidence_from:
            frame = enc.frame(slices.shape[1], slices.shape[2], spacing_rc)
            store = EmbeddingStore(enc, slices, frame, batch_size_for(enc.device, getattr(enc, "name", ""),
                                                                      cfg.volume.batch_size), embedding_cache)
            store.ensure(wanted)          # as VolumeRun.open_stores embeds them: the same batches
            out[name] = (frame, {i: store.cache[i] for i in wanted})
    return {"models": models.describe(), "axis": support.axis, "modality": guess_modality(ref_image),
            "encoders": out}


def inject_reference(session, features: dict, ref_image, cfg, spacing_ijk) -> bool:
    """Put the shared reference embeddings where the session's run looks for them (the support
    stores); False when this query's frame differs (its run then embeds the reference itself)."""
    from .features import batch_size_for
    from .support import in_plane_spacing
    from .volume import EmbeddingStore, store_key
    axis = features["axis"]
    slices = None
    models = session.models
    used = False
    for name, (frame, cache) in features["encoders"].items():
        enc = models.sam if name == "sam" else models.dino
        if slices is None:
            slices = _reference_slices(ref_image, cfg, axis)
        if enc.frame(slices.shape[1], slices.shape[2], in_plane_spacing(spacing_ijk, axis)) != frame:
            continue
        store = EmbeddingStore(enc, slices, frame, batch_size_for(enc.device, getattr(enc, "name", ""),
                                                                  cfg.volume.batch_size))
        store.cache.update(cache)
        session.stores[store_key("support", name, enc, axis)] = store
        used = True
    return used


def _input_warnings(image, reference_modality: str) -> List[str]:
    """What a volume of the wrong kind looks like, for its row (it is segmented all the same): a label
    map among the images (a folder of image_N and label_N files), or a modality other than the
    reference's (`reference_modality`, guessed once: a CT among MR volumes)."""
    import numpy as np
    from .intensity import guess_modality
    warnings = []
    sample = image.ravel()[::max(1, image.size // 200000)]
    if np.allclose(sample, np.round(sample)):
        distinct = len(np.unique(sample))
        if distinct <= 20:
            warnings.append("only %d distinct values: a label map, not an image?" % distinct)
    query, reference = guess_modality(image), reference_modality
    if query.startswith("ct") != reference.startswith("ct"):
        warnings.append("looks like %s, the reference like %s" % ("CT" if query.startswith("ct") else "MR",
                                                                  "CT" if reference.startswith("ct") else "MR"))
    return warnings


def _summary(result) -> Tuple[str, str, List[str]]:
    """(organs found, slices per organ, warnings) of a result, as the table writes them."""
    import numpy as np
    from .outputs import collapse_warnings
    from .support import to_slices
    labels = to_slices(result.labels, result.support.axis)
    found, counts, warnings = [], [], list(collapse_warnings(result))
    for v in result.support.labels:
        n = int((labels == v).reshape(len(labels), -1).any(1).sum())
        counts.append("%d:%d" % (v, n))
        if n:
            found.append(str(v))
        else:
            warnings.append("label %d: not found" % v)
    return " ".join(found), " ".join(counts), warnings


def segment_query(query: str, name: str, outdir: str, reference, features: dict, cfg, options: dict,
                  earlier: Tuple[str, ...] = ()) -> dict:
    """Task: one query volume segmented and written; returns its table row (`outputs`: the files it
    wrote). Never raises for the volume's own problems: they are its row's error (a dying worker is
    Dask's to retry). `earlier`: files an earlier run wrote for this volume that this run does not
    ask for (its confidence, its points): removed once this run is done or has failed, so the folder
    holds one run's outputs per volume (a later run that asks for them must make them again)."""
    t0 = time.perf_counter()
    row = {c: "" for c in COLUMNS}
    row.update(name=name, query=query, settings_hash=options["hash"])
    paths = output_paths(outdir, name, options["confidence"], options["points"], options["labels"])
    try:
        row["query_stamp"] = file_stamp(query)
        from .io import nifti_placement_note, orient_like, read_volume, turn_of
        from .outputs import write_result
        from .session import Session
        ref_image, ref_labels, ref_geometry = reference
        models = worker_models()
        image, geometry = read_volume(query, "query image")
        remove_stale_temporaries(paths.values())
        session = Session(image, geometry.spacing, models, options["embedding_cache"])
        # The reference stored as this volume is (another axis order or sense: as `synpo segment
        # --support-image` turns it); the shared embeddings are of the reference as stored.
        turned = orient_like(ref_image, ref_geometry, geometry, "the reference")
        row["reference_turn"] = turn_of(ref_geometry, geometry)
        if turned is ref_image:
            inject_reference(session, features, ref_image, cfg, geometry.spacing)
        ref_image, ref_labels = turned, orient_like(ref_labels, ref_geometry, geometry, "the reference")
        result = session.run(ref_labels, cfg, support_image=ref_image,
                             confidence_everywhere=options["confidence_all"])
        write_result(result, geometry, paths["labels"], paths.get("confidence"), paths.get("points"), query)
        row["organs_found"], row["slices_per_organ"], warnings = _summary(result)
        # (as synpo segment warns: the outputs carry the placement ITK read)
        placement = nifti_placement_note(query, geometry, shown=os.path.basename(query))
        warnings = [placement] * bool(placement) + _input_warnings(image, features["modality"]) + warnings
        row.update(status="done", warnings=" | ".join(warnings),
                   outputs=encode_outputs(os.path.basename(p) for p in paths.values() if os.path.exists(p)))
    except SynPoError as exc:
        row.update(status="failed", error=str(exc))
    except MemoryError:
        row.update(status="failed", error="out of memory")
    except Exception as exc:              # the volume's problem, one line; the cohort goes on
        row.update(status="failed", error=("%s: %s" % (type(exc).__name__, exc)).splitlines()[0][:500])
    if row["status"] == "failed":
        # A volume segmented again (other settings, another file) that fails keeps no output of the
        # earlier run beside its "failed" row (run_cohort only runs volumes whose outputs are its own).
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)
    for p in earlier:
        if os.path.exists(p):
            os.unlink(p)
    row["seconds"] = "%.1f" % (time.perf_counter() - t0)
    return row


# --------------------------------------------------------------------------- the client

def add_arguments(p) -> None:
    from .cli import FEATURE_CHOICES, add_runtime_option
    from .config import COHORT_THREADS_PER_WORKER
    p.add_argument("ref_image", metavar="REF_IMAGE", help="the reference volume the labels were painted on")
    p.add_argument("ref_labels", metavar="REF_LABELS",
                   help="label map on REF_IMAGE's grid: each label painted on one or a few parallel slices")
    p.add_argument("queries", metavar="QUERY", nargs="+",
                   help="volumes to segment: files, folders (their volume files) or glob patterns in quotes")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for <name>_synpo.nii.gz per query and cohort.csv (created if missing)")
    p.add_argument("--confidence", action="store_true", help="also write <name>_confidence.nii.gz")
    p.add_argument("--confidence-all", action="store_true",
                   help="compute the confidence of every slice (embeds every slice of every query)")
    p.add_argument("--points", action="store_true", help="also write <name>_points.json (prompt points per slice)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running Dask scheduler (tcp://HOST:PORT, e.g. a dask-jobqueue SLURMCluster's); by "
                        "default a local cluster is started. Workers read the queries and write OUTDIR: the "
                        "paths must be the same on every worker")
    p.add_argument("--workers", type=int, metavar="N",
                   help="local cluster: worker processes (default: cores / threads per worker)")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="torch threads of one worker's inference (default %d on a local cluster; on a remote "
                        "one, the worker's cores / its task slots)" % COHORT_THREADS_PER_WORKER)
    p.add_argument("--memory-limit", metavar="SIZE", default="auto",
                   help="local cluster: memory per worker (e.g. 6GB; default auto = this machine's memory / "
                        "workers); a worker beyond it is restarted and its volume retried")
    p.add_argument("--dashboard", metavar="ADDRESS", default=":8787",
                   help="local cluster: the dashboard's address (default :8787; none: no dashboard)")
    p.add_argument("--sam", default="litemedsam", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--features", default="auto", choices=FEATURE_CHOICES)
    p.add_argument("--dinov2", default="small", choices=("small", "base", "large", "giant"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--modality", default=None, choices=("ct", "mr"))
    add_runtime_option(p)
    p.add_argument("--embedding-cache", metavar="DIR",
                   help="keep embeddings in DIR (shared by the workers) so a re-run only decodes")
    p.add_argument("--quiet", action="store_true", help="only the summary line and errors")


def read_reference(image_path: str, labels_path: str):
    """(image, labels, geometry) of the reference; SynPoError when unreadable or on two grids."""
    from .io import labels_on_grid, read_volume
    ref, ref_geometry = read_volume(image_path, "reference image")
    labels, lab_geometry = read_volume(labels_path, "reference labels", label=True)
    # (the same voxels stored with their axes turned are taken, as synpo segment takes them)
    labels, _ = labels_on_grid(labels, lab_geometry, ref_geometry, "reference labels", "reference image")
    return ref, labels, ref_geometry


def load_reference(image_path: str, labels_path: str, stamps: Tuple[str, str]):
    """Task: the reference as the query tasks take it, (image, labels, geometry), read on a worker
    from the files the client checked (workers read the queries from the same shared paths).

    A task and not scattered data: Dask's active memory manager (ReduceReplicas, on by default)
    drops a broadcast's extra copies, and scattered data dies with the worker holding it ("lost
    scattered data, which can't be recovered"), failing every task still to run; a task's result
    is computed again elsewhere."""
    if (file_stamp(image_path), file_stamp(labels_path)) != tuple(stamps):
        raise SynPoError("the reference image or labels changed while the cohort ran; run it again")
    return read_reference(image_path, labels_path)


def _check_reference(args):
    from .support import find_support
    ref, labels, ref_geometry = read_reference(args.ref_image, args.ref_labels)
    return ref, labels, ref_geometry, find_support(labels)


def local_sizing(args):
    """(workers, threads per worker, memory limit per worker in bytes) of the local cluster; SynPoError
    for --workers the memory cannot hold (checked before anything is planned or started)."""
    import psutil
    from dask.utils import format_bytes
    from .config import COHORT_THREADS_PER_WORKER
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads_per_worker or COHORT_THREADS_PER_WORKER
    workers = args.workers or max(1, cores // threads)
    if args.memory_limit in (None, "auto"):
        total = int(psutil.virtual_memory().total)
        if not args.workers:             # no more workers by default than the memory holds (many cores, little memory)
            workers = max(1, min(workers, total // MIN_WORKER_MEMORY))
        memory = total // workers
        if args.workers and memory < MIN_WORKER_MEMORY:     # as --memory-limit under 2GB is refused
            raise SynPoError("--workers %d: this machine's memory / %d is %s per worker, under the 2GB a worker "
                             "needs; give fewer workers, or --memory-limit" % (workers, workers, format_bytes(memory)))
    else:
        memory = memory_limit(args.memory_limit)
    return workers, threads, memory


def _local_cluster(args, say):
    from dask.utils import format_bytes
    from distributed import LocalCluster
    workers, threads, memory = local_sizing(args)
    dashboard = None if str(args.dashboard).lower() == "none" else args.dashboard
    # With no dashboard the scheduler still serves its HTTP routes (health, metrics), on 8787 unless
    # told otherwise (distributed's Scheduler: default_port 8787), warning when that port is taken.
    quiet_http = {"dashboard_address": ":0"} if dashboard is None else None
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory,
                               dashboard_address=dashboard, silence_logs=logging.ERROR,
                               scheduler_kwargs=quiet_http)
    except Exception as exc:             # (a worker process that cannot start: a traceback before)
        cause = exc.__cause__ or exc.__context__
        raise SynPoError("the local Dask cluster did not start: %s%s" % (
            _one_line(exc), " (%s)" % _one_line(cause) if cause is not None else "")) from None
    say("cohort: local cluster, %d worker process%s x %d thread%s, memory limit %s per worker"
        % (workers, "es" if workers > 1 else "", threads, "s" if threads > 1 else "",
           format_bytes(memory) if memory else "none"))
    return cluster, threads


# A worker holds torch and the models (LiteMedSAM: 1.04 GiB resident once loaded, measured) and Dask pauses
# a worker at 80 % of its limit: under 2 GiB one died while loading the models, or sat paused for good.
MIN_WORKER_MEMORY = 2 * 10 ** 9                 # "2GB" as Dask reads it


def memory_limit(text: str) -> int:
    """--memory-limit in bytes (0: no limit, as Dask reads it); SynPoError for anything else than a size
    of at least MIN_WORKER_MEMORY."""
    from dask.utils import parse_bytes
    try:
        memory = int(parse_bytes(text))
    except (ValueError, TypeError):
        raise SynPoError("--memory-limit %r: give a size such as 6GB" % text) from None
    zero = not any(d in str(text) for d in "123456789")       # ("0.5": Dask rounds it to 0 bytes, not "no limit")
    if (memory != 0 or not zero) and memory < MIN_WORKER_MEMORY:
        raise SynPoError("--memory-limit %r: give a size of at least 2GB per worker (0: no limit)" % text)
    return memory


def check_dashboard_address(address: str) -> None:
    """SynPoError unless `address` is [HOST]:PORT or PORT with a port number and a host this machine
    resolves (LocalCluster failed on it after the cluster had begun to start, with a traceback)."""
    import socket
    host, _, port = str(address).rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SynPoError("--dashboard %r: give :PORT or HOST:PORT (e.g. :8787), or none" % address)
    host = host.strip("[]")
    if host:
        try:
            socket.getaddrinfo(host, int(port))
        except (socket.gaierror, UnicodeError) as exc:
            raise SynPoError("--dashboard %r: host %s: %s" % (address, host, getattr(exc, "strerror", None) or exc)) \
                from None


def check_scheduler_address(address: str) -> None:
    """SynPoError unless `address` reads as a Dask scheduler's (tcp://HOST:PORT, HOST:PORT, tls://...)."""
    from distributed.comm.addressing import get_address_host_port
    try:
        get_address_host_port(address)
    except ValueError as exc:
        raise SynPoError("--scheduler %r is not a scheduler address (%s): give tcp://HOST:PORT" % (address, exc)) \
            from None


def run_cohort(args) -> int:
    from .config import configured
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.workers is not None and args.workers < 1:
        raise SynPoError("--workers must be >= 1")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise SynPoError("--threads-per-worker must be >= 1")
    if args.scheduler and (args.workers or args.memory_limit not in (None, "auto")):
        raise SynPoError("--workers and --memory-limit size a local cluster; with --scheduler the cluster is yours")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise SynPoError("synpo cohort needs Dask: pip install \"dask[distributed]\" (or pip install synpo[cohort])") \
            from None
    if args.scheduler:
        check_scheduler_address(args.scheduler)
    else:
        local_sizing(args)               # (--workers the memory cannot hold: one line before anything is said)
    if str(args.dashboard).lower() != "none" and not args.scheduler:
        check_dashboard_address(args.dashboard)
    outdir = args.output
    if not outdir:
        raise SynPoError("-o/--output is empty: give the output folder")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise SynPoError("output path is not a folder: %s" % outdir)
    parent = os.path.dirname(os.path.abspath(outdir))
    if not os.path.isdir(parent):
        raise SynPoError("output folder's parent does not exist: %s" % parent)
    ref_image, ref_labels, ref_geometry, support = _check_reference(args)
    cfg = configured(args.set, args.modality)
    queries = expand_queries(args.queries, [args.ref_labels], outdir)
    names: Dict[str, str] = {}
    folded: Dict[str, str] = {}          # (macOS's, Windows' and many shares' file systems ignore case)
    for q in queries:
        name = volume_name(q)
        if name.casefold() in folded:
            other = folded[name.casefold()]
            raise SynPoError("two queries are both named %s (%s, %s): outputs are named after the file; rename one"
                             % (name if other == name else "%s or %s, to a file system that ignores case" % (
                                 other, name), names[other], q))
        names[name] = q
        folded[name.casefold()] = name
    labels = list(support.labels)
    created = not os.path.exists(outdir)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise SynPoError("cannot make the output folder %s: %s" % (outdir, exc.strerror or exc)) from None
    return _run_in(args, outdir, names, labels, support, cfg, queries, say, created, ref_geometry)


def _remove_if_only_lock(outdir: str) -> None:
    try:
        if os.listdir(outdir) in ([], [".cohort.lock"]):
            if os.path.exists(os.path.join(outdir, ".cohort.lock")):
                os.unlink(os.path.join(outdir, ".cohort.lock"))
            os.rmdir(outdir)
    except OSError:
        pass


def encode_outputs(names) -> str:
    """The `outputs` cell: a JSON list of file names (a name may hold spaces)."""
    return json.dumps(sorted(set(names)))


def is_output_name(base: str, name: str) -> bool:
    """Whether `base` is the name of one of volume `name`'s output files, exactly (output_paths)."""
    import re
    return base in (name + "_synpo.nii.gz", name + "_confidence.nii.gz", name + "_points.json") or \
        re.fullmatch(re.escape(name) + r"_confidence_label\d+\.nii\.gz", base) is not None


def _listed(cell: str) -> Optional[list]:
    """The `outputs` cell read: its list ("" is none); None for a row from a table before the column, or a
    cell that is not a JSON list (edited by hand)."""
    try:
        listed = json.loads(cell or "[]")
    except ValueError:
        return None
    return listed if isinstance(listed, list) else None


def _unknown_outputs(cell: str) -> bool:
    return _listed(cell) is None


def _recorded(row: Optional[dict], name: str) -> Optional[set]:
    """The output files (base names) an earlier run recorded for this volume; None without a row. Only
    exact names of this volume's outputs count: a table edited by hand names no other file to remove."""
    if row is None:
        return None
    return {b for b in _listed(row.get("outputs")) or [] if isinstance(b, str) and is_output_name(b, name)}


def _migrated(paths: Dict[str, str]) -> str:
    """The `outputs` cell of a row from a table written before the column: its labels file and the
    outputs asked for now, where they exist (what that version overwrote or skipped on), never a file
    of that name it did not write and this run does not ask for (removed otherwise, as an earlier run's)."""
    return encode_outputs(os.path.basename(p) for p in paths.values() if os.path.exists(p))


def _run_in(args, outdir, names, labels, support, cfg, queries, say, created, ref_geometry) -> int:
    with FolderLock(outdir):
        try:
            return _plan_and_run(args, outdir, names, labels, support, cfg, queries, say, ref_geometry)
        except SynPoError:
            if created:               # a usage error made nothing: not even the folder it would have written
                _remove_if_only_lock(outdir)           # (while the lock is held: no other cohort is in it)
            raise


def _same_turn(row: dict, query: str, ref_geometry) -> bool:
    """Whether a done row's reference was turned for its volume as this run would turn it. A row from
    before the `reference_turn` column (empty) took the reference as stored: right only where no turn
    is needed (before, a reference stored in another axis order or sense than the volume was taken as
    stored, and segmented the wrong axis or side)."""
    from .io import read_geometry, turn_of
    geometry = read_geometry(query)
    return geometry is not None and row.get("reference_turn", "") == turn_of(ref_geometry, geometry)


def _edited_outputs(row: Optional[dict], outdir: str) -> List[str]:
    """The outputs a finished run wrote that have changed since (size or modification time against
    its `output_stamps`): the user's corrections, never replaced or removed without their say. A row
    "started" by a run that was interrupted keeps the stamps of the last finished one (_mark_started):
    a draft corrected after the interruption is found too. Rows from before that column, or of a
    volume no run finished, have no stamps: nothing to compare."""
    if row is None or row.get("status") not in ("done", "started") or not row.get("output_stamps"):
        return []
    try:
        stamps = json.loads(row["output_stamps"])
    except ValueError:
        return []
    if not isinstance(stamps, dict):
        return []
    edited = []
    for base, stamp in sorted(stamps.items()):
        path = os.path.join(outdir, str(base))
        if is_output_name(str(base), row["name"]) and os.path.isfile(path) and _changed(str(stamp), file_stamp(path)):
            edited.append(path)
    return edited


def _changed(recorded: str, now: str) -> bool:
    """Two "size:mtime_ns" stamps of one file: another size, or a time over 2 s apart (a worker on
    another machine and the client may see the times of a shared file system at other precisions:
    FAT's 2 s, SMB's 100 ns)."""
    try:
        (size0, time0), (size1, time1) = (tuple(int(x) for x in t.split(":")) for t in (recorded, now))
    except ValueError:
        return recorded != now
    return size0 != size1 or abs(time0 - time1) > 2 * 10 ** 9


def _plan_and_run(args, outdir, names, labels, support, cfg, queries, say, ref_geometry) -> int:
    from .cli import _same_file
    csv_path = os.path.join(outdir, CSV_NAME)
    remove_stale_temporaries([csv_path])          # a cohort killed while writing its table
    rows = read_rows(csv_path)
    migrated = [name for name in names if name in rows and _unknown_outputs(rows[name]["outputs"])]
    for name in migrated:                         # rows from before the `outputs` column, in this run
        rows[name]["outputs"] = _migrated(output_paths(outdir, name, args.confidence, args.points, labels))
    digest = settings_hash(args, cfg)
    inputs = [args.ref_image, args.ref_labels] + queries
    todo, skipped, redone, earlier = [], [], [], {}
    for name, q in names.items():
        paths = output_paths(outdir, name, args.confidence, args.points, labels)
        for p in paths.values():
            for src in inputs:
                if _same_file(p, src):
                    raise SynPoError("output %s would overwrite the input %s; choose another output folder"
                                     % (p, src))
        old = rows.get(name)
        recorded = _recorded(old, name)
        # A file with an output's name that no run of this cohort wrote (none recorded it) is the user's.
        foreign = [p for p in paths.values() if os.path.exists(p)
                   and (recorded is None or os.path.basename(p) not in recorded)]
        if foreign:
            raise SynPoError("%s exists but %s has no record of writing it for %s: it is not a cohort output (or "
                             "an interrupted run's); remove it or choose another output folder"
                             % (foreign[0], CSV_NAME, name))
        if (old is not None and old["status"] == "done" and old["settings_hash"] == digest
                and _same_file(old["query"], q)
                and old["query_stamp"] == file_stamp(q) and all(os.path.exists(p) for p in paths.values())
                and _same_turn(old, q, ref_geometry)):
            skipped.append(name)
            continue
        if (old is not None and old["status"] == "done" and old["query"] and os.path.isfile(old["query"])
                and not _same_file(old["query"], q)):
            raise SynPoError("%s holds the outputs of %s from %s, another file of that name that still exists; "
                             "segmenting %s would replace them: choose another output folder (or remove %s's row "
                             "from %s)" % (outdir, name, old["query"], q, name, CSV_NAME))
        edited = _edited_outputs(old, outdir)
        if edited and old["status"] == "started":
            raise SynPoError("%s was changed after synpo cohort last finished it (a corrected draft, or the output of "
                             "the run that was interrupted while segmenting %s), and segmenting %s again would replace "
                             "or remove it; move it out of %s first (or delete it to have it made again)"
                             % (edited[0], name, name, outdir))
        if edited:
            raise SynPoError("%s was changed after synpo cohort wrote it (a corrected draft?), and segmenting %s again "
                             "(other settings, another file or other outputs) would replace or remove it; move it out "
                             "of %s first" % (edited[0], name, outdir))
        if old is not None and old["status"] == "done":
            redone.append(name)
        asked = {os.path.basename(p) for p in paths.values()}
        earlier[name] = tuple(os.path.join(os.path.abspath(outdir), b) for b in sorted((recorded or set()) - asked))
        todo.append(name)
    say("cohort: %d volume%s, %d already done with these settings (skipped), %d to segment -> %s"
        % (len(names), "s" if len(names) != 1 else "", len(skipped), len(todo), csv_path))
    if redone:
        say("cohort: %d volume%s done earlier with other settings, another file or other outputs asked for "
            "(or one missing), or a reference taken in another layout: segmented again, outputs replaced" % (len(redone), "s" if len(redone) != 1 else ""))
    if not todo:
        if migrated:
            write_rows(csv_path, rows)
        return _finish(rows, list(names), say)
    options = {"hash": digest, "confidence": bool(args.confidence), "points": bool(args.points),
               "n_painted": len({s for v in support.slices.values() for s in v}),
               "confidence_all": bool(args.confidence_all), "labels": labels,
               "embedding_cache": args.embedding_cache}
    reference = (os.path.abspath(args.ref_image), os.path.abspath(args.ref_labels),
                 (file_stamp(args.ref_image), file_stamp(args.ref_labels)))
    return _run_tasks(args, cfg, reference, todo, names, rows, csv_path, options, say, earlier)


def _mark_started(todo, names, rows, csv_path, outdir, options) -> None:
    """Each volume about to be segmented is "started" in the table, with the outputs it may write: an
    interrupted run (Ctrl+C, a task a --scheduler finishes after the command ended, a worker killed
    between two renames) leaves files the next run knows as this cohort's, and it segments them again."""
    for name in todo:
        row = rows.get(name) or dict({c: "" for c in COLUMNS}, name=name, query=os.path.abspath(names[name]))
        asked = output_paths(outdir, name, options["confidence"], options["points"], options["labels"]).values()
        # The stamps of the files the last finished run wrote stay: a draft the user corrects after this
        # run is interrupted is still known as changed (the next run refused to replace it only when "done").
        row.update(status="started",
                   outputs=encode_outputs((_recorded(row, name) or set()) | {os.path.basename(p) for p in asked}))
        rows[name] = row
    write_rows(csv_path, rows)


def _run_tasks(args, cfg, reference, todo, names, rows, csv_path, options, say, earlier) -> int:
    from distributed import Client, as_completed
    cluster = None
    client = None
    futures = []
    done = 0
    restore = interrupt_on(("SIGTERM",))     # kill, a batch system's scancel: as cleanly as Ctrl+C
    try:
        if args.scheduler:
            try:
                client = Client(args.scheduler, timeout="30s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SynPoError("cannot reach the Dask scheduler at %s: %s" % (args.scheduler, exc)) from None
            threads = args.threads_per_worker
            n = len(client.scheduler_info().get("workers", {}))
            say("cohort: scheduler %s, %d worker%s now" % (args.scheduler, n, "s" if n != 1 else ""))
            if n == 0:     # its tasks wait on the scheduler until a worker joins: say so, not silence
                say("cohort: waiting for a worker to join the scheduler (start some, e.g. a dask-jobqueue "
                    "cluster's scale(n)); Ctrl+C stops")
        else:
            cluster, threads = _local_cluster(args, say)
            client = Client(cluster)
        if (str(args.dashboard).lower() != "none" if cluster is not None else _serves_dashboard(client)):
            say("cohort: dashboard %s" % client.dashboard_link)
        spec = {"sam": args.sam, "features": args.features, "dinov2": args.dinov2, "device": args.device,
                "precision": args.precision, "runtime": args.runtime}
        try:
            client.register_plugin(SynPoModels(spec, threads, local=cluster is not None), name=PLUGIN_NAME)
        except SynPoError:
            raise
        except Exception as exc:
            raise SynPoError("a worker could not load the models: %s (a worker that died while loading them may "
                             "have run out of memory: see --memory-limit)" % _one_line(exc)) from None
        run_id = uuid.uuid4().hex[:8]     # task keys unique to this run: two cohorts on one cluster never share one
        ref_future = client.submit(load_reference, *reference, pure=False, key="synpo-reference-image-" + run_id)
        features = client.submit(reference_features, ref_future, cfg, options["embedding_cache"], pure=False,
                                 key="synpo-reference-" + run_id)
        try:                     # every volume needs it: its failure is the cohort's, not a volume's
            described = features.result()["models"]
        except SynPoError as exc:
            raise SynPoError("the reference: %s" % exc) from None
        except Exception as exc:
            raise SynPoError("the reference could not be embedded: %s" % _one_line(exc)) from None
        say("cohort: models %s; the reference's %d painted slice%s embedded once"
            % (json.dumps(described, sort_keys=True), options["n_painted"], "s" if options["n_painted"] > 1 else ""))
        _mark_started(todo, names, rows, csv_path, args.output, options)
        for name in todo:
            futures.append(client.submit(segment_query, os.path.abspath(names[name]), name,
                                         os.path.abspath(args.output), ref_future, features, cfg, options,
                                         earlier.get(name, ()),
                                         pure=False, key="synpo-%s-%s" % (name, run_id)))
        by_key = {f.key: name for f, name in zip(futures, todo)}
        for future in as_completed(futures):
            name = by_key[future.key]
            try:
                row = future.result()
            except Exception as exc:      # the task's worker died too often
                row = {c: "" for c in COLUMNS}
                row.update(name=name, status="failed", query=os.path.abspath(names[name]),
                           settings_hash=options["hash"], error=_task_error(exc))
                # What its attempts or an earlier run left is still this cohort's (a re-run replaces it).
                ours = set(os.path.basename(p) for p in earlier.get(name, ())) | set(
                    os.path.basename(p) for p in output_paths(args.output, name, options["confidence"],
                                                              options["points"], options["labels"]).values())
                row["outputs"] = encode_outputs(b for b in ours if os.path.exists(os.path.join(args.output, b)))
            if row["status"] == "done":
                # Stamped here, in the process that compares them on the next run (a worker on another
                # machine may see a shared folder's times at another precision).
                row["output_stamps"] = json.dumps({b: file_stamp(os.path.join(args.output, b))
                                                   for b in (_listed(row["outputs"]) or [])
                                                   if os.path.isfile(os.path.join(args.output, b))}, sort_keys=True)
            rows[name] = row
            write_rows(csv_path, rows)
            done += 1
            say("[%d/%d] %s: %s" % (done, len(todo), name, _describe(row)))
        return _finish(rows, list(names), say)
    except KeyboardInterrupt:
        for f in futures:
            f.cancel()
        sys.stderr.write("synpo: interrupted: %d of %d volumes finished%s; run the same command again to segment "
                         "the rest\n" % (done, len(todo), " and recorded in %s" % csv_path if done else ""))
        return EXIT_INTERRUPTED
    finally:
        restore()
        # A second Ctrl+C (or kill) while the cluster closes: the closing goes on (else it ended in
        # cli.main's "nothing was written", after every row had been, and the workers' tracebacks).
        loud = ignore_interrupts()
        try:
            if client is not None:
                if args.scheduler:
                    try:
                        client.unregister_worker_plugin(PLUGIN_NAME)
                    except Exception:
                        pass
                client.close()
            if cluster is not None:
                cluster.close()
        finally:
            loud()


def _serves_dashboard(client) -> bool:
    """Whether the user's scheduler serves a dashboard page: its `services` list "dashboard" for its HTTP
    routes also when it was started with --no-dashboard (the page then answers 404)."""
    import urllib.request
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return False
    try:
        with urllib.request.urlopen(client.dashboard_link, timeout=3) as answer:
            return answer.status == 200
    except Exception:
        return False


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return ("%s: %s" % (type(exc).__name__, text[0]) if text else type(exc).__name__)[:500]


def _task_error(exc) -> str:
    if type(exc).__name__ == "KilledWorker":
        return "its worker died while segmenting it, again and again (out of memory? see --memory-limit)"
    return _one_line(exc)


def _describe(row: dict) -> str:
    if row["status"] != "done":
        return "FAILED: %s" % row["error"]
    return "done in %s s, slices per label %s%s" % (row["seconds"], row["slices_per_organ"] or "-",
                                                   "; " + row["warnings"] if row["warnings"] else "")


def _finish(rows: Dict[str, dict], names: List[str], say) -> int:
    failed = [n for n in names if rows.get(n, {}).get("status") != "done"]
    which = " (%s%s)" % (", ".join(failed[:10]), " ..." if len(failed) > 10 else "") if failed else ""
    print("cohort: %d of %d volumes done, %d failed%s" % (len(names) - len(failed), len(names), len(failed), which),
          flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK
