"""Every bad input, fault and interruption ends in one clear line (`error: ...`, exit code != 0, no
traceback), with nothing lost and nothing silently wrong: resume and concurrent runs, damaged concept
files and image metadata, filesystem faults, out-of-range settings, and the defects behind them."""

import errno
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from _concepts import random_concept
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from cli_helpers import assert_one_line_error, edit, rewrite_concept, run_cli
from personamagic.cli import main
from personamagic.concept import Concept
from personamagic.errors import FolderInUse, ModelLoadError, SettingsError
from personamagic.files import FolderLock

GENERATE_FAST = ["--steps", "2", "--num-images", "1"]
# a run with a checkpoint at step 2 of 4; TRAIN_AUTO finds its stage window after 1 warm-up step
TRAIN_SHORT = ["--model", "tiny", "--steps", "4", "--checkpoint-every", "2", "--stage-window", "400:800"]
TRAIN_AUTO = ["--model", "tiny", "--steps", "4", "--checkpoint-every", "2", "--partition-warmup-steps", "1"]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    from personamagic.models import build_tiny_components

    folder = tmp_path_factory.mktemp("concept") / "me"
    random_concept(build_tiny_components(), window=(400, 800)).save(folder)
    return folder


# -- 1. resume and concurrent runs -----------------------------------------------------------------


def interrupt_after(monkeypatch, steps):
    """Make Trainer.train stop with Ctrl-C after `steps` steps (as a user would, mid-run)."""
    from personamagic.training import Trainer

    original = Trainer.train

    def interrupted(self, num_steps=None, progress=None, checkpoint_dir=None, job=None):
        original(self, num_steps=steps, progress=progress, checkpoint_dir=checkpoint_dir, job=job)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run of 4 steps stopped by Ctrl-C after step 3: its folder holds the checkpoint of step 2.
    Returns (folder, photo, the error line)."""
    root = tmp_path_factory.mktemp("interrupted")
    photo = root / "me.png"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "astronaut.png"), photo)
    monkeypatch = pytest.MonkeyPatch()
    interrupt_after(monkeypatch, 3)
    try:
        code = main(["train", str(photo), "-o", str(root / "run"), *TRAIN_SHORT])
    finally:
        monkeypatch.undo()
    assert code == 130
    assert [p.name for p in (root / "run" / "checkpoints").iterdir()] == ["step-000002.safetensors"]
    return root / "run", photo


def copy_run(interrupted_run, tmp_path):
    folder, photo = interrupted_run
    shutil.copytree(folder, tmp_path / "run")
    shutil.copy(photo, tmp_path / "me.png")
    return tmp_path / "run", tmp_path / "me.png"


def test_ctrl_c_names_the_kept_checkpoint_and_the_exact_resume_command(astronaut, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "c"
    interrupt_after(monkeypatch, 3)
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_AUTO)
    assert_one_line_error(code, err, "interrupted; kept the checkpoint", "step-000002.safetensors", exit_code=130,
                          train=True)
    command = err.split("continue with: ", 1)[1].strip()
    assert command.startswith("personamagic train ") and command.endswith(" --resume")
    monkeypatch.undo()
    code, out, err = run_cli(capsys, *shlex.split(command)[1:])  # the printed command, as the user would run it
    assert code == 0, err
    assert "resumed from step-000002" in out
    # the attention maps travel in the checkpoint: the resumed run draws them like an uninterrupted one
    assert sorted(p.name for p in folder.iterdir()) == ["attention.png", "concept.safetensors", "mask.png",
                                                        "stages.png"]


def test_ctrl_c_before_the_first_checkpoint_keeps_nothing(astronaut, tmp_path, capsys, monkeypatch):
    interrupt_after(monkeypatch, 1)
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT)
    assert_one_line_error(code, err, "before the first checkpoint; nothing was kept", exit_code=130, train=True)
    assert not (tmp_path / "c").exists()


def edit_photo(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]  # the same file name, other content
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("flags, difference", [
    (["--seed", "1"], "--seed was 0, now 1"),
    (["--learning-rate", "1e-4"], "--learning-rate was 5e-05, now 0.0001"),
    (["--stage-window", "300:800"], "--stage-window was [400, 800], now [300, 800]"),
    (["--batch-size", "1"], "--batch-size was 2, now 1"),
    (["--te-weight", "0.01"], "--te-weight was 0.001, now 0.01"),
    (["--id-weight", "0.5"], "--id-weight was 1.0, now 0.5"),
    (["--num-vectors", "2"], "--num-vectors was 1, now 2"),
    (["--supercategory", "person"], "--supercategory was 'face', now 'person'"),
    (["--placeholder", "<me>"], "--placeholder was 'S*', now '<me>'"),
    (["--lambda1", "0.5"], "--lambda1 was 0.7, now 0.5"),
    (["--no-id-loss"], "identity loss (--no-id-loss) was True, now False"),
    ("another photo", "the photos differ"),
    ("edited photo", "the photos differ"),
])
def test_resume_refuses_a_setting_that_shapes_the_result(flags, difference, interrupted_run, grace_hopper, tmp_path,
                                                         capsys):
    folder, photo = copy_run(interrupted_run, tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()}
    if flags == "another photo":
        photo, flags = grace_hopper, []
    elif flags == "edited photo":
        edit_photo(photo)
        flags = []
    code, _, err = run_cli(capsys, "train", photo, "-o", folder, *TRAIN_SHORT, *flags, "--resume")
    assert_one_line_error(code, err, "cannot resume from", "step-000002.safetensors", difference, train=True)
    assert {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()} == before  # nothing lost


def test_resume_lists_every_difference_at_once(interrupted_run, tmp_path, capsys):
    folder, photo = copy_run(interrupted_run, tmp_path)
    code, _, err = run_cli(capsys, "train", photo, "-o", folder, *TRAIN_SHORT, "--seed", "1", "--batch-size", "1",
                           "--te-weight", "0", "--resume")
    assert_one_line_error(code, err, "--seed was 0, now 1", "--batch-size was 2, now 1",
                          "--te-weight was 0.001, now 0.0", train=True)


def test_resume_may_change_checkpoint_every_and_add_steps(interrupted_run, tmp_path, capsys):
    folder, photo = copy_run(interrupted_run, tmp_path)
    code, _, err = run_cli(capsys, "train", photo, "-o", folder, *TRAIN_SHORT, "--steps", "1", "--resume")
    assert_one_line_error(code, err, "--steps 1 is below the 2 steps already done", train=True)
    code, out, err = run_cli(capsys, "train", photo, "-o", folder, *TRAIN_SHORT, "--steps", "5",
                             "--checkpoint-every", "3", "--resume")
    assert code == 0, err
    training = Concept.load(folder).training
    assert (training["max_train_steps"], training["checkpoint_every"], training["steps_done"]) == (5, 3, 5)
    assert not (folder / "checkpoints").exists()


def test_a_second_run_into_a_locked_folder_is_refused(astronaut, tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    with FolderLock(folder):
        code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_SHORT)
        assert_one_line_error(code, err, f"{folder} is in use by another run (pid {os.getpid()})")
        assert [p.name for p in folder.iterdir()] == [".personamagic.lock"]  # the holder's files untouched
    assert not any(folder.iterdir())


def test_a_killed_runs_lock_does_not_block_the_next(astronaut, tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from personamagic.files import FolderLock; "
                               "lock = FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); "
                               "time.sleep(120)",
         str(folder)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_SHORT)
        assert_one_line_error(code, err, f"in use by another run (pid {holder.pid})", train=True)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.stdout.close()
    assert (folder / ".personamagic.lock").exists()  # the killed run could not clean up: its lock file stays
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_SHORT)
    assert code == 0, err
    assert (folder / "concept.safetensors").is_file() and not (folder / ".personamagic.lock").exists()


def test_a_lock_released_while_taken_is_not_shared(tmp_path, monkeypatch):
    """The holder releases (and removes the lock file) between a newcomer's open and its lock, and a
    third run takes the new lock file: the newcomer must not hold a lock on the removed file as well."""
    import personamagic.files as files

    first = FolderLock(tmp_path).acquire()
    third = FolderLock(tmp_path)
    real_lock = files._try_lock
    calls = []

    def racing(file):
        calls.append(file)
        if len(calls) == 1:
            first.release()
            third.acquire()
        return real_lock(file)

    monkeypatch.setattr(files, "_try_lock", racing)
    with pytest.raises(FolderInUse, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        FolderLock(tmp_path).acquire()
    third.release()


# -- 2. concept files and image metadata -----------------------------------------------------------


def without(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def mapper_edit(key, value):
    return lambda meta: {**meta, "mapper_config": {**meta["mapper_config"], key: value}}


def tensor_edit(key, change):
    def apply(tensors):
        tensors = dict(tensors)
        if change is None:
            del tensors[key]
        else:
            tensors[key] = change(tensors[key])
        return tensors

    return apply


def with_value(value, at=0):
    def change(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[at] = value
        return tensor

    return change


def with_huge_number(meta):
    """The metadata's JSON with one more key whose number has more digits than Python converts."""
    return json.dumps(meta)[:-1] + ', "extra": ' + "9" * 5000 + "}"


