"""The learning world's renderer, attributes and captions: deterministic, independent, split, and
the context a prompt names is what the image shows."""

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from personamagic.world.attributes import (
    CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, IDENTITY_COUNT, held_out_identities, identity_attributes, identity_of,
    is_held_out,
)
from personamagic.world.captions import caption, random_caption, random_context
from personamagic.world.metrics import prompt_context
from personamagic.world.render import RESOLUTION, render


def pixels(item):
    return np.asarray(item.image, dtype=np.int16)


def test_the_world_has_enough_people_and_attributes():
    assert len(IDENTITY_ATTRIBUTES) >= 7
    assert IDENTITY_COUNT >= 10_000
    assert {"background", "headwear", "clothing", "glasses", "style", "position"} <= {a.name for a in CONTEXT_ATTRIBUTES}


def test_identity_numbers_and_attributes_are_one_to_one():
    rng = np.random.default_rng(0)
    for identity in rng.integers(0, IDENTITY_COUNT, 200):
        assert identity_of(identity_attributes(int(identity))) == identity
    with pytest.raises(ValueError):
        identity_attributes(IDENTITY_COUNT)


def test_the_held_out_split_is_fixed_and_about_a_tenth():
    share = np.mean([is_held_out(i) for i in range(0, IDENTITY_COUNT, 7)])
    assert 0.08 < share < 0.12
    people = held_out_identities(20)
    assert len(set(people)) == 20 and all(is_held_out(p) for p in people)
    assert held_out_identities(20) == people


def test_a_render_is_deterministic_and_the_seed_changes_only_small_things():
    a, b = render(123, {"background": "beach"}, seed=3), render(123, {"background": "beach"}, seed=3)
    assert a.image.size == (RESOLUTION, RESOLUTION) and a.mask.size == (RESOLUTION, RESOLUTION)
    assert np.array_equal(pixels(a), pixels(b)) and np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    c = render(123, {"background": "beach"}, seed=4)
    assert not np.array_equal(pixels(a), pixels(c))
    assert a.attributes == c.attributes


def test_the_mask_covers_the_face_and_moves_with_it():
    centre = np.asarray(render(7, {"position": "center"}).mask) > 0
    left = np.asarray(render(7, {"position": "left"}).mask) > 0
    far = np.asarray(render(7, {"position": "far"}).mask) > 0
    assert 0.05 < centre.mean() < 0.5
    assert np.nonzero(left)[1].mean() < np.nonzero(centre)[1].mean() - 5
    assert far.sum() < 0.6 * centre.sum()


@pytest.mark.parametrize("attribute", CONTEXT_ATTRIBUTES, ids=lambda a: a.name)
def test_every_context_value_is_visible(attribute):
    images = [pixels(render(99, {attribute.name: value}, seed=1)) for value in attribute.values]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 1.0, (attribute.values[i], attribute.values[j])


@pytest.mark.parametrize("attribute", IDENTITY_ATTRIBUTES, ids=lambda a: a.name)
def test_every_identity_attribute_is_visible(attribute):
    base = identity_attributes(12345)
    # a bald head shows no hair colour and hides no hair style under a hat: draw them on a short-haired person
    base["hair_style"] = base["hair_style"] if attribute.name != "hair_colour" else "short"
    images = []
    for value in attribute.values:
        images.append(pixels(render(identity_of({**base, attribute.name: value}), seed=0)))
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).sum() > 300, (attribute.values[i], attribute.values[j])


def test_unknown_context_is_refused():
    with pytest.raises(ValueError, match="unknown headwear"):
        render(1, {"headwear": "top_hat"})


def test_captions_name_what_they_say_and_never_the_unnamed_attributes():
    rng = np.random.default_rng(0)
    unnamed = [a for a in IDENTITY_ATTRIBUTES if a.phrases is None]
    assert {"skin_tone", "face_shape", "mouth"} <= {a.name for a in unnamed}
    for k in range(300):
        identity = int(rng.integers(IDENTITY_COUNT))
        item_attributes = {**identity_attributes(identity), **random_context(rng)}
        text = random_caption(item_attributes, np.random.default_rng(k))
        assert text.split(" of a face")[0] in ("a photo", "a sketch", "a painting")
        # another skin, face shape, mouth and nose: the very same caption
        other = {**item_attributes, **{a.name: a.values[(a.index(item_attributes[a.name]) + 1) % a.size]
                                       for a in unnamed}}
        assert random_caption(other, np.random.default_rng(k)) == text
        for name, value in prompt_context(text).items():
            assert item_attributes[name] == value, (text, name)


def test_a_caption_of_every_context_reads_back():
    attributes = {**identity_attributes(0), "background": "snow", "headwear": "crown", "clothing": "red",
                  "glasses": "sunglasses", "style": "sketch", "position": "left"}
    text = caption(attributes, subject="S*")
    assert text == "a sketch of S* wearing a crown with sunglasses in a red shirt in the snow on the left"
    assert prompt_context(text) == {k: attributes[k] for k in ("background", "headwear", "clothing", "glasses",
                                                                "style", "position")}


def test_hair_is_said_in_one_phrase():
    person = {**identity_attributes(0), "hair_style": "long", "hair_colour": "red", **random_context(np.random.default_rng(1))}
    said = {"style": True, "hair_style": True, "hair_colour": True}
    assert "with long red hair" in caption(person, said=said)
    assert "with a red hair bun" in caption({**person, "hair_style": "bun"}, said=said)
    bald = caption({**person, "hair_style": "bald"}, said=said)
    assert "bald" in bald and "red" not in bald


def test_world_render_command_writes_the_photo_and_its_mask(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "world", "render", held_out_identities(1)[0], "-o", tmp_path / "p.png",
                           "--set", "background=forest")
    assert code == 0 and "held out" in out
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p.mask.png").is_file()
    code, _, err = run_cli(capsys, "world", "render", 1, "-o", tmp_path / "q.png", "--set", "hat=red")
    assert_one_line_error(code, err, "--set 'hat=red'")
    code, _, err = run_cli(capsys, "world", "render", IDENTITY_COUNT, "-o", tmp_path / "q.png")
    assert_one_line_error(code, err, "out of range")
    assert not (tmp_path / "q.png").exists()


def test_a_saved_render_records_what_redraws_its_mask(tmp_path):
    from personamagic.world.render import recorded_mask, save_render

    item = render(321, {"position": "left", "headwear": "crown"}, seed=9)
    save_render(item, tmp_path / "p.png", seed=9)
    assert np.array_equal(np.asarray(recorded_mask(tmp_path / "p.png")), np.asarray(item.mask))
    item.image.save(tmp_path / "plain.png")
    assert recorded_mask(tmp_path / "plain.png") is None


def test_a_caption_of_a_context_alone_names_only_the_context():
    rng = np.random.default_rng(4)
    context = random_context(rng)
    text = caption(context)  # the prompt-following test's captions: a context, no person
    assert text.startswith(("a photo of a face", "a sketch of a face", "a painting of a face"))
    assert "hair" not in text and "eyes" not in text
