"""Old import path of the `train` job, kept for existing code: see `personamagic.jobs.personalize`."""

from .jobs.personalize import PersonalizeResult, personalize

__all__ = ["PersonalizeResult", "personalize"]