NESTED_TOO_DEEP = "[" * 100_000 + "]" * 100_000  # deeper than the JSON parser recurses

BAD_CONCEPTS = {
    "metadata is a list": (lambda meta: [meta], None, "metadata is a JSON list, not an object"),
    "metadata with a 5000-digit number": (with_huge_number, None, "without readable concept metadata"),
    "metadata nested too deep": (lambda meta: NESTED_TOO_DEEP, None, "without readable concept metadata"),
    "no placeholder": (without("placeholder"), None, "no 'placeholder'"),
    "empty placeholder": (edit("placeholder", ""), None, "'placeholder' must be non-empty text"),
    "numeric placeholder": (edit("placeholder", 7), None, "'placeholder' must be text"),
    "supercategory not text": (edit("supercategory", ["face"]), None, "'supercategory' must be text"),
    "window as a string": (edit("stage_window", "400:800"), None, "'stage_window' must be [LO, HI]"),
    "window reversed": (edit("stage_window", [800, 400]), None, "0 <= LO < HI <= 1000"),
    "window past T": (edit("stage_window", [400, 1001]), None, "0 <= LO < HI <= 1000"),
    "window of floats": (edit("stage_window", [400.5, 800]), None, "two whole timesteps"),
    "window of three": (edit("stage_window", [1, 2, 3]), None, "two whole timesteps"),
    "T zero": (edit("num_train_timesteps", 0), None, "'num_train_timesteps' must be >= 1"),
    "T as text": (edit("num_train_timesteps", "1000"), None, "'num_train_timesteps' must be a whole number"),
    "hidden size as text": (edit("text_encoder_hidden_size", "32"), None, "'text_encoder_hidden_size' must be"),
    "mapper_config a list": (edit("mapper_config", [1, 2]), None, "'mapper_config' must be an object"),
    "mapper_config unknown field": (mapper_edit("layers", 3), None, "MapperConfig does not know: 'layers'"),
    "num_vectors as text": (mapper_edit("num_vectors", "2"), None, "mapper_config 'num_vectors' must be int"),
    "num_vectors zero": (mapper_edit("num_vectors", 0), None, "does not build a mapper"),
    "hidden_dim changed": (mapper_edit("hidden_dim", 64), None, "has shape"),
    "unknown family": (edit("family", "sd9"), None, "model family 'sd9' is not one this personamagic knows"),
    "format true": (edit("format_version", True), None, "concept format True"),
    "training a list": (edit("training", []), None, "'training' must be an object"),
    "missing tensor": (None, tensor_edit("mapper.embedding_head.weight", None),
                       "tensor 'mapper.embedding_head.weight' is missing"),
    "missing image embeds": (None, tensor_edit("image_embeds", None), "tensor 'image_embeds'"),
    "wrong shape": (None, tensor_edit("mapper.embedding_head.bias", lambda t: t[:-1]),
                    "tensor 'mapper.embedding_head.bias' has shape"),
    "image embeds of another encoder": (None, tensor_edit("image_embeds", lambda t: torch.zeros(1, 15)),
                                        "tensor 'image_embeds' has shape (1, 15)"),
    "image embeds flat": (None, tensor_edit("image_embeds", lambda t: t[0]), "expected (N, 16)"),
    "half precision": (None, tensor_edit("mapper.residual_head.weight", lambda t: t.half()), "is float16"),
    "stray tensor": (None, lambda t: {**t, "unet.weight": torch.zeros(2)}, "tensor 'unet.weight' belongs to no part"),
    "NaN weight": (None, tensor_edit("mapper.embedding_head.weight", with_value(float("nan"))), "NaN or infinite"),
    "inf weight": (None, tensor_edit("mapper.residual_head.bias", with_value(float("inf"))), "NaN or infinite"),
    "NaN image embedding": (None, tensor_edit("image_embeds", with_value(float("nan"))), "NaN or infinite"),
    "weights that overflow": (None, tensor_edit("mapper.embedding_head.weight", lambda t: torch.full_like(t, 3e38)),
                              "its mapper gives NaN or infinite embeddings"),
}


