"""Copies of a data set with every volume stored another way in plane: the same voxels at the same
physical place (the direction's columns and the origin rewritten with the array), so that only the
2D arrays the encoders are given change. docs/research.md, "A slice's in-plane layout".

    .venv/bin/python benchmarks/stored_layouts.py ../shared/data/chaos_t2 /tmp/chaos_T --layout transposed
    .venv/bin/synpo evaluate /tmp/chaos_T --no-baselines --device cpu --features sam --runtime torch \
        --embedding-cache /tmp/embT -o /tmp/chaos_T.out

Layouts (of each volume's [k, j, i] array): transposed (i and j exchanged), turned (both reversed: each
slice turned 180 degrees), rows (j reversed: each slice upside down), columns (i reversed: mirrored).
Every .nii.gz of the folder (images and labels alike) is written.
"""
import argparse
import glob
import os

import numpy as np
import SimpleITK as sitk

LAYOUTS = ("transposed", "turned", "rows", "columns")


def restore(image: sitk.Image, layout: str) -> sitk.Image:
    """`image` stored the `layout` way, at the same place."""
    a = sitk.GetArrayFromImage(image)                        # [k, j, i]
    d = np.array(image.GetDirection()).reshape(3, 3).copy()  # columns: i, j, k
    spacing = list(image.GetSpacing())
    n = image.GetSize()
    corner = [0, 0, 0]                                       # the index of the new first voxel, old grid
    if layout == "transposed":
        a = np.swapaxes(a, 1, 2)
        d = d[:, [1, 0, 2]]
        spacing = [spacing[1], spacing[0], spacing[2]]
    else:
        flip_i, flip_j = layout in ("turned", "columns"), layout in ("turned", "rows")
        if flip_i:
            a, d[:, 0], corner[0] = a[:, :, ::-1], -d[:, 0], n[0] - 1
        if flip_j:
            a, d[:, 1], corner[1] = a[:, ::-1, :], -d[:, 1], n[1] - 1
    out = sitk.GetImageFromArray(np.ascontiguousarray(a))
    out.SetDirection(tuple(float(x) for x in d.ravel()))
    out.SetSpacing(spacing)
    out.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(args.data, "*.nii.gz")))
    if not files:
        raise SystemExit("no .nii.gz in %s" % args.data)
    for f in files:
        sitk.WriteImage(restore(sitk.ReadImage(f), args.layout), os.path.join(args.out, os.path.basename(f)))
    print("wrote %d volumes to %s (%s)" % (len(files), args.out, args.layout))


if __name__ == "__main__":
    main()
