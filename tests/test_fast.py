"""The optimised training step computes what the plain step computes (issue: Performance)."""

from dataclasses import replace

import pytest
import torch

from personamagic.method.conditioning import EmbeddingOverride, LayerAttention, causal_mask
from personamagic.method.tokens import PlaceholderTokens, tokenize
from personamagic.training.face_patches import face_patches, gather_patches
from personamagic.training.graph import StaticTextEncoder
from personamagic.faces import prepare_photo
from personamagic.identity import alignment_theta, build_tiny_identity_model, warp_faces
from personamagic.faces.masks import landmark_mask
from personamagic.jobs.personalize import pil_to_tensor
from personamagic.training import Trainer, TrainConfig, TrainingDiverged, prepare_training_data


@pytest.fixture
def data_and_encoder(tiny_base, astronaut):
    photo = prepare_photo(astronaut, tiny_base.resolution)
    encoder = build_tiny_identity_model()
    theta = alignment_theta(photo.face.landmarks, (tiny_base.resolution,) * 2, landmarks_order="yunet")[None]
    data = prepare_training_data(
        tiny_base.vae,
        pil_to_tensor(photo.image)[None],
        torch.from_numpy(landmark_mask(photo.face, tiny_base.resolution))[None, None],
        torch.randn(1, 16, generator=torch.Generator().manual_seed(0)),
        theta,
        encoder,
    )
    return data, encoder


def config(**overrides) -> TrainConfig:
    return replace(TrainConfig(stage_window=(400, 800), max_train_steps=4, seed=5, bypass_drop=0.0), **overrides)


def losses_and_grads(base, data, encoder, cfg):
    with Trainer(base, data, cfg, encoder) as trainer:
        batch = trainer.sample_batch()
        out = trainer.losses(batch)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in trainer.mapper.named_parameters()}
    return {k: v.item() for k, v in out.terms.items()}, grads


def test_static_text_encoder_equals_the_model(tiny_base):
    text_encoder = tiny_base.text_encoder
    assert StaticTextEncoder.supported(text_encoder)
    tokens = PlaceholderTokens(tiny_base.tokenizer, "S*", 1, slot=0)
    ids = tokenize(tiny_base.tokenizer, [tokens.rewrite("a photo of S*"), tokens.rewrite("S* playing chess")])
    override = EmbeddingOverride(text_encoder)
    try:
        with override.vectors({tokens.ids[0]: torch.randn(2, tiny_base.hidden_size)}):
            reference = text_encoder(ids).last_hidden_state
            hidden = StaticTextEncoder()(text_encoder, ids, None)[0]
    finally:
        override.remove()
    assert torch.allclose(hidden, reference, atol=1e-6)


def test_last_layer_attention_is_eager_there_only(tiny_base):
    text_encoder = tiny_base.text_encoder
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    ids = tokenize(tiny_base.tokenizer, ["a photo of a face", "a dog playing chess"])
    text_encoder.set_attn_implementation("eager")
    try:
        reference = text_encoder(ids, output_attentions=True)
    finally:
        text_encoder.set_attn_implementation("sdpa")
    original = layers[-1].self_attn.config
    last = LayerAttention(text_encoder)
    try:
        hidden = text_encoder(ids).last_hidden_state
        kernels = [layer.self_attn.config._attn_implementation for layer in layers]
        assert kernels == ["sdpa"] * (len(layers) - 1) + ["eager"]
        probabilities = last.take()
        with pytest.raises(RuntimeError, match="no text-encoder forward"):
            last.take()
        # However the layer is called, it attends causally.
        states = torch.randn(1, ids.shape[1], tiny_base.hidden_size)
        masked = last.module(states, causal_mask(ids.shape[1], states.device, states.dtype))[0]
        for call in (lambda: last.module(states), lambda: last.module(states, None),
                     lambda: last.module(hidden_states=states, attention_mask=None)):
            assert torch.allclose(call()[0], masked, atol=1e-6)
    finally:
        last.remove()
    assert layers[-1].self_attn.config is original and original._attn_implementation == "sdpa"
    assert torch.allclose(hidden, reference.last_hidden_state, atol=1e-5)
    assert torch.allclose(probabilities, reference.attentions[-1], atol=1e-6)


def test_optimised_step_matches_the_plain_step(tiny_base, data_and_encoder):
    data, encoder = data_and_encoder
    plain_losses, plain_grads = losses_and_grads(tiny_base, data, encoder, config(optimize=False))
    fast_losses, fast_grads = losses_and_grads(tiny_base, data, encoder, config(id_face_patch=False))
    assert set(plain_losses) == set(fast_losses) == {"mse", "te", "id"}
    for k in plain_losses:
        assert fast_losses[k] == pytest.approx(plain_losses[k], rel=1e-5, abs=1e-7)
    for name, grad in plain_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_face_patch_identity_loss_is_close_to_the_full_decode(tiny_base, data_and_encoder):
    data, encoder = data_and_encoder
    full, _ = losses_and_grads(tiny_base, data, encoder, config(id_face_patch=False))
    patch, _ = losses_and_grads(tiny_base, data, encoder, config())
    assert patch["mse"] == pytest.approx(full["mse"], rel=1e-5)
    # An approximation (the decoder sees less context): same scale, within 25% on the tiny model.
    assert patch["id"] == pytest.approx(full["id"], rel=0.25)


