"""`personamagic train PHOTO... --output FOLDER`: learn a concept from photo(s)."""

from __future__ import annotations

import sys

from .. import DEFAULT_BASE_MODEL
from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int, stage_window, unit_float
from .common import add_device_flags


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="learn a concept from photo(s)")
    train.add_argument("photos", nargs="+", help="photo(s) of the person (any format PIL reads)")
    train.add_argument("--output", "-o", required=True, help="concept folder to write")
    add_training_arguments(train)
    train.add_argument("--ip-adapter", help="train with an IP-Adapter plugged in (paper, Table 3): owner/repo/"
                                            "subfolder/file on the hub or a local file; generate with it too")
    train.add_argument("--ip-adapter-scale", type=non_negative_float, help="IP-Adapter weight (1.0)")
    train.add_argument("--photomaker", nargs="?", const="TencentARC/PhotoMaker", default=None, metavar="WEIGHTS",
                       help="train with PhotoMaker v1 plugged in (SDXL; paper, Table 3): its weights' hub id "
                            "(TencentARC/PhotoMaker, the default) or a local photomaker-v1.bin; generate with it too")
    train.add_argument("--photomaker-lora-scale", type=non_negative_float,
                       help="strength of PhotoMaker's UNet LoRA (1.0)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--overwrite", action="store_true", help="replace a concept already in --output")
    add_device_flags(train)


def add_training_arguments(parser, *, mask_file: bool = True) -> None:
    """The flags of the base model, the photos' encoders and the training that `train` shares with
    `train-many` (`train_config` reads them)."""
    parser.add_argument("--model", default=DEFAULT_BASE_MODEL,
                        help="base model: hub id, diffusers folder, .safetensors/.ckpt file, or tiny (offline toy)")
    parser.add_argument("--vae", default=None,
                        help="another VAE: hub id or folder of an AutoencoderKL (e.g. madebyollin/sdxl-vae-fp16-fix)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="side of the square training crop, a multiple of 64 (the model's: 512 SD-1.x, 1024 SDXL)")
    parser.add_argument("--revision", default=None,
                        help="hub branch, tag or commit of --model (default: main); the concept records the commit")
    parser.add_argument("--model-config", default=None, metavar="FOLDER",
                        help="for a single-file --model: a diffusers folder of the same family whose configs to use "
                             "(default: the family's reference repo from the hub cache)")
    parser.add_argument("--supercategory", default="face", help="one-token word for the concept's class (face)")
    parser.add_argument("--placeholder", default="S*", help="text that stands for the concept in prompts (S*)")
    parser.add_argument("--num-vectors", type=positive_int, default=1, help="token positions per placeholder (1)")
    mask_help = "auto, clipseg, landmarks, none, world (a world render's own mask)" + (", or a mask image FILE the size of the photo" if mask_file else "")
    parser.add_argument("--mask", default="auto", help=mask_help)
    parser.add_argument("--crop", choices=("auto", "face", "none"), default="auto",
                        help="face: crop square around the detected face; none: the photo is already a crop (its "
                             "centre square, no detection); auto: none on the world model, else face")
    parser.add_argument("--image-encoder", default="auto",
                        help="CLIP vision model for the photo's embedding: hub id or folder "
                             "(openai/clip-vit-base-patch32), or tiny (an offline toy)")
    parser.add_argument("--identity-model", default="auto",
                        help="identity loss network: sface (default; OpenCV Zoo, Apache-2.0, offline), arcface-r100 "
                             "(insightface, non-commercial, downloaded), tiny, or a .pth/.safetensors/.onnx file or "
                             "hub id (auto: sface, or tiny with --model tiny)")
    parser.add_argument("--no-id-loss", action="store_true", help="train without the identity loss")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps (1000)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="samples per step (2)")
    parser.add_argument("--learning-rate", type=positive_float, default=5e-5, help="AdamW learning rate (5e-5)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (0)")
    parser.add_argument("--stage-window", type=stage_window, default=None,
                        help="dynamic stage: auto (found from S*'s attention, default) or LO:HI, e.g. 400:800 "
                             "as in the authors' code")
    parser.add_argument("--lambda1", type=unit_float, default=0.7, help="relative-IoU threshold ending static 1 (0.7)")
    parser.add_argument("--lambda2", type=unit_float, default=0.8,
                        help="relative-IoU threshold starting static 2 (0.8)")
    parser.add_argument("--partition-warmup-steps", type=non_negative_int, default=None,
                        help="full-schedule steps before the automatic partition (100, or --steps if fewer)")
    parser.add_argument("--te-weight", type=non_negative_float, default=1e-3, help="tandem-equilibrium weight (1e-3)")
    parser.add_argument("--id-weight", type=non_negative_float, default=1.0, help="identity-loss weight (1.0)")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100,
                        help="write a resumable checkpoint every N steps (100; 0 = never)")
    parser.add_argument("--train-prompt", default="a photo of {}",
                        help='training prompt, {} = the placeholder ("a photo of {}"; e.g. "a painting in the style '
                             'of {}")')
    parser.add_argument("--no-optimize", action="store_true",
                        help="turn every speed-up off and run the plain reference step (slower, for comparison)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the networks of the training step (backend: inductor; the first step "
                             "compiles; an experiment, see docs/performance.md)")
    parser.add_argument("--low-memory", action="store_true",
                        help="for 8 GB cards: gradient checkpointing and the batch as micro-batches of 1")


