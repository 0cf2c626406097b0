"""IP-Adapter plug-in (paper, Table 3) with a tiny IP-Adapter in the real file format.

What is real and what is tiny: the IP-Adapter *file format* and *loading* are diffusers' own
(`load_ip_adapter` reading an `image_proj.*` + `ip_adapter.{k}.to_{k,v}_ip.weight` safetensors file,
building `ImageProjection` and `IPAdapterAttnProcessor2_0`, loading the image encoder folder with
`CLIPVisionModelWithProjection.from_pretrained`); the *weights* are random and tiny (4 image tokens of
the tiny UNet's width, a 2-layer 32-wide CLIP vision model). No real IP-Adapter weights are used.
"""

import numpy as np
import pytest
import torch
from _concepts import random_concept
from PIL import Image
from safetensors.torch import save_file

from personamagic.method.attention import PersonaMagicAttnProcessor, attention_processors
from personamagic.cli import main
from personamagic.concept import Concept
from personamagic.jobs.image_record import read_image_metadata
from personamagic.adapters.ip_adapter import IPAdapterSpec
from personamagic.pipeline import PersonaMagicPipeline
from personamagic.method.stages import capturing_attention

WEIGHTS = "ip-adapter_tiny.safetensors"


def make_tiny_ip_adapter(folder, unet, image_embed_dim=16):
    """Write a random IP-Adapter for `unet` in the layout diffusers' `load_ip_adapter` reads."""
    from personamagic.models import build_tiny_image_encoder

    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * width, image_embed_dim, generator=g) * 0.2,
        "image_proj.proj.bias": torch.zeros(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    channels = unet.config.block_out_channels
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for key_id, name in zip(range(1, 2 * len(cross), 2), cross):  # diffusers numbers cross-attention 1, 3, 5...
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        hidden = channels[-1] if block is None else (channels[::-1] if name.startswith("up") else channels)[block]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.2
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS))
    build_tiny_image_encoder()[0].save_pretrained(folder / "image_encoder")
    return folder / WEIGHTS


@pytest.fixture
def weights(tmp_path, tiny_base):
    return make_tiny_ip_adapter(tmp_path / "ip", tiny_base.unet)


@pytest.fixture
def photo(astronaut):
    return Image.open(astronaut).convert("RGB")


@pytest.fixture
def pipe(tiny_base, weights):
    pipe = PersonaMagicPipeline.from_base(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=WEIGHTS)  # the exact diffusers call
    return pipe


