"""Running a study: each process trains, generates and scores its units, then the report is merged.

Every process plans the whole study from the config (`plan`), takes its share of units, skips items
already in the results, and appends one JSON line per finished item to its own file (`ledger`), so a
crash loses nothing finished and a rerun picks up where it stopped. The process that finds every item
finished merges all files into the report; a rerun with everything done just rewrites the report.

Processes come from any launcher that sets RANK/WORLD_SIZE (`accelerate launch`, `torchrun`) or
MPI's variables; no process group is created, so CPU processes work as well as one GPU each.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import PersonaMagicError, PhotoError
from ..models.world import WORLD
from .config import StudyConfig
from .ledger import Ledger
from .plan import Item, Plan, Shard, Unit, plan_study, process_device

logger = logging.getLogger(__name__)

STUDY_FILENAME = "study.json"
RESULTS_DIR = "results"
CONCEPTS_DIR = "concepts"
IMAGES_DIR = "images"
EXPORTS_DIR = "exports"  # the textual-inversion files of the diffusers-textual-inversion sampler


@dataclass
class StudyRun:
    """What one process did."""

    output: Path
    shard: Shard
    units: int = 0  # units assigned to this process
    trained: int = 0  # concepts trained now
    failed: int = 0  # units that failed now (bad photo...), recorded and retried on the next run
    generated: int = 0  # images generated now
    scored: int = 0  # items scored now (generated now, or found on disk from an earlier run)
    skipped: int = 0  # items already finished before this run
    complete: bool = False  # every item of the study is finished (or its unit failed)
    report: dict | None = None  # paths written by report.write_report, when this process wrote it
    remaining: int = 0  # items of the whole study still to do


class _Scorers:
    """The metric models, loaded on first use and kept for the whole process; "world" for `clip_model`
    and `face_model` is the learning world's judge."""

    def __init__(self, config: StudyConfig, device):
        self.config = config
        self.device = device

    @functools.cached_property
    def _world(self):
        """The world judge's (T-Sim, I-Pre) scorers: one judge for both."""
        from .images import world_metrics

        return world_metrics()

    @functools.cached_property
    def text(self):
        from .text_similarity import TextSimilarity

        if self.config.clip_model == WORLD:
            return self._world[0]
        return TextSimilarity.load(self.config.clip_model, device=self.device,
                                   local_files_only=self.config.local_files_only)

    @functools.cached_property
    def identity(self):
        from .identity_preservation import IdentityPreservation, load_face_embedder

        if self.config.face_model == WORLD:
            return self._world[1]
        return IdentityPreservation(load_face_embedder(self.config.face_model, device=self.device))


