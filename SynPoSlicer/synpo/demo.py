"""`synpo demo`: the bundled CT, its one painted liver slice, LiteMedSAM, offline."""
import os
from typing import List, Optional

import numpy as np

from .layout import display_orientation

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLE_IMAGE = os.path.join(DATA, "sample_ct.nii.gz")
SAMPLE_SUPPORT = os.path.join(DATA, "sample_ct_liver_support.nii.gz")
SAMPLE_TRUTH = os.path.join(DATA, "sample_ct_liver.nii.gz")


def montage(image: np.ndarray, result, truth: Optional[np.ndarray], path: str, n_rows: int = 5,
            direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> str:
    """PNG: per chosen slice, image | confidence + prompts | SynPo mask | ground truth, each slice
    drawn as viewers draw it (display_orientation of the volume's LPS `direction`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .intensity import normalize
    from .support import to_slices

    axis = result.support.axis
    label = result.support.labels[0]
    img = to_slices(normalize(image)[0], axis)
    conf = to_slices(result.confidence[label], axis)
    pred = to_slices(result.labels == label, axis)
    gt = to_slices(truth == label, axis) if truth is not None else None
    records = {r.index: r for r in result.records if r.label == label}
    transpose, flip_x, flip_y = display_orientation(direction, axis)
    if transpose:
        img, conf, pred = (np.swapaxes(a, 1, 2) for a in (img, conf, pred))
        gt = np.swapaxes(gt, 1, 2) if gt is not None else None
    rows = np.unique(np.linspace(0, img.shape[0] - 1, n_rows).round().astype(int))
    cols = 4 if gt is not None else 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows)), squeeze=False)
    for r, t in enumerate(rows):
        rec = records.get(int(t))
        panels = [("image", None), ("confidence + prompts", conf[t]), ("SynPo", pred[t])]
        if gt is not None:
            panels.append(("ground truth", gt[t]))
        for c, (title, overlay) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img[t], cmap="gray", vmin=0, vmax=1)
            if c == 1:
                ax.imshow(overlay, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
                if rec is not None:
                    for xy, colour in ((rec.positive, "lime"), (rec.negative, "red")):
                        if len(xy):
                            xy = np.asarray(xy)[:, ::-1] if transpose else np.asarray(xy)
                            ax.scatter(xy[:, 0], xy[:, 1], s=18, c=colour, edgecolors="black", linewidths=0.5)
                    if rec.box is not None:
                        x0, y0, x1, y1 = (rec.box[1], rec.box[0], rec.box[3], rec.box[2]) if transpose else rec.box
                        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                                   edgecolor="cyan", linewidth=1))
            elif c >= 2 and overlay.any():
                ax.contour(overlay.astype(float), levels=[0.5], colors=["lime" if c == 2 else "yellow"],
                           linewidths=1)
            # Flipping the axes flips the image, the contours and the points alike.
            ax.set_xlim(*((img.shape[2] - 0.5, -0.5) if flip_x else (-0.5, img.shape[2] - 0.5)))
            ax.set_ylim(*((-0.5, img.shape[1] - 0.5) if flip_y else (img.shape[1] - 0.5, -0.5)))
            status = rec.status if rec is not None else ""
            ax.set_title("%s\nslice %d %s" % (title, t, status) if c == 0 else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_demo(folder: str = "synpo-demo", device: str = "auto", quiet: bool = False,
             features: str = "auto", embedding_cache: Optional[str] = None) -> dict:
    from .features import load_models
    from .config import default_config
    from .evaluate import score
    from .io import read_volume
    from .outputs import write_result
    from .session import Models, Session

    os.makedirs(folder, exist_ok=True)
    image, geometry = read_volume(SAMPLE_IMAGE, "sample image")
    support, _ = read_volume(SAMPLE_SUPPORT, "sample support", label=True)
    truth, _ = read_volume(SAMPLE_TRUTH, "sample truth", label=True)
    sam, dino, use = load_models("litemedsam", features, "small", device, quiet)
    session = Session(image, geometry.spacing, Models.of(sam, dino, use), embedding_cache, geometry.known_direction)
    result = session.run(support, default_config())
    out = os.path.join(folder, "segmentation.nii.gz")
    written: List[str] = write_result(result, geometry, out, os.path.join(folder, "confidence.nii.gz"),
                                      os.path.join(folder, "points.json"), SAMPLE_IMAGE)
    written.append(montage(image, result, truth, os.path.join(folder, "montage.png"),
                           direction=geometry.direction))
    d_lab, d_vol, fp = score(result.labels == 1, truth == 1)
    summary = {"dice_labelled": d_lab, "dice_volume": d_vol, "fp_slices": fp, "files": written,
               "features": result.features, "seconds": result.timings}
    if not quiet:
        print("SynPo demo: liver of the bundled CT from one painted slice (k=%d), LiteMedSAM (%s), features %s"
              % (result.support.slices[1][0], "OpenVINO" if sam.runtime == "openvino" else "PyTorch",
                 "+".join(result.features)))
        print("Dice vs the reference segmentation: %.3f (whole volume, %d slices)" % (d_vol, image.shape[0]))
        print("wrote:\n  " + "\n  ".join(written))
    return summary
