"""Shared fixtures: synthetic volumes and tiny randomly initialised models from the real classes."""
import os
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def ellipsoid_volume(shape=(12, 64, 80), centre=(6, 30, 40), radii=(4.5, 14, 18), seed=0):
    """An MR-like volume: a bright ellipsoid in textured tissue. Returns (image, mask)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    d = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2
    mask = d <= 1.0
    body = ((yy - shape[1] / 2) / (shape[1] * 0.48)) ** 2 + ((xx - shape[2] / 2) / (shape[2] * 0.48)) ** 2 <= 1
    image = np.where(body, 200.0, 10.0) + rng.normal(0, 15, shape)
    image[mask] = 600.0 + rng.normal(0, 20, int(mask.sum()))
    return image.astype(np.float32), mask


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model
    import torch
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=56)
    folder = tmp_path_factory.mktemp("dinov2-tiny")
    Dinov2Model(cfg).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory):
    """A tiny SAM ViT (real segment-anything classes, random weights) saved as a checkpoint file."""
    import torch
    from synpo import features
    features.SAM_VIT_ARCHS.setdefault("vit_tiny", (32, 2, 2, (1,)))
    torch.manual_seed(0)
    net = features.build_sam_vit("vit_tiny")
    path = tmp_path_factory.mktemp("sam-tiny") / "sam_vit_tiny.pth"
    torch.save(net.state_dict(), str(path))
    return str(path)
