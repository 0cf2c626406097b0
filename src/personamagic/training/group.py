"""The training step and loop (docs/method.md), of one identity or of several sharing each step: a concept
trained alone is a group of one (a `Trainer` trains itself so).

At small batch the step waits on kernel launches, not arithmetic, so K identities sharing one UNet batch
of 2K samples cost little more than one identity. Each identity stays a `Trainer` of its own: its mapper,
AdamW state, photos (mask, CLIP embedding, identity reference), stage window, checkpoints and
torch.Generator, from which it draws exactly the batches it would draw alone (its own `sample_batch`).

1. The batch: the identities' batches concatenated, in order; their photos' `TrainingData` concatenated
   too, each batch's image indices offset to its identity's first photo (a group of one: its own batch,
   its own photos and its own `Objective`).
2. The mappers: `GroupMapper` hands each identity's slice of timesteps and CLIP embeddings to its own
   mapper and concatenates what they return.
3. The losses: `Objective.losses` runs the text encoders, the UNet and the VAE decoder once on the whole
   batch and takes each identity's terms as means over its own samples (each keeps its own face patch
   size for the identity loss, so a patch never depends on the group).
4. The step: backward of the SUM of the identities' mean losses, then every optimizer steps. The mappers
   are disjoint and every network treats samples independently, so each mapper's gradient is the one it
   gets alone: grouping changes the speed, never the result (up to the rounding of batched kernels).
   With `optimize` on CUDA the step (losses + backward) is replayed from a CUDA graph (`graph.GraphedStep`),
   captured again when the identities stepping together change.

The loop reads the losses back only every `sync_every` steps on the optimised path (a read waits for the
device), checks them for NaN/inf there, and reports each step's values to `progress`. The stage partition:
the warm-up is a step like any other (each identity over [0, T)); then each identity captures S*'s attention
and cuts its own IoU curve (`Trainer.partition_after_warmup`), one at a time with the group's hooks off and
its own on, exactly as it does alone. Identities may be in different phases (one resumed past its partition,
another warming up): each slice draws from its own window. Every identity reads back, checks and reports its
own losses; in a group, one that diverges is named, dropped from the group, and the others go on.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import PersonaMagicError
from ..method.stages import PartitionError
from . import checkpoints
from .config import TrainConfig
from .data import Batch, TrainingData, concat, split_batch
from .graph import GraphedStep
from .objective import Objective, StepLosses

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger(__name__)

# TrainConfig fields the identities of a group share: those of the objective the group runs once (prompt,
# losses and their weights, speed-ups) and the read-back interval. The others (seed, steps, batch, stage
# window and partition, learning rate, mapper shape, supercategory...) each identity has its own.
SHARED_FIELDS = (
    "placeholder", "num_vectors", "train_prompt", "te_weight", "te_temperature", "te_encoder_weights", "id_weight",
    "use_id_loss", "optimize", "cuda_graph", "id_face_patch", "id_patch_margin", "sync_every", "compile",
    "compile_backend", "gradient_accumulation_steps", "gradient_checkpointing",
)


class TrainingDiverged(PersonaMagicError):
    """The loss became NaN or infinite."""


def group_key(config: TrainConfig) -> tuple:
    """What identities must have in common to train in one group (`SHARED_FIELDS`), hashable."""
    return tuple((name, getattr(config, name)) for name in SHARED_FIELDS)


def read_losses(logs: dict[str, torch.Tensor], where: str, name: str | None = None) -> dict[str, float]:
    """Read the loss terms back; raise TrainingDiverged on NaN/inf naming the step (and the identity, `name`)."""
    values = {k: float(v) for k, v in logs.items()}
    if not all(math.isfinite(v) for v in values.values()):
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        raise TrainingDiverged(
            f"{name + ': ' if name else ''}training diverged at {where} ({bad}); lower --learning-rate, "
            "use --dtype fp32, or check the photo and mask"
        )
    return values


def concatenate_data(datas: list[TrainingData]) -> tuple[TrainingData, list[int]]:
    """Several identities' photos as one `TrainingData`, and the index of each identity's first photo."""
    values = {}
    for f in fields(TrainingData):
        parts = [getattr(d, f.name) for d in datas]
        if all(p is None for p in parts):
            values[f.name] = None
            continue
        if any(p is None for p in parts):
            raise ValueError(f"identities of one group must all have {f.name} or none")
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            raise ValueError(f"identities of one group need {f.name} of one shape (the same model, resolution "
                             f"and encoders), got {sorted({tuple(p.shape[1:]) for p in parts})}")
        values[f.name] = torch.cat(parts)
    sizes = [d.num_images for d in datas]
    return TrainingData(**values), [sum(sizes[:i]) for i in range(len(sizes))]


class GroupMapper:
    """Routes each identity's slice of a group batch to its own mapper: (B,) timesteps and (B, E) CLIP
    embeddings -> ((B, V, D) embeddings, (B, V, C) residuals), slice i from mappers[i]."""

    def __init__(self, mappers, slices: list[slice]):
        self.mappers, self.slices = list(mappers), list(slices)

    def __call__(self, timesteps: torch.Tensor, image_embeds: torch.Tensor):
        outputs = [mapper(timesteps[s], image_embeds[s]) for mapper, s in zip(self.mappers, self.slices)]
        return concat([e for e, _ in outputs]), concat([r for _, r in outputs])


@dataclass
class GroupStepLosses:
    """The losses of one group step: `total` (what backward runs on) and each identity's."""

    total: torch.Tensor  # Σ over identities of each one's total
    members: list[StepLosses]


