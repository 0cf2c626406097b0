"""PhotoMaker plugged into PersonaMagic on `tiny-sdxl`: a tiny random ID encoder built from the same
classes, saved with the real key names, loaded through the code the official weights take."""

import numpy as np
import pytest
import torch
from _concepts import random_concept
from PIL import Image

from personamagic.models.tiny import build_tiny_photomaker, save_tiny_photomaker_weights
from personamagic.adapters.photomaker_plugin import PhotoMakerSpec
from personamagic.errors import ConceptError, ModelLoadError, SettingsError
from personamagic.models import build_tiny_components, build_tiny_sdxl_components
from personamagic.pipeline import PersonaMagicPipeline


@pytest.fixture
def weights(tmp_path):
    base = build_tiny_sdxl_components()
    encoder, _ = build_tiny_photomaker(seed=0, text_width=base.cross_attention_dim)
    return save_tiny_photomaker_weights(tmp_path / "photomaker-v1.bin", encoder, base.unet)


@pytest.fixture
def photo(astronaut):
    return Image.open(astronaut).convert("RGB")


def photomaker_pipe(weights, lora_scale=1.0, merge_step=None, window=(300, 700)):
    base = build_tiny_sdxl_components()
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(random_concept(base, window=window))
    pipe.load_photomaker(PhotoMakerSpec(weights=str(weights), lora_scale=lora_scale, merge_step=merge_step))
    return pipe


def test_the_fused_token_follows_the_stages_and_only_s_star_changes(weights, photo):
    pipe = photomaker_pipe(weights, merge_step=2)
    texts = ["", "a photo of S* img as a knight"]
    pipe.scheduler.set_timesteps(8)
    timesteps = pipe.scheduler.timesteps
    schedule = pipe._photomaker_schedule(texts, [photo, photo], timesteps, 8)
    text_only = pipe.tokenize(["", "a photo of S* as a knight"])
    fused = pipe.tokenize(["", "a photo of S* S* as a knight"])
    unfused = pipe.encode_schedule(fused, timesteps)  # the same table, not fused
    id_embeds = pipe.photomaker.id_embeds([photo, photo])
    token = pipe.concepts[0].tokens.ids[0]
    marks = fused[0][1] == token
    assert int(marks.sum()) == 2  # one S* per ID image
    for i, t in enumerate(timesteps.tolist()):
        hidden, values, pooled = schedule.at(i)
        if i <= 2:  # up to the merge step: the text-only prompt, nothing fused
            expected, expected_values, expected_pooled = pipe.encode_at(text_only, t)
        else:
            plain, plain_values, expected_pooled = pipe.encode_at(fused, t)
            expected = pipe.photomaker.fuse(plain, fused[0], [token], id_embeds)
            expected_values = plain_values - plain + expected
            before = unfused.at(i)[0]
            assert torch.equal(hidden[1][~marks], before[1][~marks])  # every other position untouched
            assert not torch.allclose(hidden[1][marks], before[1][marks])  # S* is fused
            assert torch.equal(hidden[0], before[0])  # the negative prompt is never fused
        torch.testing.assert_close(hidden, expected)
        torch.testing.assert_close(values, expected_values)
        torch.testing.assert_close(pooled, expected_pooled)


