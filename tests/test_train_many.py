"""Many identities per step (`training.group`, `personamagic train-many`): a concept trained in a group
is the concept trained alone; the command end to end (layouts, rerun, bad photos, shards, resume); the
evaluation study training through it."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from personamagic.cli import main
from personamagic.concept import Concept
from personamagic.errors import PhotoError, SettingsError
from personamagic.faces import prepare_photo
from personamagic.faces.masks import landmark_mask
from personamagic.identity import alignment_theta, build_tiny_identity_model
from personamagic.jobs.personalize import personalize, pil_to_tensor
from personamagic.jobs.train_many import discover_identities, safe_name, train_many
from personamagic.training import TrainConfig, Trainer, prepare_training_data
from personamagic.training.group import GroupTrainer

DATA = Path(__file__).parent / "data"
LR = TrainConfig().learning_rate


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> Path:
    """A third face: the astronaut, mirrored."""
    path = tmp_path_factory.mktemp("mirrored") / "mirrored.png"
    with Image.open(DATA / "astronaut.png") as image:
        ImageOps.mirror(image.convert("RGB")).save(path)
    return path


class Lab:
    """The tiny model at one precision, the three identities' data, and their lone runs, each made once."""

    def __init__(self, double: bool, mirrored: Path):
        from personamagic.models import build_tiny_components

        self.base, self.encoder = build_tiny_components(), build_tiny_identity_model()
        if double:
            for module in (self.base.unet, self.base.vae, *self.base.text_encoders, self.encoder):
                module.double()
        self.mirrored = mirrored
        self._data, self._alone = {}, {}

    def identity(self, i: int, optimize: bool):
        """(data, config) of identity i: three unlike each other in photos (the third has two), seed, batch
        and stage window (automatic, fixed, automatic with a restart after the warm-up)."""
        short = TrainConfig(max_train_steps=3, partition_warmup_steps=2, partition_timesteps=6, optimize=optimize,
                            sync_every=2)
        photos, config = [
            ([DATA / "astronaut.png"], replace(short, seed=3)),
            ([DATA / "grace_hopper.jpg"], replace(short, seed=5, stage_window=(200, 600), train_batch_size=1)),
            ([DATA / "grace_hopper.jpg", self.mirrored], replace(short, seed=7, restart_after_partition=True)),
        ][i]
        if i not in self._data:
            self._data[i] = make_data(self.base, photos, self.encoder, seed=i)
        data = self._data[i]
        return replace(data, latent_mean=data.latent_mean.clone()), config  # a copy: a test may spoil it

    def alone(self, i: int, optimize: bool):
        """Identity i trained by itself: (trainer, [(phase, step, logs)])."""
        if (i, optimize) not in self._alone:
            data, config = self.identity(i, optimize)
            logs = []
            with Trainer(self.base, data, config, self.encoder) as trainer:
                if trainer.stage_window is None:
                    trainer.find_stage_window(progress=lambda step, total, out: logs.append(("warm-up", step, out)))
                trainer.train(progress=lambda step, total, out: logs.append(("train", step, out)))
            self._alone[i, optimize] = trainer, logs
        return self._alone[i, optimize]

    def grouped(self, members: list, optimize: bool, spoil=None):
        """The identities `members` trained in one group: (trainers, logs per member, errors)."""
        datas, configs = zip(*(self.identity(i, optimize) for i in members))
        if spoil is not None:
            spoil(datas)
        trainers = [Trainer(self.base, d, c, self.encoder) for d, c in zip(datas, configs)]
        logs = [[] for _ in trainers]
        with GroupTrainer(trainers, [f"id{i}" for i in members]) as group:
            errors = group.train(progress=lambda i, step, total, out, phase: logs[i].append((phase, step, out)))
        return trainers, logs, errors


@pytest.fixture(scope="module")
def lab64(mirrored):
    """In float64 batched kernels round alike whatever the batch, so a grouped run must equal the lone runs
    to the last digits: any difference would be the grouping's fault, not rounding."""
    return Lab(double=True, mirrored=mirrored)


@pytest.fixture(scope="module")
def lab32(mirrored):
    return Lab(double=False, mirrored=mirrored)


