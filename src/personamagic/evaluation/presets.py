"""Methods as presets of our own trainer (the paper's ablation rows), and ready-made studies.

A method preset is a set of `TrainConfig` overrides (plus the mask of the denoising loss). A study's
method entry names a preset and may override anything on top (`{"name": "l0.6", "preset":
"personamagic", "train": {"lambda1": 0.6, "lambda2": 1.0}}`). The whole schedule is (0, 1000): the
SD-1.x schedule has T = 1000 timesteps, so no timestep falls in a static stage.

| preset              | S* embedding            | dynamic stage         | TE loss | identity loss | mask      |
|---------------------|-------------------------|-----------------------|---------|---------------|-----------|
| `textual-inversion` | one static vector       | whole schedule        | no      | no            | none      |
| `vanilla`           | mapper(t) + residual    | whole schedule        | no      | no            | face      |
| `+stage`            | mapper(t) + residual    | automatic (λ1, λ2)    | no      | no            | face      |
| `+te`               | mapper(t) + residual    | automatic (λ1, λ2)    | yes     | no            | face      |
| `personamagic`      | mapper(t) + residual    | automatic (λ1, λ2)    | yes     | yes           | face      |

`+te` adds TE on top of `+stage`. The paper's Table 1 may instead mean TE added to Vanilla alone
("integrating both strategies" is its last row); that reading is `{"preset": "vanilla", "train":
{"te_weight": 0.001}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import DEFAULT_BASE_MODEL, WORLD_RECIPE
from ..prompts import EVALUATION_PROMPTS, WORLD_EDITING_PROMPTS

WHOLE_SCHEDULE = (0, 1000)


@dataclass(frozen=True)
class MethodPreset:
    """One row of an ablation: how our trainer is configured to be that method."""

    description: str  # one line for tables and --help
    train: dict = field(default_factory=dict)  # TrainConfig overrides that define the method
    mask: str | None = None  # personalize(mask=...): None = its default (CLIPSeg, landmarks on tiny)
    paper: tuple[str, str] | None = None  # (table, row) of the paper's published numbers for it
    # a plug-in for training and sampling: {"ip_adapter": weights, "scale": x} or {"photomaker": weights}
    plugin: dict | None = None
    # what samples the images: "personamagic" (the project's pipeline: mapper and residual) or
    # "diffusers-textual-inversion" (the concept's `personamagic export` file in diffusers' own
    # StableDiffusionPipeline, what a user of A1111 or ComfyUI gets)
    sampler: str = "personamagic"
    concept_of: str | None = None  # the study method whose concepts it samples (it trains none of its own)
    # "attributes": the placeholder is followed, in the sampled prompt, by the words of the person's
    # nameable attributes ("with long red hair with blue eyes"; world datasets only; scored on the plain prompt)
    subject: str | None = None


METHOD_PRESETS: dict[str, MethodPreset] = {
    "textual-inversion": MethodPreset(
        "one static embedding over the whole schedule, unmasked loss (Textual Inversion in our trainer)",
        {"mapper_time_dependent": False, "mapper_residual": False, "stage_window": WHOLE_SCHEDULE,
         "te_weight": 0.0, "use_id_loss": False},
        mask="none",
        paper=("table6", "Textual Inversion"),
    ),
    "vanilla": MethodPreset(
        "dynamic embeddings over the whole schedule, no TE, no identity loss",
        {"stage_window": WHOLE_SCHEDULE, "te_weight": 0.0, "use_id_loss": False},
        paper=("table1", "Vanilla"),
    ),
    "+stage": MethodPreset(
        "vanilla + automatic stage partition",
        {"stage_window": None, "te_weight": 0.0, "use_id_loss": False},
        paper=("table1", "+Stage Regulation"),
    ),
    "+te": MethodPreset(
        "+stage + tandem-equilibrium loss",
        {"stage_window": None, "use_id_loss": False},
        paper=("table1", "+Tandem Equilibrium"),
    ),
    "personamagic": MethodPreset(
        "full method: stage partition + TE loss + identity loss",
        {"stage_window": None},
        paper=("table6", "PersonaMagic"),
    ),
}

# Table 3: PersonaMagic as a plug-in of two zero-shot tools, on SDXL. The zero-shot rows use the untrained
# concept (S* is exactly the supercategory word, no training), so they are each tool alone with that class
# word; the "w/ ours" rows train the full method with the tool plugged in, as the paper did.
IP_ADAPTER_SDXL = {"ip_adapter": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", "scale": 1.0}
PHOTOMAKER = {"photomaker": "TencentARC/PhotoMaker"}
_UNTRAINED = {"max_train_steps": 0, "stage_window": WHOLE_SCHEDULE, "te_weight": 0.0, "use_id_loss": False}
METHOD_PRESETS.update({
    "photomaker": MethodPreset("PhotoMaker v1 alone: its ID fused into the supercategory word (no training)",
                               dict(_UNTRAINED), mask="none", paper=("table3", "PhotoMaker"), plugin=PHOTOMAKER),
    "photomaker+ours": MethodPreset("full method trained with PhotoMaker plugged in, S* as its class word",
                                    {"stage_window": None}, paper=("table3", "PhotoMaker w/ ours"), plugin=PHOTOMAKER),
    "ip-adapter": MethodPreset("IP-Adapter (SDXL) alone, the prompt's S* the supercategory word (no training)",
                               dict(_UNTRAINED), mask="none", paper=("table3", "IP-Adapter"), plugin=IP_ADAPTER_SDXL),
    "ip-adapter+ours": MethodPreset("full method trained with the IP-Adapter plugged in",
                                    {"stage_window": None}, paper=("table3", "IP-Adapter w/ ours"),
                                    plugin=IP_ADAPTER_SDXL),
})

# Baselines without training of their own (the untrained concept: S* is exactly the supercategory word).
METHOD_PRESETS.update({
    "supercategory": MethodPreset("the supercategory word alone (untrained concept; a lower bound)",
                                  dict(_UNTRAINED), mask="none"),
    "attributes": MethodPreset("the supercategory word followed by the person's attributes in words (no training; "
                               "world datasets)", dict(_UNTRAINED), mask="none", subject="attributes"),
    "textual-inversion-export": MethodPreset(
        "the personamagic concept exported as one textual-inversion embedding, sampled by diffusers' own "
        "StableDiffusionPipeline (what A1111 and ComfyUI get)",
        sampler="diffusers-textual-inversion", concept_of="personamagic"),
})
SAMPLERS = ("personamagic", "diffusers-textual-inversion")

# Table 2's (lambda1, lambda2) grid, as method entries on top of the full method.
TABLE2_METHODS = [
    {"name": f"l1={l1}-l2={l2}", "preset": "personamagic", "train": {"lambda1": l1, "lambda2": l2},
     "paper": ["table2", [l1, l2]]}
    for l1, l2 in [(0.5, 1.0), (0.6, 1.0), (0.7, 1.0), (0.8, 1.0), (0.7, 0.9), (0.7, 0.8)]
]

# The paper's datasets (identities folders relative to --data-root; recipes in docs/evaluation.md).
CELEBA_HQ = {"name": "CelebA-HQ", "identities": "celeba-hq", "layout": "files", "mode": "one-shot",
             "max_identities": 100, "repeats": 5}
FFHQ = {"name": "FFHQ", "identities": "ffhq", "layout": "files", "mode": "one-shot",
        "max_identities": 100, "repeats": 5}
LFW = {"name": "LFW", "identities": "lfw", "layout": "folders", "mode": "few-shot",
       "max_identities": 100, "min_photos": 2, "max_photos": 5, "repeats": 1}

NON_CELEBRITIES = {"name": "non-celebrities", "identities": "non-celebrities", "layout": "files", "mode": "one-shot",
                   "max_identities": 25, "repeats": 1}

# The learning world: held-out people of the world's renderer (one reference photo; three for few-shot)
WORLD_ONE_SHOT = {"name": "world one-shot", "identities": "world-people/one-shot", "layout": "world",
                  "mode": "one-shot", "max_identities": 6}
WORLD_FEW_SHOT = {"name": "world few-shot", "identities": "world-people/few-shot", "layout": "world",
                  "mode": "few-shot", "max_identities": 3, "max_photos": 3, "first_person": 6}
WORLD_METHODS = [
    "personamagic",
    {"name": "personamagic 400-800", "preset": "personamagic", "train": {"stage_window": [400, 800]}},
    {"name": "no stages (vanilla)", "preset": "vanilla"},
    "textual-inversion",
    {"name": "w/o TE loss", "preset": "personamagic", "train": {"te_weight": 0.0}},
    {"name": "w/o identity loss", "preset": "personamagic", "train": {"use_id_loss": False}},
    {"name": "w/o residual", "preset": "personamagic", "train": {"mapper_residual": False}},
    "supercategory",
    "attributes",
    "textual-inversion-export",
]
_WORLD_SETTINGS = {
    "model": "world",
    "prompts": [p.format("S*") for p in WORLD_EDITING_PROMPTS],
    "seeds": [0, 1, 2, 3],
    "train": {**WORLD_RECIPE, "checkpoint_every": 0},
    "generate": {"num_inference_steps": 25, "guidance_scale": 8.0},  # DDIM 25 (the paper: 50) to fit 45 minutes
    "clip_model": "world",
    "face_model": "world",
    "device": "cpu",
    "plot_text_metric": "t_sim",
    "plot_identity_convention": "zero",
}

_PAPER_SETTINGS = {
    "model": DEFAULT_BASE_MODEL,  # SD 1.4, the paper's
    "prompts": list(EVALUATION_PROMPTS),
    "seeds": [0, 1, 2, 3],  # four samples per prompt (paper)
    # the paper's identity loss is ArcFace; its weights are non-commercial and downloaded from the hub
    "identity_model": "arcface-r100",
    "train": {"checkpoint_every": 200},  # a crash loses at most 200 steps of one concept
}

STUDY_PRESETS: dict[str, dict] = {
    "table6": {**_PAPER_SETTINGS, "datasets": [CELEBA_HQ, FFHQ, LFW], "methods": ["textual-inversion", "personamagic"]},
    "table1": {**_PAPER_SETTINGS, "datasets": [CELEBA_HQ, LFW],
               "methods": ["vanilla", "+stage", "+te", "personamagic"]},
    "table2": {**_PAPER_SETTINGS, "datasets": [CELEBA_HQ], "methods": TABLE2_METHODS},
    # 25 people unseen by PhotoMaker and IP-Adapter (the paper's own collection is not published: bring
    # yours, one photo each, under non-celebrities/); SDXL, as PhotoMaker needs
    "table3": {**_PAPER_SETTINGS, "model": "stabilityai/stable-diffusion-xl-base-1.0",
               "datasets": [NON_CELEBRITIES],
               "methods": ["photomaker", "photomaker+ours", "ip-adapter", "ip-adapter+ours"]},
    # The paper's comparisons in the learning world (docs/evaluation.md): held-out people drawn by the
    # study itself, the world model, its judge as both metrics.
    "world": {**_WORLD_SETTINGS, "datasets": [WORLD_ONE_SHOT], "methods": WORLD_METHODS},
    "world-few-shot": {**_WORLD_SETTINGS, "datasets": [WORLD_FEW_SHOT], "methods": WORLD_METHODS},
    "world-table2": {**_WORLD_SETTINGS, "datasets": [WORLD_ONE_SHOT], "methods": TABLE2_METHODS},
    # The same in CI: one person, the full method against the supercategory word (about a minute)
    "world-mini": {**_WORLD_SETTINGS, "datasets": [{**WORLD_ONE_SHOT, "max_identities": 1, "first_person": 1}],
                   "methods": ["personamagic", "supercategory"], "seeds": [0, 1]},
    # The harness end to end on the offline tiny model in about a minute on a CPU (noise images: no faces).
    "tiny-demo": {
        "model": "tiny",
        "datasets": [{"name": "demo", "identities": ".", "layout": "files", "mode": "one-shot", "repeats": 1}],
        "methods": ["textual-inversion", "personamagic"],
        "prompts": list(EVALUATION_PROMPTS[:2]),
        "seeds": [0],
        "train": {"max_train_steps": 5, "partition_warmup_steps": 2, "partition_timesteps": 10},
        "generate": {"num_inference_steps": 5},
        "clip_model": "tiny",
        "device": "cpu",
    },
}
