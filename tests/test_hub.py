"""`hub_reference` / `resolve_file`: a local path or a hub reference, resolved against a local folder and
an offline hub cache in huggingface_hub's own layout (one small repo, written by `hub_fixture`)."""

import pytest

from hub_fixture import _write_repo
from personamagic.errors import ModelLoadError
from personamagic.hub import HubReference, hub_reference, is_hub_id, resolve_file

REPO = "someone/weights"
ADVICE = "pass a local file"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline hub cache holding REPO with a weights file at its top and one in a subfolder."""
    import huggingface_hub.constants as hub_constants

    folder = tmp_path / "hub"
    snapshot = _write_repo(folder, REPO, {"model.bin": b"top", "sub/other.safetensors": b"inner"}, tree_listing=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return snapshot


@pytest.mark.parametrize("text, expected", [
    ("owner/name", HubReference("owner/name", None)),
    ("TencentARC/PhotoMaker/photomaker-v1.bin", HubReference("TencentARC/PhotoMaker", "photomaker-v1.bin")),
    ("h94/IP-Adapter/models/ip-adapter_sd15.safetensors",
     HubReference("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors")),
    ("stabilityai/stable-diffusion-xl-base-1.0", HubReference("stabilityai/stable-diffusion-xl-base-1.0", None)),
])
def test_hub_references_split_into_repo_and_file(text, expected):
    assert hub_reference(text) == expected


@pytest.mark.parametrize("text", [
    "/abs/owner/name", "./owner/name", "~/owner/name", "dir/model.pt", "dir/model.safetensors", "name", "owner/",
    "owner//name", "owner/name with space", "C:\\models\\x", "-owner/name",
])
def test_local_paths_and_other_shapes_are_not_hub_references(text):
    assert hub_reference(text) is None and not is_hub_id(text)


def test_a_hub_id_is_a_repo_not_a_file_in_one():
    assert is_hub_id("owner/name") and not is_hub_id("owner/name/model.bin")


def test_hub_files_come_from_the_cache_offline(cache):
    top = resolve_file(REPO, what="test file", advice=ADVICE, filename="model.bin", local_files_only=True)
    assert top.read_bytes() == b"top" and cache in top.parents
    inner = resolve_file(f"{REPO}/sub/other.safetensors", what="test file", advice=ADVICE, filename="model.bin")
    assert inner.read_bytes() == b"inner"


def test_a_local_folder_is_read_before_the_hub_repo_of_the_same_name(cache, tmp_path, monkeypatch):
    local = tmp_path / "work" / REPO
    local.mkdir(parents=True)
    (local / "model.bin").write_bytes(b"local")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_file(REPO, what="test file", advice=ADVICE, filename="model.bin").read_bytes() == b"local"
    with pytest.raises(ModelLoadError, match=f"{REPO} has no other.bin; {ADVICE}$"):
        resolve_file(REPO, what="test file", advice=ADVICE, filename="other.bin")
    with pytest.raises(ModelLoadError, match="the test file someone/weights is a directory"):
        resolve_file(REPO, what="test file", advice=ADVICE)


def test_what_is_neither_local_nor_cached_is_one_user_error(cache, tmp_path):
    missing = f"could not get the test file {REPO}/missing.bin from the hub .*; {ADVICE}$"
    with pytest.raises(ModelLoadError, match=missing) as info:
        resolve_file(f"{REPO}/missing.bin", what="test file", advice=ADVICE, local_files_only=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match=f"the test file {tmp_path}/nope.bin does not exist .*; {ADVICE}$"):
        resolve_file(tmp_path / "nope.bin", what="test file", advice=ADVICE)
    with pytest.raises(ModelLoadError, match="the test file dir/model.pt does not exist"):
        resolve_file("dir/model.pt", what="test file", advice=ADVICE)


def test_a_bare_repo_without_a_file_name_needs_exactly_one_weights_file(cache, monkeypatch):
    import huggingface_hub

    files = ["README.md", "model.bin"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: files)
    assert resolve_file(REPO, what="test file", advice=ADVICE).read_bytes() == b"top"
    files.append("sub/other.safetensors")
    with pytest.raises(ModelLoadError, match=f"hub repo {REPO} holds 2 weights files"):
        resolve_file(REPO, what="test file", advice=ADVICE)


def test_a_missing_single_file_that_looks_like_a_path_is_an_unknown_model_not_a_hub_download():
    from personamagic.models.loading import load_base_model

    with pytest.raises(ModelLoadError, match="unknown model 'nowhere/model.safetensors': not a file"):
        load_base_model("nowhere/model.safetensors")
