"""Captions of the learning world, from a small grammar:

    "<style> a face[ <identity phrases>][ <headwear>][ <glasses>][ <clothing>][ <background>][ <position>]"

e.g. "a photo of a face with red hair wearing a red hat in a blue shirt on a beach". The subject is
always the supercategory word "face", so "a photo of S* ..." is a world prompt with the concept in
place of the word. Context is said most of the time, identity words (hair, eyes, beard) some of the
time, and skin tone, face shape, mouth and nose never.
"""

from __future__ import annotations

import numpy as np

from .attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES

SUPERCATEGORY = "face"
CONTEXT_SAID = 0.85  # chance that a caption names a context attribute (style: always)
IDENTITY_SAID = 0.3  # chance that a caption names a nameable identity attribute

def caption(attributes: dict, *, subject: str = f"a {SUPERCATEGORY}", said: dict | None = None) -> str:
    """The caption naming, of `attributes`, those whose name maps to True in `said` (all context and
    no identity attributes if None). The subject replaces "a face" ("S*" for a concept's prompt)."""
    said = said if said is not None else {a.name: True for a in CONTEXT_ATTRIBUTES}
    context = {a.name: a for a in CONTEXT_ATTRIBUTES}
    words = [context["style"].phrases[context["style"].index(attributes["style"])], subject,
             identity_words(attributes, said)]
    for name in ("headwear", "glasses", "clothing", "background", "position"):
        if said.get(name):
            attribute = context[name]
            words.append(attribute.phrases[attribute.index(attributes[name])])
    return " ".join(w for w in words if w)


def identity_words(attributes: dict, said: dict | None = None) -> str:
    """The words a caption says of a person after the subject: hair, then eyes and beard, of those whose
    name maps to True in `said` (None: every attribute that has words). "with long red hair with blue
    eyes clean-shaven"; "" when nothing is said."""
    if said is None:
        said = {a.name: True for a in IDENTITY_ATTRIBUTES if a.phrases}
    words = [_hair_phrase(attributes, said)]
    for attribute in IDENTITY_ATTRIBUTES:
        if attribute.phrases is None or attribute.name.startswith("hair") or not said.get(attribute.name):
            continue
        words.append(attribute.phrases[attribute.index(attributes[attribute.name])])
    return " ".join(w for w in words if w)


def _hair_phrase(attributes: dict, said: dict) -> str:
    """Hair style and colour in one phrase: "with long red hair", "with a red hair bun", "bald"."""
    if not (said.get("hair_style") or said.get("hair_colour")):
        return ""  # (a context alone, as the prompt-following test's captions, has no hair to name)
    style, colour = attributes["hair_style"], attributes["hair_colour"]
    say_style, say_colour = said.get("hair_style"), said.get("hair_colour") and style != "bald"
    if say_style and say_colour:
        return f"with a {colour} hair bun" if style == "bun" else f"with {style} {colour} hair"
    if say_style:
        return _phrase("hair_style", style)
    return _phrase("hair_colour", colour) if say_colour else ""


def _phrase(name: str, value: str) -> str:
    attribute = next(a for a in IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES if a.name == name)
    return attribute.phrases[attribute.index(value)]


def random_caption(attributes: dict, rng: np.random.Generator) -> str:
    """A training caption: each context attribute said with CONTEXT_SAID, identity words with IDENTITY_SAID."""
    said = {a.name: bool(rng.random() < CONTEXT_SAID) for a in CONTEXT_ATTRIBUTES}
    said["style"] = True
    said.update({a.name: bool(rng.random() < IDENTITY_SAID) for a in IDENTITY_ATTRIBUTES if a.phrases})
    return caption(attributes, said=said)


def random_context(rng: np.random.Generator) -> dict:
    """A context drawn for training: photos and plain heads more often, as in a real caption corpus."""
    weights = {"headwear": [0.4, 0.15, 0.15, 0.15, 0.15], "glasses": [0.6, 0.2, 0.2], "style": [0.6, 0.2, 0.2],
               "position": [0.55, 0.15, 0.15, 0.15]}
    context = {}
    for attribute in CONTEXT_ATTRIBUTES:
        p = weights.get(attribute.name)
        context[attribute.name] = attribute.values[int(rng.choice(attribute.size, p=p))]
    return context
