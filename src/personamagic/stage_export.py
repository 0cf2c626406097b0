"""A concept's stages as embeddings that switch by timestep, for tools that can switch the text
condition during sampling but cannot run the mapper (ComfyUI, AUTOMATIC1111/Forge).

The concept's S* is, by timestep t (`method.stages.StageWindow`): the supercategory word while
t >= t_hi (static 1), mapper(t) inside the dynamic stage t_lo <= t < t_hi, mapper(t_lo) below it
(static 2). Exported, that becomes piecewise constant:

* static 1: the supercategory word itself (no file: the prompt says "face");
* the dynamic stage cut into K bins of equal timestep width, each the mapper's embedding averaged
  over the bin's integer timesteps and rescaled to the supercategory word's norm (as the one-vector
  export averages the whole stage: `export.static_vectors`);
* static 2: mapper(t_lo).

The value residual has no place in a token embedding and is lost, as in the one-vector export.
`piecewise_concept` makes the project's own pipeline sample exactly what an export describes, so that
what the export loses can be measured rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .concept import Concept
from .method.stages import Stage


@dataclass(frozen=True)
class Segment:
    """One piece of the export: S* is `embedding` (None: the supercategory word) for lo <= t < hi."""

    name: str  # a static stage's name (`Stage`) or "bin 1".."bin K" (bin 1 first in denoising order: highest t)
    lo: int
    hi: int
    embedding: torch.Tensor | None  # (n, D), every text encoder's part side by side


def bin_edges(lo: int, hi: int, bins: int) -> list[int]:
    """K + 1 integer edges cutting [lo, hi) into K bins of (nearly) equal width, from hi down to lo."""
    if bins < 1 or bins > hi - lo:
        raise ValueError(f"bins must be from 1 to the dynamic stage's width {hi - lo}, got {bins}")
    return [round(hi - k * (hi - lo) / bins) for k in range(bins + 1)]


@torch.no_grad()
def stage_segments(concept: Concept, bins: int) -> list[Segment]:
    """The export's pieces in denoising order (static 1, bins 1..K, static 2); a static stage of zero
    width (a window reaching T or 0) is left out."""
    mapper = concept.build_mapper("cpu")
    window = concept.window
    image_embed = concept.mean_image_embed()[None]
    segments = []
    for stage in Stage:
        lo, hi = window.span(stage)
        if stage == Stage.DYNAMIC:
            edges = bin_edges(lo, hi, bins)
            for k, (top, bottom) in enumerate(zip(edges, edges[1:]), start=1):
                timesteps = torch.arange(bottom, top)
                embeddings, _ = mapper(timesteps, image_embed.expand(len(timesteps), -1))
                segments.append(Segment(f"bin {k}", bottom, top, mapper.renormalize(embeddings.mean(dim=0))))
        elif hi > lo:  # a static stage: S* is one embedding over all of it
            source = window.mapper_timestep(lo)
            embedding = None if source is None else mapper(torch.tensor([source]), image_embed)[0][0]
            segments.append(Segment(stage.value, lo, hi, embedding))
    return segments


@torch.no_grad()
def static_segment(concept: Concept) -> list[Segment]:
    """The one-vector textual-inversion export as a single piece over the whole schedule."""
    from .export import static_vectors

    embedding, _ = static_vectors(concept, "mean")
    return [Segment("static", 0, concept.num_train_timesteps, embedding)]


def piecewise_concept(loaded, segments: list[Segment]) -> None:
    """Make a concept attached to a `PersonaMagicPipeline` (`LoadedConcept`) give, at each timestep, the
    embedding of the segment holding it and no value residual: what the exported files and switches
    give a tool that has no mapper."""
    config = loaded.mapper.config
    word = loaded.mapper.super_embedding.expand(config.num_vectors, -1)  # (V, D)
    device = word.device

    def vectors_at(timesteps):
        rows = []
        for t in timesteps:
            segment = next(s for s in segments if s.lo <= t < s.hi)
            rows.append(word if segment.embedding is None else segment.embedding.to(device, word.dtype))
        embeddings = torch.stack(rows)  # (K, V, D)
        return embeddings, embeddings.new_zeros(*embeddings.shape[:2], config.residual_dim)

    loaded.vectors_at = vectors_at


def without_residual(loaded) -> None:
    """Make an attached concept give its mapper's embeddings with no value residual: the full mapper as
    far as an embedding can carry it (what the bins approximate)."""
    vectors_at = loaded.vectors_at

    def embeddings_only(timesteps):
        embeddings, residuals = vectors_at(timesteps)
        return embeddings, torch.zeros_like(residuals)

    loaded.vectors_at = embeddings_only


# -- ComfyUI ---------------------------------------------------------------------------------------
# ComfyUI's ConditioningSetTimestepRange takes fractions of the schedule: `percent_to_sigma(p)` of its
# discrete models is the sigma of timestep (1 − p)·999 (0: the start of sampling, the noisiest step; 1:
# the end), and a condition is active for sigma_end <= sigma <= sigma_start, both ends included. A piece
# lo <= t < hi of whole timesteps is therefore given the edges hi − ½ and lo − ½: each sampled timestep
# falls in exactly one piece.
LAST_TIMESTEP = 999


def timestep_percent(t: float) -> float:
    """ComfyUI's schedule fraction of timestep t (0 at t = 999, 1 at t = 0), clipped to [0, 1]."""
    return min(max(1.0 - t / LAST_TIMESTEP, 0.0), 1.0)