@pytest.mark.parametrize("case", BAD_CONCEPTS)
def test_a_damaged_concept_is_one_line_naming_the_file_and_the_fault(case, concept_dir, tmp_path, capsys):
    meta, tensors, fault = BAD_CONCEPTS[case]
    path = rewrite_concept(concept_dir, tmp_path / "bad", meta, tensors)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "bad")
    assert_one_line_error(code, err, f"error: {path}: ", fault)
    assert out == ""


@pytest.mark.parametrize("case", ["metadata is a list", "window as a string", "missing tensor", "NaN weight",
                                  "weights that overflow"])
def test_generate_and_export_refuse_a_damaged_concept_and_write_nothing(case, concept_dir, tmp_path, capsys):
    meta, tensors, fault = BAD_CONCEPTS[case]
    path = rewrite_concept(concept_dir, tmp_path / "bad", meta, tensors)
    code, _, err = run_cli(capsys, "generate", tmp_path / "bad", "-p", "S*", *GENERATE_FAST, "-o", tmp_path / "out")
    assert_one_line_error(code, err, str(path), fault)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "export", tmp_path / "bad", "-o", tmp_path / "ti" / "me.safetensors")
    assert_one_line_error(code, err, str(path), fault)
    assert not (tmp_path / "ti").exists()


def test_a_good_concept_still_round_trips(concept_dir):
    concept = Concept.load(concept_dir)
    assert concept.stage_window == (400, 800) and concept.window.stage(500) == "dynamic"


@pytest.fixture(scope="module")
def generated(concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("generated")
    assert main(["generate", str(concept_dir), "-p", "a photo of S*", *GENERATE_FAST, "-o", str(out)]) == 0
    (image,) = out.glob("000-*.png")
    return image


def with_metadata(source, target, text):
    """A copy of a generated PNG whose personamagic chunk is `text` (str) or `text(meta)`."""
    with Image.open(source) as image:
        meta = json.loads(image.text["personamagic"])
        info = PngInfo()
        info.add_text("personamagic", text(meta) if callable(text) else text)
        image.save(target, pnginfo=info)
    return target


BAD_IMAGE_METADATA = {
    "garbled JSON": ("{\"prompt\": \"a photo", "not valid JSON"),
    "a list": ("[]", "a JSON list, not an object"),
    "a 5000-digit number": (with_huge_number, "not valid JSON"),
    "nested too deep": (NESTED_TOO_DEEP, "not valid JSON"),
    "no prompt": (lambda m: json.dumps({k: v for k, v in m.items() if k != "prompt"}), "no 'prompt'"),
    "no seed": (lambda m: json.dumps({k: v for k, v in m.items() if k != "seed"}), "no 'seed'"),
    "seed as text": (lambda m: json.dumps({**m, "seed": "0"}), "seed must be a whole number"),
    "steps as float": (lambda m: json.dumps({**m, "steps": 2.5}), "steps must be a whole number"),
    "guidance as text": (lambda m: json.dumps({**m, "guidance_scale": "8"}), "guidance_scale must be a number"),
    "concepts not a list": (lambda m: json.dumps({**m, "concepts": {}}), "concepts must be a list"),
    "no concepts": (lambda m: json.dumps({**m, "concepts": []}), "concepts is empty"),
    "concept without fingerprint": (
        lambda m: json.dumps({**m, "concepts": [{"placeholder": "S*"}]}), "no concepts[0].'fingerprint'"),
    "batch index out of range": (lambda m: json.dumps({**m, "batch": {**m["batch"], "index": 5}}), "batch.index"),
    "batch of other seeds": (lambda m: json.dumps({**m, "batch": {"jobs": [["x", 1]], "index": 0}}),
                             "does not hold its own prompt and seed"),
    "negative seed": (lambda m: json.dumps({**m, "seed": -1, "batch": {"jobs": [[m["prompt"], -1]], "index": 0}}),
                      "seed must be a whole number from 0"),
    "steps zero": (lambda m: json.dumps({**m, "steps": 0}), "num_inference_steps must be a whole number from 1"),
    "width not a multiple of 8": (lambda m: json.dumps({**m, "width": 100}), "width must be a multiple of 8"),
    "guidance 1e30": (lambda m: json.dumps({**m, "guidance_scale": 1e30}), "guidance_scale must be a number from 0"),
}


@pytest.mark.parametrize("case", BAD_IMAGE_METADATA)
def test_from_image_with_damaged_metadata_is_one_line(case, generated, tmp_path, capsys):
    text, fault = BAD_IMAGE_METADATA[case]
    image = with_metadata(generated, tmp_path / "edited.png", text)
    code, _, err = run_cli(capsys, "generate", "--from-image", image, "-o", tmp_path / "again")
    assert_one_line_error(code, err, str(image), fault)
    assert not (tmp_path / "again").exists()


def test_from_image_of_a_file_that_is_no_image_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("hello")
    code, _, err = run_cli(capsys, "generate", "--from-image", tmp_path / "notes.png", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "cannot read", "as an image")
    code, _, err = run_cli(capsys, "generate", "--from-image", tmp_path, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "cannot read")


def test_a_model_index_that_is_not_an_object_is_one_line(concept_dir, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("[]")
    code, _, err = run_cli(capsys, "generate", concept_dir, "--model", tmp_path / "model", "-p", "S*",
                           *GENERATE_FAST, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "model_index.json")
    assert not (tmp_path / "out").exists()


# -- 3. filesystem faults --------------------------------------------------------------------------


def failing_after(monkeypatch, target, name, good_calls, partial=False):
    """Let `target.name` succeed `good_calls` times, then fail as a full disk does (after writing part
    of the file when `partial`)."""
    original = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) > good_calls:
            if partial:
                with open(args[1], "wb") as f:
                    f.write(b"\x89PNG half")
            enospc()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def test_a_full_disk_keeps_and_lists_the_images_written_before(concept_dir, tmp_path, capsys, monkeypatch):
    failing_after(monkeypatch, Image.Image, "save", good_calls=2, partial=True)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--steps", "1", "-n", "4",
                                "--batch-size", "1", "-o", out)
    assert_one_line_error(code, err, f"cannot write {out / '002-s-seed2.png'}: No space left on device",
                          "kept the 2 image(s) written before")
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["000-s-seed0.png", "001-s-seed1.png"]  # no half-written file, no temporary
    assert stdout.split() == [str(out / name) for name in kept]
    for name in kept:
        with Image.open(out / name) as image:
            image.load()


