"""Reading, checking and atomically writing volumes (SimpleITK), with their geometry.

Arrays are in SimpleITK/Slicer order: array[k, j, i] for voxel index (i, j, k).
Physical coordinates follow ITK: LPS. `Geometry.to_ras` gives Slicer's RAS.
"""
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Geometry:
    size: Tuple[int, int, int]            # (i, j, k) voxel counts
    spacing: Tuple[float, float, float]   # mm along i, j, k
    origin: Tuple[float, float, float]    # LPS position of voxel (0, 0, 0)
    direction: Tuple[float, ...]          # 3x3 row-major, columns are the i, j, k axes in LPS

    @property
    def known_direction(self) -> Optional[Tuple[float, ...]]:
        """The direction where the header says where the volume lies, None for a placeholder (a
        diagonal direction at origin 0: layout.known_direction): what a Session and the server get."""
        from .layout import known_direction
        return known_direction(self.direction, self.origin)

    def index_to_lps(self, ijk) -> np.ndarray:
        """(N, 3) continuous voxel indices (i, j, k) -> (N, 3) LPS millimetres."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ d.T

    @staticmethod
    def to_ras(lps) -> np.ndarray:
        ras = np.array(lps, dtype=float, copy=True)
        ras[..., :2] *= -1.0
        return ras

    def same_grid(self, other: "Geometry", tol: float = 1e-3) -> bool:
        """The same voxels in the same places. The origins may differ by 1 % of the smallest voxel
        (float rounding of a file's header), whatever their distance from the scanner's origin (a
        relative tolerance let a support one whole voxel off pass far from it)."""
        return (tuple(self.size) == tuple(other.size)
                and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
                and bool(np.all(np.abs(np.subtract(self.origin, other.origin))
                                <= 10 * tol * min(min(self.spacing), min(other.spacing))))
                and np.allclose(self.direction, other.direction, atol=tol))

    def describe(self) -> str:
        return "size %s, spacing %s, origin %s, directions %s" % (
            "x".join(str(s) for s in self.size),
            "x".join("%.3g" % s for s in self.spacing),
            ",".join("%.4g" % s for s in self.origin),
            "/".join(",".join("%.3g" % (v if abs(v) > 1e-9 else 0.0)            # (no "-0")
                              for v in np.asarray(self.direction, float).reshape(3, 3)[:, c]) for c in range(3)))


def axes_onto(src: Geometry, dst: Geometry, what: str = "the support image"):
    """How the voxel axes of `src` lie along those of `dst`: (order, signs) with dst's index axis r
    nearest src's index axis order[r], in the same sense where signs[r] is +1. A tilt between them
    (another patient's gantry tilt, an oblique MR plan) is kept, as the arrays were taken before;
    InputError only where an axis of one lies about halfway between two of the other (over 40
    degrees from the nearest: which slices correspond is a guess)."""
    a = np.asarray(src.direction, float).reshape(3, 3)      # columns: src's i, j, k axes in LPS
    b = np.asarray(dst.direction, float).reshape(3, 3)
    m = b.T @ a                                             # m[r, c]: dst axis r . src axis c
    order = [int(np.argmax(np.abs(m[r]))) for r in range(3)]
    if sorted(order) != [0, 1, 2] or min(abs(m[r, order[r]]) for r in range(3)) < np.cos(np.radians(40.0)):
        raise InputError("%s's axes lie between the image's (over 40 degrees from the nearest); resample it "
                         "to the image's orientation first" % what)
    return order, [1 if m[r, order[r]] > 0 else -1 for r in range(3)]


def orient_like(array: np.ndarray, src: Geometry, dst: Geometry, what: str = "the support image") -> np.ndarray:
    """`array` ([k, j, i] on src's grid) with its axes in dst's order and sense (axes_onto): the same
    anatomy, stored as dst stores it (the slicing axis found in a reference's paint then means the
    same direction in the query). The array itself when they already agree."""
    order, signs = axes_onto(src, dst, what)
    if order == [0, 1, 2] and signs == [1, 1, 1]:
        return array
    # numpy axis n holds index axis 2 - n
    out = np.transpose(array, [2 - order[2 - n] for n in range(3)])
    flips = tuple(n for n in range(3) if signs[2 - n] < 0)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


HEADER_LIMIT = 1 << 20              # bytes of a NRRD / MetaImage header read for the data files it names


def header_data_files(path) -> Optional[List[str]]:
    """The data files a NRRD header (`data file:` / `datafile:` lines, up to the blank line that ends it)
    or a MetaImage header (`ElementDataFile =`, its last field) names, as written ("LOCAL": the voxels
    follow in the same file); [] when it names none. None when the header's end is not within
    HEADER_LIMIT bytes: a header padded past the part read must not hide the line that counts."""
    path = os.fspath(path)
    meta = path.lower().endswith((".mha", ".mhd"))
    with open(path, "rb") as handle:
        head = handle.read(HEADER_LIMIT)
        whole = len(head) < HEADER_LIMIT or handle.read(1) == b""
    if meta:
        for line in head.splitlines():
            # (MetaIO takes "=" or ":" between a field and its value: "ElementDataFile: /path" too)
            found = re.match(rb"\s*ElementDataFile\s*[=:](.*)", line, re.IGNORECASE)
            if found:
                return [found.group(1).strip().decode("latin-1")]
        return [] if whole else None
    end = min([i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n"), head.find(b"\r\r")) if i >= 0],
              default=-1)
    if end < 0 and not whole:
        return None
    lines = head[:end if end >= 0 else len(head)].splitlines()
    return [value.strip().decode("latin-1") for key, sep, value in (ln.partition(b":") for ln in lines)
            if sep and key.strip().lower() in (b"data file", b"datafile")]


def on_same_grid(array: np.ndarray, src: Geometry, dst: Geometry) -> Optional[np.ndarray]:
    """`array` ([k, j, i] on src's grid) on dst's grid when src is dst's grid stored with its axes in
    another order or sense (a label map saved LPS-ordered for a RAS-ordered image, the same voxels);
    None when the voxels are not the same."""
    try:
        order, signs = axes_onto(src, dst)
    except InputError:
        return None
    d = np.asarray(src.direction, float).reshape(3, 3)
    first = [0 if signs[r] > 0 else src.size[order[r]] - 1 for r in range(3)]       # dst's voxel 0, per axis
    corner = [0, 0, 0]
    for r in range(3):
        corner[order[r]] = first[r]
    turned = Geometry(size=tuple(src.size[order[r]] for r in range(3)),
                      spacing=tuple(src.spacing[order[r]] for r in range(3)),
                      origin=tuple(src.index_to_lps(corner)[0]),
                      direction=tuple(np.stack([signs[r] * d[:, order[r]] for r in range(3)], axis=1).ravel()))
    return orient_like(array, src, dst) if turned.same_grid(dst) else None


def labels_on_grid(array: np.ndarray, grid: Geometry, onto: Geometry, what: str, onto_what: str = "image"):
    """(array on `onto`'s grid, how it was turned: turn_of, "" when stored alike) for a label map whose
    voxels are `onto`'s, stored with its axes in the same or another order and sense (on_same_grid);
    InputError when its voxels are others (it needs resampling)."""
    if grid.same_grid(onto):
        return array, ""
    turned = on_same_grid(array, grid, onto)
    if turned is None:
        raise InputError("%s grid (%s) differs from the %s grid (%s): resample it onto the %s"
                         % (what, grid.describe(), onto_what, onto.describe(), onto_what))
    return turned, turn_of(grid, onto)


def turn_of(src: Geometry, dst: Geometry) -> str:
    """How orient_like turns an array of src's grid to dst's layout, in words ("" when it is taken as
    stored, "refused" where axes_onto refuses): e.g. "i<-j,j<-i,k<-k-" (dst axis <- src axis, "-" for
    the opposite sense)."""
    try:
        order, signs = axes_onto(src, dst)
    except InputError:
        return "refused"
    if order == [0, 1, 2] and signs == [1, 1, 1]:
        return ""
    return ",".join("%s<-%s%s" % ("ijk"[r], "ijk"[order[r]], "-" if signs[r] < 0 else "") for r in range(3))


def read_geometry(path) -> Optional[Geometry]:
    """A volume file's Geometry from its header alone (nothing decompressed); None when ITK cannot read
    it or it is not 3D (read_volume says why when the volume is read)."""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        size, spacing, origin = size[:3], reader.GetSpacing()[:3], reader.GetOrigin()[:3]
        d = np.asarray(reader.GetDirection(), float).reshape(4, 4)[:3, :3].ravel()
    elif len(size) == 3:
        spacing, origin, d = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    else:
        return None
    return Geometry(tuple(int(s) for s in size), tuple(spacing), tuple(origin), tuple(float(v) for v in d))


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise InputError("SimpleITK is required to read volumes: pip install SimpleITK") from exc
    return sitk


def geometry_of(image) -> Geometry:
    return Geometry(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()),
                    tuple(image.GetOrigin()), tuple(image.GetDirection()))


def check_gzip_whole(path: str, what: str = "image") -> None:
    """A gzip-compressed file (.gz) read to its end once: ITK's reader fills a file cut short (a download
    stopped early) with zeros and reads it without a word, and the volume would be segmented as if whole."""
    import gzip
    import zlib
    if not path.lower().endswith(".gz"):
        return
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return                        # not gzip whatever its name: the reader decides
    except OSError as exc:                    # (unreadable: no permission)
        raise InputError("cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from None
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError("cannot read %s %s: the compressed file is damaged or cut short (%s)"
                         % (what, path, (str(exc) or type(exc).__name__).splitlines()[0][:120])) from None


# NIfTI datatype code -> bytes per voxel (nifti1.h)
NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
               1536: 16, 1792: 16, 2048: 32, 2304: 4}


def check_nifti_whole(path: str, what: str = "image") -> None:
    """An uncompressed NIfTI (.nii) shorter than its header says: ITK reads the missing voxels as zeros
    without a word (a copy stopped early would be segmented as if whole). The header's dim, datatype
    and vox_offset (NIfTI-1: a 348-byte header; NIfTI-2: 540) give the size the file must have."""
    import struct
    if not path.lower().endswith(".nii"):
        return
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(540)
    except OSError:
        return                                # read_volume's reader says why
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:           # NIfTI-1
            dims = struct.unpack(order + "8h", head[40:56])
            datatype = struct.unpack(order + "h", head[70:72])[0]
            offset = struct.unpack(order + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:         # NIfTI-2
            dims = struct.unpack(order + "8q", head[16:80])
            datatype = struct.unpack(order + "h", head[12:14])[0]
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        # Bytes per voxel from the datatype code, as niftilib reads it (bitpix may disagree with it)
        nbytes = NIFTI_BYTES.get(datatype)
        if (not 1 <= dims[0] <= 7 or nbytes is None or not np.isfinite(offset) or offset < 0
                or any(d < 0 for d in dims[1:dims[0] + 1])):
            return                            # not a header to judge by: the reader decides
        needed = int(offset) + int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]], dtype=np.float64)) \
            * nbytes
        if size < needed:
            raise InputError("cannot read %s %s: the file is cut short (%d bytes; its header needs %d)"
                             % (what, path, size, needed))
        return


def nifti_placement_note(path, geometry: Geometry, shown: Optional[str] = None) -> str:
    """A note when a NIfTI-1 header gives no voxel size (pixdim 0 and no sform), or holds two
    placements that disagree (qform and sform both set,
    their voxel (0, 0, 0) or axes more than 0.5 mm / 0.5 degrees apart: an image resampled or
    registered by one tool and rewritten by another): which one the volume was read by (ITK's
    choice), since a viewer that takes the other shows the outputs elsewhere. "" otherwise.
    `shown`: the file's name in the note (default: `path`; the web page's upload, a cohort's volume)."""
    import gzip
    import struct
    path = os.fspath(path)
    shown = path if shown is None else shown
    lower = path.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return ""
    try:
        with (gzip.open(path, "rb") if lower.endswith(".gz") else open(path, "rb")) as handle:
            head = handle.read(348)
    except (OSError, EOFError):
        return ""
    for order in "<>":
        if len(head) == 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            break
    else:
        return ""
    qcode, scode = struct.unpack(order + "2h", head[252:256])
    qfac = struct.unpack(order + "f", head[76:80])[0]
    pixdim = struct.unpack(order + "3f", head[80:92])
    if any(p == 0 or not np.isfinite(p) for p in pixdim):
        # (ITK reads such an axis as 1 mm, an sform or not, and the walk's thin-slice rules then judge
        # the slices by a size the scan never had)
        return ("%s gives no voxel size along %s (pixdim 0); it was read as %s mm: check the scan's real voxel "
                "size" % (shown, "/".join("ijk"[n] for n in range(3) if pixdim[n] == 0 or not np.isfinite(pixdim[n])),
                          "x".join("%g" % v for v in geometry.spacing)))
    if qcode <= 0 or scode <= 0:
        return ""
    b, c, d, qx, qy, qz = struct.unpack(order + "6f", head[256:280])
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    scale = np.array([abs(pixdim[0]), abs(pixdim[1]), abs(pixdim[2]) * (-1.0 if qfac < 0 else 1.0)])   # (non-zero)
    forms = {"qform": (rot * scale, np.array([qx, qy, qz]))}
    srow = np.array(struct.unpack(order + "12f", head[280:328]), float).reshape(3, 4)
    forms["sform"] = (srow[:, :3], srow[:, 3])

    def axes(m):
        return m / np.maximum(np.linalg.norm(m, axis=0), 1e-12)
    (qm, qo), (sm, so) = forms["qform"], forms["sform"]
    apart = float(np.linalg.norm(qo - so))
    turn = float(np.degrees(np.arccos(np.clip(np.min(np.sum(axes(qm) * axes(sm), axis=0)), -1.0, 1.0))))
    if apart <= 0.5 and turn <= 0.5:
        return ""
    # Which one ITK read: the whole affine compared (ITK's geometry is LPS; NIfTI's forms are RAS).
    flip = np.array([-1.0, -1.0, 1.0])
    matrix = flip[:, None] * np.asarray(geometry.direction, float).reshape(3, 3) * np.asarray(geometry.spacing)
    origin = np.asarray(geometry.origin, float) * flip
    used = min(forms, key=lambda k: float(np.abs(forms[k][0] - matrix).sum() + np.abs(forms[k][1] - origin).sum()))
    other = "sform" if used == "qform" else "qform"
    return ("%s holds two placements (its qform and sform are %.1f mm and %.1f degrees apart); it was read by "
            "its %s, and the outputs carry that one: a viewer that uses the %s shows them elsewhere"
            % (shown, apart, turn, used, other))


def read_volume(path, what: str = "image", label: bool = False):
    """Read a 3D scalar volume. Returns (array[k, j, i], Geometry). Raises InputError."""
    sitk = _sitk()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError("%s file not found: %s" % (what, path))
    if os.path.isdir(path):
        raise InputError("%s path is a folder, not a volume file: %s" % (what, path))
    check_gzip_whole(path, what)
    check_nifti_whole(path, what)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "ERROR" in ln or "Unable" in ln), "unreadable file")[:200]
        if reason.endswith(":") and lines[-1] not in reason:    # (NRRD's "Error reading X:": the why is last)
            reason += " " + lines[-1][:200]
        raise InputError("cannot read %s %s: %s" % (what, path, reason)) from None
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError("%s %s has complex voxels; a real-valued scalar volume is needed (its magnitude, "
                         "for an MR image)" % (what, path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("%s %s has %d components per voxel (RGB/vector); a scalar volume is needed"
                         % (what, path, image.GetNumberOfComponentsPerPixel()))
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError("%s %s is %dD; a 3D volume is needed" % (what, path, dim))
    if min(image.GetSize()) < 1:
        raise InputError("%s %s is empty" % (what, path))
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        # (a sheared grid: the outputs, written on an orthogonal one by NIfTI's writer, sat elsewhere
        # than the image's voxels, and the points JSON disagreed with them)
        raise InputError("%s %s has a sheared (non-orthogonal) direction matrix; resample it onto an "
                         "orthogonal grid first (in 3D Slicer: Resample Scalar Volume)" % (what, path))
    array = sitk.GetArrayFromImage(image)
    if label:
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise InputError("%s %s has non-integer values; a label map is needed" % (what, path))
        if array.dtype not in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
            limit = np.iinfo(np.int32)
            # (compared as Python floats: in float32, 2**31 - 1 is 2**31 and a label of 2**31 passed)
            if array.size and (float(array.max()) > limit.max or float(array.min()) < limit.min):
                raise InputError("%s %s has label values beyond %d..%d (%d..%d); renumber its labels"
                                 % (what, path, limit.min, limit.max, int(array.min()), int(array.max())))
            array = array.astype(np.int32)            # labels stay as compact as stored (memory)
    else:
        array = array.astype(np.float32)
        check_image_values(array, "%s %s" % (what, path))
    return array, geometry_of(image)


def check_image_values(array: np.ndarray, what: str = "image") -> None:
    if array.ndim != 3:
        raise InputError("%s is %dD; a 3D volume is needed" % (what, array.ndim))
    if array.size == 0:
        raise InputError("%s is empty (shape %s)" % (what, "x".join(str(n) for n in array.shape)))
    if not np.all(np.isfinite(array)):
        raise InputError("%s contains NaN or infinite values" % what)
    if float(array.max()) == float(array.min()):
        raise InputError("%s is constant (every voxel is %g); nothing to segment" % (what, float(array.min())))


def _atomic_target(path):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise InputError("output folder does not exist: %s" % folder)
    return path, folder


def _umask() -> int:
    mask = os.umask(0o022)          # read it back: os.umask has no getter
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Rename a staged temporary file onto `path`: with the permissions of the file it replaces (a
    private 0600 output stays private), else those any other tool's output gets (0666 less the user's
    umask), not mkstemp's 0600. A rename refused (another user's file in a shared sticky folder) is
    one message, the staged file removed."""
    mode = 0o666 & ~_umask()
    if not os.path.islink(path):               # (a link is replaced: the new file is the user's own)
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            pass
    try:
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        discard_staged([tmp])
        raise InputError("cannot write %s: %s" % (path, exc.strerror or exc)) from None


def discard_staged(tmps) -> None:
    for tmp in tmps:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def stage_file(path, write) -> str:
    """A temporary file beside `path` (its full extension kept: .nii.gz picks the writer) that
    `write(tmp)` fills; removed again if that fails or is interrupted (Ctrl+C). A file that cannot be
    made or written (a name too long once the temporary prefix is added, a full disk, a folder the
    checks could not tell was read-only) is one InputError naming the output, not a traceback."""
    path, folder = _atomic_target(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    except OSError as exc:
        raise InputError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    os.close(fd)
    try:
        write(tmp)
    except BaseException as exc:
        discard_staged([tmp])
        if isinstance(exc, OSError):
            raise InputError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
        if isinstance(exc, RuntimeError) and "sitk::ERROR" in str(exc):      # (SimpleITK's writer)
            raise InputError("cannot write %s: %s" % (path, str(exc).strip().splitlines()[-1])) from None
        raise
    return tmp


def stage_volume(array: np.ndarray, geometry: Geometry, path) -> str:
    """The volume written, with the given geometry, to a temporary file beside `path` (publish() puts
    it in place): a single-file format only (a .mhd/.nhdr header would name the temporary file's
    data file)."""
    sitk = _sitk()
    if os.fspath(path).lower().endswith((".mhd", ".nhdr")):
        raise InputError("%s: write a single-file volume (.nii.gz, .nii, .nrrd, .mha)" % os.fspath(path))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return stage_file(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def stage_json(obj, path) -> str:
    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=1)
    return stage_file(path, write)


def write_volume(array: np.ndarray, geometry: Geometry, path) -> None:
    """Write with the given geometry; the file appears complete or not at all."""
    publish(stage_volume(array, geometry, path), os.fspath(path))


def write_json(obj, path) -> None:
    publish(stage_json(obj, path), os.fspath(path))
