"""The parts `personamagic bench` can measure, and its default set: here, without torch, so that
`personamagic bench --help` can list them instantly."""

SECTIONS = ("steps", "personalize", "generation", "variants", "equivalence", "compile", "throughput", "sdxl")
DEFAULT_SECTIONS = ("steps", "personalize", "generation", "variants", "equivalence", "throughput")