def segment_range(segment: Segment, num_train_timesteps: int) -> tuple[float, float]:
    """(start, end) of ConditioningSetTimestepRange for a piece: 0 and 1 at the schedule's ends."""
    start = 0.0 if segment.hi >= num_train_timesteps else timestep_percent(segment.hi - 0.5)
    end = 1.0 if segment.lo <= 0 else timestep_percent(segment.lo - 0.5)
    return round(start, 6), round(end, 6)


@dataclass
class SamplerSettings:
    """What the exported workflow or prompt samples with (the paper's DDIM 50, CFG 8 by default). None:
    the concept's own (`export_stages` fills them in): its model's checkpoint file and image size."""

    checkpoint: str | None = None
    steps: int = 50
    cfg: float = 8.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    negative: str = ""
    sampler_name: str = "ddim"  # ComfyUI's DDIM sampler …
    scheduler: str = "ddim_uniform"  # … on evenly spaced timesteps, as the paper's DDIM


@dataclass(frozen=True)
class DeclaredRange:
    """A number input of a ComfyUI node as ComfyUI declares it: low <= value <= high, and a multiple of
    `step` where one is given. `flag` names the setting in messages."""

    flag: str
    node: str
    input: str
    low: float
    high: float
    step: int | None = None

    def refusal(self, value) -> str | None:
        """Why ComfyUI would refuse `value` for this input (None: it takes it)."""
        if self.low <= value <= self.high and (self.step is None or value % self.step == 0):
            return None
        multiple = f", a multiple of {self.step}" if self.step else ""
        return (f"{self.flag} {value} is outside ComfyUI's range for {self.node}'s {self.input} ({self.low} to "
                f"{self.high}{multiple})")


# The ranges ComfyUI declares for the numbers the workflow sets, by SamplerSettings field: ComfyUI's
# nodes.py, the INPUT_TYPES of KSampler and EmptyLatentImage (MAX_RESOLUTION = 16384). ComfyUI refuses a
# queued prompt with a value outside them; width and height are multiples of 8 because the latent is an
# eighth of the image (another value would draw a smaller image than asked).
COMFYUI_RANGES = {
    "seed": DeclaredRange("--seed", "KSampler", "seed", 0, 0xFFFF_FFFF_FFFF_FFFF),
    "steps": DeclaredRange("--steps", "KSampler", "steps", 1, 10000),
    "cfg": DeclaredRange("--guidance-scale", "KSampler", "cfg", 0.0, 100.0),
    "width": DeclaredRange("--width", "EmptyLatentImage", "width", 16, 16384, 8),
    "height": DeclaredRange("--height", "EmptyLatentImage", "height", 16, 16384, 8),
    "batch_size": DeclaredRange("batch_size", "EmptyLatentImage", "batch_size", 1, 4096),
}


