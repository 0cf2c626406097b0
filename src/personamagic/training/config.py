"""`TrainConfig`: every hyper-parameter of one concept's training, with its default and where it comes from."""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass

from ..errors import SettingsError
from ..models.devices import check_compile_backend

DEFAULT_PARTITION_WARMUP_STEPS = 100  # docs/method.md
SEED_LIMIT = 2**63  # every seed the project takes lies in [0, 2**63), a signed 64-bit integer (train, generate)


def derived_seed(seed: int, stream: int) -> int:
    """The seed of a side stream of random numbers (`stream` >= 1) derived from the user's `seed`.

    It wraps modulo SEED_LIMIT so that it stays in the range of every seed the project takes, whatever
    seed `train` accepted: a plain `seed + stream` left it for the largest ones."""
    return (seed + stream) % SEED_LIMIT


@dataclass
class TrainConfig:
    """Hyper-parameters of one concept's training. Defaults follow the paper (appendix) and docs/method.md."""

    placeholder: str = "S*"  # text standing for the concept in prompts
    supercategory: str = "face"  # single-token word: static stage 1 uses it, the mapper starts from it
    num_vectors: int = 1  # token positions S* expands to (docs/method.md; paper: 1, authors' code: 4)
    train_prompt: str = "a photo of {}"  # training prompt, {} = placeholder (paper, Fig. 2)
    # optimizer steps (paper: 1000 iterations); 0 with a stage_window: the untrained concept, exactly the
    # supercategory word (the zero-shot baselines of the plug-in study)
    max_train_steps: int = 1000
    train_batch_size: int = 2  # samples per step (paper: 2)
    learning_rate: float = 5e-5  # AdamW learning rate (paper: 5e-5)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0.01)
    adam_beta1: float = 0.9  # AdamW β1 (paper)
    adam_beta2: float = 0.999  # AdamW β2 (paper)
    adam_epsilon: float = 1e-8  # AdamW ε (PyTorch default)
    seed: int = 0  # seeds the training generator: same seed, same device -> same concept
    stage_window: tuple[int, int] | None = None  # (t_lo, t_hi) dynamic stage; None = find it (docs/method.md)
    lambda1: float = 0.7  # relative-IoU threshold that ends static stage 1 (paper, Table 2)
    lambda2: float = 0.8  # relative-IoU threshold above which static stage 2 begins (paper, Table 2)
    # full-schedule steps before the attention capture (docs/method.md: 100); None: 100, or max_train_steps
    # if fewer, so that a short run is not mostly warm-up
    partition_warmup_steps: int | None = None
    partition_timesteps: int = 50  # sampling-grid timesteps probed by the capture (50 DDIM steps)
    # attention maps are averaged on this grid; None: the model family's (16x16 on SD-1.x)
    partition_resolution: int | None = None
    min_dynamic_fraction: float = 0.2  # narrower dynamic stages are widened to this share of T
    restart_after_partition: bool = False  # True: mapper back to its initial weights after the warm-up
    # (measured on the tiny model: continuing reaches a lower in-window loss, benchmarks/partition_restart.py)
    te_weight: float = 1e-3  # w_te, weight of the tandem-equilibrium loss (authors' code)
    te_temperature: float = 100.0  # τ of the TE softmax (authors' code)
    # with several text encoders (SDXL): the weight of each encoder's TE term, in the encoders' order;
    # None: equal weights summing to 1, so w_te keeps its meaning
    te_encoder_weights: tuple[float, ...] | None = None
    id_weight: float = 1.0  # w_id, weight of the identity loss (docs/method.md)
    use_id_loss: bool = True  # identity loss on (needs an identity encoder; off for non-face concepts)
    bypass_drop: float = 0.5  # probability of zeroing the value residual per sample (NeTI, docs/method.md)
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (0 = never)
    mapper_hidden_dim: int = 128  # width of the mapper's MLPs (authors' code: 128)
    time_frequencies: int = 64  # sinusoid frequencies of the mapper's timestep encoding
    mapper_time_dependent: bool = True  # False: one embedding for all t (textual-inversion ablation)
    mapper_residual: bool = True  # False: no value residual (ablation)
    optimize: bool = True  # speed-ups (training/graph.py, face_patches.py); False = the plain reference step, every speed-up off
    cuda_graph: bool = True  # with optimize on CUDA: replay each step from a captured CUDA graph
    id_face_patch: bool = True  # with optimize: decode only the latent patch under the face for L_id
    id_patch_margin: int = 2  # latent pixels added around the aligned face crop's footprint
    sync_every: int = 10  # with optimize: steps between loss read-backs (progress, NaN check)
    compile: bool = False  # with optimize: torch.compile the UNet, VAE decoder and identity net (1st step compiles)
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces without code generation
    gradient_accumulation_steps: int = 1  # low-memory mode: the batch runs as this many micro-batches
    gradient_checkpointing: bool = False  # low-memory mode: recompute UNet activations in backward

    def __post_init__(self):
        if isinstance(self.stage_window, list):
            self.stage_window = tuple(self.stage_window)
        if isinstance(self.te_encoder_weights, list):
            self.te_encoder_weights = tuple(self.te_encoder_weights)
        if self.max_train_steps == 0 and self.stage_window is None:
            raise SettingsError("max_train_steps 0 (an untrained concept: the supercategory word) needs a stage_window")
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise SettingsError(f"seed (--seed) must be a whole number from 0 to {SEED_LIMIT - 1}, got {self.seed}")
        if not isinstance(self.max_train_steps, int) or self.max_train_steps < 0:
            raise SettingsError(f"max_train_steps must be >= 0, got {self.max_train_steps}")
        positive = ("num_vectors", "train_batch_size", "mapper_hidden_dim", "time_frequencies",
                    "partition_timesteps", "partition_resolution", "sync_every", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "te_temperature"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "te_weight", "id_weight", "checkpoint_every", "partition_warmup_steps",
                     "id_patch_margin"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "bypass_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingsError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise SettingsError(
                f"train_batch_size {self.train_batch_size} must be a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )
        if not 0 <= self.lambda1 <= self.lambda2 <= 1:
            raise SettingsError(f"need 0 <= lambda1 <= lambda2 <= 1, got {self.lambda1}, {self.lambda2}")
        if not 0 < self.min_dynamic_fraction <= 1:
            raise SettingsError(f"min_dynamic_fraction must be in (0, 1], got {self.min_dynamic_fraction}")
        fields = [name for _, name, _, _ in string.Formatter().parse(self.train_prompt) if name is not None]
        if fields != [""]:
            raise SettingsError(f"train_prompt must contain {{}} exactly once, where the placeholder goes (and no "
                                f"other braces), got {self.train_prompt!r}")
        if not self.placeholder.strip() or self.placeholder.strip() != self.placeholder:
            raise SettingsError("placeholder must be non-empty text without surrounding spaces, got "
                                f"{self.placeholder!r}")
        if not re.fullmatch(r"[\w'-]+", self.supercategory):
            raise SettingsError(f"supercategory must be a single word (face, person, cat, painting...), "
                                f"got {self.supercategory!r}")
        if self.stage_window is not None:
            lo, hi = self.stage_window
            if not 0 <= lo < hi:
                raise SettingsError(f"stage_window must be LO:HI with 0 <= LO < HI, got {lo}:{hi}")
        if self.compile:
            check_compile_backend(self.compile_backend)

    @property
    def warmup_steps(self) -> int:
        """The partition warm-up's length: `partition_warmup_steps`, by default 100 or fewer (see there)."""
        if self.partition_warmup_steps is not None:
            return self.partition_warmup_steps
        return min(DEFAULT_PARTITION_WARMUP_STEPS, self.max_train_steps)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stage_window"] = list(self.stage_window) if self.stage_window is not None else None
        out["te_encoder_weights"] = list(self.te_encoder_weights) if self.te_encoder_weights is not None else None
        return out
