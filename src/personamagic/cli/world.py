"""`personamagic world ...`: draw people of the learning world, and (re)make its base model and judge.

    personamagic world render 40321 --output me.png [--set background=beach --set headwear=red_hat]
    personamagic world people --count 5                    # held-out identities (never trained on)
    personamagic world train-base --work runs/world-train  # the base model, resumable (about 2 hours on 2 CPU cores)
    personamagic world train-judge --work runs/world-train # the judge (identity encoder, context classifier)

The world's figures are measured by `personamagic evaluate world`.
"""

from __future__ import annotations

from pathlib import Path

from .argtypes import non_negative_int, positive_int


def add_parser(commands) -> None:
    world = commands.add_parser("world", help="the learning world: draw its people, train its model and judge")
    sub = world.add_subparsers(dest="world_command", required=True, parser_class=type(world))
    render = sub.add_parser("render", help="draw one person (a PNG that records what it shows, and its face mask "
                                           "FILE.mask.png)")
    render.add_argument("identity", type=non_negative_int, help="the person's number (see `world people`)")
    render.add_argument("--output", "-o", required=True, help="PNG file to write; the mask goes beside it")
    render.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a context attribute (background, headwear, clothing, glasses, style, position); "
                             "default: a plain studio photo")
    render.add_argument("--seed", type=non_negative_int, default=0, help="the render's seed (0)")
    people = sub.add_parser("people", help="list held-out people (the base model never saw them)")
    people.add_argument("--count", type=positive_int, default=10, help="how many (10)")
    base = sub.add_parser("train-base", help="train the world's base model from scratch (resumable)")
    base.add_argument("--work", default="runs/world-train", help="working folder: data, checkpoints, grids, log")
    base.add_argument("--output", "-o", default=None, help="diffusers folder to write (default: WORK/model)")
    base.add_argument("--unet-steps", type=positive_int, default=None, help="UNet + text encoder steps (7000)")
    base.add_argument("--vae-steps", type=positive_int, default=None, help="VAE steps (1200)")
    base.add_argument("--device", default="auto",
                      help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; the random draws are the "
                           "CPU's on every device")
    judge = sub.add_parser("train-judge", help="train the world's judge on renders (needs train-base's data)")
    judge.add_argument("--work", default="runs/world-train", help="train-base's working folder (its data.npz)")
    judge.add_argument("--output", "-o", default=None, help="weights file (default: WORK/judge.safetensors)")



def run(args) -> int:
    return {"render": _render, "people": _people, "train-base": _train_base, "train-judge": _train_judge}[
        args.world_command](args)


def _render(args) -> int:
    from ..errors import SettingsError
    from ..files import write_atomic
    from ..world.attributes import CONTEXT_ATTRIBUTES, IDENTITY_COUNT, identity_attributes, is_held_out
    from ..world.render import render, save_render

    if args.identity >= IDENTITY_COUNT:
        raise SettingsError(f"identity {args.identity} is out of range; the world has 0..{IDENTITY_COUNT - 1}")
    context = {}
    names = {a.name: a for a in CONTEXT_ATTRIBUTES}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names or value not in names[name].values:
            known = "; ".join(f"{a.name}: {', '.join(a.values)}" for a in CONTEXT_ATTRIBUTES)
            raise SettingsError(f"--set {item!r} is not NAME=VALUE of the world's context ({known})")
        context[name] = value
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise SettingsError(f"--output {output} must be a .png file")
    item = render(args.identity, context, args.seed)
    mask_path = output.with_suffix(".mask.png")
    write_atomic(output, lambda tmp: save_render(item, tmp, args.seed))
    write_atomic(mask_path, lambda tmp: item.mask.save(tmp, format="PNG"))
    split = "held out" if is_held_out(args.identity) else "a training identity"
    print(f"person {args.identity} ({split}): {', '.join(f'{k} {v}' for k, v in identity_attributes(args.identity).items())}")
    print(f"wrote {output} and its face mask {mask_path}")
    return 0


def _people(args) -> int:
    from ..world.attributes import held_out_identities, identity_attributes

    for identity in held_out_identities(args.count):
        print(identity, " ".join(f"{k}={v}" for k, v in identity_attributes(identity).items()))
    return 0


def _train_base(args) -> int:
    from dataclasses import replace

    from ..models.devices import resolve_device
    from ..world.train_base import BaseTrainingConfig, run

    device = resolve_device(args.device)
    config = BaseTrainingConfig()
    if args.unet_steps is not None:
        config = replace(config, unet_steps=args.unet_steps)
    if args.vae_steps is not None:
        config = replace(config, vae_steps=args.vae_steps)
    work = Path(args.work)
    output = Path(args.output) if args.output else work / "model"
    run(config, work, output, device)
    print(f"world model written to {output}")
    return 0


def _train_judge(args) -> int:
    import json

    from tqdm.auto import tqdm

    from ..errors import SettingsError
    from ..world.dataset import load_dataset
    from ..world.judge import JUDGE_SCHEDULE, save_judge, train_judge_schedule
    from ..world.metrics import judge_report

    data_path = Path(args.work) / "data.npz"
    if not data_path.is_file():
        raise SettingsError(f"{data_path} does not exist; run `personamagic world train-base --work {args.work}` first "
                            "(it renders the training set)")
    data = load_dataset(data_path)
    bar = tqdm(total=sum(cycle[0] for cycle in JUDGE_SCHEDULE), desc="judge", unit="step")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    judge = train_judge_schedule(data["images"], data["labels"], progress=progress)
    bar.close()
    output = Path(args.output) if args.output else Path(args.work) / "judge.safetensors"
    save_judge(judge, output)
    report = judge_report(judge)
    (output.with_suffix(".report.json")).write_text(json.dumps(report, indent=2) + "\n")
    print(f"judge written to {output}; on held-out people: identity cosine same person "
          f"{report['identity_cosine_same']:.3f} ({report['identity_cosine_same_in_full_view']:.3f} in full view), "
          f"different people {report['identity_cosine_different']:.3f}")
    return 0

