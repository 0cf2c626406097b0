"""PhotoMaker v1 (Li et al., "PhotoMaker: Customizing Realistic Human Photos via Stacked ID Embedding",
CVPR 2024) as a plug-in: its ID encoder, its weights file and its UNet LoRA, for SDXL.

Here the concept token S* plays PhotoMaker's class word: PhotoMaker's ID embedding of the photo is
fused into S*'s prompt embedding. This module owns the self-contained part (encoder, weights, LoRA);
wiring it into an SDXL pipeline is the pipeline's job.

What the official release does (TencentARC/PhotoMaker, Apache-2.0: `photomaker/model.py`, unchanged
since the v1 release; `photomaker/pipeline.py` in its last v1-only version; `README.md`,
`gradio_demo/app.py`, `requirements.txt`, `feature-extractor/preprocessor_config.json`):

- **ID encoder.** A `CLIPVisionModelWithProjection` with the CLIP ViT-L/14 sizes (hidden 1024, MLP
  4096, 24 layers, 16 heads, patch 14, image 224, quick-GELU, projection 1024 -> 768 without bias),
  plus `visual_projection_2` (1024 -> 1280, no bias) and a `fuse_module`. Each ID image goes through
  the vision tower; its pooled output (the CLS token after `post_layernorm`) goes through both
  projections and the two are concatenated: one 768 + 1280 = 2048-wide ID embedding per image, as
  wide as SDXL's prompt embeddings (the two text encoders' 768 + 1280). ID images arrive as
  `(B, N, 3, 224, 224)`, N photos of one person, preprocessed by a default `CLIPImageProcessor`
  (shortest edge 224, bicubic, center crop 224, OpenAI CLIP mean/std).
- **Fuse module.** `fuse_module.mlp1` is an MLP(in 4096 -> hidden 2048 -> out 2048, no residual) on
  [class-token prompt embedding ; ID embedding]; its output plus the class-token embedding goes
  through `fuse_module.mlp2`, an MLP(2048 -> 2048 -> 2048) with a residual, then through
  `fuse_module.layer_norm`. Each MLP is `layernorm` (LayerNorm of its input) -> `fc1` -> exact GELU
  -> `fc2` (-> + input when residual). The result is written back with `masked_scatter_` at the
  positions `class_tokens_mask` marks; every other position is untouched. (The official fuse counts
  the marks over the whole batch, so it serves one prompt at a time; here each row has its own.)
- **Weights.** `photomaker-v1.bin` on the hub repo `TencentARC/PhotoMaker`, a `torch.save` of
  `{"id_encoder": {...}, "lora_weights": {...}}` (the official loader refuses any other top-level
  keys). `id_encoder` is the encoder's `state_dict()`: `vision_model.*` and `visual_projection.weight`
  (transformers' CLIP names, incl. the `pre_layrnorm` spelling), `visual_projection_2.weight`,
  `fuse_module.{mlp1,mlp2}.{layernorm,fc1,fc2}.{weight,bias}`, `fuse_module.layer_norm.{weight,bias}`;
  it is loaded with `load_state_dict(strict=True)` (transformers 4.36.2, whose CLIP `position_ids`
  buffer is not persistent, so the file has none). `lora_weights` is a UNet LoRA in diffusers' old
  attention-processor format, `unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight`
  (e.g. `unet.down_blocks.2.attentions.0.transformer_blocks.2.attn1.processor.to_k_lora.down.weight`),
  on `attn1` and `attn2` of the transformer blocks; the official pipeline applies it with
  `pipe.load_lora_weights(state_dict["lora_weights"], adapter_name="photomaker")` (diffusers' SDXL
  LoRA loader, peft backend) and its README then calls `pipe.fuse_lora()`.
- **Prompt.** The trigger word `img` is added to both tokenizers as a special token and must follow
  the class word ("a man img ..."); exactly one per prompt. The token before it is the class word
  (one token); the trigger is dropped and the class token is repeated once per ID image, and those
  N positions are `class_tokens_mask`. The k-th copy receives the k-th image's ID embedding (the
  "stacked ID embedding"). What is fused is the concatenated 2048-wide `prompt_embeds` (penultimate
  hidden states of both text encoders); the pooled embedding and the negative prompt are not fused.
- **Delayed merge.** A second, text-only prompt (the trigger removed, the class word once) is encoded
  too; denoising step `i` uses the text-only embeddings while `i <= start_merge_step` and the fused
  ones after. The demo sets `start_merge_step = int(style_strength_ratio / 100 * steps)`, capped at
  30: 10 of 50 steps at its default strength 20, the README's example value.

Not recoverable from the weights, hence fixed here: the attention head count (q/k/v weights are
hidden x hidden whatever the heads), taken as 64-wide heads like every CLIP ViT (ViT-L/14: 16).
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..errors import UserError

HUB_REPO = "TencentARC/PhotoMaker"  # the official v1 weights
WEIGHTS_NAME = "photomaker-v1.bin"  # the weights file in HUB_REPO
LORA_ADAPTER_NAME = "photomaker"  # the adapter name the official pipeline loads its LoRA under
TRIGGER_WORD = "img"  # the official pipeline's default trigger word (it follows the class word)
CLIP_HEAD_DIM = 64  # width of one attention head in CLIP's vision towers
# the fields PhotoMakerConfig shares with transformers' CLIPVisionConfig
VISION_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")

# diffusers' old attention-processor LoRA key, the format of `lora_weights`
_LORA_KEY = re.compile(
    r"unet\.(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight"
)


def clip_attention_heads(hidden_size: int) -> int:
    """Heads of a CLIP vision tower of this width: 64-wide heads; one head when narrower than that."""
    return max(1, hidden_size // CLIP_HEAD_DIM)


@dataclass
class PhotoMakerConfig:
    """Sizes of PhotoMaker's ID encoder. The defaults are PhotoMaker v1's (CLIP ViT-L/14, SDXL widths)."""

    image_size: int = 224  # side of the square ID image the vision tower reads
    patch_size: int = 14  # side of one ViT patch (kernel and stride of the patch conv)
    num_channels: int = 3  # colour channels of the ID image
    hidden_size: int = 1024  # width of the vision transformer
    intermediate_size: int = 4096  # hidden width of each vision layer's MLP
    num_hidden_layers: int = 24  # vision transformer layers
    num_attention_heads: int = 16  # heads per vision layer (not in the weights: see clip_attention_heads)
    hidden_act: str = "quick_gelu"  # vision MLP activation: OpenAI CLIP's, CLIPVisionConfig's default
    layer_norm_eps: float = 1e-5  # epsilon of the vision tower's LayerNorms (CLIP's)
    projection_dim: int = 768  # `visual_projection` output: the first part of the ID embedding
    projection_dim_2: int = 1280  # `visual_projection_2` output (no bias): the second part
    prompt_embed_dim: int = 2048  # width of the prompt embeddings the fuse rewrites (SDXL: 768 + 1280)
    fuse_hidden_dim: int = 2048  # hidden width of both fuse MLPs (v1: the prompt embedding width)

    def __post_init__(self):
        sizes = [n for n in VISION_FIELDS if n not in ("hidden_act", "layer_norm_eps")]
        for name in (*sizes, "projection_dim_2", "prompt_embed_dim", "fuse_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"PhotoMaker {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads")

    @property
    def id_embed_dim(self) -> int:
        """Width of one ID embedding: both projections concatenated."""
        return self.projection_dim + self.projection_dim_2

    def vision_config(self) -> CLIPVisionConfig:
        """The transformers config of the vision tower (with its first projection)."""
        return CLIPVisionConfig(**{name: getattr(self, name) for name in VISION_FIELDS})

    @classmethod
    def from_vision_config(
        cls, vision_config: CLIPVisionConfig, *, projection_dim_2: int, prompt_embed_dim: int, fuse_hidden_dim: int
    ) -> PhotoMakerConfig:
        """Tower sizes read from a transformers `CLIPVisionConfig`, PhotoMaker's own widths given."""
        return cls(
            **{name: getattr(vision_config, name) for name in VISION_FIELDS},
            projection_dim_2=projection_dim_2,
            prompt_embed_dim=prompt_embed_dim,
            fuse_hidden_dim=fuse_hidden_dim,
        )


class PhotoMakerMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, plus the input when `use_residual`."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class PhotoMakerFuseModule(nn.Module):
    """Fuses one class-token prompt embedding with one ID embedding into a new prompt embedding."""

    def __init__(self, prompt_embed_dim: int, id_embed_dim: int, hidden_dim: int):
        super().__init__()
        self.mlp1 = PhotoMakerMLP(prompt_embed_dim + id_embed_dim, prompt_embed_dim, hidden_dim, use_residual=False)
        self.mlp2 = PhotoMakerMLP(prompt_embed_dim, prompt_embed_dim, hidden_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(prompt_embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """(M, C) class-token embeddings, (M, D) ID embeddings -> (M, C) fused embeddings."""
        stacked = torch.cat([class_embeds, id_embeds], dim=-1)  # (M, C + D)
        fused = self.mlp1(stacked) + class_embeds  # (M, C)
        return self.layer_norm(self.mlp2(fused))


class PhotoMakerIDEncoder(nn.Module):
    """PhotoMaker v1's ID encoder: CLIP vision tower, two projections, fuse module.

    Its `state_dict()` keys are those of the official `id_encoder` (the official class subclasses
    `CLIPVisionModelWithProjection`; this one holds that model's two children under the same names).
    """

    def __init__(self, config: PhotoMakerConfig | None = None):
        super().__init__()
        config = config or PhotoMakerConfig()
        self.config = config
        tower = CLIPVisionModelWithProjection(config.vision_config())
        self.vision_model = tower.vision_model
        self.visual_projection = tower.visual_projection
        self.visual_projection_2 = nn.Linear(config.hidden_size, config.projection_dim_2, bias=False)
        self.fuse_module = PhotoMakerFuseModule(config.prompt_embed_dim, config.id_embed_dim, config.fuse_hidden_dim)

    def id_embeds(self, id_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) preprocessed ID images -> (B, N, D) ID embeddings, D = both projections."""
        if id_pixel_values.ndim != 5:
            raise ValueError(f"id_pixel_values must be (B, N, 3, H, W), got shape {tuple(id_pixel_values.shape)}")
        batch, num_images = id_pixel_values.shape[:2]
        pixels = id_pixel_values.flatten(0, 1).to(self.visual_projection.weight.dtype)  # (B*N, 3, H, W)
        pooled = self.vision_model(pixel_values=pixels).pooler_output  # (B*N, hidden): CLS after post-LayerNorm
        embeds = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)  # (B*N, D)
        return embeds.view(batch, num_images, -1)  # (B*N, D) -> (B, N, D)

    def fuse(
        self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor, class_tokens_mask: torch.Tensor
    ) -> torch.Tensor:
        """Rewrite the marked positions of `prompt_embeds` (B, L, C) with their fused embeddings.

        `id_embeds` is (B, N, D); `class_tokens_mask` is (B, L) bool, at most N marks per row; the k-th
        marked position of row b (in sequence order) is fused with `id_embeds[b, k]`. Unmarked positions
        come back bit-identical; the input is not modified, and gradients reach it through the marks.
        """
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.config.prompt_embed_dim:
            raise ValueError(
                f"prompt_embeds must be (B, L, {self.config.prompt_embed_dim}), got {tuple(prompt_embeds.shape)}"
            )
        if id_embeds.ndim != 3 or id_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(
                f"id_embeds must be (B, N, D) with B = {prompt_embeds.shape[0]}, got {tuple(id_embeds.shape)}"
            )
        if class_tokens_mask.dtype != torch.bool or class_tokens_mask.shape != prompt_embeds.shape[:2]:
            raise ValueError(
                f"class_tokens_mask must be a bool (B, L) = {tuple(prompt_embeds.shape[:2])} tensor, got "
                f"{class_tokens_mask.dtype} {tuple(class_tokens_mask.shape)}"
            )
        marks_per_row = class_tokens_mask.sum(dim=1)  # (B,)
        if bool((marks_per_row > id_embeds.shape[1]).any()):
            raise ValueError(
                f"class_tokens_mask marks {marks_per_row.tolist()} positions per row, more than the "
                f"{id_embeds.shape[1]} ID embeddings per row"
            )
        rows, cols = class_tokens_mask.nonzero(as_tuple=True)  # (M,), (M,): marked positions, row-major
        image_index = class_tokens_mask.cumsum(dim=1)[rows, cols] - 1  # (M,): which ID image each mark takes
        weight = self.fuse_module.layer_norm.weight
        fused = self.fuse_module(
            prompt_embeds[rows, cols].to(weight.dtype), id_embeds[rows, image_index].to(weight.dtype)
        )  # (M, C)
        # masked_scatter fills the marked positions in the same row-major order as nonzero above.
        return prompt_embeds.masked_scatter(class_tokens_mask[..., None], fused.to(prompt_embeds.dtype))

    def forward(
        self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, 3, H, W) ID images, (B, L, C) prompt embeddings, (B, L) mask -> (B, L, C) fused embeddings."""
        return self.fuse(prompt_embeds, self.id_embeds(id_pixel_values), class_tokens_mask)


def id_image_processor(config: PhotoMakerConfig | None = None):
    """The `CLIPImageProcessor` PhotoMaker's ID images go through, sized for `config.image_size` (v1: 224)."""
    # transformers >= 5 names its torchvision-free processor (the one older versions had) explicitly.
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    side = (config or PhotoMakerConfig()).image_size
    return processor_class(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def load_photomaker(spec: str | Path = HUB_REPO, *, device=None, dtype=None, local_files_only: bool = False):
    """Read PhotoMaker v1 weights: returns `(id_encoder, lora_state_dict)`.

    `spec` is a hub repo id (`TencentARC/PhotoMaker`: its `photomaker-v1.bin`), `owner/repo/[folder/]file`
    on the hub, or a local file (or a folder holding `photomaker-v1.bin`). The file is read with
    `torch.load(weights_only=True)`, never a full unpickle (a `.safetensors` file with flat
    `id_encoder.*` / `lora_weights.*` keys, which the official loader also reads, works too). The
    encoder's sizes are read off the tensor shapes; it comes back in eval mode, frozen, in `dtype`
    (default float32) on `device` (default CPU). The LoRA state dict stays as stored, for
    `apply_photomaker_lora`. Every problem with the file is one `UserError`.
    """
    path = _resolve_weights_file(spec, local_files_only)
    encoder_state, lora_state = _split_weights(_read_weights(path), path)
    _check_lora_state(lora_state, path)
    config = infer_photomaker_config(encoder_state, source=path)
    encoder = PhotoMakerIDEncoder(config)
    _check_encoder_state(encoder, encoder_state, path)
    encoder.load_state_dict(encoder_state, strict=True)
    encoder.to(device=device, dtype=dtype or torch.float32)
    return encoder.eval().requires_grad_(False), lora_state


def infer_photomaker_config(encoder_state: dict, *, source: str | Path = "the weights") -> PhotoMakerConfig:
    """The `PhotoMakerConfig` an `id_encoder` state dict was saved from, read off its tensor shapes."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        tensor = encoder_state.get(key)
        if tensor is None:
            raise UserError(f"{source} is not a PhotoMaker v1 ID encoder: it has no id_encoder.{key}")
        if tensor.ndim != ndim:
            raise UserError(f"{source}: id_encoder.{key} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
        return tuple(tensor.shape)

    hidden, channels, patch, _ = shape("vision_model.embeddings.patch_embedding.weight", 4)
    positions, _ = shape("vision_model.embeddings.position_embedding.weight", 2)
    patches_per_side = math.isqrt(positions - 1)  # positions = 1 CLS + (image / patch)^2 patches
    if patches_per_side < 1 or patches_per_side**2 != positions - 1:
        raise UserError(f"{source}: {positions} position embeddings are not 1 + a square number of patches")
    layers = {
        int(m.group(1)) for key in encoder_state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key))
    }
    intermediate, _ = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)
    projection_dim, _ = shape("visual_projection.weight", 2)
    projection_dim_2, _ = shape("visual_projection_2.weight", 2)
    (prompt_embed_dim,) = shape("fuse_module.layer_norm.weight", 1)
    fuse_hidden_dim, fuse_in = shape("fuse_module.mlp1.fc1.weight", 2)
    if fuse_in != prompt_embed_dim + projection_dim + projection_dim_2:
        raise UserError(
            f"{source}: fuse_module.mlp1 reads {fuse_in} features, but prompt {prompt_embed_dim} + ID "
            f"{projection_dim + projection_dim_2} = {prompt_embed_dim + projection_dim + projection_dim_2}"
        )
    try:
        return PhotoMakerConfig(
            image_size=patches_per_side * patch,
            patch_size=patch,
            num_channels=channels,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=len(layers),
            num_attention_heads=clip_attention_heads(hidden),
            projection_dim=projection_dim,
            projection_dim_2=projection_dim_2,
            prompt_embed_dim=prompt_embed_dim,
            fuse_hidden_dim=fuse_hidden_dim,
        )
    except ValueError as err:
        raise UserError(f"{source}: the ID encoder's shapes do not make a CLIP vision tower ({err})") from None


def apply_photomaker_lora(pipe_or_unet, lora_state_dict: dict, scale: float = 1.0) -> None:
    """Load PhotoMaker's LoRA into an SDXL UNet (or a pipeline's) as diffusers does, at strength `scale`.

    A pipeline with diffusers' SDXL LoRA loader gets `pipe.load_lora_weights(..., adapter_name="photomaker")`,
    the official call; a bare `UNet2DConditionModel` gets the same loader's `load_lora_into_unet`, which
    reads the old `unet.*.processor.to_*_lora.*` keys too. Both need peft. Leave it unfused (no
    `fuse_lora`) to change the strength later with `set_photomaker_lora_scale`; 0 switches it off exactly.
    """
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import USE_PEFT_BACKEND

    _check_scale(scale)
    if not USE_PEFT_BACKEND:
        raise UserError("PhotoMaker's LoRA loads through peft: pip install 'peft>=0.17'")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if LORA_ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise UserError(
            "PhotoMaker's LoRA is already loaded in this UNet: change its strength with set_photomaker_lora_scale"
        )
    _check_lora_state(lora_state_dict, "the PhotoMaker LoRA")
    _check_lora_fits(unet, lora_state_dict)
    if isinstance(pipe_or_unet, StableDiffusionXLLoraLoaderMixin):
        pipe_or_unet.load_lora_weights(dict(lora_state_dict), adapter_name=LORA_ADAPTER_NAME)
    else:
        StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(
            dict(lora_state_dict), network_alphas=None, unet=unet, adapter_name=LORA_ADAPTER_NAME
        )
    set_photomaker_lora_scale(unet, scale)


def set_photomaker_lora_scale(pipe_or_unet, scale: float) -> None:
    """Set the strength of the loaded PhotoMaker LoRA alone (0: off, 1: as trained)."""
    from peft.tuners.lora import LoraLayer

    _check_scale(scale)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if LORA_ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        raise UserError("PhotoMaker's LoRA is not loaded in this UNet: call apply_photomaker_lora first")
    # diffusers' set_adapters would also reset the weights of any other LoRA; this is the per-layer call it makes.
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(LORA_ADAPTER_NAME, scale)


def build_tiny_photomaker(
    seed: int = 0,
    *,
    text_width: int = 80,
    projection_dim: int = 32,
    projection_dim_2: int = 48,
    fuse_hidden_dim: int | None = None,
):
    """A tiny random PhotoMaker ID encoder (same classes, 32x32 images) and its image processor.

    `text_width` is the prompt embedding width of the SDXL it fuses into (a tiny SDXL: 32 + 48). The
    weights follow `seed` alone; the global RNG is left as it was.
    """
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=clip_attention_heads(32),
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    config = PhotoMakerConfig.from_vision_config(
        vision_config,
        projection_dim_2=projection_dim_2,
        prompt_embed_dim=text_width,
        fuse_hidden_dim=fuse_hidden_dim or text_width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PhotoMakerIDEncoder(config)
    return encoder.eval().requires_grad_(False), id_image_processor(config)


def tiny_photomaker_lora(unet, *, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for `unet` in `lora_weights`' format: q/k/v/out of every attention layer."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for processor_name in unet.attn_processors:  # "<attention>.processor"
        attention = unet.get_submodule(processor_name.removesuffix(".processor"))
        for proj, linear in (
            ("to_q", attention.to_q),
            ("to_k", attention.to_k),
            ("to_v", attention.to_v),
            ("to_out", attention.to_out[0]),
        ):
            prefix = f"unet.{processor_name}.{proj}_lora"
            lora[f"{prefix}.down.weight"] = (
                torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            )
            lora[f"{prefix}.up.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.1
    return lora


def save_tiny_photomaker_weights(
    path: str | Path, id_encoder: PhotoMakerIDEncoder, unet, *, rank: int = 4, seed: int = 0
) -> Path:
    """Write `id_encoder` and a tiny LoRA for `unet` as a file laid out like `photomaker-v1.bin`."""
    path = Path(path)
    state = {"id_encoder": id_encoder.state_dict(), "lora_weights": tiny_photomaker_lora(unet, rank=rank, seed=seed)}
    torch.save(state, path)
    return path


def _resolve_weights_file(spec: str | Path, local_files_only: bool) -> Path:
    """The local path of the weights `spec` names, downloading from the hub if needed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
        if not path.is_file():
            raise UserError(f"{spec} has no {WEIGHTS_NAME}: pass the weights file itself")
    if path.is_file():
        return path
    text = str(spec)
    parts = text.split("/")
    is_file_name = parts[-1].endswith((".bin", ".pt", ".pth", ".safetensors"))
    if len(parts) < 2 or text.startswith((".", "/", "~")) or not all(parts) or (len(parts) == 2 and is_file_name):
        raise UserError(
            f"PhotoMaker weights {text!r}: no such file, and not a hub repo id "
            f"(e.g. {HUB_REPO} or {HUB_REPO}/{WEIGHTS_NAME})"
        )
    repo_id = "/".join(parts[:2])
    subfolder = "/".join(parts[2:-1]) or None
    filename = parts[-1] if len(parts) > 2 else WEIGHTS_NAME
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=local_files_only))
    except (OSError, ValueError, EntryNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not get {filename} from the hub repo {repo_id} ({first}); download it and pass the local file"
        ) from None


