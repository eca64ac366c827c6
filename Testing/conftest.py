"""Shared fixtures: synthetic volumes and tiny randomly initialised models from the real classes."""
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def save_volume(array, path, spacing=(1.0, 1.0, 2.0)):
    """Write a [k, j, i] array as a volume file with the given voxel spacing; returns the path."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


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


SYNPO = os.path.join(os.path.dirname(sys.executable), "synpo")


def synpo_cmd():
    return [SYNPO] if os.path.exists(SYNPO) else [sys.executable, "-m", "synpo.cli"]


# What the web app's tests import, and the pip package that brings each.
WEB_MODULES = (("trame_slicer", "trame-slicer"), ("slicer", "slicer-core"))


def missing_module(modules=WEB_MODULES):
    """Why a test of these (module, pip package) pairs cannot run (one is not installed), or None."""
    for module, package in modules:
        try:
            __import__(module)
        except ImportError:
            return "%s is not installed (pip install 'synpo[web,test]')" % package
    return None


class Server:
    """A `synpo serve` process on a free loopback port."""

    def __init__(self, folder, *extra):
        self.folder = folder
        self.ready = os.path.join(folder, "ready")
        self.token_file = os.path.join(folder, "token")
        args = synpo_cmd() + ["serve", "--port", "0", "--device", "cpu", "--features", "sam", "--token-out",
                              self.token_file, "--ready-file", self.ready, "--session-ttl", "600",
                              # gone with this test process, even if it crashes (no server left on CI)
                              "--parent-pid", str(os.getpid())] + list(extra)
        self.log = open(os.path.join(folder, "server.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start: %s" % open(self.log.name).read())
            time.sleep(0.2)
        time.sleep(0.1)
        self.url = open(self.ready).read().strip()
        self.token = open(self.token_file).read().strip()

    def client(self, token=None, timeout=60.0):
        from synpo.client import Client
        return Client(self.url, self.token if token is None else token, timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
