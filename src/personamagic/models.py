"""Base models: load a real SD-1.x checkpoint (hub id, diffusers folder, single file) or build `tiny`.

Everything returned here is frozen (`requires_grad_(False)`, eval mode); PersonaMagic trains only its
stage mapper. The `tiny` model uses the real diffusers / transformers classes at a toy size, randomly
initialised under a fixed seed, with the real SD-1.x CLIP tokenizer built from the BPE vocabulary
shipped in `personamagic/data/clip-bpe/`. Its images are noise-like by nature: it exists so the whole
method runs offline on a CPU in seconds (tests, CI, demos).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

TINY = "tiny"
RANDOM_SD1 = "random-sd1"  # SD-1.x sizes, random weights: for benchmarks (timing does not depend on weights)
RANDOM_IMAGE_ENCODER = "random-clip-vit-b32"  # CLIP ViT-B/32 vision tower sizes, random weights
DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-base-patch32"

# SD-1.x noise schedule (identical in SD 1.4, 1.5 and dreamlike-photoreal-2.0); used by `tiny` too, so
# its timesteps mean the same as on a real model.
SD1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class BaseComponents:
    """The frozen parts of a Stable Diffusion 1.x model that PersonaMagic uses."""

    name: str  # what the user asked for: hub id, local path, or "tiny"
    tokenizer: object  # transformers CLIPTokenizer(-Fast)
    text_encoder: torch.nn.Module  # transformers CLIPTextModel, SDPA attention (see LastLayerAttention)
    vae: torch.nn.Module  # diffusers AutoencoderKL
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    scheduler_config: dict  # the base model's noise schedule (DDPM/DDIM-compatible config)

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "BaseComponents":
        for module in (self.text_encoder, self.vae, self.unet):
            # Passing an unchanged dtype makes diffusers warn about fp32-kept modules: only cast on change.
            if dtype is not None and dtype != module.dtype:
                module.to(device=device, dtype=dtype)
            else:
                module.to(device=device)
        return self


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; any other name is checked to exist."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for but MPS is not available; use --device cpu")
    return device


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA cards that support it (else fp16), fp32 on MPS (fp16 gives black images
    there) and on CPU."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("fp16 is not supported on the CPU; use --dtype fp32 (or bf16)")
    return dtype


# --------------------------------------------------------------------------------------------------
# tokenizer from the shipped BPE vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (same order as CLIP's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _clip_bpe_folder() -> str:
    """Write a tokenizer folder (vocab.json, merges.txt) derived from the BPE file, once per process."""
    source = resources.files("personamagic") / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    # CLIP keeps 49152 - 256 - 2 merges: line 0 is a header.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="personamagic-clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def clip_tokenizer():
    """The SD-1.x CLIP tokenizer (49,408 tokens, max length 77), built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_clip_bpe_folder())


# --------------------------------------------------------------------------------------------------
# tiny model


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the offline `tiny` model: SD-1.x's layout (4-level VAE, cross-attention UNet, CLIP
    text encoder with the real vocabulary) at a size that trains in seconds on a CPU."""

    seed: int = 0  # weights are torch.manual_seed(seed) draws, so every process builds the same model
    hidden_size: int = 32  # text encoder width = UNet cross_attention_dim
    text_layers: int = 2  # CLIP text encoder layers
    text_heads: int = 4  # CLIP text encoder heads
    unet_channels: tuple = (32, 64)  # UNet block_out_channels (one cross-attention block per level)
    vae_channels: tuple = (16, 16, 32, 32)  # 4 levels -> scale factor 8, as SD-1.x
    latent_size: int = 16  # UNet sample_size: 16x16 latents -> 128x128 images
    image_embed_dim: int = 16  # projection_dim of the tiny CLIP vision model


def build_tiny_components(config: TinyConfig = TinyConfig()) -> BaseComponents:
    """Build the tiny SD-1.x-shaped model, deterministically, without touching the global RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * len(config.unet_channels),
            up_block_types=("CrossAttnUpBlock2D",) * len(config.unet_channels),
            cross_attention_dim=config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=config.latent_size * 8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.hidden_size,
                intermediate_size=config.hidden_size * 2,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                attn_implementation="sdpa",
            )
        )
    components = BaseComponents(TINY, tokenizer, text_encoder, vae, unet, dict(SD1_SCHEDULER_CONFIG))
    return _freeze(components)