def test_a_full_disk_at_the_first_image_leaves_no_folder(concept_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", enospc)
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", tmp_path / "a" / "b")
    assert_one_line_error(code, err, "cannot write", "No space left on device")
    assert not (tmp_path / "a").exists()


def test_a_full_disk_while_writing_the_grid_keeps_the_images(concept_dir, tmp_path, capsys, monkeypatch):
    failing_after(monkeypatch, Image.Image, "save", good_calls=2)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--steps", "1", "-n", "2", "-o", out)
    assert_one_line_error(code, err, f"cannot write {out / 'grid.png'}", "kept the 2 image(s)")
    assert sorted(p.name for p in out.iterdir()) == ["000-s-seed0.png", "001-s-seed1.png"]


def test_generate_into_a_file_or_under_a_file_is_one_line(concept_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for output, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "lies under a file")):
        code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", output)
        assert_one_line_error(code, err, message)
    assert (tmp_path / "file").read_text() == "mine"


def test_an_unwritable_output_folder_fails_before_the_model_loads(concept_dir, tmp_path, capsys, monkeypatch):
    import personamagic.jobs.generate as job

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(job.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(job, "load_base_model", no_model)
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", tmp_path / "out")
    assert_one_line_error(code, err, f"cannot write {tmp_path / 'out'}: Permission denied")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """(folder, what the OS says) for a folder nobody can write into: mode 0500 for a user; for root,
    whom modes do not stop (CI runs as root), a read-only tmpfs mounted there."""
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder, "Permission denied"
        folder.chmod(0o700)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("root, and cannot mount a read-only tmpfs here")
    yield folder, "Read-only file system"
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_one_line(concept_dir, read_only_folder, capsys):
    folder, reason = read_only_folder
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", folder)
    assert_one_line_error(code, err, "cannot write", reason)
    code, _, err = run_cli(capsys, "export", concept_dir, "-o", folder / "me.safetensors")
    assert_one_line_error(code, err, "cannot write", reason)
    assert not any(folder.iterdir())


def test_export_on_a_full_disk_writes_nothing(concept_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", enospc)
    target = tmp_path / "new" / "folder" / "me.safetensors"
    code, _, err = run_cli(capsys, "export", concept_dir, "-o", target)
    assert_one_line_error(code, err, f"cannot write {target}: No space left on device")
    assert not (tmp_path / "new").exists()  # neither the file, its temporary, nor the folders made for it


def test_export_under_a_file_is_one_line(concept_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli(capsys, "export", concept_dir, "-o", tmp_path / "file" / "me.safetensors")
    assert_one_line_error(code, err, "lies under a file")


def test_train_on_a_full_disk_is_one_line_and_keeps_the_old_concept(concept_dir, astronaut, tmp_path, capsys,
                                                                    monkeypatch):
    folder = tmp_path / "c"
    shutil.copytree(concept_dir, folder)
    before = (folder / "concept.safetensors").read_bytes()
    monkeypatch.setattr(os, "replace", enospc)
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, "--model", "tiny", "--steps", "2",
                           "--stage-window", "400:800", "--checkpoint-every", "0", "--overwrite")
    assert_one_line_error(code, err, "cannot write", "No space left on device", train=True)
    assert (folder / "concept.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["concept.safetensors"]


def test_a_full_disk_at_a_checkpoint_is_one_line(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", enospc)
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT)
    assert_one_line_error(code, err, "cannot write", "step-000002.safetensors", "No space left on device", train=True)


def test_write_atomic_removes_the_folders_it_made_when_the_write_fails(tmp_path):
    from personamagic.files import write_atomic

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        enospc()

    with pytest.raises(OSError):
        write_atomic(tmp_path / "a" / "b" / "file.bin", broken)
    assert not any(tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "kept" / "c" / "file.bin", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


# -- 4. bounds, checked before anything loads ------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1001"], "--steps must be a whole number from 1 to 1000"),
    (["--seed", str(2**63)], "--seed must be a whole number from 0 to"),
    (["--seed", str(2**63 - 1), "--num-images", "2"], "passes the largest seed"),
    (["--width", "4104"], "--width must be a multiple of 8 from 8 to 4096"),
    (["--height", "12"], "--height must be a multiple of 8"),
    (["--guidance-scale", "1e30"], "--guidance-scale must be a number from 0 to 100"),
    (["--guidance-scale", "inf"], "finite"),
    (["--ip-adapter", "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", "--ip-adapter-scale", "1e30"], "--ip-adapter-scale must be a number from 0 to 10"),
    (["--num-images", "1000000"], "--num-images must be a whole number from 1 to 100000"),
    (["--num-images", "60000", "-p", "S* again"], "2 prompts x 60000 images is more than 100000"),
    (["--placeholder", " "], "placeholder must be non-empty text"),
])
def test_out_of_range_settings_fail_before_the_model_loads(flags, message, concept_dir, tmp_path, capsys,
                                                           monkeypatch):
    import personamagic.jobs.generate as job

    monkeypatch.setattr(job, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--steps", "2", *flags, "-o", tmp_path / "o")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_the_last_seed_is_usable(concept_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--steps", "1", "--seed", 2**63 - 2,
                             "-n", 2, "-o", tmp_path)
    assert code == 0, err
    assert out.split()[-2:] == [str(tmp_path / f"001-s-seed{2**63 - 1}.png"), str(tmp_path / "grid.png")]


def test_steps_beyond_the_models_schedule_are_refused_after_it_loads(tmp_path, capsys, monkeypatch):
    import personamagic.jobs.generate as job
    from personamagic.models import build_tiny_components

    base = build_tiny_components()
    base.scheduler_config = {**base.scheduler_config, "num_train_timesteps": 500}
    concept = random_concept(base, window=(100, 400))
    concept.num_train_timesteps = 500
    concept.save(tmp_path / "c500")
    monkeypatch.setattr(job, "load_base_model", lambda *a, **k: base)
    code, _, err = run_cli(capsys, "generate", tmp_path / "c500", "-p", "S*", "--steps", "600", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "600 denoising steps", "500 timesteps", "--steps 500 or fewer")
    assert not (tmp_path / "o").exists()


def test_many_images_stream_to_disk_with_bounded_memory(concept_dir, tmp_path, monkeypatch):
    import personamagic.jobs.generate as job

    alive, original_sample = [], job._Session.sample

    def sample(self, jobs):
        images = original_sample(self, jobs)
        alive.extend(weakref.ref(image) for image in images)
        return images

    held = []

    def progress(done, total):
        gc.collect()
        held.append(sum(ref() is not None for ref in alive))

    monkeypatch.setattr(job._Session, "sample", sample)
    monkeypatch.setattr(job, "GRID_IMAGES", 4)  # as with thousands of images and a grid of 64, at test size
    config = job.GenerateConfig(prompts=["S*"], num_images=12, num_inference_steps=1, batch_size=3)
    result = job.generate([str(concept_dir)], tmp_path, config, device="cpu", progress=progress)
    assert len(result.images) == 12 and result.images[-1].path.name == "011-s-seed11.png"
    assert max(held) <= 4 + 1  # the grid's tiles (and the image in hand), not every image
    with Image.open(result.grid) as grid:
        assert grid.size == (2 * 128, 2 * 128)  # the first 4 images


def test_grid_tiles_are_scaled_to_the_grids_largest_side():
    from personamagic.jobs.generate import GRID_MAX_SIDE, GridTiles

    tiles = GridTiles(64)
    for _ in range(64):
        tiles.add(Image.new("RGB", (2048, 1024)))
    tiles.add(Image.new("RGB", (2048, 1024)))  # beyond the grid's count: not kept
    assert len(tiles.tiles) == 64 and max(tiles.grid().size) <= GRID_MAX_SIDE


def test_a_prompt_longer_than_the_text_encoder_reads_is_a_warning_saying_what_is_cut(concept_dir, tmp_path,
                                                                                     capsys):
    words = " ".join(f"word{i}" for i in range(80))
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", f"a photo of S* {words}", *GENERATE_FAST,
                           "-o", tmp_path / "a")
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    cut = warning.split("the text encoder reads 77: ")[1]
    assert cut.startswith("'word") and cut.endswith(" word78 word79' at its end is ignored")
    assert "word1 " not in cut and "S*" not in cut
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", f"{words} S*", *GENERATE_FAST, "-o", tmp_path / "b")
    assert code == 0, err
    assert "S*" in err and "the concept will not appear" in err


def test_absurd_values_and_paths_are_one_short_line(concept_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--seed", "9" * 5000, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--seed: must be a whole number")
    assert len(err) < 200
    long = "a" * 5000
    for argv in (["inspect", tmp_path / long], ["generate", concept_dir, "-p", "S*", "-o", tmp_path / long],
                 ["export", concept_dir, "-o", tmp_path / f"{long}.safetensors"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "File name too long")
    assert not any(tmp_path.iterdir())


def test_image_names_sort_in_order_past_a_thousand_images():
    from personamagic.jobs.generate import safe_filename
    from personamagic.jobs.generate_config import GenerateConfig

    config = GenerateConfig(prompts=["a", "b"], num_images=600, seed=7)
    jobs = list(config.jobs())
    assert (jobs[0], jobs[599], jobs[600], jobs[-1]) == (("a", 7), ("a", 606), ("b", 7), ("b", 606))
    names = [safe_filename(i, prompt, seed, digits=4) for i, (prompt, seed) in enumerate(jobs)]
    assert names == sorted(names) and names[-1] == "1199-b-seed606.png"


def test_generate_config_bounds():
    from personamagic.jobs.generate_config import GenerateConfig

    GenerateConfig(prompts=["S*"], num_inference_steps=1000, guidance_scale=100.0, width=4096, seed=2**63 - 4,
                   num_images=4)
    for bad in ({"num_inference_steps": 1001}, {"seed": -1}, {"seed": True}, {"num_images": "4"},
                {"guidance_scale": float("nan")}, {"guidance_scale": 100.5}, {"width": 4097}, {"height": 0},
                {"batch_size": 0}, {"negative_prompt": None}, {"placeholders": [""]}):
        with pytest.raises(ValueError):
            GenerateConfig(prompts=["S*"], **bad)


def test_ctrl_c_in_generate_keeps_and_lists_the_images_made(concept_dir, tmp_path, capsys, monkeypatch):
    import personamagic.jobs.generate as job

    original, calls = job._Session.sample, []

    def sample(self, jobs):
        calls.append(jobs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, jobs)

    monkeypatch.setattr(job._Session, "sample", sample)
    code, out, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", "--steps", "1", "-n", 3, "--batch-size", 1,
                             "-o", tmp_path)
    assert_one_line_error(code, err, "interrupted; kept the 1 image(s) written before", exit_code=130)
    assert out.split() == [str(tmp_path / "000-s-seed0.png")]
    assert [p.name for p in tmp_path.iterdir()] == ["000-s-seed0.png"]


def test_nan_pixels_are_an_error_not_a_black_image(concept_dir, tmp_path, capsys, monkeypatch):
    from personamagic.pipeline import PersonaMagicPipeline

    def overflowing(self, latents):  # what an fp16 VAE that overflows gives: (B, 3, H, W) of NaN
        B, _, h, w = latents.shape
        return latents.new_full((B, 3, h * self.vae_scale_factor, w * self.vae_scale_factor), float("nan"))

    monkeypatch.setattr(PersonaMagicPipeline, "decode", overflowing)
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "NaN or infinite pixels", "--dtype fp32")
    assert not (tmp_path / "o").exists()


