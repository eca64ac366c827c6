"""A volume uploaded to the `synpo web` page: one file, checked before it is read on the server.

`check_upload` refuses from the name and size alone (before the page asks whether the scene may
go); `read_upload` writes the bytes to a private temporary folder, refuses a header that names a
data file elsewhere on the server and a volume with more voxels than the limit allows, reads it,
and says what went wrong with the upload's name, never the server's paths.
"""
import os
import tempfile

import numpy as np

from synpo.errors import SynPoError

# One-file formats: an upload is one file, so a header with a detached data file (.nhdr, .mhd) cannot come.
READABLE = (".nii", ".nii.gz", ".nrrd", ".mha")


def safe_name(name):
    """The upload's file name as it is written on the server: its base name, other characters as "_"."""
    base = os.path.basename(str(name or "")).strip() or "volume"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def check_upload(name, size, max_upload_mb):
    """Refuse an upload of `size` bytes named `name` (safe_name's) that the page would not read."""
    if size > max_upload_mb * 1024 * 1024:
        raise SynPoError("%s is %.3g MB; this server takes uploads up to %g MB (synpo web "
                         "--max-upload-mb)." % (name, size / 1048576.0, max_upload_mb))
    if not name.lower().endswith(READABLE):
        raise SynPoError("%s is not a volume file this page reads (%s)." % (name, ", ".join(READABLE)))


def read_upload(content, name, max_upload_mb):
    """(image [k, j, i], geometry, placement note or None) of the uploaded bytes `content` named
    `name` (safe_name's); a SynPoError that names the upload for anything wrong."""
    from synpo.io import nifti_placement_note, read_volume
    with tempfile.TemporaryDirectory(prefix="synpo-web-") as folder:
        path = os.path.join(folder, name)
        with open(path, "wb") as handle:
            handle.write(content or b"")
        _check_one_file(path, name)
        _check_voxels(path, name, max_upload_mb)
        try:
            image, geometry = read_volume(path, name)
        except SynPoError as exc:
            raise SynPoError(_without_paths(str(exc), folder, name)) from None
        except Exception as exc:          # a reader's own error: one line
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SynPoError("%s could not be read as a volume: %s"
                             % (name, _without_paths(said, folder, name))) from None
        # (as synpo segment warns: the downloads carry the placement ITK read)
        placement = nifti_placement_note(path, geometry, shown=name)
    if image.ndim != 3:
        raise SynPoError("%s is not a 3D scalar volume." % name)
    return image, geometry, placement


def _check_one_file(path, name):
    """Refuse an uploaded header that names a data file of its own (NRRD's "data file", MetaImage's
    ElementDataFile other than LOCAL): read on the server, an absolute path there gave the page the
    bytes of any file the server's account can read (its token, a key), and /dev/stdin or a FIFO
    froze the page. One upload is one file; its whole header is read (io.header_data_files)."""
    from synpo.io import HEADER_LIMIT, header_data_files
    if not name.lower().endswith((".nrrd", ".mha")):
        return
    files = header_data_files(path)
    if files is None:
        raise SynPoError("%s has a header longer than %d MB; upload a volume with a usual header."
                         % (name, HEADER_LIMIT >> 20))
    detached = [f for f in files if not (name.lower().endswith(".mha") and f.upper() == "LOCAL")]
    if detached:
        raise SynPoError("%s names a separate data file (%s); upload a volume whose voxels are in the same file "
                         "(.nrrd with its data attached, .mha, .nii, .nii.gz)." % (name, detached[0][:80]))


def _without_paths(text, folder, name):
    """A reader's message as the page's user should see it: the upload's name in place of the temporary
    path it was read from on the server (said once: read_volume names the file as `what` and path),
    and no process addresses (ITK's "PNGImageIO(0x55b3...)")."""
    import re
    path = os.path.join(folder, name)
    text = text.replace("%s %s" % (name, path), name).replace(path, name).replace(folder, "")
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", text)


def _check_voxels(path, name, max_upload_mb):
    """Refuse, from the header alone, a volume larger than one voxel per byte of --max-upload-mb:
    the page holds about 8 bytes per voxel, and a small compressed file can hold a huge mostly
    empty volume (0.15 MB of .nii.gz: 600 x 512 x 512 voxels, 1.2 GB more memory, 10 s of a
    frozen page)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return                        # not readable: read_volume says why
    size = list(reader.GetSize())
    voxels = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents())
    limit = int(max_upload_mb * 1024 * 1024)
    if voxels > limit:
        raise SynPoError("%s holds %s = %d voxels; this server takes volumes up to %d voxels (one per "
                         "byte of synpo web --max-upload-mb)."
                         % (name, " x ".join(str(n) for n in size), voxels, limit))
