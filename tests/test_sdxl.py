"""PersonaMagic on Stable Diffusion XL: `tiny-sdxl` (real classes, seeded) and the SDXL layout of the
hub-cache fixture, checked against diffusers' own `StableDiffusionXLPipeline`."""

import numpy as np
import pytest
import torch
from hub_fixture import SDXL

from cli_helpers import assert_one_line_error, run_cli
from personamagic.concept import Concept
from personamagic.errors import ConceptError, ModelLoadError
from personamagic.faces import prepare_photo
from personamagic.faces.masks import landmark_mask
from personamagic.jobs.personalize import pil_to_tensor, training_time_ids
from personamagic.method.conditioning import text_layers
from personamagic.method.stages import average_maps
from personamagic.models import build_tiny_components, build_tiny_sdxl_components, load_base_model
from personamagic.pipeline import PersonaMagicPipeline
from personamagic.training import Trainer, TrainConfig, prepare_training_data

from _concepts import random_concept


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl_components()


def training_data(base, photo_path):
    photo = prepare_photo(photo_path, base.resolution)
    mask = torch.from_numpy(landmark_mask(photo.face, base.resolution))[None, None]
    data = prepare_training_data(base.vae, pil_to_tensor(photo.image)[None], mask, torch.randn(1, 16))
    data.time_ids = training_time_ids(base.family, [photo.crop], base.device)
    return data, photo


# -- the family's text conditioning ------------------------------------------------------------------


def test_both_encoders_get_their_part_of_s_star_and_the_pooled_embedding_follows_it(xl):
    concept = random_concept(xl, window=(0, 1000))
    pipe = PersonaMagicPipeline.from_base(xl)
    loaded = pipe.load_concept(concept)
    ids = pipe.tokenize(["a photo of S*"])
    (position,) = torch.nonzero(ids[0][0] == loaded.tokens.ids[0])[:, 0].tolist()
    assert ids[1][0, position] == loaded.tokens.ids[0]  # the same id in both tokenizers
    seen = []
    pipe.conditioner.open()
    handles = [e.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[0]))
               for e in pipe.text_encoders]
    try:
        hidden, values, pooled = pipe.encode_at(ids, 500)
    finally:
        for handle in handles:
            handle.remove()
        pipe.conditioner.close()
    embedding, _ = loaded.vectors(500)
    first, second = embedding[0].split(xl.encoder_widths)
    assert torch.allclose(seen[0][position], first) and torch.allclose(seen[1][position], second)
    assert hidden.shape == (1, 77, sum(xl.encoder_widths)) and pooled.shape == (1, xl.encoder_widths[1])
    late = random_concept(xl, window=(0, 300), seed=4)
    other = PersonaMagicPipeline.from_base(xl)
    other.load_concept(late)
    _, _, static_pooled = other.encode_at(other.tokenize(["a photo of S*"]), 500)  # static 1: the word
    _, _, plain_pooled = other.encode_at(other.tokenize(["a photo of face"]), 500)
    torch.testing.assert_close(static_pooled, plain_pooled)
    assert not torch.allclose(pooled, plain_pooled)  # the mapper's S* moves the pooled embedding


def test_the_mapper_makes_one_embedding_per_encoder_at_that_encoders_word_norm(xl):
    concept = random_concept(xl, window=(0, 1000))
    mapper = concept.build_mapper()
    embeddings, residuals = mapper(torch.tensor([10, 900]), torch.randn(2, 16))
    assert embeddings.shape == (2, 1, 80) and residuals.shape == (2, 1, xl.cross_attention_dim)
    for part, word in zip(embeddings.split(xl.encoder_widths, -1), mapper.super_embedding.split(xl.encoder_widths)):
        torch.testing.assert_close(part.norm(dim=-1), word.norm().expand(2, 1))


def test_tandem_equilibrium_reads_the_penultimate_layer_of_both_encoders(xl, astronaut):
    data, _ = training_data(xl, astronaut)
    config = TrainConfig(stage_window=(0, 1000), use_id_loss=False, optimize=False)
    with Trainer(xl, data, config) as trainer:
        layers = trainer.objective._te_layers
        assert [layer.module for layer in layers] == [text_layers(e)[-2].self_attn for e in xl.text_encoders]
        out = trainer.losses(trainer.sample_batch())
        assert torch.isfinite(out.terms["te"]) and -0.25 <= out.terms["te"].item() <= 0


