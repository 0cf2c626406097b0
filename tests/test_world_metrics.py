"""The world's judge: the identity encoder's cosine scale, the shipped judge's quality on held-out
people, world T-Sim on renders, and `evaluate images --metrics world`."""

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from personamagic.world import world_judge_path
from personamagic.world.attributes import IDENTITY_ATTRIBUTES, held_out_identities
from personamagic.world.judge import WorldIdentityEncoder, WorldJudge, identity_embedding, load_judge, save_judge
from personamagic.world.metrics import judge_report, to_tensor, world_i_pre, world_t_sim
from personamagic.world.render import render


@pytest.fixture(scope="module")
def judge():
    return load_judge(world_judge_path())


def one_hot_logits(values: dict) -> dict:
    return {a.name: torch.nn.functional.one_hot(torch.tensor([a.index(values[a.name])]), a.size).float() * 50
            for a in IDENTITY_ATTRIBUTES}


def test_identity_embedding_is_one_for_the_same_person_and_zero_on_average_for_others():
    rng = np.random.default_rng(0)
    people = [{a.name: a.values[int(rng.integers(a.size))] for a in IDENTITY_ATTRIBUTES} for _ in range(400)]
    embeddings = torch.cat([identity_embedding(one_hot_logits(p)) for p in people])
    cos = embeddings @ embeddings.T
    assert torch.allclose(cos.diagonal(), torch.ones(len(people)), atol=1e-5)
    off = cos[~torch.eye(len(people), dtype=torch.bool)]
    assert abs(off.mean().item()) < 0.02  # independent attributes: expected cosine exactly 0
    assert off.min().item() >= -0.5


def test_the_shipped_judge_tells_people_apart_across_contexts(judge):
    report = judge_report(judge, identities=60, contexts=4, seed=7)
    # faces in full view (no hat, no sunglasses, not far away): the bar; across every context the
    # hidden hair and eyes cost some (docs/world.md has both figures)
    assert report["identity_cosine_same_in_full_view"] >= 0.85, report
    assert report["identity_cosine_same"] >= 0.75, report
    assert report["identity_cosine_different"] <= 0.3, report
    assert min(report["accuracy"].values()) > 0.6, report["accuracy"]
    assert min(report["accuracy"][a] for a in ("background", "headwear", "clothing", "glasses", "style",
                                               "position")) > 0.95, report["accuracy"]


def test_world_t_sim_of_renders_of_the_prompt_is_high_and_of_other_contexts_low(judge):
    person = held_out_identities(1, start=3)[0]
    right = [render(person, {"background": "beach", "headwear": "red_hat"}, s).image for s in range(4)]
    wrong = [render(person, {"background": "forest", "headwear": "crown"}, s).image for s in range(4)]
    prompt = ["a photo of a face wearing a red hat on a beach"] * 4
    assert np.mean(world_t_sim(judge, right, prompt)) >= 0.9
    assert np.mean(world_t_sim(judge, wrong, prompt)) <= 0.4
    assert math.isnan(world_t_sim(judge, right[:1], ["a face"])[0])  # a prompt that names no context


def test_world_i_pre_is_high_for_the_person_and_low_for_another(judge):
    a, b = held_out_identities(2, start=11)
    reference = render(a).image
    same = [render(a, {"background": "snow"}, 1).image, render(a, {"style": "painting"}, 2).image]
    other = [render(b, {"background": "snow"}, 1).image]
    assert min(world_i_pre(judge, same, reference)) > 0.8
    assert world_i_pre(judge, other, reference)[0] < 0.5


def test_the_identity_encoder_is_differentiable_and_frozen(judge):
    encoder = WorldIdentityEncoder(judge).train()
    images = to_tensor([render(5).image]).requires_grad_(True)
    encoder(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.judge.training


def test_a_judge_of_other_attributes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "judge.safetensors"
    save_judge(WorldJudge(), path)
    save_file(load_file(path), path, metadata={"world_judge": json.dumps({"attributes": {"hair": ["a"]}, "resolution": 64})})
    with pytest.raises(ValueError, match="not a judge of this world"):
        load_judge(path)


def test_evaluate_images_with_world_metrics(tmp_path, capsys):
    person = held_out_identities(1, start=5)[0]
    reference = tmp_path / "ref.png"
    render(person).image.save(reference)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        render(person, {"background": "city"}, seed).image.save(images / f"{seed}.png")
    code, out, err = run_cli(capsys, "evaluate", "images", images, "-r", reference, "--metrics", "world",
                             "--prompt", "a photo of S* in a city")
    assert code == 0, err
    scores = json.loads((images / "scores.json").read_text())
    assert scores["summary"]["face_model"] == "world-judge"
    assert all(r["t_sim"] == 1.0 for r in scores["images"])
    assert all(r["i_pre"] > 0.8 for r in scores["images"])
    code, _, err = run_cli(capsys, "evaluate", "images", images, "-r", reference, "--metrics", "imagined")
    assert code == 2 and "--metrics" in err
