"""The real-size random models the GPU benchmarks time (`random-sd1`, `random-sdxl`), built on the meta
device (no memory, no weights): their sizes are those of the published models, so a timing of them is a
timing of SD-1.x and SDXL."""

import pytest

from personamagic.models.tiny import build_random_sd1_components, build_random_sdxl_components


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# parameter counts of the published checkpoints (CompVis/stable-diffusion-v1-4,
# stabilityai/stable-diffusion-xl-base-1.0): UNet, VAE, text encoder(s)
@pytest.mark.parametrize("build, unet, vae, text_encoders", [
    (build_random_sd1_components, 859_520_964, 83_653_863, [123_060_480]),
    (build_random_sdxl_components, 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
])
def test_the_random_models_have_the_published_models_sizes(build, unet, vae, text_encoders):
    components = build(device="meta")
    assert _parameters(components.unet) == unet
    assert _parameters(components.vae) == vae
    assert [_parameters(t) for t in components.text_encoders] == text_encoders
