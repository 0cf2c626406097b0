"""Resumable training checkpoints: mapper, optimizer, step, random state and stage partition, as
safetensors + JSON (no pickle), written atomically; and the rule for what a resume may change.

A resume continues the saved run exactly, so everything that shapes the result must be what it was:
the photos (by content), the base model, the seed, the stage window or partition settings, the batch,
the losses and their weights, the mapper's shape, the supercategory and placeholder. Only settings
that do not change the arithmetic may differ, and the new values are what the concept records:
`RESUMABLE_CHANGES`, plus a larger `max_train_steps`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..errors import BAD_JSON, ConceptError
from ..files import disk_error, load_safetensors, save_safetensors_atomic

CHECKPOINT_FORMAT = 2
STEP_PATTERN = "step-*.safetensors"
# TrainConfig fields a resume may change: how often to save or read back, and speed-ups that keep the
# arithmetic (graphs, compiling, micro-batches, recomputing activations)
RESUMABLE_CHANGES = frozenset({
    "max_train_steps", "checkpoint_every", "sync_every", "optimize", "cuda_graph", "compile", "compile_backend",
    "gradient_accumulation_steps", "gradient_checkpointing",
})


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob(STEP_PATTERN)) if folder.is_dir() else []
    return found[-1] if found else None


def remove_older_checkpoints(folder: Path, keep: int) -> None:
    for path in folder.glob(STEP_PATTERN):
        if path.name != checkpoint_name(keep):
            path.unlink(missing_ok=True)


def save_checkpoint(trainer, path: Path, job: dict | None = None) -> None:
    """The trainer's state at this step. `job`: facts of the run outside `TrainConfig` that a resume
    must match (photo hashes, base model, mask, encoders), as JSON-able values."""
    tensors = {f"mapper.{k}": v for k, v in trainer.mapper.state_dict().items()}
    state = trainer.optimizer.state_dict()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.generator"] = trainer.generator.get_state()
    if trainer.attention_maps is not None:
        tensors["partition.attention_maps"] = trainer.attention_maps
    header = {
        "checkpoint_format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "step": trainer.step_count,
        "stage_window": trainer.stage_window.to_list() if trainer.stage_window is not None else None,
        "stages": trainer.stages,
        "param_groups": state["param_groups"],
        "config": trainer.config.to_dict(),
        "job": job or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        save_safetensors_atomic(tensors, {"checkpoint": json.dumps(header)}, path)
    except OSError as err:  # a full disk: the previous checkpoint is still there, untouched
        raise disk_error(path, err) from None


RESTART = "train again with --overwrite"  # what `personamagic train` says to do about a checkpoint it cannot use


class CheckpointError(ConceptError):
    """A checkpoint that cannot be resumed from: `fault` says why; the message adds what `personamagic
    train` does about it (a command with other flags words its own advice from `fault`)."""

    def __init__(self, fault: str, alternative: str = ""):
        self.fault, self.alternative = fault, alternative  # alternative: another way out, before restarting
        super().__init__(f"{fault}; {alternative + ', or ' if alternative else ''}{RESTART}")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, header) of a checkpoint; CheckpointError for anything that is not one of ours."""
    tensors, header = load_safetensors(path, error=CheckpointError)
    try:
        meta = json.loads(header["checkpoint"])
    except (KeyError, *BAD_JSON):
        raise CheckpointError(f"{path} is not a personamagic training checkpoint") from None
    if not isinstance(meta, dict) or meta.get("checkpoint_format") != CHECKPOINT_FORMAT:
        found = meta.get("checkpoint_format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has checkpoint format {found}, this personamagic resumes {CHECKPOINT_FORMAT}")
    kinds = {"step": (int, "a whole number"), "config": (dict, "an object"), "param_groups": (list, "a list")}
    for key, (kind, description) in kinds.items():
        if key not in meta:
            raise CheckpointError(f"{path} is a damaged checkpoint (no {key!r})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path} is a damaged checkpoint ({key!r} is not {description})")
    if meta["step"] < 0 or not isinstance(meta.get("job", {}), dict) or not isinstance(meta.get("stages", {}), dict):
        raise CheckpointError(f"{path} is a damaged checkpoint (its header is malformed)")
    if "rng.generator" not in tensors or not any(k.startswith("mapper.") for k in tensors):
        raise CheckpointError(f"{path} is a damaged checkpoint (tensors missing)")
    for key, tensor in tensors.items():
        if key.startswith("mapper.") and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} is a damaged checkpoint ({key} holds NaN or infinite values)")
    return tensors, meta


