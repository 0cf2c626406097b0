"""`personamagic export CONCEPT --format textual-inversion|comfyui|a1111`: a concept in other tools' formats."""

from __future__ import annotations

from .argtypes import non_negative_int, positive_float, positive_int


# the flags each format reads, beyond the concept, --format, --output and --overwrite (every format's)
FORMAT_FLAGS = {
    "textual-inversion": ("--token", "--vectors"),
    "comfyui": ("--bins", "--prompt", "--name", "--checkpoint", "--steps", "--guidance-scale", "--seed", "--width",
                "--height", "--negative-prompt"),
    "a1111": ("--bins", "--prompt", "--name", "--steps"),
}


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a concept in another tool's format")
    export.add_argument("concept", help="concept folder or concept.safetensors file")
    export.add_argument("--format", default="textual-inversion", choices=list(FORMAT_FLAGS),
                        help="textual-inversion: one safetensors embedding for diffusers load_textual_inversion, A1111 "
                             "and ComfyUI embeddings/ ({token: [n, 768]} on SD 1.x, {clip_l, clip_g} on SDXL; the "
                             "default); comfyui / a1111: the stages kept, as embeddings that switch by timestep — a "
                             "folder with embeddings/ and a ComfyUI API workflow (workflow_api.json) or the A1111 "
                             "prompt (prompt.txt)")
    export.add_argument("--output", "-o", help="file to write (default: ./<concept folder name>.safetensors); "
                                               "with comfyui/a1111, a new folder")
    staged = export.add_argument_group("comfyui and a1111")
    staged.add_argument("--bins", type=positive_int, default=None,
                        help="embeddings the dynamic stage is cut into (4; see the README's table)")
    staged.add_argument("--prompt", "-p", default=None, help="the prompt, saying the placeholder (default: "
                                                             "'a photo of S*')")
    staged.add_argument("--name", default=None, help="the embeddings' name: NAME_1..NAME_K, NAME_late (default: "
                                                     "from the placeholder)")
    staged.add_argument("--steps", type=positive_int, default=None,
                        help="sampling steps (50, DDIM as the paper; comfyui 1 to 1000, a1111 2 to 1000)")
    comfyui = export.add_argument_group("comfyui only")
    comfyui.add_argument("--checkpoint", default=None, help="checkpoint file name in ComfyUI's models/checkpoints/ "
                                                            "(default: the usual file of the concept's model; needed "
                                                            "for a model that is no single file, e.g. world)")
    comfyui.add_argument("--guidance-scale", type=positive_float, default=None, help="CFG scale (8.0; at most 100)")
    comfyui.add_argument("--seed", type=non_negative_int, default=None, help="the sampler's seed (0)")
    comfyui.add_argument("--width", type=positive_int, default=None,
                         help="image width, a multiple of 8 (the model's resolution)")
    comfyui.add_argument("--height", type=positive_int, default=None,
                         help="image height, a multiple of 8 (the model's resolution)")
    comfyui.add_argument("--negative-prompt", default=None, help="negative prompt (none)")
    single = export.add_argument_group("textual-inversion only")
    single.add_argument("--token", help="token the embedding is stored under (default: the placeholder if it "
                                        "looks like <name>, else <file name>)")
    single.add_argument("--vectors", default=None, choices=["mean", "centre"],
                        help="mean: mapper averaged over the dynamic stage (default); centre: at its middle timestep")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from ..export import export_textual_inversion

    refuse_unused_flags(args)
    if args.format != "textual-inversion":
        return _staged(args)
    result = export_textual_inversion(
        args.concept, args.output, token=args.token, vectors=args.vectors or "mean", overwrite=args.overwrite
    )
    print(f"wrote {result.path}: token {result.token!r}, {result.num_vectors} vector(s) of width {result.width} "
          f"({result.description})")
    print("lost in the export: the stages (one static embedding for every timestep) and the value residual")
    return 0


def refuse_unused_flags(args) -> None:
    """One SettingsError naming every flag given that the chosen format does not read, and the formats
    that do, before anything is read: a flag silently ignored looks obeyed."""
    from ..errors import SettingsError

    flags = dict.fromkeys(flag for used in FORMAT_FLAGS.values() for flag in used)
    unused = [flag for flag in flags if flag not in FORMAT_FLAGS[args.format]
              and getattr(args, flag[2:].replace("-", "_")) is not None]
    if unused:
        readers = {flag: " or ".join(f for f, used in FORMAT_FLAGS.items() if flag in used) for flag in unused}
        raise SettingsError(f"--format {args.format} does not use "
                            + ", ".join(f"{flag} (a --format {readers[flag]} flag)" for flag in unused))


def _staged(args) -> int:
    from pathlib import Path

    from ..errors import SettingsError
    from ..stage_export import DEFAULT_BINS, SamplerSettings, export_stages, segment_range

    if args.output is None:
        raise SettingsError(f"--format {args.format} writes a folder: give it with --output")
    given = {"checkpoint": args.checkpoint, "steps": args.steps, "cfg": args.guidance_scale, "seed": args.seed,
             "width": args.width, "height": args.height, "negative": args.negative_prompt}
    settings = SamplerSettings(**{key: value for key, value in given.items() if value is not None})
    result = export_stages(args.concept, Path(args.output), tool=args.format, bins=args.bins or DEFAULT_BINS,
                           prompt=args.prompt, settings=settings, name=args.name, overwrite=args.overwrite)
    concept = result.concept
    for segment in result.segments:
        what = f"embedding {result.names[segment.name]}" if segment.name in result.names else f"the word {concept.supercategory!r}"
        start, end = segment_range(segment, concept.num_train_timesteps)
        print(f"{segment.name}: {segment.lo} <= t < {segment.hi} ({what}; ComfyUI range {start:.4f}-{end:.4f})")
    print(f"wrote {len(result.embeddings)} embeddings to {result.folder / 'embeddings'} (copy them into the tool's "
          "embeddings folder: ComfyUI models/embeddings/, A1111 embeddings/)")
    if args.format == "comfyui":
        print(f"wrote {result.folder / 'workflow_api.json'}: drag it onto ComfyUI's page (or Workflow > Open), then "
              f"Run (Queue); it loads the checkpoint {result.settings.checkpoint} from models/checkpoints/ (another "
              "name: pick it in the Load Checkpoint box, or export again with --checkpoint FILE)")
    else:
        print(f"prompt (also in {result.folder / 'prompt.txt'}), for the DDIM sampler at {result.settings.steps} "
              "steps:")
        print(result.text)
        print(a1111_checkpoint(concept.base_model))
    print("lost in the export: the value residual (as in every embedding); the stages are kept, piecewise constant")
    return 0


def a1111_checkpoint(base_model: str) -> str:
    """Which checkpoint to select in A1111 for the concept's model (the prompt cannot name one)."""
    from ..stage_export import checkpoint_file, no_checkpoint_file

    file = checkpoint_file(base_model)
    if file is None:
        return (f"checkpoint: {no_checkpoint_file(base_model)}; select the checkpoint file of that model you use in "
                "A1111's checkpoint list")
    return f"checkpoint: select {file} (the concept's model, {base_model}) in A1111's checkpoint list"
