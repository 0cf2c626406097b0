"""Training one concept's stage mapper (docs/method.md): its state around the Eq. 5 objective.

Everything but the mapper is frozen. All randomness comes from one torch.Generator on the training
device, whose state is saved in checkpoints, so a resumed run repeats an uninterrupted one exactly.
The step and the loop are `training.group`'s: a concept trained alone is a group of one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..concept import Concept
from ..errors import SettingsError
from ..method.mapper import MapperConfig, StageMapper
from ..method.stages import StagePartition, StageWindow
from ..method.tokens import PlaceholderTokens, single_token_id
from . import checkpoints
from .config import TrainConfig
from .data import Batch, TrainingData, sample_batch
from .group import GroupTrainer
from .objective import Objective, StepLosses
from .partition import capture_attention, partition_after_warmup


def supercategory_embedding(base, word: str) -> torch.Tensor:
    """(D,) the word's token embedding in every text encoder, side by side (SettingsError unless the word
    is one token for every tokenizer)."""
    parts = []
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        token = single_token_id(tokenizer, word)
        parts.append(encoder.get_input_embeddings().weight[token].detach().float().cpu())
    return torch.cat(parts)


class Trainer:
    """Trains one concept's stage mapper on a frozen base model. Use as a context manager:

        with Trainer(base, data, config, identity_encoder) as trainer:
            trainer.train(progress=...)
            concept = trainer.concept()

    Entering installs the UNet attention processors and the token-embedding hooks; leaving removes
    them (also on error), leaving the base model exactly as it was. `photomaker`: PhotoMaker plugged in
    (`adapters.photomaker_plugin`), its LoRA already in the UNet; S* is fused with each photo's ID.
    """

    def __init__(self, base, data: TrainingData, config: TrainConfig, identity_encoder=None, photomaker=None):
        self.base, self.data, self.config = base, data, config
        self.identity_encoder = identity_encoder  # as given (a group of trainers shares one)
        self.device = base.device
        self.tokens = PlaceholderTokens(base.tokenizers, config.placeholder, config.num_vectors, slot=0)
        mapper_config = MapperConfig(
            text_embed_dim=base.hidden_size,
            image_embed_dim=data.image_embeds.shape[-1],
            num_vectors=config.num_vectors,
            time_frequencies=config.time_frequencies,
            hidden_dim=config.mapper_hidden_dim,
            time_dependent=config.mapper_time_dependent,
            use_residual=config.mapper_residual,
            encoder_widths=base.encoder_widths,
            residual_dim=base.cross_attention_dim,
        )
        with torch.random.fork_rng(devices=[]):  # the mapper's initial weights follow the seed too
            torch.manual_seed(config.seed)
            self.mapper = StageMapper(mapper_config, supercategory_embedding(base, config.supercategory))
        self.mapper.to(self.device).train()
        self.initial_mapper_state = {k: v.clone() for k, v in self.mapper.state_dict().items()}
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step_count = 0
        if photomaker is not None and config.num_vectors != 1:
            raise SettingsError("training with PhotoMaker needs --num-vectors 1 (S* is PhotoMaker's one class token)")
        self.objective = Objective(base, data, config, self.tokens.ids, identity_encoder, photomaker)
        self.num_train_timesteps = self.objective.num_train_timesteps
        self.partition_resolution = config.partition_resolution or base.family.partition_resolution
        self.stage_window: StageWindow | None = None
        self.stages: dict = {}
        if config.stage_window is not None:
            try:
                self.stage_window = StageWindow(*config.stage_window, self.num_train_timesteps)
            except ValueError as err:
                raise SettingsError(f"--stage-window: {err}") from None
            self.stages = {"method": "fixed", "window": self.stage_window.to_list()}
        elif config.partition_timesteps > self.num_train_timesteps:
            raise SettingsError(f"partition_timesteps {config.partition_timesteps}: the automatic partition probes "
                                f"a DDIM grid of the model's {self.num_train_timesteps}-step schedule; use at most "
                                f"{self.num_train_timesteps}")
        self.partition: StagePartition | None = None  # the automatic partition, once found
        self.attention_maps: torch.Tensor | None = None  # (K, r, r) from the partition capture
        self.group = GroupTrainer([self], names=[None])  # what steps it: training alone is a group of one

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "Trainer":
        self.group.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.group.__exit__(*exc)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(
            self.mapper.parameters(),
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
            # One fused kernel instead of a dozen launches per step on CUDA (same update rule).
            fused=True if self.config.optimize and self.device.type == "cuda" else None,
        )

    def restart_mapper(self) -> None:
        """Back to the initial weights with a fresh optimizer (after the partition warm-up, docs/method.md)."""
        with torch.no_grad():  # in place: a captured CUDA graph keeps pointing at these tensors
            for name, value in self.mapper.state_dict().items():
                value.copy_(self.initial_mapper_state[name])
        self.optimizer = self._make_optimizer()

    # -- one step ----------------------------------------------------------------------------------

    def sample_batch(self, window: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Batch:
        """Draw one batch; `window` (t_lo, t_hi) defaults to the dynamic stage."""
        if window is None and self.stage_window is None:
            raise RuntimeError("no stage window yet: call find_stage_window() first or set one in TrainConfig")
        return sample_batch(
            self.data, self.config.train_batch_size, window or self.stage_window, generator or self.generator,
            latent_scale=self.objective.latent_scale, bypass_drop=self.config.bypass_drop,
            num_te_prompts=self.objective.te_ids[0].shape[0],
        )

    def losses(self, batch: Batch) -> StepLosses:
        """All loss terms of one batch (differentiable w.r.t. the mapper)."""
        return self.objective.losses(self.mapper, batch)[0]

    def step(self) -> dict[str, float]:
        """One optimizer step in the dynamic stage; returns the loss terms as floats, checked."""
        return self.group.step()[0]

    def optimize_step(self, window: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Draw a batch with t in `window` and take one optimizer step; returns the loss terms as
        (device) tensors, without reading them back."""
        return self.group.optimize_step([0], [window])[0]

    # -- stage partition (docs/method.md) -----------------------------------------------------------------

    def find_stage_window(self, progress=None) -> StagePartition:
        """Warm up over the whole schedule, capture S*'s attention, partition, set `stage_window`.

        progress(step, total, logs) is called after every warm-up step (in the optimized path in bursts of
        `sync_every`). Afterwards the mapper restarts from its initial weights or continues, as
        `restart_after_partition` says.
        """
        self.group.run([self.group.member(0, until=self.step_count, warm_up=True)], _alone(progress))
        return self.partition

    def partition_after_warmup(self) -> StagePartition:
        """`find_stage_window` after its warm-up (the loop's, `training.group`): capture, partition, set
        `stage_window`, restart or continue."""
        return self._use_partition(*partition_after_warmup(self))

    def _use_partition(self, partition: StagePartition, window: StageWindow, maps: torch.Tensor) -> StagePartition:
        c = self.config
        self.partition, self.stage_window, self.attention_maps = partition, window, maps
        self.stages = {
            "method": "auto",
            **partition.to_dict(),
            "window": window.to_list(),
            "warmup_steps": c.warmup_steps,
            "restarted": c.restart_after_partition,
            "resolution": self.partition_resolution,
        }
        if c.restart_after_partition:
            self.restart_mapper()
        return partition

    def capture_attention(self, num_timesteps: int, resolution: int, chunk: int = 10):
        """S*'s cross-attention maps on a DDIM grid (`partition.capture_attention`)."""
        return capture_attention(self, num_timesteps, resolution, chunk)

    # -- the loop ----------------------------------------------------------------------------------

    def train(self, num_steps: int | None = None, progress=None, checkpoint_dir: Path | None = None,
              job: dict | None = None) -> None:
        """Run until `num_steps` (default: max_train_steps) steps are done in total.

        progress(step, total, logs) is called for every step (in the optimized path in bursts of
        `sync_every`, when the losses are read back). With `checkpoint_dir` and `checkpoint_every` > 0,
        a resumable checkpoint (recording `job`) is written there every that many steps.
        """
        total = num_steps if num_steps is not None else self.config.max_train_steps
        member = self.group.member(0, until=total, warm_up=False, checkpoint_dir=checkpoint_dir, job=job)
        self.group.run([member], _alone(progress))

    # -- evaluation, checkpoints, the concept ------------------------------------------------------

    def masked_denoising_loss(self, timesteps: torch.Tensor, noise: torch.Tensor, use_mapper: bool = True) -> float:
        """Held-out masked MSE of photo 0 (`Objective.held_out_loss`)."""
        return self.objective.held_out_loss(self.mapper, timesteps, noise, use_mapper)

    def save_checkpoint(self, path: Path, job: dict | None = None) -> None:
        checkpoints.save_checkpoint(self, path, job)

    def load_checkpoint(self, path: Path, job: dict | None = None) -> None:
        checkpoints.load_checkpoint(self, path, job)

    def concept(self, base_model: str, image_encoder: str = "", extra=None) -> Concept:
        """The trained concept, ready to save."""
        return Concept(
            mapper_state={k: v.detach().cpu().clone() for k, v in self.mapper.state_dict().items()},
            image_embeds=self.data.image_embeds.detach().cpu(),
            placeholder=self.config.placeholder,
            supercategory=self.config.supercategory,
            stage_window=tuple(self.stage_window),
            num_train_timesteps=self.num_train_timesteps,
            base_model=base_model,
            text_encoder_hidden_size=self.base.hidden_size,
            mapper_config=self.mapper.config.to_dict(),
            image_encoder=image_encoder,
            training={**self.config.to_dict(), "steps_done": self.step_count},
            stages=self.stages,
            extra=extra or {},
            family=self.base.family.name,
            base_revision=self.base.revision,
        )


def _alone(progress):
    """A trainer's progress(step, total, logs) as the loop calls it, progress(i, step, total, logs, phase)."""
    if progress is None:
        return None
    return lambda i, step, total, logs, phase: progress(step, total, logs)