# How a difference is named to the user: the `personamagic train` flag of a TrainConfig field or job fact
# (the others by their field name).
SETTING_NAMES = {
    "placeholder": "--placeholder", "supercategory": "--supercategory", "num_vectors": "--num-vectors",
    "train_prompt": "--train-prompt", "train_batch_size": "--batch-size", "learning_rate": "--learning-rate",
    "seed": "--seed", "stage_window": "--stage-window", "lambda1": "--lambda1", "lambda2": "--lambda2",
    "partition_warmup_steps": "--partition-warmup-steps", "te_weight": "--te-weight", "id_weight": "--id-weight",
    "use_id_loss": "identity loss (--no-id-loss)", "base_model": "--model", "mask": "--mask",
    "image_encoder": "--image-encoder", "identity_model": "--identity-model", "resolution": "--resolution",
    "photomaker": "--photomaker", "ip_adapter": "--ip-adapter/--ip-adapter-scale", "vae": "--vae",
    "revision": "the base model's revision (--revision)",
}


def resume_differences(saved: dict, config: dict, saved_job: dict, job: dict, step: int) -> list[str]:
    """What differs between a checkpoint's run and the run asked for, in words (empty: may resume)."""
    found = []
    for key in sorted(set(saved) | set(config)):
        if key in RESUMABLE_CHANGES or saved.get(key) == config.get(key):
            continue
        found.append(f"{SETTING_NAMES.get(key, key)} was {saved.get(key)!r}, now {config.get(key)!r}")
    for key in sorted(set(saved_job) | set(job)):
        if saved_job.get(key) == job.get(key):
            continue
        if key == "photos":
            found.append(f"the photos differ (compared by content: {saved_job.get(key)} then, {job.get(key)} now)")
        else:
            found.append(f"{SETTING_NAMES.get(key, key)} was {saved_job.get(key)!r}, now {job.get(key)!r}")
    steps = config.get("max_train_steps", step)
    if not isinstance(steps, int) or steps < step:
        found.append(f"--steps {steps} is below the {step} steps already done")
    return found


def load_checkpoint(trainer, path: Path, job: dict | None = None) -> None:
    """Restore the trainer's state from `path`, after checking that the run asked for is the saved one
    (`resume_differences`); the differences are one CheckpointError listing each."""
    from ..method.stages import StageWindow

    tensors, meta = read_checkpoint(path)
    differences = resume_differences(meta["config"], trainer.config.to_dict(), meta.get("job", {}), job or {},
                                     meta["step"])
    if differences:
        raise CheckpointError(f"cannot resume from {path}: the run differs from the saved one "
                              f"({'; '.join(differences)})", "resume with the same settings")
    try:
        trainer.mapper.load_state_dict({k[len("mapper."):]: v for k, v in tensors.items() if k.startswith("mapper.")})
        optimizer_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value.to(trainer.device) if value.dim() else value
        trainer.optimizer.load_state_dict({"state": optimizer_state, "param_groups": meta["param_groups"]})
        trainer.generator.set_state(tensors["rng.generator"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit this run's mapper ({str(err).splitlines()[0]})") from None
    trainer.step_count = meta["step"]
    if meta.get("stage_window"):
        try:
            trainer.stage_window = StageWindow(*meta["stage_window"], trainer.num_train_timesteps)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is a damaged checkpoint (stage window: {err})") from None
        trainer.stages = meta.get("stages", {})
    trainer.attention_maps = tensors.get("partition.attention_maps")