class _Sampler:
    """The base model, loaded once per process; a fresh pipeline per concept."""

    def __init__(self, config: StudyConfig, device):
        self.config = config
        self.device = device
        self._base = None
        self._plugin = None  # the plug-in loaded into `_base` (a plug-in changes the model for good)

    def base(self, plugin: dict | None = None):
        """The base model (loaded again when the plug-in changes: a plug-in changes the model for good)."""
        from ..models import load_base_model, resolve_dtype

        if self._base is None or plugin != self._plugin:
            self._base = None  # let the old model go before the next one loads
            self._base = load_base_model(self.config.model, device=self.device,
                                         dtype=resolve_dtype(self.config.dtype, self.device),
                                         local_files_only=self.config.local_files_only)
            self._plugin, self._loaded = plugin, {}
        return self._base

    def pipeline(self, unit: Unit, concept_path: Path, export_path: Path):
        """(pipeline, concept) that sample `unit`'s images with its sampler (`MethodPreset.sampler`)."""
        if unit.sampler == "diffusers-textual-inversion":
            return self.textual_inversion_pipeline(concept_path, export_path)
        return self.personamagic_pipeline(concept_path, unit.plugin)

    def personamagic_pipeline(self, concept_path: Path, plugin: dict | None = None):
        from ..concept import Concept
        from ..pipeline.pipeline import PersonaMagicPipeline

        self.base(plugin)
        settings = self.config.generate_config("-")
        pipe = PersonaMagicPipeline.from_base(self._base, scheduler=settings.scheduler)
        pipe.set_progress_bar_config(disable=True)
        if plugin is not None:
            load_plugin(pipe, plugin, self.config.local_files_only, self._loaded)
        concept = Concept.load(concept_path)
        pipe.load_concept(concept)
        return pipe, concept

    def textual_inversion_pipeline(self, concept_path: Path, export_path: Path):
        """diffusers' own pipeline of the model's family on the base model's modules, with the concept
        exported by `personamagic export` to `export_path` and read by diffusers' `load_textual_inversion`
        (each text encoder's part into its encoder) under the concept's placeholder. The text encoders and
        tokenizers are copies (loading adds a token to them)."""
        import copy

        import diffusers

        from ..concept import Concept
        from ..export import export_textual_inversion
        from ..files import read_weights
        from ..pipeline.schedulers import make_scheduler

        concept = Concept.load(concept_path)
        base = self.base()
        family = base.family
        result = export_textual_inversion(concept_path, export_path, token=concept.placeholder, overwrite=True)
        modules = {}
        for spec, encoder, tokenizer in zip(family.encoders, base.text_encoders, base.tokenizers):
            modules[spec.component], modules[spec.tokenizer] = copy.deepcopy(encoder), copy.deepcopy(tokenizer)
        scheduler = make_scheduler(self.config.generate_config("-").scheduler, base.scheduler_config)
        pipe = getattr(diffusers, family.pipeline_class)(vae=base.vae, unet=base.unet, scheduler=scheduler,
                                                         feature_extractor=None, **modules, **family.pipeline_kwargs())
        pipe.set_progress_bar_config(disable=True)
        # a damaged export fails this unit (a ModelLoadError, recorded), not the whole study
        tensors = read_weights(result.path, advice="check the disk it is on; the study's next run exports it again")
        for spec in family.encoders:  # one call per encoder with its part of the file (SD-1.x: under the token)
            pipe.load_textual_inversion(tensors[spec.export_key or result.token], token=result.token,
                                        text_encoder=getattr(pipe, spec.component),
                                        tokenizer=getattr(pipe, spec.tokenizer))
        return pipe, concept


def plugin_arguments(plugin: dict | None) -> dict:
    """`personalize`'s arguments for a method's plug-in (`MethodConfig.plugin`)."""
    if not plugin:
        return {}
    if "photomaker" in plugin:
        from ..adapters.photomaker_plugin import PhotoMakerSpec

        return {"photomaker": PhotoMakerSpec(weights=plugin["photomaker"])}
    from ..adapters.ip_adapter import IPAdapterSpec

    return {"ip_adapter": IPAdapterSpec.parse(plugin["ip_adapter"], scale=plugin.get("scale", 1.0))}


def load_plugin(pipe, plugin: dict, local_files_only: bool, loaded: dict) -> None:
    """A method's plug-in on a pipeline. Its weights go into the shared UNet with the first pipeline;
    `loaded` (empty the first time) keeps what the next pipelines attach instead of loading again."""
    from ..adapters.ip_adapter import load_ip_adapter

    spec = plugin_arguments(plugin)
    if not loaded:
        if "photomaker" in spec:
            loaded["photomaker"] = pipe.load_photomaker(spec["photomaker"], local_files_only=local_files_only)
        else:
            load_ip_adapter(pipe, spec["ip_adapter"], local_files_only=local_files_only)
            loaded.update(image_encoder=pipe.image_encoder, feature_extractor=pipe.feature_extractor)
    elif "photomaker" in spec:
        pipe.photomaker = loaded["photomaker"]  # its LoRA is in the shared UNet already
    else:  # the adapter's projections are in the shared UNet already: attach its image encoder
        pipe.register_modules(image_encoder=loaded["image_encoder"], feature_extractor=loaded["feature_extractor"])
        pipe.set_ip_adapter_scale(spec["ip_adapter"].scale)


def _identity_loss_line(config: StudyConfig, units: list[Unit]) -> str:
    """Which identity network the study's training uses, and its weights' licence, in one line."""
    from ..identity.loading import default_identity_model, identity_model_licence

    if not any(unit.train["use_id_loss"] for unit in units):
        return "identity loss: off in every method"
    spec = config.identity_model if config.identity_model != "auto" else default_identity_model(config.model)
    return f"identity loss: {spec}, weights licence: {identity_model_licence(spec)}"


