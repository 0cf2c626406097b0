"""The offline hub cache of hub_fixture.py, checked with diffusers' and transformers' own loaders: every
id loads offline by its real name, the configs hold the real values, and the single-file checkpoints
convert back to exactly the weights they were made from."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_fixture import (
    ARCFACE,
    ARCFACE_FILE,
    CLIP_B32,
    CLIPSEG,
    DREAMLIKE,
    SD14,
    SD15,
    SD15_INPAINTING,
    SD21,
    SDXL,
    SDXL_REFINER,
    TINY_ARCFACE,
)
from PIL import Image

# md5 of the hub's SD-1.4 tokenizer files (tokenizer/ at commit 133a221b).
REAL_TOKENIZER_MD5 = {
    "vocab.json": "a3933521163a0e76cee6094f1d72a9cc",
    "merges.txt": "d2bc10797e70c920c14c69729ecdab34",
}
SD1_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
PNDM_SD1 = {"set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    state, expected = module.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(state[key], expected[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sd_components(folder) -> dict:
    """The UNet, VAE and text encoder of a diffusers folder, float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    components = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32),
    }
    if (Path(folder) / "text_encoder_2").is_dir():
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", dtype=torch.float32
        )
    return components


@pytest.fixture(scope="module")
def sd14_reference(hub_cache):
    return sd_components(hub_cache["snapshots"][SD14])


def test_cache_has_the_layout_huggingface_hub_writes(hub_cache):
    from huggingface_hub import get_cached_repo_tree, try_to_load_from_cache

    storage = hub_cache["hub_cache"] / "models--CompVis--stable-diffusion-v1-4"
    commit = (storage / "refs" / "main").read_text()
    snapshot = storage / "snapshots" / commit
    assert snapshot == hub_cache["snapshots"][SD14]
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and not os.path.isabs(os.readlink(weights))
    assert weights.resolve().parent == (storage / "blobs").resolve()
    assert len(weights.resolve().name) == 64  # an LFS file's blob is named by its sha256
    cached = try_to_load_from_cache(SD14, "scheduler/scheduler_config.json", cache_dir=hub_cache["hub_cache"])
    assert Path(cached) == snapshot / "scheduler" / "scheduler_config.json"
    listed = {f.path for f in get_cached_repo_tree(SD14, cache_dir=hub_cache["hub_cache"])}
    on_disk = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if not p.is_dir()}
    assert listed == on_disk
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "feature_extractor/preprocessor_config.json"} <= on_disk
    # The tokenizer files are byte for byte those of the hub repos (md5 of the real SD-1.4 files).
    digests = {name: _md5(snapshot / "tokenizer" / name) for name in REAL_TOKENIZER_MD5}
    assert digests == REAL_TOKENIZER_MD5


def test_offline_hub_points_the_libraries_at_the_cache(offline_hub):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert huggingface_hub.constants.HF_HUB_CACHE == str(offline_hub["hub_cache"])
    with pytest.raises(OfflineModeIsEnabled):
        huggingface_hub.model_info(SD14)
    # Listing a repo's files is a network call even with the files cached; the cached tree listing
    # exists only for repos that snapshot_download fetched (the diffusers pipelines here).
    with pytest.raises(OfflineModeIsEnabled):
        huggingface_hub.list_repo_files(ARCFACE)
    assert "model_index.json" in {f.path for f in huggingface_hub.get_cached_repo_tree(SD14)}


def test_build_is_deterministic_and_keeps_the_global_rng(hub_cache, tmp_path):
    from hub_fixture import build_hub_cache

    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    again = build_hub_cache(tmp_path)
    assert torch.equal(torch.rand(1), expected_draw)
    # A snapshot's name is the hash of its files' contents.
    commits = [{repo_id: path.name for repo_id, path in build["snapshots"].items()} for build in (again, hub_cache)]
    assert commits[0] == commits[1]
    for name in ("sd14_safetensors", "sd14_ckpt", "sdxl_safetensors"):
        assert _md5(again[name]) == _md5(hub_cache[name])


@pytest.mark.parametrize(
    ("repo_id", "scheduler", "safety_checker", "latent_size"),
    [(SD14, "PNDMScheduler", True, 16), (SD15, "PNDMScheduler", True, 16), (DREAMLIKE, "DDIMScheduler", False, 24)],
)
def test_sd1_pipelines_load_by_id(offline_hub, repo_id, scheduler, safety_checker, latent_size):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(repo_id, dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == scheduler
    assert (pipe.safety_checker is not None) == safety_checker
    assert pipe.unet.config.sample_size == latent_size
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.tokenizer("a photo of sks person").input_ids == [49406, 320, 1125, 539, 48136, 2533, 49407]


def test_sd14_generates_with_its_safety_checker(offline_hub):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD14)
    out = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()
    assert out.nsfw_content_detected == [False]