# train: the checks that belong before the model loads (TrainConfig, the image encoder's loading)


def test_train_with_an_empty_placeholder_is_one_line(astronaut, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT, "--placeholder", "")
    assert_one_line_error(code, err, "placeholder must be non-empty", train=True)
    assert not (tmp_path / "c").exists()


def test_train_prompt_with_two_placeholders_is_one_line(astronaut, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT, "--train-prompt",
                           "{} next to {}")
    assert_one_line_error(code, err, "train_prompt must contain {} exactly once", train=True)
    assert not (tmp_path / "c").exists()


def test_too_many_vectors_for_the_prompts_is_one_line(astronaut, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT, "--num-vectors", "80")
    assert_one_line_error(code, err, "--num-vectors", train=True)
    assert not (tmp_path / "c").exists()


def test_an_image_encoder_whose_weights_do_not_fit_is_one_line(astronaut, tmp_path, capsys):
    from personamagic.models.tiny import build_tiny_image_encoder

    model, processor = build_tiny_image_encoder()
    model.save_pretrained(tmp_path / "encoder")
    processor.save_pretrained(tmp_path / "encoder")
    save_file({"other.weight": torch.zeros(3)}, str(tmp_path / "encoder" / "model.safetensors"))
    code, _, err = run_cli(capsys, "train", astronaut, "-o", tmp_path / "c", *TRAIN_SHORT, "--image-encoder",
                           tmp_path / "encoder")
    assert_one_line_error(code, err, "image encoder", train=True)
    assert not (tmp_path / "c").exists()