def test_zero_strength_and_no_trigger_is_the_plain_sdxl_pipeline(weights, photo):
    plain = PersonaMagicPipeline.from_base(build_tiny_sdxl_components())
    plain.set_progress_bar_config(disable=True)
    plain.load_concept(random_concept(build_tiny_sdxl_components(), window=(300, 700)))
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    reference = plain("a photo of S* as a knight", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe = photomaker_pipe(weights, lora_scale=0.0)
    same = pipe("a photo of S* as a knight", photomaker_images=[photo], generator=torch.Generator().manual_seed(0),
                **kwargs).images[0]
    np.testing.assert_allclose(same, reference, atol=1e-6)
    fused = pipe("a photo of S* img as a knight", photomaker_images=[photo],
                 generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert not np.allclose(fused, reference, atol=1e-3)


def test_training_with_photomaker_reaches_only_the_mapper(weights, astronaut, tmp_path):
    from personamagic.adapters.photomaker_plugin import PhotoMaker
    from personamagic.faces import prepare_photo
    from personamagic.faces.masks import landmark_mask
    from personamagic.jobs.personalize import pil_to_tensor, training_time_ids
    from personamagic.training import Trainer, TrainConfig, prepare_training_data

    base = build_tiny_sdxl_components()
    photomaker = PhotoMaker.load(PhotoMakerSpec(weights=str(weights)), base.unet)
    prepared = prepare_photo(astronaut, base.resolution)
    mask = torch.from_numpy(landmark_mask(prepared.face, base.resolution))[None, None]
    data = prepare_training_data(base.vae, pil_to_tensor(prepared.image)[None], mask, torch.randn(1, 16))
    data.time_ids = training_time_ids(base.family, [prepared.crop], base.device)
    data.photomaker_embeds = photomaker.id_embeds([prepared.image])
    with Trainer(base, data, TrainConfig(stage_window=(0, 1000), use_id_loss=False), photomaker=photomaker) as trainer:
        batch = trainer.sample_batch()
        out = trainer.losses(batch)
        out.total.backward()
        frozen = [p for m in (*base.modules, photomaker.encoder) for p in m.parameters()]
        assert all(p.grad is None for p in frozen)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.mapper.parameters())
    # the same batch without the fusion gives another loss
    with Trainer(base, data, TrainConfig(stage_window=(0, 1000), use_id_loss=False)) as plain:
        assert not torch.allclose(plain.losses(batch).total, out.total)


def test_train_and_generate_with_photomaker_end_to_end(weights, astronaut, photo, tmp_path):
    from personamagic.concept import Concept
    from personamagic.jobs.personalize import personalize
    from personamagic.training import TrainConfig

    config = TrainConfig(max_train_steps=2, partition_warmup_steps=1, partition_timesteps=5, use_id_loss=False)
    result = personalize([astronaut], tmp_path / "c", config, model="tiny-sdxl", mask="landmarks",
                         photomaker=PhotoMakerSpec(weights=str(weights)))
    assert Concept.load(tmp_path / "c").extra["photomaker"]["weights"] == str(weights)
    pipe = PersonaMagicPipeline.from_base(build_tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(result.concept_path)
    pipe.load_photomaker(PhotoMakerSpec(weights=str(weights)))
    image = pipe("a photo of S* img", photomaker_images=[photo], num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_photomaker_needs_sdxl_and_sound_weights(weights, tmp_path):
    pipe = PersonaMagicPipeline.from_base(build_tiny_components())
    with pytest.raises(SettingsError, match="SDXL"):
        pipe.load_photomaker(PhotoMakerSpec(weights=str(weights)))
    broken = tmp_path / "broken.bin"
    torch.save({"id_encoder": {"nothing": torch.zeros(1)}, "lora_weights": {}}, broken)
    xl = PersonaMagicPipeline.from_base(build_tiny_sdxl_components())
    with pytest.raises(ModelLoadError) as info:
        xl.load_photomaker(PhotoMakerSpec(weights=str(broken)))
    assert "\n" not in str(info.value)


def test_a_prompt_names_the_photomaker_concept_once(weights, photo):
    pipe = photomaker_pipe(weights)
    with pytest.raises(SettingsError, match="once"):
        pipe("S* img and S* again", photomaker_images=[photo], num_inference_steps=1)


def test_the_commands_with_photomaker_as_tested_in_the_readme(weights, astronaut, tmp_path, capsys):
    from personamagic.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("train", astronaut, "--model", "tiny-sdxl", "--photomaker", weights, "--output", tmp_path / "c",
                       "--steps", 2, "--partition-warmup-steps", 1, "--mask", "landmarks", "--no-id-loss")
    assert code == 0, err
    code, out, _ = run("generate", tmp_path / "c", "-p", "a photo of S* img", "-n", 1, "--steps", 2, "-o", tmp_path / "a")
    assert code == 0 and "--photomaker and --photomaker-image" in out  # the reminder
    code, out, err = run("generate", tmp_path / "c", "-p", "a photo of S* img as a knight", "-n", 1, "--steps", 4,
                         "--photomaker", weights, "--photomaker-image", astronaut, "--photomaker-merge-step", 1,
                         "-o", tmp_path / "b")
    assert code == 0, err
    (image,) = sorted((tmp_path / "b").glob("000-*.png"))
    code, _, err = run("generate", "--from-image", image, "-o", tmp_path / "again")
    assert code == 0, err
    (again,) = sorted((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(image)))


def test_a_merge_step_that_leaves_photomaker_no_step_is_refused():
    from personamagic.jobs.generate_config import GenerateConfig

    ok = GenerateConfig(prompts=["a photo of S* img"], num_inference_steps=4, photomaker="pm.bin",
                        photomaker_images=["me.png"], photomaker_merge_step=2)  # steps 3 fused
    assert ok.photomaker_merge_step == 2
    for merge_step in (3, 4, 1000):  # steps i <= merge_step are text-only: none of 0..3 left
        with pytest.raises(ValueError, match=f"photomaker_merge_step {merge_step} leaves none of the 4 steps"):
            GenerateConfig(prompts=["a photo of S* img"], num_inference_steps=4, photomaker="pm.bin",
                           photomaker_images=["me.png"], photomaker_merge_step=merge_step)


def test_a_prompt_without_the_trigger_gets_a_note(weights):
    pipe = photomaker_pipe(weights)
    notes = pipe.check_photomaker_prompts(["a photo of S* img as a knight", "a photo of S* as a knight"])
    assert notes == ["prompt 'a photo of S* as a knight' has no 'S* img': PhotoMaker's ID is not used in it"]


def test_the_default_merge_step_is_a_fifth_of_the_steps_capped_at_30_as_in_the_demo():
    spec = PhotoMakerSpec(weights="pm.bin")
    assert spec.merge_step_for(50) == 10
    assert spec.merge_step_for(100) == 20
    assert spec.merge_step_for(200) == 30 and spec.merge_step_for(1000) == 30
    assert PhotoMakerSpec(weights="pm.bin", merge_step=40).merge_step_for(200) == 40  # a given one is kept


def test_a_concept_of_several_vectors_is_refused_with_photomaker_in_one_line(weights, photo, astronaut, tmp_path,
                                                                               capsys):
    from cli_helpers import assert_one_line_error, run_cli

    base = build_tiny_sdxl_components()
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    concept = random_concept(base, num_vectors=2)
    concept.base_model = "tiny-sdxl"  # no "trained on another model" warning into an earlier test's logger
    pipe.load_concept(concept)
    pipe.load_photomaker(PhotoMakerSpec(weights=str(weights)))
    with pytest.raises(ConceptError, match="one-vector concept; 'S\\*' has 2 vectors"):
        pipe("a photo of S* img", photomaker_images=[photo], num_inference_steps=2)
    concept.save(tmp_path / "c")
    code, _, err = run_cli(capsys, "generate", tmp_path / "c", "-p", "a photo of S* img", "--steps", 2,
                           "--photomaker", weights, "--photomaker-image", astronaut, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "has 2 vectors", "--num-vectors 1")
    assert not (tmp_path / "out").exists()


def test_a_photomaker_prompt_without_a_concept_is_noted(weights):
    base = build_tiny_sdxl_components()
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.load_photomaker(PhotoMakerSpec(weights=str(weights)))
    (note,) = pipe.check_photomaker_prompts(["a photo of a man img", "a photo of a man"])
    assert "no concept is loaded" in note and "a man img" in note