def test_gradients_reach_only_the_mapper(xl, astronaut):
    data, _ = training_data(xl, astronaut)
    with Trainer(xl, data, TrainConfig(stage_window=(0, 1000), use_id_loss=False)) as trainer:
        trainer.losses(trainer.sample_batch()).total.backward()
        assert all(p.grad is None for module in xl.modules for p in module.parameters())
        grads = [p.grad for p in trainer.mapper.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_the_photos_size_conditioning_is_the_crop_it_really_had(xl, astronaut):
    data, photo = training_data(xl, astronaut)
    crop = photo.crop
    scale = crop.size / crop.side
    width, height = crop.source_size
    expected = [height, width, round(crop.y0 * scale), round(crop.x0 * scale), crop.size, crop.size]
    assert data.time_ids.tolist() == [expected]


def test_the_vae_stays_in_fp32_when_fp16_is_asked_for():
    base = build_tiny_sdxl_components().to(dtype=torch.float16)
    assert base.unet.dtype == torch.float16 and base.vae.dtype == torch.float32


# -- the stage partition on SDXL's attention levels ---------------------------------------------------------


def test_the_partition_averages_the_64_and_32_levels_on_a_32_grid():
    # Hand-made maps of a 128x128 latent's two attention levels: a blob in the top-left quarter.
    def layer(side, weight):
        grid = torch.zeros(side, side)
        grid[: side // 4, : side // 4] = weight
        return grid.reshape(1, side * side, 1)

    store = {"down_blocks.1.attn2": layer(64, 1.0), "up_blocks.0.attn2": layer(32, 0.5)}
    maps = average_maps(store, 32)
    assert maps.shape == (1, 32, 32) and maps.max() == 1 and maps.min() == 0
    assert maps[0, :8, :8].min() > 0.9 and maps[0, 9:, 9:].max() < 0.1


def test_the_sdxl_family_partitions_at_32(xl, astronaut):
    data, _ = training_data(xl, astronaut)
    config = TrainConfig(use_id_loss=False, partition_warmup_steps=1, partition_timesteps=5, max_train_steps=1)
    with Trainer(xl, data, config) as trainer:
        trainer.find_stage_window()
        assert trainer.attention_maps.shape == (5, 32, 32) and trainer.stages["resolution"] == 32


# -- against diffusers ---------------------------------------------------------------------------------


def untrained_concept(base, photo_path):
    data, _ = training_data(base, photo_path)
    with Trainer(base, data, TrainConfig(stage_window=(0, 1000), use_id_loss=False)) as trainer:
        return trainer.concept(base.name)


@pytest.mark.parametrize("scheduler, reference_class", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_an_untrained_concept_samples_as_diffusers_sdxl_does(offline_hub, astronaut, scheduler, reference_class):
    import diffusers

    base = load_base_model(SDXL)
    pipe = PersonaMagicPipeline.from_base(base, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(untrained_concept(base, astronaut))
    ours = pipe("a photo of S*", num_inference_steps=4, guidance_scale=8.0, generator=torch.Generator().manual_seed(2),
                output_type="np").images[0]
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(SDXL, add_watermarker=False, dtype=torch.float32)
    reference.scheduler = getattr(diffusers, reference_class).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a photo of face", num_inference_steps=4, guidance_scale=8.0,
                       generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    assert np.abs(ours * 255 - theirs * 255).max() <= 1.0


@pytest.mark.parametrize("negative_prompt", [None, ""])
def test_a_missing_negative_prompt_is_zeros_an_empty_one_is_text_as_in_diffusers(offline_hub, astronaut,
                                                                                  negative_prompt):
    import diffusers

    base = load_base_model(SDXL)
    pipe = PersonaMagicPipeline.from_base(base, scheduler="euler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(untrained_concept(base, astronaut))
    ours = pipe("a photo of S*", negative_prompt=negative_prompt, num_inference_steps=3,
                generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(SDXL, add_watermarker=False, dtype=torch.float32)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a photo of face", negative_prompt=negative_prompt, num_inference_steps=3, guidance_scale=8.0,
                       generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.abs(ours * 255 - theirs * 255).max() <= 1.0


def test_a_vae_with_latents_mean_and_std_decodes_as_diffusers_does(offline_hub, astronaut):
    import diffusers

    stats = {"latents_mean": [0.3, -0.2, 0.1, 0.0], "latents_std": [1.5, 0.8, 1.2, 2.0]}  # as FLUX-era VAEs carry
    base = load_base_model(SDXL)
    base.vae.register_to_config(**stats)
    pipe = PersonaMagicPipeline.from_base(base, scheduler="euler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(untrained_concept(base, astronaut))
    ours = pipe("a photo of S*", num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                output_type="np").images[0]
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(SDXL, add_watermarker=False, dtype=torch.float32)
    reference.vae.register_to_config(**stats)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a photo of face", num_inference_steps=3, guidance_scale=8.0,
                       generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert np.abs(ours * 255 - theirs * 255).max() <= 1.0
    from personamagic.models.latents import LatentScale

    scale, raw = LatentScale.of(base.vae), torch.randn(2, 4, 8, 8)
    assert torch.allclose(scale.decode(scale.encode(raw)), raw, atol=1e-5)  # training encodes as sampling decodes


def test_an_sgm_single_file_loads_the_weights_of_the_repo(offline_hub):
    single = load_base_model(str(offline_hub["sdxl_safetensors"]))
    repo = load_base_model(SDXL)
    assert single.family.name == "sdxl"
    for a, b in [(single.unet, repo.unet), (single.vae, repo.vae), *zip(single.text_encoders, repo.text_encoders)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sdxl", SDXL])
def test_train_then_generate_end_to_end(model, offline_hub, astronaut, tmp_path, capsys):
    concept_dir = tmp_path / "c"
    code, _, err = run_cli(capsys, "train", astronaut, "--model", model, "--output", concept_dir, "--steps", 2,
                           "--partition-warmup-steps", 1, "--mask", "landmarks", "--no-id-loss")
    assert code == 0, err
    concept = Concept.load(concept_dir)
    assert concept.family == "sdxl" and concept.mapper_config["encoder_widths"] == [32, 48]
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "a photo of S* as a knight", "-n", 2, "--steps", 2,
                           "-o", tmp_path / "out")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2


def test_same_seed_same_concept_and_resume_is_exact(astronaut, tmp_path, capsys):
    common = ["--model", "tiny-sdxl", "--partition-warmup-steps", 1, "--mask", "landmarks", "--checkpoint-every", 2]
    runs = {}
    for name in ("a", "b"):
        assert run_cli(capsys, "train", astronaut, "-o", tmp_path / name, "--steps", 4, *common)[0] == 0
        runs[name] = Concept.load(tmp_path / name)
    assert runs["a"].fingerprint() == runs["b"].fingerprint()
    from personamagic.training import Trainer as T

    original = T.train

    def interrupted(self, num_steps=None, progress=None, checkpoint_dir=None, job=None):
        original(self, num_steps=3, progress=progress, checkpoint_dir=checkpoint_dir, job=job)
        raise KeyboardInterrupt

    monkey = pytest.MonkeyPatch()
    monkey.setattr(T, "train", interrupted)
    try:
        code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "r", "--steps", 4, *common)
    finally:
        monkey.undo()
    assert code == 130 and "--resume" in err
    assert run_cli(capsys, "train", astronaut, "-o", tmp_path / "r", "--steps", 4, *common, "--resume")[0] == 0
    assert Concept.load(tmp_path / "r").fingerprint() == runs["a"].fingerprint()


def test_a_concept_of_one_family_is_refused_on_the_other(xl):
    sd1 = build_tiny_components()
    with pytest.raises(ConceptError, match="Stable Diffusion 1.x model"):
        PersonaMagicPipeline.from_base(xl).load_concept(random_concept(sd1))
    with pytest.raises(ConceptError, match="Stable Diffusion XL model"):
        PersonaMagicPipeline.from_base(sd1).load_concept(random_concept(xl))


def test_a_concept_whose_encoder_widths_are_swapped_is_refused(xl, tmp_path, capsys):
    concept = random_concept(xl)
    widths = concept.mapper_config["encoder_widths"]
    assert len(widths) == 2 and widths[0] != widths[1]
    concept.mapper_config["encoder_widths"] = widths[::-1]  # the same sum: only the split is wrong
    with pytest.raises(ConceptError, match=rf"trained on text encoders of widths \[{widths[1]}, {widths[0]}\]"):
        PersonaMagicPipeline.from_base(xl).load_concept(concept)
    PersonaMagicPipeline.from_base(xl).load_concept(random_concept(xl))  # the right order loads
    concept.save(tmp_path / "swapped")  # nor is it exported with clip_l and clip_g of each other's widths
    capsys.readouterr()  # the loads above warned that the concept was trained on another model
    code, _, err = run_cli(capsys, "export", tmp_path / "swapped", "-o", tmp_path / "ti.safetensors")
    assert_one_line_error(code, err, "swapped", "nothing was written")
    assert not (tmp_path / "ti.safetensors").exists()
    random_concept(xl).save(tmp_path / "right")
    assert run_cli(capsys, "export", tmp_path / "right", "-o", tmp_path / "ti.safetensors")[0] == 0


def test_a_lower_resolution_and_another_vae(offline_hub, astronaut, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "tiny-sdxl", "--output", tmp_path / "c", "--steps", 1,
                           "--stage-window", "400:800", "--mask", "landmarks", "--no-id-loss", "--resolution", 64,
                           "--vae", offline_hub["snapshots"][SDXL])
    assert code == 0, err
    extra = Concept.load(tmp_path / "c").extra
    assert extra["resolution"] == 64 and extra["vae"] == str(offline_hub["snapshots"][SDXL])
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "tiny-sdxl", "--output", tmp_path / "d",
                           "--resolution", 96)
    assert code == 2 and "multiple of 64" in err and not (tmp_path / "d").exists()


def test_an_ip_adapter_plugs_into_sdxl(xl, astronaut, tmp_path):
    from PIL import Image
    from test_ip_adapter import WEIGHTS, make_tiny_ip_adapter

    weights = make_tiny_ip_adapter(tmp_path / "ip", xl.unet)
    base = build_tiny_sdxl_components()
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(random_concept(base))
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=WEIGHTS)
    photo = Image.open(astronaut).convert("RGB")
    images = {}
    for scale in (0.0, 1.0):
        pipe.set_ip_adapter_scale(scale)
        images[scale] = pipe("a photo of S*", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                             ip_adapter_image=photo, output_type="np").images[0]
    without = PersonaMagicPipeline.from_base(build_tiny_sdxl_components())
    without.set_progress_bar_config(disable=True)
    without.load_concept(random_concept(base))
    plain = without("a photo of S*", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]
    np.testing.assert_allclose(images[0.0], plain, atol=1e-5)  # scale 0: the adapter adds nothing
    assert not np.allclose(images[1.0], plain, atol=1e-3)


def test_the_export_is_the_sdxl_textual_inversion_format_diffusers_loads(xl, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from personamagic.export import export_textual_inversion

    concept = random_concept(xl, window=(0, 1000))
    concept.save(tmp_path / "c")
    result = export_textual_inversion(tmp_path / "c", tmp_path / "me.safetensors", token="<me>")
    state = load_file(result.path)
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 48)
    base = build_tiny_sdxl_components()
    sd = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
                                   tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet,
                                   scheduler=EulerDiscreteScheduler.from_config(base.scheduler_config))
    sd.set_progress_bar_config(disable=True)
    sd.load_textual_inversion(state["clip_l"], token="<me>", text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)
    sd.load_textual_inversion(state["clip_g"], token="<me>", text_encoder=sd.text_encoder_2, tokenizer=sd.tokenizer_2)
    for key, encoder, tokenizer in (("clip_l", sd.text_encoder, sd.tokenizer), ("clip_g", sd.text_encoder_2, sd.tokenizer_2)):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<me>")]
        assert torch.equal(row, state[key][0])
    image = sd("a photo of <me>", num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_a_vae_of_another_shape_is_named_as_the_vae_that_does_not_fit(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=16).save_pretrained(tmp_path / "vae")
    with pytest.raises(ModelLoadError, match=r"--vae .*vae does not fit tiny \(Stable Diffusion 1.x\): VAE has 16 latent "
                                        r"channels; give a VAE made for this model family"):
        load_base_model("tiny", device="cpu", vae=str(tmp_path / "vae"))