# -- 5. the defects behind the faults ----------------------------------------------------------------


def test_embedding_override_refuses_a_placeholder_without_vector(tiny_base):
    from personamagic.method.conditioning import EmbeddingOverride

    encoder = tiny_base.text_encoder
    added = encoder.get_input_embeddings().num_embeddings  # an id past the table: a placeholder's
    override = EmbeddingOverride(encoder)
    try:
        ids = torch.tensor([[0, 5, added, 1]])
        with override.vectors({}), pytest.raises(RuntimeError, match=f"placeholder token ids \\[{added}\\]"):
            encoder(ids)
        vector = torch.randn(encoder.get_input_embeddings().embedding_dim)
        with override.vectors({added: vector}):
            encoder(ids)  # with its vector it is fine
    finally:
        override.remove()


def test_export_reads_the_window_as_a_stage_window(tiny_base):
    from personamagic.export import static_vectors

    concept = random_concept(tiny_base, window=(800, 400))  # in memory only: load refuses such a file
    with pytest.raises(ValueError, match="0 <= LO < HI"):
        static_vectors(concept, "mean")  # not the NaN mean of an empty range


def test_masked_mse_sums_the_mask_in_float32():
    from personamagic.method.losses import masked_mse

    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 64, 64, generator=generator).bfloat16()
    target = torch.randn(2, 4, 64, 64, generator=generator).bfloat16()
    mask = torch.ones(2, 1, 64, 64)
    mask[:, :, :3, 0] = 0.5  # 4 x 4093.5 = 16374 is 16384 in bf16
    squared = (pred.double() - target.double()) ** 2 * mask.double()  # (B, C, H, W), the mask over channels
    reference = squared.flatten(1).sum(1) / (mask.double().sum((1, 2, 3)) * 4)
    loss = masked_mse(pred, target, mask.bfloat16())
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), reference.mean(), rtol=1e-6)


def test_an_unknown_prediction_type_is_refused_when_the_trainer_is_built(tiny_base, astronaut):
    from test_training import base_config, make_data

    from personamagic.faces import prepare_photo
    from personamagic.training import Trainer

    data = make_data(tiny_base, prepare_photo(astronaut, tiny_base.resolution))
    tiny_base.scheduler_config = {**tiny_base.scheduler_config, "prediction_type": "flow"}
    with pytest.raises(ModelLoadError, match="'flow'"):  # one of the package's errors: one line on the CLI
        Trainer(tiny_base, data, base_config())