def segment_texts(prompt: str, placeholder: str, segments: list[Segment], names: dict[str, str],
                  supercategory: str, embedding_syntax) -> list[str]:
    """The prompt once per piece: the placeholder replaced by the supercategory word (static 1) or by
    that piece's embedding, written in the tool's syntax (`embedding_syntax(name)`)."""
    if placeholder not in prompt:
        raise ValueError(f"the prompt {prompt!r} does not say the concept's placeholder {placeholder!r}")
    return [prompt.replace(placeholder, supercategory if s.embedding is None else embedding_syntax(names[s.name]))
            for s in segments]


def comfyui_workflow(prompt: str, placeholder: str, segments: list[Segment], names: dict[str, str],
                     supercategory: str, num_train_timesteps: int, settings: SamplerSettings) -> dict:
    """A ComfyUI workflow in the API format ({id: {"class_type", "inputs"}}): load the checkpoint, encode
    the prompt once per piece with that piece's embedding, give each its timestep range, combine them,
    sample, decode and save."""
    graph: dict[str, dict] = {}

    def node(class_type: str, **inputs) -> str:
        key = str(len(graph) + 1)
        graph[key] = {"class_type": class_type, "inputs": inputs}
        return key

    checkpoint = node("CheckpointLoaderSimple", ckpt_name=settings.checkpoint)
    clip = [checkpoint, 1]
    texts = segment_texts(prompt, placeholder, segments, names, supercategory, lambda name: f"embedding:{name}")
    positive = None
    for segment, text in zip(segments, texts):
        encoded = node("CLIPTextEncode", text=text, clip=clip)
        start, end = segment_range(segment, num_train_timesteps)
        ranged = node("ConditioningSetTimestepRange", conditioning=[encoded, 0], start=start, end=end)
        positive = ranged if positive is None else node("ConditioningCombine", conditioning_1=[positive, 0],
                                                        conditioning_2=[ranged, 0])
    negative = node("CLIPTextEncode", text=settings.negative, clip=clip)
    latent = node("EmptyLatentImage", width=settings.width, height=settings.height, batch_size=settings.batch_size)
    sampled = node("KSampler", model=[checkpoint, 0], seed=settings.seed, steps=settings.steps, cfg=settings.cfg,
                   sampler_name=settings.sampler_name, scheduler=settings.scheduler, positive=[positive, 0],
                   negative=[negative, 0], latent_image=[latent, 0], denoise=1.0)
    decoded = node("VAEDecode", samples=[sampled, 0], vae=[checkpoint, 2])
    node("SaveImage", images=[decoded, 0], filename_prefix="personamagic")
    return graph


# -- AUTOMATIC1111 / Forge -------------------------------------------------------------------------
# Prompt editing `[A:B:w]` (modules/prompt_parser.py): a `w` written with a decimal point is a fraction,
# turned into the step s = int(w · steps); the sampler's model calls are counted from 0 and call c uses A
# while c <= s, B after. Nested edits are each converted against the whole step count. A1111's DDIM
# (sd_samplers_timesteps.py) spaces N steps as t = 1 + k·(1000 // N) and calls the model at all of them
# but the last, from the top: N = 50 gives 49 calls at t = 981, 961, …, 21. So it samples with 2 to 1000
# steps: 1 step calls the model never, more than 1000 space their steps 0 apart.
A1111_TIMESTEPS = 1000  # what A1111's DDIM spaces its steps over, whatever the model's schedule


