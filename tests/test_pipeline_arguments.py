"""Bad arguments of `PersonaMagicPipeline.__call__` and `attach_concepts` from Python: one clear error that
names the argument and what it allows, before any work (no IndexError, ZeroDivisionError or NaN pixels)."""

import numpy as np
import pytest
import torch
from _concepts import random_concept
from PIL import Image

from personamagic.models import load_base_model
from personamagic.pipeline import PersonaMagicPipeline, attach_concepts


@pytest.fixture(scope="module")
def pipe():
    """The tiny model with one concept; module-wide, as a rejected call changes nothing."""
    base = load_base_model("tiny", device="cpu")
    pipe = PersonaMagicPipeline.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(random_concept(base))
    return pipe


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be a whole number from 1 to 1000"),
        ({"num_inference_steps": -1}, ValueError, "num_inference_steps must be a whole number from 1 to 1000"),
        ({"num_inference_steps": 1001}, ValueError, "num_inference_steps must be a whole number from 1 to 1000"),
        ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps must be a whole number"),
        ({"prompt": []}, ValueError, "prompt must hold at least one prompt"),
        ({"prompt": 5}, TypeError, "prompt must be a str or a list of str"),
        ({"prompt": ["a photo of S*", None]}, TypeError, "prompt must be a str or a list of str"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be a whole number >= 1"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, ValueError, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": "8"}, TypeError, "guidance_scale must be a finite number >= 0"),
        ({"photomaker_images": [Image.new("RGB", (64, 64))]}, ValueError,
         "photomaker_images given but no PhotoMaker is loaded"),
        ({"negative_prompt": 5}, TypeError, "negative_prompt must be None, a str or a list of str"),
    ],
    ids=["steps-0", "steps-negative", "steps-above-T", "steps-float", "prompt-empty-list", "prompt-int",
         "prompt-list-with-none", "images-per-prompt-0", "guidance-nan", "guidance-inf", "guidance-negative",
         "guidance-str", "photomaker-images-without-photomaker", "negative-prompt-int"],
)
def test_bad_call_argument_is_one_clear_error(pipe, kwargs, error, message):
    kwargs = {"prompt": "a photo of S*", "num_inference_steps": 1, "output_type": "np", **kwargs}
    with pytest.raises(error, match=message) as raised:
        pipe(**kwargs)
    assert type(raised.value) is error  # not a subclass raised from deeper in


def test_attach_concepts_needs_a_stable_diffusion_pipeline():
    with pytest.raises(TypeError, match="attach_concepts needs a diffusers Stable Diffusion pipeline"):
        attach_concepts(object(), ["c1"])


def test_valid_call_with_the_smallest_settings_still_samples(pipe):
    images = pipe(["a photo of S*", "S* on a beach"], num_inference_steps=1, guidance_scale=0,
                  num_images_per_prompt=np.int64(2), generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (4, 128, 128, 3) and np.isfinite(images).all()
