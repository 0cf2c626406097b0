"""T-Sim: CLIP similarity between an image and its prompt, with S* replaced by the supercategory.

The paper (§Metrics) scores "CLIPScore (Hessel et al. 2021) between prompts and customized results,
where the placeholder S* in prompts is substituted with face". One cosine, three scales, all reported:

- `t_sim`: the raw cosine cos(E_text, E_image), the scale of the Textual Inversion and NeTI papers;
- `t_sim_100`: 100 * cos, torchmetrics' `CLIPScore` per image (torchmetrics then clamps the *mean*
  at 0; we keep the per-image values unclamped);
- `clip_s`: 2.5 * max(cos, 0), the CLIP-S of Hessel et al. 2021, the CLIPScore the paper cites. Its
  published T-Sim values (0.62-0.79 for every method, Table 6) are far above what a raw CLIP
  image-text cosine reaches (about 0.2-0.35 for matching pairs), and 2.5x that range is exactly
  theirs, so this is the scale to compare with the paper's numbers.

Embeddings come from transformers' `CLIPModel` (its forward returns the normalised `text_embeds`
and `image_embeds`). torchmetrics' `clip_score` computes the same features, but 1.9.0 fails on
transformers 5 (`get_text_features` now returns a model output, not a tensor) and its public API only
returns a mean clamped at 0, so it cannot give per-image raw cosines.

Default model: OpenAI CLIP ViT-B/32 (`openai/clip-vit-base-patch32`), as the TI/NeTI papers; the
paper does not name its CLIP. torchmetrics defaults to ViT-L/14: pass `--clip-model` to match it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from ..models.tiny import TINY, build_tiny_clip
from . import DEFAULT_CLIP_MODEL

# CLIP-S = w * max(cos, 0) with w = 2.5 (Hessel et al. 2021, Eq. 1), to spread scores over [0, 1].
CLIP_S_WEIGHT = 2.5


def replace_placeholders(prompt: str, placeholders: Iterable[str], supercategory: str,
                         own: Mapping[str, str] | None = None) -> str:
    """The text CLIP reads: every placeholder -> the supercategory, e.g. "a photo of S* as a chef" ->
    "a photo of face as a chef" (paper §Metrics); placeholders in `own` get their own word instead
    (each concept's supercategory). Longest first, so `S**` is not half-replaced."""
    words = {p: supercategory for p in placeholders if p}
    words.update({p: word for p, word in (own or {}).items() if p})
    for placeholder in sorted(words, key=len, reverse=True):
        prompt = prompt.replace(placeholder, words[placeholder])
    return prompt


def clip_s(cosine: float) -> float:
    """CLIP-S = 2.5 * max(cos, 0) (Hessel et al. 2021, Eq. 1)."""
    return CLIP_S_WEIGHT * max(float(cosine), 0.0)


@dataclass
class TextScore:
    """T-Sim of one image on the three scales, and the text CLIP actually read."""

    text: str  # prompt after placeholder replacement
    t_sim: float  # raw cosine
    t_sim_100: float  # 100 * cosine (torchmetrics' per-image scale)
    clip_s: float  # 2.5 * max(cosine, 0) (Hessel et al.; the scale of the paper's numbers)


def load_clip(name: str = DEFAULT_CLIP_MODEL, *, device=None, local_files_only: bool = False):
    """(CLIPModel, CLIPProcessor) by hub id or local folder, or `tiny`; frozen, in eval mode."""
    if name == TINY:
        model, processor = build_tiny_clip()
    else:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name, local_files_only=local_files_only)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"could not load the CLIP model {name!r} ({first_line}); pass --clip-model with a hub id, "
                "a local folder holding a CLIP model, or tiny (offline toy)"
            ) from None
        model.eval().requires_grad_(False)
    return model.to(device), processor


class TextSimilarity:
    """T-Sim with one CLIP model: images + prompts -> `TextScore`s."""

    def __init__(self, model, processor, name: str = ""):
        self.model = model
        self.processor = processor
        self.name = name  # what `load` was given, recorded in the outputs

    @classmethod
    def load(cls, name: str = DEFAULT_CLIP_MODEL, *, device=None, local_files_only: bool = False) -> TextSimilarity:
        model, processor = load_clip(name, device=device, local_files_only=local_files_only)
        return cls(model, processor, name)

    @torch.no_grad()
    def cosine(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """(B,) float32 cosine between image i (PIL RGB) and text i, on the CPU."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=list(texts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
        parameter = next(self.model.parameters())
        inputs = {k: v.to(parameter.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        outputs = self.model(**inputs)
        # text_embeds, image_embeds: (B, P), already L2-normalised by CLIPModel.forward
        return (outputs.text_embeds.float() * outputs.image_embeds.float()).sum(dim=-1).cpu()

    def score(
        self,
        images: Sequence,
        prompts: Sequence[str],
        *,
        placeholders: Iterable[str] = ("S*",),
        supercategory: str = "face",
        batch_size: int = 16,
    ) -> list[TextScore]:
        """T-Sim of image i and prompt i; placeholders are replaced before tokenising."""
        placeholders = tuple(placeholders)
        texts = [replace_placeholders(p, placeholders, supercategory) for p in prompts]
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts")
        scores = []
        for start in range(0, len(texts), batch_size):
            cosines = self.cosine(images[start : start + batch_size], texts[start : start + batch_size])
            for text, cosine in zip(texts[start : start + batch_size], cosines.tolist()):
                scores.append(TextScore(text, cosine, 100.0 * cosine, clip_s(cosine)))
        return scores
