"""Concept files: exact round trip, no pickle, atomic writes, shape checks."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_helpers import run_cli
from personamagic.concept import Concept
from personamagic.errors import ConceptError
from personamagic.method.mapper import MapperConfig, StageMapper


def make_concept(seed=0, hidden=32) -> Concept:
    torch.manual_seed(seed)
    mapper = StageMapper(MapperConfig(text_embed_dim=hidden, image_embed_dim=16, num_vectors=2), torch.randn(hidden))
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(torch.randn_like(p))
    return Concept(
        mapper_state=mapper.state_dict(),
        image_embeds=torch.randn(1, 16),
        placeholder="S*",
        supercategory="face",
        stage_window=(412, 781),
        num_train_timesteps=1000,
        base_model="tiny",
        text_encoder_hidden_size=hidden,
        mapper_config=mapper.config.to_dict(),
        training={"learning_rate": 5e-5},
        stages={"iou": [0.1, 0.5]},
    )


def test_round_trip_is_exact(tmp_path):
    concept = make_concept()
    path = concept.save(tmp_path / "me")
    assert path.name == "concept.safetensors" and [p.name for p in path.parent.iterdir()] == [path.name]
    loaded = Concept.load(tmp_path / "me")
    assert loaded.metadata() == concept.metadata()
    assert all(torch.equal(loaded.mapper_state[k], v) for k, v in concept.mapper_state.items())
    assert torch.equal(loaded.image_embeds, concept.image_embeds)
    assert loaded.fingerprint() == concept.fingerprint()
    t, e = torch.tensor([500]), concept.image_embeds
    a, b = concept.build_mapper()(t, e), loaded.build_mapper()(t, e)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    path = make_concept().save(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["personamagic"])
        keys = set(f.keys())
    assert meta["format_version"] == 2 and meta["stage_window"] == [412, 781] and meta["family"] == "sd1"
    assert meta["text_encoder_hidden_size"] == 32 and meta["package_version"]
    assert "image_embeds" in keys and "mapper.embedding_head.weight" in keys


def test_fingerprint_changes_with_weights():
    assert make_concept(seed=0).fingerprint() != make_concept(seed=1).fingerprint()


def test_other_shape_is_refused():
    concept = make_concept(hidden=32)
    with pytest.raises(ConceptError, match="text width"):
        concept.check_compatible(768, 1000, "CompVis/stable-diffusion-v1-4")
    assert concept.check_compatible(32, 1000, "tiny") == []
    assert concept.check_compatible(32, 1000, "other") != []


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(ConceptError, match="no concept"):
        Concept.load(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConceptError, match="not a readable"):
        Concept.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConceptError, match="not a PersonaMagic concept"):
        Concept.load(tmp_path / "other.safetensors")


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    concept = make_concept()
    path = concept.save(tmp_path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("personamagic.files.save_file", broken)
    with pytest.raises(OSError):
        make_concept(seed=1).save(tmp_path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def write_format_1(concept, path):
    """`concept` as a version-1 file (written before model families existed: no family, no base revision)."""
    meta = concept.metadata()
    meta["format_version"] = 1
    del meta["family"], meta["base_revision"]
    save_file(concept.tensors(), str(path), metadata={"personamagic": json.dumps(meta)})
    return path


def test_a_format_1_file_still_loads_as_an_sd1_concept(tmp_path):
    concept = make_concept()
    loaded = Concept.load(write_format_1(concept, tmp_path / "old.safetensors"))
    assert loaded.family == "sd1" and loaded.base_revision is None and loaded.file_format == 1
    assert loaded.stage_window == concept.stage_window and loaded.fingerprint() == concept.fingerprint()


def test_inspect_names_the_format_of_the_file_it_read(tmp_path, capsys):
    concept = make_concept()
    code, out, _ = run_cli(capsys, "inspect", write_format_1(concept, tmp_path / "old.safetensors"))
    assert code == 0 and ", format 1, " in out and "(sd1, text width" in out
    code, out, _ = run_cli(capsys, "inspect", concept.save(tmp_path / "new"))
    assert code == 0 and ", format 2, " in out
