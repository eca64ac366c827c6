"""The tasks of `synpo cohort`, run on the Dask workers: the reference read once (load_reference)
and embedded once (reference_features), then one segment_query per volume, which writes the
volume's outputs and returns its table row (cohort_table.COLUMNS). Workers import this module
(the tasks are pickled by reference to it); heavy imports stay inside the functions."""
import os
import time
from typing import List, Optional, Tuple

from .cohort_dask import worker_models
from .cohort_pending import write_pending
from .cohort_queries import output_paths
from .cohort_table import COLUMNS, encode_outputs, file_stamp, remove_stale_temporaries
from .errors import SynPoError


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


def _reference_slices(ref_image, cfg, axis: int, layout=None):
    """The reference's normalised slices across the slicing axis, as VolumeRun takes them (in the
    encoders' layout: `layout`, a layout.Layout; as stored when None)."""
    import numpy as np
    from .intensity import normalize
    from .layout import Layout
    from .support import to_slices
    layout = layout if layout is not None else Layout(axis)
    return np.ascontiguousarray(to_slices(normalize(layout.volume(ref_image), cfg.intensity)[0], axis))


def reference_features(reference, cfg, embedding_cache: Optional[str]) -> dict:
    """Task: the reference's support slices embedded by each encoder, once for the whole cohort.
    Returns {"models": what the worker loaded, "axis", "modality" (the reference's, as guessed: the
    query rows compare theirs), "encoders": {name: (frame, {slice: fp16 embedding})}}; a query task
    whose frame matches uses them (inject_reference)."""
    from .features import batch_size_for
    from .intensity import guess_modality
    from .layout import in_plane_layout, known_direction
    from .support import find_support, in_plane_spacing
    from .volume import EmbeddingStore
    ref_image, ref_labels, ref_geometry = reference
    models = worker_models()
    support = find_support(ref_labels)
    layout = in_plane_layout(known_direction(ref_geometry.direction, ref_geometry.origin), support.axis,
                             ref_image.shape)                     # (as a query stored as it is: Session)
    slices = _reference_slices(ref_image, cfg, support.axis, layout)
    spacing_rc = in_plane_spacing(layout.spacing(ref_geometry.spacing), support.axis)
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
            "encoders": out, "layout": layout.key}


def inject_reference(session, features: dict, ref_image, cfg, spacing_ijk) -> bool:
    """Put the shared reference embeddings where the session's run looks for them (the support
    stores); False when this query's frame differs, or its run takes the reference's slices in another
    layout than the reference task embedded them (layout.in_plane_layout of the query's direction and of
    the reference's, which orient_like leaves as stored within 40 degrees: a square slice has the same
    frame both ways, and the store would hold the other layout's embeddings): its run then embeds the
    reference itself."""
    from .features import batch_size_for
    from .support import in_plane_spacing
    from .volume import EmbeddingStore, store_key
    axis = features["axis"]
    layout = session.layout(axis)                  # (the reference as the session's run takes it)
    embedded_as = features.get("layout") or (None, False, False)      # (none given: embedded as stored)
    if ((None if embedded_as[0] is None else tuple(embedded_as[0]),)
            + tuple(bool(x) for x in embedded_as[1:])) != layout.key:
        return False
    spacing_ijk = layout.spacing(spacing_ijk)
    slices = None
    models = session.models
    used = False
    for name, (frame, cache) in features["encoders"].items():
        enc = models.sam if name == "sam" else models.dino
        if slices is None:
            slices = _reference_slices(ref_image, cfg, axis, layout)
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
    holds one run's outputs per volume (a later run that asks for them must make them again).
    `options["run"]`: the run's id, in the record of the outputs put in place (cohort_pending)."""
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
        session = Session(image, geometry.spacing, models, options["embedding_cache"], geometry.known_direction)
        # The reference stored as this volume is (another axis order or sense: as `synpo segment
        # --support-image` turns it); the shared embeddings are of the reference as stored.
        turned = orient_like(ref_image, ref_geometry, geometry, "the reference")
        row["reference_turn"] = turn_of(ref_geometry, geometry)
        if turned is ref_image:
            inject_reference(session, features, ref_image, cfg, geometry.spacing)
        ref_image, ref_labels = turned, orient_like(ref_labels, ref_geometry, geometry, "the reference")
        result = session.run(ref_labels, cfg, support_image=ref_image,
                             confidence_everywhere=options["confidence_all"])
        # (recorded before they are put in place: a run interrupted meanwhile leaves them known as the cohort's)
        write_result(result, geometry, paths["labels"], paths.get("confidence"), paths.get("points"), query,
                     before_publish=lambda staged: write_pending(outdir, name, options["run"], staged))
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
