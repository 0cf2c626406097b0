"""Every loading path a user takes, offline, on the real file layouts (the hub-cache fixture of tiny
models under the real ids), checked by measurement and against diffusers' own pipelines."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from hub_fixture import CLIP_B32, DREAMLIKE, SD14, SD15_INPAINTING, SD21, SDXL_REFINER

from cli_helpers import run_cli
from personamagic.concept import Concept
from personamagic.errors import ModelLoadError, SettingsError
from personamagic.faces import prepare_photo
from personamagic.faces.masks import landmark_mask
from personamagic.jobs.personalize import pil_to_tensor
from personamagic.method.losses import denoising_target
from personamagic.models import load_base_model
from personamagic.pipeline import PersonaMagicPipeline
from personamagic.training import Trainer, TrainConfig, prepare_training_data


def training_data(base, photo_path):
    photo = prepare_photo(photo_path, base.resolution)
    mask = torch.from_numpy(landmark_mask(photo.face, base.resolution))[None, None]
    return prepare_training_data(base.vae, pil_to_tensor(photo.image)[None], mask, torch.randn(1, 16))


def untrained_concept(base, photo_path):
    """A concept whose mapper is exactly the supercategory word (zero heads), without training."""
    with Trainer(base, training_data(base, photo_path), TrainConfig(stage_window=(0, 1000), use_id_loss=False)) as t:
        return t.concept(base.name)


# -- the README's commands, with no tiny flags ------------------------------------------------------


def test_readme_commands_run_on_the_default_model(offline_hub, astronaut, tmp_path, capsys):
    concept_dir, out_dir = tmp_path / "c", tmp_path / "out"
    code, out, err = run_cli(capsys, "train", astronaut, "--output", concept_dir, "--steps", 2,
                             "--partition-warmup-steps", 1)
    assert code == 0, err
    concept = Concept.load(concept_dir)
    assert concept.base_model == SD14 and concept.family == "sd1"
    assert concept.base_revision == offline_hub["snapshots"][SD14].name  # the hub commit the files came from
    assert concept.image_encoder == CLIP_B32 and concept.extra["mask"] == "clipseg"
    code, out, err = run_cli(capsys, "generate", concept_dir, "--prompt", "a photo of S* as an astronaut",
                             "--num-images", 1, "--steps", 2, "--output", out_dir)
    assert code == 0, err
    (image,) = sorted(out_dir.glob("000-*.png"))
    code, out, err = run_cli(capsys, "evaluate", "images", out_dir, "--reference", astronaut)
    assert code == 0, err
    assert f"T-Sim with CLIP {CLIP_B32}" in out


@pytest.mark.parametrize("model", ["sd14_folder", "sd14_safetensors", DREAMLIKE])
def test_train_and_generate_from_a_folder_a_single_file_and_another_id(offline_hub, model, astronaut, tmp_path,
                                                                        capsys):
    model = str(offline_hub.get(model, model))
    common = ["--mask", "landmarks", "--no-id-loss", "--steps", 2, "--stage-window", "400:800"]
    code, _, err = run_cli(capsys, "train", astronaut, "--model", model, "--output", tmp_path / "c", *common)
    assert code == 0, err
    assert Concept.load(tmp_path / "c").base_model == model
    code, _, err = run_cli(capsys, "generate", tmp_path / "c", "-p", "S*", "-n", 1, "--steps", 2, "-o", tmp_path / "o")
    assert code == 0, err
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


# -- the model's own schedule, by measurement ---------------------------------------------------------


def unet_inputs(trainer, batch):
    """The (noisy latents, timesteps) the UNet receives in one training step's loss."""
    seen = []
    handle = trainer.base.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1])))
    try:
        trainer.losses(batch)
    finally:
        handle.remove()
    return seen[0]


def test_training_noises_with_the_models_own_schedule(offline_hub, astronaut):
    from diffusers import DDPMScheduler

    noisy = {}
    for name in (SD14, offline_hub["sd14_linear_schedule_folder"]):
        base = load_base_model(str(name))
        reference = DDPMScheduler.from_pretrained(str(name), subfolder="scheduler")
        with Trainer(base, training_data(base, astronaut), TrainConfig(stage_window=(0, 1000), use_id_loss=False,
                                                                        te_weight=0.0)) as trainer:
            batch = trainer.sample_batch()
            sample, timesteps = unet_inputs(trainer, batch)
        assert torch.equal(timesteps, batch.timesteps)
        torch.testing.assert_close(sample, reference.add_noise(batch.latents, batch.noise, batch.timesteps))
        noisy[str(name)] = (sample, batch)
    (a, batch_a), (b, batch_b) = noisy.values()
    assert torch.equal(batch_a.noise, batch_b.noise)  # the same draws ...
    assert not torch.allclose(a, b)  # ... noised by another schedule


