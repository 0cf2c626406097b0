"""Generation with stage switching (SPEC §4) on the tiny model."""

import pytest
import torch

from personamagic.concept import Concept
from personamagic.mapper import MapperConfig, StageMapper
from personamagic.pipeline import PersonaMagicPipeline


def random_concept(base, window=(400, 800), seed=0) -> Concept:
    """A concept whose mapper has random (not zero) heads, so every stage is distinguishable."""
    tokenizer = base.tokenizer
    face = tokenizer("face", add_special_tokens=False).input_ids[0]
    super_embedding = base.text_encoder.get_input_embeddings().weight[face].detach()
    torch.manual_seed(seed)
    mapper = StageMapper(MapperConfig(text_embed_dim=base.hidden_size, image_embed_dim=16), super_embedding)
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return Concept(
        mapper_state=mapper.state_dict(),
        image_embeds=torch.randn(1, 16),
        placeholder="S*",
        supercategory="face",
        stage_window=window,
        num_train_timesteps=1000,
        base_model="tiny",
        text_encoder_hidden_size=base.hidden_size,
        mapper_config=mapper.config.to_dict(),
    )


def sample(pipe, prompt, seed=0, steps=4, **kwargs):
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
        "static1", "static1", "dynamic", "dynamic", "static2", "static2"]
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