def unet_inputs(pipe, photo, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    embeds = pipe.prepare_ip_adapter(photo, None, batch_size=1, do_cfg=True)  # [(2, 1, E)]
    return latents, hidden, {"image_embeds": embeds}


@torch.no_grad()
def test_processors_keep_the_ip_adapter_and_apply_the_value_residual(pipe, photo):
    unet = pipe.unet
    latents, hidden, added = unet_inputs(pipe, photo)
    before = dict(unet.attn_processors)
    cross = {type(p).__name__ for n, p in before.items() if n.endswith("attn2.processor")}
    assert cross == {"IPAdapterAttnProcessor2_0"}
    outputs = {}
    for scale in (0.6, 0.0):
        pipe.set_ip_adapter_scale(scale)
        reference = unet(latents, 500, hidden, added_cond_kwargs=added).sample  # diffusers' IP-Adapter attention
        with attention_processors(unet):
            assert all(isinstance(p, PersonaMagicAttnProcessor) for p in unet.attn_processors.values())
            outputs[scale] = unet(latents, 500, hidden, added_cond_kwargs=added).sample
        assert torch.allclose(outputs[scale], reference, atol=1e-5)
    assert not torch.allclose(outputs[0.6], outputs[0.0])  # the scale is read from the adapter, live
    values = hidden.clone()
    values[:, 5] += 1.0
    with attention_processors(unet):
        shifted = unet(latents, 500, hidden, added_cond_kwargs=added,
                       cross_attention_kwargs={"value_hidden_states": values}).sample
    assert not torch.allclose(shifted, outputs[0.0])  # the residual on V still acts with the adapter plugged in
    assert all(unet.attn_processors[n] is p for n, p in before.items())  # restored


@torch.no_grad()
def test_attention_capture_keeps_the_ip_adapter(pipe, photo):
    latents, hidden, added = unet_inputs(pipe, photo)
    with attention_processors(pipe.unet):  # as during training: PersonaMagic processors, then the capture
        reference = pipe.unet(latents, 500, hidden, added_cond_kwargs=added).sample
        with capturing_attention(pipe.unet, torch.tensor([5])) as store:
            captured = pipe.unet(latents, 500, hidden, added_cond_kwargs=added).sample
    assert store and all(m.shape[-1] == 1 for m in store.values())
    assert torch.allclose(captured, reference, atol=1e-4)


def test_generation_with_the_ip_adapter(pipe, tiny_base, photo):
    pipe.load_concept(random_concept(tiny_base, window=(0, 1000)))
    before = dict(pipe.unet.attn_processors)

    def sample(**kwargs):
        return pipe("a photo of S*", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    with_photo = sample(ip_adapter_image=photo)
    assert with_photo.shape == (1, 128, 128, 3) and np.isfinite(with_photo).all()
    pipe.set_ip_adapter_scale(0.0)
    assert np.abs(sample(ip_adapter_image=photo) - with_photo).max() > 1e-3
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    with pytest.raises(ValueError, match="ip_adapter_image"):
        sample()


def test_training_with_the_ip_adapter(astronaut, weights, tmp_path, monkeypatch):
    """personalize(..., ip_adapter=...): the UNet gets each photo's image tokens at every training step."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from personamagic.jobs.personalize import personalize
    from personamagic.training import TrainConfig

    seen = []
    original = MultiIPAdapterImageProjection.forward
    monkeypatch.setattr(MultiIPAdapterImageProjection, "forward",
                        lambda self, embeds: seen.append(embeds[0].shape) or original(self, embeds))
    config = TrainConfig(max_train_steps=1, stage_window=(400, 800), use_id_loss=False, te_weight=0.0)
    spec = IPAdapterSpec.parse(str(weights), scale=0.7)
    result = personalize([str(astronaut)], tmp_path / "concept", config, model="tiny", ip_adapter=spec)
    assert seen == [(2, 1, 16)]  # batch 2, one photo each, the tiny encoder's 16-d embedding
    assert result.concept.extra["ip_adapter"] == {"weights": str(weights), "scale": 0.7}


def test_train_cli_with_the_ip_adapter(astronaut, weights, tmp_path, capsys):
    argv = ["train", str(astronaut), "--model", "tiny", "--steps", "1", "--stage-window", "400:800",
            "--no-id-loss", "--checkpoint-every", "0", "--ip-adapter-scale", "0.5"]
    assert main(argv + ["--ip-adapter", str(weights), "-o", str(tmp_path / "c")]) == 0
    assert Concept.load(tmp_path / "c").extra["ip_adapter"] == {"weights": str(weights), "scale": 0.5}
    capsys.readouterr()
    assert main(argv + ["--ip-adapter", "nothing.safetensors", "-o", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--ip-adapter 'nothing.safetensors'" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_generate_cli_with_the_ip_adapter_and_from_image(tiny_base, weights, astronaut, tmp_path, capsys):
    random_concept(tiny_base).save(tmp_path / "me")
    argv = ["generate", str(tmp_path / "me"), "-p", "a photo of S*", "--steps", "2", "-n", "1",
            "--ip-adapter", str(weights), "--ip-adapter-image", str(astronaut), "--ip-adapter-scale", "0.6"]
    assert main(argv + ["-o", str(tmp_path / "out")]) == 0
    (made,) = (tmp_path / "out").glob("*.png")
    meta = read_image_metadata(made)["ip_adapter"]
    assert meta["weights"] == str(weights) and meta["scale"] == 0.6 and meta["images"][0]["path"] == str(astronaut)
    assert main(["generate", "--from-image", str(made), "-o", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
    capsys.readouterr()
    bad = argv[:-6] + ["--ip-adapter", "nobody/nothing", "--ip-adapter-image", str(astronaut)]
    assert main(bad + ["-o", str(tmp_path / "x")]) == 2
    assert "--ip-adapter 'nobody/nothing'" in capsys.readouterr().err


def test_ip_adapter_spec_parsing(weights):
    hub = IPAdapterSpec.parse("h94/IP-Adapter/models/ip-adapter_sd15.safetensors")
    assert (hub.model, hub.subfolder, hub.weight_name) == ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors")
    assert hub.describe() == "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
    local = IPAdapterSpec.parse(str(weights))
    assert (local.model, local.subfolder, local.weight_name) == (str(weights.parent), "", WEIGHTS)
    assert local.describe() == str(weights)


def test_an_ip_adapter_of_another_family_is_one_line_naming_the_mismatch(tmp_path):
    from personamagic.adapters.ip_adapter import load_ip_adapter
    from personamagic.errors import ModelLoadError
    from personamagic.models import build_tiny_components, build_tiny_sdxl_components

    path = make_tiny_ip_adapter(tmp_path, build_tiny_sdxl_components().unet)  # an SDXL adapter...
    pipe = PersonaMagicPipeline.from_base(build_tiny_components())  # ...on an SD-1.x model
    spec = IPAdapterSpec.parse(str(path))
    with pytest.raises(ModelLoadError, match="does not fit this base model's UNet") as raised:
        load_ip_adapter(pipe, spec)
    assert "\n" not in str(raised.value) and "ignore_mismatched_sizes" not in str(raised.value)