def test_patch_geometry_matches_the_full_image_warp(tiny_base, data_and_encoder):
    data, _ = data_and_encoder
    h, w = data.latent_mean.shape[-2:]
    scale = tiny_base.vae_scale_factor
    indices, (ph, pw), patch_theta = face_patches(data.face_theta, (h, w), scale, margin=1)
    assert ph * pw < h * w and ph <= h and pw <= w
    # Latent gather = slicing at the patch position.
    latents = torch.randn(1, 4, h, w)
    patch = gather_patches(latents, indices, (ph, pw))
    y0, x0 = divmod(indices[0, 0].item(), w)
    assert torch.equal(patch, latents[:, :, y0:y0 + ph, x0:x0 + pw])
    # Pixel-space check: warping the patch with the patch theta = warping the full image.
    image = torch.rand(1, 3, h * scale, w * scale)
    pixels = image[:, :, y0 * scale:(y0 + ph) * scale, x0 * scale:(x0 + pw) * scale]
    full = warp_faces(image, data.face_theta, 112)
    cropped = warp_faces(pixels, patch_theta, 112)
    assert (full - cropped).abs().max() < 1e-4


def test_trained_concept_does_not_depend_on_the_path(tiny_base, data_and_encoder):
    data, encoder = data_and_encoder
    states = []
    for cfg in (config(optimize=False, max_train_steps=6), config(id_face_patch=False, max_train_steps=6, sync_every=4)):
        with Trainer(tiny_base, data, cfg, encoder) as trainer:
            seen = []
            trainer.train(progress=lambda step, total, logs: seen.append(step))
            states.append(trainer.mapper.state_dict())
        assert seen == [1, 2, 3, 4, 5, 6]  # every step reported, also when read back in bursts
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, rtol=1e-4, atol=1e-6), name


def test_gradient_accumulation_matches_the_full_batch(tiny_base, data_and_encoder):
    data, encoder = data_and_encoder
    grads = []
    for accumulation in (1, 2):
        cfg = config(optimize=False, gradient_accumulation_steps=accumulation)
        with Trainer(tiny_base, data, cfg, encoder) as trainer:
            trainer.optimize_step(trainer.stage_window)
            grads.append({n: p.grad.clone() for n, p in trainer.mapper.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-4, atol=1e-7), name


def test_late_read_back_still_names_the_diverged_step(tiny_base, data_and_encoder):
    data, encoder = data_and_encoder
    with Trainer(tiny_base, data, config(max_train_steps=8, sync_every=8), encoder) as trainer:
        trainer.train(num_steps=2)
        data.latent_mean.fill_(float("nan"))
        with pytest.raises(TrainingDiverged, match="at step 3"):
            trainer.train()


def test_cuda_graph_sampling_needs_cuda(tiny_base):
    from personamagic.errors import SettingsError
    from personamagic.pipeline import PersonaMagicPipeline

    pipe = PersonaMagicPipeline.from_base(tiny_base)
    with pytest.raises(SettingsError, match="CUDA"):
        pipe.enable_cuda_graph()
    assert pipe.graphed_unet is None


# -- torch.compile (a GPU lever; here traced with aot_eager, which runs dynamo and AOTAutograd without
# generating code, so the CPU checks the capture, the guards and the arithmetic in seconds) -------------


def test_compiled_step_matches_and_does_not_recompile(tiny_base, data_and_encoder):
    import torch._dynamo

    data, encoder = data_and_encoder
    eager_losses, eager_grads = losses_and_grads(tiny_base, data, encoder, config())
    torch._dynamo.reset()
    cfg = config(compile=True, compile_backend="aot_eager")
    with Trainer(tiny_base, data, cfg, encoder) as trainer:
        assert trainer.objective.unet is not tiny_base.unet
        batch = trainer.sample_batch()
        out = trainer.losses(batch)
        out.total.backward()
        compiled_losses = {k: v.item() for k, v in out.terms.items()}
        for name, p in trainer.mapper.named_parameters():
            assert torch.allclose(p.grad, eager_grads[name], rtol=1e-4, atol=1e-7), name
        with torch._dynamo.config.patch(error_on_recompile=True):
            trainer.train(num_steps=3)  # new timesteps, noise and mapper weights: same compiled code
            trainer.capture_attention(2, 4)  # the partition capture runs the plain UNet
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert tiny_base.unet.attn_processors  # the base model is left usable
    torch._dynamo.reset()


def test_compiled_sampling_matches_eager_and_reuses_its_code(tiny_base):
    import numpy as np
    import torch._dynamo
    from _concepts import random_concept

    from personamagic.pipeline import PersonaMagicPipeline

    pipe = PersonaMagicPipeline.from_base(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(random_concept(tiny_base, window=(0, 1000)))

    def sample(seed, prompt="a photo of S*"):
        return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np").images

    eager = sample(0)
    torch._dynamo.reset()
    pipe.enable_compile(backend="aot_eager", channels_last=False)
    try:
        assert np.abs(sample(0) - eager).max() < 1e-5
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert np.abs(sample(1) - sample(1, "S* on the beach")).max() > 1e-3  # other seeds and prompts
    finally:
        pipe.enable_compile(False)
        torch._dynamo.reset()
    assert pipe._denoiser() is pipe.unet
