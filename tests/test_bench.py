"""The benchmark end to end on the CPU with the tiny model, at a small size."""

import json
import math
from pathlib import Path

import pytest

from personamagic.cli import main
from personamagic.cli.bench import format_table
from personamagic.cli.bench_run import run_benchmark

REQUIRED = ("device", "plain_step_ms", "step_ms", "train_loop_s", "personalize_s", "peak_gib",
            "gen_single_image_s", "gen_images_per_s_best", "identities_per_hour", "identities_per_step_best")


def test_benchmark_writes_every_required_figure(tmp_path):
    output = tmp_path / "bench.json"
    result = run_benchmark("cpu", steps=2, warmup_steps=1, generation_batches=[1], output=output,
                           sections=("steps", "personalize", "generation", "throughput", "sdxl"),
                           identities_per_step=(2,))
    saved = json.loads(output.read_text())
    assert saved["errors"] == {} and all(key in saved for key in REQUIRED)
    for key in set(REQUIRED) - {"device", "peak_gib"}:
        assert saved[key] > 0 and math.isfinite(saved[key]), key
    assert saved["peak_gib"] is None  # GPU memory only
    job = saved["personalize"]
    assert job["process_s"] > job["personalize_s"] >= job["timings"]["train_s"] > 0  # a fresh process
    assert saved["ratios_to_plain_step"]["optimized"] == saved["plain_step_ms"] / saved["step_ms"]
    assert saved["conditioning"]["1"]["schedule_ms"] > 0 and saved["sampling_parts"]["unet_eager_ms"] > 0
    throughput = saved["throughput"]  # K = 1 is always measured, the ratios are to it
    assert sorted(throughput["per_k"]) == ["1", "2"] and throughput["steps_per_concept"] == 2
    for k, figures in throughput["per_k"].items():
        assert figures["identities_per_hour"] == pytest.approx(3600 * int(k) / (2 * figures["ms"] / 1000))
        assert figures["ratio_to_k1"] == pytest.approx(figures["identities_per_hour"]
                                                       / throughput["per_k"]["1"]["identities_per_hour"])
    assert saved["identities_per_hour"] == max(v["identities_per_hour"] for v in throughput["per_k"].values())
    assert str(saved["identities_per_step_best"]) in throughput["per_k"]
    sdxl = saved["sdxl"]  # tiny-sdxl on a CPU, SDXL-base sizes with random weights on a GPU
    assert sdxl["model"] == "tiny-sdxl" and sdxl["step_ms"] > 0 and sdxl["gen_single_image_s"] > 0
    table = format_table(result)
    assert "plain step (batch 2, ID loss)" in table and "whole personalize job, fresh process" in table
    assert "grouped step, 2 identities" in table and "identities per hour, best K" in table
    assert "SDXL (tiny-sdxl, 128²): step, batch 2" in table


def test_unknown_section_is_a_one_line_error(capsys):
    assert main(["bench", "--sections", "steps,speed"]) == 2
    err = capsys.readouterr().err
    assert "unknown --sections speed" in err and err.count("\n") == 1


def test_bench_writes_where_it_is_run_and_its_help_lists_the_sections(capsys):
    from cli_helpers import run_cli
    from personamagic.cli.bench_run import default_output
    from personamagic.cli.bench_sections import SECTIONS

    path = default_output("CPU (x86_64, 2 threads)")
    assert path.parent == Path(".") and path.name.startswith("bench-cpu-x86-64-2-threads-")
    _, out, _ = run_cli(capsys, "bench", "--help")
    text = " ".join(out.split())
    assert all(section in text for section in SECTIONS) and "default: steps,personalize" in text


def test_the_table_says_what_each_step_figure_is_compared_with():
    """The plain step has every speed-up off; a grouped step is the optimised one, K = 1 being the lone optimised
    step again, and its ratio is to K = 1, not to the plain step: the rows cannot be read against each other."""
    step = {"ms": 80.0, "first_step_s": 0.1, "peak_gib": None}
    per_k = {"1": {**step, "identities_per_hour": 2250.0, "ratio_to_k1": 1.0},
             "2": {**step, "ms": 150.0, "identities_per_hour": 2400.0, "ratio_to_k1": 1.07}}
    table = format_table({"device": "CPU", "plain_step_ms": 120.0, "variants": {"optimized": step},
                          "throughput": {"per_k": per_k, "steps_per_concept": 20}, "identities_per_hour": 2400.0,
                          "identities_per_step_best": 2})
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "plain step (batch 2, ID loss), one identity, every speed-up off" in rows
    assert "1.50x vs plain step" in rows["step: optimized"]
    lone = rows["grouped step, 1 identity, optimised (the step of 'step: optimized', timed again)"]
    assert "80.0 ms" in lone and "1.00x the identities/h of K = 1" in lone and "plain" not in lone
    assert "1.07x the identities/h of K = 1" in rows["grouped step, 2 identities, optimised"]


def test_without_a_photo_the_benchmark_draws_a_face_the_job_crops_without_upscaling(tmp_path):
    """An installed package has no test photos: the default photo is drawn by the package itself, and the
    job finds its face and crops it at every size the benchmark trains at without enlarging it."""
    from personamagic.cli.bench_run import PHOTO_SIDE, draw_photo
    from personamagic.faces import prepare_photo

    photo = draw_photo(tmp_path / "face.png")
    assert photo.is_file() and photo.parent == tmp_path
    prepared = prepare_photo(photo, PHOTO_SIDE)
    assert prepared.num_faces == 1 and prepared.crop.side >= PHOTO_SIDE / 2
