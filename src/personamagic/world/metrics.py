"""Metrics of the world, measured by the judge:

- *world I-Pre*: the identity encoder's cosine between an image and the reference photo;
- *world T-Sim*: the fraction of the context attributes a prompt names that the image shows.

Also the judge's own quality on held-out people (what makes these numbers trustworthy).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, held_out_identities
from .captions import random_context
from .judge import WorldIdentityEncoder, WorldJudge, context_predictions
from .render import render


def to_tensor(images) -> torch.Tensor:
    """PIL images (or one) -> (B, 3, H, W) float in [−1, 1]."""
    images = images if isinstance(images, (list, tuple)) else [images]
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def prompt_context(prompt: str) -> dict[str, str]:
    """The context attributes a world prompt names (by their phrases), e.g. {"headwear": "red_hat"}.
    Default values that have no phrase ("none", "center") are never named."""
    named = {}
    text = f" {prompt.lower()} "
    for attribute in CONTEXT_ATTRIBUTES:
        for value, phrase in zip(attribute.values, attribute.phrases):
            if phrase and f" {phrase} " in text:
                named[attribute.name] = value
    if not any(prompt.lower().startswith(p) for p in _style_phrases()):
        named.pop("style", None)
    return named


def _style_phrases():
    return next(a for a in CONTEXT_ATTRIBUTES if a.name == "style").phrases


def world_t_sim(judge: WorldJudge, images, prompts) -> list[float]:
    """Per image, the fraction of its prompt's named context attributes the judge reads in it (NaN if
    the prompt names none)."""
    predicted = context_predictions(judge, to_tensor(images))
    scores = []
    for i, prompt in enumerate(prompts):
        named = prompt_context(prompt)
        hits = [predicted[name][i] == value for name, value in named.items()]
        scores.append(float(np.mean(hits)) if hits else float("nan"))
    return scores


def world_i_pre(judge: WorldJudge, images, reference) -> list[float]:
    """Per image, the identity cosine to the reference photo(s) (averaged over several)."""
    encoder = WorldIdentityEncoder(judge)
    with torch.no_grad():
        ref = encoder(to_tensor(reference)).mean(0, keepdim=True)
        ref = torch.nn.functional.normalize(ref, dim=-1)
        return (encoder(to_tensor(images)) @ ref.T)[:, 0].tolist()


def judge_report(judge: WorldJudge, identities: int = 200, contexts: int = 4, seed: int = 1,
                 degrade=None) -> dict:
    """The judge on renders of held-out people in random contexts: accuracy per attribute, and the
    identity encoder's mean cosine for one person across contexts and for different people.
    `degrade`: an optional function applied to the image batch first (e.g. a VAE round trip)."""
    rng = np.random.default_rng(seed)
    people = held_out_identities(identities, start=seed * 1000)
    renders = [render(p, random_context(rng), int(rng.integers(2**31))) for p in people for _ in range(contexts)]
    x = to_tensor([r.image for r in renders])
    if degrade is not None:
        x = degrade(x)
    with torch.no_grad():
        logits = judge(x)
        embeddings = WorldIdentityEncoder(judge)(x)
    accuracy = {}
    for attribute in IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES:
        truth = torch.tensor([attribute.index(r.attributes[attribute.name]) for r in renders])
        accuracy[attribute.name] = float((logits[attribute.name].argmax(-1) == truth).float().mean())
    cos = embeddings @ embeddings.T
    who = torch.tensor([r.identity for r in renders])
    same = (who[:, None] == who[None, :]) & ~torch.eye(len(who), dtype=torch.bool)
    different = who[:, None] != who[None, :]
    # pairs in which both faces are in full view: no hat over the hair, no sunglasses over the eyes, not far away
    clear = torch.tensor([r.attributes["headwear"] == "none" and r.attributes["glasses"] != "sunglasses"
                          and r.attributes["position"] != "far" for r in renders])
    both_clear = clear[:, None] & clear[None, :]
    return {"identities": identities, "contexts": contexts, "accuracy": accuracy,
            "identity_cosine_same": float(cos[same].mean()), "identity_cosine_different": float(cos[different].mean()),
            "identity_cosine_same_in_full_view": float(cos[same & both_clear].mean()),
            "identity_cosine_different_in_full_view": float(cos[different & both_clear].mean())}


def reference_photo(identity: int, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """The reference photo of a person (a plain studio photo, the default context) and its face mask."""
    item = render(identity, None, seed)
    return item.image, item.mask
