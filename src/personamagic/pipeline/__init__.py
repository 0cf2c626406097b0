"""Sampling with concepts: the pipeline (`pipeline`), samplers by name (`schedulers`), the concepts'
stage tables (`concepts`), localized customization (`localized`), and the CUDA-graph UNet (`graph`)."""

from .concepts import LoadedConcept
from .pipeline import PersonaMagicPipeline, attach_concepts
from .schedulers import SCHEDULER_REQUIREMENTS, SCHEDULERS, make_scheduler, scheduler_choice

__all__ = ["LoadedConcept", "PersonaMagicPipeline", "SCHEDULERS", "SCHEDULER_REQUIREMENTS", "attach_concepts",
           "make_scheduler", "scheduler_choice"]
