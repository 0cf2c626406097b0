"""Stage regulation (docs/method.md, paper Fig. 2): find the dynamic stage from where S*'s attention lands.

After a short warm-up over the whole schedule, the UNet is run once per timestep of the sampling grid
on the noised training latent with the prompt "a photo of S*"; the cross-attention probabilities of
S* are averaged over heads, layers and S* vectors into one map per timestep, min-max normalised, and
compared with the face mask (IoU of map > 0.5). The relative, smoothed IoU curve is cut by two
thresholds scanning from large t down:

    static 1: r_t < λ1          -> S* = the supercategory word
    dynamic:  then while r_t <= λ2 -> S* = mapper(t), trained
    static 2: the rest          -> S* = mapper(t_lo), frozen

The pure functions (`attention_iou`, `partition_stages`) take plain arrays;
`training.partition.capture_attention` runs the UNet with probability-recording processors that know their layer by name.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PersonaMagicError
from .attention import PersonaMagicAttnProcessor, attention_processors, is_cross_attention

logger = logging.getLogger(__name__)


class PartitionError(PersonaMagicError):
    """The IoU curve or the maps cannot be partitioned (NaN values, empty mask): the photo's mask or the
    run's settings are the cause, so the caller (and the command line) gets it as one of the package's
    errors."""


class Stage(str, Enum):
    """The three stages of S* along the schedule, in denoising order; the value is the stage's name in
    plots, messages and exported files."""

    STATIC_1 = "static 1"
    DYNAMIC = "dynamic"
    STATIC_2 = "static 2"

    def __str__(self) -> str:
        return self.value


class StageWindow(tuple):
    """The dynamic stage t_lo <= t < t_hi of a schedule of T training timesteps (docs/method.md), as the pair
    (t_lo, t_hi), with the stage table every part of PersonaMagic reads:

    | stage    | t range          | S*                        |
    |----------|------------------|---------------------------|
    | static 1 | t >= t_hi        | the supercategory word    |
    | dynamic  | t_lo <= t < t_hi | mapper(t), trained        |
    | static 2 | t < t_lo         | mapper(t_lo), frozen      |

    Always 0 <= t_lo < t_hi <= T; it unpacks and compares like the tuple (t_lo, t_hi).
    """

    def __new__(cls, lo, hi, num_train_timesteps: int = 1000):
        if isinstance(lo, bool) or isinstance(hi, bool) or not all(isinstance(v, (int, np.integer)) for v in (lo, hi)):
            raise ValueError(f"a stage window is two whole timesteps LO:HI, got {lo!r}:{hi!r}")
        lo, hi, T = int(lo), int(hi), int(num_train_timesteps)
        if not 0 <= lo < hi <= T:
            raise ValueError(f"a stage window needs 0 <= LO < HI <= {T} (the schedule's timesteps), got {lo}:{hi}")
        window = super().__new__(cls, (lo, hi))
        window.num_train_timesteps = T
        return window

    @property
    def lo(self) -> int:
        return self[0]

    @property
    def hi(self) -> int:
        return self[1]

    def stage(self, t: int) -> Stage:
        """The stage timestep t is in."""
        return Stage.STATIC_1 if t >= self.hi else Stage.DYNAMIC if t >= self.lo else Stage.STATIC_2

    def mapper_timestep(self, t: int) -> int | None:
        """Where S* comes from at timestep t: None for the supercategory word (static 1), else the timestep
        the mapper is read at (t in the dynamic stage, t_lo in static 2)."""
        stage = self.stage(t)
        if stage == Stage.STATIC_1:
            return None
        return t if stage == Stage.DYNAMIC else self.lo

    def span(self, stage: Stage) -> tuple[int, int]:
        """(start, end): the timesteps start <= t < end of `stage` in [0, T); start == end where a window
        reaching T or 0 leaves that static stage empty."""
        return {Stage.STATIC_1: (self.hi, self.num_train_timesteps), Stage.DYNAMIC: (self.lo, self.hi),
                Stage.STATIC_2: (0, self.lo)}[Stage(stage)]

    @classmethod
    def from_partition(cls, partition: "StagePartition", num_train_timesteps: int,
                       min_dynamic_fraction: float = 0.2) -> "StageWindow":
        """The window a partition gives on the whole schedule: a dynamic stage that reaches the top (no
        static 1) or the bottom (no static 2) of the probed grid runs to T or to 0; then the minimum
        width (`min_dynamic_fraction`·T) is applied to that final window, widening it symmetrically
        inside [0, T] (`partition_stages` applied it on the grid already; the mapped ends can only make
        the stage wider, so this is a guard, not a second rule)."""
        T = num_train_timesteps
        hi = partition.t_hi if partition.has_static1 else T
        lo = partition.t_lo if partition.has_static2 else 0
        width = min(T, math.ceil(min_dynamic_fraction * T))
        if hi - lo < width:
            centre = (lo + hi) / 2
            lo = int(round(min(max(centre - width / 2, 0), T - width)))
            hi = lo + width
        return cls(lo, hi, T)

    def to_list(self) -> list[int]:
        return [self.lo, self.hi]


# --------------------------------------------------------------------------------------------------
# pure functions


def attention_iou(attention_map, mask, threshold: float = 0.5) -> float:
    """IoU of (min-max normalised `attention_map` > threshold) with (`mask` > 0.5).

    attention_map: (h, w) array/tensor; mask: (H, W), resized to (h, w) by area averaging when the
    sizes differ. A constant map selects nothing (IoU 0). NaN values or an all-zero mask raise
    PartitionError.
    """
    attention_map = torch.as_tensor(np.asarray(attention_map, dtype=np.float32))
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if attention_map.ndim != 2 or mask.ndim != 2:
        raise PartitionError(f"attention_iou expects 2-D map and mask, got {tuple(attention_map.shape)}, {tuple(mask.shape)}")
    if not torch.isfinite(attention_map).all():
        raise PartitionError("the attention map contains NaN or infinite values")
    if mask.shape != attention_map.shape:
        mask = F.interpolate(mask[None, None], size=attention_map.shape, mode="area")[0, 0]
    region = mask > 0.5
    if not region.any():
        raise PartitionError("the face mask is empty at the attention resolution; use a mask that covers the face")
    span = attention_map.max() - attention_map.min()
    if span <= 0:
        return 0.0
    selected = (attention_map - attention_map.min()) / span > threshold
    union = (selected | region).sum().item()
    return (selected & region).sum().item() / union


def smooth(values: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred moving average; at the ends the window shrinks to the available neighbours."""
    half = width // 2
    return np.array([values[max(0, i - half) : i + half + 1].mean() for i in range(len(values))])


