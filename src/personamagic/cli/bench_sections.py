"""The parts `personamagic bench` can measure, what each measures, and its default set: here, without torch,
so that `personamagic bench --help` can list them instantly."""

# name -> what it measures. A step figure is the median ms of training steps at batch 2 with the identity
# loss on, each reading its losses back, after a first step timed apart; the plain step (every speed-up
# off, one identity) is always measured.
SECTIONS = {
    "steps": "the optimised training step of one identity",
    "personalize": "the whole train job in a fresh process, and its training loop",
    "generation": "sampling: one image and images/s per batch, the text conditioning, each part alone",
    "variants": "the optimised step with one speed-up or loss off, and the low-memory step",
    "equivalence": "the optimised step's losses and gradient against the plain step's, on one batch",
    "compile": "the training step and sampling with torch.compile",
    "throughput": "the optimised step of K = 1, 2, 4, 8 identities together, and identities/hour; K = 1 is the "
                  "'steps' step again, one identity alone being a group of one",
    "sdxl": "SDXL's optimised step and one image",
}
DEFAULT_SECTIONS = ("steps", "personalize", "generation", "variants", "equivalence", "throughput")
