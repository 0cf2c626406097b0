"""The learning world's figures: does the base model follow its prompts, and does a concept learnt
from one photo of a held-out person carry the likeness into new scenes?

Every number comes from the judge (`world.judge`) on images the shipped world model samples with the
project's own pipeline (DDIM, classifier-free guidance, the paper's settings unless told otherwise).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..world.attributes import CONTEXT_ATTRIBUTES, held_out_identities
from .report import machine_description
from ..prompts import WORLD_EDITING_PROMPTS
from ..world.captions import caption, random_context
from ..world.judge import WorldJudge, context_predictions
from ..world.metrics import judge_report, prompt_context, reference_photo, to_tensor, world_i_pre, world_t_sim
from ..world.render import render

@dataclass
class SamplingSettings:
    """How the figures sample (the paper's DDIM 50 steps, guidance 8)."""

    steps: int = 50
    guidance_scale: float = 8.0
    batch: int = 40  # images per pipeline call


def sample(pipe, prompts: list[str], seeds: list[int], settings: SamplingSettings):
    """One image per (prompt, seed), each from its own generator (batch-independent)."""
    images = []
    for start in range(0, len(prompts), settings.batch):
        chunk, chunk_seeds = prompts[start:start + settings.batch], seeds[start:start + settings.batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        images += pipe(chunk, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                       generator=generators).images
    return images


def held_out_captions(count: int, seed: int = 0) -> list[str]:
    """Captions naming every context attribute of a random context (no identity words): the base
    model's prompt-following test."""
    rng = np.random.default_rng(seed)
    said = {a.name: True for a in CONTEXT_ATTRIBUTES}
    return [caption(random_context(rng), said=said) for _ in range(count)]


def prompt_following(pipe, judge: WorldJudge, count: int = 64, seeds: int = 1,
                     settings: SamplingSettings = SamplingSettings()) -> dict:
    """Context accuracy of the base model: per attribute and overall, the share of the attributes a
    caption names (defaults that have no words left out) that the judge reads in the image."""
    prompts = [p for p in held_out_captions(count) for _ in range(seeds)]
    images = sample(pipe, prompts, [i % seeds for i in range(len(prompts))], settings)
    predicted = context_predictions(judge, to_tensor(images))
    hits: dict[str, list[bool]] = {}
    for i, prompt in enumerate(prompts):
        for name, value in prompt_context(prompt).items():
            hits.setdefault(name, []).append(predicted[name][i] == value)
    per = {name: float(np.mean(v)) for name, v in hits.items()}
    overall = float(np.mean([h for v in hits.values() for h in v]))
    return {"captions": count, "seeds": seeds, "context_accuracy": overall, "per_attribute": per,
            "images": images}


@dataclass
class LikenessRun:
    """One held-out person learnt from one photo, and the images of both prompts."""

    identity: int
    steps: int
    stage_window: list
    train_seconds: float
    i_pre: float  # mean world I-Pre of the concept's images (10 prompts x seeds)
    t_sim: float  # mean world T-Sim of the concept's images
    i_pre_supercategory: float  # the same prompts with "a face" instead of S*
    t_sim_supercategory: float
    stages: dict = field(default_factory=dict)  # the partition's details (IoU curve)
    per_prompt: dict = field(default_factory=dict)  # prompt -> (I-Pre, T-Sim)
    emergence: dict = field(default_factory=dict)  # `identity_emergence` of S* and of "a face", when asked

    def to_dict(self) -> dict:
        return asdict(self)


def likeness(identity: int, judge: WorldJudge, *, steps: int, seeds: int = 4, train_options: dict | None = None,
             settings: SamplingSettings = SamplingSettings(), work: Path | None = None,
             emergence: bool = False):
    """Train a concept on the reference photo of `identity` with `personalize` (the normal path:
    --model world, --crop none, the renderer's --mask), sample the editing prompts with S* and with the
    supercategory, and score both. Returns (LikenessRun, concept images, supercategory images)."""
    from ..jobs.personalize import personalize
    from ..models import load_base_model
    from ..pipeline import PersonaMagicPipeline
    from ..training.config import TrainConfig

    work = Path(work or tempfile.mkdtemp(prefix="personamagic-world-"))
    photo, mask = reference_photo(identity)
    photo_path, mask_path = work / f"person-{identity}.png", work / f"person-{identity}.mask.png"
    photo.save(photo_path)
    mask.save(mask_path)
    options = {"max_train_steps": steps, "checkpoint_every": 0, **(train_options or {})}
    started = time.perf_counter()
    result = personalize([str(photo_path)], work / "concept", TrainConfig(**options), model="world",
                         mask=str(mask_path), crop="none", overwrite=True)
    train_seconds = time.perf_counter() - started
    base = load_base_model("world")
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(result.concept_path)
    concept_prompts = [p.format("S*") for p in WORLD_EDITING_PROMPTS for _ in range(seeds)]
    plain_prompts = [p.format("a face") for p in WORLD_EDITING_PROMPTS for _ in range(seeds)]
    seed_list = [i % seeds for i in range(len(concept_prompts))]
    concept_images = sample(pipe, concept_prompts, seed_list, settings)
    plain_images = sample(pipe, plain_prompts, seed_list, settings)
    i_pre, t_sim = world_i_pre(judge, concept_images, photo), world_t_sim(judge, concept_images, concept_prompts)
    i_plain, t_plain = world_i_pre(judge, plain_images, photo), world_t_sim(judge, plain_images, plain_prompts)
    per_prompt = {}
    for k, prompt in enumerate(WORLD_EDITING_PROMPTS):
        rows = slice(k * seeds, (k + 1) * seeds)
        per_prompt[prompt.format("S*")] = [float(np.mean(i_pre[rows])), float(np.mean(t_sim[rows]))]
    concept = result.concept
    curves = {}
    if emergence:
        for subject in ("S*", "a face"):
            curves[subject] = identity_emergence(pipe, judge, photo, f"a photo of {subject}", seeds, settings)
    run = LikenessRun(identity, steps, list(concept.stage_window), train_seconds, float(np.mean(i_pre)),
                      float(np.mean(t_sim)), float(np.mean(i_plain)), float(np.mean(t_plain)),
                      stages=concept.stages, per_prompt=per_prompt, emergence=curves)
    return run, concept_images, plain_images


def identity_emergence(pipe, judge: WorldJudge, photo, prompt: str, seeds: int = 4,
                       settings: SamplingSettings = SamplingSettings()) -> dict:
    """When is the identity painted in? Sample `prompt` and, at every step, decode the scheduler's
    prediction of the clean image (x̂0) and take its world I-Pre against `photo`: the curve's rise is
    where the sampler decides who the face is. Returns {"timesteps", "i_pre"} (mean over seeds)."""
    scheduler = pipe.scheduler
    step, predictions = scheduler.step, []

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        predictions.append(out.pred_original_sample)
        return out

    scheduler.step = recording_step  # an instance attribute: the pipeline's scheduler only, removed below
    try:
        sample(pipe, [prompt] * seeds, list(range(seeds)), settings)
    finally:
        del scheduler.step
    timesteps = scheduler.timesteps.tolist()
    curve = []
    with torch.no_grad():
        for x0 in predictions:
            images = pipe.image_processor.postprocess(pipe.decode(x0).float(), output_type="pil")
            curve.append(float(np.mean(world_i_pre(judge, images, photo))))
    return {"prompt": prompt, "seeds": seeds, "timesteps": timesteps, "i_pre": curve}


def likeness_people(count: int, start: int = 0) -> list[int]:
    """The held-out people of the likeness figures (fixed: the first `count` of the held-out walk)."""
    return held_out_identities(count, start=start)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [−1, 1] through the VAE (posterior mean) and back."""
    return vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)


def vae_figures(vae, judge: WorldJudge, count: int = 256) -> dict:
    """Reconstruction MSE (pixels in [−1, 1]) on held-out renders, and the judge on reconstructions."""
    rng = np.random.default_rng(5)
    people = held_out_identities(count, start=5000)
    x = to_tensor([render(p, random_context(rng), int(rng.integers(2**31))).image for p in people])
    mse = float(torch.nn.functional.mse_loss(vae_round_trip(vae, x), x))
    report = judge_report(judge, identities=100, contexts=2, seed=3, degrade=lambda b: vae_round_trip(vae, b))
    return {"reconstruction_mse": mse, "images": count, "judge_on_reconstructions": report}


def emergence_figure(run: LikenessRun):
    """The partition's IoU curve and stages (as `train` draws them) with the identity's emergence
    over the sampler's steps: world I-Pre of x̂0 for S* and for "a face"."""
    from ..jobs.plots import figure_to_image, stages_plot

    figure = stages_plot(run.stages)
    ax = figure.axes[0]
    for subject, style in (("S*", "-"), ("a face", "--")):
        curve = run.emergence[subject]
        ax.plot(curve["timesteps"], curve["i_pre"], style, color="#238b45", linewidth=1.5,
                label=f"world I-Pre of x̂0, {subject}")
    ax.set_ylabel("IoU / world I-Pre")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_to_image(figure)


def contact_sheet(rows: list[list], side: int = 64):
    """A grid image of PIL image rows (for the docs)."""
    from PIL import Image

    width = max(len(r) for r in rows)
    sheet = Image.new("RGB", (width * side, len(rows) * side), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((side, side)), (x * side, y * side))
    return sheet


def world_report(*, people: int, steps: int, seeds: int, captions: int, images: Path, train_options: dict | None = None,
                 log=lambda text: None) -> dict:
    """Every figure of docs/world.md: the judge, the VAE, the base model's prompt-following and the
    likeness of `people` held-out people; example sheets written into `images` (world-*.png)."""
    import datetime

    from ..models import load_base_model
    from ..pipeline import PersonaMagicPipeline
    from ..world import world_judge_path
    from ..world.judge import load_judge

    judge = load_judge(world_judge_path())
    base = load_base_model("world")
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    report = {"date": datetime.date.today().isoformat(),
              "machine": machine_description(),
              "judge": judge_report(judge), "vae": vae_figures(base.vae, judge)}
    following = prompt_following(pipe, judge, count=captions)
    images.mkdir(parents=True, exist_ok=True)
    samples = following.pop("images")
    contact_sheet([samples[i:i + 10] for i in range(0, min(40, len(samples)), 10)]).save(images / "world-base.png")
    report["prompt_following"] = following
    log(f"base model: context accuracy {following['context_accuracy']:.3f} on {captions} held-out captions")
    runs = []
    for k, person in enumerate(likeness_people(people)):
        run, concept_images, plain_images = likeness(person, judge, steps=steps, seeds=seeds, emergence=k == 0,
                                                     train_options=train_options)
        runs.append(run.to_dict())
        log(f"person {person}: world I-Pre {run.i_pre:.3f} (supercategory {run.i_pre_supercategory:.3f}), "
            f"world T-Sim {run.t_sim:.3f}, window {run.stage_window}, {run.train_seconds:.0f} s")
        if k == 0:  # the reference photo, then the ten prompts: two seeds of the concept, one of "a face"
            photo = reference_photo(person)[0]
            rows = [[photo] + concept_images[s::seeds] for s in range(min(2, seeds))]
            rows.append([photo] + plain_images[0::seeds])
            contact_sheet(rows).save(images / "world-likeness.png")
            if run.stages.get("method") == "auto":
                emergence_figure(run).save(images / "world-stages.png")
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in (train_options or {}).items()}
    report["likeness"] = {"steps": steps, "seeds": seeds, "train_options": options, "people": runs}
    return report