def test_repos_have_their_own_weights(offline_hub):
    from diffusers import UNet2DConditionModel

    unets = [UNet2DConditionModel.from_pretrained(repo_id, subfolder="unet") for repo_id in (SD14, SD15, DREAMLIKE)]
    weights = [unet.conv_in.weight for unet in unets]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2].float())


def test_dtypes_on_disk_are_the_real_ones(offline_hub):
    """dreamlike's diffusers weights are float16; SDXL's main text encoder weights are float32 but its
    config says float16: transformers 5 (dtype "auto") loads both as float16 unless asked otherwise."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    assert CLIPTextModel.from_pretrained(DREAMLIKE, subfolder="text_encoder").dtype == torch.float16
    assert CLIPTextModel.from_pretrained(SDXL, subfolder="text_encoder").dtype == torch.float16
    assert CLIPTextModel.from_pretrained(SDXL, subfolder="text_encoder", dtype=torch.float32).dtype == torch.float32
    # diffusers (without accelerate) builds float32 modules and copies the float16 values in.
    assert UNet2DConditionModel.from_pretrained(DREAMLIKE, subfolder="unet").dtype == torch.float32


@pytest.mark.parametrize(
    ("repo_id", "expected"),
    [
        (SD14, SD1_SCHEDULE | PNDM_SD1),
        (SD15, SD1_SCHEDULE | PNDM_SD1),
        (DREAMLIKE, SD1_SCHEDULE | {"prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1}),
        (SDXL, SD1_SCHEDULE | {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"}),
        (SD21, SD1_SCHEDULE | {"prediction_type": "v_prediction", "steps_offset": 1}),
    ],
)
def test_scheduler_configs_have_the_real_values(offline_hub, repo_id, expected):
    from diffusers import DDPMScheduler

    config = DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler").config
    assert {key: config[key] for key in expected} == expected
    assert config["trained_betas"] is None


def test_pipeline_load_config_does_not_read_a_scheduler_subfolder(offline_hub):
    """DiffusionPipeline's config file is model_index.json, in any subfolder: a scheduler config must be
    read through a scheduler class."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    with pytest.raises(OSError, match="model_index.json"):
        DiffusionPipeline.load_config(SD14, subfolder="scheduler")
    assert DDPMScheduler.load_config(SD14, subfolder="scheduler")["_class_name"] == "PNDMScheduler"


def test_plain_folders_differ_only_in_the_scheduler(hub_cache):
    from diffusers import DDPMScheduler

    plain, linear = hub_cache["sd14_folder"], hub_cache["sd14_linear_schedule_folder"]
    files = sorted(str(p.relative_to(plain)) for p in plain.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(linear)) for p in linear.rglob("*") if p.is_file())
    assert not any(p.is_symlink() for p in plain.rglob("*"))
    differing = [f for f in files if (plain / f).read_bytes() != (linear / f).read_bytes()]
    assert differing == ["scheduler/scheduler_config.json"]
    schedules = [DDPMScheduler.from_pretrained(folder, subfolder="scheduler") for folder in (plain, linear)]
    assert [s.config.beta_schedule for s in schedules] == ["scaled_linear", "linear"]
    assert not torch.allclose(schedules[0].alphas_cumprod, schedules[1].alphas_cumprod)
    v_prediction = DDPMScheduler.from_pretrained(hub_cache["sd15_v_prediction_folder"], subfolder="scheduler")
    assert v_prediction.config.prediction_type == "v_prediction"


def test_fp16_variant(offline_hub):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    half = StableDiffusionPipeline.from_pretrained(SD14, variant="fp16", dtype=torch.float16)
    full = StableDiffusionPipeline.from_pretrained(SD14)
    assert half.unet.dtype == half.text_encoder.dtype == half.vae.dtype == torch.float16
    assert torch.equal(half.unet.conv_in.weight, full.unet.conv_in.weight.half())
    # A variant picks the files, not the dtype: without dtype the float16 values come back as float32.
    assert StableDiffusionPipeline.from_pretrained(SD14, variant="fp16").unet.dtype == torch.float32
    vae = AutoencoderKL.from_pretrained(SDXL, subfolder="vae", variant="fp16", dtype=torch.float16)
    assert vae.dtype == torch.float16
    with pytest.raises(ValueError, match="variant=fp16"):  # dreamlike has no variant files
        StableDiffusionPipeline.from_pretrained(DREAMLIKE, variant="fp16")