@dataclass
class Member:
    """One identity in a run of the loop (`GroupTrainer.run`) and where it stands."""

    index: int  # its trainer's place in the group
    trainer: Trainer
    name: str | None  # how messages name it (None: a trainer alone, whose messages name no one)
    phase: str  # warm-up, train, done, failed
    until: int  # the step count its training ends at
    warmup_done: int = 0  # warm-up steps taken (the trainer's step_count counts the training steps)
    pending: list = field(default_factory=list)  # loss tensors not read back yet
    checkpoint_dir: Path | None = None  # where its checkpoints go (None: none are written)
    job: dict | None = None  # what its checkpoints record besides the trainer (`Trainer.save_checkpoint`)

    @property
    def window(self) -> tuple[int, int] | None:
        if self.phase == "warm-up":
            return (0, self.trainer.num_train_timesteps)
        return self.trainer.stage_window


class GroupTrainer:
    """Trains one or several `Trainer`s (one per identity, on one base model) in shared steps. Use as a
    context manager, like a Trainer (entering installs the group objective's hooks; leaving removes them):

        trainers = [Trainer(base, data_i, config_i, identity_encoder) for ...]
        with GroupTrainer(trainers, names) as group:
            errors = group.train(progress=...)
        concepts = [t.concept(...) for t in trainers]

    Do not enter the member trainers: their own hooks go on only while each captures its attention. A
    group of one runs its trainer's own objective (a `Trainer` trains itself as one).
    """

    def __init__(self, trainers: list[Trainer], names: list[str | None] | None = None):
        if not trainers:
            raise ValueError("a group needs at least one trainer")
        first = trainers[0]
        for trainer in trainers[1:]:
            if trainer.base is not first.base:
                raise ValueError("the trainers of a group must share one base model")
            if group_key(trainer.config) != group_key(first.config):
                differ = [n for n in SHARED_FIELDS if getattr(trainer.config, n) != getattr(first.config, n)]
                raise ValueError(f"the trainers of a group must agree on {', '.join(differ)}")
            if trainer.tokens.ids != first.tokens.ids:
                raise ValueError("the trainers of a group must use the same placeholder tokens")
            if trainer.identity_encoder is not first.identity_encoder:
                raise ValueError("the trainers of a group must share one identity encoder")
            if trainer.objective.photomaker is not first.objective.photomaker:
                raise ValueError("the trainers of a group must share one PhotoMaker")
        self.trainers = list(trainers)
        self.names = list(names) if names is not None else [f"identity {i}" for i in range(len(trainers))]
        self.base, self.device, self.config = first.base, first.device, first.config
        if len(trainers) == 1:
            self.data, self.first_images, self.objective = first.data, [0], first.objective
        else:
            self.data, self.first_images = concatenate_data([t.data for t in trainers])
            self.objective = Objective(self.base, self.data, first.config, first.tokens.ids, first.identity_encoder,
                                       first.objective.photomaker)
        self.id_patches = [self._global_patches(t, start) for t, start in zip(trainers, self.first_images)]
        c = self.config
        self.use_graph = (
            c.optimize and c.cuda_graph and self.device.type == "cuda"
            and c.gradient_accumulation_steps == 1 and not c.gradient_checkpointing
        )
        self.graphed: GraphedStep | None = None
        self._graph_key: tuple | None = None

    def _global_patches(self, trainer: Trainer, start: int):
        """The trainer's own face patches with rows at its photos' places in the group's photos."""
        if trainer.objective.id_patches is None or trainer.objective is self.objective:
            return trainer.objective.id_patches
        indices, size, thetas = trainer.objective.id_patches
        n, total = indices.shape[0], self.data.num_images
        full_indices = indices.new_zeros(total, indices.shape[1])
        full_indices[start : start + n] = indices
        full_thetas = thetas.new_zeros(total, *thetas.shape[1:])
        full_thetas[start : start + n] = thetas
        return full_indices, size, full_thetas

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "GroupTrainer":
        self.objective.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._drop_graph()
        self.objective.__exit__(*exc)

    @property
    def sync_interval(self) -> int:
        """Steps between loss read-backs: every step on the plain path, `sync_every` when optimized."""
        return self.config.sync_every if self.config.optimize else 1

    # -- one step ----------------------------------------------------------------------------------

    def losses(self, indices: list[int], batch: Batch, slices: list[slice]) -> GroupStepLosses:
        """The loss terms of trainers `indices`, each on its slice of `batch` (differentiable w.r.t. the mappers)."""
        mapper = GroupMapper([self.trainers[i].mapper for i in indices], slices)
        outs = self.objective.losses(mapper, batch, slices, [self.id_patches[i] for i in indices])
        return GroupStepLosses(sum(out.total for out in outs), outs)

    def _concatenate(self, indices: list[int], batches: list[Batch]) -> tuple[Batch, list[slice]]:
        """One batch of the trainers' batches, image indices offset into the group's photos."""
        joined = {f.name: concat([getattr(b, f.name) for b in batches]) for f in fields(Batch)}
        offsets = [self.first_images[i] for i in indices]
        joined["image_index"] = concat([b.image_index + offset for b, offset in zip(batches, offsets)])
        ends = [sum(b.size for b in batches[: i + 1]) for i in range(len(batches))]
        return Batch(**joined), [slice(end - b.size, end) for end, b in zip(ends, batches)]

    def optimize_step(self, indices: list[int], windows: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Trainers `indices` each draw a batch with t in their window (windows[i]) from their own generator,
        then one shared forward and backward, then each optimizer steps; returns each one's loss terms as
        (device) tensors, without reading them back."""
        trainers = [self.trainers[i] for i in indices]
        batches = [t.sample_batch(window) for t, window in zip(trainers, windows)]
        if self.use_graph and self._graph_key != tuple(indices):
            self._capture_graph(indices, windows)
        if self.use_graph:
            batch, _ = self._concatenate(indices, batches)
            outs = self.graphed.step(batch).members
        else:
            for t in trainers:
                t.optimizer.zero_grad(set_to_none=True)
            accumulation = self.config.gradient_accumulation_steps
            sums = [(0.0, {}) for _ in trainers]
            parts = [split_batch(b, accumulation) for b in batches]
            for micro in zip(*parts):  # micro-batch j of every trainer
                batch, slices = self._concatenate(indices, list(micro))
                out = self.losses(indices, batch, slices)
                (out.total / accumulation).backward()
                for i, member_out in enumerate(out.members):
                    total, terms = sums[i]
                    for k, v in member_out.terms.items():
                        terms[k] = terms.get(k, 0.0) + v.detach() / accumulation
                    sums[i] = (total + member_out.total.detach() / accumulation, terms)
            outs = [StepLosses(total, terms) for total, terms in sums]
        for t in trainers:
            t.optimizer.step()
        # Copies: a graph replay overwrites its outputs, and these are read back steps later.
        return [{"loss": o.total.detach().clone(), **{k: v.detach().clone() for k, v in o.terms.items()}}
                for o in outs]

    def _capture_graph(self, indices: list[int], windows: list[tuple[int, int]]) -> None:
        # The capture runs on batches from generators of their own: the training draws stay the same
        # sequence whichever path trains.
        self._drop_graph()
        example = [self.trainers[i].sample_batch(w, torch.Generator(self.device).manual_seed(0))
                   for i, w in zip(indices, windows)]
        batch, slices = self._concatenate(indices, example)
        parameters = [p for i in indices for p in self.trainers[i].mapper.parameters()]
        try:
            self.graphed = GraphedStep(lambda b: self.losses(indices, b, slices), batch, parameters)
            self._graph_key = tuple(indices)
        except RuntimeError as err:  # a capture-unsafe op in some library version: run eagerly
            logger.warning("CUDA graph capture failed (%s); training without it", str(err).splitlines()[0])
            self.use_graph = False
            for p in parameters:
                p.grad = None

    def _drop_graph(self) -> None:
        """Forget the captured step (its trainers changed); the gradients it owned go with it."""
        if self.graphed is not None:
            for p in self.graphed.parameters:
                p.grad = None
        self.graphed, self._graph_key = None, None

    def step(self) -> list[dict[str, float]]:
        """One step of every trainer in its dynamic stage (all need a stage window); returns each one's loss
        terms as floats, checked."""
        for t in self.trainers:
            t.step_count += 1
        logs = self.optimize_step(list(range(len(self.trainers))), [t.stage_window for t in self.trainers])
        return [read_losses(out, f"step {t.step_count}", name) for t, out, name in zip(self.trainers, logs, self.names)]

    # -- the loop ----------------------------------------------------------------------------------

    def train(self, progress=None, checkpoint_dirs: list[Path | None] | None = None,
              jobs: list[dict | None] | None = None) -> dict[int, PersonaMagicError]:
        """Run every trainer as `Trainer.find_stage_window` + `Trainer.train` would alone: the warm-up and
        partition if it has no stage window yet, then training until its `max_train_steps`, with a
        checkpoint (recording jobs[i]) in checkpoint_dirs[i] every `checkpoint_every` steps.

        progress(i, step, total, logs, phase) is called for every step of trainer i, phase "warm-up" or
        "train" (in bursts of `sync_every` on the optimised path). Returns the trainers that failed (their
        loss diverged, their partition failed) as {index: PersonaMagicError naming the identity}; the others
        finish.
        """
        dirs, jobs = checkpoint_dirs or [None] * len(self.trainers), jobs or [None] * len(self.trainers)
        members = [self.member(i, t.config.max_train_steps, checkpoint_dir=folder, job=job)
                   for i, (t, folder, job) in enumerate(zip(self.trainers, dirs, jobs))]
        errors: dict[int, PersonaMagicError] = {}
        self.run(members, progress, errors)
        return errors

    def member(self, index: int, until: int, warm_up: bool | None = None, checkpoint_dir: Path | None = None,
               job: dict | None = None) -> Member:
        """Trainer `index` as a run starts it: warming up (`warm_up`; None: when it has no stage window yet),
        else training until step `until`, or done."""
        trainer = self.trainers[index]
        warm_up = trainer.stage_window is None if warm_up is None else warm_up
        phase = "warm-up" if warm_up else "train" if trainer.step_count < until else "done"
        return Member(index, trainer, self.names[index], phase, until, checkpoint_dir=checkpoint_dir, job=job)

    def run(self, members: list[Member], progress=None, errors: dict | None = None) -> None:
        """Step `members` together until each is done: a warm-up ends in its partition, then it trains until
        its `until`; progress(i, step, total, logs, phase) as in `train`. errors: where a member's failure goes
        as {index: PersonaMagicError naming it}, the others going on (None: raised as it is, the run stops)."""
        while True:
            self._partition_ready(members, errors)
            active = [m for m in members if m.phase in ("warm-up", "train")]
            if not active:
                return
            for m in active:
                if m.phase == "train":
                    m.trainer.step_count += 1
                else:
                    m.warmup_done += 1
            for m, logs in zip(active, self.optimize_step([m.index for m in active], [m.window for m in active])):
                m.pending.append(logs)
                try:
                    self._after_step(m, progress)
                except PersonaMagicError as err:
                    self._fail(m, err, errors)

    def _after_step(self, m: Member, progress) -> None:
        """Read back, check and report when due; checkpoint; end the member's training at its `until`."""
        trainer, every = m.trainer, m.trainer.config.checkpoint_every
        report = None if progress is None else (lambda j, n, logs: progress(m.index, j, n, logs, m.phase))
        if m.phase == "warm-up":
            k, total = m.warmup_done, trainer.config.warmup_steps
            if k % self.sync_interval == 0 or k == total:
                self._read_back(m, k, total, "warm-up step", report)
            return
        step, total = trainer.step_count, m.until
        checkpoint_due = m.checkpoint_dir is not None and every and step % every == 0 and step < total
        if step % self.sync_interval == 0 or step == total or checkpoint_due:
            self._read_back(m, step, total, "step", report)
        if checkpoint_due:
            trainer.save_checkpoint(m.checkpoint_dir / checkpoints.checkpoint_name(step), m.job)
            checkpoints.remove_older_checkpoints(m.checkpoint_dir, keep=step)
        if step >= total:
            m.phase = "done"

    def _read_back(self, m: Member, last: int, total: int, label: str, report) -> None:
        """Read back the member's losses of the steps that ended at step `last`, check each (naming it `label`
        and its number), and report each to `report(step, total, logs)`."""
        pending, m.pending = m.pending, []
        for j, logs in enumerate(pending, start=last - len(pending) + 1):
            values = read_losses(logs, f"{label} {j}", m.name)
            if report is not None:
                report(j, total, values)

    def _partition_ready(self, members: list[Member], errors: dict | None) -> None:
        """Capture and partition every member whose warm-up just ended, each with its own hooks on."""
        ready = [m for m in members if m.phase == "warm-up" and m.warmup_done >= m.trainer.config.warmup_steps]
        if not ready:
            return
        alone = len(self.trainers) == 1  # then the group's objective is the trainer's: its hooks are on
        if not alone:
            self._drop_graph()  # the group's hooks come off: capture the step again afterwards
            self.objective.__exit__(None, None, None)
        try:
            for m in ready:
                try:
                    with nullcontext() if alone else m.trainer.objective:
                        m.trainer.partition_after_warmup()
                except PartitionError as err:  # e.g. an empty mask, NaN attention maps: this identity's alone
                    self._fail(m, PersonaMagicError(f"the stage partition failed: {err}"), errors)
                    continue
                except PersonaMagicError as err:
                    self._fail(m, err, errors)
                    continue
                m.phase = "done" if m.trainer.step_count >= m.until else "train"
        finally:
            if not alone:
                self.objective.__enter__()

    def _fail(self, m: Member, err: PersonaMagicError, errors: dict | None) -> None:
        """Record the member's failure in `errors` and drop it from the run (errors None: raise it)."""
        if errors is None:
            raise err
        message = str(err) if str(err).startswith(f"{m.name}: ") else f"{m.name}: {err}"
        logger.warning("%s; the other identities go on", message)
        errors[m.index] = type(err)(message)
        m.phase, m.pending = "failed", []
        for p in m.trainer.mapper.parameters():
            p.grad = None
