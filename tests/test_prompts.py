"""The tandem-equilibrium training prompts are disjoint from the paper's evaluation prompts."""

import re

from personamagic.prompts import EVALUATION_PROMPTS, PLACEHOLDER, TANDEM_EQUILIBRIUM_PROMPTS

# The themes of the 25 evaluation prompts (Fig. 16): none of them may appear in a training prompt.
EVALUATION_THEMES = {
    "santa", "hat", "construction", "outfit", "time", "magazine", "movie", "poster", "doctoral", "gown",
    "astronaut", "suit", "life", "jacket", "jedi", "sombrero", "farmer", "wizard", "comic", "sherlock",
    "holmes", "ukiyo", "japanese", "helicopter", "pilot", "plane", "seat", "selfie", "times", "square",
    "oil", "painting", "cowboy", "chef", "kitchen", "cooking", "cherry", "blossoms", "vintage", "photograph",
    "book", "reading", "camo", "military", "snow", "jungle",
}


def words(prompt: str) -> set[str]:
    return set(re.findall(r"[a-z]+", prompt.lower()))


def test_lists_have_the_sizes_the_method_needs():
    assert len(TANDEM_EQUILIBRIUM_PROMPTS) >= 40 and len(set(TANDEM_EQUILIBRIUM_PROMPTS)) == len(TANDEM_EQUILIBRIUM_PROMPTS)
    assert len(EVALUATION_PROMPTS) == 25
    assert all(p.count(PLACEHOLDER) == 1 for p in TANDEM_EQUILIBRIUM_PROMPTS + EVALUATION_PROMPTS)


def test_no_shared_prompt_and_no_shared_theme():
    normalise = lambda p: " ".join(sorted(words(p)))  # noqa: E731
    assert not {normalise(p) for p in TANDEM_EQUILIBRIUM_PROMPTS} & {normalise(p) for p in EVALUATION_PROMPTS}
    for prompt in TANDEM_EQUILIBRIUM_PROMPTS:
        assert not words(prompt) & EVALUATION_THEMES, prompt


def test_the_te_loss_accepts_every_training_prompt(tiny_base):
    """Each prompt tokenizes with exactly one S* token and at least one real word (else L_te raises)."""
    import torch

    from personamagic.method.tokens import PlaceholderTokens, eos_positions, tokenize
    from personamagic.method.losses import tandem_equilibrium_loss

    tokens = PlaceholderTokens(tiny_base.tokenizer, PLACEHOLDER, num_vectors=1, slot=0)
    ids = tokenize(tiny_base.tokenizer, [tokens.rewrite(p) for p in TANDEM_EQUILIBRIUM_PROMPTS])
    placeholder = ids == tokens.ids[0]
    assert placeholder.sum(dim=1).tolist() == [1] * len(TANDEM_EQUILIBRIUM_PROMPTS)
    L = ids.shape[1]
    uniform_causal = torch.tril(torch.ones(L, L)) / torch.arange(1, L + 1)[:, None]
    attention = uniform_causal.expand(ids.shape[0], 2, L, L)
    loss = tandem_equilibrium_loss(attention, placeholder, eos_positions(ids, tiny_base.tokenizer.eos_token_id))
    assert abs(loss.item() + 0.25) < 1e-6  # uniform attention is perfectly balanced
