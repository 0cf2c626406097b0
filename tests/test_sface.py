"""SFace in torch (`identity.sface`) against OpenCV's FaceRecognizerSF: the same embeddings, the same
aligned crop, gradients through both, and the identity loss of a tiny training run (CPU, real weights)."""

import copy
import io
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from PIL import Image

from personamagic.errors import ModelLoadError
from personamagic.evaluation.identity_preservation import IdentityPreservation, load_face_embedder, yunet_row
from personamagic.faces import FaceDetector
from personamagic.identity import (
    ARCFACE_TEMPLATE_112,
    DEFAULT_IDENTITY_MODEL,
    IdentityEncoder,
    alignment_theta,
    load_identity_model,
    similarity_transform,
    warp_faces,
)
from personamagic.identity.loading import identity_model_licence
from personamagic.identity.sface import SFaceNet, UnsupportedOnnxGraph, dequantize_linear, sface_model_path

DATA = Path(__file__).parent / "data"
PHOTOS = {"astronaut": "astronaut.png", "grace_hopper": "grace_hopper.jpg"}
SFACE_SAME_PERSON_COSINE = 0.363  # OpenCV Zoo's threshold for SFace cosine scores


@pytest.fixture(scope="module")
def encoder():
    return load_identity_model("sface")


@pytest.fixture(scope="module")
def recognizer():
    return cv2.FaceRecognizerSF.create(str(sface_model_path()), "")


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def _variants(rgb: np.ndarray, face) -> dict[str, np.ndarray]:
    """The photo and five edits of it: mirror, crop, 10° rotation, grayscale, JPEG at quality 30."""
    height, width = rgb.shape[:2]
    (cx, cy), side = face.center, max(face.size)
    crop = rgb[max(0, int(cy - side)):int(cy + side), max(0, int(cx - side)):int(cx + side)]
    rotation = cv2.getRotationMatrix2D((cx, cy), 10.0, 1.0)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=30)
    edits = {
        "photo": rgb,
        "mirror": rgb[:, ::-1],
        "crop": crop,
        "rotated": cv2.warpAffine(rgb, rotation, (width, height), borderMode=cv2.BORDER_REFLECT),
        "gray": np.asarray(Image.fromarray(rgb).convert("L").convert("RGB")),
        "jpeg30": np.asarray(Image.open(jpeg).convert("RGB")),
    }
    return {name: np.ascontiguousarray(image) for name, image in edits.items()}


@pytest.fixture(scope="module")
def cases(detector, recognizer):
    """(person, edit) -> RGB image, its largest YuNet face, and OpenCV's alignCrop of it (RGB uint8)."""
    found = {}
    for person, filename in PHOTOS.items():
        rgb = np.asarray(Image.open(DATA / filename).convert("RGB"))
        for edit, image in _variants(rgb, detector.detect(Image.fromarray(rgb))[0]).items():
            face = detector.detect(Image.fromarray(image))[0]
            aligned = recognizer.alignCrop(np.ascontiguousarray(image[:, :, ::-1]), yunet_row(face))  # BGR
            found[person, edit] = SimpleNamespace(image=image, face=face, aligned=aligned[:, :, ::-1].copy())
    return found


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def _opencv_embeddings(recognizer, cases) -> np.ndarray:
    """FaceRecognizerSF.feature of OpenCV's crops (fed as BGR, as OpenCV's own pipeline does), unit norm."""
    features = np.stack([recognizer.feature(np.ascontiguousarray(c.aligned[:, :, ::-1])).reshape(-1) for c in cases])
    return features / np.linalg.norm(features, axis=1, keepdims=True)


# --- the network -------------------------------------------------------------------------------------


