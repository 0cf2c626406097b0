"""The paper's comparisons in the learning world: the `world` study presets, the people they draw, the
baselines that train nothing (the supercategory word, the person said in words), the concept's
textual-inversion export sampled by diffusers' own pipeline, the per-person confidence intervals, and
`world-mini` (the CI-sized study) end to end."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from personamagic.errors import PhotoError
from personamagic.evaluation.config import StudyConfig, load_study_config
from personamagic.evaluation.datasets import render_world_people
from personamagic.evaluation.plan import plan_study
from personamagic.evaluation.statistics import mean_ci, student_t_quantile
from personamagic.evaluation.study import sampling_prompt, take_units
from personamagic.shards import Shard
from personamagic.world.attributes import attribute_named, held_out_identities, identity_attributes
from personamagic.world.metrics import reference_photo
from personamagic.world.render import recorded_render


def test_t_quantile_matches_the_closed_forms():
    # df 1 is Cauchy: t = tan(π(p − ½)); df 2: t = (2p − 1)/√(2p(1 − p)); large df: the normal's quantile
    p = 0.975
    assert student_t_quantile(0.95, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert student_t_quantile(0.95, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert student_t_quantile(0.95, 5000) == pytest.approx(statistics.NormalDist().inv_cdf(p), abs=1e-3)
    assert student_t_quantile(0.5, 1) == pytest.approx(1.0, rel=1e-9)  # Cauchy's quartile
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_mean_ci_uses_the_sample_deviation_and_t():
    assert mean_ci([]) == {"mean": None, "ci": None, "n": 0}
    assert mean_ci([0.4])["ci"] is None
    p = 0.975
    t2 = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    result = mean_ci([1.0, 2.0, 3.0])  # sample sd 1
    assert result["mean"] == pytest.approx(2.0) and result["ci"] == pytest.approx(t2 / math.sqrt(3))


def test_world_people_are_drawn_once_with_their_records(tmp_path):
    render_world_people(tmp_path, count=2, photos=3, first=4)
    people = held_out_identities(2, start=4)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == sorted(f"person-{p}" for p in people)
    first = tmp_path / f"person-{people[0]}"
    assert sorted(p.name for p in first.iterdir()) == ["photo-0.png", "photo-1.png", "photo-2.png"]
    records = [recorded_render(first / f"photo-{k}.png") for k in range(3)]
    assert [r["identity"] for r in records] == [people[0]] * 3 and [r["seed"] for r in records] == [0, 1, 2]
    reference = np.asarray(reference_photo(people[0])[0])
    assert np.array_equal(np.asarray(Image.open(first / "photo-0.png").convert("RGB")), reference)
    assert not np.array_equal(np.asarray(Image.open(first / "photo-1.png").convert("RGB")), reference)
    before = (first / "photo-1.png").stat().st_mtime_ns
    render_world_people(tmp_path, count=2, photos=3, first=4)
    assert (first / "photo-1.png").stat().st_mtime_ns == before


def test_the_world_study_needs_no_data_root_and_pairs_each_export_with_its_concept(tmp_path):
    config = load_study_config("world", output=str(tmp_path / "study"))
    plan = plan_study(config)
    assert (tmp_path / "study" / "world-people" / "one-shot").is_dir()
    people = {u.identity for u in plan.units}
    assert len(people) == config.datasets[0].max_identities
    assert len(plan.units) == len(people) * len(config.methods) == len({u.unit_id for u in plan.units})
    by_id = {u.unit_id: u for u in plan.units}
    exports = [u for u in plan.units if u.method == "textual-inversion-export"]
    assert len(exports) == len(people)
    for unit in exports:
        source = by_id[unit.concept_unit]
        assert (source.method, source.identity) == ("personamagic", unit.identity)
        assert unit.train == source.train and unit.sampler == "diffusers-textual-inversion"
    for shards in (2, 3):
        taken = [take_units(Shard(k, shards), plan.units) for k in range(shards)]
        assert sorted(u.unit_id for share in taken for u in share) == sorted(by_id)  # each unit exactly once
        for share in taken:
            ids = {u.unit_id for u in share}
            assert all(u.concept_unit in ids for u in share if u.concept_unit)


def test_the_attributes_baseline_says_the_person_and_is_scored_on_the_plain_prompt(tmp_path):
    config = load_study_config("world", output=str(tmp_path / "study"))
    plan = plan_study(config)
    unit = next(u for u in plan.units if u.method == "attributes")
    person = recorded_render(unit.photos[0])["identity"]
    attributes = identity_attributes(person)
    prompt = sampling_prompt(unit, "a photo of S* on a beach")
    assert prompt.startswith("a photo of S* ") and prompt.endswith(" on a beach")
    for name in ("eye_colour", "beard"):  # every nameable attribute in the grammar's own words
        attribute = attribute_named(name)
        assert attribute.phrases[attribute.index(attributes[name])] in prompt
    assert attributes["hair_style"] in prompt and (attributes["hair_style"] == "bald" or attributes["hair_colour"] in prompt)
    item = plan.items[unit.unit_id][0]
    assert item.prompt == config.prompts[0]  # T-Sim scores the prompt without the words
    plain = next(u for u in plan.units if u.method == "personamagic")
    assert sampling_prompt(plain, "a photo of S* on a beach") == "a photo of S* on a beach"


def test_the_attributes_baseline_of_a_real_photo_fails_its_unit_in_one_line(tmp_path):
    from dataclasses import replace

    config = load_study_config("world-mini", output=str(tmp_path / "study"))
    unit = replace(plan_study(config).units[0], subject="attributes")
    photo = tmp_path / "me.png"
    Image.new("RGB", (64, 64)).save(photo)
    with pytest.raises(PhotoError, match="not a world render: its person's attributes are unknown"):
        sampling_prompt(replace(unit, photos=(str(photo),)), "a photo of S*")


@pytest.mark.parametrize("change, message", [
    ({"methods": ["textual-inversion-export"]}, "samples the concepts of 'personamagic'"),
    ({"methods": [{"name": "x", "preset": "personamagic", "concept_of": "x"}]}, "samples the concepts of 'x'"),
])
def test_baselines_that_cannot_run_are_refused(change, message):
    data = {"datasets": [{"name": "d", "identities": "."}], "methods": ["personamagic"], **change}
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(data)


def test_a_world_dataset_needs_its_size():
    with pytest.raises(ValueError, match="needs max_identities"):
        StudyConfig.from_dict({"datasets": [{"name": "w", "identities": "w", "layout": "world"}],
                               "methods": ["personamagic"]})


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_the_textual_inversion_sampler_is_the_export_in_diffusers_pipeline(tmp_path, model):
    """diffusers' own pipeline of the family with the exported file gives what the project's pipeline
    gives with exactly what the export describes (one vector at every step, no residual)."""
    from _concepts import random_concept

    from personamagic.evaluation.study import _Sampler
    from personamagic.pipeline import PersonaMagicPipeline
    from personamagic.stage_export import piecewise_concept, static_segment

    config = StudyConfig(datasets=[{"name": "d", "identities": "."}], methods=["personamagic"], model=model,
                         generate={"num_inference_steps": 4})
    sampler = _Sampler(config, torch.device("cpu"))
    concept = random_concept(sampler.base())
    path = concept.save(tmp_path / "concept")
    tokens = len(sampler.base().tokenizers[0])
    plain, _ = sampler.textual_inversion_pipeline(path, tmp_path / "exports" / "me.safetensors")
    assert (tmp_path / "exports" / "me.safetensors").is_file()
    assert len(sampler.base().tokenizers[0]) == tokens == len(plain.tokenizer) - 1  # the base's tokenizer untouched
    ours = PersonaMagicPipeline.from_base(sampler.base())
    ours.set_progress_bar_config(disable=True)
    piecewise_concept(ours.load_concept(concept), static_segment(concept))
    prompts = ["a photo of S* on a beach", "a sketch of S*"]
    run = [pipe(prompts, num_inference_steps=4, guidance_scale=8.0, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images for pipe in (plain, ours)]
    assert np.abs(run[0] - run[1]).max() < 1e-4
    full = PersonaMagicPipeline.from_base(sampler.base())
    full.set_progress_bar_config(disable=True)
    full.load_concept(concept)
    mapper = full(prompts, num_inference_steps=4, guidance_scale=8.0, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert np.abs(mapper - run[0]).max() > 1e-3  # the stages and the residual are what the export loses


def test_world_mini_learns_a_likeness(tmp_path):
    """The CI-sized study: one held-out person, the full method against the supercategory word (the
    only claim robust at this size: the concept is more like the photo). A rerun does nothing."""
    from personamagic.evaluation.study import run_study

    config = load_study_config("world-mini", output=str(tmp_path / "mini"))
    run = run_study(config)
    assert run.complete and run.trained == 2 and run.failed == 0
    summary = json.loads((tmp_path / "mini" / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    assert rows["personamagic"]["per_identity"]["identities"] == 1
    gain = rows["personamagic"]["per_identity"]["i_pre"]["mean"] - rows["supercategory"]["per_identity"]["i_pre"]["mean"]
    assert gain > 0.03, gain
    assert rows["personamagic"]["stage_windows"][0] != [0, 1000]  # the automatic partition ran
    cost = summary["cost"]
    assert sorted(cost["unit_s"]) == ["personamagic", "supercategory"] and all(len(v) == 1 for v in cost["unit_s"].values())
    parts = cost["train_s"] + cost["generate_s"] + cost["score_s"]
    assert sum(v[0] for v in cost["unit_s"].values()) == pytest.approx(parts) and 0 < parts
    assert cost["span_s"] >= parts  # from the run's start, one process doing every unit
    assert "world I-Pre (95% CI)" in (tmp_path / "mini" / "summary.md").read_text()
    from personamagic.evaluation.report import pareto_figure

    ax = pareto_figure(summary["rows"], world=True).axes[0]  # as the report draws it: a point per method
    assert "world I-Pre" in ax.get_ylabel() and "world T-Sim" in ax.get_xlabel()
    people = rows["personamagic"]["per_identity"]
    assert tuple(ax.lines[0].get_xydata()[0]) == pytest.approx((people["t_sim"]["mean"], people["i_pre"]["mean"]))
    again = run_study(config)
    assert again.trained == 0 and again.generated == 0 and again.skipped == run.scored
