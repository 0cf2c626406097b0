"""The web page: Gradio components wired to a `Studio` (see studio.py for what each action does).

Every event handler here returns at once: heavy work is a job on the studio's queue, and a per-tab
`gr.Timer` polls that tab's jobs while any is unfinished. Each tab keeps its own job ids in a
`gr.State`, so tabs share the queue (one GPU job at a time) and the library, but not their progress,
results or selection. Handlers never raise into Gradio: a `PersonaMagicError` becomes its message in the
page, anything else a short generic line (the traceback goes to the server log).
"""

from __future__ import annotations

import functools
import html
import logging
import os

# Gradio reads this at import and at Blocks(); the UI never sends usage data or checks for updates.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402  (the environment above must be set first)

from ..errors import PersonaMagicError, SettingsError  # noqa: E402
from ..families import FAMILIES  # noqa: E402
from ..models.tiny import TINY_MODELS  # noqa: E402
from .. import WORLD_RECIPE  # noqa: E402
from ..models.world import WORLD  # noqa: E402
from .jobs import CANCELLED, DONE, FAILED, INTERNAL_ERROR, QUEUED, RUNNING  # noqa: E402
from .studio import MASK_CHOICES, Studio  # noqa: E402

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a tab with an unfinished job asks for its progress
MAX_PLOT_POINTS = 400  # per loss term: longer curves are thinned before they are sent
# the model menu: every family's suggested hub models (the default base model first), the learning world's
# model and the offline toys
DEFAULT_MODELS = (*(model for family in FAMILIES.values() for model in family.suggested_models), WORLD, *TINY_MODELS)
EXTRA_SUPERCATEGORIES = ("cat", "dog")  # non-face examples: no face detection, no identity loss

CSS = """
.pm-status { padding: 0.5em 0.75em; border-radius: 6px; }
.pm-error { background: #fde8e8; color: #8a1c1c; }
.pm-done { background: #e6f4ea; color: #1e5631; }
.pm-status progress { width: 100%; height: 1.1em; }
"""


def status_html(text: str, kind: str = "info", progress: tuple[int, int] | None = None) -> str:
    """A status box; `kind` (info, error, done, queued, running, cancelled) becomes the CSS class pm-KIND."""
    bar = ""
    if progress is not None:
        step, total = progress
        bar = f'<progress value="{step}" max="{max(total, 1)}"></progress>'
    return f'<div class="pm-status pm-{kind}">{bar}<div class="pm-text">{html.escape(text)}</div></div>'


def error_html(err: BaseException) -> str:
    if isinstance(err, PersonaMagicError):
        return status_html(str(err), "error")
    logger.error("unexpected error in the web UI", exc_info=err)
    return status_html(INTERNAL_ERROR, "error")


