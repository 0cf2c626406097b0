"""Export a concept as a textual-inversion embedding for the wider ecosystem.

SD-1.x: the format diffusers' textual-inversion training writes, safetensors `{token: Tensor[n, D]}`
(n = the concept's `num_vectors`, D = the text encoder width). SDXL: `{"clip_l": Tensor[n, 768],
"clip_g": Tensor[n, 1280]}` (kohya's SDXL format, which A1111 and ComfyUI read; diffusers loads it
with one `load_textual_inversion` call per text encoder and tokenizer). The format is the model
family's (`ModelFamily.export_tensors`). diffusers' `load_textual_inversion`
reads it (a multi-vector token loads as `token, token_1, ...`), and so do A1111 and ComfyUI from their
`embeddings/` folder (both accept a single-tensor safetensors file and use the file name as the
trigger word). No pickle: A1111's `.pt` format is not written.

What a static embedding cannot hold, and is therefore lost:
* **the stages**: PersonaMagic's S* is the supercategory word while t >= t_hi (the layout follows the
  prompt), mapper(t) inside the dynamic stage and mapper(t_lo) below it. An embedding is one vector
  for every timestep, so the early steps see the learned identity too, which tends to pull the layout
  towards the training photo and to weaken the rest of the prompt.
* **the value residual**: it is added to the text encoder *output* and used only as the V input of
  the UNet's cross-attention (computed from the photo's CLIP embedding); a token embedding enters the
  text encoder's *input*, so there is no place for it. Identity detail carried by the residual is lost.

How the vectors are chosen (`vectors`):
* `mean` (default): the mapper's embedding averaged over every integer timestep of the dynamic stage
  [t_lo, t_hi), then rescaled to the norm of the supercategory word. Training draws t uniformly from
  that range, so this is the expected embedding under the training distribution — the single vector
  closest (in L2) to everything the mapper learned — and the identity lives in this stage. The rescale
  is the mapper's own rule (every S* vector has the norm of a real word); a plain mean would be shorter
  and out of the distribution the text encoder was trained on.
* `centre`: the mapper's embedding at the middle timestep of the dynamic stage, (t_lo + t_hi) // 2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .concept import Concept, resolve_concept_path
from .errors import ConceptError, SettingsError
from .families import family_named
from .files import disk_error, save_safetensors_atomic

VECTOR_CHOICES = ("mean", "centre")


@dataclass
class ExportResult:
    path: Path  # the file written
    token: str  # the key the embedding is stored under
    num_vectors: int  # n
    width: int  # D
    description: str  # how the vectors were chosen, in words


@torch.no_grad()
def static_vectors(concept: Concept, vectors: str = "mean") -> tuple[torch.Tensor, str]:
    """(n, D) float32 static embedding approximating the concept, and a description of the choice."""
    mapper = concept.build_mapper("cpu")
    t_lo, t_hi = concept.window
    if vectors == "mean":
        timesteps = torch.arange(t_lo, t_hi)
        description = f"mapper mean over t in [{t_lo}, {t_hi}), rescaled to the supercategory's norm"
    elif vectors == "centre":
        timesteps = torch.tensor([(t_lo + t_hi) // 2])
        description = f"mapper at t = {(t_lo + t_hi) // 2}, the centre of the dynamic stage"
    else:
        raise ValueError(f"unknown vector choice {vectors!r}; use one of {', '.join(VECTOR_CHOICES)}")
    image_embeds = concept.mean_image_embed()[None].expand(len(timesteps), -1)
    embeddings, _ = mapper(timesteps, image_embeds)  # (K, n, D); residuals have no place in an embedding
    # the mapper's own rule, per text encoder: each encoder's part at the norm of its supercategory word
    return mapper.renormalize(embeddings.mean(dim=0)), description  # (K, n, D) -> (n, D)


def default_token(concept: Concept, output: Path) -> str:
    """The concept's placeholder when it already looks like a token (`<me>`), else `<file-name>`."""
    if re.fullmatch(r"<[a-z0-9_-]+>", concept.placeholder):
        return concept.placeholder
    name = re.sub(r"[^a-z0-9_-]+", "-", output.stem.lower()).strip("-") or "concept"
    return f"<{name}>"


def export_widths(concept: Concept, source: Path) -> list[int]:
    """Each text encoder's width in the concept's embedding, checked against its model family's encoders:
    a concept whose metadata swaps SDXL's widths would be written with clip_l and clip_g each holding the
    other's part. A ConceptError before anything is written."""
    family = family_named(concept.family)
    widths = list(concept.mapper_config.get("encoder_widths") or [concept.text_encoder_hidden_size])
    problems = family.encoder_width_problems(widths)
    if problems:
        raise ConceptError(f"{source}: its metadata does not fit {family.title} ({'; '.join(problems)}); nothing was "
                           "written (the concept is damaged: train it again)")
    return widths


def export_textual_inversion(
    concept_path: str | Path,
    output: str | Path | None = None,
    *,
    token: str | None = None,
    vectors: str = "mean",
    overwrite: bool = False,
) -> ExportResult:
    """Write the concept as a textual-inversion embedding file (see the module docstring).

    output: file to write (default `./<concept folder name>.safetensors`); token: the key (default
    `default_token`); an existing file is replaced only with `overwrite`.
    """
    source = resolve_concept_path(concept_path)
    concept = Concept.load(source)
    if output is None:
        output = Path(source.parent.name + ".safetensors")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise SettingsError(f"--output {output} must end in .safetensors "
                            "(the format diffusers, A1111 and ComfyUI read)")
    try:
        if output.is_dir():
            raise SettingsError(f"--output {output} is a folder; give a file name ending in .safetensors")
        if any(parent.exists() and not parent.is_dir() for parent in output.parents):
            raise SettingsError(f"--output {output} lies under a file; give a path in a folder")
        if output.exists() and not overwrite:
            raise SettingsError(f"{output} exists; pass --overwrite to replace it")
    except OSError as err:  # a name too long, a folder on the way that may not be read
        raise disk_error(output, err) from None
    token = default_token(concept, output) if token is None else token
    if not token.strip() or token != token.strip():
        raise SettingsError(f"token {token!r} must be non-empty text without surrounding spaces")
    embedding, description = static_vectors(concept, vectors)
    if not torch.isfinite(embedding).all():  # Concept.load checks the mapper; this guards the export itself
        raise ConceptError(f"{source}: the concept gives a NaN or infinite embedding; nothing was written")
    header = {
        "personamagic": json.dumps({
            "source_fingerprint": concept.fingerprint(),
            "placeholder": concept.placeholder,
            "supercategory": concept.supercategory,
            "stage_window": concept.window.to_list(),
            "base_model": concept.base_model,
            "vectors": vectors,
            "description": description,
            "lost": "stages (static embedding at every timestep) and the value residual",
        })
    }
    widths = export_widths(concept, source)
    parts = embedding.split(widths, dim=-1)
    tensors = family_named(concept.family).export_tensors(token, [part.contiguous() for part in parts])
    try:
        save_safetensors_atomic(tensors, header, output)
    except OSError as err:
        raise disk_error(output, err) from None
    return ExportResult(output, token, embedding.shape[0], embedding.shape[1], description)
