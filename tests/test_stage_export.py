"""The concept's stages as piecewise-constant embeddings (for ComfyUI and A1111): the pieces, and the
project's pipeline sampling exactly what an export describes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _concepts import random_concept

from personamagic.pipeline import PersonaMagicPipeline
from personamagic.errors import ConceptError, DiskError, SettingsError
from personamagic.stage_export import (SamplerSettings, bin_edges, export_stages, piecewise_concept, stage_segments,
                                        static_segment, without_residual)


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


def exported(tmp_path, base, tool, bins=4, window=(381, 800), **options):
    concept = random_concept(base, window=window)
    concept.save(tmp_path / "ann")
    if tool == "comfyui":  # the tiny model is no checkpoint file: the workflow needs one named
        options.setdefault("settings", SamplerSettings(checkpoint="tiny.safetensors"))
    return export_stages(tmp_path / "ann", tmp_path / tool, tool=tool, bins=bins, **options)


def assert_comfyui_accepts(workflow: dict, checkpoint="tiny.safetensors"):
    """The workflow against ComfyUI's node declarations (the fixture): comfy-lint's names, links and
    types, and every number inside its input's declared range."""
    from comfy_lint import lint_workflow
    from comfy_lint.schema import normalize

    info = json.loads(OBJECT_INFO.read_text())
    # the checkpoint list is the files of the user's models/checkpoints: one that holds the model's file
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = [checkpoint]
    diagnostics = lint_workflow(workflow, normalize({k: v for k, v in info.items() if not k.startswith("_")}))
    assert [str(d) for d in diagnostics] == []
    for node in workflow.values():  # comfy-lint checks names, links and types; the numbers' ranges here
        declared = info[node["class_type"]]["input"]["required"]
        for key, value in node["inputs"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                options = declared[key][1]
                assert options.get("min", value) <= value <= options.get("max", value), (node, key)


def test_the_comfyui_workflow_passes_comfy_lint_and_comfyuis_declared_ranges(tmp_path, tiny_base):
    result = exported(tmp_path, tiny_base, "comfyui", prompt="a photo of S* on a beach")
    workflow = json.loads((tmp_path / "comfyui" / "workflow_api.json").read_text())
    assert_comfyui_accepts(workflow)
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
    from personamagic.stage_export import a1111_ddim_calls

    result = exported(tmp_path, tiny_base, "a1111", window=window, prompt="a photo of S* in the snow",
                      settings=SamplerSettings(steps=steps))
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
    for argv, *messages in [(["--format", "comfyui"], "--output"),
                          (["--format", "a1111", "-o", tmp_path / "x", "-p", "a photo of me"], "placeholder"),
                          (["--format", "a1111", "-o", tmp_path / "x", "--bins", "1000"], "--bins 1000"),
                          (["-o", tmp_path / "x.safetensors", "--bins", "2"], "--format textual-inversion",
                           "--bins")]:
        code, _, err = run_cli(capsys, "export", tmp_path / "c", *argv)
        assert_one_line_error(code, err, *messages)
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


# -- what the export refuses before it writes anything --------------------------------------------


@pytest.mark.parametrize("tool, steps, expected", [("a1111", 1, "2 to 1000"), ("a1111", 1001, "2 to 1000"),
                                                   ("comfyui", 1001, "1 to 1000")])
def test_step_counts_the_tools_cannot_sample_are_refused(tool, steps, expected, tmp_path, tiny_base, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    with pytest.raises(SettingsError, match=f"--steps {steps}.*{expected}"):
        exported(tmp_path, tiny_base, tool, settings=SamplerSettings(checkpoint="tiny.safetensors", steps=steps))
    extra = ["--checkpoint", "tiny.safetensors"] if tool == "comfyui" else []
    code, _, err = run_cli(capsys, "export", tmp_path / "ann", "--format", tool, "-o", tmp_path / "x", "--steps", steps,
                           *extra)
    assert_one_line_error(code, err, f"--steps {steps}", expected)
    assert not (tmp_path / tool).exists() and not (tmp_path / "x").exists()


def test_the_comfyui_ranges_checked_are_the_ones_comfyui_declares():
    from personamagic.stage_export import COMFYUI_RANGES

    info = json.loads(OBJECT_INFO.read_text())
    assert {"seed", "steps", "cfg", "width", "height", "batch_size"} <= set(COMFYUI_RANGES)
    for declared in COMFYUI_RANGES.values():
        options = info[declared.node]["input"]["required"][declared.input][1]
        assert (declared.low, declared.high) == (options["min"], options["max"]), declared
        if declared.step is not None:
            assert declared.step == options["step"], declared


@pytest.mark.parametrize("argv, message", [(["--width", "8"], "--width 8"), (["--height", "100"], "--height 100"),
                                           (["--width", "16392"], "--width 16392"),
                                           (["--guidance-scale", "100.5"], "--guidance-scale 100.5"),
                                           (["--seed", str(2**64)], f"--seed {2**64}")])
def test_comfyui_numbers_outside_comfyuis_declared_ranges_are_refused(argv, message, tmp_path, tiny_base, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    random_concept(tiny_base).save(tmp_path / "c")
    code, _, err = run_cli(capsys, "export", tmp_path / "c", "--format", "comfyui", "-o", tmp_path / "x",
                           "--checkpoint", "tiny.safetensors", *argv)
    assert_one_line_error(code, err, message, "ComfyUI")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt, argv, flag", [
    *[("textual-inversion", [flag, value], flag) for flag, value in (
        ("--steps", "20"), ("--guidance-scale", "7"), ("--seed", "1"), ("--width", "512"), ("--height", "512"),
        ("--negative-prompt", "x"))],
    ("comfyui", ["--token", "<me>"], "--token"), ("a1111", ["--vectors", "centre"], "--vectors"),
    *[("a1111", [flag, value], flag) for flag, value in (
        ("--guidance-scale", "7"), ("--seed", "1"), ("--width", "512"), ("--height", "512"), ("--negative-prompt", "x"),
        ("--checkpoint", "x.safetensors"))],
])
def test_a_flag_the_format_does_not_use_is_refused_before_anything_is_read(fmt, argv, flag, tmp_path, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    output = tmp_path / ("x.safetensors" if fmt == "textual-inversion" else "x")
    # no concept there: the flag is refused before the concept is looked for
    code, _, err = run_cli(capsys, "export", tmp_path / "nothing", "--format", fmt, "-o", output, *argv)
    assert_one_line_error(code, err, flag, f"--format {fmt}")
    assert not output.exists()


def test_a_staged_export_refuses_an_sdxl_concept_whose_encoder_widths_are_swapped(tmp_path):
    from personamagic.models import build_tiny_sdxl_components

    concept = random_concept(build_tiny_sdxl_components())
    concept.mapper_config["encoder_widths"] = concept.mapper_config["encoder_widths"][::-1]
    concept.save(tmp_path / "swapped")
    for tool in ("comfyui", "a1111"):
        with pytest.raises(ConceptError, match="swapped.*nothing was written"):
            export_stages(tmp_path / "swapped", tmp_path / tool, tool=tool,
                          settings=SamplerSettings(checkpoint="tiny.safetensors"))
        assert not (tmp_path / tool).exists()


def test_sdxl_staged_exports_write_clip_l_and_clip_g_embeddings(tmp_path):
    from safetensors.torch import load_file

    from personamagic.models import build_tiny_sdxl_components

    xl = build_tiny_sdxl_components()
    widths = {"clip_l": 32, "clip_g": 48}  # the tiny SDXL's encoders (clip_l narrower, as in every SDXL)
    for tool in ("comfyui", "a1111"):
        result = exported(tmp_path / tool, xl, tool, prompt="a photo of S* on a beach")
        assert len(result.embeddings) == 5
        for path in result.embeddings:
            state = load_file(path)
            assert {key: tuple(value.shape) for key, value in state.items()} == {k: (1, w) for k, w in widths.items()}
        late = result.segments[-1].embedding
        assert torch.equal(load_file(result.embeddings[-1])["clip_g"][0], late[0, 32:].float())
    workflow = json.loads((tmp_path / "comfyui" / "comfyui" / "workflow_api.json").read_text())
    assert_comfyui_accepts(workflow)
    latent = next(n for n in workflow.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    assert (latent["width"], latent["height"]) == (1024, 1024)  # SDXL's resolution, not SD-1.x's 512
    assert "ann_1" in (tmp_path / "a1111" / "a1111" / "prompt.txt").read_text()


# -- the checkpoint the workflow loads ------------------------------------------------------------


def test_the_default_checkpoint_is_the_models_own_file_name():
    from personamagic.stage_export import checkpoint_file

    assert checkpoint_file("stable-diffusion-v1-5/stable-diffusion-v1-5") == "v1-5-pruned-emaonly.safetensors"
    assert checkpoint_file("/models/realistic.safetensors") == "realistic.safetensors"  # not .safetensors twice
    assert checkpoint_file(r"C:\models\old.ckpt") == "old.ckpt"
    for model in ("world", "tiny", "/models/my-diffusers-folder", "someone/their-model"):
        assert checkpoint_file(model) is None, model  # no single file known: only the user knows its name


def test_a_model_without_a_checkpoint_file_needs_checkpoint_named(tmp_path, tiny_base, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    concept = random_concept(tiny_base)
    concept.base_model = "world"  # the shipped world model: a diffusers folder, no single checkpoint file
    concept.save(tmp_path / "c")
    code, _, err = run_cli(capsys, "export", tmp_path / "c", "--format", "comfyui", "-o", tmp_path / "x")
    assert_one_line_error(code, err, "world", "no single-file checkpoint", "--checkpoint")
    assert not (tmp_path / "x").exists()
    code, out, err = run_cli(capsys, "export", tmp_path / "c", "--format", "comfyui", "-o", tmp_path / "x",
                             "--checkpoint", "mine.safetensors")
    assert code == 0, err
    workflow = json.loads((tmp_path / "x" / "workflow_api.json").read_text())
    assert workflow["1"]["inputs"]["ckpt_name"] == "mine.safetensors" and "mine.safetensors" in out
    code, out, err = run_cli(capsys, "export", tmp_path / "c", "--format", "a1111", "-o", tmp_path / "y")
    assert code == 0, err  # A1111's prompt names no checkpoint; what to select is said
    assert "no single-file checkpoint" in out


def test_the_default_checkpoint_of_a_single_file_model_is_that_file(tmp_path, tiny_base):
    concept = random_concept(tiny_base)
    concept.base_model = "/models/realistic.safetensors"
    concept.save(tmp_path / "c")
    export_stages(tmp_path / "c", tmp_path / "x", tool="comfyui")
    workflow = json.loads((tmp_path / "x" / "workflow_api.json").read_text())
    assert workflow["1"]["inputs"]["ckpt_name"] == "realistic.safetensors"


# -- a failed write leaves nothing ----------------------------------------------------------------


def failing_at(n: int, calls: list):
    """os.replace that fails (disk full) at its n-th call: every file the export puts in place goes
    through it (a temporary file renamed to its name), and so does the finished folder."""
    import errno
    import os

    replace = os.replace

    def fake(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst)

    return fake


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tool", ["comfyui", "a1111"])
def test_a_write_that_fails_leaves_nothing_half_written(tool, tmp_path, tiny_base, monkeypatch):
    import os

    random_concept(tiny_base).save(tmp_path / "c")
    settings = SamplerSettings(checkpoint="tiny.safetensors")
    writes = []
    with monkeypatch.context() as patch:  # count the writes of a whole export
        patch.setattr(os, "replace", failing_at(0, writes))
        export_stages(tmp_path / "c", tmp_path / "done", tool=tool, settings=settings)
    before = folder_bytes(tmp_path / "done")
    for n in range(1, len(writes) + 1):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_at(n, []))
            with pytest.raises(DiskError, match="No space left on device.*nothing was written"):
                export_stages(tmp_path / "c", tmp_path / "new" / "x", tool=tool, settings=settings)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "done"], n  # no folder, no temporary file
    random_concept(tiny_base, seed=1).save(tmp_path / "other")
    shutil.copytree(tmp_path / "done", tmp_path / "copy")
    overwrites = []
    with monkeypatch.context() as patch:  # the renames of a whole export over a finished one
        patch.setattr(os, "replace", failing_at(0, overwrites))
        export_stages(tmp_path / "other", tmp_path / "copy", tool=tool, settings=settings, overwrite=True)
    shutil.rmtree(tmp_path / "copy")
    # another concept over a finished export (--overwrite), failing at each rename, the moves into place
    # included: it stays as it was
    for n in range(1, len(overwrites) + 1):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_at(n, []))
            with pytest.raises(DiskError):
                export_stages(tmp_path / "other", tmp_path / "done", tool=tool, settings=settings, overwrite=True)
        assert folder_bytes(tmp_path / "done") == before, n
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "done", "other"], n