@dataclass
class StagePartition:
    """The result of the partition's steps 4-5 (docs/method.md) on one IoU curve (arrays ordered from large t to small t)."""

    timesteps: list[int]  # the probed timesteps, descending
    iou: list[float]  # IoU_t
    relative_iou: list[float]  # r_t = IoU_t / max IoU, smoothed (width 3)
    lambda1: float
    lambda2: float
    t_lo: int  # dynamic stage: t_lo <= t < t_hi
    t_hi: int
    has_static1: bool  # False: the dynamic stage reaches the top of the schedule
    has_static2: bool  # False: the dynamic stage reaches the bottom
    widened: bool  # the min-width rule moved the boundaries
    flat: bool  # the curve carried no stage information (all-zero or constant IoU)

    @property
    def grid_window(self) -> tuple[int, int]:
        """(t_lo, t_hi) on the probed grid (`StageWindow.from_partition` maps it onto the whole schedule)."""
        return self.t_lo, self.t_hi

    def to_dict(self) -> dict:
        return asdict(self)


def partition_stages(
    timesteps,
    iou,
    lambda1: float = 0.7,
    lambda2: float = 0.8,
    *,
    min_dynamic_fraction: float = 0.2,
    num_train_timesteps: int = 1000,
) -> StagePartition:
    """Partition the schedule from an IoU curve (docs/method.md); the dynamic stage is `grid_window`.

    timesteps: (K,) in any order; iou: (K,) IoU_t at those timesteps. r_t = IoU_t / max IoU, smoothed
    with a width-3 moving average along t. Scanning from the largest t down, static 1 lasts while
    r_t < λ1, the dynamic stage while r_t <= λ2, the rest is static 2. Boundaries are grid values with
    min(t) <= t_lo <= t_hi <= max(t): t_hi = the smallest timestep of static 1 (max(t) when there is
    none), t_lo = the smallest timestep of the dynamic stage (min(t) when there is no static 2). A
    dynamic stage narrower than `min_dynamic_fraction`·T is widened symmetrically; a flat curve gives
    the whole range (with a warning). NaN values raise PartitionError.
    """
    t = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    values = np.asarray(iou, dtype=np.float64).reshape(-1)
    if t.shape != values.shape or len(t) == 0:
        raise PartitionError(f"timesteps and iou must be non-empty and of equal length, got {len(t)} and {len(values)}")
    if not np.isfinite(values).all():
        raise PartitionError("the IoU curve contains NaN or infinite values")
    if not 0 <= lambda1 <= lambda2 <= 1:
        raise PartitionError(f"need 0 <= lambda1 <= lambda2 <= 1, got {lambda1}, {lambda2}")
    order = np.argsort(-t, kind="stable")
    t, values = t[order], values[order]

    flat = values.max() <= 0 or values.max() - values.min() <= 1e-9 * max(values.max(), 1e-12)
    if flat:
        # No stage information: the whole probed range is dynamic (the paper's "unpartitioned").
        logger.warning("the IoU curve is flat (max %.3g): no stage structure found; using the whole schedule",
                       values.max())
        relative = np.ones_like(values) if values.max() > 0 else np.zeros_like(values)
        return StagePartition(t.tolist(), values.tolist(), relative.tolist(), lambda1, lambda2,
                              int(t[-1]), int(t[0]), False, False, False, True)

    relative = smooth(values / values.max())
    i = 0
    while i < len(t) and relative[i] < lambda1:  # static 1
        i += 1
    j = i
    while j < len(t) and relative[j] <= lambda2:  # dynamic
        j += 1
    has_static1, has_static2 = i > 0, j < len(t)
    # Boundaries on the grid: static 1 starts at its smallest probed t; the dynamic stage ends at
    # its smallest probed t (everything below is static 2).
    t_hi = int(t[i - 1]) if has_static1 else int(t[0])
    t_lo = int(t[j - 1]) if j > i else t_hi

    widened = False
    min_width = min_dynamic_fraction * num_train_timesteps
    if t_hi - t_lo < min_width:
        low, high = int(t[-1]), int(t[0])
        width = min(min_width, high - low)
        center = (t_lo + t_hi) / 2
        new_lo = int(round(min(max(center - width / 2, low), high - width)))
        new_hi = int(round(new_lo + width))
        # Not a warning here: the caller reports the final window once (`StageWindow.from_partition`).
        logger.debug("dynamic stage %d:%d narrower than %.0f%% of the schedule; widened to %d:%d on the grid",
                     t_lo, t_hi, 100 * min_dynamic_fraction, new_lo, new_hi)
        t_lo, t_hi, widened = new_lo, new_hi, True
        # The widened stage may now leave room above or below it (or reach an end it did not).
        has_static1, has_static2 = t_hi < high, t_lo > low
    return StagePartition(t.tolist(), values.tolist(), relative.tolist(), lambda1, lambda2,
                          t_lo, t_hi, has_static1, has_static2, widened, False)


