"""The benchmark (docs/performance.md): personalize and generate, the plain step beside the optimised one.

On a GPU it runs Stable Diffusion 1.x at its real sizes with random weights (timing does not depend on
the weights' values) in bf16; on a CPU it runs the tiny model in fp32 (each the model its family names
for the purpose). The SDXL section does the same with SDXL-base sizes (tiny-sdxl on a CPU). The photo
is `--photo`, or a face of the learning world drawn at the start (`draw_photo`), and is prepared by the
personalize job's own steps (`jobs.personalize.PersonalizeRun`). The plain step is one identity's
training step with every speed-up off (`optimize=False`); the optimised step and its variants are
measured in the same run and printed as a ratio to it. The throughput section times the optimised step
of K identities together (`training.group`; K = 1 is the optimised step again, since a concept trained
alone is a group of one) and gives identities per hour, as a ratio to K = 1. Every step figure is the
median of steps that read their losses back, after a first step timed apart (`first_step_s`) and three
more untimed. The sections run one after another: on a shared CPU they see different loads, so compare
figures of one section or of repeated runs. The whole personalize job runs in a fresh process, as
`personamagic train` would. Results: a JSON file (device, versions, date, every figure), by default in
the working directory, and the command's table (`cli.bench.format_table`).

    personamagic bench                      # this machine, defaults per device
    python benchmarks/bench.py --steps 1000 # the same script
"""

from __future__ import annotations

import json
import logging
import platform
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import __version__
from ..families import SD1, SDXL
from ..identity.loading import RANDOM_IRESNET100
from ..models import RANDOM_IMAGE_ENCODER, TINY, TINY_MODELS, load_base_model, resolve_device
from ..models.latents import LatentScale
from .bench_sections import SECTIONS

logger = logging.getLogger(__name__)

MASK = "landmarks"  # the job's face mask on a toy model, and one that needs no download on any model
PHOTO_SIDE = 1024  # the drawn photo's side: no model here trains at a larger crop, so none upscales it


