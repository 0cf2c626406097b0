"""`personamagic bench`: measure personalize and generate speed on this machine (`bench_run`), and
print the figures as a table."""

from __future__ import annotations

from .argtypes import non_negative_int, positive_int
from .bench_sections import DEFAULT_SECTIONS, SECTIONS


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure personalize and generate speed on this machine")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--steps", type=positive_int, default=None, help="training steps (1000 on GPU, 20 on CPU)")
    bench.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="partition warm-up steps (100 on GPU, 10 on CPU)")
    bench.add_argument("--photo", default=None, help="face photo (default: a face of the learning world, drawn)")
    bench.add_argument("--output", "-o", default=None,
                       help="JSON file (default: bench-<device>-<date>.json in the working directory)")
    # The default list first: argparse breaks a word longer than a line where the line ends.
    bench.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                       help="default: " + ",".join(DEFAULT_SECTIONS) + "; the plain step (one identity, every "
                            "speed-up off) is always measured. Comma-separated parts to measure, from: "
                            + "; ".join(f"{name} ({what})" for name, what in SECTIONS.items()) + ". A step figure "
                            "is the median ms of steps at batch 2 with the identity loss, each reading its losses "
                            "back, the first step timed apart")


def run(args) -> int:
    from pathlib import Path

    from ..errors import SettingsError
    from .bench_run import run_benchmark
    from .common import quiet_libraries

    quiet_libraries(args.verbose)
    sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SettingsError(f"unknown --sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    result = run_benchmark(args.device, args.steps, args.warmup_steps, Path(args.photo) if args.photo else None,
                           output=Path(args.output) if args.output else None, sections=sections)
    print(format_table(result))
    print(f"results written to {result['output']}")
    return 0


def format_table(result: dict) -> str:
    """The figures as a plain-text table, each with its ratio (to the plain step, or to what it names)."""
    plain = result["plain_step_ms"]
    rows = [("figure", "value", "ratio"), ("device", result["device"], "")]
    rows.append(("plain step (batch 2, ID loss), one identity, every speed-up off", f"{plain:.1f} ms",
                 "1.00x vs plain step"))
    for name, v in result.get("variants", {}).items():
        peak = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""
        rows.append((f"step: {name}", f"{v['ms']:.1f} ms{peak}, first step {v['first_step_s']:.1f} s",
                     f"{plain / v['ms']:.2f}x vs plain step"))
    if "train_loop_s" in result:
        steps = result["steps"]
        rows.append((f"training loop, {steps} steps", f"{result['train_loop_s']:.1f} s",
                     f"{result['ratios_to_plain_step']['train_loop']:.2f}x vs plain step "
                     f"({plain * steps / 1000:.1f} s plain)"))
        process = result.get("personalize", {}).get("process_s")
        rows.append(("whole personalize job, fresh process", f"{result['personalize_s']:.1f} s"
                     + (f" ({process:.1f} s with interpreter start)" if process else ""), ""))
    if result.get("peak_gib") is not None:
        rows.append(("peak GPU memory (job)", f"{result['peak_gib']:.1f} GiB", ""))
    if "throughput" in result:
        throughput = result["throughput"]
        for k, v in throughput["per_k"].items():
            # K = 1 is the optimised step of one identity, not the plain step
            label = ("grouped step, 1 identity, optimised (the step of 'step: optimized', timed again)" if k == "1"
                     else f"grouped step, {k} identities, optimised")
            if "ms" not in v:
                rows.append((label, v["error"], ""))
                continue
            peak = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""
            rows.append((label, f"{v['ms']:.1f} ms{peak} -> {v['identities_per_hour']:.0f} "
                         f"identities/h ({throughput['steps_per_concept']} steps each)",
                         f"{v['ratio_to_k1']:.2f}x the identities/h of K = 1"))
        rows.append(("identities per hour, best K", f"{result['identities_per_hour']:.0f} at "
                     f"{result['identities_per_step_best']} per step", ""))
    for mode in ("generation", "generation_cuda_graph", "generation_compile"):
        for batch, v in result.get(mode, {}).items():
            rows.append((f"{mode}, {batch} image(s)", f"{v['seconds']:.2f} s ({v['images_per_s']:.2f} img/s), "
                         f"first call {v['first_call_s']:.1f} s", ""))
    for batch, v in result.get("conditioning", {}).items():
        rows.append((f"text conditioning of 50 steps, {batch} image(s)", f"{v['per_step_ms']:.1f} ms step by step -> "
                     f"{v['schedule_ms']:.1f} ms at once", f"{v['ratio']:.2f}x faster at once"))
    if "sampling_parts" in result:
        parts = result["sampling_parts"]
        rows.append(("1 image, each part timed alone (median of 10 isolated calls, ms): "
                     + ", ".join(k[:-3] for k in parts if k.endswith("_ms")),
                     ", ".join(f"{v:.1f}" for k, v in parts.items() if k.endswith("_ms")),
                     f"estimate from the parts {parts['sum_for_one_image_s']:.2f} s (isolated calls miss the warm "
                     "caches of a run: compare with the measured call below)"))
    if result.get("gen_single_image_s") is not None:
        rows.append(("generate 1 image (50 DDIM, CFG 8), the whole pipeline call measured",
                     f"{result['gen_single_image_s']:.2f} s", ""))
        rows.append((f"generate, best batch ({result['gen_best_batch']})", f"{result['gen_images_per_s_best']:.2f} img/s", ""))
    if "sdxl" in result:
        x = result["sdxl"]
        peak = f", peak {x['step_peak_gib']:.1f} GiB" if x.get("step_peak_gib") is not None else ""
        rows.append((f"SDXL ({x['model']}, {x['resolution']}²): step, batch 2", f"{x['step_ms']:.1f} ms{peak}", ""))
        rows.append((f"SDXL ({x['model']}): 1 image, 50 DDIM, CFG 8", f"{x['gen_single_image_s']:.2f} s", ""))
    for name, error in result.get("errors", {}).items():
        rows.append((f"FAILED {name}", error[:80], ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)