def test_port_is_a_frozen_identity_encoder(encoder):
    assert DEFAULT_IDENTITY_MODEL == "sface"
    assert isinstance(encoder, IdentityEncoder)
    assert (encoder.input_size, encoder.embedding_dim) == (112, 128)
    assert isinstance(encoder.backbone, SFaceNet)
    assert list(encoder.parameters()) == [] and not any(b.requires_grad for b in encoder.buffers())
    encoder.train()
    assert not encoder.training
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    embeddings = encoder(images)
    assert embeddings.shape == (3, 128) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))

    # .to(dtype) casts every weight (running it in another dtype: on the small graph below, since
    # half-precision and float64 depthwise convolutions are slow on a CPU)
    assert {b.dtype for b in copy.deepcopy(encoder).to(torch.bfloat16).buffers()} == {torch.bfloat16}


def _small_sface_like_model() -> onnx.ModelProto:
    """SFace's layer kinds at a toy size, block-quantised weights included, with random values:
    pixels (1, 3, 8, 8) -> Sub/Mul -> Conv 3x3 -> BN -> PRelu -> depthwise Conv 3x3 stride 2 -> BN -> Dropout
    -> Flatten -> Gemm (transB) -> BN -> (1, 5)."""
    rng = np.random.default_rng(0)

    def tensor(name, *shape, low=-1.0, high=1.0):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    def batch_norm(prefix, channels):
        return [tensor(f"{prefix}_gamma", channels), tensor(f"{prefix}_beta", channels),
                tensor(f"{prefix}_mean", channels), tensor(f"{prefix}_var", channels, low=0.5, high=2.0)]

    quantized = rng.integers(-128, 128, (4, 27)).astype(np.int8)  # conv_1's (4, 3, 3, 3), flattened per channel
    initializers = [
        numpy_helper.from_array(np.array([127.5], np.float32), "mean"),
        numpy_helper.from_array(np.array([1 / 128], np.float32), "std"),
        numpy_helper.from_array(quantized, "w1_q"),
        tensor("w1_scale", 4, 3, low=1e-3, high=1e-2),  # blocks of 9 along axis 1
        numpy_helper.from_array(rng.integers(-20, 20, (4, 3)).astype(np.int8), "w1_zero"),
        numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "w1_shape"),
        *batch_norm("bn1", 4), tensor("slope", 4, 1, 1), tensor("w2", 4, 1, 3, 3), *batch_norm("bn2", 4),
        tensor("fc_w", 5, 64), tensor("fc_b", 5), *batch_norm("bn3", 5),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zero"], ["w1_flat"], axis=1, block_size=9),
        helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"]),
        helper.make_node("Sub", ["pixels", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "std"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["b1"],
                         epsilon=1e-3),
        helper.make_node("PRelu", ["b1", "slope"], ["p1"]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                         group=4),
        helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["b2"]),
        helper.make_node("Dropout", ["b2"], ["d2"]),
        helper.make_node("Flatten", ["d2"], ["f2"]),
        helper.make_node("Gemm", ["f2", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("BatchNormalization", ["fc", "bn3_gamma", "bn3_beta", "bn3_mean", "bn3_var"], ["out"]),
    ]
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])]
    graph = helper.make_graph(nodes, "small", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_port_runs_a_graph_as_onnx_reference_does_in_any_dtype():
    model = _small_sface_like_model()
    pixels = np.random.default_rng(1).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model).run(None, {"pixels": pixels})
    net = SFaceNet.from_onnx(model)
    assert len(net._steps) == 11 and list(net.parameters()) == []  # the weights' 2 nodes ran once, at build time
    np.testing.assert_allclose(net(torch.from_numpy(pixels)).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    for dtype, tolerance in ((torch.float64, 1e-4), (torch.bfloat16, 0.1)):
        moved = copy.deepcopy(net).to(dtype)
        assert moved.dtype == dtype
        output = moved(torch.from_numpy(pixels))  # a float32 input follows the weights
        assert output.dtype == dtype
        np.testing.assert_allclose(output.double().detach().numpy(), expected, rtol=tolerance, atol=tolerance)


def test_embeddings_match_opencv_on_photos_and_edits(encoder, recognizer, cases):
    """OpenCV's crop fed to both; the port reads it as [-1, 1] RGB, OpenCV as BGR 0..255."""
    crops = list(cases.values())
    with torch.no_grad():
        ours = encoder(torch.cat([_to_tensor(c.aligned) for c in crops])).numpy()
    theirs = _opencv_embeddings(recognizer, crops)
    cosines = (ours * theirs).sum(1)
    assert cosines.min() >= 0.99, dict(zip(cases, cosines.round(5)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # equal up to float rounding, not just close


def test_same_person_scores_clearly_above_the_other_person(encoder, recognizer, cases):
    keys = list(cases)
    with torch.no_grad():
        ours = encoder(torch.cat([_to_tensor(cases[k].aligned) for k in keys])).numpy()
    theirs = _opencv_embeddings(recognizer, cases.values())
    for embeddings in (ours, theirs):
        scores = embeddings @ embeddings.T
        for i, (person, edit) in enumerate(keys):
            same = [scores[i, j] for j, (p, e) in enumerate(keys) if p == person and e != edit]
            other = [scores[i, j] for j, (p, _) in enumerate(keys) if p != person]
            assert min(same) > 0.8 and max(other) < SFACE_SAME_PERSON_COSINE, (person, edit, min(same), max(other))
    np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-4)


# --- the alignment -------------------------------------------------------------------------------------


def _shift_output(theta: torch.Tensor, pixels: float, size: int) -> torch.Tensor:
    """The same warp with its crop moved `pixels` to the left (output pixel x reads where x + pixels did)."""
    shift = torch.tensor([[1.0, 0.0, 2 * pixels / size], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return theta @ shift


@pytest.mark.parametrize("key", [("astronaut", "photo"), ("grace_hopper", "rotated")])
def test_training_alignment_is_opencv_align_crop(recognizer, cases, key):
    """Where each crop pixel samples the photo, ours (alignment_theta + warp_faces) against alignCrop.

    Both warp a coordinate image (channels x, y, 1): bilinear sampling of a linear function returns the
    sampled position itself, so each crop pixel tells where it read the photo. The distance between the
    two positions, in crop pixels, is the crop's displacement: a 1-px shift reads 1.0, whatever the
    image content. OpenCV quantises positions to 1/32 px, so up to ~0.02 px is expected.
    """
    case = cases[key]
    height, width = case.image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    coordinates = np.dstack([xs, ys, np.ones_like(xs)])
    landmarks = case.face.landmarks
    theirs = recognizer.alignCrop(coordinates, yunet_row(case.face))  # (112, 112, 3)
    theta = alignment_theta(landmarks, (height, width), 112, landmarks_order="yunet")
    crop_per_photo_pixel = math.sqrt(abs(np.linalg.det(similarity_transform(landmarks, ARCFACE_TEMPLATE_112)[:, :2])))

    def displacement(theta):
        ours = warp_faces(torch.from_numpy(coordinates).permute(2, 0, 1)[None], theta, 112)[0].permute(1, 2, 0).numpy()
        inside = (np.abs(ours[..., 2] - 1) < 1e-4) & (np.abs(theirs[..., 2] - 1) < 1e-4)  # all 4 taps in the photo
        assert inside.mean() > 0.9
        return np.linalg.norm(ours[..., :2] - theirs[..., :2], axis=-1)[inside].max() * crop_per_photo_pixel

    assert displacement(theta) < 0.05
    assert abs(displacement(_shift_output(theta, 1.0, 112)) - 1.0) < 0.05  # the measure sees a 1-px shift

    # and on the photo itself: within uint8 rounding, while a 1-px shift changes it by several grey levels
    def grey_level_error(theta):
        ours = ((warp_faces(_to_tensor(case.image), theta, 112)[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        return np.abs(ours - case.aligned.astype(np.float32)).mean()

    assert grey_level_error(theta) < 0.5
    assert grey_level_error(_shift_output(theta, 1.0, 112)) > 3.0


# --- gradients and the identity loss ---------------------------------------------------------------


def test_gradient_ascent_through_warp_and_port_raises_similarity_to_the_other_photo(encoder, cases):
    def photo_and_theta(person):
        case = cases[person, "photo"]
        return _to_tensor(case.image), alignment_theta(case.face.landmarks, case.image.shape[:2], 112,
                                                       landmarks_order="yunet")

    other, other_theta = photo_and_theta("grace_hopper")
    with torch.no_grad():
        target = encoder(warp_faces(other, other_theta, 112))
    image, theta = photo_and_theta("astronaut")
    image.requires_grad_(True)
    similarities = []
    for _ in range(3):
        similarity = (encoder(warp_faces(image, theta, 112)) * target).sum()
        (gradient,) = torch.autograd.grad(similarity, image)
        assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
        similarities.append(similarity.item())
        with torch.no_grad():
            image += 2 / 255 * gradient.sign()  # one grey level per step
            image.clamp_(-1, 1)
    assert similarities[0] < SFACE_SAME_PERSON_COSINE
    assert similarities[-1] > similarities[0] + 0.1, similarities


def test_tiny_training_run_uses_sface_for_the_identity_loss(astronaut, tmp_path, monkeypatch):
    import personamagic.jobs.personalize as job
    from personamagic.training import TrainConfig

    loaded = []
    real_load = job.load_identity_model

    def spy(spec, **kwargs):
        loaded.append(real_load(spec, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(job, "load_identity_model", spy)
    logs = []
    config = TrainConfig(max_train_steps=3, partition_warmup_steps=1, partition_timesteps=5)
    result = job.personalize([astronaut], tmp_path / "c", config, model="tiny", identity_model="sface",
                             progress=lambda step, total, values, phase: logs.append(values))
    assert len(loaded) == 1 and isinstance(loaded[0].backbone, SFaceNet)
    identity_terms = [float(values["id"]) for values in logs]
    assert len(identity_terms) == 4  # one warm-up step and three training steps
    assert all(math.isfinite(v) and 0 <= v <= 2 for v in identity_terms)
    assert len(set(identity_terms)) > 1
    assert result.concept.extra["identity_model"] == "sface"


# --- DequantizeLinear -------------------------------------------------------------------------------


def _reference_outputs(nodes, initializers, outputs):
    graph = helper.make_graph(nodes, "dequantize", [], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                        for n in outputs], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return dict(zip(outputs, ReferenceEvaluator(model).run(None, {})))


def test_dequantize_linear_matches_onnx_reference_on_the_sface_weights():
    graph = onnx.load(str(sface_model_path())).graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    assert len(nodes) == 29 and {a.i for n in nodes for a in n.attribute if a.name == "block_size"} == {9, 27, 32, 64}
    expected = _reference_outputs(nodes, [initializers[n] for node in nodes for n in node.input],
                                  [node.output[0] for node in nodes])
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ours = dequantize_linear(*(numpy_helper.to_array(initializers[n]) for n in node.input), **attrs)
        assert ours.dtype == np.float32 and np.array_equal(ours, expected[node.output[0]]), node.output[0]


@pytest.mark.parametrize(
    ("shape", "scale_shape", "axis", "block_size", "dtype", "zero_point"),
    [
        ((4, 6), (), 1, 0, np.int8, True),  # per tensor
        ((4, 6), (1,), 1, 0, np.uint8, True),  # per tensor, one-element vector
        ((4, 6), (4,), 0, 0, np.uint8, True),  # per axis
        ((2, 3, 5), (5,), -1, 0, np.int8, False),  # per axis, negative axis, no zero point
        ((3, 10), (3, 3), 1, 4, np.int8, True),  # blocked, last block shorter (10 = 4 + 4 + 2)
        ((10, 3), (5, 3), 0, 2, np.uint8, True),  # blocked along axis 0
    ],
)
def test_dequantize_linear_matches_onnx_reference_on_each_granularity(shape, scale_shape, axis, block_size, dtype,
                                                                      zero_point):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    scale = rng.uniform(1e-3, 1e-1, size=scale_shape).astype(np.float32)
    tensors = [x, scale] + ([rng.integers(info.min, info.max, size=scale_shape).astype(dtype)] if zero_point else [])
    names = ["x", "scale", "zero_point"][: len(tensors)]
    node = helper.make_node("DequantizeLinear", names, ["y"], axis=axis, block_size=block_size)
    expected = _reference_outputs([node], [numpy_helper.from_array(t, n) for t, n in zip(tensors, names)], ["y"])["y"]
    np.testing.assert_array_equal(dequantize_linear(*tensors, axis=axis, block_size=block_size), expected)


def test_dequantize_linear_refuses_mismatched_shapes():
    x = np.zeros((3, 10), np.int8)
    with pytest.raises(ValueError, match="blocked x_scale must have shape"):
        dequantize_linear(x, np.ones((3, 2), np.float32), axis=1, block_size=4)
    with pytest.raises(ValueError, match="per-axis"):
        dequantize_linear(x, np.ones(4, np.float32), axis=1)
    with pytest.raises(ValueError, match="x_zero_point"):
        dequantize_linear(x, np.ones(10, np.float32), np.zeros(10, np.uint8), axis=1)


# --- bad inputs -------------------------------------------------------------------------------------


def test_missing_or_corrupt_onnx_files_are_one_user_error(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"\xff" * 64)
    (tmp_path / "truncated.onnx").write_bytes(sface_model_path().read_bytes()[:100_000])
    for path in (tmp_path / "missing.onnx", tmp_path / "garbage.onnx", tmp_path / "truncated.onnx"):
        with pytest.raises(ModelLoadError) as caught:
            load_identity_model(path)
        assert "\n" not in str(caught.value) and path.name in str(caught.value)


def test_arcface_r100_names_the_hub_file_of_the_paper_setting(monkeypatch):
    import huggingface_hub

    from personamagic.identity.loading import ARCFACE_R100, identity_file_reference

    asked = []

    def offline(repo_id, filename, **kwargs):
        asked.append(f"{repo_id}/{filename}")
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelLoadError, match="--no-id-loss"):
        load_identity_model("arcface-r100")
    assert asked == [ARCFACE_R100] == [identity_file_reference("arcface-r100")]
    assert identity_file_reference("sface") == "sface"  # built in: nothing to download


def test_an_unknown_op_is_refused_by_name():
    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    with pytest.raises(UnsupportedOnnxGraph, match="Relu"):
        SFaceNet(graph)


# --- evaluation and defaults -------------------------------------------------------------------------


def test_sface_torch_face_model_scores_like_opencv(cases):
    reference = Image.fromarray(cases["astronaut", "photo"].image)
    others = [Image.fromarray(cases[key].image) for key in (("astronaut", "jpeg30"), ("grace_hopper", "photo"))]
    scores = {}
    for name in ("sface", "sface-torch"):
        metric = IdentityPreservation(load_face_embedder(name))
        scores[name] = [metric.score(image, metric.reference([reference])).i_pre for image in others]
    np.testing.assert_allclose(scores["sface-torch"], scores["sface"], atol=1e-3)


def test_paper_studies_train_with_arcface_and_say_so():
    from personamagic.evaluation.config import StudyConfig
    from personamagic.evaluation.presets import STUDY_PRESETS
    from personamagic.evaluation.study import _identity_loss_line

    assert {STUDY_PRESETS[name].get("identity_model") for name in ("table1", "table2", "table6")} == {"arcface-r100"}
    assert "identity_model" not in STUDY_PRESETS["tiny-demo"]
    with_id, without_id = SimpleNamespace(train={"use_id_loss": True}), SimpleNamespace(train={"use_id_loss": False})
    study = StudyConfig(datasets=[{"name": "d", "identities": "."}], methods=["personamagic"],
                        identity_model="arcface-r100")
    assert "arcface-r100" in _identity_loss_line(study, [with_id]) and "non-commercial" in _identity_loss_line(
        study, [with_id])
    default = StudyConfig(datasets=[{"name": "d", "identities": "."}], methods=["personamagic"])
    assert "sface" in _identity_loss_line(default, [without_id, with_id])
    assert "Apache-2.0" in identity_model_licence("sface")
    assert _identity_loss_line(default, [without_id]) == "identity loss: off in every method"