def build_tiny_image_encoder(config: TinyConfig = TinyConfig()):
    """A tiny CLIPVisionModelWithProjection + matching CLIPImageProcessor (32x32 input)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        model = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=config.image_embed_dim,
            )
        )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval().requires_grad_(False), processor


def build_random_sd1_components(device=None) -> BaseComponents:
    """Stable Diffusion 1.x at its real sizes (UNet 320/640/1280/1280, SD VAE, CLIP ViT-L/14 text
    encoder, real tokenizer) with random weights, initialised directly on `device`. For benchmarks:
    timing and memory do not depend on the weights' values. Images are noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
            )
        )
    return _freeze(BaseComponents(RANDOM_SD1, tokenizer, text_encoder, vae, unet, dict(SD1_SCHEDULER_CONFIG)))


def load_image_encoder(name: str, *, device=None, dtype=None):
    """CLIP vision model with projection (+ its processor) by hub id / local path, or `tiny`."""
    if name == TINY:
        model, processor = build_tiny_image_encoder()
    elif name == RANDOM_IMAGE_ENCODER:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
        with torch.device(device or "cpu"):
            model = CLIPVisionModelWithProjection(config).eval().requires_grad_(False)
        processor = CLIPImageProcessor()
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(name)
            processor = CLIPImageProcessor.from_pretrained(name)
        except OSError as err:
            raise UserError(
                f"could not load the CLIP image encoder {name!r} ({_first_line(err)}); "
                "check the id/path or your network, or pass --image-encoder PATH"
            ) from None
        model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype), processor


# --------------------------------------------------------------------------------------------------
# real base models


def load_base_model(name: str, *, device=None, dtype=None, local_files_only: bool = False) -> BaseComponents:
    """Load SD-1.x by hub id, local diffusers folder, single `.safetensors`/`.ckpt` file, or `tiny`.

    Raises UserError for anything that is not SD-1.x-shaped (SDXL, inpainting UNets, ...).
    """
    if name == TINY:
        return build_tiny_components().to(device=device, dtype=dtype)
    if name == RANDOM_SD1:
        return build_random_sd1_components(device).to(device=device, dtype=dtype)
    path = Path(name).expanduser()
    if path.is_file():
        components = _load_single_file(path, local_files_only=local_files_only)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{name} is a folder but not a diffusers model (no model_index.json); "
                "pass a diffusers folder, a .safetensors/.ckpt file or a hub id"
            )
        components = _load_diffusers(str(path), local_files_only=local_files_only)
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        components = _load_diffusers(name, local_files_only=local_files_only)
    else:
        raise UserError(
            f"unknown model {name!r}: not a file, not a folder, not a hub id (owner/name); "
            "use e.g. CompVis/stable-diffusion-v1-4, a local path, or tiny"
        )
    check_sd1_shape(components)
    return _freeze(components).to(device=device, dtype=dtype)


