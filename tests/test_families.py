"""What code outside `families/` asks a model family: its models built in code, the family a hub model
not downloaded yet most likely has, whether PhotoMaker fits it, how its diffusers pipeline is built, and
the web UI's menu of every family's suggested models."""

import pytest

from personamagic.errors import SettingsError
from personamagic.families import FAMILIES, SD1, SDXL, family_of_built_model, likely_family
from personamagic.models.tiny import BUILT_MODELS, TINY_MODELS, build_model


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_each_family_names_its_built_models_and_its_toy_builds_as_that_family(family):
    assert family.tiny_model in TINY_MODELS and family.random_model in BUILT_MODELS
    assert family_of_built_model(family.tiny_model) is family
    assert family_of_built_model(family.random_model) is family
    toy = build_model(family.tiny_model)
    assert toy.name == family.tiny_model and toy.family is family
    assert family.problems(toy) == []


def test_a_model_read_from_files_has_no_built_family():
    assert family_of_built_model("world") is None
    assert family_of_built_model(SD1.default_model) is None


@pytest.mark.parametrize("hub_id, family", [
    (SD1.default_model, SD1),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", SD1),
    (SDXL.default_model, SDXL),
    ("SG161222/RealVisXL_V4.0", SDXL),  # no family suggests it: "xl" in its name
    ("xlabs/some-sd15-finetune", SD1),  # the owner's name says nothing
    ("SomeOrg/Not-A-Model", SD1),
])
def test_a_hub_model_not_downloaded_gets_the_family_it_most_likely_has(hub_id, family):
    assert likely_family(hub_id) is family


def test_photomaker_is_asked_of_the_family():
    from personamagic.jobs.personalize import check_model_name

    assert [f for f in FAMILIES.values() if f.supports_photomaker] == [SDXL]
    for model in (SDXL.tiny_model, SDXL.random_model, SD1.default_model, SDXL.default_model):
        check_model_name(model, photomaker=True)  # built SDXL models, and hub models (checked once loaded)
    for model in (SD1.tiny_model, SD1.random_model):
        with pytest.raises(SettingsError, match=f"{model} is a Stable Diffusion 1.x model \\(try --model tiny-sdxl\\)"):
            check_model_name(model, photomaker=True)


def test_photomaker_on_a_pipeline_of_a_family_it_does_not_fit_is_one_user_error(tiny_base):
    from personamagic.pipeline import PersonaMagicPipeline

    pipe = PersonaMagicPipeline.from_base(tiny_base)
    with pytest.raises(SettingsError, match="PhotoMaker works on SDXL models; this is a Stable Diffusion 1.x model"):
        pipe.load_photomaker()


def test_the_family_says_how_its_diffusers_pipeline_is_built():
    assert SD1.pipeline_kwargs() == {"safety_checker": None, "requires_safety_checker": False}
    assert SDXL.pipeline_kwargs() == {}
    SD1.pipeline_kwargs()["safety_checker"] = "changed"  # each call is a fresh dict
    assert SD1.pipeline_kwargs()["safety_checker"] is None


def test_the_web_ui_offers_every_familys_suggested_models_the_world_and_the_toys():
    pytest.importorskip("gradio")
    from personamagic.ui.app import DEFAULT_MODELS

    assert DEFAULT_MODELS[0] == SD1.default_model
    for family in FAMILIES.values():
        assert set(family.suggested_models) <= set(DEFAULT_MODELS)
        assert family.tiny_model in DEFAULT_MODELS
    assert "world" in DEFAULT_MODELS and len(set(DEFAULT_MODELS)) == len(DEFAULT_MODELS)