def test_a_partition_grid_finer_than_the_models_schedule_is_refused_when_the_trainer_is_built(tiny_base, astronaut):
    from test_training import base_config, make_data

    from personamagic.faces import prepare_photo
    from personamagic.training import Trainer

    data = make_data(tiny_base, prepare_photo(astronaut, tiny_base.resolution))
    with pytest.raises(SettingsError, match="partition_timesteps 2000.*at most 1000"):
        Trainer(tiny_base, data, base_config(stage_window=None, partition_timesteps=2000))


def test_a_mask_too_small_for_the_attention_grid_is_one_line(astronaut, tmp_path, capsys):
    from PIL import Image

    mask = Image.new("L", Image.open(astronaut).size, 0)
    mask.paste(255, (250, 250, 261, 261))  # 11 x 11 pixels: nothing at the 16 x 16 attention resolution
    mask.save(tmp_path / "dot.png")
    code, _, err = run_cli(capsys, "train", astronaut, "--mask", tmp_path / "dot.png", "--model", "tiny",
                           "--steps", "2", "--partition-warmup-steps", "1", "--checkpoint-every", "0",
                           "-o", tmp_path / "c")
    assert_one_line_error(code, err, "the stage partition failed", "mask", train=True)
    assert not (tmp_path / "c" / "concept.safetensors").exists()


def test_trainer_leaves_gradient_checkpointing_as_it_found_it(tiny_base, astronaut):
    from test_training import base_config, make_data

    from personamagic.faces import prepare_photo
    from personamagic.training import Trainer

    data = make_data(tiny_base, prepare_photo(astronaut, tiny_base.resolution))
    unet = tiny_base.unet
    unet.enable_gradient_checkpointing()
    with Trainer(tiny_base, data, base_config(gradient_checkpointing=True, max_train_steps=1)) as trainer:
        trainer.train()
    assert unet.is_gradient_checkpointing
    unet.disable_gradient_checkpointing()
    with Trainer(tiny_base, data, base_config(gradient_checkpointing=True, max_train_steps=1)) as trainer:
        assert unet.is_gradient_checkpointing
    assert not unet.is_gradient_checkpointing


# -- signals, memory, and flags that would do nothing --------------------------------------------------


def test_sigterm_stops_a_run_as_ctrl_c_does(astronaut, tmp_path, capsys, monkeypatch):
    """`kill`, `timeout` or a job scheduler end a run with SIGTERM: the same clean stop as Ctrl-C."""
    from personamagic.training import Trainer

    original = Trainer.train

    def terminated(self, num_steps=None, progress=None, checkpoint_dir=None, job=None):
        original(self, num_steps=3, progress=progress, checkpoint_dir=checkpoint_dir, job=job)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train", terminated)
    folder = tmp_path / "c"
    code, _, err = run_cli(capsys, "train", astronaut, "-o", folder, *TRAIN_AUTO)
    assert_one_line_error(code, err, "interrupted; kept the checkpoint", "step-000002.safetensors", exit_code=130,
                          train=True)
    assert not (folder / ".personamagic.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command put the default handler back


def test_sigterm_before_anything_is_written_leaves_no_folder(concept_dir, tmp_path, capsys, monkeypatch):
    from personamagic.pipeline import PersonaMagicPipeline

    def terminated(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PersonaMagicPipeline, "__call__", terminated)
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, "-o", tmp_path / "out")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_running_out_of_memory_is_one_line_with_a_reason(capsys):
    """A MemoryError no command words itself (Python raises it without a message)."""
    import argparse

    from personamagic.cli.common import run_handler

    def no_memory(args):
        raise MemoryError

    code = run_handler(no_memory, argparse.Namespace(verbose=False))
    assert_one_line_error(code, capsys.readouterr().err, "cannot allocate memory: out of memory")


def test_a_training_resolution_beyond_the_largest_is_refused_before_loading(astronaut, tmp_path, capsys,
                                                                            monkeypatch):
    import personamagic.jobs.personalize as personalize

    monkeypatch.setattr(personalize, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "tiny-sdxl", "--resolution", 999999936,
                           "-o", tmp_path / "r")
    assert_one_line_error(code, err, "--resolution 999999936 must be a multiple of 64 from 64 to 4096")
    assert not (tmp_path / "r").exists()


