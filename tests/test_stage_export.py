"""The concept's stages as piecewise-constant embeddings (for ComfyUI and A1111): the pieces, and the
project's pipeline sampling exactly what an export describes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _concepts import random_concept

from personamagic.pipeline import PersonaMagicPipeline
from personamagic.stage_export import (bin_edges, export_stages, piecewise_concept, stage_segments, static_segment,
                                        without_residual)


def test_bins_cut_the_dynamic_stage_from_its_top_down():
    assert bin_edges(400, 800, 1) == [800, 400]
    assert bin_edges(400, 800, 4) == [800, 700, 600, 500, 400]
    edges = bin_edges(381, 1000, 8)
    assert edges[0] == 1000 and edges[-1] == 381 and all(a > b for a, b in zip(edges, edges[1:]))
    with pytest.raises(ValueError, match="bins"):
        bin_edges(400, 800, 0)


def test_segments_cover_the_schedule_once_in_denoising_order(tiny_base):
    concept = random_concept(tiny_base, window=(300, 700))
    segments = stage_segments(concept, 4)
    assert [s.name for s in segments] == ["static 1", "bin 1", "bin 2", "bin 3", "bin 4", "static 2"]
    assert segments[0].embedding is None and (segments[0].lo, segments[0].hi) == (700, 1000)
    covered = sorted(t for s in segments for t in range(s.lo, s.hi))
    assert covered == list(range(1000))
    mapper = concept.build_mapper("cpu")
    with torch.no_grad():
        late, _ = mapper(torch.tensor([300]), concept.mean_image_embed()[None])
    assert torch.allclose(segments[-1].embedding, late[0])  # static 2 is mapper(t_lo), as in sampling
    word = mapper.super_embedding.norm()
    assert all(torch.allclose(s.embedding.norm(dim=-1), word, rtol=1e-4) for s in segments[1:-1])
    whole = random_concept(tiny_base, window=(0, 1000))  # no static stage: no piece for one
    assert [s.name for s in stage_segments(whole, 2)] == ["bin 1", "bin 2"]


def sample(pipe, seed=3):
    return pipe(["a photo of S* in a forest"], num_inference_steps=8, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def test_more_bins_come_closer_to_the_mapper_in_the_pipeline(tiny_base):
    concept = random_concept(tiny_base, window=(200, 900))

    def pipe_with(segments):
        pipe = PersonaMagicPipeline.from_base(tiny_base)
        pipe.set_progress_bar_config(disable=True)
        loaded = pipe.load_concept(concept)
        if segments is not None:
            piecewise_concept(loaded, segments)
        else:  # the full mapper without its residual: what the bins approximate
            without_residual(loaded)
        return pipe

    full = sample(pipe_with(None))
    gaps = {k: np.abs(sample(pipe_with(stage_segments(concept, k))) - full).mean() for k in (1, 8)}
    static = np.abs(sample(pipe_with(static_segment(concept))) - full).mean()
    assert gaps[8] < gaps[1] and gaps[8] < static
    assert np.isfinite(list(gaps.values())).all()


# -- ComfyUI: the workflow against ComfyUI's own node declarations ------------------------------------

OBJECT_INFO = Path(__file__).parent / "data" / "comfyui_object_info.json"


def exported(tmp_path, tiny_base, tool, bins=4, window=(381, 800), **options):
    concept = random_concept(tiny_base, window=window)
    concept.save(tmp_path / "ann")
    return export_stages(tmp_path / "ann", tmp_path / tool, tool=tool, bins=bins, **options)


def test_the_comfyui_workflow_passes_comfy_lint_and_comfyuis_declared_ranges(tmp_path, tiny_base):
    from comfy_lint import lint_workflow
    from comfy_lint.schema import normalize

    result = exported(tmp_path, tiny_base, "comfyui", prompt="a photo of S* on a beach")
    workflow = json.loads((tmp_path / "comfyui" / "workflow_api.json").read_text())
    info = json.loads(OBJECT_INFO.read_text())
    # the checkpoint list is the files of the user's models/checkpoints: one that holds the model's file
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = ["tiny.safetensors"]
    diagnostics = lint_workflow(workflow, normalize({k: v for k, v in info.items() if not k.startswith("_")}))
    assert [str(d) for d in diagnostics] == []
    for node in workflow.values():  # comfy-lint checks names, links and types; the numbers' ranges here
        declared = info[node["class_type"]]["input"]["required"]
        for key, value in node["inputs"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                options = declared[key][1]
                assert options.get("min", value) <= value <= options.get("max", value), (node, key)
    texts = [n["inputs"]["text"] for n in workflow.values() if n["class_type"] == "CLIPTextEncode"]
    assert texts[0] == "a photo of face on a beach" and texts[1] == "a photo of embedding:ann_1 on a beach"
    assert len(result.embeddings) == 5 and all(p.is_file() for p in result.embeddings)
    assert sorted(p.name for p in (tmp_path / "comfyui" / "embeddings").iterdir()) == [
        "ann_1.safetensors", "ann_2.safetensors", "ann_3.safetensors", "ann_4.safetensors", "ann_late.safetensors"]


def comfyui_active(start: float, end: float, t: float) -> bool:
    """ComfyUI's rule: a range is active for sigma_end <= sigma <= sigma_start, with percent_to_sigma(p)
    = sigma((1 - p)·999) (p <= 0: above every sigma, p >= 1: 0); sigma grows with t."""
    top = float("inf") if start <= 0 else (1 - start) * 999
    bottom = -1.0 if end >= 1 else (1 - end) * 999
    return bottom <= t <= top


@pytest.mark.parametrize("window", [(381, 800), (0, 1000), (1, 999), (500, 700)])
def test_each_timestep_falls_in_exactly_its_own_piece_in_comfyui(window, tiny_base):
    from personamagic.stage_export import segment_range

    concept = random_concept(tiny_base, window=window)
    segments = stage_segments(concept, 4)
    ranges = [segment_range(s, 1000) for s in segments]
    assert ranges[0][0] == 0.0 and ranges[-1][1] == 1.0  # both ends of the schedule
    for t in range(1000):  # every timestep a sampler may visit, the window's edges included
        active = [s.name for s, (a, b) in zip(segments, ranges) if comfyui_active(a, b, t)]
        assert active == [next(s.name for s in segments if s.lo <= t < s.hi)], t


# -- A1111: the prompt parsed back by A1111's prompt-editing rules ------------------------------------


def a1111_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """get_learned_conditioning_prompt_schedules for prompts of plain text and nested [a:b:w] edits
    (modules/prompt_parser.py: `w` with a decimal point is the step int(w·steps), clamped to steps;
    the text at end step e takes `a` while e <= w's step; steps are the sorted set of the switch steps
    that are >= 1, and `steps`)."""
    def parse(text, i=0, stop=""):
        items = []
        while i < len(text) and text[i] not in stop:
            if text[i] == "[":  # "[" [prompt ":"] prompt ":" NUMBER "]"
                parts = []
                while text[i] != "]":
                    part, i = parse(text, i + 1, ":]")
                    parts.append(part)
                number = "".join(parts.pop()).strip()
                before, after = parts if len(parts) == 2 else ([], parts[0])
                when = min(steps, int(float(number) * steps if "." in number else float(number)))
                items.append((before, after, when))
                i += 1
            else:
                items.append(text[i])
                i += 1
        return items, i

    tree, _ = parse(prompt)
    switches = set()

    def collect(items):
        for item in items:
            if isinstance(item, tuple):
                if item[2] >= 1:
                    switches.add(item[2])
                collect(item[0]), collect(item[1])

    def at(items, step):
        return "".join(item if isinstance(item, str) else at(item[0] if step <= item[2] else item[1], step)
                       for item in items)

    collect(tree)
    return [(end, at(tree, end)) for end in sorted(switches | {steps})]


def a1111_text_at_call(schedule, call: int) -> str:
    """The sampler's model call `call` (from 0) uses the first entry whose end step is >= call."""
    return next(text for end, text in schedule if call <= end)