def a1111_ddim_calls(steps: int) -> list[int]:
    """The timesteps at which A1111's DDIM calls the model, in order, for `steps` sampling steps."""
    spaced = [min(t + 1, LAST_TIMESTEP) for t in range(0, A1111_TIMESTEPS, A1111_TIMESTEPS // steps)]
    return spaced[:0:-1]  # from the top, the lowest (the landing point) excluded


def a1111_prompt(prompt: str, placeholder: str, segments: list[Segment], names: dict[str, str],
                 supercategory: str, steps: int) -> str:
    """The prompt with the placeholder replaced by nested prompt edits that switch S* from piece to
    piece at A1111 DDIM's calls for `steps` steps. A piece no call lands in is left out (its switch could
    not be written); one that only the first call would use is left out too (prompt editing cannot end a
    text after call 0), and then the next piece starts one call early."""
    calls = a1111_ddim_calls(steps)
    words = [supercategory if s.embedding is None else names[s.name] for s in segments]
    used = [(s, w) for s, w in zip(segments, words) if any(s.lo <= t < s.hi for t in calls)]
    parts, switches = [used[0][1]], []
    for (upper, _), (lower, word) in zip(used, used[1:]):
        last_upper = max(i for i, t in enumerate(calls) if t >= upper.lo)  # the upper piece's last call
        if last_upper == 0:
            parts[-1] = word  # only call 0 would use the upper piece
            continue
        parts.append(word)
        switches.append(fraction_for_step(last_upper, steps))
    text = parts[-1]
    for word, when in zip(reversed(parts[:-1]), reversed(switches)):
        text = f"[{word}:{text}:{when}]"
    if placeholder not in prompt:
        raise ValueError(f"the prompt {prompt!r} does not say the concept's placeholder {placeholder!r}")
    return prompt.replace(placeholder, text)


def fraction_for_step(step: int, steps: int) -> str:
    """The shortest decimal `w` (with a decimal point, so that A1111 reads a fraction) whose
    int(w · steps) is `step`: the switch after call `step`."""
    for digits in range(2, 8):
        text = f"{(step + 0.5) / steps:.{digits}f}"
        if int(float(text) * steps) == step:
            return text
    raise ValueError(f"no fraction gives step {step} of {steps}")


# -- the export ------------------------------------------------------------------------------------
TOOLS = ("comfyui", "a1111")
# the file names the usual checkpoints have in the tools' checkpoint folders
CHECKPOINT_FILES = {
    "CompVis/stable-diffusion-v1-4": "sd-v1-4.ckpt",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
    "runwayml/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
    "dreamlike-art/dreamlike-photoreal-2.0": "dreamlike-photoreal-2.0.safetensors",
    "stabilityai/stable-diffusion-xl-base-1.0": "sd_xl_base_1.0.safetensors",
}
DEFAULT_BINS = 4


@dataclass
class StagedExport:
    folder: Path
    embeddings: list[Path]  # the embedding files, in denoising order
    segments: list[Segment]
    names: dict[str, str]  # piece -> embedding name
    text: str  # the A1111 prompt, or the ComfyUI workflow's file name
    concept: Concept  # what was exported
    settings: SamplerSettings  # what the workflow or prompt samples with, the concept's defaults filled in


def checkpoint_file(base_model: str) -> str | None:
    """The name the concept's model has as one file in a tool's checkpoints folder: the usual file of a
    known hub model, or the single file the concept was trained on (its name as recorded, from any OS).
    None for a model that is no one file (a diffusers folder or hub repo, the shipped world model, a model
    built in code): only the user knows which file of it they load."""
    from pathlib import PureWindowsPath

    from .hub import MODEL_FILE_SUFFIXES

    if base_model in CHECKPOINT_FILES:
        return CHECKPOINT_FILES[base_model]
    path = PureWindowsPath(base_model)  # a path recorded on Windows or not: both / and \ separate folders
    return path.name if path.suffix.lower() in MODEL_FILE_SUFFIXES else None


def no_checkpoint_file(base_model: str) -> str:
    """Why a model has no default checkpoint file, in words, for the refusal and for A1111's note."""
    from .models.world import WORLD

    if base_model == WORLD:
        return (f"the concept's model {base_model!r} has no single-file checkpoint (the shipped world model is a "
                "diffusers folder)")
    return (f"the concept's model {base_model!r} has no single-file checkpoint known here (a diffusers folder, a hub "
            "repo or a model built in code)")


def step_count_problem(tool: str, steps: int, num_train_timesteps: int) -> str | None:
    """Why the tool cannot sample with `steps` steps (None: it can). A1111's DDIM takes 2 to 1000 (see
    `a1111_ddim_calls`); ComfyUI's ddim_uniform at most one step per timestep of the model's schedule
    (more are quietly fewer)."""
    low, high = (2, A1111_TIMESTEPS) if tool == "a1111" else (1, num_train_timesteps)
    if low <= steps <= high:
        return None
    why = ("A1111's DDIM calls the model at every step but the last, 1000 // steps timesteps apart" if tool == "a1111"
           else f"the model's schedule has {num_train_timesteps} timesteps")
    return f"--steps {steps}: --format {tool} samples with {low} to {high} steps ({why})"


def sampler_settings(tool: str, settings: SamplerSettings, concept: Concept) -> SamplerSettings:
    """`settings` with the concept's defaults filled in, checked against what `tool` can sample: a
    SettingsError before anything is computed or written, rather than a workflow ComfyUI refuses."""
    import dataclasses

    from .errors import SettingsError
    from .families import family_named

    side = family_named(concept.family).image_size
    checkpoint = settings.checkpoint
    if tool == "comfyui" and checkpoint is None:
        checkpoint = checkpoint_file(concept.base_model)
        if checkpoint is None:
            raise SettingsError(f"{no_checkpoint_file(concept.base_model)}, and the workflow's Load Checkpoint needs "
                                "one: give --checkpoint FILE, the checkpoint file you load in ComfyUI "
                                "(models/checkpoints/)")
    width, height = (side if value is None else value for value in (settings.width, settings.height))
    settings = dataclasses.replace(settings, checkpoint=checkpoint, width=width, height=height)
    problems = [step_count_problem(tool, settings.steps, concept.num_train_timesteps)]
    if tool == "comfyui":
        problems += [declared.refusal(getattr(settings, key)) for key, declared in COMFYUI_RANGES.items()]
    problems = [problem for problem in problems if problem]
    if problems:
        raise SettingsError(problems[0])
    return settings


def embedding_name(name: str | None, concept: Concept, source: Path) -> str:
    """The embeddings' name: as given, else a placeholder that looks like a token (<ann>: ann), else the
    concept folder's name; letters, digits, _ and - only (it becomes file names and prompt words)."""
    import re

    from .errors import SettingsError

    if name is None:
        token = re.fullmatch(r"<([A-Za-z0-9_-]+)>", concept.placeholder)
        name = token.group(1) if token else re.sub(r"[^A-Za-z0-9_-]+", "-", source.parent.name).strip("-") or "concept"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise SettingsError(f"--name {name!r} must be letters, digits, _ or - (it becomes file names and prompt words)")
    return name


def write_folder_atomic(output: Path, write) -> None:
    """Call `write(folder)` on a hidden sibling folder of `output`, then move what it wrote into place
    (`move_into`). A fault while writing (a full disk, a write refused) removes the sibling and the
    folders this call created: no half-written export, and an existing `output` as it was. The moves are
    renames on one filesystem, which need no space."""
    import secrets
    import shutil

    from .files import make_folders, remove_empty_folders

    created = make_folders(output.parent)
    staging = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        staging.mkdir()
    except BaseException:
        remove_empty_folders(created)
        raise
    try:
        write(staging)
        move_into(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_folders(created)
        raise


def move_into(staging: Path, output: Path) -> None:
    """Put a finished folder's files at `output`: one rename of the folder when there is none yet, else
    one rename per file (files of `output` that the export does not write are kept). The files it
    replaces are moved aside first and put back if a move fails, so `output` holds the whole new export
    or its old files, never a mix."""
    import os
    import shutil

    if not output.exists():
        os.replace(staging, output)
        return
    aside = staging.with_name(staging.name + ".old")
    placed, replaced = [], []  # new files moved in; (aside, target) of the old files they replace
    try:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            relative = path.relative_to(staging)
            target = output / relative
            if target.exists():
                (aside / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, aside / relative)
                replaced.append((aside / relative, target))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for old, target in reversed(replaced):
            os.replace(old, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def export_stages(concept_path, output, *, tool: str, bins: int = DEFAULT_BINS, prompt: str | None = None,
                  settings: SamplerSettings | None = None, name: str | None = None,
                  overwrite: bool = False) -> StagedExport:
    """Write a concept's stages for `tool` into the folder `output`: `embeddings/NAME_k.safetensors` per
    bin and `NAME_late.safetensors` for static 2, plus `workflow_api.json` (ComfyUI) or `prompt.txt`
    (A1111) for `prompt` (default "a photo of <placeholder>"). Every setting is checked before anything is
    computed, and the folder appears whole or not at all (`write_folder_atomic`)."""
    import json

    from .concept import resolve_concept_path
    from .errors import DiskError, SettingsError
    from .export import export_widths
    from .families import family_named
    from .files import disk_error, save_safetensors_atomic, write_atomic

    if tool not in TOOLS:
        raise SettingsError(f"--format {tool!r}: the staged formats are {', '.join(TOOLS)}")
    source = resolve_concept_path(concept_path)
    concept = Concept.load(source)
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not overwrite)):
        raise SettingsError(f"--output {output} exists; give a new folder, or pass --overwrite to write into it")
    width = concept.window.hi - concept.window.lo
    if not 1 <= bins <= min(width, 64):
        raise SettingsError(f"--bins {bins} must be from 1 to {min(width, 64)} (the dynamic stage is {width} "
                            "timesteps)")
    prompt = prompt or f"a photo of {concept.placeholder}"
    if concept.placeholder not in prompt:
        raise SettingsError(f"--prompt {prompt!r} does not say the concept's placeholder {concept.placeholder!r}")
    settings = sampler_settings(tool, settings or SamplerSettings(), concept)
    name = embedding_name(name, concept, source)
    widths = export_widths(concept, source)
    segments = stage_segments(concept, bins)
    names = {s.name: f"{name}_late" if s.name == Stage.STATIC_2 else f"{name}_{s.name.split()[-1]}"
             for s in segments if s.embedding is not None}
    if tool == "comfyui":
        graph = comfyui_workflow(prompt, concept.placeholder, segments, names, concept.supercategory,
                                 concept.num_train_timesteps, settings)
        text = target = "workflow_api.json"
        body = json.dumps(graph, indent=2) + "\n"
    else:
        text = a1111_prompt(prompt, concept.placeholder, segments, names, concept.supercategory, settings.steps)
        target, body = "prompt.txt", text + "\n"
    family = family_named(concept.family)
    pieces = [s for s in segments if s.embedding is not None]

    def write(folder: Path) -> None:
        for segment in pieces:
            parts = [p.contiguous() for p in segment.embedding.float().split(widths, dim=-1)]
            header = {"personamagic": json.dumps({"source_fingerprint": concept.fingerprint(), "piece": segment.name,
                                                  "timesteps": [segment.lo, segment.hi]})}
            save_safetensors_atomic(family.export_tensors(names[segment.name], parts), header,
                                    folder / "embeddings" / f"{names[segment.name]}.safetensors")
        write_atomic(folder / target, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))

    try:
        write_folder_atomic(output, write)
    except OSError as err:
        raise DiskError(f"{disk_error(output, err)}; nothing was written") from None
    embeddings = [output / "embeddings" / f"{names[s.name]}.safetensors" for s in pieces]
    return StagedExport(output, embeddings, segments, names, text, concept, settings)