def _read_weights(path: Path):
    """The object stored in `path`, read without running any code it may hold."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            flat = load_file(path)
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise UserError(f"{path} is not a readable safetensors file ({err})") from None
        nested: dict[str, dict] = {}
        for key, tensor in flat.items():
            group, _, name = key.partition(".")
            nested.setdefault(group, {})[name] = tensor
        return nested
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names the class or function it would have had to import.
        if "GLOBAL" in str(err):
            raise UserError(
                f"{path} holds pickled objects other than tensors (code that would run when loaded); "
                "refusing it: use the official photomaker-v1.bin or a file of plain tensors"
            ) from None
        raise UserError(f"{path} is not a PyTorch weights file (it does not unpickle)") from None
    except Exception as err:  # torch.load raises RuntimeError, EOFError, ValueError... on a foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a PyTorch weights file ({first})") from None


def _split_weights(state, source: Path) -> tuple[dict, dict]:
    """`id_encoder` and `lora_weights` of a PhotoMaker file, checked to be dicts of tensors."""
    if not isinstance(state, dict):
        raise UserError(
            f"{source} holds a {type(state).__name__}, not PhotoMaker's {{'id_encoder': ..., 'lora_weights': ...}}"
        )
    missing = [name for name in ("id_encoder", "lora_weights") if name not in state]
    extra = sorted(str(name) for name in state if name not in ("id_encoder", "lora_weights"))
    if missing or extra:
        raise UserError(
            f"{source} is not a PhotoMaker v1 file: it needs exactly 'id_encoder' and 'lora_weights', "
            f"has {sorted(str(name) for name in state)}"
        )
    for name in ("id_encoder", "lora_weights"):
        part = state[name]
        if not isinstance(part, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in part.items()
        ):
            raise UserError(
                f"{source}: '{name}' must be a dict of named tensors, got a {type(part).__name__} of other things"
            )
    return state["id_encoder"], state["lora_weights"]


def _check_encoder_state(encoder: PhotoMakerIDEncoder, encoder_state: dict, source: Path) -> None:
    """Same keys and shapes as `encoder`, or one UserError naming the first differences."""
    expected = encoder.state_dict()
    if any(key.startswith("qformer_perceiver.") for key in encoder_state):
        raise UserError(f"{source} is a PhotoMaker v2 file (it needs insightface ID embeddings); use photomaker-v1.bin")
    missing = sorted(set(expected) - set(encoder_state))
    unexpected = sorted(set(encoder_state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} is not a PhotoMaker v1 ID encoder: missing id_encoder.{missing[:3]}, "
            f"unexpected id_encoder.{unexpected[:3]}"
        )
    wrong = [
        f"{key} {tuple(encoder_state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if encoder_state[key].shape != value.shape
    ]
    if wrong:
        raise UserError(f"{source}: the ID encoder's tensors do not fit together: id_encoder.{wrong[0]}")


def _check_lora_state(lora_state: dict, source) -> None:
    """`lora_state` is a non-empty LoRA in diffusers' old processor format, with matching ranks."""
    if not lora_state:
        raise UserError(f"{source} has no LoRA weights ('lora_weights' is empty)")
    ranks = {}
    for key, tensor in lora_state.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise UserError(
                f"{source}: LoRA key {key!r} is not in PhotoMaker's format "
                "unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight"
            )
        if tensor.ndim != 2:
            raise UserError(f"{source}: LoRA weight {key} has shape {tuple(tensor.shape)}, expected a matrix")
        pair = (match["module"], match["proj"])
        rank = tensor.shape[0] if match["side"] == "down" else tensor.shape[1]  # down (r, in), up (out, r)
        if ranks.setdefault(pair, rank) != rank:
            raise UserError(
                f"{source}: the down and up weights of {match['module']}.{match['proj']} have different ranks"
            )
    halves = {(m["module"], m["proj"], m["side"]) for m in map(_LORA_KEY.fullmatch, lora_state)}
    for module, proj in ranks:
        if {(module, proj, "down"), (module, proj, "up")} - halves:
            raise UserError(f"{source}: the LoRA of {module}.{proj} lacks its down or up weight")


def _check_lora_fits(unet, lora_state: dict) -> None:
    """Every LoRA weight names an attention projection of `unet` with matching sizes."""
    for key, tensor in lora_state.items():
        match = _LORA_KEY.fullmatch(key)
        try:
            attention = unet.get_submodule(match["module"])
            linear = attention.to_out[0] if match["proj"] == "to_out" else getattr(attention, match["proj"])
            sizes = (linear.in_features, linear.out_features)
        except AttributeError:
            raise UserError(
                f"the PhotoMaker LoRA does not fit this UNet (it has no {match['module']}.{match['proj']}); "
                "PhotoMaker v1 is made for SDXL"
            ) from None
        fits = tensor.shape[1] == sizes[0] if match["side"] == "down" else tensor.shape[0] == sizes[1]
        if not fits:
            raise UserError(
                f"the PhotoMaker LoRA does not fit this UNet ({key} is {tuple(tensor.shape)}, the layer maps "
                f"{sizes[0]} -> {sizes[1]}); PhotoMaker v1 is made for SDXL"
            )


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"PhotoMaker LoRA scale must be a finite number >= 0, got {scale}")