def run_study(config: StudyConfig, shard: Shard | None = None) -> StudyRun:
    """Do this process's share of the study, then write the report if the whole study is finished."""
    from .report import write_report

    shard = shard or Shard.from_environment()
    output = Path(config.output)
    plan = plan_study(config)
    _write_study_file(output, config)
    worker = _Worker(config, shard, plan)
    finished = {r["item"] for r in worker.ledger.records() if r.get("type") == "image"}
    mine = take_units(shard, plan.units)
    if any(item.item_id not in finished for unit in mine for item in plan.items[unit.unit_id]):
        worker.ledger.append({"type": "start", "process": shard.index, "time": time.time()})  # the study's span
    run = worker.run
    run.units = len(mine)
    logger.info("process %d of %d: %d of %d training runs", shard.index, shard.count, len(mine), len(plan.units))
    logger.info(_identity_loss_line(config, plan.units))

    failed_in_groups: set[str] = set()
    if config.identities_per_step > 1:
        pending = [u for u in mine if any(i.item_id not in finished for i in plan.items[u.unit_id])]
        failed_in_groups = worker.train_in_groups(pending)

    for number, unit in enumerate(mine, start=1):
        todo = [item for item in plan.items[unit.unit_id] if item.item_id not in finished]
        run.skipped += len(plan.items[unit.unit_id]) - len(todo)
        if not todo or unit.unit_id in failed_in_groups:
            continue
        logger.info("[%d/%d] %s / %s / %s (repeat %d): %d images to do",
                    number, len(mine), unit.dataset, unit.method, unit.identity, unit.repeat, len(todo))
        try:
            worker.generate_and_score(unit, todo, worker.ensure_concept(unit))
        except PersonaMagicError as err:
            logger.warning("%s failed: %s", unit.unit_id, err)
            worker.record("failed", unit, error=str(err))
            run.failed += 1

    records = worker.ledger.records()
    done = {r["item"] for r in records if r.get("type") == "image"}
    failed_units = {r["unit"] for r in records if r.get("type") == "failed"}
    remaining = [i for u, items in plan.items.items() for i in items if i.item_id not in done and u not in failed_units]
    run.remaining = len(remaining)
    run.complete = not remaining
    if run.complete or shard.count == 1:
        # Several processes: only one that sees every item finished writes, so a partial report can
        # never replace a complete one.
        run.report = write_report(output, config, plan, records)
    else:
        logger.info("%d items are left to other processes; the last one to finish writes the report "
                    "(or rerun this command to merge)", run.remaining)
    return run


def take_units(shard: Shard, units: list[Unit]) -> list[Unit]:
    """This process's units, in planning order: `Shard.take` of the units that train a concept, each
    with the units that sample its concept, so that one process trains every concept."""
    taken = {unit.unit_id for unit in shard.take([u for u in units if u.concept_unit is None])}
    return [unit for unit in units if (unit.concept_unit or unit.unit_id) in taken]


def _write_study_file(output: Path, config: StudyConfig) -> None:
    from .images import write_json

    write_json(output / STUDY_FILENAME, config.to_dict())