def test_a_v_prediction_fine_tune_trains_on_v(offline_hub, astronaut, monkeypatch):
    from diffusers import DDPMScheduler

    import personamagic.training.objective as objective

    folder = str(offline_hub["sd15_v_prediction_folder"])
    base = load_base_model(folder)
    targets = []
    real = objective.masked_mse
    monkeypatch.setattr(objective, "masked_mse", lambda pred, target, mask: targets.append(target) or real(pred, target, mask))
    reference = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    with Trainer(base, training_data(base, astronaut), TrainConfig(stage_window=(0, 1000), use_id_loss=False,
                                                                    te_weight=0.0)) as trainer:
        batch = trainer.sample_batch()
        trainer.losses(batch)
    assert reference.config.prediction_type == "v_prediction"
    torch.testing.assert_close(targets[0], reference.get_velocity(batch.latents, batch.noise, batch.timesteps))
    assert not torch.allclose(targets[0], denoising_target("epsilon", batch.latents, batch.noise,
                                                           reference.alphas_cumprod, batch.timesteps))


def sample(name, concept, scheduler="ddim", steps=4, seed=0):
    pipe = PersonaMagicPipeline.from_base(load_base_model(str(name)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(concept)
    return pipe("a photo of S*", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def test_sampling_follows_the_models_scheduler_config(offline_hub, astronaut):
    concept = untrained_concept(load_base_model(SD14), astronaut)
    by_id = sample(SD14, concept)
    assert np.array_equal(by_id, sample(offline_hub["sd14_folder"], concept))  # a folder copy: the same image
    assert not np.allclose(by_id, sample(offline_hub["sd14_linear_schedule_folder"], concept), atol=1e-3)


# -- against diffusers' own pipeline --------------------------------------------------------------------


@pytest.mark.parametrize("scheduler, reference_class, overrides", [
    ("ddim", "DDIMScheduler", {}),
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("euler-a", "EulerAncestralDiscreteScheduler", {}),
])
def test_an_untrained_concept_samples_as_diffusers_does(offline_hub, astronaut, scheduler, reference_class, overrides):
    import diffusers

    concept = untrained_concept(load_base_model(SD14), astronaut)
    ours = sample(SD14, concept, scheduler, steps=5, seed=3)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(SD14, safety_checker=None)
    reference.scheduler = getattr(diffusers, reference_class).from_config({**reference.scheduler.config, **overrides})
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a photo of face", num_inference_steps=5, guidance_scale=8.0,
                       generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(ours * 255 - theirs * 255).max() <= 1.0


def test_v_prediction_samples_as_diffusers_does(offline_hub, astronaut):
    import diffusers

    folder = str(offline_hub["sd15_v_prediction_folder"])
    concept = untrained_concept(load_base_model(folder), astronaut)
    ours = sample(folder, concept, steps=5, seed=1)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    assert reference.scheduler.config.prediction_type == "v_prediction"
    theirs = reference("a photo of face", num_inference_steps=5, guidance_scale=8.0, generator=torch.Generator().manual_seed(1),
                       output_type="np").images[0]
    assert np.abs(ours * 255 - theirs * 255).max() <= 1.0


# -- single files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["sd14_safetensors", "sd14_ckpt"])
def test_a_single_file_loads_the_weights_and_the_schedule_of_its_family(offline_hub, checkpoint):
    single = load_base_model(str(offline_hub[checkpoint]))
    folder = load_base_model(str(offline_hub["sd14_folder"]))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert single.scheduler_config["beta_schedule"] == "scaled_linear" and single.family.name == "sd1"


def test_a_single_file_without_configs_offline_names_model_config(offline_hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    empty = str(tmp_path / "empty-cache")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", empty)
    monkeypatch.setenv("HF_HUB_CACHE", empty)
    with pytest.raises(ModelLoadError, match="--model-config FOLDER"):
        load_base_model(str(offline_hub["sd14_safetensors"]))
    base = load_base_model(str(offline_hub["sd14_safetensors"]), model_config=str(offline_hub["sd14_folder"]))
    assert base.scheduler_config["_class_name"] == "PNDMScheduler"


def test_model_config_on_a_model_that_brings_its_own_is_refused(offline_hub, tmp_path):
    for model in (SD14, str(offline_hub["sd14_folder"]), "tiny"):
        with pytest.raises(SettingsError, match="--model-config is for a single .safetensors/.ckpt file"):
            load_base_model(model, model_config=str(offline_hub["sd14_folder"]))
    with pytest.raises(ModelLoadError, match="--model-config"):  # a single file, its configs pointing at nothing
        load_base_model(str(offline_hub["sd14_safetensors"]), model_config=str(tmp_path / "nowhere"))


def test_a_vae_of_another_latent_space_is_refused(offline_hub):
    from hub_fixture import SDXL

    # SD-1.x's VAE has SDXL's shape (4 latent channels) but scales by 0.18215, not 0.13025
    with pytest.raises(ModelLoadError, match=r"--vae .* does not fit .*scales latents by 0.18215, the model's own VAE by 0.13025"):
        load_base_model(SDXL, vae=str(offline_hub["snapshots"][SD14]))
    assert load_base_model(SDXL, vae=str(offline_hub["snapshots"][SDXL])).vae.config.scaling_factor == 0.13025


# -- refusals and broken files: one line --------------------------------------------------------------


@pytest.mark.parametrize("model, words", [
    (SD21, "Stable Diffusion 2.x"),
    (SDXL_REFINER, "refiner"),
    (SD15_INPAINTING, "inpainting"),
])
def test_models_that_are_not_sd1_shaped_are_refused_in_one_line(offline_hub, model, words):
    with pytest.raises(ModelLoadError, match=words) as info:
        load_base_model(model)
    assert "\n" not in str(info.value)


def test_a_corrupt_component_is_one_line(offline_hub, tmp_path):
    folder = shutil.copytree(offline_hub["sd14_folder"], tmp_path / "broken")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load the unet") as info:
        load_base_model(str(folder))
    assert "\n" not in str(info.value)


def test_a_model_index_that_is_not_an_object_is_one_line(offline_hub, tmp_path):
    folder = shutil.copytree(offline_hub["sd14_folder"], tmp_path / "list")
    (folder / "model_index.json").write_text("[]")
    with pytest.raises(ModelLoadError, match="not an object"):
        load_base_model(str(folder))


def test_half_precision_uses_the_fp16_variant_files(offline_hub, monkeypatch):
    import diffusers

    asked = []
    real = diffusers.UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("variant"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", classmethod(spy))
    base = load_base_model(SD14, dtype=torch.bfloat16)
    assert asked == ["fp16"] and base.unet.dtype == torch.bfloat16
    asked.clear()
    load_base_model(DREAMLIKE, dtype=torch.bfloat16)  # no variant files there: the full ones
    assert asked == ["fp16", None]


# -- offline: every missing asset in one message, before anything loads ---------------------------------


def test_offline_every_missing_download_is_named_at_once(offline_hub, astronaut, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    import personamagic.jobs.personalize as job

    empty = str(tmp_path / "empty-cache")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", empty)
    monkeypatch.setenv("HF_HUB_CACHE", empty)
    monkeypatch.setattr(job, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = run_cli(capsys, "train", astronaut, "--output", tmp_path / "c", "--identity-model",
                           "lithiumice/ArcFace_PyTorch/ms1mv3_arcface_r100_fp16.pth")
    lines = err.strip().splitlines()  # the error, then one download per line
    assert code == 2 and lines[0].startswith("error: offline, and 4 downloads") and len(lines) == 5, err
    for needed in (SD14, "CIDAS/clipseg-rd64-refined", CLIP_B32, "ms1mv3_arcface_r100_fp16.pth",
                   "--mask landmarks", "--image-encoder", "--no-id-loss", "--model tiny"):
        assert needed in err
    assert not (tmp_path / "c").exists()


def test_an_sdxl_model_missing_its_scheduler_offline_suggests_the_sdxl_toy(offline_hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from hub_fixture import SDXL

    # a hub cache holding SDXL's model_index.json (so the offline check passes) but not its scheduler config
    storage = "models--" + SDXL.replace("/", "--")
    cache = tmp_path / "cache"
    shutil.copytree(offline_hub["hub_cache"] / storage, cache / storage, symlinks=True)
    snapshot = cache / storage / "snapshots" / offline_hub["snapshots"][SDXL].name
    (snapshot / "scheduler" / "scheduler_config.json").unlink()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelLoadError, match="scheduler_config.json") as info:
        load_base_model(SDXL)
    assert "--model tiny-sdxl" in str(info.value)


def test_the_offline_toy_suggested_for_a_base_model_is_of_the_family_known():
    from personamagic.families import SD1, SDXL
    from personamagic.jobs.assets import model_assets

    # a name that says nothing of its family: guessed SD-1.x, unless the caller knows (a concept's family)
    (guessed,) = model_assets("SomeOrg/my-finetune")
    (known,) = model_assets("SomeOrg/my-finetune", family=SDXL)
    assert f"--model {SD1.tiny_model} " in guessed.flag and f"--model {SDXL.tiny_model} " in known.flag


def test_evaluate_images_offline_names_its_clip_model(offline_hub, astronaut, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    empty = str(tmp_path / "empty-cache")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", empty)
    (tmp_path / "images").mkdir()
    Image.open(astronaut).save(tmp_path / "images" / "a.png")
    code, _, err = run_cli(capsys, "evaluate", "images", tmp_path / "images", "--reference", astronaut)
    assert code == 2 and CLIP_B32 in err and "--clip-model" in err and err.count("\n") == 1


def test_the_arcface_identity_model_loads_by_name_from_the_hub_cache(offline_hub):
    from personamagic.identity import IResNet, load_identity_model

    encoder = load_identity_model("arcface-r100")  # the community re-upload, by its short name
    assert isinstance(encoder.backbone, IResNet) and encoder.embedding_dim == 16  # the fixture's tiny width
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    embeddings = encoder(faces)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
