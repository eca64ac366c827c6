"""Render what a Slicer user sees after Preview, with Slicer's own displayable managers (slicer-core,
offscreen), on the bundled CT: docs/preview_slices.png.

    .venv/bin/python tools/render_screenshots.py [--embedding-cache DIR]

The same scene the module builds (SynPoSlicerLib.mrml.show_preview): the CT, the confidence as
the foreground layer, the candidate segment, the positive (green) and negative (red) points.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "SynPoSlicer"))
sys.path.insert(0, os.path.join(HERE, "..", "Testing"))

from slice_render import SliceRender  # noqa: E402  (sets the EGL window before VTK renders)

import numpy as np  # noqa: E402
import slicer  # noqa: E402

from SynPoSlicerLib import mrml  # noqa: E402
from synpo import demo  # noqa: E402
from synpo.io import read_volume  # noqa: E402
from synpo.session import Models, Session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedding-cache")
    p.add_argument("-o", "--output", default=os.path.join(HERE, "..", "docs", "preview_slices.png"))
    args = p.parse_args()
    image, geometry = read_volume(demo.SAMPLE_IMAGE)
    support, _ = read_volume(demo.SAMPLE_SUPPORT, label=True)
    result = Session(image, geometry.spacing, Models.load("litemedsam", "sam", device="cpu"),
                     args.embedding_cache).run(support)
    mrml.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, image)
    mrml._set_ijk_to_ras(volume, mrml.geometry_ijk_to_ras(geometry))
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    render = SliceRender(scene, 320)
    preview = mrml.show_preview(volume, result, ["liver"], ["liver"])
    render.show(volume, preview.confidence, 0.4)
    slices = [t for t in (5, 12, 20, 27) if t < image.shape[0]]
    shots = []
    for t in slices:
        z = float(mrml.points_ijk_to_ras(volume, [[0.0, 0.0, t]])[0][2])
        shots.append(render.render(z))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(shots), figsize=(3.2 * len(shots), 3.4))
    for ax, t, shot in zip(np.atleast_1d(axes), slices, shots):
        ax.imshow(shot)
        ax.set_title("slice %d" % t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print("wrote %s" % os.path.abspath(args.output))


if __name__ == "__main__":
    main()
