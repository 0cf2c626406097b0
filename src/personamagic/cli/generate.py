"""`personamagic generate CONCEPT... --prompt ... --output FOLDER`, and `--from-image PNG`."""

from __future__ import annotations

from .argtypes import non_negative_float, non_negative_int, positive_int
from .common import add_device_flags


def add_parser(commands) -> None:
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
    gen.add_argument("--num-images", "-n", type=positive_int,
                     help="images per prompt (4); each is written as it is made, grid.png shows the first 64")
    gen.add_argument("--seed", type=non_negative_int, help="seed of the first image, below 2**63 (0)")
    gen.add_argument("--negative-prompt", help="negative prompt (none by default)")
    gen.add_argument("--steps", type=positive_int, help="denoising steps, at most the model's 1000 timesteps (50)")
    gen.add_argument("--guidance-scale", type=non_negative_float, help="classifier-free guidance, 0 to 100 (8.0)")
    gen.add_argument("--scheduler", help="ddim, dpm++, dpm++-karras, euler, euler-a, heun, dpm2, dpm2-a, lms, pndm, "
                                          "unipc, deis, ddpm, or a diffusers scheduler class name (ddim)")
    gen.add_argument("--batch-size", type=positive_int, help="images per UNet batch (4), up to 256")
    gen.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, run the UNet eagerly (no CUDA graph)")
    gen.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                     help="torch.compile the UNet (backend: inductor): faster for large batches after a one-off "
                          "compile per batch shape, which PyTorch caches on disk")
    gen.add_argument("--width", type=positive_int,
                     help="image width, a multiple of 8 up to 4096 (the model's resolution)")
    gen.add_argument("--height", type=positive_int, help="image height, a multiple of 8 up to 4096 (as --width)")
    gen.add_argument("--background", help="localized generation: background image the concept is painted into")
    gen.add_argument("--region", help="mask of the background's size: white (or opaque) = where to paint")
    gen.add_argument("--ip-adapter", help="IP-Adapter weights: owner/repo/subfolder/file on the hub "
                                          "(h94/IP-Adapter/models/ip-adapter_sd15.safetensors) or a local file")
    gen.add_argument("--ip-adapter-image", action="append", default=[], help="image for the IP-Adapter (repeatable)")
    gen.add_argument("--ip-adapter-scale", type=non_negative_float, help="IP-Adapter weight (1.0)")
    gen.add_argument("--photomaker", nargs="?", const="TencentARC/PhotoMaker", default=None, metavar="WEIGHTS",
                     help="PhotoMaker v1 plugged in (SDXL): its weights' hub id (TencentARC/PhotoMaker, the default) "
                          "or a local photomaker-v1.bin; prompts say 'S* img' where the ID is fused")
    gen.add_argument("--photomaker-image", action="append", default=[], help="photo of the person for PhotoMaker "
                                                                             "(repeatable: stacked ID embeddings)")
    gen.add_argument("--photomaker-merge-step", type=non_negative_int,
                     help="steps up to this one use the text-only prompt, as PhotoMaker's start_merge_step "
                          "(20%% of --steps)")
    gen.add_argument("--photomaker-lora-scale", type=non_negative_float, help="strength of PhotoMaker's LoRA (1.0)")
    gen.add_argument("--vae", help="another VAE: hub id or folder of an AutoencoderKL (e.g. madebyollin/sdxl-vae-fp16-fix)")
    gen.add_argument("--model-config", metavar="FOLDER",
                     help="for a single-file --model: a diffusers folder of the same family whose configs to use")
    gen.add_argument("--from-image", help="make a generated PNG again from its metadata (concepts optional)")
    add_device_flags(gen)


# `generate` flags that --from-image takes from the image, by GenerateConfig field.
_SAMPLING_FLAGS = {
    "num_images": "num_images", "seed": "seed", "negative_prompt": "negative_prompt", "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale", "scheduler": "scheduler", "batch_size": "batch_size", "width": "width",
    "height": "height", "background": "background", "region": "region", "ip_adapter": "ip_adapter",
    "ip_adapter_scale": "ip_adapter_scale", "photomaker": "photomaker", "photomaker_merge_step": "photomaker_merge_step",
    "photomaker_lora_scale": "photomaker_lora_scale", "vae": "vae",
}


def run(args) -> int:
    from ..jobs.generate import GenerateStopped

    try:
        result = _run(args)
    except GenerateStopped as stopped:
        for path in stopped.kept:  # what a stopped run wrote stays; list it as a finished run would
            print(path)
        raise
    for note in result.notes:
        print(f"note: {note}")
    for image in result.images:
        print(image.path)
    if result.grid is not None:
        print(result.grid)
    return 0


def flag_message(message: str) -> str:
    """A GenerateConfig error in the words of the command line: `guidance_scale ...` -> `--guidance-scale ...`."""
    for flag, name in {**_SAMPLING_FLAGS, "prompt": "prompts"}.items():
        if message.startswith(name + " "):
            return f"--{flag.replace('_', '-')}{message[len(name):]}"
    return message


def _run(args):
    from ..errors import SettingsError
    from ..jobs.generate import generate, read_prompts_file, regenerate
    from ..jobs.generate_config import GenerateConfig
    from .common import check_adapter_flags, quiet_libraries

    quiet_libraries(args.verbose)
    if args.from_image is not None:
        given = [f"--{flag.replace('_', '-')}" for flag in _SAMPLING_FLAGS if getattr(args, flag) is not None]
        given += [f"--{flag.replace('_', '-')}" for flag in ("prompt", "prompts_file", "placeholder", "ip_adapter_image",
                                                             "photomaker_image") if getattr(args, flag)]
        if given:
            raise SettingsError(f"--from-image takes prompt, seed and settings from the image; drop {', '.join(given)}")
        result = regenerate(
            args.from_image,
            args.output,
            concept_paths=args.concepts or None,
            model=args.model,
            device=args.device,
            dtype=None if args.dtype == "auto" else args.dtype,
            local_files_only=args.local_files_only,
            model_config=args.model_config,
        )
    else:
        check_adapter_flags(args)
        prompts = list(args.prompt)
        if args.prompts_file is not None:
            prompts += read_prompts_file(args.prompts_file)
        if not args.concepts:
            raise SettingsError("give at least one concept folder (or --from-image IMAGE)")
        settings = {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
        try:
            config = GenerateConfig(
                prompts=prompts,
                placeholders=args.placeholder,
                ip_adapter_images=args.ip_adapter_image,
                photomaker_images=args.photomaker_image,
                model_config=args.model_config,
                cuda_graph=not args.no_cuda_graph,
                compile=args.compile is not None,
                compile_backend=args.compile or "inductor",
                **settings,
            )
        except SettingsError as err:
            hint = " (use --prompt \"a photo of S* ...\" or --prompts-file)" if not prompts else ""
            raise SettingsError(f"{flag_message(str(err))}{hint}") from None
        result = generate(
            args.concepts,
            args.output,
            config,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            local_files_only=args.local_files_only,
        )
    return result
