"""Prompt lists: tandem-equilibrium training prompts (ours) and the paper's evaluation prompts.

The TE loss needs "diverse person prompts containing S*" (docs/method.md); the paper generated 40 with
ChatGPT and did not publish them. These 48 are our own. They are kept disjoint from the evaluation
prompts of the paper's Fig. 16 — no shared prompt and none of their themes (clothing, roles, places) —
so that training never sees what evaluation measures (tests/test_prompts.py checks it).
"""

from __future__ import annotations

PLACEHOLDER = "S*"

TANDEM_EQUILIBRIUM_PROMPTS = [
    "S* holding a red umbrella in the rain",
    "S* riding a bicycle along a canal",
    "S* playing the violin on a stage",
    "S* laughing with a golden retriever",
    "a close-up of S* with freckles in soft light",
    "S* sitting on a wooden bench in autumn",
    "S* drinking coffee at a small cafe table",
    "S* wearing round glasses and a striped scarf",
    "S* surfing a large wave",
    "S* climbing a rock wall",
    "a pencil sketch of S*",
    "a watercolor of S*",
    "S* with a crown of sunflowers",
    "S* blowing out candles on a birthday cake",
    "S* walking through a field of lavender",
    "S* in a canoe on a misty lake",
    "S* playing chess in a park",
    "S* holding a lantern at night",
    "S* with a parrot on the shoulder",
    "S* throwing pottery on a wheel",
    "S* skating on a frozen pond",
    "S* standing in front of a waterfall",
    "S* with neon lights in the background",
    "S* riding a horse on the beach at sunset",
    "a mosaic of S*",
    "S* playing an acoustic guitar by a campfire",
    "S* holding a bouquet of tulips",
    "S* juggling oranges at a market",
    "S* blowing soap bubbles",
    "a marble statue of S*",
    "S* dancing in the street",
    "S* feeding ducks at a pond",
    "S* with a butterfly on the nose",
    "S* looking through a telescope",
    "S* in a hot air balloon",
    "a stained glass window showing S*",
    "S* kayaking in a river canyon",
    "S* eating a bowl of noodles",
    "S* wearing a bow tie at a gala",
    "a pixel art portrait of S*",
    "S* hiking on a mountain ridge",
    "S* holding a kitten",
    "S* on a sailboat in the harbor",
    "S* in a greenhouse full of ferns",
    "a charcoal drawing of S*",
    "S* smiling with paint on the cheeks",
    "S* playing drums in a garage",
    "S* waiting on a train platform",
]

# The paper's evaluation prompts (Fig. 16), verbatim but for surrounding spaces.
EVALUATION_PROMPTS = [
    "S* wearing a Santa hat",
    "S* in a construction outfit",
    "S* on the cover of Time magazine",
    "A movie poster of S*",
    "S* is wearing a doctoral gown",
    "S* in an astronaut suit",
    "A photo of S* wearing a life jacket",
    "S* as a jedi master",
    "S* wearing a sombrero",
    "S* in a farmer outfit",
    "S* dressed like a wizard",
    "A photo of S* in a black and white comic book style",
    "S* as a character in the Sherlock Holmes' movie",
    "A painting of S* in the style of Japanese ukiyo-e style",
    "A portrait of S* as a helicopter pilot",
    "S* buckled in a seat on a plane",
    "A selfie of S* in Times Square",
    "An oil painting of S*",
    "A photo of S* as a cowboy",
    "S* in a chef's outfit, cooking in a kitchen",
    "S* selfie standing under the pink blossoms of a cherry tree",
    "A vintage photograph of S*",
    "S* is reading a book",
    "S* wearing winter camo military gear in the snow",
    "A photo of S* in the jungle",
]

# Ten editing prompts of the learning world's grammar (`personamagic.world.captions`), for its likeness
# figures and studies: each names one context attribute the world's judge reads (the subject is
# replaced: "S*" or "a face")
WORLD_EDITING_PROMPTS = (
    "a photo of {} on a beach", "a photo of {} in a forest", "a photo of {} in the snow", "a photo of {} in space",
    "a photo of {} wearing a red hat", "a photo of {} wearing a crown", "a photo of {} with sunglasses",
    "a photo of {} in a yellow shirt", "a sketch of {}", "a painting of {} in a city",
)
