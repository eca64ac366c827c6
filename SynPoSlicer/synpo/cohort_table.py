"""OUTDIR/cohort.csv of `synpo cohort`: one row per volume (COLUMNS), what a re-run compares.

- read_rows / write_rows: the table as {name: row} (every cell a string), written atomically;
- file_stamp: "size:mtime_ns" of a file (a query, an output), settings_hash: what decides the outputs;
- the `outputs` cell (a JSON list of base names: encode_outputs, listed_outputs, recorded_outputs) and
  the `output_stamps` cell (JSON {base name: stamp}: edited_outputs finds the outputs changed since);
- FolderLock (one cohort writes an OUTDIR at a time) and remove_stale_temporaries (what a killed
  writer left beside an output)."""
import csv
import glob
import hashlib
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from .cohort_queries import is_output_name
from .errors import SynPoError
from .weights import sha256_of

CSV_NAME = "cohort.csv"
COLUMNS = ["name", "status", "organs_found", "slices_per_organ", "warnings", "seconds", "settings_hash", "error",
           "query", "query_stamp", "outputs", "reference_turn", "output_stamps"]
UNKNOWN_OUTPUTS = "?"                # a row from a table written before the `outputs` column, not yet in a run


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
            legacy = "outputs" not in reader.fieldnames     # a table from before the column: see migrated_outputs
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


def encode_outputs(names) -> str:
    """The `outputs` cell: a JSON list of file names (a name may hold spaces)."""
    return json.dumps(sorted(set(names)))


def listed_outputs(cell: str) -> Optional[list]:
    """The `outputs` cell read: its list ("" is none); None for a row from a table before the column, or a
    cell that is not a JSON list (edited by hand)."""
    try:
        listed = json.loads(cell or "[]")
    except ValueError:
        return None
    return listed if isinstance(listed, list) else None


def unknown_outputs(cell: str) -> bool:
    return listed_outputs(cell) is None


def recorded_outputs(row: Optional[dict], name: str) -> Optional[set]:
    """The output files (base names) an earlier run recorded for this volume; None without a row. Only
    exact names of this volume's outputs count: a table edited by hand names no other file to remove."""
    if row is None:
        return None
    return {b for b in listed_outputs(row.get("outputs")) or [] if isinstance(b, str) and is_output_name(b, name)}


def migrated_outputs(paths: Dict[str, str]) -> str:
    """The `outputs` cell of a row from a table written before the column: its labels file and the
    outputs asked for now, where they exist (what that version overwrote or skipped on), never a file
    of that name it did not write and this run does not ask for (removed otherwise, as an earlier run's)."""
    return encode_outputs(os.path.basename(p) for p in paths.values() if os.path.exists(p))


def output_stamps(row: Optional[dict]) -> Dict[str, str]:
    """The `output_stamps` cell of a done, started or failed row read (the last two keep the last
    finished run's): {base name: "size:mtime_ns"} of the volume's outputs it names; {} for other rows,
    rows from before that column, or a cell not JSON."""
    if row is None or row.get("status") not in ("done", "started", "failed") or not row.get("output_stamps"):
        return {}
    try:
        stamps = json.loads(row["output_stamps"])
    except ValueError:
        return {}
    if not isinstance(stamps, dict):
        return {}
    return {str(b): str(s) for b, s in stamps.items() if is_output_name(str(b), row["name"])}


def edited_outputs(row: Optional[dict], outdir: str) -> List[str]:
    """The outputs a finished run wrote that have changed since (size or modification time against
    its `output_stamps`): the user's corrections, never replaced or removed without their say. A row
    "started" by a run that was interrupted keeps the stamps of the last finished one (cohort._mark_started):
    a draft corrected after the interruption is found too. Rows from before that column, or of a
    volume no run finished, have no stamps: nothing to compare."""
    edited = []
    for base, stamp in sorted(output_stamps(row).items()):
        path = os.path.join(outdir, base)
        if os.path.isfile(path) and stamp_changed(stamp, file_stamp(path)):
            edited.append(path)
    return edited


def stamp_changed(recorded: str, now: str) -> bool:
    """Two "size:mtime_ns" stamps of one file: another size, or a time over 2 s apart (a worker on
    another machine and the client may see the times of a shared file system at other precisions:
    FAT's 2 s, SMB's 100 ns)."""
    try:
        (size0, time0), (size1, time1) = (tuple(int(x) for x in t.split(":")) for t in (recorded, now))
    except ValueError:
        return recorded != now
    return size0 != size1 or abs(time0 - time1) > 2 * 10 ** 9
