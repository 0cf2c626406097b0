"""PhotoMaker v1 plug-in: ID encoder, weights file, LoRA, on a tiny model in the real file format.

What is real and what is tiny: the *file layout* (`{"id_encoder": ..., "lora_weights": ...}` saved with
`torch.save`, the official `id_encoder.*` key names, the LoRA's `unet.*.processor.to_*_lora.*` keys),
the *loader* (`load_photomaker`, the code the official `photomaker-v1.bin` takes) and diffusers' own
LoRA loading are real; the *weights* are random and tiny (a 2-layer 32-wide CLIP vision tower, an
SDXL-shaped UNet whose prompt embeddings are 32 + 48 = 80 wide). No real PhotoMaker weights are used.
"""

import os
import pickle

import pytest
import torch
from diffusers import UNet2DConditionModel

from personamagic.adapters.photomaker.encoder import PhotoMakerIDEncoder
from personamagic.adapters.photomaker.lora import LORA_ADAPTER_NAME, apply_photomaker_lora, set_photomaker_lora_scale
from personamagic.adapters.photomaker.weights import load_photomaker
from personamagic.models.tiny import build_tiny_photomaker, save_tiny_photomaker_weights
from personamagic.errors import ModelLoadError

TEXT_WIDTH = 80  # tiny SDXL: 32 (first text encoder) + 48 (second)
POOLED_WIDTH = 48  # the second text encoder's pooled output
TIME_EMBED_DIM = 8  # width of each of SDXL's six micro-conditioning numbers' embedding


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """An SDXL-shaped UNet (text_time added conditioning, linear projections) at a tiny size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED_DIM,
            norm_num_groups=4,
        ).eval()


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    prompt_embeds = torch.randn(1, 7, TEXT_WIDTH, generator=g)
    added = {"text_embeds": torch.randn(1, POOLED_WIDTH, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, unet):
    encoder, _ = build_tiny_photomaker(seed=0, text_width=TEXT_WIDTH)
    return save_tiny_photomaker_weights(tmp_path_factory.mktemp("photomaker") / "photomaker-v1.bin", encoder, unet)


def id_images(processor, count=2, seed=0):
    """(1, count, 3, 32, 32) preprocessed random photos."""
    g = torch.Generator().manual_seed(seed)
    photos = [(torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(count)]
    return torch.as_tensor(processor(images=photos, return_tensors="pt").pixel_values)[None]


def test_file_has_the_official_layout(weights_file):
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    assert list(state) == ["id_encoder", "lora_weights"]
    encoder_keys = set(state["id_encoder"])
    assert {
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "vision_model.post_layernorm.bias",
        "visual_projection.weight",
        "visual_projection_2.weight",
        "fuse_module.mlp1.layernorm.weight",
        "fuse_module.mlp1.fc1.weight",
        "fuse_module.mlp2.fc2.bias",
        "fuse_module.layer_norm.weight",
    } <= encoder_keys
    assert not any(key.endswith("position_ids") for key in encoder_keys)
    assert "visual_projection.bias" not in encoder_keys and "visual_projection_2.bias" not in encoder_keys
    assert (
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor.to_out_lora.up.weight"
        in (state["lora_weights"])
    )


def test_load_round_trips_exactly(weights_file):
    original, processor = build_tiny_photomaker(seed=0, text_width=TEXT_WIDTH)
    encoder, lora = load_photomaker(weights_file)
    assert encoder.config == original.config
    assert encoder.config.num_attention_heads == 1 and encoder.config.image_size == 32
    loaded, expected = encoder.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    stored = torch.load(weights_file, map_location="cpu", weights_only=True)["lora_weights"]
    assert lora.keys() == stored.keys() and all(torch.equal(lora[k], stored[k]) for k in stored)

    pixels = id_images(processor)
    prompt_embeds = torch.randn(1, 7, TEXT_WIDTH)
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, 2:4] = True
    with torch.no_grad():
        assert torch.equal(encoder(pixels, prompt_embeds, mask), original(pixels, prompt_embeds, mask))


def test_tiny_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, _ = build_tiny_photomaker(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = build_tiny_photomaker(seed=3)
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_id_embeds_shape():
    encoder, processor = build_tiny_photomaker(seed=0, text_width=TEXT_WIDTH, projection_dim=32, projection_dim_2=48)
    pixels = torch.cat([id_images(processor, count=3, seed=0), id_images(processor, count=3, seed=1)])  # (2, 3, ...)
    assert pixels.shape == (2, 3, 3, 32, 32)
    with torch.no_grad():
        embeds = encoder.id_embeds(pixels)
    assert embeds.shape == (2, 3, 32 + 48) and torch.isfinite(embeds).all()
    # one image's embedding does not depend on the others in the batch
    with torch.no_grad():
        alone = encoder.id_embeds(pixels[1:, 2:])
    torch.testing.assert_close(alone[0, 0], embeds[1, 2])


def test_fuse_writes_exactly_the_class_token_positions():
    encoder, _ = build_tiny_photomaker(seed=0, text_width=TEXT_WIDTH)
    g = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(2, 9, TEXT_WIDTH, generator=g)
    id_embeds = torch.randn(2, 2, encoder.config.id_embed_dim, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:5] = True  # row 0: the class word repeated for two ID images
    mask[1, 6] = True  # row 1: one mark, takes the row's first ID image
    before = prompt_embeds.clone()
    with torch.no_grad():
        fused = encoder.fuse(prompt_embeds, id_embeds, mask)
    assert torch.equal(prompt_embeds, before)  # the input is not modified
    assert torch.equal(fused[~mask], prompt_embeds[~mask])  # bit-identical everywhere else
    assert (fused[mask] != prompt_embeds[mask]).any(dim=-1).all()  # every marked position changes
    with torch.no_grad():
        expected = encoder.fuse_module(prompt_embeds[[0, 0, 1], [3, 4, 6]], id_embeds[[0, 0, 1], [0, 1, 0]])
    assert torch.equal(fused[mask], expected)

    with pytest.raises(ValueError, match="more than"):
        encoder.fuse(prompt_embeds, id_embeds[:, :1], mask)
    with pytest.raises(ValueError, match="bool"):
        encoder.fuse(prompt_embeds, id_embeds, mask.long())


def test_gradient_reaches_the_base_embedding_not_the_frozen_encoder():
    encoder, processor = build_tiny_photomaker(seed=0, text_width=TEXT_WIDTH)
    encoder.requires_grad_(False)
    with torch.no_grad():
        id_embeds = encoder.id_embeds(id_images(processor, count=1))
    base = torch.randn(1, TEXT_WIDTH, requires_grad=True)  # stands for the mapper's output at S*
    context = torch.randn(1, 6, TEXT_WIDTH)
    prompt_embeds = torch.cat([context[:, :2], base[:, None], context[:, 2:]], dim=1)  # (1, 7, C), S* at 2
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, 2] = True
    encoder.fuse(prompt_embeds, id_embeds, mask).square().sum().backward()
    assert base.grad is not None and base.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_lora_loads_into_an_sdxl_unet_and_scales(weights_file):
    unet = tiny_sdxl_unet()
    reference = unet_output(unet)
    _, lora = load_photomaker(weights_file)
    apply_photomaker_lora(unet, lora, scale=0.0)
    assert LORA_ADAPTER_NAME in unet.peft_config
    assert torch.equal(unet_output(unet), reference)  # zero strength: exactly the UNet without it
    set_photomaker_lora_scale(unet, 1.0)
    assert not torch.allclose(unet_output(unet), reference, atol=1e-4)
    set_photomaker_lora_scale(unet, 0.0)
    assert torch.equal(unet_output(unet), reference)
    with pytest.raises(ModelLoadError, match="already loaded"):
        apply_photomaker_lora(unet, lora, scale=1.0)


def test_lora_through_an_sdxl_pipeline_is_the_official_call(weights_file):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    _, lora = load_photomaker(weights_file)
    bare = tiny_sdxl_unet()
    apply_photomaker_lora(bare, lora, scale=1.0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(),
    )
    apply_photomaker_lora(pipe, lora, scale=1.0)  # pipe.load_lora_weights(..., adapter_name="photomaker")
    assert pipe.get_list_adapters() == {"unet": [LORA_ADAPTER_NAME]}
    assert torch.equal(unet_output(pipe.unet), unet_output(bare))


def test_safetensors_with_flat_prefixes_loads_the_same(weights_file, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    flat = {f"{group}.{key}": tensor.contiguous() for group in state for key, tensor in state[group].items()}
    save_file(flat, tmp_path / "photomaker-v1.safetensors")
    encoder, lora = load_photomaker(tmp_path / "photomaker-v1.safetensors")
    reference, _ = load_photomaker(weights_file)
    assert all(
        torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert lora.keys() == state["lora_weights"].keys()


def test_lora_for_another_unet_is_one_user_error(weights_file):
    _, lora = load_photomaker(weights_file)
    wider = {  # every down weight reads one feature more than the layer has
        key: torch.zeros(tensor.shape[0], tensor.shape[1] + 1) if key.endswith("down.weight") else tensor
        for key, tensor in lora.items()
    }
    with pytest.raises(ModelLoadError, match="does not fit this UNet"):
        apply_photomaker_lora(tiny_sdxl_unet(), wider, scale=1.0)


class _MarkerOnUnpickle:
    """Unpickling this creates `marker`: stands for any code a pickled object can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _rewrite(weights_file, tmp_path, edit):
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    path = tmp_path / "edited.bin"
    torch.save(edit(state), path)
    return path


