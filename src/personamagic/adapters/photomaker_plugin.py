"""PhotoMaker plugged into PersonaMagic (paper, Table 3): the concept's S* plays PhotoMaker's class word.

Write the trigger word after the placeholder: `a photo of S* img as a knight`. PhotoMaker's ID
embedding of the photo(s) is fused into S*'s prompt embedding (the two SDXL encoders' penultimate states,
2048 wide) with its fuse MLP, while S* itself follows the concept's stages, so the fused token does too:

| stage (of t) | PhotoMaker alone (class word "man") | with a PersonaMagic concept          |
|--------------|--------------------------------------|--------------------------------------|
| static 1     | fuse(word)                           | fuse(supercategory word)             |
| dynamic      | fuse(word)                           | fuse(mapper(t)) (+ residual on V)    |
| static 2     | fuse(word)                           | fuse(mapper(t_lo)) (+ residual on V) |

PhotoMaker's own delay is kept beside the stages: for denoising steps i <= `merge_step` (by step index,
default 20% of the steps: 10 of 50, the official default) the prompt is the text-only one (the trigger
dropped, S* once, nothing fused); after it, the fused one. Both delay the identity to let the layout
follow the prompt: PhotoMaker by step count, the concept by timestep (static 1 ends at t_hi). With both,
the identity arrives at whichever is later; `merge_step 0` leaves the timing to the concept alone.

With N ID images the placeholder is repeated N times in the fused prompt and the k-th copy takes the
k-th image's embedding (PhotoMaker's stacked ID embedding); the pooled embedding and the negative prompt
are not fused, as in the official pipeline. The LoRA of the weights goes into the UNet through
diffusers (peft) and stays there: a pipeline with PhotoMaker plugged in is PhotoMaker's.

Training with PhotoMaker plugged in (the paper's setting): the ID encoder and LoRA are frozen, S* of
the training prompt is fused with its own photo's ID embedding at every step, and only the mapper learns.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..errors import ModelLoadError, SettingsError
from .photomaker import HUB_REPO, TRIGGER_WORD
from .photomaker.encoder import id_image_processor
from .photomaker.lora import apply_photomaker_lora
from .photomaker.weights import load_photomaker

DEFAULT_MERGE_FRACTION = 0.2  # share of the steps before the ID is merged (official: 10 of 50)
MAX_DEFAULT_MERGE_STEP = 30  # the official demo caps its merge step at 30 whatever the steps


@dataclass
class PhotoMakerSpec:
    """Where PhotoMaker's weights are and how it is plugged in (recorded in concepts and images)."""

    weights: str = HUB_REPO  # hub repo (TencentARC/PhotoMaker), owner/repo/file on the hub, or a local file
    lora_scale: float = 1.0  # strength of its UNet LoRA (0: off)
    merge_step: int | None = None  # steps i <= merge_step use the text-only prompt; None: 20% of the steps
    trigger: str = TRIGGER_WORD  # the word after the placeholder that asks for the fusion

    def __post_init__(self):
        if not self.lora_scale >= 0:
            raise ValueError(f"PhotoMaker LoRA scale must be >= 0, got {self.lora_scale}")
        if self.merge_step is not None and self.merge_step < 0:
            raise ValueError(f"PhotoMaker merge step must be >= 0, got {self.merge_step}")
        if not re.fullmatch(r"[a-z]+", self.trigger):
            raise ValueError(f"PhotoMaker trigger must be one lower-case word, got {self.trigger!r}")

    def merge_step_for(self, num_inference_steps: int) -> int:
        if self.merge_step is not None:
            return self.merge_step
        return min(int(DEFAULT_MERGE_FRACTION * num_inference_steps), MAX_DEFAULT_MERGE_STEP)

    def to_dict(self) -> dict:
        return asdict(self)


def trigger_pattern(placeholder: str, trigger: str = TRIGGER_WORD) -> str:
    """The regex of a placeholder followed by PhotoMaker's trigger (`S* img`): what asks for the fusion."""
    return re.escape(placeholder) + r"\s+" + re.escape(trigger) + r"\b"


class PhotoMaker:
    """PhotoMaker's ID encoder (frozen) and its LoRA applied to a UNet, for prompts with the trigger."""

    def __init__(self, encoder, processor, spec: PhotoMakerSpec):
        self.encoder, self.processor, self.spec = encoder, processor, spec

    @classmethod
    def load(cls, spec: PhotoMakerSpec, unet, *, device=None, dtype=None, local_files_only: bool = False,
             encoder=None, lora=None) -> "PhotoMaker":
        """Read the weights (`load_photomaker`) and load the LoRA into `unet`; `encoder`/`lora` given:
        use those instead (tests)."""
        if encoder is None:
            encoder, lora = load_photomaker(spec.weights, device=device, dtype=dtype, local_files_only=local_files_only)
        if encoder.config.prompt_embed_dim != unet.config.cross_attention_dim:
            raise ModelLoadError(
                f"PhotoMaker {spec.weights} fuses {encoder.config.prompt_embed_dim}-wide prompt embeddings, but this "
                f"model's are {unet.config.cross_attention_dim}-wide; PhotoMaker needs an SDXL base model"
            )
        apply_photomaker_lora(unet, lora, spec.lora_scale)
        unet.requires_grad_(False)  # peft makes the LoRA trainable; here it stays frozen (only the mapper learns)
        return cls(encoder.to(device=device), id_image_processor(encoder.config), spec)

    @torch.no_grad()
    def id_embeds(self, images: list) -> torch.Tensor:
        """PIL images of the person -> (1, N, D) ID embeddings."""
        weight = self.encoder.visual_projection.weight
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(weight.device, weight.dtype)
        return self.encoder.id_embeds(pixels[None])  # (1, N, 3, H, W) -> (1, N, D)

    def fuse(self, hidden: torch.Tensor, ids: torch.Tensor, token_ids: list[int], id_embeds: torch.Tensor):
        """(B, L, C) prompt embeddings with the positions of `token_ids` in (B, L) `ids` fused with
        (B or 1, N, D) ID embeddings (the k-th position of a row takes image k)."""
        marks = torch.isin(ids, torch.tensor(token_ids, device=ids.device))
        return self.encoder.fuse(hidden, id_embeds.expand(hidden.shape[0], -1, -1), marks)

    def split_prompt(self, prompt: str, placeholder: str, count: int) -> tuple[str, str] | None:
        """(text-only prompt, fused prompt) of a prompt with `placeholder trigger`, or None without the
        trigger: the text-only one drops the trigger, the fused one repeats the placeholder `count` times."""
        pattern = trigger_pattern(placeholder, self.spec.trigger)
        found = re.findall(pattern, prompt)
        if not found:
            return None
        if len(found) > 1 or prompt.count(placeholder) > 1:
            raise SettingsError(f"a PhotoMaker prompt names {placeholder} once, followed by {self.spec.trigger!r}: "
                                f"{prompt!r}")
        text_only = re.sub(pattern, placeholder, prompt)
        fused = re.sub(pattern, " ".join([placeholder] * count), prompt)
        return text_only, fused
