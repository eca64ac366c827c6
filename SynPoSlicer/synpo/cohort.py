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

This module: the command's arguments, the plan (which volumes to segment, skip, or refuse to touch)
and the run (tasks submitted, rows recorded as they finish). The rest, one idea a file:
cohort_queries.py (the query volumes and their output names), cohort_table.py (cohort.csv, its
stamps, the folder's lock), cohort_dask.py (the worker plugin, the local cluster), cohort_task.py
(the tasks the workers run), cohort_pending.py (a task's record of the outputs it puts in place).
"""
import json
import os
import sys
import uuid
from typing import Dict, List

from .cohort_dask import (PLUGIN_NAME, SynPoModels, check_dashboard_address, check_scheduler_address,
                          local_cluster, local_sizing, one_line, serves_dashboard, task_error)
from .cohort_pending import pending_outputs, settle_pending
from .cohort_queries import expand_queries, output_paths, volume_name
from .cohort_table import (COLUMNS, CSV_NAME, FolderLock, edited_outputs, encode_outputs, file_stamp,
                           listed_outputs, migrated_outputs, output_stamps, read_rows, recorded_outputs,
                           remove_stale_temporaries, settings_hash, stamp_changed, unknown_outputs, write_rows)
from .cohort_task import load_reference, read_reference, reference_features, segment_query
from .errors import SynPoError
from .lifeline import ignore_interrupts, interrupt_on

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


def _check_reference(args):
    from .support import find_support
    ref, labels, ref_geometry = read_reference(args.ref_image, args.ref_labels)
    return ref, labels, ref_geometry, find_support(labels)


def _remove_if_only_lock(outdir: str) -> None:
    try:
        if os.listdir(outdir) in ([], [".cohort.lock"]):
            if os.path.exists(os.path.join(outdir, ".cohort.lock")):
                os.unlink(os.path.join(outdir, ".cohort.lock"))
            os.rmdir(outdir)
    except OSError:
        pass


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


def _plan_and_run(args, outdir, names, labels, support, cfg, queries, say, ref_geometry) -> int:
    from .cli import _same_file
    csv_path = os.path.join(outdir, CSV_NAME)
    remove_stale_temporaries([csv_path])          # a cohort killed while writing its table
    rows = read_rows(csv_path)
    migrated = [name for name in names if name in rows and unknown_outputs(rows[name]["outputs"])]
    for name in migrated:                         # rows from before the `outputs` column, in this run
        rows[name]["outputs"] = migrated_outputs(output_paths(outdir, name, args.confidence, args.points, labels))
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
        recorded = recorded_outputs(old, name)
        # Files a task of this cohort put in place as its record says (a run interrupted while the task ran
        # on, a --scheduler's): the cohort's, whatever the row says; the volume is segmented again.
        put, changed = pending_outputs(outdir, name)
        if put:
            recorded = (recorded or set()) | put
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
                and _same_turn(old, q, ref_geometry) and not put):
            skipped.append(name)
            continue
        if (old is not None and old["status"] == "done" and old["query"] and os.path.isfile(old["query"])
                and not _same_file(old["query"], q)):
            raise SynPoError("%s holds the outputs of %s from %s, another file of that name that still exists; "
                             "segmenting %s would replace them: choose another output folder (or remove %s's row "
                             "from %s)" % (outdir, name, old["query"], q, name, CSV_NAME))
        edited = sorted([p for p in edited_outputs(old, outdir) if os.path.basename(p) not in put]
                        + [os.path.join(outdir, b) for b in changed if b not in output_stamps(old)])
        if edited and old is not None and old["status"] == "started":
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
                   outputs=encode_outputs((recorded_outputs(row, name) or set())
                                          | {os.path.basename(p) for p in asked}))
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
            cluster, threads = local_cluster(args, say)
            client = Client(cluster)
        if (str(args.dashboard).lower() != "none" if cluster is not None else serves_dashboard(client)):
            say("cohort: dashboard %s" % client.dashboard_link)
        spec = {"sam": args.sam, "features": args.features, "dinov2": args.dinov2, "device": args.device,
                "precision": args.precision, "runtime": args.runtime}
        try:
            client.register_plugin(SynPoModels(spec, threads, local=cluster is not None), name=PLUGIN_NAME)
        except SynPoError:
            raise
        except Exception as exc:
            raise SynPoError("a worker could not load the models: %s (a worker that died while loading them may "
                             "have run out of memory: see --memory-limit)" % one_line(exc)) from None
        run_id = uuid.uuid4().hex[:8]     # task keys unique to this run: two cohorts on one cluster never share one
        ref_future = client.submit(load_reference, *reference, pure=False, key="synpo-reference-image-" + run_id)
        features = client.submit(reference_features, ref_future, cfg, options["embedding_cache"], pure=False,
                                 key="synpo-reference-" + run_id)
        try:                     # every volume needs it: its failure is the cohort's, not a volume's
            described = features.result()["models"]
        except SynPoError as exc:
            raise SynPoError("the reference: %s" % exc) from None
        except Exception as exc:
            raise SynPoError("the reference could not be embedded: %s" % one_line(exc)) from None
        say("cohort: models %s; the reference's %d painted slice%s embedded once"
            % (json.dumps(described, sort_keys=True), options["n_painted"], "s" if options["n_painted"] > 1 else ""))
        _mark_started(todo, names, rows, csv_path, args.output, options)
        options = dict(options, run=run_id)         # (the tasks' records of the outputs they put in place)
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
                           settings_hash=options["hash"], error=task_error(exc))
                # What its attempts or an earlier run left is still this cohort's (a re-run replaces it).
                ours = set(os.path.basename(p) for p in earlier.get(name, ())) | set(
                    os.path.basename(p) for p in output_paths(args.output, name, options["confidence"],
                                                              options["points"], options["labels"]).values())
                row["outputs"] = encode_outputs(b for b in ours if os.path.exists(os.path.join(args.output, b)))
            if row["status"] != "done" and not row.get("output_stamps"):
                # A failed volume keeps the stamps of the last finished run's outputs still in place as it
                # wrote them (as its "started" row did): a draft the user corrects afterwards is still known
                # as changed (they went with the failed row). Not those of files the task removed: a file
                # of the user's given that name later is theirs, no output (it was refused as changed).
                kept = {b: stamp for b, stamp in output_stamps(rows.get(name)).items()
                        if os.path.isfile(os.path.join(args.output, b))
                        and not stamp_changed(stamp, file_stamp(os.path.join(args.output, b)))}
                row["output_stamps"] = json.dumps(kept, sort_keys=True) if kept else ""
            if row["status"] == "done":
                # Stamped here, in the process that compares them on the next run (a worker on another
                # machine may see a shared folder's times at another precision).
                row["output_stamps"] = json.dumps({b: file_stamp(os.path.join(args.output, b))
                                                   for b in (listed_outputs(row["outputs"]) or [])
                                                   if os.path.isfile(os.path.join(args.output, b))}, sort_keys=True)
            rows[name] = row
            write_rows(csv_path, rows)
            if row["status"] == "done":     # (a failed row stamps none: the record still tells them from the user's)
                settle_pending(args.output, name, run_id)          # (its outputs stamped now)
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
