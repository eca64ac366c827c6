"""Outputs a `synpo cohort` task put in place that no row of cohort.csv stamps (yet).

A segment_query task renames its outputs into OUTDIR on its worker; the client stamps them in the
volume's row when the task's result comes back. Until then, and for good when the client stopped
first (Ctrl+C, a kill: a task already running on a --scheduler's worker is not stopped by the
cancel, and finishes), the files were the cohort's with no record of it: the next run took them for
the user's corrections and refused to replace them.

So the task writes, before its renames, OUTDIR/.NAME.RUN.cohort-pending.json: {base name: stamp}
of the files it is about to put in place (file_stamp of the staged file: a rename keeps its size
and time). The client removes it once the volume's row is written. With one left behind, the next
run knows a file as it says for the cohort's (no correction of the user's: it replaces it without
asking, and segments the volume again), and a file it names that has changed since for the user's
(asked about, even where no row stamps it: a volume no run had finished)."""
import hashlib
import json
import os
import re
from typing import Dict, List, Set, Tuple

from .cohort_queries import is_output_name
from .cohort_table import file_stamp, stamp_changed

SUFFIX = ".cohort-pending.json"


def _key(name: str) -> str:
    """The volume's part of its records' names: its name, or a long one's first 100 characters and a hash
    (".NAME.RUN" + SUFFIX and the temporary file beside it are longer than its outputs' names: a name the
    outputs allowed made the record's too long for the file system, and the volume failed)."""
    if len(os.fsencode(name)) <= 120:                # (bytes: the file system's limit)
        return name
    head = name[:100]
    while len(os.fsencode(head)) > 100:
        head = head[:-1]
    return "%s~%s" % (head, hashlib.sha256(os.fsencode(name)).hexdigest()[:16])


def pending_path(outdir: str, name: str, run: str) -> str:
    """The record of run `run`'s task for volume `name` (a retried task writes it again)."""
    return os.path.join(outdir, ".%s.%s%s" % (_key(name), run, SUFFIX))


def write_pending(outdir: str, name: str, run: str, staged) -> None:
    """Record the staged [(temporary file, output path)] of a task about to rename them into place:
    written atomically (a temporary file renamed over it), before the first output's rename."""
    from .io import stage_json
    stamps = {os.path.basename(path): file_stamp(tmp) for tmp, path in staged}
    record = pending_path(outdir, name, run)
    os.replace(stage_json({"name": name, "run": run, "stamps": stamps}, record), record)


def pending_records(outdir: str, name: str) -> List[str]:
    """The records of volume `name` in OUTDIR, of any run (exactly ".NAME.RUN" + SUFFIX)."""
    exact = re.compile(r"\." + re.escape(_key(name)) + r"\.[0-9a-f]+" + re.escape(SUFFIX))
    try:
        listed = os.listdir(outdir)
    except OSError:
        return []
    return sorted(os.path.join(outdir, f) for f in listed if exact.fullmatch(f))


def _stamps(record: str) -> Dict[str, str]:
    try:
        with open(record, encoding="utf-8") as handle:
            stamps = json.load(handle).get("stamps")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(b): str(s) for b, s in stamps.items()} if isinstance(stamps, dict) else {}


def _described(outdir: str, name: str, record: str) -> Tuple[Set[str], Set[str]]:
    """(as recorded, other): the base names of volume `name`'s output files in OUTDIR that `record`
    names, as it says a task put them in place (the same size and time), and otherwise."""
    same, other = set(), set()
    for base, stamp in _stamps(record).items():
        path = os.path.join(outdir, base)
        if is_output_name(base, name) and os.path.isfile(path):
            (other if stamp_changed(stamp, file_stamp(path)) else same).add(base)
    return same, other


def pending_outputs(outdir: str, name: str) -> Tuple[Set[str], Set[str]]:
    """(put, changed): the base names of volume `name`'s output files in OUTDIR that a task put in place
    as one of the records says (the cohort's, whatever its table says), and of those the records name
    that are as none says (changed since: the user's, unless the volume's row stamps them as they are).
    A record none of whose files is in OUTDIR is removed (a task stopped before its renames)."""
    from .io import discard_staged
    put, named = set(), set()
    for record in pending_records(outdir, name):
        same, other = _described(outdir, name, record)
        if not same and not other:
            discard_staged([record])
        put |= same
        named |= other
    return put, named - put


def settle_pending(outdir: str, name: str, run: str) -> None:
    """Once run `run` has written volume `name`'s row (its outputs stamped there): its record removed,
    and those of other runs that describe none of the volume's files as they are now (replaced by this
    run's); one that still does (a task of an interrupted run that wrote after this run's) is kept."""
    from .io import discard_staged
    own = os.path.basename(pending_path(outdir, name, run))
    for record in pending_records(outdir, name):
        if os.path.basename(record) == own or not _described(outdir, name, record)[0]:
            discard_staged([record])