def model_options(args) -> dict:
    """The keyword arguments of the model and photo flags `personalize` and `train_many` share."""
    names = ("model", "device", "dtype", "mask", "image_encoder", "identity_model", "local_files_only", "revision",
             "model_config", "vae", "resolution", "crop")
    return {name: getattr(args, name) for name in names}


def train_config(args):
    """The `TrainConfig` the flags ask for (a bad combination is one SettingsError)."""
    from ..training.config import TrainConfig

    return TrainConfig(
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


class ProgressBars:
    """One tqdm bar per phase (warm-up, training), each closed as soon as its phase ends, so that what
    is logged between the phases gets a line of its own."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __call__(self, step, total, logs, phase) -> None:
        from tqdm.auto import tqdm

        if self.bar is None or phase != self.phase:
            self.close()
            desc = "warm-up (full schedule)" if phase == "warm-up" else "training"
            self.bar = tqdm(total=total, initial=step - 1, desc=desc, unit="step", file=sys.stderr)
            self.phase = phase
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        self.bar.update(1)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resume_command(args) -> str:
    """The command line that continues this run: the same flags, --resume instead of --overwrite."""
    import shlex

    argv = [str(a) for a in getattr(args, "argv", None) or sys.argv[1:] if str(a) not in ("--overwrite", "--resume")]
    return "personamagic " + " ".join(shlex.quote(a) for a in argv) + " --resume"


def kept_checkpoint(args):
    """The checkpoint a stopped run leaves in its output folder (None before the first)."""
    from pathlib import Path

    from ..jobs.personalize import CHECKPOINT_DIR
    from ..training import latest_checkpoint

    return latest_checkpoint(Path(args.output) / CHECKPOINT_DIR)


def interrupted_message(args) -> str:
    """What Ctrl-C leaves behind and how to go on."""
    checkpoint = kept_checkpoint(args)
    if checkpoint is None:
        return "interrupted before the first checkpoint; nothing was kept"
    return f"interrupted; kept the checkpoint {checkpoint}; continue with: {resume_command(args)}"


def disk_fault_message(err, args) -> str:
    """A failed write: the fault, then what the run keeps and how to go on from it."""
    checkpoint = kept_checkpoint(args)
    if checkpoint is None:
        return f"{err}; nothing was kept"
    return f"{err}; kept the checkpoint {checkpoint}; {err.remedy}, then continue with: {resume_command(args)}"


def run(args) -> int:
    from ..adapters.ip_adapter import IPAdapterSpec
    from ..errors import DiskError, Interrupted
    from ..jobs.personalize import personalize
    from .common import check_adapter_flags, quiet_libraries

    quiet_libraries(args.verbose)
    check_adapter_flags(args)
    ip_adapter = None
    if args.ip_adapter is not None:
        scale = 1.0 if args.ip_adapter_scale is None else args.ip_adapter_scale
        ip_adapter = IPAdapterSpec.parse(args.ip_adapter, scale=scale)
    photomaker = None
    if args.photomaker is not None:
        from ..adapters.photomaker_plugin import PhotoMakerSpec

        lora_scale = 1.0 if args.photomaker_lora_scale is None else args.photomaker_lora_scale
        photomaker = PhotoMakerSpec(weights=args.photomaker, lora_scale=lora_scale)
    config = train_config(args)
    progress = ProgressBars()
    try:
        result = personalize(args.photos, args.output, config, overwrite=args.overwrite, resume=args.resume,
                             progress=progress, ip_adapter=ip_adapter, photomaker=photomaker, **model_options(args))
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted(interrupted_message(args)) from None
    except DiskError as err:
        progress.close()
        raise DiskError(disk_fault_message(err, args)) from None
    finally:
        progress.close()
    for note in result.notes:
        print(f"note: {note}")
    if result.up_to_date:
        return 0
    c = result.concept
    t = result.timings
    print(f"concept {c.placeholder!r} ({c.supercategory}) written to {result.concept_path}")
    print(f"dynamic stage: {c.stage_window[0]} <= t < {c.stage_window[1]}; took {t['total_s']:.1f} s in all "
          f"(warm-up and partition {t.get('partition_s', 0.0):.1f} s, training {t['train_s']:.1f} s)")
    return 0
