"""PhotoMaker v1's ID encoder: a CLIP vision tower, two projections and the fuse module, with the
official `id_encoder` state-dict names, and the image processor its ID images go through (see the
package docstring for what the official release does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_HEAD_DIM = 64  # width of one attention head in CLIP's vision towers
# the fields PhotoMakerConfig shares with transformers' CLIPVisionConfig
VISION_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")


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
