"""`read_weights`: safetensors and PyTorch files read without running pickled code, every failure one
clear line ending in the caller's advice; `lazy` reads names and shapes only."""

import pytest
import torch
from safetensors.torch import save_file
from test_photomaker import _MarkerOnUnpickle

from personamagic.errors import ModelLoadError
from personamagic.files import read_weights

ADVICE = "pass a file of plain tensors"


def _tensors():
    return {"a.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a.count": torch.tensor(7)}


@pytest.mark.parametrize("name", ["weights.bin", "weights.safetensors"])
@pytest.mark.parametrize("lazy", [False, True])
def test_both_formats_read_back_their_tensors(tmp_path, name, lazy):
    path = tmp_path / name
    save_file(_tensors(), path) if name.endswith(".safetensors") else torch.save(_tensors(), path)
    read = read_weights(path, advice=ADVICE, lazy=lazy)
    assert {k: (v.shape, v.dtype) for k, v in read.items()} == {k: (v.shape, v.dtype) for k, v in _tensors().items()}
    if not lazy:
        assert all(torch.equal(read[k], v) for k, v in _tensors().items())


def test_a_lazy_safetensors_read_reads_no_tensor_data(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_tensors(), path)
    assert all(t.is_meta for t in read_weights(path, advice=ADVICE, lazy=True).values())


def test_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker-ran"  # what the object's code makes when it runs (test_photomaker checks it does)
    path = tmp_path / "weights.bin"
    torch.save({"payload": _MarkerOnUnpickle(marker)}, path)
    with pytest.raises(ModelLoadError, match=f"holds pickled Python objects other than tensors .*refusing it: {ADVICE}$"):
        read_weights(path, advice=ADVICE)
    assert not marker.exists()


@pytest.mark.parametrize("name, message", [
    ("garbage.bin", "is not a PyTorch weights file"),
    ("garbage.safetensors", "is not a readable safetensors file"),
])
def test_a_file_of_another_kind_is_one_line_ending_in_the_advice(tmp_path, name, message):
    (tmp_path / name).write_bytes(b"not a checkpoint at all\n" * 4)
    with pytest.raises(ModelLoadError, match=f"{message} .*; {ADVICE}$") as info:
        read_weights(tmp_path / name, advice=ADVICE)
    assert "\n" not in str(info.value)


def test_a_garbage_identity_model_is_not_called_pickled_objects(tmp_path):
    from personamagic.identity import load_identity_model

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="is not a PyTorch weights file") as info:
        load_identity_model(tmp_path / "garbage.pth")
    assert "pickled" not in str(info.value)