def test_sdxl_loads_by_id_and_generates(offline_hub):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(SDXL, dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.text_encoder_2.config.hidden_act == "gelu"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.unet.config.addition_embed_type == "text_time"
    out = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()


def test_refused_models_say_what_they_are(offline_hub):
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

    refiner = DiffusionPipeline.load_config(SDXL_REFINER)
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and refiner["requires_aesthetics_score"]
    assert refiner["text_encoder"] == [None, None]
    assert CLIPTextConfig.from_pretrained(SD21, subfolder="text_encoder").hidden_act == "gelu"
    assert DDPMScheduler.load_config(SD21, subfolder="scheduler")["prediction_type"] == "v_prediction"
    assert UNet2DConditionModel.from_pretrained(SD15_INPAINTING, subfolder="unet").config.in_channels == 9
    assert DiffusionPipeline.load_config(SD15_INPAINTING)["_class_name"] == "StableDiffusionInpaintPipeline"


def test_clip_loads_by_id_as_model_and_as_image_encoder(offline_hub, astronaut):
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

    model = CLIPModel.from_pretrained(CLIP_B32)
    processor = CLIPProcessor.from_pretrained(CLIP_B32)
    inputs = processor(text=["an astronaut"], images=Image.open(astronaut), return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
        encoder = CLIPVisionModelWithProjection.from_pretrained(CLIP_B32)
        image_embeds = encoder(pixel_values=inputs["pixel_values"]).image_embeds
        logits = model(**inputs).logits_per_image
    image_features = getattr(image_features, "pooler_output", image_features)
    assert image_embeds.shape == (1, 16) and torch.allclose(image_embeds, image_features)
    assert logits.shape == (1, 1)


def test_clipseg_loads_by_id(offline_hub, astronaut):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(CLIPSEG)
    processor = CLIPSegProcessor.from_pretrained(CLIPSEG)
    image = Image.open(astronaut).convert("RGB")
    inputs = processor(text=["a face"], images=[image], return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)  # resized past the config's 64: interpolated positions
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-2:] == (96, 96) and torch.isfinite(logits).all()


def test_arcface_file_downloads_by_name(offline_hub):
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(ARCFACE, ARCFACE_FILE))
    assert path.name == ARCFACE_FILE and path.suffix == ".pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    widths, side = TINY_ARCFACE["widths"], TINY_ARCFACE["input_size"] // 16
    assert state["conv1.weight"].shape == (widths[0], 3, 3, 3)
    assert state["fc.weight"].shape == (TINY_ARCFACE["embedding_dim"], widths[-1] * side * side)


@pytest.mark.parametrize("checkpoint", ["sd14_safetensors", "sd14_ckpt"])
def test_sd1_single_file_round_trip_with_config(offline_hub, sd14_reference, checkpoint):
    from diffusers import StableDiffusionPipeline

    config = str(offline_hub["snapshots"][SD14])
    pipe = StableDiffusionPipeline.from_single_file(str(offline_hub[checkpoint]), config=config)
    for name, reference in sd14_reference.items():
        assert_same_weights(getattr(pipe, name), reference)


def test_sd1_single_file_has_the_original_names_and_schedule(offline_hub):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from hub_fixture import SD14_UNET, unet_to_ldm
    from safetensors.torch import load_file

    checkpoint = load_file(offline_hub["sd14_safetensors"])
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(key.startswith(prefix) for key in checkpoint)
    # The schedule buffers of ldm's DDPM, as in the original checkpoints: SD's schedule.
    schedule = DDPMScheduler.from_pretrained(offline_hub["snapshots"][SD14], subfolder="scheduler")
    assert torch.allclose(checkpoint["alphas_cumprod"], schedule.alphas_cumprod)
    # At SD-1.x's full size the converter yields the names of the original checkpoints (diffusers keys
    # its own detection on the first two).
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD14_UNET)
    names = unet_to_ldm(unet.state_dict(), unet.config).keys()
    assert {
        "output_blocks.11.0.skip_connection.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
        "middle_block.1.proj_out.weight", "time_embed.0.weight", "out.2.weight",
    } <= names


def test_sd1_single_file_without_config_reads_sd15_from_the_cache(offline_hub, sd14_reference):
    """Without `config`, diffusers takes the pipeline layout from its default repo for a v1 checkpoint."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors.torch import load_file

    path = str(offline_hub["sd14_safetensors"])
    assert fetch_diffusers_config(load_file(path)) == {"pretrained_model_name_or_path": SD15}
    pipe = StableDiffusionPipeline.from_single_file(path)
    assert pipe.scheduler.config["_diffusers_version"] == json.loads(
        (offline_hub["snapshots"][SD15] / "scheduler" / "scheduler_config.json").read_text()
    )["_diffusers_version"]
    for name, reference in sd14_reference.items():
        assert_same_weights(getattr(pipe, name), reference)


@pytest.mark.parametrize("with_config", [True, False])
def test_sdxl_single_file_round_trip(offline_hub, with_config):
    from diffusers import StableDiffusionXLPipeline

    snapshot = offline_hub["snapshots"][SDXL]
    config = {"config": str(snapshot)} if with_config else {}  # without: detected as SDXL, read from the cache
    path = str(offline_hub["sdxl_safetensors"])
    pipe = StableDiffusionXLPipeline.from_single_file(path, dtype=torch.float32, **config)
    for name, reference in sd_components(snapshot).items():
        assert_same_weights(getattr(pipe, name), reference)