def guarded(num_outputs: int, status_index: int):
    """Turn any exception of a handler into an error box at output `status_index` (others skipped)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # PersonaMagicError: its message; anything else: generic line + log
                outputs = [gr.skip()] * num_outputs
                outputs[status_index] = error_html(err)
                return tuple(outputs) if num_outputs > 1 else outputs[0]

        return wrapper

    return decorate


def _int(value, name: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a whole number, got {value!r}") from None
    if number != value or number < minimum:
        raise SettingsError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return number


def training_defaults(model: str) -> tuple[int, float, str]:
    """What the page proposes for a base model: training steps, learning rate and an example prompt (the
    world model's own recipe and a scene it can draw; the paper's defaults for every other model)."""
    from ..training.config import TrainConfig

    if (model or "").strip() == WORLD:
        return (WORLD_RECIPE["max_train_steps"], WORLD_RECIPE["learning_rate"],
                "a photo of S* wearing a red hat on a beach\na painting of S* in a city")
    paper = TrainConfig()
    return paper.max_train_steps, paper.learning_rate, "a photo of S* as an astronaut"


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None


def _job_status(snapshot: dict, ahead: int, what: str) -> str:
    """The status box of a job (training or generation) from its snapshot."""
    state, step, total = snapshot["state"], snapshot["step"], snapshot["total"]
    if state == QUEUED:
        waiting = f"{ahead} job(s) ahead" if ahead else "starting"
        return status_html(f"{what}: queued ({waiting})", "queued", (0, 1))
    if state == RUNNING:
        if snapshot["cancelling"]:
            return status_html(f"{what}: cancelling (at the next step)…", "running", (step, max(total, 1)))
        if not total:
            return status_html(f"{what}: loading the model…", "running", (0, 1))
        phase = {"warm-up": "warm-up step", "train": "training step", "saving": "saving, step", "": "image"}
        text = f"{what}: {phase.get(snapshot['phase'], snapshot['phase'])} {step}/{total}"
        if snapshot["history"]:
            text += f" · loss {snapshot['history'][-1].get('loss', float('nan')):.4f}"
        return status_html(text, "running", (step, total))
    if state == FAILED:
        return status_html(f"{what} failed: {snapshot['error']}", "error")
    if state == CANCELLED:
        return status_html(f"{what} cancelled; nothing was saved", "cancelled")
    return ""  # DONE: the caller words it with the result


def loss_frame(history: list[dict]):
    """Long-format table (step, value, term) of a job's loss history, thinned to MAX_PLOT_POINTS;
    None (an empty plot) while there is no history.

    Never an empty table: Gradio 6.31's plot builds its Vega-Lite spec from the first value it gets,
    colour scale included (its domain is the terms in that value), and later values only swap the
    spec's data. An empty first table fixed the colour domain to no terms, so every line was drawn
    without a stroke colour: an empty-looking plot (with "Infinite extent" warnings in the console).
    None shows the empty box instead and makes the plot build a new spec from the next table, the
    first with losses, which holds every term of the run (each step reports all its terms).
    """
    import pandas as pd

    if not history:
        return None
    stride = max(1, -(-len(history) // MAX_PLOT_POINTS))
    rows = [
        {"step": entry["index"], "value": value, "term": term}
        for entry in history[::stride]
        for term, value in entry.items()
        if term not in ("index", "phase", "step")
    ]
    frame = pd.DataFrame(rows, columns=["step", "value", "term"])
    # The plot picks its axes' scales from the dtypes: numeric steps and values, categorical terms.
    return frame.astype({"step": "int64", "value": "float64", "term": "str"})


def concept_pictures(folder) -> list[tuple[str, str]]:
    from ..jobs.personalize import CONCEPT_PICTURES

    return [(str(folder / name), caption) for name, caption in CONCEPT_PICTURES if (folder / name).is_file()]


def build_app(studio: Studio, *, default_model: str = DEFAULT_MODELS[0]) -> gr.Blocks:
    """The Blocks app; launch it with `launch_kwargs(studio)`."""
    from ..jobs.personalize import FACE_SUPERCATEGORIES
    from ..pipeline.schedulers import SCHEDULERS
    from ..training.config import TrainConfig
    from ..jobs.generate_config import GenerateConfig

    models = list(dict.fromkeys([default_model, *DEFAULT_MODELS]))
    default_steps, default_lr, default_prompts = training_defaults(default_model)
    supercategories = ["face", *sorted(FACE_SUPERCATEGORIES - {"face"}), *EXTRA_SUPERCATEGORIES]

    def concept_choices():
        return [(entry.label, entry.name) for entry in studio.library.concepts()]

    with gr.Blocks(title="PersonaMagic", analytics_enabled=False, delete_cache=(86400, 86400)) as demo:
        tab = gr.State({})  # this tab's job ids, what its gallery shows and which image is selected
        timer = gr.Timer(POLL_SECONDS, active=False)
        gr.Markdown(
            "# PersonaMagic\n"
            "Personalize Stable Diffusion (1.x or SDXL) to one person from a photo: **1.** upload the photo and "
            "check the face and mask, **2.** personalize (a concept is saved in the library), "
            "**3.** generate with prompts that contain the concept's placeholder (`S*`). "
            f"Library: `{studio.library.root}`. The `world` model is the learning world's small model of drawn people (64², offline; its example "
            "photos are in `examples/world/`, and choosing it sets its own steps and learning rate); `tiny` and "
            "`tiny-sdxl` are offline toys whose images are noise."
        )

        # 1. personalize -----------------------------------------------------------------------
        gr.Markdown("## 1. Personalize")
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(label="Photos of one person", file_count="multiple", elem_id="photos")
                photo_status = gr.HTML(elem_id="photo-status")
                preview = gr.Gallery(label="Detected face (green) and training mask (red)", columns=2,
                                     height="auto", object_fit="contain", elem_id="face-preview", format="png")
            with gr.Column(scale=1):
                name = gr.Textbox(label="Concept name", value="my-face", elem_id="concept-name")
                with gr.Row():
                    supercategory = gr.Dropdown(supercategories, value="face", label="Supercategory",
                                                allow_custom_value=True, elem_id="supercategory")
                    model = gr.Dropdown(models, value=default_model, label="Base model", allow_custom_value=True,
                                        elem_id="model")
                with gr.Row():
                    mask = gr.Radio(list(MASK_CHOICES), value="auto", label="Face mask", elem_id="mask",
                                    info="auto: CLIPSeg; landmarks for tiny; the render's own mask for world")
                    placeholder = gr.Textbox(label="Placeholder", value="S*", elem_id="placeholder")
                # Not in a closed gr.Accordion: Gradio 6 drops edits made in one on its first event.
                with gr.Row():
                    steps = gr.Number(default_steps, label="Steps", precision=0, minimum=1, elem_id="train-steps")
                    learning_rate = gr.Number(default_lr, label="Learning rate", minimum=0, elem_id="learning-rate")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="train-seed")
                with gr.Row():
                    window = gr.Textbox("auto", label="Dynamic stage (auto or LO:HI)", elem_id="stage-window")
                    warmup = gr.Number(100, label="Warm-up steps (auto stage)", precision=0, minimum=0,
                                       elem_id="warmup-steps")
                id_loss = gr.Checkbox(True, label="Identity loss (SFace, Apache-2.0)",
                                      elem_id="id-loss")
                with gr.Row():
                    train_button = gr.Button("Personalize", variant="primary", elem_id="train")
                    cancel_train = gr.Button("Cancel", elem_id="cancel-train")
                train_status = gr.HTML(elem_id="train-status")
                # No fixed height: Gradio sizes the chart to the height given but draws the label above
                # it, inside the same box, so the legend at the bottom (which line is which term) was cut.
                loss_plot = gr.LinePlot(x="step", y="value", color="term", label="Training losses",
                                        elem_id="loss-plot")
                pictures = gr.Gallery(label="Concept pictures (click to enlarge)", columns=3, height=240,
                                      object_fit="contain",
                                      elem_id="concept-pictures")

        # 2. generate ---------------------------------------------------------------------------
        gr.Markdown("## 2. Generate")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    concepts = gr.CheckboxGroup(concept_choices(), label="Concepts in the library",
                                                elem_id="concepts", scale=4)
                    refresh = gr.Button("Refresh", size="sm", elem_id="refresh", scale=1)
                prompts = gr.Textbox(default_prompts, lines=3, elem_id="prompts",
                                     label="Prompts (one per line; S* = the concept)")
                negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                with gr.Row():
                    num_images = gr.Number(4, label="Images per prompt", precision=0, minimum=1, elem_id="num-images")
                    gen_seed = gr.Number(0, label="Seed of the first image", precision=0, minimum=0, elem_id="gen-seed")
                with gr.Row():
                    gen_steps = gr.Number(50, label="Steps", precision=0, minimum=1, elem_id="gen-steps")
                    guidance = gr.Number(8.0, label="Guidance", minimum=0, elem_id="guidance")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler", elem_id="scheduler")
                with gr.Row():
                    gen_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_gen = gr.Button("Cancel", elem_id="cancel-generate")
                gen_status = gr.HTML(elem_id="gen-status")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images (select one to regenerate it)", columns=3, height=380,
                                     object_fit="contain", elem_id="gallery", buttons=["download", "fullscreen"])
                with gr.Row():
                    regen_button = gr.Button("Regenerate selected image", elem_id="regenerate")
                    regen_file = gr.File(label="…or regenerate from a personamagic PNG", file_types=[".png"],
                                         elem_id="regen-file", height=90)
                downloads = gr.File(label="Download (original PNGs, generation settings inside)",
                                    file_count="multiple", interactive=False, elem_id="downloads")

        # handlers --------------------------------------------------------------------------------
        @guarded(2, 1)
        def on_photos(files, supercategory_, mask_, model_):
            if not files:
                return [], ""
            previews, errors = studio.preview(files, supercategory_, mask_, model_)
            if errors:
                return previews, status_html("; ".join(errors), "error")
            return previews, status_html(f"{len(previews)} photo(s) ready", "done")

        @guarded(5, 0)
        def on_train(files, name_, supercategory_, model_, mask_, placeholder_, steps_, learning_rate_, seed_,
                     window_, warmup_, id_loss_, state):
            from .studio import parse_stage_window

            config = TrainConfig(
                placeholder=(placeholder_ or "").strip() or "S*",
                supercategory=(supercategory_ or "").strip(),
                max_train_steps=_int(steps_, "steps", 1),
                learning_rate=_float(learning_rate_, "learning rate"),
                seed=_int(seed_, "seed"),
                stage_window=parse_stage_window(window_),
                partition_warmup_steps=_int(warmup_, "warm-up steps"),
                use_id_loss=bool(id_loss_),
            )
            job = studio.submit_personalize(files, name_, config, model=(model_ or "").strip(), mask=mask_)
            state = {**state, "train": job.id, "train_points": None}
            # None, not an empty table, clears the plot: see loss_frame (a new run may have other terms).
            return (status_html(f"training {job.label!r}: queued", "queued", (0, 1)), state, gr.Timer(active=True),
                    None, [])

        @guarded(3, 0)
        def on_generate(selected, prompts_, negative_, num_images_, seed_, steps_, guidance_, scheduler_, state):
            numbers = {"num_images": _int(num_images_, "images per prompt", 1), "seed": _int(seed_, "seed"),
                       "num_inference_steps": _int(steps_, "steps", 1),
                       "guidance_scale": _float(guidance_, "guidance")}
            try:
                config = GenerateConfig(
                    prompts=[line.strip() for line in (prompts_ or "").splitlines() if line.strip()],
                    negative_prompt=negative_ or "",
                    scheduler=scheduler_,
                    **numbers,
                )
            except SettingsError as err:
                raise SettingsError(f"{err} (type prompts such as \"a photo of S* as an astronaut\")") from None
            job = studio.submit_generate(list(selected or []), config)
            state = {**state, "generate": job.id}
            return status_html("generating: queued", "queued", (0, 1)), state, gr.Timer(active=True)

        def regenerate_from(path, state):
            job, record = studio.submit_regenerate(path)
            state = {**state, "generate": job.id}
            return (status_html(f"regenerating seed {record.seed}: queued", "queued", (0, 1)), state,
                    gr.Timer(active=True), record.prompt, record.negative_prompt or "", 1, record.seed,
                    record.steps, record.guidance_scale, record.scheduler)

        @guarded(10, 0)
        def on_regenerate(state):
            if not state.get("selected"):
                raise SettingsError("select an image in the gallery first")
            return regenerate_from(state["selected"], state)

        @guarded(10, 0)
        def on_regen_file(file, state):
            if not file:
                return (gr.skip(),) * 10
            return regenerate_from(file, state)

        def on_select(state, evt: gr.SelectData):
            shown = state.get("gallery", [])
            selected = shown[evt.index] if evt.index is not None and evt.index < len(shown) else None
            return {**state, "selected": selected}

        @guarded(1, 0)
        def on_cancel(state, key):
            job = studio.jobs.get(state.get(key))
            if job is None or not studio.jobs.cancel(job.id):
                return status_html("nothing to cancel", "info")
            return status_html("cancelling…", "running")

        def on_refresh(selected):
            choices = concept_choices()
            names = {value for _, value in choices}
            return gr.CheckboxGroup(choices=choices, value=[n for n in selected or [] if n in names])

        @guarded(9, 0)
        def on_tick(state, selected):
            out = {k: gr.skip() for k in ("train", "plot", "pictures", "concepts", "gen", "gallery", "downloads")}
            state = dict(state)
            busy = False
            train = studio.jobs.get(state.get("train"))
            if train is not None and state.get("train_shown") != train.id:
                snap = train.snapshot()
                busy |= not train.finished
                if snap["history"] and len(snap["history"]) != state.get("train_points"):
                    out["plot"] = loss_frame(snap["history"])
                    state["train_points"] = len(snap["history"])
                if snap["state"] == DONE:
                    result = snap["result"]
                    lo, hi = result["stage_window"]
                    text = f"concept {result['name']!r} saved in the library; dynamic stage {lo} ≤ t < {hi}"
                    out["train"] = status_html("; ".join([text, *result["notes"]]), "done", (1, 1))
                    out["pictures"] = concept_pictures(result["folder"])
                    out["concepts"] = gr.CheckboxGroup(
                        choices=concept_choices(), value=list(dict.fromkeys([*(selected or []), result["name"]]))
                    )
                    state["train_shown"] = train.id
                else:
                    out["train"] = _job_status(snap, studio.jobs.ahead_of(train), f"training {snap['label']!r}")
                    if train.finished:
                        state["train_shown"] = train.id
            gen = studio.jobs.get(state.get("generate"))
            if gen is not None and state.get("gen_shown") != gen.id:
                snap = gen.snapshot()
                busy |= not gen.finished
                if snap["state"] == DONE:
                    images = [str(p) for p in snap["result"]["images"]]
                    shown = state.get("gallery", []) + images  # appended: a selected index stays valid
                    state["gallery"] = shown
                    out["gallery"] = [(p, os.path.basename(p)) for p in shown]
                    out["downloads"] = shown
                    notes = "; ".join(snap["result"]["notes"])
                    out["gen"] = status_html(f"{len(images)} image(s) made" + (f"; {notes}" if notes else ""),
                                             "done", (1, 1))
                    state["gen_shown"] = gen.id
                else:
                    out["gen"] = _job_status(snap, studio.jobs.ahead_of(gen), "generating")
                    if gen.finished:
                        state["gen_shown"] = gen.id
            return (out["train"], out["plot"], out["pictures"], out["concepts"], out["gen"], out["gallery"],
                    out["downloads"], state, gr.Timer(active=busy))

        quick = {"concurrency_limit": None}  # handlers only queue work or read state: never make tabs wait
        for trigger in (photos.change, supercategory.change, mask.change, model.change):
            trigger(on_photos, [photos, supercategory, mask, model], [preview, photo_status], **quick)
        model.change(lambda model_: training_defaults(model_)[:2], [model], [steps, learning_rate], **quick)
        train_button.click(on_train, [photos, name, supercategory, model, mask, placeholder, steps, learning_rate,
                                      seed, window, warmup, id_loss, tab],
                           [train_status, tab, timer, loss_plot, pictures], **quick)
        cancel_train.click(functools.partial(on_cancel, key="train"), [tab], [train_status], **quick)
        gen_button.click(on_generate, [concepts, prompts, negative, num_images, gen_seed, gen_steps, guidance,
                                       scheduler, tab], [gen_status, tab, timer], **quick)
        cancel_gen.click(functools.partial(on_cancel, key="generate"), [tab], [gen_status], **quick)
        regen_outputs = [gen_status, tab, timer, prompts, negative, num_images, gen_seed, gen_steps, guidance,
                         scheduler]
        regen_button.click(on_regenerate, [tab], regen_outputs, **quick)
        regen_file.upload(on_regen_file, [regen_file, tab], regen_outputs, **quick)
        gallery.select(on_select, [tab], [tab], **quick)
        refresh.click(on_refresh, [concepts], [concepts], **quick)
        demo.load(on_refresh, [concepts], [concepts], **quick)
        timer.tick(on_tick, [tab, concepts],
                   [train_status, loss_plot, pictures, concepts, gen_status, gallery, downloads, tab, timer],
                   show_progress="hidden", **quick)
    return demo


def launch_kwargs(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> dict:
    """`Blocks.launch` arguments: local only, no share link, no usage data, library files servable."""
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "inbrowser": False,
        "allowed_paths": [str(studio.library.root)],
        # Staging folders hold copies of the uploaded photos: never serve them.
        "blocked_paths": [str(studio.library.staging_dir)],
        "max_file_size": f"{studio.max_upload_mb:g}mb",
        "run_history": False,  # Gradio 6 would keep every run's inputs (photos) in the browser
        "enable_monitoring": False,
        "mcp_server": False,
        "pwa": False,
        "ssr_mode": False,
        "footer_links": ["api", "settings"],
        "css": CSS,
    }