def make_data(base, paths, encoder, seed):
    photos = [prepare_photo(p, base.resolution) for p in paths]
    size = (base.resolution, base.resolution)
    return prepare_training_data(
        base.vae,
        torch.stack([pil_to_tensor(p.image) for p in photos]),
        torch.stack([torch.from_numpy(landmark_mask(p.face, base.resolution))[None] for p in photos]),
        torch.randn(len(photos), 16, generator=torch.Generator().manual_seed(seed)),
        torch.stack([alignment_theta(p.face.landmarks, size, landmarks_order="yunet") for p in photos]),
        encoder,
    )


def assert_same_training(alone, grouped, logs_alone, logs_grouped, rtol, atol):
    assert grouped.step_count == alone.step_count
    assert tuple(grouped.stage_window) == tuple(alone.stage_window)
    if alone.stages["method"] == "auto":
        assert grouped.stages["window"] == alone.stages["window"]
        assert grouped.stages["iou"] == pytest.approx(alone.stages["iou"], rel=rtol, abs=1e-12)
    assert torch.equal(grouped.generator.get_state(), alone.generator.get_state())  # the same draws
    a, g = alone.mapper.state_dict(), grouped.mapper.state_dict()
    for name in a:
        assert torch.allclose(g[name], a[name], rtol=rtol, atol=atol), name
    assert [(phase, step) for phase, step, _ in logs_grouped] == [(phase, step) for phase, step, _ in logs_alone]
    for (_, _, mine), (_, _, theirs) in zip(logs_grouped, logs_alone):
        assert mine == pytest.approx(theirs, rel=rtol, abs=1e-9)


@pytest.mark.parametrize("members, optimize", [([0, 1], True), ([0, 1, 2], False), ([2, 1, 0], True)])
def test_a_concept_trained_in_a_group_is_the_concept_trained_alone(lab64, members, optimize):
    grouped, logs, errors = lab64.grouped(members, optimize)
    assert errors == {}
    for i, trainer, member_logs in zip(members, grouped, logs):
        alone, logs_alone = lab64.alone(i, optimize)
        assert_same_training(alone, trainer, logs_alone, member_logs, rtol=1e-9, atol=1e-12)


def test_in_float32_the_group_differs_by_rounding_only(lab32):
    grouped, logs, errors = lab32.grouped([0, 1], optimize=True)
    assert errors == {}
    for i, trainer, member_logs in zip([0, 1], grouped, logs):
        alone, logs_alone = lab32.alone(i, optimize=True)
        # Batched float32 kernels round differently per batch size (~1e-7), and AdamW's first steps move a
        # weight by about lr whatever the size of its gradient, so a near-zero gradient whose rounding
        # differs can move an element of the zero-initialised heads by up to 2 lr: hence atol = 2 lr.
        assert_same_training(alone, trainer, logs_alone, member_logs, rtol=1e-4, atol=2 * LR)


def test_a_diverged_identity_is_named_and_the_others_finish(lab64):
    def spoil(datas):
        datas[0].latent_mean.fill_(float("nan"))

    grouped, logs, errors = lab64.grouped([0, 1], optimize=True, spoil=spoil)
    assert list(errors) == [0] and str(errors[0]).startswith("id0: training diverged at warm-up step 1")
    alone, logs_alone = lab64.alone(1, optimize=True)
    assert_same_training(alone, grouped[1], logs_alone, logs[1], rtol=1e-9, atol=1e-12)


def test_a_group_refuses_identities_that_cannot_share_a_step(lab32):
    data, config = lab32.identity(0, optimize=True)
    base, encoder = lab32.base, lab32.encoder
    with pytest.raises(ValueError, match="te_weight"):
        GroupTrainer([Trainer(base, data, config, encoder),
                      Trainer(base, data, replace(config, te_weight=0.0), encoder)])


# --------------------------------------------------------------------------------------------------
# identities of a folder