def test_from_image_with_a_batch_larger_than_any_batch_is_refused(generated, tmp_path, capsys):
    def huge_batch(meta):
        jobs = [[meta["prompt"], meta["seed"] + i] for i in range(100_000)]
        return json.dumps({**meta, "batch": {"jobs": jobs, "index": 0}})

    image = with_metadata(generated, tmp_path / "edited.png", huge_batch)
    code, _, err = run_cli(capsys, "generate", "--from-image", image, "-o", tmp_path / "again")
    assert_one_line_error(code, err, str(image), "batch.jobs holds 100000 images, more than a batch can (256)")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("command, flags, message", [
    ("generate", ["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --ip-adapter"),
    ("generate", ["--photomaker-lora-scale", "0.3"], "--photomaker-lora-scale needs --photomaker"),
    ("generate", ["--photomaker-merge-step", "1"], "--photomaker-merge-step needs --photomaker"),
    ("train", ["--ip-adapter-scale", "2"], "--ip-adapter-scale needs --ip-adapter"),
    ("train", ["--photomaker-lora-scale", "0.3"], "--photomaker-lora-scale needs --photomaker"),
])
def test_a_plug_in_setting_without_its_plug_in_is_refused(command, flags, message, concept_dir, astronaut, tmp_path,
                                                          capsys):
    inputs = [concept_dir, "-p", "S*", *GENERATE_FAST] if command == "generate" else [astronaut, "--model", "tiny"]
    code, _, err = run_cli(capsys, command, *inputs, *flags, "-o", tmp_path / "o")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_photomaker_on_a_built_sd1_model_is_refused_before_any_download(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "train", astronaut, "--model", "tiny", "--photomaker", "-o", tmp_path / "p")
    assert_one_line_error(code, err, "PhotoMaker works on SDXL models; tiny is a Stable Diffusion 1.x model")


def test_an_empty_token_or_prompt_is_named_not_replaced(concept_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", concept_dir, "--token", "", "-o", tmp_path / "e.safetensors")
    assert_one_line_error(code, err, "token '' must be non-empty text")
    assert not (tmp_path / "e.safetensors").exists()
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "", *GENERATE_FAST, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--prompt must not be empty")


@pytest.mark.parametrize("flags, message", [
    (["--ip-adapter", "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", "--ip-adapter-image", "/nope.png"],
     "cannot read --ip-adapter-image /nope.png (No such file or directory)"),
    (["--photomaker", "--photomaker-image", "/nope.png"],
     "cannot read --photomaker-image /nope.png (No such file or directory)"),
])
def test_a_missing_input_image_is_named_by_its_flag_before_loading(flags, message, concept_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", concept_dir, "-p", "S*", *GENERATE_FAST, *flags, "-o", tmp_path / "o")
    assert_one_line_error(code, err, message)


def _fill(folder) -> None:
    """Fill the filesystem of `folder` to the last byte with one file, `filler`."""
    with open(folder / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root; skipped where mounting is not allowed): fill it with `_fill` when the
    test wants the disk full, so that the libraries raise what they raise on a full disk (safetensors: its
    own SafetensorError)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    gc.collect()  # a concept or checkpoint read in the test is memory-mapped until its tensors are freed
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def full_disk(small_disk):
    """A real, full filesystem (see `small_disk`), full from the start."""
    _fill(small_disk)
    return small_disk


def test_export_onto_a_really_full_disk_is_one_line(concept_dir, full_disk, capsys):
    target = full_disk / "me.safetensors"
    code, _, err = run_cli(capsys, "export", concept_dir, "-o", target)
    assert_one_line_error(code, err, f"cannot write {target}: No space left on device")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_train_onto_a_really_full_disk_is_one_line(astronaut, full_disk, capsys):
    code, _, err = run_cli(capsys, "train", astronaut, "-o", full_disk / "c", "--model", "tiny", "--steps", "2",
                           "--stage-window", "400:800", "--checkpoint-every", "0")
    assert_one_line_error(code, err, "No space left on device", train=True)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_train_many_onto_a_really_full_disk_is_one_line_not_one_per_identity(astronaut, grace_hopper, full_disk,
                                                                             tmp_path, capsys):
    photos = tmp_path / "people"
    photos.mkdir()
    shutil.copy(astronaut, photos / "ann.png")
    shutil.copy(grace_hopper, photos / "bob.png")
    code, _, err = run_cli(capsys, "train-many", photos, "-o", full_disk / "concepts", "--model", "tiny",
                           "--steps", "2", "--stage-window", "400:800", "--checkpoint-every", "0")
    assert_one_line_error(code, err, "No space left on device", train=True)
    assert "warning" not in err  # the disk is the run's fault, not each identity's
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_a_disk_that_fills_while_train_many_runs_stops_it_in_one_line_naming_what_is_kept(
        astronaut, grace_hopper, small_disk, tmp_path, capsys, monkeypatch):
    from personamagic.training.group import GroupTrainer

    photos = tmp_path / "people"
    photos.mkdir()
    shutil.copy(astronaut, photos / "ann.png")
    shutil.copy(grace_hopper, photos / "bob.png")
    train = GroupTrainer.train

    def train_then_fill(self, *args, **kwargs):  # the disk fills up while the group trains
        errors = train(self, *args, **kwargs)
        _fill(small_disk)
        return errors

    monkeypatch.setattr(GroupTrainer, "train", train_then_fill)
    code, _, err = run_cli(capsys, "train-many", photos, "-o", small_disk / "concepts", "--model", "tiny",
                           "--steps", "2", "--stage-window", "400:800", "--checkpoint-every", "1")
    assert_one_line_error(code, err, "No space left on device", "checkpoints", "run the same command again",
                          train=True)
    assert "warning" not in err and "bob" not in err  # the disk is the run's fault: no identity after it starts
    assert not list((small_disk / "concepts").rglob("concept.safetensors"))
    assert list((small_disk / "concepts" / "ann" / "checkpoints").glob("step-*.safetensors"))  # a rerun goes on
    (small_disk / "filler").unlink()  # space again: the same command finishes the job
    monkeypatch.setattr(GroupTrainer, "train", train)
    code, out, err = run_cli(capsys, "train-many", photos, "-o", small_disk / "concepts", "--model", "tiny",
                             "--steps", "2", "--stage-window", "400:800", "--checkpoint-every", "1")
    assert code == 0, err
    assert sorted(p.parent.name for p in (small_disk / "concepts").rglob("concept.safetensors")) == ["ann", "bob"]


def test_a_disk_that_fills_while_train_runs_names_the_kept_checkpoint_and_the_resume_command(
        astronaut, small_disk, capsys, monkeypatch):
    from personamagic.training import checkpoints

    save = checkpoints.save_checkpoint

    def save_then_fill(*args, **kwargs):  # the disk is full right after the first checkpoint
        save(*args, **kwargs)
        _fill(small_disk)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_fill)
    argv = ["train", astronaut, "-o", small_disk / "c", "--model", "tiny", "--steps", "3", "--stage-window",
            "400:800", "--checkpoint-every", "1"]
    code, _, err = run_cli(capsys, *argv)
    kept = small_disk / "c" / "checkpoints" / "step-000001.safetensors"
    assert_one_line_error(code, err, "No space left on device", f"kept the checkpoint {kept}", "--resume",
                          train=True)
    (small_disk / "filler").unlink()
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and (small_disk / "c" / "concept.safetensors").is_file(), err
    assert "resumed from step-000001" in out + err