class ResidentModels:
    """Keeps the last base model loaded, for the jobs of a long-lived process (the web UI): `load` with
    the same model, device, dtype returns the same components instead of loading them again.

    The jobs leave a model as they found it (processors, hooks and configs are restored on exit; the
    tokenizer only gains placeholder tokens); jobs that would change it for good — an IP-Adapter
    plugged in, a compiled or channels-last UNet — load their own copy instead.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._base: BaseComponents | None = None

    def load(self, name: str, *, device, dtype, local_files_only: bool = False) -> BaseComponents:
        key = (name, str(device), str(dtype), local_files_only)
        if key != self._key:
            self._key = self._base = None  # let the old model go before the next one loads
            self._base = load_base_model(name, device=device, dtype=dtype, local_files_only=local_files_only)
            self._key = key
        return self._base


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_diffusers(name: str, *, local_files_only: bool) -> BaseComponents:
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        index = DiffusionPipeline.load_config(name, local_files_only=local_files_only)
    except Exception as err:  # hub errors come in many classes; all mean "cannot read this model"
        raise UserError(
            f"could not read model {name!r} ({_first_line(err)}); check the id or path, your network "
            "and hub login, or use --model tiny to try offline"
        ) from None
    class_name = index.get("_class_name", "")
    if "text_encoder_2" in index or "XL" in class_name or "unet" not in index:
        raise UserError(
            f"{name} is a {class_name or 'non-Stable-Diffusion'} model; PersonaMagic needs a Stable "
            "Diffusion 1.x model (e.g. CompVis/stable-diffusion-v1-4, a SD-1.5 fine-tune)"
        )
    kwargs = {"local_files_only": local_files_only}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            name, subfolder="text_encoder", attn_implementation="sdpa", **kwargs
        )
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kwargs)
        scheduler_config = dict(DiffusionPipeline.load_config(name, subfolder="scheduler", **kwargs))
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the parts of {name!r} ({_first_line(err)})") from None
    return BaseComponents(name, tokenizer, text_encoder, vae, unet, _schedule_only(scheduler_config))


def _schedule_only(config: dict) -> dict:
    """Keep the noise-schedule keys of a scheduler config (drop the class name and version)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _single_file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{path} is not a readable .safetensors file ({_first_line(err)})") from None
    if path.suffix in (".ckpt", ".pt", ".pth"):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle / zip errors: the file cannot be read safely
            raise UserError(
                f"{path} cannot be read as a weights-only checkpoint ({_first_line(err)}); "
                "convert it to .safetensors"
            ) from None
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        return list(state)
    raise UserError(f"{path}: unknown model file type {path.suffix!r}; use .safetensors or .ckpt")


def _load_single_file(path: Path, *, local_files_only: bool) -> BaseComponents:
    keys = _single_file_keys(path)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        raise UserError(f"{path} is an SDXL checkpoint; PersonaMagic needs Stable Diffusion 1.x")
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint (no UNet weights found)")
    if not any(k.startswith("cond_stage_model.transformer.") for k in keys):
        raise UserError(
            f"{path} is not a Stable Diffusion 1.x checkpoint (its text encoder is not CLIP ViT-L); "
            "PersonaMagic supports SD-1.x models"
        )
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), safety_checker=None, local_files_only=local_files_only
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load {path} ({_first_line(err)})") from None
    pipe.text_encoder.set_attn_implementation("sdpa")
    return BaseComponents(
        str(path), pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, _schedule_only(dict(pipe.scheduler.config))
    )


def check_sd1_shape(components: BaseComponents) -> None:
    """Refuse models whose structure PersonaMagic cannot drive (SDXL, inpainting, non-CLIP text)."""
    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    problems = []
    if type(unet).__name__ != "UNet2DConditionModel":
        problems.append(f"UNet is {type(unet).__name__}")
    if unet.config.in_channels != 4:
        problems.append(f"UNet takes {unet.config.in_channels} input channels (inpainting/depth model?)")
    if unet.config.addition_embed_type is not None or unet.config.encoder_hid_dim is not None:
        problems.append("UNet has extra conditioning inputs (SDXL-style)")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        problems.append("UNet cross-attention width does not match the text encoder")
    if vae.config.latent_channels != 4:
        problems.append(f"VAE has {vae.config.latent_channels} latent channels")
    if type(text_encoder).__name__ != "CLIPTextModel":
        problems.append(f"text encoder is {type(text_encoder).__name__}")
    if problems:
        raise UserError(
            f"{components.name} is not a Stable Diffusion 1.x model: " + "; ".join(problems)
        )


def _freeze(components: BaseComponents) -> BaseComponents:
    for module in (components.text_encoder, components.vae, components.unet):
        module.eval().requires_grad_(False)
    return components