def test_the_parser_of_the_test_reads_a1111s_own_examples():
    # the examples of prompt_parser.py's docstring
    assert a1111_schedule("a [b:.5] c", 10) == [(5, "a  c"), (10, "a b c")]
    assert a1111_schedule("a[b:[c:d:2]:1]e", 10) == [(1, "abe"), (2, "ace"), (10, "ade")]


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("window", [(381, 800), (0, 1000), (500, 700)])
def test_the_a1111_prompt_switches_at_the_concepts_own_timesteps(steps, window, tmp_path, tiny_base):
    from personamagic.stage_export import SamplerSettings, a1111_ddim_calls

    result = exported(tmp_path, tiny_base, "a1111", window=window, prompt="a photo of S* in the snow",
                      settings=SamplerSettings(checkpoint="x.safetensors", steps=steps))
    assert (tmp_path / "a1111" / "prompt.txt").read_text().strip() == result.text
    schedule = a1111_schedule(result.text, steps)
    calls = a1111_ddim_calls(steps)
    words = {s.name: ("face" if s.embedding is None else result.names[s.name]) for s in result.segments}
    for call, t in enumerate(calls):
        expected = words[next(s.name for s in result.segments if s.lo <= t < s.hi)]
        if call == 0 and len(calls) > 1 and expected != words[next(s.name for s in result.segments
                                                                     if s.lo <= calls[1] < s.hi)]:
            continue  # a piece only call 0 would use cannot be written (the documented exception)
        assert a1111_text_at_call(schedule, call) == f"a photo of {expected} in the snow", (call, t)


def test_a1111_ddim_calls_the_model_at_its_spaced_timesteps_from_the_top():
    from personamagic.stage_export import a1111_ddim_calls

    calls = a1111_ddim_calls(50)
    assert calls[:2] == [981, 961] and calls[-1] == 21 and len(calls) == 49
    assert len(a1111_ddim_calls(30)) == 30 and a1111_ddim_calls(20)[0] == 951


def test_staged_export_refusals(tmp_path, tiny_base, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    random_concept(tiny_base, window=(381, 800)).save(tmp_path / "c")
    for argv, message in [(["--format", "comfyui"], "--output"),
                          (["--format", "a1111", "-o", tmp_path / "x", "-p", "a photo of me"], "placeholder"),
                          (["--format", "a1111", "-o", tmp_path / "x", "--bins", "1000"], "--bins 1000"),
                          (["-o", tmp_path / "x.safetensors", "--bins", "2"], "--bins belong to --format")]:
        code, _, err = run_cli(capsys, "export", tmp_path / "c", *argv)
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_export_fidelity_measures_each_export_against_the_full_mapper(tiny_base):
    from personamagic.evaluation.export_fidelity import export_fidelity, fidelity_markdown

    report = export_fidelity(tiny_base, random_concept(tiny_base, window=(300, 800)), ["a photo of S*"], seeds=1,
                             steps=3, bins=(1, 4), score=lambda images, prompts: {"images": float(len(images))})
    rows = report["variants"]
    assert list(rows) == ["full mapper", "mapper, no residual", "1 bin", "4 bins", "one vector (textual inversion)"]
    assert rows["full mapper"]["pixel_difference"] == 0.0 and rows["one vector (textual inversion)"]["pixel_difference"] > 0
    assert all(row["images"] == 1.0 for row in rows.values())
    assert "| 4 bins |" in fidelity_markdown(report, "tiny")
