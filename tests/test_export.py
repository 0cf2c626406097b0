"""Export to a textual-inversion embedding that diffusers' `load_textual_inversion` reads."""

import json

import pytest
import torch
import torch.nn.functional as F
from _concepts import random_concept, stable_diffusion_pipeline
from safetensors import safe_open

from personamagic.cli import main
from personamagic.export import static_vectors


@pytest.fixture
def concept_dir(tiny_base, tmp_path):
    folder = tmp_path / "me"
    random_concept(tiny_base, window=(300, 700), placeholder="<me>", num_vectors=2).save(folder)
    return folder


def test_static_vectors_mean_and_centre(tiny_base):
    concept = random_concept(tiny_base, window=(300, 700), num_vectors=2)
    mapper = concept.build_mapper()
    norm = mapper.super_embedding.norm()
    mean, description = static_vectors(concept, "mean")
    assert mean.shape == (2, tiny_base.hidden_size) and "[300, 700)" in description
    assert torch.allclose(mean.norm(dim=-1), norm.expand(2))  # the norm of a real word, like the mapper's output
    per_t, _ = mapper(torch.arange(300, 700), concept.mean_image_embed()[None].expand(400, -1))
    assert torch.allclose(mean, F.normalize(per_t.mean(0), dim=-1) * norm, atol=1e-6)
    centre, _ = static_vectors(concept, "centre")
    assert torch.allclose(centre, mapper(torch.tensor([500]), concept.mean_image_embed()[None])[0][0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown vector choice"):
        static_vectors(concept, "last")


def test_exported_file_loads_with_diffusers_load_textual_inversion(concept_dir, tiny_base, tmp_path, capsys):
    output = tmp_path / "embeddings" / "me.safetensors"
    assert main(["export", str(concept_dir), "--format", "textual-inversion", "--output", str(output)]) == 0
    assert "token '<me>', 2 vector(s)" in capsys.readouterr().out
    with safe_open(str(output), framework="pt") as f:
        assert list(f.keys()) == ["<me>"]
        header = json.loads(f.metadata()["personamagic"])
        vectors = f.get_tensor("<me>")
    assert vectors.shape == (2, tiny_base.hidden_size) and header["vectors"] == "mean"

    sd = stable_diffusion_pipeline(tiny_base)
    sd.load_textual_inversion(str(output))
    ids = sd.tokenizer.convert_tokens_to_ids(["<me>", "<me>_1"])  # multi-vector tokens: tok, tok_1
    assert torch.equal(sd.text_encoder.get_input_embeddings().weight[ids], vectors)
    assert sd.maybe_convert_prompt("a photo of <me>", sd.tokenizer) == "a photo of <me> <me>_1"
    image = sd("a photo of <me>", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 128, 128, 3)


def test_export_defaults_and_mistakes(concept_dir, tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(concept_dir)]) == 0  # ./me.safetensors, token = the placeholder
    assert (tmp_path / "me.safetensors").is_file()
    code = main(["export", str(concept_dir)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["export", str(concept_dir), "--overwrite", "--vectors", "centre", "--token", "<pm-me>"]) == 0
    with safe_open("me.safetensors", framework="pt") as f:
        assert list(f.keys()) == ["<pm-me>"]
    random_concept(tiny_base).save(tmp_path / "s-star")  # placeholder "S*": token from the file name
    assert main(["export", str(tmp_path / "s-star"), "-o", "Grace Hopper.safetensors"]) == 0
    assert "token '<grace-hopper>'" in capsys.readouterr().out
    assert main(["export", str(concept_dir), "-o", "me.pt"]) == 2
    assert main(["export", str(tmp_path / "nothing")]) == 2
