"""`personamagic export CONCEPT --format textual-inversion|comfyui|a1111`: a concept in other tools' formats."""

from __future__ import annotations

from .argtypes import non_negative_int, positive_float, positive_int


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a concept in another tool's format")
    export.add_argument("concept", help="concept folder or concept.safetensors file")
    export.add_argument("--format", default="textual-inversion", choices=["textual-inversion", "comfyui", "a1111"],
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
    staged.add_argument("--checkpoint", default=None, help="checkpoint file name in the tool's models folder (default: "
                                                           "the usual file of the concept's model)")
    staged.add_argument("--steps", type=positive_int, default=50, help="sampling steps (50, DDIM as the paper)")
    staged.add_argument("--guidance-scale", type=positive_float, default=8.0, help="CFG scale (8.0)")
    staged.add_argument("--seed", type=non_negative_int, default=0, help="ComfyUI's sampler seed (0)")
    staged.add_argument("--width", type=positive_int, default=None, help="image width (the model's resolution)")
    staged.add_argument("--height", type=positive_int, default=None, help="image height (the model's resolution)")
    staged.add_argument("--negative-prompt", default="", help="negative prompt (none)")
    export.add_argument("--token", help="token the embedding is stored under (default: the placeholder if it "
                                        "looks like <name>, else <file name>)")
    export.add_argument("--vectors", default="mean", choices=["mean", "centre"],
                        help="mean: mapper averaged over the dynamic stage (default); centre: at its middle timestep")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from ..errors import SettingsError
    from ..export import export_textual_inversion

    if args.format != "textual-inversion":
        return _staged(args)
    given = [f for f, v in (("--bins", args.bins), ("--prompt", args.prompt), ("--name", args.name),
                            ("--checkpoint", args.checkpoint)) if v is not None]
    if given:
        raise SettingsError(f"{', '.join(given)} belong to --format comfyui or a1111")

    result = export_textual_inversion(
        args.concept, args.output, token=args.token, vectors=args.vectors, overwrite=args.overwrite
    )
    print(f"wrote {result.path}: token {result.token!r}, {result.num_vectors} vector(s) of width {result.width} "
          f"({result.description})")
    print("lost in the export: the stages (one static embedding for every timestep) and the value residual")
    return 0


def _staged(args) -> int:
    from pathlib import Path

    from ..concept import Concept, resolve_concept_path
    from ..errors import SettingsError
    from ..families import family_named
    from ..stage_export import DEFAULT_BINS, SamplerSettings, checkpoint_file, export_stages, segment_range

    if args.output is None:
        raise SettingsError(f"--format {args.format} writes a folder: give it with --output")
    concept = Concept.load(resolve_concept_path(args.concept))
    side = family_named(concept.family).image_size
    settings = SamplerSettings(checkpoint=args.checkpoint or checkpoint_file(concept.base_model), steps=args.steps,
                               cfg=args.guidance_scale, seed=args.seed, width=args.width or side,
                               height=args.height or side, negative=args.negative_prompt)
    result = export_stages(args.concept, Path(args.output), tool=args.format, bins=args.bins or DEFAULT_BINS,
                           prompt=args.prompt, settings=settings, name=args.name, overwrite=args.overwrite)
    for segment in result.segments:
        what = f"embedding {result.names[segment.name]}" if segment.name in result.names else f"the word {concept.supercategory!r}"
        start, end = segment_range(segment, concept.num_train_timesteps)
        print(f"{segment.name}: {segment.lo} <= t < {segment.hi} ({what}; ComfyUI range {start:.4f}-{end:.4f})")
    print(f"wrote {len(result.embeddings)} embeddings to {result.folder / 'embeddings'} (copy them into the tool's "
          "embeddings folder: ComfyUI models/embeddings/, A1111 embeddings/)")
    if args.format == "comfyui":
        print(f"wrote {result.folder / 'workflow_api.json'}: queue it with ComfyUI's API (POST /prompt), checkpoint "
              f"{settings.checkpoint} in models/checkpoints/")
    else:
        print(f"prompt (also in {result.folder / 'prompt.txt'}), for the DDIM sampler at {args.steps} steps:")
        print(result.text)
    print("lost in the export: the value residual (as in every embedding); the stages are kept, piecewise constant")
    return 0