# --------------------------------------------------------------------------------------------------
# attention capture


class AttentionCaptureProcessor(PersonaMagicAttnProcessor):
    """Computes cross-attention with explicit (eager) probabilities and keeps the columns of the
    placeholder tokens, keyed by this layer's name. Used only during the capture pass."""

    def __init__(self, name: str, store: dict, columns: torch.Tensor):
        super().__init__(name)
        self.store = store  # name -> (B, N, V) probabilities of the placeholder columns
        self.columns = columns  # (V,) positions of S* in the prompt

    def attend(self, attn, query, key, value, attention_mask):
        if not is_cross_attention(self.name):
            return super().attend(attn, query, key, value, attention_mask)
        scores = query @ key.transpose(-1, -2) * attn.scale  # (B, H, N, d) x (B, H, d, L) -> (B, H, N, L)
        if attention_mask is not None:
            scores = scores + attention_mask
        probabilities = scores.float().softmax(dim=-1)
        self.store[self.name] = probabilities[..., self.columns].mean(dim=1)  # (B, H, N, V) -> (B, N, V)
        return probabilities.to(value.dtype) @ value  # (B, H, N, L) x (B, H, L, d) -> (B, H, N, d)


@contextlib.contextmanager
def capturing_attention(unet, columns: torch.Tensor):
    """Install capture processors on every layer (restored on exit, also on error); yields the store."""
    store: dict[str, torch.Tensor] = {}
    with attention_processors(unet, lambda name: AttentionCaptureProcessor(name, store, columns)):
        yield store


def average_maps(store: dict[str, torch.Tensor], resolution: int) -> torch.Tensor:
    """Layer maps {name: (B, N, V)} -> (B, r, r): mean over S* vectors, each layer resized to r x r,
    mean over layers, min-max normalised per sample."""
    maps = []
    for probabilities in store.values():
        B, N, _ = probabilities.shape
        side = math.isqrt(N)
        if side * side != N:
            raise PartitionError(f"cannot map {N} attention positions to a square grid")
        layer = probabilities.float().mean(dim=-1).view(B, 1, side, side)
        maps.append(F.interpolate(layer, size=(resolution, resolution), mode="bilinear", align_corners=False))
    if not maps:
        raise PartitionError("no cross-attention layer was captured")
    mean = torch.cat(maps, dim=1).mean(dim=1)  # (B, layers, r, r) -> (B, r, r)
    low = mean.flatten(1).min(dim=1).values[:, None, None]
    high = mean.flatten(1).max(dim=1).values[:, None, None]
    return (mean - low) / (high - low).clamp_min(1e-12)
