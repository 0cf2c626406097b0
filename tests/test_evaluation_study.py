"""Evaluation studies: config and presets, identity discovery, sharding, the append-only results, a tiny
study end to end (resumed, rescored, merged) and two CPU processes under `accelerate launch`."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personamagic.errors import PhotoError, SettingsError
from personamagic.evaluation import cli as evaluation_cli
from personamagic.cli import main
from personamagic.evaluation.config import MethodConfig, StudyConfig, load_study_config
from personamagic.evaluation.datasets import discover_identities, select_identities, training_photos
from personamagic.evaluation.ledger import Ledger, append_record, read_records
from personamagic.evaluation.paper_points import TABLE6, paper_dataset
from personamagic.evaluation.plan import Shard, plan_study
from personamagic.evaluation.presets import METHOD_PRESETS, STUDY_PRESETS
from personamagic.evaluation.report import pareto_front, pareto_plot
from personamagic.evaluation.study import RESULTS_DIR, run_study
from personamagic.prompts import EVALUATION_PROMPTS, TANDEM_EQUILIBRIUM_PROMPTS

DATA = Path(__file__).parent / "data"


def write_config(path: Path, **overrides) -> Path:
    """A tiny study: 2 identities x 2 prompts x 1 seed x 2 methods (the two ends of the ablation), 1
    training step of 1 sample, 2 sampling steps."""
    config = {
        "model": "tiny",
        "datasets": [{"name": "faces", "identities": "identities", "layout": "files"}],
        "methods": ["textual-inversion", "personamagic"],
        "prompts": EVALUATION_PROMPTS[:2],
        "seeds": [0],
        # the full method with a 1-step partition warm-up probing 3 timesteps
        "train": {"max_train_steps": 1, "train_batch_size": 1, "partition_warmup_steps": 1, "partition_timesteps": 3},
        "generate": {"num_inference_steps": 2},
        "clip_model": "tiny",
        "device": "cpu",
        "output": "study",
        **overrides,
    }
    identities = path.parent / "identities"
    identities.mkdir(parents=True, exist_ok=True)
    for photo in ("astronaut.png", "grace_hopper.jpg"):
        shutil.copy(DATA / photo, identities / photo)
    path.write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------------------------------
# prompts, presets and config


def test_default_evaluation_prompts_are_disjoint_from_training_prompts():
    config = StudyConfig(datasets=[{"name": "d", "identities": "."}], methods=["vanilla"])
    assert config.prompts == EVALUATION_PROMPTS
    for study in STUDY_PRESETS.values():
        assert not set(study.get("prompts", EVALUATION_PROMPTS)) & set(TANDEM_EQUILIBRIUM_PROMPTS)
    assert not set(config.prompts) & set(TANDEM_EQUILIBRIUM_PROMPTS)


def test_method_presets_are_the_papers_ablation_rows():
    train = {name: MethodConfig(name, name).train_config({}) for name in METHOD_PRESETS}
    ti = train["textual-inversion"]
    assert (ti.mapper_time_dependent, ti.mapper_residual, ti.stage_window, ti.te_weight, ti.use_id_loss) == (
        False, False, (0, 1000), 0.0, False)
    assert MethodConfig("ti", "textual-inversion").effective_mask == "none"
    assert train["vanilla"].mapper_time_dependent and train["vanilla"].stage_window == (0, 1000)
    assert (train["vanilla"].te_weight, train["vanilla"].use_id_loss) == (0.0, False)
    assert (train["+stage"].stage_window, train["+stage"].te_weight, train["+stage"].use_id_loss) == (None, 0.0, False)
    assert (train["+te"].stage_window, train["+te"].te_weight > 0, train["+te"].use_id_loss) == (None, True, False)
    full = train["personamagic"]
    assert (full.stage_window, full.te_weight > 0, full.use_id_loss, full.lambda1, full.lambda2) == (
        None, True, True, 0.7, 0.8)


def test_overrides_precedence_study_then_preset_then_method():
    study_wide = {"te_weight": 0.5, "max_train_steps": 7}
    assert MethodConfig("ti", "textual-inversion").train_config(study_wide).te_weight == 0.0  # the preset's
    assert MethodConfig("v", "vanilla").train_config(study_wide).max_train_steps == 7
    grid = MethodConfig.parse({"name": "l0.6", "preset": "personamagic", "train": {"lambda1": 0.6, "lambda2": 1.0}})
    config = grid.train_config({}, repeat=3)
    assert (config.lambda1, config.lambda2, config.seed) == (0.6, 1.0, 3)
    window = MethodConfig.parse({"preset": "vanilla", "train": {"stage_window": "400:800"}})
    assert window.name == "vanilla" and window.train_config({}).stage_window == (400, 800)
    table2 = load_study_config("table2", data_root="/data")
    assert [m.paper_row for m in table2.methods][0] == ("table2", (0.5, 1.0))


def test_built_in_studies(tmp_path, capsys):
    for name in STUDY_PRESETS:
        assert load_study_config(name, data_root=str(tmp_path)).methods
    table6 = load_study_config("table6", data_root="/data", output=str(tmp_path / "t6"))
    assert [(d.name, d.mode, d.max_identities, d.repeats) for d in table6.datasets] == [
        ("CelebA-HQ", "one-shot", 100, 5), ("FFHQ", "one-shot", 100, 5), ("LFW", "few-shot", 100, 1)]
    assert table6.datasets[0].identities == str(Path("/data/celeba-hq").resolve())
    assert (table6.model, table6.seeds, [m.name for m in table6.methods]) == (
        "CompVis/stable-diffusion-v1-4", [0, 1, 2, 3], ["textual-inversion", "personamagic"])
    with pytest.raises(SettingsError, match="--data-root"):
        load_study_config("table6")
    code = evaluation_cli.main(["run", "tiny-demo", "--data-root", str(DATA), "--output", str(tmp_path / "demo"),
                                "--dry-run"])
    assert code == 0
    assert "demo / personamagic: 2 concepts, 4 images, 4 left" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key"),
    ({"methods": ["dreambooth"]}, "unknown method preset"),
    ({"methods": [{"preset": "vanilla", "train": {"steps": 3}}]}, "unknown TrainConfig field"),
    ({"prompts": ["a photo of a face"]}, "lacks the placeholder"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"generate": {"num_images": 4}}, "unknown generate setting"),
    ({"datasets": [{"name": "d", "identities": ".", "mode": "zero-shot"}]}, "mode"),
    ({"methods": ["vanilla", "vanilla"]}, "used twice"),
])
def test_config_mistakes_are_user_errors(tmp_path, change, message):
    path = write_config(tmp_path / "study.json", **change)
    with pytest.raises(SettingsError, match=message):
        load_study_config(str(path))


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert evaluation_cli.main(["run", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert evaluation_cli.main(["run", str(tmp_path / "nope.json")]) == 2
    assert "neither a study config file nor a built-in study" in capsys.readouterr().err


def test_yaml_config_and_print_config(tmp_path, capsys):
    path = write_config(tmp_path / "study.json")
    yaml_path = tmp_path / "study.yaml"
    yaml_path.write_text("model: tiny\ndatasets:\n  - {name: faces, identities: identities}\nmethods: [vanilla]\n")
    assert evaluation_cli.main(["run", str(yaml_path), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["datasets"][0]["identities"] == str((tmp_path / "identities").resolve())
    assert printed["prompts"] == EVALUATION_PROMPTS and printed["output"] == str((tmp_path / "evaluation").resolve())
    assert load_study_config(str(path), output=str(tmp_path / "elsewhere")).output == str(tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------------
# identities


def _touch_images(root: Path, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)


def test_identity_layouts(tmp_path):
    lfw = tmp_path / "lfw"
    _touch_images(lfw, ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg", "Cid/Cid_0001.png",
                        "Cid/Cid_0002.png", "Cid/Cid_0003.png"])
    (lfw / "notes.txt").write_text("not an image")
    identities = discover_identities(lfw)  # auto: sub-folders -> one identity each
    assert [(i.name, len(i.photos)) for i in identities] == [("Ann", 2), ("Bob", 1), ("Cid", 3)]
    assert [i.name for i in select_identities(identities, dataset="LFW", seed=0, min_photos=2)] == ["Ann", "Cid"]

    ffhq = tmp_path / "ffhq"
    _touch_images(ffhq, ["00000/00000.png", "00000/00001.png", "01000/01000.png"])
    files = discover_identities(ffhq, "files")  # recursive: every image is a person
    assert [i.name for i in files] == ["00000/00000", "00000/00001", "01000/01000"]
    assert [i.name for i in discover_identities(ffhq)] == ["00000", "01000"]  # why FFHQ needs layout: files
    with pytest.raises(PhotoError, match="does not exist"):
        discover_identities(tmp_path / "missing")


def test_seeded_choices_are_stable_and_vary_by_repeat(tmp_path):
    root = tmp_path / "people"
    _touch_images(root, [f"p{i}/{j}.png" for i in range(30) for j in range(6)])
    identities = discover_identities(root)
    sample = select_identities(identities, dataset="X", seed=0, max_identities=10)
    assert len(sample) == 10 and sample == select_identities(identities, dataset="X", seed=0, max_identities=10)
    assert sample != select_identities(identities, dataset="X", seed=1, max_identities=10)
    person = identities[0]
    draws = [training_photos(person, mode="one-shot", repeat=r, dataset="X", seed=0) for r in range(5)]
    assert all(len(d) == 1 for d in draws) and len({d[0] for d in draws}) > 1
    assert draws[2] == training_photos(person, mode="one-shot", repeat=2, dataset="X", seed=0)
    few = training_photos(person, mode="few-shot", repeat=0, dataset="X", seed=0, max_photos=4)
    assert len(few) == 4 and few == sorted(few)
    assert training_photos(person, mode="few-shot", repeat=0, dataset="X", seed=0) == list(person.photos)


# --------------------------------------------------------------------------------------------------
# sharding, ids and the results ledger


def test_shards_split_units_with_no_overlap_and_no_gap(tmp_path):
    config = load_study_config(str(write_config(tmp_path / "study.json", methods=list(METHOD_PRESETS))))
    units = plan_study(config).units
    assert len(units) == 2 * len(METHOD_PRESETS)
    for count in range(1, 6):
        shares = [Shard(k, count).take(units) for k in range(count)]
        ids = [u.unit_id for share in shares for u in share]
        assert sorted(ids) == sorted(u.unit_id for u in units)  # no gap, no overlap
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    halves = [{u.method for u in Shard(k, 2).take(units)} for k in range(2)]
    assert all(len(methods) > 1 for methods in halves)  # methods are mixed across processes
    assert Shard.parse("1/4") == Shard(1, 4)
    with pytest.raises(SettingsError, match="K/N"):
        Shard.parse("4/4")


def test_shard_from_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Shard.from_environment() == Shard(3, 4, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert Shard.from_environment() == Shard(0, 1, 0)


def test_ids_follow_the_settings_that_determine_results(tmp_path):
    base = load_study_config(str(write_config(tmp_path / "a" / "study.json")))
    plan = plan_study(base)
    assert plan_study(base).item_ids == plan.item_ids  # deterministic
    steps = load_study_config(str(write_config(tmp_path / "b" / "study.json", train={"max_train_steps": 2})))
    assert {u.unit_id for u in plan_study(steps).units}.isdisjoint(u.unit_id for u in plan.units)
    rescored = load_study_config(str(write_config(tmp_path / "c" / "study.json", face_model="tiny")))
    new = plan_study(rescored)
    assert [u.unit_id for u in new.units] == [u.unit_id for u in plan.units]  # same concepts
    old_items = [i for items in plan.items.values() for i in items]
    new_items = [i for items in new.items.values() for i in items]
    assert [i.image_id for i in new_items] == [i.image_id for i in old_items]  # same images
    assert {i.item_id for i in new_items}.isdisjoint(i.item_id for i in old_items)  # new scores


def test_ledger_survives_a_record_cut_short(tmp_path):
    ledger = Ledger(tmp_path / "results", 1, 2)
    ledger.append({"item": "a"})
    with ledger.path.open("ab") as f:
        f.write(b'{"item": "b", "t_s')  # a crash in the middle of a write
    ledger.append({"item": "c"})
    Ledger(tmp_path / "results", 0, 2).append({"item": "d"})
    assert sorted(r["item"] for r in read_records(tmp_path / "results")) == ["a", "c", "d"]
    assert ledger.path.name == "process-1-of-2.jsonl"
    append_record(tmp_path / "x.jsonl", {"value": 1.5})
    assert (tmp_path / "x.jsonl").read_text() == '{"value": 1.5}\n'


# --------------------------------------------------------------------------------------------------
# report


def test_pareto_front_and_plot_with_paper_points(tmp_path):
    assert pareto_front([(0.1, 0.5), (0.2, 0.4), (0.15, 0.3), (0.05, 0.5)]) == [(0.1, 0.5), (0.2, 0.4)]
    assert paper_dataset("celeba_hq") == "CelebA-HQ" and paper_dataset("demo") is None
    assert TABLE6["CelebA-HQ"]["PersonaMagic"] == (0.747, 0.345) and TABLE6["LFW"]["PersonaMagic"] == (0.751, 0.278)

    def stat(mean):
        return {"mean": mean, "std": 0.05, "n": 10}

    rows = [{"dataset": "CelebA-HQ", "method": m, "t_sim": stat(x / 2.5), "clip_s": stat(x),
             "i_pre": {"paper": stat(y), "zero": stat(y), "excluded": stat(y)}}
            for m, x, y in [("vanilla", 0.61, 0.33), ("personamagic", 0.74, 0.35)]]
    path = pareto_plot(rows, tmp_path / "pareto.png", datasets=[("CelebA-HQ", "CelebA-HQ")])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300


def test_methods_on_one_dot_of_the_pareto_plot_are_named_together():
    from personamagic.evaluation.report import pareto_figure

    def stat(mean):
        return {"mean": mean, "std": 0.05, "n": 10}

    # CLIP-S clamps at 0: two weak methods at -0.373 and -0.375 CLIP cosine both score 0
    rows = [{"dataset": "world", "method": m, "t_sim": stat(x), "clip_s": stat(x),
             "i_pre": {"paper": stat(y), "zero": stat(y), "excluded": stat(y)}}
            for m, x, y in [("ti", 0.0, 0.2), ("neti", 0.0, 0.2001), ("personamagic", 0.6, 0.5)]]
    (ax,) = pareto_figure(rows).axes
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["overlap: ti, neti"]
    assert ax.get_legend_handles_labels()[1] == ["ti", "neti", "personamagic"]


# --------------------------------------------------------------------------------------------------
# a tiny study end to end


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("study") / "study.json")
    assert evaluation_cli.main(["run", str(path)]) == 0
    return path


def test_study_runs_end_to_end(finished_study):
    output = finished_study.parent / "study"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["images_done"] == summary["images_planned"] == 8
    rows = {row["method"]: row for row in summary["rows"]}
    assert sorted(rows) == ["personamagic", "textual-inversion"]
    for row in rows.values():
        assert (row["concepts"], row["images"], row["failed_concepts"]) == (2, 4, 0)
        assert -1.0 <= row["t_sim"]["mean"] <= 1.0
        # tiny-model images are noise: no face, which exercises the three conventions
        assert row["face_detection_rate"] == 0.0
        assert (row["i_pre"]["paper"]["mean"], row["i_pre"]["zero"]["mean"]) == (-1.0, 0.0)
        assert row["i_pre"]["excluded"]["n"] == 0 and row["wall_s"] > 0
    assert rows["textual-inversion"]["paper"] is None  # "faces" is none of the paper's datasets
    assert "| faces | personamagic | 2/2 | 4/4 |" in (output / "summary.md").read_text()
    with Image.open(output / "pareto.png") as plot:
        assert plot.format == "PNG"
    records = list(read_records(output / RESULTS_DIR))
    images = [r for r in records if r["type"] == "image"]
    assert len(images) == 8 and len({r["item"] for r in images}) == 8
    trained = [r for r in records if r["type"] == "train"]
    assert len(trained) == 4
    assert {tuple(r["stage_window"]) for r in trained if r["method"] == "textual-inversion"} == {(0, 1000)}
    for record in images:
        png = output / record["path"]
        with Image.open(png) as image:
            meta = json.loads(image.text["personamagic"])
        assert (meta["prompt"], meta["seed"], meta["steps"]) == (record["prompt"], record["seed"], 2)
        assert "S*" not in record["text"] and "face" in record["text"]


def test_second_run_skips_everything(finished_study):
    output = finished_study.parent / "study"
    ledger_files = sorted((output / RESULTS_DIR).glob("*.jsonl"))
    before = {p: p.stat().st_size for p in ledger_files}
    pngs = {p: p.stat().st_mtime_ns for p in (output / "images").rglob("*.png")}
    run = run_study(load_study_config(str(finished_study)), Shard())
    assert (run.trained, run.generated, run.scored, run.skipped, run.remaining) == (0, 0, 0, 8, 0)
    assert run.complete and run.report is not None
    assert {p: p.stat().st_size for p in ledger_files} == before
    assert {p: p.stat().st_mtime_ns for p in (output / "images").rglob("*.png")} == pngs


def test_interrupted_record_is_redone_without_regenerating(finished_study):
    output = finished_study.parent / "study"
    [ledger] = (output / RESULTS_DIR).glob("*.jsonl")
    text = ledger.read_bytes()
    ledger.write_bytes(text[:-40])  # the last record was being written when the process died
    run = run_study(load_study_config(str(finished_study)), Shard())
    assert (run.trained, run.generated, run.scored, run.skipped) == (0, 0, 1, 7)
    assert run.complete


def test_changed_metric_rescores_existing_images(finished_study):
    config = load_study_config(str(finished_study))
    run = run_study(dataclasses.replace(config, face_model="tiny"), Shard())  # another recogniser
    assert (run.trained, run.generated, run.scored, run.skipped) == (0, 0, 8, 0)


# --------------------------------------------------------------------------------------------------
# two CPU processes under accelerate launch


def test_two_processes_under_accelerate_launch_split_the_work(tmp_path):
    path = write_config(tmp_path / "study.json", methods=["vanilla"], prompts=EVALUATION_PROMPTS[:1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `--cpu --num_processes 2` starts one process unless MPI is set up; the torchrun launcher behind
    # `--multi_gpu` starts N processes on any machine, and the study needs no process group.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "personamagic.evaluation", "run", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "study"
    shards = {p.name: [r for r in read_records_file(p) if r["type"] == "image"]
              for p in (output / RESULTS_DIR).glob("*")}
    assert sorted(shards) == ["process-0-of-2.jsonl", "process-1-of-2.jsonl"]
    items = [{r["item"] for r in records} for records in shards.values()]
    assert all(len(share) == 1 for share in items)  # one unit x one prompt x one seed each
    planned = plan_study(load_study_config(str(path))).item_ids
    assert items[0].isdisjoint(items[1]) and items[0] | items[1] == planned
    assert json.loads((output / "summary.json").read_text())["complete"]


def read_records_file(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_plug_in_study_of_table_3_runs_on_tiny_sdxl(tmp_path):
    from test_ip_adapter import WEIGHTS, make_tiny_ip_adapter

    from personamagic.models.tiny import build_tiny_photomaker, save_tiny_photomaker_weights
    from personamagic.models import build_tiny_sdxl_components

    base = build_tiny_sdxl_components()
    ip = make_tiny_ip_adapter(tmp_path / "ip", base.unet)
    encoder, _ = build_tiny_photomaker(text_width=base.cross_attention_dim)
    photomaker = save_tiny_photomaker_weights(tmp_path / "photomaker-v1.bin", encoder, base.unet)
    table3 = load_study_config("table3", data_root=str(tmp_path))
    assert table3.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert [m.paper_row for m in table3.methods] == [("table3", "PhotoMaker"), ("table3", "PhotoMaker w/ ours"),
                                                    ("table3", "IP-Adapter"), ("table3", "IP-Adapter w/ ours")]
    plugins = {"photomaker": {"photomaker": str(photomaker)}, "ip-adapter": {"ip_adapter": str(ip), "scale": 1.0}}
    methods = [{"name": name, "preset": name, "plugin": plugins[name.split("+")[0]]} for name in
               ("photomaker", "photomaker+ours", "ip-adapter", "ip-adapter+ours")]
    path = write_config(tmp_path / "study.json", model="tiny-sdxl", methods=methods, prompts=EVALUATION_PROMPTS[:1],
                        datasets=[{"name": "non-celebrities", "identities": "identities", "layout": "files",
                                   "max_identities": 1}])
    assert evaluation_cli.main(["run", str(path)]) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    assert summary["complete"] and sorted(rows) == sorted(plugins.keys() | {"photomaker+ours", "ip-adapter+ours"})
    assert rows["photomaker"]["paper"]["t_sim"] == 0.775 and rows["ip-adapter+ours"]["paper"]["i_pre"] == 0.359
    trained = [r for r in read_records(tmp_path / "study" / RESULTS_DIR) if r["type"] == "train"]
    zero_shot = [r for r in trained if r["method"] in ("photomaker", "ip-adapter")]
    assert {tuple(r["stage_window"]) for r in zero_shot} == {(0, 1000)}
    for method in ("photomaker+ours", "ip-adapter+ours"):  # each image regenerates from itself, plug-in included
        record = next(r for r in read_records(tmp_path / "study" / RESULTS_DIR)
                      if r["type"] == "image" and r["method"] == method)
        png = tmp_path / "study" / record["path"]
        assert main(["generate", "--from-image", str(png), "-o", str(tmp_path / "again" / method)]) == 0
        (again,) = (tmp_path / "again" / method).glob("*.png")
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))
    assert WEIGHTS
