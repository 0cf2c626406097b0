"""`personamagic export CONCEPT --format textual-inversion`: a concept in other tools' formats."""

from __future__ import annotations


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a concept in another tool's format")
    export.add_argument("concept", help="concept folder or concept.safetensors file")
    export.add_argument("--format", default="textual-inversion", choices=["textual-inversion"],
                        help="textual-inversion: safetensors for diffusers load_textual_inversion, A1111 and ComfyUI "
                             "embeddings/: {token: [n, 768]} on SD 1.x, {clip_l, clip_g} on SDXL (default)")
    export.add_argument("--output", "-o", help="file to write (default: ./<concept folder name>.safetensors)")
    export.add_argument("--token", help="token the embedding is stored under (default: the placeholder if it "
                                        "looks like <name>, else <file name>)")
    export.add_argument("--vectors", default="mean", choices=["mean", "centre"],
                        help="mean: mapper averaged over the dynamic stage (default); centre: at its middle timestep")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from ..export import export_textual_inversion

    result = export_textual_inversion(
        args.concept, args.output, token=args.token, vectors=args.vectors, overwrite=args.overwrite
    )
    print(f"wrote {result.path}: token {result.token!r}, {result.num_vectors} vector(s) of width {result.width} "
          f"({result.description})")
    print("lost in the export: the stages (one static embedding for every timestep) and the value residual")
    return 0
