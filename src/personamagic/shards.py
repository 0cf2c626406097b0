"""Which share of the work this process does, among the processes a launcher started (`accelerate
launch`, `torchrun`, MPI) or `--shard K/N`: used by `train-many` and by evaluation studies."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .errors import SettingsError


@dataclass(frozen=True)
class Shard:
    """Which process this is, among how many."""

    index: int = 0  # RANK
    count: int = 1  # WORLD_SIZE
    local_index: int = 0  # LOCAL_RANK: picks the GPU on a multi-GPU machine

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise SettingsError(f"process index {self.index} out of range for {self.count} processes")

    @classmethod
    def from_environment(cls) -> Shard:
        """From the variables `accelerate launch`/`torchrun` (RANK, WORLD_SIZE, LOCAL_RANK) or MPI set;
        a variable that is not a whole number, or a rank outside the world, is a SettingsError naming it."""
        used = {}

        def first(*names, default):
            for name in names:
                value = os.environ.get(name, "").strip()
                if value:
                    if not value.isdigit():
                        raise SettingsError(f"the environment variable {name}={value!r} is not a whole number; fix "
                                            "the launcher's settings, or unset it and pass --shard K/N")
                    used[name] = value
                    return int(value)
            return default

        index = first("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
        count = first("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
        local_index = first("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        if not 0 <= index < count:
            named = ", ".join(f"{name}={value}" for name, value in used.items())
            raise SettingsError(f"the launcher's environment ({named}) puts this process at index {index} of {count} "
                                "processes; fix the launcher's settings, or unset them and pass --shard K/N")
        return cls(index=index, count=count, local_index=local_index)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N`: process K of N (0-based), e.g. for job arrays without a launcher."""
        try:
            index, count = (int(part) for part in text.split("/"))
            return cls(index, count)
        except ValueError:
            raise SettingsError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}") from None

    def take(self, units: list) -> list:
        """This process's share: the units (anything with a `unit_id`), ordered by a hash of their ids,
        dealt round-robin.

        Counts differ by at most one between processes, and the hash order mixes methods, whose costs
        differ a lot (a plain round-robin over the planned order would give process k every k-th
        method when there are as many methods as processes).
        """
        order = sorted(units, key=lambda unit: hashlib.sha256(json.dumps(unit.unit_id).encode()).hexdigest())
        return order[self.index :: self.count]


def process_device(device: str, shard: Shard) -> str:
    """`auto`/`cuda` with several processes -> this process's GPU (LOCAL_RANK); anything else as given."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and shard.count > 1:
        return f"cuda:{shard.local_index % torch.cuda.device_count()}"
    return device