def _rename_fuse_keys(state):
    state["id_encoder"] = {key.replace("fuse_module.", "fuser."): v for key, v in state["id_encoder"].items()}
    return state


def _wrong_projection_shape(state):
    state["id_encoder"]["visual_projection_2.weight"] = torch.zeros(48, 31)
    return state


def _bad_lora_key(state):
    state["lora_weights"]["unet.mid_block.attentions.0.to_q.lora_A.weight"] = torch.zeros(4, 80)
    return state


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: [state], "holds a list"),
        (lambda state: {"lora_weights": state["lora_weights"]}, "id_encoder"),
        (lambda state: {**state, "extra": {}}, "exactly"),
        (_rename_fuse_keys, "fuse_module"),
        (_wrong_projection_shape, "visual_projection_2"),
        (_bad_lora_key, "LoRA key"),
    ],
)
def test_malformed_weights_are_one_user_error(weights_file, tmp_path, edit, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        load_photomaker(_rewrite(weights_file, tmp_path, edit))
    assert "\n" not in str(info.value)


def test_pickled_code_is_refused_without_running_it(tmp_path):
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(_MarkerOnUnpickle(control)))
    assert control.exists()  # the object does run code when fully unpickled

    marker = tmp_path / "marker-ran"
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {"payload": _MarkerOnUnpickle(marker)}, "lora_weights": {}}, path)
    with pytest.raises(ModelLoadError, match="refusing"):
        load_photomaker(path)
    assert not marker.exists()


def test_unreadable_or_missing_files_are_one_user_error(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="not a PyTorch weights file"):
        load_photomaker(garbage)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_photomaker(str(tmp_path / "missing.bin"))
    with pytest.raises(ModelLoadError, match="hub repo"):
        load_photomaker("TencentARC/PhotoMaker", local_files_only=True)  # not in this machine's cache


def test_encoder_keys_match_the_official_class_layout():
    """Submodule names of the official `PhotoMakerIDEncoder(CLIPVisionModelWithProjection)`."""
    encoder, _ = build_tiny_photomaker()
    assert isinstance(encoder, PhotoMakerIDEncoder)
    assert {name for name, _ in encoder.named_children()} == {
        "vision_model",
        "visual_projection",
        "visual_projection_2",
        "fuse_module",
    }
    assert isinstance(encoder.fuse_module.mlp1.act_fn, torch.nn.GELU)
    assert encoder.fuse_module.mlp1.act_fn.approximate == "none"