def draw_photo(path: Path) -> Path:
    """The default photo, written to `path`: person 0 of the learning world (`world.render`), far away
    so that the job's crop around the face stays inside the picture, enlarged to PHOTO_SIDE²."""
    from PIL import Image

    from ..world.render import render

    image = render(0, {"position": "far"}).image
    image.resize((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS).save(path)
    return path


def photo_model_names(model: str) -> dict[str, str]:
    """The image encoder and identity network the benchmark runs beside `model` (`personalize`'s
    keywords): the tiny stand-ins beside a toy, real sizes with random weights beside a real-size model."""
    toy = model in TINY_MODELS
    return {"image_encoder": TINY if toy else RANDOM_IMAGE_ENCODER,
            "identity_model": "tiny" if toy else RANDOM_IRESNET100}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _median_ms(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class Setup:
    """The base model and one photo's training data, prepared as the personalize job prepares them
    (`PersonalizeRun.prepare`: face crop, mask, CLIP image embedding, VAE posterior, identity reference),
    shared by the step timings. `folder`: where the job would write its concept (nothing is written)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, model: str, photo: Path, config, folder: Path):
        from ..jobs.personalize import PersonalizeRun

        self.device, self.dtype, self.model = device, dtype, model
        self.base = load_base_model(model, device=device, dtype=dtype)
        run = PersonalizeRun([photo], folder / "concept", config, model, MASK, **photo_model_names(model))
        self.data, _, _, _ = run.prepare(self.base, device, dtype, local_files_only=True, ip_adapter=None)
        self.encoder = run.identity_encoder

    def trainer(self, config):
        from ..training.trainer import Trainer

        return Trainer(self.base, self.data, config, self.encoder)


def _step_figures(group, device, repeats: int, warmup: int) -> dict:
    """How `group.step()` (a `training.group.GroupTrainer`: a trainer's own group of one, or K identities)
    runs: the median ms of `repeats` steps, each with its losses read back, after a first step timed apart
    as `first_step_s` (CUDA graph capture, cuDNN autotune...) and `warmup` more untimed; the peak GiB."""
    start = time.perf_counter()
    group.step()
    _sync(device)
    first_s = time.perf_counter() - start
    ms = _median_ms(group.step, device, repeats=repeats, warmup=warmup)
    return {"ms": ms, "first_step_s": first_s, "peak_gib": _peak_gib(device), "cuda_graph": group.use_graph}


def time_steps(setup: Setup, config, steps: int, warmup: int) -> dict:
    """One identity's training step under `config` (`_step_figures`)."""
    _reset_peak(setup.device)
    with setup.trainer(config) as trainer:
        return _step_figures(trainer.group, setup.device, steps, warmup)


IDENTITIES_PER_STEP = (1, 2, 4, 8)  # the K of the throughput section


def time_throughput(setup: Setup, config, ks, steps_per_concept: int, repeats: int, warmup: int) -> dict:
    """One step of K identities together under `config` (`training.group`, each with its own mapper and
    optimizer; measured as `time_steps` measures one, `_step_figures`) for each K, and what it gives:
    identities/hour = 3600 / (steps_per_concept * step_s / K), the training loop alone (no warm-up, photo
    preparation or model load). K = 1 is the step `time_steps` times (a concept trained alone is a group of
    one), measured again. Each figure is also a ratio to K = 1 in the same run (always measured); a K that
    runs out of GPU memory ends the series."""
    from ..training.group import GroupTrainer

    per_k = {}
    for k in sorted(set(ks) | {1}):
        _reset_peak(setup.device)
        trainers = [setup.trainer(replace(config, seed=config.seed + i)) for i in range(k)]
        try:
            with GroupTrainer(trainers) as group:
                figures = _step_figures(group, setup.device, repeats, warmup)
        except torch.cuda.OutOfMemoryError:
            per_k[str(k)] = {"error": "out of memory"}
            break
        finally:
            del trainers
        per_k[str(k)] = {**figures, "identities_per_hour": 3600 * k / (steps_per_concept * figures["ms"] / 1000)}
    measured = {k: v for k, v in per_k.items() if "ms" in v}
    for figures in measured.values():
        figures["ratio_to_k1"] = figures["identities_per_hour"] / measured["1"]["identities_per_hour"]
    best = max(measured, key=lambda k: measured[k]["identities_per_hour"])
    return {"steps_per_concept": steps_per_concept, "per_k": per_k, "best_k": int(best),
            "best_identities_per_hour": measured[best]["identities_per_hour"]}


def check_equivalence(setup: Setup, config) -> dict:
    """Loss terms and mapper gradients of the optimised vs the plain step on one identical batch."""
    results = {}
    for name, cfg in (("plain", replace(config, optimize=False)), ("optimized", config)):
        with setup.trainer(cfg) as trainer:
            batch = trainer.sample_batch()
            if trainer.group.use_graph:
                from ..training.graph import GraphedStep

                graphed = GraphedStep(trainer.losses, trainer.sample_batch(generator=torch.Generator(setup.device).manual_seed(0)),
                                      trainer.mapper.parameters())
                out = graphed.step(batch)
            else:
                out = trainer.losses(batch)
                out.total.backward()
            results[name] = (
                {k: float(v.detach()) for k, v in out.terms.items()},
                torch.cat([p.grad.flatten().float() for p in trainer.mapper.parameters()]),
            )
    (plain_terms, plain_grad), (fast_terms, fast_grad) = results["plain"], results["optimized"]
    return {
        "plain_terms": plain_terms,
        "optimized_terms": fast_terms,
        "grad_rel_diff": float((fast_grad - plain_grad).norm() / plain_grad.norm().clamp_min(1e-12)),
    }


def time_personalize(model: str, device: torch.device, dtype_name: str, steps: int, warmup_steps: int,
                     photo: Path) -> dict:
    """The whole job through the public API (load, detect, mask, embed, partition, train, save), in a
    fresh process as `personamagic train` runs it: nothing this benchmark already loaded, autotuned or
    captured is reused. `process_s` adds the interpreter start and the imports."""
    import multiprocessing

    from ..concept import Concept

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            job = pool.apply(_personalize_job, (model, str(device), dtype_name, steps, warmup_steps, str(photo),
                                                str(Path(folder) / "concept")))
        job["process_s"] = time.perf_counter() - start
        job["concept"] = Concept.load(Path(folder) / "concept")
    return job


def _personalize_job(model: str, device: str, dtype_name: str, steps: int, warmup_steps: int, photo: str,
                     output: str) -> dict:
    """`time_personalize`'s child process."""
    from ..jobs.personalize import personalize
    from ..training.config import TrainConfig

    torch.backends.cudnn.benchmark = True  # as the CLI sets it
    config = TrainConfig(max_train_steps=steps, partition_warmup_steps=warmup_steps, checkpoint_every=0)
    start = time.perf_counter()
    result = personalize(
        [photo], output, config, model=model, device=device, dtype=dtype_name, mask=MASK,
        **photo_model_names(model),
    )
    total = time.perf_counter() - start
    device_ = torch.device(device)
    return {
        "personalize_s": total,
        "timings": result.timings,
        "window": list(result.concept.stage_window),
        "peak_gib": _peak_gib(device_),
    }


def time_generation(setup: Setup, concept, batch_sizes, steps: int, guidance: float, cuda_graph: bool = False,
                    compile: bool = False) -> dict:
    """Seconds for one image and images/s per batch size (DDIM, CFG, VAE decode included); the first
    call of each batch size (graph capture, compilation) is timed apart as `first_call_s`."""
    from ..pipeline.pipeline import PersonaMagicPipeline

    pipe = PersonaMagicPipeline.from_base(setup.base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(concept)
    if compile:
        pipe.enable_compile()
    if cuda_graph:
        pipe.enable_cuda_graph()
    results = {}
    try:
        for batch in batch_sizes:
            prompts = ["a photo of S* as an astronaut"] * batch

            def run():
                generator = [torch.Generator(setup.device).manual_seed(i) for i in range(batch)]
                pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                     output_type="pt")

            _reset_peak(setup.device)
            first_s = _median_ms(run, setup.device, repeats=1, warmup=0) / 1000
            seconds = _median_ms(run, setup.device, repeats=1, warmup=0) / 1000
            results[batch] = {"seconds": seconds, "images_per_s": batch / seconds, "first_call_s": first_s,
                              "peak_gib": _peak_gib(setup.device)}
    finally:
        if compile:
            pipe.enable_compile(False)
            setup.base.unet.to(memory_format=torch.contiguous_format)
    return results


def time_conditioning(setup: Setup, concept, batch_sizes, steps: int) -> dict:
    """The text conditioning of a whole sampling run (50 DDIM steps, CFG): one text-encoder call per
    step whose conditioning changes (how sampling did it before) vs `encode_schedule` (all at once)."""
    from ..pipeline import PersonaMagicPipeline

    pipe = PersonaMagicPipeline.from_base(setup.base)
    pipe.load_concept(concept)
    pipe.scheduler.set_timesteps(steps, device=setup.device)
    timesteps = pipe.scheduler.timesteps
    results = {}
    for batch in batch_sizes:
        texts = [""] * batch + [pipe.rewrite_prompt("a photo of S* as an astronaut")] * batch
        ids = pipe.conditioner.tokenize(texts, setup.device)

        @torch.no_grad()
        def per_step():
            cached = None
            for t in timesteps:
                key = pipe.stage_key(int(t))
                if key != cached:
                    pipe.encode_at(ids, int(t))
                    cached = key

        @torch.no_grad()
        def schedule():
            pipe.encode_schedule(ids, timesteps)

        per_step_ms = _median_ms(per_step, setup.device, repeats=3, warmup=1)
        schedule_ms = _median_ms(schedule, setup.device, repeats=3, warmup=1)
        results[batch] = {"per_step_ms": per_step_ms, "schedule_ms": schedule_ms, "ratio": per_step_ms / schedule_ms}
    return results


def _part_ms(setup: Setup, fn) -> float:
    return _median_ms(fn, setup.device, repeats=10, warmup=2)


@torch.no_grad()
def time_sampling_parts(setup: Setup, concept, steps: int, cuda_graph: bool) -> dict:
    """Where one image's sampling time goes (batch 1, CFG): ms for the run's text conditioning, one
    UNet call (eager, and replayed from a CUDA graph), one scheduler step, and the VAE decode."""
    from ..method.attention import attention_processors
    from ..method.conditioning import UNetConditioning
    from ..pipeline import PersonaMagicPipeline
    from ..pipeline.graph import GraphedUNet

    pipe = PersonaMagicPipeline.from_base(setup.base)
    pipe.load_concept(concept)
    pipe.scheduler.set_timesteps(steps, device=setup.device)
    timesteps = pipe.scheduler.timesteps
    ids = pipe.tokenize(["", "a photo of S* as an astronaut"])
    hidden, values, _ = pipe.encode_schedule(ids, timesteps).at(0)
    conditioning = UNetConditioning(hidden, values)
    unet = setup.base.unet
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, device=setup.device, dtype=unet.dtype)
    t = timesteps[0]
    parts = {"text_conditioning_ms": _part_ms(setup, lambda: pipe.encode_schedule(ids, timesteps))}
    with attention_processors(unet):
        parts["unet_eager_ms"] = _part_ms(setup, lambda: unet(latents, t, **conditioning.unet_kwargs()))
        if cuda_graph:
            graphed = GraphedUNet(unet)
            parts["unet_graph_ms"] = _part_ms(setup, lambda: graphed(latents, t, conditioning))
    noise_pred = latents[:1].float()
    parts["scheduler_step_ms"] = _part_ms(setup, lambda: pipe.scheduler.step(noise_pred, t, noise_pred))
    decode_input = LatentScale.of(setup.base.vae).decode(latents[:1]).to(setup.base.vae.dtype)
    parts["vae_decode_ms"] = _part_ms(setup, lambda: setup.base.vae.decode(decode_input))
    unet_ms = parts.get("unet_graph_ms", parts["unet_eager_ms"])
    parts["sum_for_one_image_s"] = (parts["text_conditioning_ms"] + steps * (unet_ms + parts["scheduler_step_ms"])
                                    + parts["vae_decode_ms"]) / 1000
    return parts


def run_benchmark(device: str = "auto", steps: int | None = None, warmup_steps: int | None = None,
                  photo: Path | None = None, generation_batches=None, output: Path | None = None,
                  sections=SECTIONS, identities_per_step=IDENTITIES_PER_STEP) -> dict:
    """Measure the chosen `sections` (the plain step always) with the face `photo` (default: a face of
    the learning world, `draw_photo`); returns the result dict, also written as JSON to `output`
    (default ./bench-<device>-<date>.json) after every section."""
    if photo is not None and not Path(photo).is_file():
        from ..errors import PhotoError

        raise PhotoError(f"benchmark photo {photo} not found; give a face photo, or no --photo for a drawn face")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        photo = Path(photo) if photo is not None else draw_photo(folder / "photo.png")
        bench = _Bench(resolve_device(device), steps, warmup_steps, photo, generation_batches, output, sections,
                       folder)
        bench.plain_step()
        if "steps" in sections:
            bench.optimized_step()
        if "throughput" in sections:
            bench.throughput(identities_per_step)
        if "personalize" in sections:
            bench.personalize()
        bench.generation()
        bench.variants()
        if "equivalence" in sections:
            bench.attempt("equivalence", lambda: check_equivalence(bench.setup, replace(bench.config, id_face_patch=False)),
                          key="equivalence")
        if "sdxl" in sections:
            bench.sdxl()
        return bench.finish()


class _Bench:
    """One benchmark run: the setup, the result dict and its JSON file (written after every section,
    so a run cut short still leaves its figures), one method per section. `folder`: the run's scratch
    folder (`Setup`)."""

    def __init__(self, device, steps, warmup_steps, photo, generation_batches, output, sections, folder):
        from ..training.config import TrainConfig

        self.started = time.perf_counter()
        self.device, self.photo, self.sections, self.folder = device, photo, sections, folder
        self.gpu = gpu = device.type == "cuda"
        self.model = SD1.random_model if gpu else SD1.tiny_model
        self.dtype_name = "bf16" if gpu else "fp32"
        self.dtype = torch.bfloat16 if gpu else torch.float32
        self.steps = steps or (1000 if gpu else 20)
        self.warmup_steps = warmup_steps if warmup_steps is not None else (100 if gpu else 10)
        self.batches = generation_batches or ([1, 4, 8, 16] if gpu else [1, 2])
        if gpu:
            torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device) if gpu else \
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        self.result: dict = {
            "device": name, "model": self.model, "dtype": self.dtype_name, "date": time.strftime("%Y-%m-%d %H:%M"),
            "versions": _versions(), "steps": self.steps, "partition_warmup_steps": self.warmup_steps,
            "sections": list(sections), "errors": {}, "variants": {},
        }
        self.output = Path(output) if output is not None else default_output(name)
        self.result["output"] = str(self.output)
        self.config = TrainConfig(stage_window=(400, 800), max_train_steps=10**6, seed=0)
        self.setup = Setup(device, self.dtype, self.model, photo, self.config, folder)
        self.repeats = 20 if gpu else 5
        self.concept = None

    def save(self) -> None:
        self.result["wall_s"] = time.perf_counter() - self.started
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.result, indent=2, default=str))

    def attempt(self, name, fn, key=None):
        """fn() with its failure recorded instead of raised (a failing section must not cost the other
        figures); the value goes to result[key] when a key is given."""
        try:
            value = fn()
            if key is not None and value is not None:
                self.result[key] = value
            return value
        except Exception as err:  # noqa: BLE001 - any failure of one section
            self.result["errors"][name] = f"{type(err).__name__}: {err}"
            logger.exception("%s failed", name)
            return None
        finally:
            self.save()

    def plain_step(self) -> None:
        repeats = self.repeats if "steps" in self.sections else 5
        plain = time_steps(self.setup, replace(self.config, optimize=False), repeats, warmup=3)
        self.result["plain_step_ms"], self.result["plain_peak_gib"] = plain["ms"], plain["peak_gib"]

    def optimized_step(self) -> None:
        optimized = self.attempt("optimized", lambda: time_steps(self.setup, self.config, self.repeats, warmup=3))
        if optimized is not None:
            self.result["variants"]["optimized"] = optimized
            self.result["step_ms"] = optimized["ms"]
            self.result["graph_capture_s"] = optimized["first_step_s"]

    def throughput(self, identities_per_step) -> None:
        throughput = self.attempt("throughput", lambda: time_throughput(
            self.setup, self.config, identities_per_step, self.steps, self.repeats, warmup=3), key="throughput")
        if throughput is not None:
            self.result["identities_per_hour"] = throughput["best_identities_per_hour"]
            self.result["identities_per_step_best"] = throughput["best_k"]

    def personalize(self) -> None:
        job = self.attempt("personalize", lambda: time_personalize(
            self.model, self.device, self.dtype_name, self.steps, self.warmup_steps, self.photo))
        if job is not None:
            self.concept = job.pop("concept")
            self.result.update(personalize_s=job["personalize_s"], train_loop_s=job["timings"]["train_s"],
                               peak_gib=job["peak_gib"], personalize=job)

    def generation(self) -> None:
        """Sampling figures per mode (eager, CUDA graph, compiled) and the fastest of them."""
        modes = {}  # result key -> time_generation options
        if "generation" in self.sections:
            modes["generation"] = {}
            if self.gpu:
                modes["generation_cuda_graph"] = {"cuda_graph": True}
        if "compile" in self.sections:
            modes["generation_compile"] = {"cuda_graph": self.gpu, "compile": True}
        if not modes:
            return
        if self.concept is None:  # sampling time does not depend on what the mapper learned
            with self.setup.trainer(self.config) as trainer:
                self.concept = trainer.concept(self.model)
        setup, concept = self.setup, self.concept
        if "generation" in self.sections:
            conditioning = self.attempt("conditioning", lambda: time_conditioning(setup, concept, self.batches, 50))
            if conditioning is not None:
                self.result["conditioning"] = {str(k): v for k, v in conditioning.items()}
            self.attempt("sampling_parts", lambda: time_sampling_parts(setup, concept, 50, cuda_graph=self.gpu),
                         key="sampling_parts")
        for key, options in modes.items():
            # Compiling costs about a minute per batch shape: only the smallest and the largest batch.
            sizes = sorted({self.batches[0], self.batches[-1]}) if options.get("compile") else self.batches
            gen = self.attempt(key, lambda sizes=sizes, options=options:
                               time_generation(setup, concept, sizes, 50, 8.0, **options))
            if gen is not None:
                self.result[key] = {str(k): v for k, v in gen.items()}
        fastest = {}
        for key in modes:
            for batch, figures in self.result.get(key, {}).items():
                if batch not in fastest or figures["seconds"] < fastest[batch]["seconds"]:
                    fastest[batch] = {**figures, "mode": key}
        if fastest:
            self.result["gen_single_image_s"] = fastest["1"]["seconds"] if "1" in fastest else None
            best = max(fastest, key=lambda k: fastest[k]["images_per_s"])
            self.result["gen_images_per_s_best"] = fastest[best]["images_per_s"]
            self.result["gen_best_batch"] = f"{best} ({fastest[best]['mode']})"

    def variants(self) -> None:
        config = self.config
        variants = {}
        if "variants" in self.sections:
            variants = {
                "optimized_no_graph": replace(config, cuda_graph=False),
                "optimized_full_decode": replace(config, id_face_patch=False),
                # what each loss branch costs in the optimised step (not variants of the method)
                "optimized_without_id_loss": replace(config, use_id_loss=False),
                "optimized_without_te_loss": replace(config, te_weight=0.0),
                "low_memory": replace(config, gradient_checkpointing=True, gradient_accumulation_steps=2,
                                      cuda_graph=False),
            }
        if "compile" in self.sections:
            variants["optimized_compile"] = replace(config, compile=True)
        for name, cfg in variants.items():
            if name == "optimized_no_graph" and not self.gpu:
                continue
            timing = self.attempt(name, lambda cfg=cfg: time_steps(self.setup, cfg, self.repeats, warmup=3))
            if timing is not None:
                self.result["variants"][name] = timing

    def sdxl(self) -> None:
        """SDXL at its own resolution (1024² on a GPU with random SDXL-base weights; tiny-sdxl on a CPU):
        the optimised training step at batch 2 with its peak memory, and one image's sampling time."""
        def measure():
            model = SDXL.random_model if self.gpu else SDXL.tiny_model
            setup = Setup(self.device, self.dtype, model, self.photo, self.config, self.folder)
            step = time_steps(setup, self.config, self.repeats, warmup=3)
            with setup.trainer(self.config) as trainer:
                concept = trainer.concept(setup.model)
            image = time_generation(setup, concept, [1], 50, 8.0, cuda_graph=self.gpu)[1]
            return {"model": setup.model, "resolution": setup.base.resolution, "step_ms": step["ms"],
                    "step_peak_gib": step["peak_gib"], "cuda_graph": step["cuda_graph"],
                    "gen_single_image_s": image["seconds"], "gen_peak_gib": image["peak_gib"]}

        self.attempt("sdxl", measure, key="sdxl")

    def finish(self) -> dict:
        result = self.result
        result["ratios_to_plain_step"] = {
            name: result["plain_step_ms"] / v["ms"] for name, v in result["variants"].items()
        }
        if "train_loop_s" in result:
            result["ratios_to_plain_step"]["train_loop"] = result["plain_step_ms"] * self.steps / 1000 / result["train_loop_s"]
        self.save()
        return result


def _versions() -> dict:
    import diffusers
    import transformers

    versions = {"personamagic": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def default_output(device_name: str) -> Path:
    """Where results go without --output: `bench-<device>-<date>.json` in the working directory."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40]
    return Path(f"bench-{slug}-{time.strftime('%Y%m%d-%H%M')}.json")