def touch_images(folder: Path, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_each_loose_image_or_each_sub_folder_is_an_identity(tmp_path):
    loose = tmp_path / "loose"
    touch_images(loose, "Ada Lovelace.jpg", "b.png", ".hidden.png")
    (loose / "notes.txt").write_text("not a photo")
    assert [name for name, _ in discover_identities(loose).identities] == ["Ada-Lovelace", "b"]
    folders = tmp_path / "folders"
    touch_images(folders / "ada", "1.jpg", "2.jpg")
    touch_images(folders / "bob", "1.png")
    touch_images(folders / "old" / "ada", "1.jpg")  # images two levels down: the scan does not go there
    found = discover_identities(folders).identities
    assert [(name, [p.name for p in photos]) for name, photos in found] == [("ada", ["1.jpg", "2.jpg"]),
                                                                             ("bob", ["1.png"])]
    assert safe_name("../x y") == "x-y" and safe_name("...") == "identity"


@pytest.mark.parametrize("layout, message", [
    ({"a.jpg": None, "b": ["1.jpg"]}, "holds both images"),
    ({"a b.jpg": None, "a-b.png": None}, "would share the concept folder 'a-b'"),
    ({"notes.txt": None}, "no images"),
])
def test_ambiguous_folders_are_one_clear_error(tmp_path, layout, message):
    for name, inner in layout.items():
        if inner is None:
            (tmp_path / name).write_bytes(b"")
        else:
            touch_images(tmp_path / name, *inner)
    with pytest.raises(PhotoError, match=message):
        discover_identities(tmp_path)


# --------------------------------------------------------------------------------------------------
# the command


FAST = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--stage-window", "400:800"]


def photos_folder(path: Path, *photos: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        (path / photo.name).write_bytes(photo.read_bytes())
    return path


def mapper_state(folder: Path) -> dict:
    return Concept.load(folder / "concept.safetensors").mapper_state


def test_train_many_writes_a_concept_per_photo_and_a_rerun_skips_them(tmp_path, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg")
    out = tmp_path / "concepts"
    argv = ["train-many", str(photos), "--output", str(out), "--identities-per-step", "2", *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "astronaut: concept written to" in printed and "grace_hopper: concept written to" in printed
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "grace_hopper"]
    for name in ("astronaut", "grace_hopper"):
        assert {p.name for p in (out / name).iterdir()} == {"concept.safetensors", "mask.png"}
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(argv) == 0
    assert "2 already trained, skipped: astronaut, grace_hopper" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written
    # the concept `personamagic train` writes for that photo alone, with the same flags
    alone = tmp_path / "alone"
    personalize([str(DATA / "astronaut.png")], alone, TrainConfig(max_train_steps=2, stage_window=(400, 800)),
                model="tiny", device="cpu")
    grouped, single = mapper_state(out / "astronaut"), mapper_state(alone)
    assert all(torch.allclose(grouped[k], single[k], rtol=1e-4, atol=2 * LR) for k in single)
    assert Concept.load(out / "astronaut" / "concept.safetensors").extra["photos"] == ["astronaut.png"]


def test_sub_folders_are_few_shot_identities(tmp_path, mirrored, capsys):
    photos = tmp_path / "people"
    photos_folder(photos / "ada", DATA / "astronaut.png", mirrored)
    photos_folder(photos / "grace", DATA / "grace_hopper.jpg")
    out = tmp_path / "concepts"
    argv = ["train-many", str(photos), "-o", str(out), "--identities-per-step", "2", "--steps", "1", *FAST[:-2],
            "--stage-window", "400:800"]
    assert main(argv) == 0
    assert Concept.load(out / "ada" / "concept.safetensors").extra["photos"] == ["astronaut.png", "mirrored.png"]
    assert Concept.load(out / "grace" / "concept.safetensors").extra["photos"] == ["grace_hopper.jpg"]
    assert main(argv) == 0
    assert "2 already trained" in capsys.readouterr().out
    (photos / "loose.jpg").write_bytes((DATA / "astronaut.png").read_bytes())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds both images" in err and err.count("\n") == 1


def test_a_bad_photo_is_reported_and_the_others_are_trained(tmp_path, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg")
    (photos / "broken.jpg").write_text("not an image")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(photos / "noface.png")
    out = tmp_path / "concepts"
    assert main(["train-many", str(photos), "-o", str(out), "--identities-per-step", "3", *FAST]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert [line.split(":")[1].strip() for line in errors] == ["broken", "noface"]
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "grace_hopper"]  # no folder left for the others
    assert (out / "astronaut" / "concept.safetensors").is_file()


def test_two_shards_share_the_identities_out(tmp_path, mirrored, monkeypatch, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg", mirrored)
    out = tmp_path / "concepts"
    config = TrainConfig(max_train_steps=1, stage_window=(400, 800))
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)  # as accelerate launch sets them
        result = train_many(photos, out, config, identities_per_step=2, model="tiny", device="cpu")
        assert result.shard == (int(rank), 2) and result.identities == 3 and not result.failed
        shares.append(set(result.trained))
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {"astronaut", "grace_hopper", "mirrored"}
    assert main(["train-many", str(photos), "-o", str(out), "--shard", "1/2", *FAST[:-2]]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(["train-many", str(photos), "-o", str(out), "--shard", "2/2", *FAST]) == 2


def test_an_identity_cut_mid_run_resumes_from_its_own_checkpoints(tmp_path, mirrored):
    """The first run is cut after grace's step 3 (checkpoint at step 2); the rerun groups grace (resumed,
    past its partition) with a newcomer still warming up, and grace's concept is the uninterrupted one."""
    config = TrainConfig(max_train_steps=4, partition_warmup_steps=1, partition_timesteps=3, checkpoint_every=2,
                         sync_every=1)
    options = {"model": "tiny", "device": "cpu", "identities_per_step": 2}
    photos = photos_folder(tmp_path / "photos", DATA / "grace_hopper.jpg")
    out = tmp_path / "concepts"

    def cut(name, step, total, logs, phase):
        if phase == "train" and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_many(photos, out, config, progress=cut, **options)
    assert [p.name for p in (out / "grace_hopper" / "checkpoints").iterdir()] == ["step-000002.safetensors"]
    photos_folder(photos, mirrored)
    result = train_many(photos, out, config, **options)
    assert sorted(result.trained) == ["grace_hopper", "mirrored"] and not result.failed
    assert "resumed from step-000002.safetensors (step 2)" in result.trained["grace_hopper"].notes
    assert not (out / "grace_hopper" / "checkpoints").exists()
    straight = train_many(photos_folder(tmp_path / "straight", DATA / "grace_hopper.jpg"), tmp_path / "straight-out",
                          config, **options)
    resumed = mapper_state(out / "grace_hopper")
    uninterrupted = mapper_state(tmp_path / "straight-out" / "grace_hopper")
    assert all(torch.allclose(resumed[k], uninterrupted[k], rtol=1e-4, atol=2 * LR) for k in resumed)
    windows = [r.trained["grace_hopper"].concept.stages["window"] for r in (straight, result)]
    assert windows[0] == windows[1]


# --------------------------------------------------------------------------------------------------
# the evaluation study


def test_a_study_trains_its_units_in_groups(tmp_path):
    from test_evaluation_study import write_config

    from personamagic.evaluation.config import load_study_config
    from personamagic.evaluation.ledger import read_records
    from personamagic.evaluation.plan import Shard
    from personamagic.evaluation.study import RESULTS_DIR, run_study
    from personamagic.prompts import EVALUATION_PROMPTS

    path = write_config(tmp_path / "study.json", methods=["personamagic"], prompts=EVALUATION_PROMPTS[:1],
                        identities_per_step=2)
    run = run_study(load_study_config(str(path)), Shard())
    assert run.complete and (run.trained, run.failed) == (2, 0)
    trained = [r for r in read_records(tmp_path / "study" / RESULTS_DIR) if r["type"] == "train"]
    assert len(trained) == 2 and all(r["identities_per_step"] == 2 for r in trained)
    for record in trained:  # each unit's concept is the one `personalize` trains alone
        unit_photos = [str(tmp_path / "identities" / name) for name in record["photos"]]
        concept = Concept.load(tmp_path / "study" / record["concept"])
        alone = tmp_path / "alone" / record["unit"]
        config = TrainConfig(**{k: v for k, v in concept.training.items() if k != "steps_done"})
        personalize(unit_photos, alone, config, model="tiny", device="cpu")
        single = mapper_state(alone)
        assert all(torch.allclose(concept.mapper_state[k], single[k], rtol=1e-4, atol=2 * LR) for k in single)
    assert json.loads((tmp_path / "study" / "summary.json").read_text())["complete"]


# -- mistakes of the whole run, and what a failed run leaves ---------------------------------------------


def errors_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_a_run_where_every_identity_fails_leaves_no_output_folder(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(photos / "gray.png")
    out = tmp_path / "new" / "concepts"
    assert main(["train-many", str(photos), "-o", str(out), *FAST]) == 1
    assert "gray" in errors_of(capsys.readouterr().err)[0]
    assert not (tmp_path / "new").exists()  # both folders the run made are gone


def test_ctrl_c_before_any_checkpoint_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GroupTrainer, "train", interrupted)
    assert main(["train-many", str(photos), "-o", str(tmp_path / "concepts"), *FAST]) == 130
    assert "interrupted before any concept or checkpoint was written; nothing was kept" in capsys.readouterr().err
    assert not (tmp_path / "concepts").exists()


@pytest.mark.parametrize("flags, message", [
    (["--identity-model", "/nope.onnx"], "identity model file /nope.onnx does not exist"),
    (["--num-vectors", "80"], "--num-vectors 80 does not fit"),
    (["--image-encoder", "/nope/encoder"], "/nope/encoder"),
])
def test_a_mistake_of_the_whole_run_is_one_error_not_one_per_identity(flags, message, tmp_path, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg")
    out = tmp_path / "concepts"
    # --stage-window is left out so that --num-vectors reaches the prompts' check
    code = main(["train-many", str(photos), "-o", str(out), *FAST[:-2], *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(errors_of(err)) == 1 and message in errors_of(err)[0], err
    assert "warning: astronaut failed" not in err and not out.exists()


@pytest.mark.parametrize("where, message", [
    ("photos", "is the photos folder"),
    ("photos/concepts", "lies inside the photos folder"),
    ("photos/ada/concepts", "lies inside the photos folder"),
    ("afile/sub", "lies under"),
])
def test_an_output_among_the_photos_or_under_a_file_is_refused(where, message, tmp_path, capsys):
    photos_folder(tmp_path / "photos" / "ada", DATA / "astronaut.png")
    (tmp_path / "afile").write_text("x")
    code = main(["train-many", str(tmp_path / "photos"), "-o", str(tmp_path / where), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and len(errors_of(err)) == 1 and message in err, err
    if where.startswith("photos"):  # and it says where the concepts go instead: beside the photos
        assert f"--output {tmp_path / 'concepts'}" in err, err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["ada"]
    assert sorted(p.name for p in (tmp_path / "photos" / "ada").iterdir()) == ["astronaut.png"]


def test_photos_given_as_the_working_folder_are_told_a_folder_outside_them(tmp_path, capsys, monkeypatch):
    photos_folder(tmp_path / "photos" / "ada", DATA / "astronaut.png")
    monkeypatch.chdir(tmp_path / "photos")
    code = main(["train-many", ".", "-o", "concepts", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and len(errors_of(err)) == 1, err
    assert f"--output {tmp_path.resolve() / 'concepts'}" in err, err  # not `concepts`, the folder it refused


def test_an_unknown_model_is_named_before_any_download_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png")
    code = main(["train-many", str(photos), "-o", str(tmp_path / "c"), "--model", "/nope/model", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model '/nope/model'" in err and len(errors_of(err)) == 1, err


def test_a_checkpoint_it_cannot_use_names_train_many_s_way_out(tmp_path, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png")
    checkpoints = tmp_path / "concepts" / "astronaut" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-000002.safetensors").write_bytes(b"cut short")
    assert main(["train-many", str(photos), "-o", str(tmp_path / "concepts"), *FAST]) == 1
    (line,) = errors_of(capsys.readouterr().err)
    assert f"delete {tmp_path / 'concepts' / 'astronaut'} to train this identity again" in line
    assert "--overwrite" not in line  # train-many has no such flag


def test_launcher_variables_that_make_no_sense_are_named(monkeypatch):
    from personamagic.shards import Shard

    monkeypatch.setenv("RANK", "abc")
    with pytest.raises(SettingsError, match="RANK='abc' is not a whole number"):
        Shard.from_environment()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SettingsError, match=r"RANK=3, WORLD_SIZE=2\) puts this process at index 3 of 2"):
        Shard.from_environment()


def test_the_summary_says_how_many_identities_shared_a_step(tmp_path, capsys):
    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png", DATA / "grace_hopper.jpg")
    assert main(["train-many", str(photos), "-o", str(tmp_path / "c"), "--identities-per-step", "5", *FAST]) == 0
    assert "up to 2 per step" in capsys.readouterr().out  # two identities, however large K is


def test_a_concept_folder_is_never_the_photos_folder_nor_taken_for_a_person(tmp_path, astronaut, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    photos = tmp_path / "w" / "people"
    photos.mkdir(parents=True)
    for name in ("people", "ann"):  # "people" would be written to w/people, the photos folder itself
        shutil.copy(astronaut, photos / f"{name}.png")
    code, _, err = run_cli(capsys, "train-many", photos, "-o", tmp_path / "w", *FAST)
    assert_one_line_error(code, err, "'people'", "photos folder", "rename")
    assert sorted(p.name for p in photos.iterdir()) == ["ann.png", "people.png"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["people"]
    # a concept folder (as an earlier version could leave among the photos) is no person, nor a photos folder
    few_shot = tmp_path / "few"
    (few_shot / "bo").mkdir(parents=True)
    shutil.copy(astronaut, few_shot / "bo" / "1.png")
    concept = few_shot / "bo-concept"
    concept.mkdir()
    (concept / "concept.safetensors").write_bytes(b"")
    Image.new("L", (8, 8)).save(concept / "mask.png")
    assert [name for name, _ in discover_identities(few_shot).identities] == ["bo"]
    with pytest.raises(PhotoError, match="is a concept folder"):
        discover_identities(concept)


def test_images_personamagic_made_are_no_people_and_are_named_in_one_note(tmp_path, capsys):
    from PIL.PngImagePlugin import PngInfo

    from personamagic.jobs.image_record import METADATA_KEY

    photos = photos_folder(tmp_path / "photos", DATA / "astronaut.png")
    record = PngInfo()  # what `generate` writes into every image: its record
    record.add_text(METADATA_KEY, json.dumps({"prompt": "a photo of S*", "seed": 0}))
    Image.open(DATA / "grace_hopper.jpg").save(photos / "000-a-photo-of-s-seed0.png", pnginfo=record)
    Image.new("L", (64, 64)).save(photos / "mask.png")  # a concept's mask preview, left among the photos
    code = main(["train-many", str(photos), "-o", str(tmp_path / "concepts"), *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "concepts").iterdir()) == ["astronaut"]
    notes = [line for line in out.splitlines() if "personamagic made" in line]
    assert len(notes) == 1 and "000-a-photo-of-s-seed0.png" in notes[0] and "mask.png" in notes[0], out
    (photos / "astronaut.png").unlink()  # only images it made: no person, and the error says why
    with pytest.raises(PhotoError, match="no images .*; skipped 2 images personamagic made"):
        discover_identities(photos)


def test_runs_on_one_output_folder_share_the_identities(tmp_path, astronaut, capsys):
    from cli_helpers import run_cli
    from personamagic.files import FolderLock

    photos = tmp_path / "people"
    photos.mkdir()
    for name in ("ann", "bo"):
        shutil.copy(astronaut, photos / f"{name}.png")
    out = tmp_path / "concepts"
    (out / "ann").mkdir(parents=True)
    with FolderLock(out / "ann"):  # a live run (here: this process, on its own open file) trains ann
        code, stdout, err = run_cli(capsys, "train-many", photos, "-o", out, *FAST)
    assert code == 0, err
    assert "note: 1 being trained by another run, left to it: ann" in stdout and "error" not in err
    assert (out / "bo" / "concept.safetensors").is_file() and not (out / "ann" / "concept.safetensors").exists()
    code, stdout, err = run_cli(capsys, "train-many", photos, "-o", out, *FAST)  # that run ended: ann is free
    assert code == 0, err
    assert (out / "ann" / "concept.safetensors").is_file() and "skipped: bo" in stdout


def test_an_identity_finished_by_another_run_meanwhile_is_skipped_not_failed(tmp_path, astronaut, capsys,
                                                                             monkeypatch):
    from cli_helpers import run_cli
    from personamagic.jobs import personalize

    photos = tmp_path / "people"
    photos.mkdir()
    shutil.copy(astronaut, photos / "ann.png")
    out = tmp_path / "concepts"
    enter = personalize.OutputFolder.__enter__

    def finished_meanwhile(self):  # another run wrote ann's concept between discovery and our lock
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "concept.safetensors").write_bytes(b"theirs")
        return enter(self)

    monkeypatch.setattr(personalize.OutputFolder, "__enter__", finished_meanwhile)
    code, stdout, err = run_cli(capsys, "train-many", photos, "-o", out, *FAST)
    assert code == 0 and "--overwrite" not in err + stdout and "--resume" not in err + stdout, err
    assert "skipped: ann" in stdout and (out / "ann" / "concept.safetensors").read_bytes() == b"theirs"
