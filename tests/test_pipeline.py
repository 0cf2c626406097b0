"""Generation with stage switching (SPEC §4) on the tiny model: stages, batching, schedulers,
compositional and localized generation, and attaching concepts to a diffusers pipeline."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from _concepts import random_concept, stable_diffusion_pipeline
from PIL import Image

from personamagic.method.stages import Stage
from personamagic.method.tokens import tokenize
from personamagic.errors import PhotoError, SettingsError
from personamagic.pipeline import PersonaMagicPipeline, attach_concepts


def sample(pipe, prompt, seed=0, steps=2, **kwargs):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


@pytest.fixture
def pipe(tiny_base):
    pipe = PersonaMagicPipeline.from_base(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shapes_and_determinism(pipe, tiny_base):
    pipe.load_concept(random_concept(tiny_base))
    a = sample(pipe, "a photo of S*", seed=1)
    assert a.shape == (1, 128, 128, 3) and (a >= 0).all() and (a <= 1).all()
    assert (sample(pipe, "a photo of S*", seed=1) == a).all()
    assert not (sample(pipe, "a photo of S*", seed=2) == a).all()


def test_static_stage_one_is_the_supercategory_word(pipe, tiny_base):
    # Window below every sampled timestep: S* stays in static stage 1 = the word "face" all along.
    reference = sample(pipe, "a photo of face")
    pipe.load_concept(random_concept(tiny_base, window=(0, 1)))
    assert abs(sample(pipe, "a photo of S*") - reference).max() < 1e-5


def test_dynamic_stage_changes_the_image(pipe, tiny_base):
    reference = sample(pipe, "a photo of face")
    pipe.load_concept(random_concept(tiny_base, window=(0, 1000)))
    assert abs(sample(pipe, "a photo of S*") - reference).max() > 1e-3


def test_stage_of_each_timestep(pipe, tiny_base):
    loaded = pipe.load_concept(random_concept(tiny_base, window=(400, 800)))
    assert [loaded.stage(t) for t in (999, 800, 799, 400, 399, 0)] == [
        Stage.STATIC_1, Stage.STATIC_1, Stage.DYNAMIC, Stage.DYNAMIC, Stage.STATIC_2, Stage.STATIC_2]
    # Static 2 freezes the conditioning at t_lo.
    frozen = loaded.vectors(399)
    assert all(torch.equal(a, b) for a, b in zip(frozen, loaded.vectors(10)))
    assert all(torch.equal(a, b) for a, b in zip(frozen, loaded.vectors(400)))
    assert not torch.equal(loaded.vectors(600)[0], frozen[0])


def test_processors_restored_after_generation(pipe, tiny_base):
    before = dict(tiny_base.unet.attn_processors)
    pipe.load_concept(random_concept(tiny_base))
    sample(pipe, "a photo of S*")
    assert all(tiny_base.unet.attn_processors[n] is p for n, p in before.items())


def test_missing_placeholder_is_reported(pipe, tiny_base):
    pipe.load_concept(random_concept(tiny_base))
    assert pipe.check_prompts(["a photo of S*"]) == []
    assert "does not contain S*" in pipe.check_prompts(["a photo of a dog"])[0]


# -- batching and schedulers ---------------------------------------------------------------------------


def test_batched_equals_unbatched(pipe, tiny_base):
    pipe.load_concept(random_concept(tiny_base, window=(0, 1000)))
    prompts, seeds = ["a photo of S*", "S* on the beach"], [3, 4]
    batched = pipe(prompts, num_inference_steps=2, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    for prompt, seed, image in zip(prompts, seeds, batched):
        alone = sample(pipe, prompt, seed=seed)[0]
        assert np.abs(alone - image).max() < 1e-4
    assert np.abs(batched[0] - batched[1]).max() > 1e-3


@pytest.mark.parametrize("name", ["dpm++", "euler-a", "heun", "dpm2", "UniPCMultistepScheduler"])
def test_scheduler_swap_runs(pipe, tiny_base, name):
    pipe.load_concept(random_concept(tiny_base))
    pipe.set_scheduler(name)
    image = sample(pipe, "a photo of S*")
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


def test_unknown_scheduler_is_a_user_error(pipe):
    with pytest.raises(SettingsError, match="unknown scheduler 'fast'"):
        pipe.set_scheduler("fast")


# -- compositional generation ----------------------------------------------------------------------------


def test_two_concepts_get_their_own_embeddings_at_their_positions(pipe, tiny_base):
    me = pipe.load_concept(random_concept(tiny_base, window=(0, 1000), placeholder="<me>"))
    style = pipe.load_concept(random_concept(tiny_base, window=(0, 500), seed=1, placeholder="<style>",
                                             supercategory="painting", num_vectors=2))
    ids = tokenize(pipe.tokenizer, [pipe.rewrite_prompt("a photo of <me> in the style of <style>")])
    table = pipe.text_encoder.get_input_embeddings().weight
    pipe.conditioner.open()  # the override's hooks first, so that the hook below sees their output
    seen = []  # registered after the override's hook: sees the text encoder's actual input
    handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        for t in (700, 300):  # 700: <me> dynamic, <style> static 1; 300: both dynamic
            hidden, values, _ = pipe.encode_at([ids], t)
            inputs = seen[-1]
            for loaded in (me, style):
                embeddings, residuals = loaded.vectors(t)
                for i, token_id in enumerate(loaded.tokens.ids):
                    (position,) = torch.nonzero(ids[0] == token_id)[:, 0].tolist()
                    assert torch.allclose(inputs[position], embeddings[i])
                    assert torch.allclose(values[0, position] - hidden[0, position], residuals[i], atol=1e-6)
            assert torch.equal(style.vectors(700)[0][0], style.mapper.super_embedding)  # static 1: the word
            placeholder_ids = torch.tensor(me.tokens.ids + style.tokens.ids)
            plain = ~torch.isin(ids[0], placeholder_ids)
            assert torch.equal(inputs[plain], table[ids[0][plain]])
            assert torch.equal(values[0, plain], hidden[0, plain])
        assert ids[0].tolist().count(style.tokens.ids[1]) == 1  # two vectors, two positions
    finally:
        handle.remove()
        pipe.conditioner.close()


def test_schedule_conditioning_equals_per_step_encoding_in_one_call(pipe, tiny_base):
    me = pipe.load_concept(random_concept(tiny_base, window=(300, 700), placeholder="<me>"))
    pipe.load_concept(random_concept(tiny_base, window=(0, 500), seed=1, placeholder="<style>",
                                      supercategory="painting", num_vectors=2))
    texts = ["", "", "a photo of <me>", "a photo of <me>", "<me> in the style of <style>"]
    ids = tokenize(pipe.tokenizer, [pipe.rewrite_prompt(p) for p in texts])
    pipe.scheduler.set_timesteps(10)
    timesteps = pipe.scheduler.timesteps
    batches = []
    handle = pipe.text_encoder.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        schedule = pipe.encode_schedule([ids], timesteps)
    finally:
        handle.remove()
    keys = {pipe.stage_key(int(t)) for t in timesteps}
    # one call: the negative prompt once, each of the 2 distinct personal prompts once per stage key
    assert batches == [1 + 2 * len(keys)] and len(keys) < len(timesteps)
    for i, t in enumerate(timesteps):
        hidden, values, _ = schedule.at(i)
        expected_hidden, expected_values, _ = pipe.encode_at([ids], int(t))
        assert torch.allclose(hidden, expected_hidden, atol=1e-5)
        assert torch.allclose(values, expected_values, atol=1e-5)
    early, late = schedule.at(0), schedule.at(len(timesteps) - 1)  # me: static 1 vs static 2
    assert torch.equal(early[0][0], late[0][0])  # the negative prompt never changes
    position = ids[2].tolist().index(me.tokens.ids[0])
    assert not torch.allclose(early[1][2, position], late[1][2, position])


def test_placeholders_are_replaced_longest_first(pipe, tiny_base):
    a = pipe.load_concept(random_concept(tiny_base, placeholder="S*"))
    b = pipe.load_concept(random_concept(tiny_base, placeholder="S*2"))
    assert pipe.rewrite_prompt("S*2 and S*") == f"{b.tokens.tokens[0]} and {a.tokens.tokens[0]}"
    with pytest.raises(SettingsError, match="--placeholder"):
        pipe.load_concept(random_concept(tiny_base, placeholder="S*"))


# -- localized customization --------------------------------------------------------------------------


def background_and_region(size=128):
    rng = np.random.default_rng(0)
    background = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    region = np.zeros((size, size), np.uint8)
    region[32:96, 40:104] = 255
    return background, Image.fromarray(region)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_localized_generation_leaves_the_outside_untouched(pipe, tiny_base, scheduler):
    pipe.load_concept(random_concept(tiny_base, window=(0, 1000)))
    pipe.set_scheduler(scheduler)
    background, region = background_and_region()
    known, mask = pipe.prepare_localized(background, region, 1, 128, 128)
    assert mask.shape == (1, 1, 16, 16) and mask.sum() == 8 * 8  # 64x64 pixels -> 8x8 latents
    latents = pipe("a photo of S*", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent", background=background, region=region).images
    outside = (1 - mask).bool().expand_as(latents)
    assert torch.equal(latents[outside], known[outside])  # exactly the background's latent
    assert (latents[~outside] - known[~outside]).abs().mean() > 0.1  # the inside is generated


def test_localized_generation_needs_background_and_a_region(pipe, tiny_base):
    pipe.load_concept(random_concept(tiny_base))
    background, region = background_and_region()
    with pytest.raises(ValueError, match="both"):
        sample(pipe, "a photo of S*", steps=1, background=background)
    with pytest.raises(PhotoError, match="empty"):
        sample(pipe, "a photo of S*", steps=1, background=background, region=Image.new("L", (128, 128)))


# -- diffusers integration -----------------------------------------------------------------------------


def test_attach_concepts_to_a_stable_diffusion_pipeline(tiny_base):
    sd = stable_diffusion_pipeline(tiny_base)
    pm = attach_concepts(sd, [random_concept(tiny_base, placeholder="<me>"),
                              random_concept(tiny_base, placeholder="<style>", supercategory="painting")])
    shared = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    assert all(getattr(pm, name) is getattr(sd, name) for name in shared)
    assert [c.tokens.placeholder for c in pm.concepts] == ["<me>", "<style>"]
    image = pm("a photo of <me> in the style of <style>", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()
    assert attach_concepts(sd, [], scheduler="dpm++").scheduler.__class__.__name__ == "DPMSolverMultistepScheduler"


def test_attaching_a_renamed_concept_to_an_unnamed_pipeline_says_so_in_its_own_words(tiny_base, caplog):
    sd = stable_diffusion_pipeline(tiny_base)  # built from modules: no name_or_path
    with caplog.at_level("WARNING", logger="personamagic"):
        attach_concepts(sd, [random_concept(tiny_base)], placeholders=["<ann>"])
    (message,) = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert message.startswith("concept '<ann>' was trained on tiny;") and "cannot be checked" in message
    assert not message.rstrip().endswith("generating with")


def test_package_root_exports_lazily():
    code = "import sys, personamagic; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    import personamagic

    assert personamagic.PersonaMagicPipeline is PersonaMagicPipeline and personamagic.attach_concepts is attach_concepts


def test_every_lazy_export_resolves():
    import personamagic

    for name in personamagic.__all__:
        assert getattr(personamagic, name) is not None, name
