"""The attributes of the learning world: who a person is (identity) and what a prompt may change
(context), each a small closed set of values with the words captions use for them.

An identity is a number in `range(IDENTITY_COUNT)`: its attribute values are that number's digits in
the mixed radix of the identity attributes' sizes, so every combination is exactly one identity and
the attributes are independent. Identities whose hash is 0 mod 10 are held out: the base model never
sees them, and every likeness figure is measured on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Attribute:
    """One attribute: its values (drawing keys) and, for each, the caption phrase (None: never said)."""

    name: str  # key in an attribute record ("hair_colour")
    values: tuple  # the values, in a fixed order (their index is the class label of the world's judge)
    phrases: tuple | None  # the caption phrase of each value; None: the attribute is never put in words

    @property
    def size(self) -> int:
        return len(self.values)

    def index(self, value: str) -> int:
        if value not in self.values:
            raise ValueError(f"unknown {self.name} {value!r}; known: {', '.join(self.values)}")
        return self.values.index(value)


# Identity. Captions may name hair, eyes and beard (a real model knows words for them); skin tone, face
# shape, mouth and nose are never put in words, so only a concept learnt from the photo carries them.
IDENTITY_ATTRIBUTES = (
    Attribute("skin_tone", ("porcelain", "light", "tan", "olive", "brown", "dark"), None),
    Attribute("face_shape", ("round", "oval", "long", "square"), None),
    Attribute("hair_style", ("bald", "short", "long", "bun", "spiky"),
              ("bald", "with short hair", "with long hair", "with a hair bun", "with spiky hair")),
    Attribute("hair_colour", ("black", "brown", "blonde", "red", "grey", "pink"),
              ("with black hair", "with brown hair", "with blonde hair", "with red hair", "with grey hair",
               "with pink hair")),
    Attribute("eye_colour", ("brown", "blue", "green", "violet"),
              ("with brown eyes", "with blue eyes", "with green eyes", "with violet eyes")),
    Attribute("beard", ("none", "moustache", "goatee", "full"),
              ("clean-shaven", "with a moustache", "with a goatee", "with a beard")),
    Attribute("mouth", ("small", "smile", "open"), None),
    Attribute("nose", ("button", "long", "wide"), None),
)

# Context: what a prompt may change. Every value has words; "none"/"center" are the defaults a caption
# may leave unsaid.
CONTEXT_ATTRIBUTES = (
    Attribute("background", ("studio", "beach", "forest", "snow", "city", "space"),
              ("in a studio", "on a beach", "in a forest", "in the snow", "in a city", "in space")),
    Attribute("headwear", ("none", "red_hat", "blue_hat", "green_hat", "crown"),
              ("", "wearing a red hat", "wearing a blue hat", "wearing a green hat", "wearing a crown")),
    Attribute("clothing", ("red", "blue", "green", "yellow", "white", "black"),
              ("in a red shirt", "in a blue shirt", "in a green shirt", "in a yellow shirt", "in a white shirt",
               "in a black shirt")),
    Attribute("glasses", ("none", "glasses", "sunglasses"), ("", "with glasses", "with sunglasses")),
    Attribute("style", ("photo", "sketch", "painting"), ("a photo of", "a sketch of", "a painting of")),
    Attribute("position", ("center", "left", "right", "far"), ("", "on the left", "on the right", "far away")),
)

IDENTITY_COUNT = math.prod(a.size for a in IDENTITY_ATTRIBUTES)  # 103,680
HELD_OUT_MODULUS = 10  # one identity in ten is held out


def identity_attributes(identity: int) -> dict[str, str]:
    """The identity attribute values of person number `identity` (mixed-radix digits)."""
    if not 0 <= identity < IDENTITY_COUNT:
        raise ValueError(f"identity must be in 0..{IDENTITY_COUNT - 1}, got {identity}")
    values, rest = {}, identity
    for attribute in IDENTITY_ATTRIBUTES:
        rest, digit = divmod(rest, attribute.size)
        values[attribute.name] = attribute.values[digit]
    return values


def identity_of(values: dict[str, str]) -> int:
    """The number of the person with these identity attribute values (inverse of identity_attributes)."""
    identity = 0
    for attribute in reversed(IDENTITY_ATTRIBUTES):
        identity = identity * attribute.size + attribute.index(values[attribute.name])
    return identity


def is_held_out(identity: int) -> bool:
    """The fixed split: a Knuth multiplicative hash of the number, 0 mod 10, is held out (~10%)."""
    return (identity * 2654435761 % 2**32) % HELD_OUT_MODULUS == 0


def held_out_identities(count: int, start: int = 0) -> list[int]:
    """The first `count` held-out identities from `start` on, spread over the whole range (a stride
    co-prime with the count, so neighbours differ in every attribute)."""
    stride = 7919  # a prime: identity k*stride mod N walks the whole range
    found, k = [], start
    while len(found) < count:
        identity = (k * stride) % IDENTITY_COUNT
        if is_held_out(identity):
            found.append(identity)
        k += 1
    return found


def default_context() -> dict[str, str]:
    """The context of a reference photo: a plain photo in the studio, centred, nothing worn."""
    return {"background": "studio", "headwear": "none", "clothing": "blue", "glasses": "none", "style": "photo",
            "position": "center"}


def attribute_named(name: str) -> Attribute:
    for attribute in IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES:
        if attribute.name == name:
            return attribute
    raise ValueError(f"no world attribute named {name!r}")
