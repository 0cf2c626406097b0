"""Command-line interface: a thin layer over the Python API.

Heavy libraries (torch, diffusers, transformers) are imported inside the commands, so `--help` is
instant. User mistakes end as one `error: ...` line and exit code 2; `--verbose` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int, unit_float
from .evaluation import cli as evaluation_cli
from .ui import cli as ui_cli

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line: `error: ...` (exit 2)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def _window(text: str):
    """`LO:HI` -> (LO, HI) with 0 <= LO < HI <= 1000, or `auto`."""
    if text == "auto":
        return None
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LO:HI (e.g. 400:800) or auto, got {text!r}") from None
    if not 0 <= lo < hi <= 1000:
        raise argparse.ArgumentTypeError(f"needs 0 <= LO < HI <= 1000, got {text}")
    return (lo, hi)


def _add_device_flags(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="weights' precision; auto = bf16/fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="personamagic", description="Personalize Stable Diffusion 1.x to a face from one photo.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show debug logs and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="learn a concept from photo(s)")
    train.add_argument("photos", nargs="+", help="photo(s) of the person (any format PIL reads)")
    train.add_argument("--output", "-o", required=True, help="concept folder to write")
    train.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                       help="base model: hub id, diffusers folder, .safetensors/.ckpt file, or tiny (offline toy)")
    train.add_argument("--supercategory", default="face", help="one-token word for the concept's class (face)")
    train.add_argument("--placeholder", default="S*", help="text that stands for the concept in prompts (S*)")
    train.add_argument("--num-vectors", type=positive_int, default=1, help="token positions per placeholder (1)")
    train.add_argument("--mask", default="auto",
                       help="auto, clipseg, landmarks, none, or a mask image FILE the size of the photo")
    train.add_argument("--image-encoder", default="auto", help="CLIP vision model id/path (openai/clip-vit-base-patch32)")
    train.add_argument("--identity-model", default="auto", help="ArcFace model: .pth/.safetensors/.onnx path or hub id")
    train.add_argument("--no-id-loss", action="store_true", help="train without the identity loss")
    train.add_argument("--steps", type=positive_int, default=1000, help="training steps (1000)")
    train.add_argument("--batch-size", type=positive_int, default=2, help="samples per step (2)")
    train.add_argument("--learning-rate", type=positive_float, default=5e-5, help="AdamW learning rate (5e-5)")
    train.add_argument("--seed", type=non_negative_int, default=0, help="random seed (0)")
    train.add_argument("--stage-window", type=_window, default=None,
                       help="dynamic stage: auto (found from S*'s attention, default) or LO:HI, e.g. 400:800 "
                            "as in the authors' code")
    train.add_argument("--lambda1", type=unit_float, default=0.7, help="relative-IoU threshold ending static 1 (0.7)")
    train.add_argument("--lambda2", type=unit_float, default=0.8, help="relative-IoU threshold starting static 2 (0.8)")
    train.add_argument("--partition-warmup-steps", type=non_negative_int, default=None,
                       help="full-schedule steps before the automatic partition (100, or --steps if fewer)")
    train.add_argument("--te-weight", type=non_negative_float, default=1e-3, help="tandem-equilibrium weight (1e-3)")
    train.add_argument("--id-weight", type=non_negative_float, default=1.0, help="identity-loss weight (1.0)")
    train.add_argument("--checkpoint-every", type=non_negative_int, default=100,
                       help="write a resumable checkpoint every N steps (100; 0 = never)")
    train.add_argument("--train-prompt", default="a photo of {}",
                       help='training prompt, {} = the placeholder ("a photo of {}"; e.g. "a painting in the style of {}")')
    train.add_argument("--no-optimize", action="store_true",
                       help="turn every speed-up off and run the plain reference step (slower, for comparison)")
    train.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the networks of the training step (backend: inductor; the first step "
                            "compiles; an experiment, see docs/performance.md)")
    train.add_argument("--low-memory", action="store_true",
                       help="for 8 GB cards: gradient checkpointing and the batch as micro-batches of 1")
    train.add_argument("--ip-adapter", help="train with an IP-Adapter plugged in (paper, Table 3): owner/repo/"
                                            "subfolder/file on the hub or a local file; generate with it too")
    train.add_argument("--ip-adapter-scale", type=non_negative_float, default=1.0, help="IP-Adapter weight (1.0)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--overwrite", action="store_true", help="replace a concept already in --output")
    _add_device_flags(train)

    gen = commands.add_parser("generate", help="make images with concept(s)")
    gen.add_argument("concepts", nargs="*", help="concept folder(s) or concept.safetensors file(s)")
    gen.add_argument("--prompt", "-p", action="append", default=[], help="prompt with S* (repeatable)")
    gen.add_argument("--prompts-file", help="text file with one prompt per line (blank lines and # comments skipped)")
    gen.add_argument("--output", "-o", required=True, help="folder for the images")
    gen.add_argument("--model", default=None, help="base model (default: the one the concept was trained on)")
    gen.add_argument("--placeholder", action="append", default=[],
                     help="text standing for the i-th concept in prompts, once per concept (default: as trained), "
                          "e.g. --placeholder '<me>' --placeholder '<style>'")
    # Sampling flags default to None so that --from-image can tell which were given; defaults in help.
    gen.add_argument("--num-images", "-n", type=positive_int, help="images per prompt (4)")
    gen.add_argument("--seed", type=non_negative_int, help="seed of the first image (0)")
    gen.add_argument("--negative-prompt", help="negative prompt (none by default)")
    gen.add_argument("--steps", type=positive_int, help="denoising steps (50)")
    gen.add_argument("--guidance-scale", type=non_negative_float, help="classifier-free guidance (8.0)")
    gen.add_argument("--scheduler", help="ddim, dpm++, dpm++-karras, euler, euler-a, heun, dpm2, dpm2-a, lms, pndm, "
                                          "unipc, deis, ddpm, or a diffusers scheduler class name (ddim)")
    gen.add_argument("--batch-size", type=positive_int, help="images per UNet batch (4)")
    gen.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, run the UNet eagerly (no CUDA graph)")
    gen.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                     help="torch.compile the UNet (backend: inductor): faster for large batches after a one-off "
                          "compile per batch shape, which PyTorch caches on disk")
    gen.add_argument("--width", type=positive_int, help="image width, a multiple of 8 (the model's resolution)")
    gen.add_argument("--height", type=positive_int, help="image height, a multiple of 8 (as --width)")
    gen.add_argument("--background", help="localized generation: background image the concept is painted into")
    gen.add_argument("--region", help="mask of the background's size: white (or opaque) = where to paint")
    gen.add_argument("--ip-adapter", help="IP-Adapter weights: owner/repo/subfolder/file on the hub "
                                          "(h94/IP-Adapter/models/ip-adapter_sd15.safetensors) or a local file")
    gen.add_argument("--ip-adapter-image", action="append", default=[], help="image for the IP-Adapter (repeatable)")
    gen.add_argument("--ip-adapter-scale", type=non_negative_float, help="IP-Adapter weight (1.0)")
    gen.add_argument("--from-image", help="make a generated PNG again from its metadata (concepts optional)")
    _add_device_flags(gen)

    export = commands.add_parser("export", help="write a concept in another tool's format")
    export.add_argument("concept", help="concept folder or concept.safetensors file")
    export.add_argument("--format", default="textual-inversion", choices=["textual-inversion"],
                        help="textual-inversion: {token: [n, D]} safetensors for diffusers load_textual_inversion, "
                             "A1111 and ComfyUI embeddings/ (default)")
    export.add_argument("--output", "-o", help="file to write (default: ./<concept folder name>.safetensors)")
    export.add_argument("--token", help="token the embedding is stored under (default: the placeholder if it "
                                        "looks like <name>, else <file name>)")
    export.add_argument("--vectors", default="mean", choices=["mean", "centre"],
                        help="mean: mapper averaged over the dynamic stage (default); centre: at its middle timestep")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    inspect = commands.add_parser("inspect", help="show a concept's stages, training settings and file facts")
    inspect.add_argument("concept", help="concept folder or concept.safetensors file")

    evaluation_cli.add_parser(commands)
    ui_cli.add_parser(commands)

    bench = commands.add_parser("bench", help="measure personalize and generate speed on this machine")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--steps", type=positive_int, default=None, help="training steps (1000 on GPU, 20 on CPU)")
    bench.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="partition warm-up steps (100 on GPU, 10 on CPU)")
    bench.add_argument("--photo", default=None, help="face photo (default: the repository's test photo)")
    bench.add_argument("--output", "-o", default=None, help="JSON file (default: benchmarks/results/<device>-<date>.json)")
    bench.add_argument("--sections", default="steps,personalize,generation,variants,equivalence",
                       help="comma-separated parts to measure (the plain step is always measured)")
    return parser


class _LowercaseLevelFormatter(logging.Formatter):
    """`warning: ...` like the `error: ...` lines."""

    def format(self, record):
        record.levelname = record.levelname.lower()
        return super().format(record)


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowercaseLevelFormatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("personamagic").setLevel(logging.DEBUG if verbose else logging.INFO)


def _quiet_libraries(verbose: bool) -> None:
    """diffusers/transformers reset their loggers on import: set their verbosity after importing."""
    if verbose:
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def _cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from .ip_adapter import IPAdapterSpec
    from .personalize import personalize
    from .training import TrainConfig

    _quiet_libraries(args.verbose)
    ip_adapter = None if args.ip_adapter is None else IPAdapterSpec.parse(args.ip_adapter, scale=args.ip_adapter_scale)
    try:
        config = TrainConfig(
            placeholder=args.placeholder,
            supercategory=args.supercategory,
            num_vectors=args.num_vectors,
            max_train_steps=args.steps,
            train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            stage_window=args.stage_window,
            lambda1=args.lambda1,
            lambda2=args.lambda2,
            partition_warmup_steps=args.partition_warmup_steps,
            te_weight=args.te_weight,
            id_weight=args.id_weight,
            use_id_loss=not args.no_id_loss,
            checkpoint_every=args.checkpoint_every,
            train_prompt=args.train_prompt,
            optimize=not args.no_optimize,
            compile=args.compile is not None,
            compile_backend=args.compile or "inductor",
            gradient_checkpointing=args.low_memory,
            gradient_accumulation_steps=args.batch_size if args.low_memory else 1,
        )
    except ValueError as err:
        from .errors import UserError

        raise UserError(str(err)) from None
    bar, bar_phase = None, None

    def progress(step, total, logs, phase):
        nonlocal bar, bar_phase
        if bar is None or phase != bar_phase:
            if bar is not None:
                bar.close()
            desc = "warm-up (full schedule)" if phase == "warm-up" else "training"
            bar = tqdm(total=total, initial=step - 1, desc=desc, unit="step", file=sys.stderr)
            bar_phase = phase
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        bar.update(1)

    try:
        result = personalize(
            args.photos,
            args.output,
            config,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            mask=args.mask,
            image_encoder=args.image_encoder,
            identity_model=args.identity_model,
            overwrite=args.overwrite,
            resume=args.resume,
            local_files_only=args.local_files_only,
            progress=progress,
            ip_adapter=ip_adapter,
        )
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        print(f"note: {note}")
    c = result.concept
    print(f"concept {c.placeholder!r} ({c.supercategory}) written to {result.concept_path}")
    print(f"dynamic stage: {c.stage_window[0]} <= t < {c.stage_window[1]}; training took {result.timings['train_s']:.1f} s")
    return 0


# `generate` flags that --from-image takes from the image, by GenerateConfig field.
_SAMPLING_FLAGS = {
    "num_images": "num_images", "seed": "seed", "negative_prompt": "negative_prompt", "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale", "scheduler": "scheduler", "batch_size": "batch_size", "width": "width",
    "height": "height", "background": "background", "region": "region", "ip_adapter": "ip_adapter",
    "ip_adapter_scale": "ip_adapter_scale",
}


def _cmd_generate(args) -> int:
    from .errors import UserError
    from .generate import GenerateConfig, generate, read_prompts_file, regenerate

    _quiet_libraries(args.verbose)
    if args.from_image is not None:
        given = [f"--{flag.replace('_', '-')}" for flag in _SAMPLING_FLAGS if getattr(args, flag) is not None]
        given += [f"--{flag.replace('_', '-')}" for flag in ("prompt", "prompts_file", "placeholder", "ip_adapter_image")
                  if getattr(args, flag)]
        if given:
            raise UserError(f"--from-image takes prompt, seed and settings from the image; drop {', '.join(given)}")
        result = regenerate(
            args.from_image,
            args.output,
            concept_paths=args.concepts or None,
            model=args.model,
            device=args.device,
            dtype=None if args.dtype == "auto" else args.dtype,
            local_files_only=args.local_files_only,
        )
    else:
        prompts = list(args.prompt)
        if args.prompts_file is not None:
            prompts += read_prompts_file(args.prompts_file)
        if not args.concepts:
            raise UserError("give at least one concept folder (or --from-image IMAGE)")
        settings = {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
        try:
            config = GenerateConfig(
                prompts=prompts,
                placeholders=args.placeholder,
                ip_adapter_images=args.ip_adapter_image,
                cuda_graph=not args.no_cuda_graph,
                compile=args.compile is not None,
                compile_backend=args.compile or "inductor",
                **settings,
            )
        except ValueError as err:
            hint = " (use --prompt \"a photo of S* ...\" or --prompts-file)" if not prompts else ""
            raise UserError(f"{err}{hint}") from None
        result = generate(
            args.concepts,
            args.output,
            config,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            local_files_only=args.local_files_only,
        )
    for note in result.notes:
        print(f"note: {note}")
    for image in result.images:
        print(image.path)
    if result.grid is not None:
        print(result.grid)
    return 0


def _cmd_export(args) -> int:
    from .export import export_textual_inversion

    result = export_textual_inversion(
        args.concept, args.output, token=args.token, vectors=args.vectors, overwrite=args.overwrite
    )
    print(f"wrote {result.path}: token {result.token!r}, {result.num_vectors} vector(s) of width {result.width} "
          f"({result.description})")
    print("lost in the export: the stages (one static embedding for every timestep) and the value residual")
    return 0


def _cmd_bench(args) -> int:
    from pathlib import Path

    from .bench import PHOTO, SECTIONS, format_table, run_benchmark
    from .errors import UserError

    _quiet_libraries(args.verbose)
    sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise UserError(f"unknown --sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    result = run_benchmark(args.device, args.steps, args.warmup_steps, Path(args.photo) if args.photo else PHOTO,
                           output=Path(args.output) if args.output else None, sections=sections)
    print(format_table(result))
    print(f"results written to {result['output']}")
    return 0


def _cmd_inspect(args) -> int:
    from .concept import Concept, resolve_concept_path

    path = resolve_concept_path(args.concept)
    for line in describe_concept(Concept.load(path), path):
        print(line)
    return 0


def describe_concept(concept, path) -> list[str]:
    """A few lines about a concept: file, token, stages, training."""
    from .concept import FORMAT_VERSION

    size = path.stat().st_size
    c, training, stages = concept, concept.training, concept.stages
    t_lo, t_hi = c.stage_window
    lines = [
        f"{path}  {size / 1e6:.2f} MB, format {FORMAT_VERSION}, written by personamagic {c.version}, fingerprint {c.fingerprint()}",
        f"placeholder {c.placeholder!r} ({c.mapper_config['num_vectors']} vector(s)), supercategory "
        f"{c.supercategory!r}, base model {c.base_model} (text width {c.text_encoder_hidden_size})",
        f"stages: static 1 t >= {t_hi} | dynamic {t_lo} <= t < {t_hi} | static 2 t < {t_lo}  (T = {c.num_train_timesteps})",
    ]
    if stages.get("method") == "auto":
        best = max(range(len(stages["iou"])), key=lambda i: stages["iou"][i])
        flags = [name for name in ("flat", "widened") if stages.get(name)]
        lines.append(
            f"partition: automatic, lambda1={stages['lambda1']} lambda2={stages['lambda2']}, warm-up "
            f"{stages['warmup_steps']} steps ({'restarted' if stages['restarted'] else 'continued'}), "
            f"IoU max {stages['iou'][best]:.3f} at t={stages['timesteps'][best]}"
            + (f", {' and '.join(flags)}" if flags else "")
        )
    else:
        lines.append("partition: fixed window given at training")
    if training:
        id_loss = f"on (weight {training['id_weight']})" if training.get("use_id_loss") else "off"
        lines.append(
            f"training: {training.get('steps_done')} steps, batch {training['train_batch_size']}, lr "
            f"{training['learning_rate']}, seed {training['seed']}, TE weight {training['te_weight']}, identity loss {id_loss}"
        )
    extra = c.extra
    if extra:
        lines.append(
            f"photos: {', '.join(extra.get('photos', []))}; mask {extra.get('mask')}; image encoder "
            f"{c.image_encoder}; trained on {extra.get('device')} in {extra.get('dtype')}"
        )
    return lines


COMMANDS = {"train": _cmd_train, "generate": _cmd_generate, "inspect": _cmd_inspect, "export": _cmd_export,
            "bench": _cmd_bench, "evaluate": evaluation_cli.run, "ui": ui_cli.run}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag already reported in one line
        return int(exit_.code or 0)
    _configure_logging(args.verbose)
    if args.command in ("train", "generate", "bench", "evaluate", "ui"):
        import torch

        # Shapes stay fixed through training and sampling, so cuDNN's per-shape autotune pays off.
        torch.backends.cudnn.benchmark = True
    return run_handler(COMMANDS[args.command], args)


def run_handler(handler, args) -> int:
    """Run a command: a user mistake ends as one `error: ...` line and exit code 2 (a traceback only
    with --verbose); Ctrl-C as `error: interrupted` and exit code 130."""
    from .errors import UserError

    try:
        return handler(args)
    except UserError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
