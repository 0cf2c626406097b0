"""PersonaMagic: stage-regulated face personalization of Stable Diffusion 1.x from one photo."""

__version__ = "0.1.0"