class _Worker:
    """One process's tools: its ledger file, device, metric models and base model."""

    def __init__(self, config: StudyConfig, shard: Shard, plan: Plan):
        from ..models.devices import resolve_device

        self.config = config
        self.units = {unit.unit_id: unit for unit in plan.units}
        self.shard = shard
        self.output = Path(config.output)
        self.ledger = Ledger(self.output / RESULTS_DIR, shard.index, shard.count)
        self.device_name = process_device(config.device, shard)
        device = resolve_device(self.device_name)
        self.scorers = _Scorers(config, device)
        self.sampler = _Sampler(config, device)
        self.run = StudyRun(self.output, shard)

    def record(self, kind: str, unit: Unit, **fields) -> None:
        """Append one record about `unit` to this process's results file."""
        self.ledger.append({
            "type": kind, "unit": unit.unit_id, "dataset": unit.dataset, "method": unit.method,
            "identity": unit.identity, "repeat": unit.repeat, **fields, "process": self.shard.index,
            "time": time.time(),
        })

    def ensure_concept(self, unit: Unit) -> Path:
        """The unit's concept: found on disk, or trained now (resuming its checkpoints if a run was cut);
        for a unit that samples another's concept, that unit's."""
        from ..concept import CONCEPT_FILENAME
        from ..jobs.personalize import CHECKPOINT_DIR, personalize
        from ..training import TrainConfig, latest_checkpoint

        if unit.concept_unit is not None:
            return self.ensure_concept(self.units[unit.concept_unit])
        folder = self.output / CONCEPTS_DIR / unit.folder
        if (folder / CONCEPT_FILENAME).is_file():
            return folder / CONCEPT_FILENAME
        resume = latest_checkpoint(folder / CHECKPOINT_DIR) is not None
        logger.info("training %s on %s%s", unit.method, ", ".join(Path(p).name for p in unit.photos),
                    " (resuming)" if resume else "")
        config = self.config
        result = personalize(
            list(unit.photos), folder, TrainConfig(**unit.train), model=config.model, device=self.device_name,
            dtype=config.dtype, mask=unit.mask, image_encoder=config.image_encoder,
            identity_model=config.identity_model, resume=resume, local_files_only=config.local_files_only,
            **plugin_arguments(unit.plugin),
        )
        self.record("train", unit, photos=[Path(p).name for p in unit.photos],
                    concept=str(result.concept_path.relative_to(self.output)),
                    stage_window=list(result.concept.stage_window), train_s=result.timings.get("total_s"),
                    notes=result.notes)
        self.run.trained += 1
        return result.concept_path

    def train_in_groups(self, units: list[Unit]) -> set[str]:
        """Train the units without a concept `identities_per_step` at a time (`jobs.train_many`), recording
        each as `ensure_concept` does (train_s: its share of its group's time); returns the ids of those
        that failed, recorded as failed."""
        from ..concept import CONCEPT_FILENAME
        from ..jobs.train_many import IdentityJob, train_identities
        from ..training import TrainConfig

        concepts = self.output / CONCEPTS_DIR
        # plug-ins change the model they train on, so their units train alone (in `ensure_concept`)
        units = {u.unit_id: u for u in units
                 if not (concepts / u.folder / CONCEPT_FILENAME).is_file() and not u.plugin and not u.concept_unit}
        if not units:
            return set()
        config = self.config
        logger.info("training %d units, %d per step", len(units), config.identities_per_step)
        jobs = [IdentityJob(u.unit_id, u.photos, concepts / u.folder, TrainConfig(**u.train), u.mask)
                for u in units.values()]
        try:
            result = train_identities(
                jobs, identities_per_step=config.identities_per_step, model=config.model, device=self.device_name,
                dtype=config.dtype, image_encoder=config.image_encoder, identity_model=config.identity_model,
                local_files_only=config.local_files_only,
            )
        except PersonaMagicError as err:  # before any training (a model missing offline...): every unit failed
            logger.warning("training failed: %s", err)
            failed = {unit_id: str(err) for unit_id in units}
        else:
            failed = result.failed
            for unit_id, trained in result.trained.items():
                self.record("train", units[unit_id], photos=[Path(p).name for p in units[unit_id].photos],
                            concept=str(trained.concept_path.relative_to(self.output)),
                            stage_window=list(trained.concept.stage_window), train_s=trained.timings.get("total_s"),
                            identities_per_step=trained.timings.get("identities_per_step"), notes=trained.notes)
                self.run.trained += 1
        for unit_id, error in failed.items():  # each named in a warning already
            self.record("failed", units[unit_id], error=error)
            self.run.failed += 1
        return set(failed)

    def generate_and_score(self, unit: Unit, todo: list[Item], concept_path: Path) -> None:
        """Generate the unit's missing images (reusing PNGs already on disk), score them, record each."""
        from PIL import Image

        folder = self.output / IMAGES_DIR / unit.folder
        reference = self.scorers.identity.reference(unit.photos)
        settings = self.config.generate_config("-")
        pipe = concept = None
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            images, seconds = {}, {}
            for item in batch:
                if (folder / item.filename()).is_file():  # written atomically by an earlier run: complete
                    with Image.open(folder / item.filename()) as image:
                        images[item.item_id] = image.convert("RGB")
            missing = [item for item in batch if item.item_id not in images]
            if missing:
                if pipe is None:
                    export = self.output / EXPORTS_DIR / unit.folder.with_suffix(".safetensors")
                    pipe, concept = self.sampler.pipeline(unit, concept_path, export)
                t0 = time.perf_counter()
                for item, image in zip(missing, self._generate(pipe, missing, unit)):
                    self._save(folder / item.filename(), image, item, concept, concept_path, unit)
                    images[item.item_id] = image
                per_image = (time.perf_counter() - t0) / len(missing)
                seconds = {item.item_id: per_image for item in missing}
                self.run.generated += len(missing)

            t0 = time.perf_counter()
            texts = self.scorers.text.score([images[i.item_id] for i in batch], [i.prompt for i in batch],
                                            placeholders=(unit.train["placeholder"],),
                                            supercategory=unit.train["supercategory"])
            matches = [self.scorers.identity.score(images[i.item_id], reference) for i in batch]
            score_s = (time.perf_counter() - t0) / len(batch)
            for item, text, match in zip(batch, texts, matches):
                self.record(
                    "image", unit, item=item.item_id, prompt=item.prompt, seed=item.seed,
                    path=str((folder / item.filename()).relative_to(self.output)), text=text.text,
                    t_sim=text.t_sim, t_sim_100=text.t_sim_100, clip_s=text.clip_s, i_pre=match.i_pre,
                    face_found=match.face_found, num_faces=match.num_faces,
                    generate_s=seconds.get(item.item_id), score_s=score_s,
                )
            self.run.scored += len(batch)

    def _generate(self, pipe, items: list[Item], unit: Unit) -> list:
        """One batch through the pipeline; image i uses torch.Generator(seed_i), as `personamagic generate`.
        With a plug-in its image input is the unit's photos, and a PhotoMaker prompt gets its trigger
        after the placeholder (scored without it)."""
        import torch

        from ..faces import load_photo

        settings = self.config.generate_config("-")
        prompts, kwargs = [sampling_prompt(unit, item.prompt) for item in items], {}
        if unit.plugin:
            photos = [load_photo(p) for p in unit.photos]
            kwargs["photomaker_images" if "photomaker" in unit.plugin else "ip_adapter_image"] = photos
        return pipe(
            prompts,
            negative_prompt=settings.negative_prompt or None,  # none given: the family's default
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=[torch.Generator(self.sampler.device).manual_seed(item.seed) for item in items],
            **kwargs,
        ).images

    def _save(self, path: Path, image, item: Item, concept, concept_path: Path, unit: Unit) -> None:
        """The PNG with the metadata `personamagic generate` writes (so it can be regenerated, plug-in
        included), atomically."""
        from ..files import write_atomic
        from ..jobs.image_record import image_metadata, png_info

        prompt = sampling_prompt(unit, item.prompt)
        config = self.config.generate_config(prompt, item.seed)
        photos = [str(p) for p in unit.photos]
        if unit.plugin and "photomaker" in unit.plugin:
            config = replace(config, photomaker=unit.plugin["photomaker"], photomaker_images=photos)
        elif unit.plugin:
            config = replace(config, ip_adapter=unit.plugin["ip_adapter"], ip_adapter_images=photos,
                             ip_adapter_scale=unit.plugin.get("scale", 1.0))
        record = image_metadata(prompt, item.seed, config, [concept], self.config.model, image.size,
                                concept_paths=[str(concept_path)], extra={"study_item": item.item_id})
        write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(record)))


def sampling_prompt(unit: Unit, prompt: str) -> str:
    """The prompt a unit's images are sampled with: a PhotoMaker unit's placeholder is followed by the
    trigger word, an "attributes" unit's by the words of its person's attributes (its items keep the
    plain prompt, which T-Sim scores)."""
    if unit.subject == "attributes":
        return prompt.replace(unit.train["placeholder"], f"{unit.train['placeholder']} {_said_identity(unit)}", 1)
    if unit.plugin and "photomaker" in unit.plugin:
        from ..adapters.photomaker import TRIGGER_WORD

        placeholder = unit.train["placeholder"]
        return prompt.replace(placeholder, f"{placeholder} {TRIGGER_WORD}", 1)
    return prompt


def _said_identity(unit: Unit) -> str:
    """The words of the nameable attributes of the person a world unit's photo shows."""
    from ..world.attributes import identity_attributes
    from ..world.captions import identity_words
    from ..world.render import recorded_render

    record = recorded_render(unit.photos[0])
    if record is None:
        raise PhotoError(f"{unit.photos[0]} is not a world render: its person's attributes are unknown")
    return identity_words(identity_attributes(record["identity"]))
