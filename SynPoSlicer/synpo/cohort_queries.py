"""The query volumes of `synpo cohort` and the files each one gets.

expand_queries turns the QUERY arguments (files, folders, glob patterns) into volume files;
volume_name gives a file's name without its volume extension (its outputs are named after it);
output_paths lists the outputs of one volume, {kind: path} in OUTDIR; is_output_name tells whether
a base name is exactly one of them (a table edited by hand names no other file to replace)."""
import glob
import os
from typing import Dict, List

from .errors import SynPoError

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files that sit beside volumes and are none: left out of a pattern's matches.
NOT_VOLUMES = (".json", ".bval", ".bvec", ".txt", ".tsv", ".csv", ".raw", ".raw.gz", ".zraw", ".md", ".pdf")


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


def is_output_name(base: str, name: str) -> bool:
    """Whether `base` is the name of one of volume `name`'s output files, exactly (output_paths)."""
    import re
    return base in (name + "_synpo.nii.gz", name + "_confidence.nii.gz", name + "_points.json") or \
        re.fullmatch(re.escape(name) + r"_confidence_label\d+\.nii\.gz", base) is not None
