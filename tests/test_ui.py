"""The web UI: the job queue and the studio without a browser, then the real page in headless Chromium.

The browser test needs Debian's `chromium` (installed by .ci/run); without it the test fails with a
message saying so, unless PERSONAMAGIC_SKIP_BROWSER=1. It saves a screenshot of the finished page to
test-artifacts/ui.png, and to docs/images/ui.png when PERSONAMAGIC_UPDATE_SCREENSHOT=1.
"""

import io
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personamagic.concept import CONCEPT_FILENAME
from personamagic.errors import PhotoError, SettingsError
from personamagic.ui.jobs import CANCELLED, DONE, FAILED, INTERNAL_ERROR, QUEUED, RUNNING, Job, JobQueue
from personamagic.ui.studio import Library, Studio, check_name, parse_stage_window

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT_DOC = ROOT / "docs" / "images" / "ui.png"
CHROMIUM = os.environ.get("PERSONAMAGIC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
JOB_TIMEOUT_S = 300  # generous: a loaded 2-core machine can be 10x slower than an idle one

# Gradio 6.31's queue calls pandas APIs that pandas 3 deprecates: not ours to fix, and one per event.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def folder_job(tmp_path, name, work, kind="generate"):
    folder = tmp_path / name
    folder.mkdir()
    return Job(kind, folder, work, label=name)


@pytest.fixture
def jobs():
    queue = JobQueue()
    yield queue
    queue.close()


# --------------------------------------------------------------------------------------------------
# the job queue


def test_jobs_run_one_at_a_time_in_order(jobs, tmp_path):
    spans, release = {}, threading.Event()

    def work(job):
        spans[job.label] = [time.monotonic()]
        if job.label == "first":
            assert release.wait(10)
        spans[job.label].append(time.monotonic())
        return job.label.upper()

    first = jobs.submit(folder_job(tmp_path, "first", work))
    second = jobs.submit(folder_job(tmp_path, "second", work))
    deadline = time.monotonic() + 10
    while first.state != RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the worker would have started the second job by now if it ran two at once
    assert (first.state, second.state) == (RUNNING, QUEUED)
    assert jobs.ahead_of(second) == 1 and [j.label for j in jobs.active()] == ["first", "second"]
    release.set()
    assert jobs.wait(second.id, 10).state == DONE
    assert first.result == "FIRST" and second.result == "SECOND"
    assert spans["first"][1] <= spans["second"][0]
    assert first.folder.is_dir() and second.folder.is_dir()  # finished jobs keep their output


def test_cancel_running_job_removes_its_folder(jobs, tmp_path):
    started = threading.Event()

    def work(job):
        (job.folder / "partial.png").write_bytes(b"half")
        for step in range(1, 1000):
            started.set()
            job.report(step, 1000, {"loss": 1.0 / step}, "train")
            time.sleep(0.01)
        return "never"

    job = jobs.submit(folder_job(tmp_path, "run", work))
    assert started.wait(10)
    assert jobs.cancel(job.id)
    assert jobs.wait(job.id, 10).state == CANCELLED
    assert not job.folder.exists() and job.result is None
    assert job.snapshot()["history"][0] == {"index": 1, "phase": "train", "step": 1, "loss": 1.0}
    assert not jobs.cancel(job.id)  # already finished


def test_cancel_queued_job_never_runs_it(jobs, tmp_path):
    release, ran = threading.Event(), []

    def work(job):
        ran.append(job.label)
        release.wait(10)

    first = jobs.submit(folder_job(tmp_path, "first", work))
    second = jobs.submit(folder_job(tmp_path, "second", work))
    assert jobs.cancel(second.id)
    assert second.state == CANCELLED and not second.folder.exists()
    release.set()
    jobs.wait(first.id, 10)
    time.sleep(0.1)
    assert ran == ["first"]


def test_failed_jobs_show_one_line_and_leave_nothing(jobs, tmp_path, caplog):
    def user_mistake(job):
        (job.folder / "x").write_text("x")
        raise PhotoError("no face found in me.jpg; use a photo where one face is clearly visible")

    def bug(job):
        raise ZeroDivisionError("division by zero")

    mistake = jobs.submit(folder_job(tmp_path, "mistake", user_mistake))
    crash = jobs.submit(folder_job(tmp_path, "crash", bug))
    with caplog.at_level(logging.ERROR, logger="personamagic.ui.jobs"):
        jobs.wait(crash.id, 10)
    assert mistake.state == FAILED and mistake.error.startswith("no face found")
    assert crash.state == FAILED and crash.error == INTERNAL_ERROR and "Traceback" not in crash.error
    assert "ZeroDivisionError" in caplog.text  # the traceback is in the server log
    assert not mistake.folder.exists() and not crash.folder.exists()


# --------------------------------------------------------------------------------------------------
# the studio (library, checks, real jobs on the tiny model)


@pytest.fixture
def studio(tmp_path):
    s = Studio(Library(tmp_path / "library"), device="cpu", max_upload_mb=1)
    yield s
    s.close()


def test_names_and_windows():
    assert check_name(" astronaut-2 ") == "astronaut-2"
    for bad in ("", "../x", "a/b", ".hidden", "images", "x" * 65):
        with pytest.raises(SettingsError, match="not usable"):
            check_name(bad)
    assert parse_stage_window("auto") is None and parse_stage_window("400:800") == (400, 800)
    with pytest.raises(SettingsError, match="LO:HI"):
        parse_stage_window("800")


def test_preview_explains_bad_uploads(studio, astronaut, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(2 * 1024 * 1024)  # over the 1 MB limit of this studio
    previews, errors = studio.preview([astronaut, text, blank, huge], "face", "auto", "tiny")
    assert len(previews) == 1 and previews[0][0].size == (512, 512) and "landmark mask" in previews[0][1]
    assert errors == [
        "notes.txt is not an image PIL can read; use a JPEG, PNG, WebP or TIFF file",
        "no face found in blank.png; use a photo where one face is clearly visible",
        "huge.png is 2 MB; upload photos under 1 MB",
    ]
    assert str(tmp_path) not in " ".join(errors)  # upload paths are not shown, only names


def test_cancelled_personalization_leaves_nothing(studio, astronaut):
    from personamagic.training import TrainConfig

    config = TrainConfig(max_train_steps=500, stage_window=(400, 800))
    job = studio.submit_personalize([astronaut], "astro", config, model="tiny")
    with pytest.raises(SettingsError, match="already queued"):
        studio.submit_personalize([astronaut], "astro", config, model="tiny")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job.state == QUEUED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.state == RUNNING, job.error  # the cancel lands at the next progress report
    studio.jobs.cancel(job.id)
    assert studio.jobs.wait(job.id, JOB_TIMEOUT_S).state == CANCELLED
    root = studio.library.root
    assert studio.library.concepts() == []
    assert sorted(p.name for p in root.iterdir()) == [".staging"] and not any(studio.library.staging_dir.iterdir())


def test_personalize_generate_regenerate(studio, astronaut, monkeypatch):
    import personamagic.models.resident
    from personamagic.jobs.generate_config import GenerateConfig
    from personamagic.jobs.image_record import read_image_metadata
    from personamagic.training import TrainConfig

    loads = []  # the base model is loaded once and kept for the next jobs
    load = personamagic.models.load_base_model
    monkeypatch.setattr(personamagic.models.resident, "load_base_model", lambda *a, **k: loads.append(a) or load(*a, **k))

    config = TrainConfig(max_train_steps=2, stage_window=(400, 800), seed=3)
    trained = studio.jobs.wait(studio.submit_personalize([astronaut], "astro", config, model="tiny").id, JOB_TIMEOUT_S)
    assert trained.state == DONE, trained.error
    assert (studio.library.root / "astro" / CONCEPT_FILENAME).is_file()
    assert [c.name for c in studio.library.concepts()] == ["astro"]
    assert not any(studio.library.staging_dir.iterdir())
    with pytest.raises(SettingsError, match="already has"):
        studio.submit_personalize([astronaut], "astro", config, model="tiny")

    settings = GenerateConfig(prompts=["a photo of S*"], num_images=2, seed=5, num_inference_steps=2,
                              guidance_scale=6.5)
    made = studio.jobs.wait(studio.submit_generate(["astro"], settings).id, JOB_TIMEOUT_S)
    assert made.state == DONE, made.error
    images = made.result["images"]
    assert len(images) == 2 and all(p.parent == made.folder for p in images)
    again, meta = studio.submit_regenerate(images[1])
    again = studio.jobs.wait(again.id, JOB_TIMEOUT_S)
    assert again.state == DONE, again.error
    copy = again.result["images"][0]
    assert again.folder != made.folder and read_image_metadata(copy) == read_image_metadata(images[1])
    assert (meta["seed"], meta["guidance_scale"], meta["steps"]) == (6, 6.5, 2)
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(images[1])))  # same device: same pixels
    assert loads == [("tiny",)]
    with pytest.raises(PhotoError, match="no personamagic metadata"):
        studio.submit_regenerate(ROOT / "tests" / "data" / "astronaut.png")


def test_ui_command_is_local_and_private(tmp_path, monkeypatch):
    import gradio

    from personamagic.cli.common import Parser
    from personamagic.ui import cli as ui_cli

    parser = Parser(prog="personamagic")
    ui_cli.add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    with pytest.raises(SystemExit) as bad:
        parser.parse_args(["ui", "--port", "http"])
    assert bad.value.code == 2
    launched, closed = {}, []

    def interrupt():  # Ctrl-C as soon as the page is up
        raise KeyboardInterrupt

    def close_queue(studio):
        closed.append(studio)
        studio.jobs.close()

    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kw: launched.update(kw) or (None, "http://x", None))
    monkeypatch.setattr(ui_cli, "wait_for_interrupt", interrupt)
    monkeypatch.setattr(Studio, "close", close_queue)
    args = parser.parse_args(["ui", "--library", str(tmp_path / "lib"), "--model", "tiny"])
    assert ui_cli.run(args) == 0 and len(closed) == 1  # the queue is closed: a running job stops
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", 7860, False)
    assert launched["run_history"] is False and launched["blocked_paths"] == [str(tmp_path / "lib" / ".staging")]
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_loss_frame_is_what_the_plot_needs():
    """Every frame the loss plot gets has numeric, finite steps and values and every term at every
    step, and there is no empty frame: Gradio's plot builds its Vega spec, colour domain included,
    from the first value it gets and keeps it while it only swaps the data, so an empty first frame
    left every later line without a colour (drawn, but invisible)."""
    import math

    from gradio.components import LinePlot

    from personamagic.ui.app import MAX_PLOT_POINTS, loss_frame

    terms = {"loss", "mse", "te", "id"}
    history = [{"index": 1, "phase": "warm-up", "step": 1, "loss": 1.5, "mse": 1.0, "te": -0.2, "id": 0.3}]
    history += [{"index": i + 1, "phase": "train", "step": i, "loss": 1.0 / i, "mse": 0.9 / i, "te": -0.1, "id": 0.1}
                for i in range(1, 1000)]
    assert loss_frame([]) is None  # the page shows an empty plot, not one whose spec has no terms
    for entries in (history[:1], history[:3], history):
        frame = loss_frame(entries)
        assert list(frame.columns) == ["step", "value", "term"]
        assert str(frame["step"].dtype) == "int64" and str(frame["value"].dtype) == "float64"
        assert all(math.isfinite(v) for v in frame["value"]) and frame["step"].is_monotonic_increasing
        assert set(frame["term"]) == terms
        assert (frame.groupby("step")["term"].nunique() == len(terms)).all()  # no step lacks a term
        assert frame["step"].nunique() <= MAX_PLOT_POINTS
        sent = LinePlot(x="step", y="value", color="term").postprocess(frame)
        assert sent.datatypes == {"step": "quantitative", "value": "quantitative", "term": "nominal"}
        assert all(isinstance(row[0], int) and isinstance(row[1], float) for row in sent.data)
    assert loss_frame(history)["step"].iloc[0] == 1  # thinned from the first step


# --------------------------------------------------------------------------------------------------
# the page, in headless Chromium

# The loss plot's line marks as Vega draws them in SVG: one <path> per term in a `g.mark-line`
# group of the plot's layer (the legend and the hover points are mark-symbol groups). A line counts
# only if it has at least two points and a stroke colour: without one it is drawn but invisible.
PLOT_LINES_JS = """() => [...document.querySelectorAll('#loss-plot svg g.mark-line.role-mark path')].map(
    p => ({d: p.getAttribute('d') || '', stroke: p.getAttribute('stroke')}))"""
# The legend's labels that lie inside the plot's box (the box hides what sticks out of it).
PLOT_LEGEND_JS = """() => { const box = document.querySelector('#loss-plot').getBoundingClientRect();
    return [...document.querySelectorAll('#loss-plot svg g.role-legend-label text')].filter(t => {
        const r = t.getBoundingClientRect(); return r.top >= box.top && r.bottom <= box.bottom; }
    ).map(t => t.textContent); }"""


def visible_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if "L" in line["d"] and line["stroke"] not in (None, "", "none", "transparent")]


def wait_for_plot_lines(page, count: int, timeout_s: float = 20) -> list[dict]:
    """Wait until the loss plot shows `count` visible lines; fail with what it does show."""
    try:
        page.wait_for_function(
            f"() => ({PLOT_LINES_JS})().filter(l => l.d.includes('L') && l.stroke && "
            f"!['none', 'transparent'].includes(l.stroke)).length === {count}",
            timeout=timeout_s * 1000,
        )
    except Exception as err:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-failure.png"), full_page=True)
        lines = page.evaluate(PLOT_LINES_JS)
        raise AssertionError(
            f"the loss plot does not show {count} lines ({type(err).__name__}): its line marks are "
            f"{[(line['d'][:30], line['stroke']) for line in lines]}"
        ) from None
    return visible_lines(page.evaluate(PLOT_LINES_JS))


def history_terms(studio, label: str) -> set[str]:
    job = next(j for j in studio.jobs._jobs.values() if j.kind == "personalize" and j.label == label)
    return {k for entry in job.snapshot()["history"] for k in entry if k not in ("index", "phase", "step")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("PERSONAMAGIC_SKIP_BROWSER") == "1":
        pytest.skip("PERSONAMAGIC_SKIP_BROWSER=1")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium), "
            "set PERSONAMAGIC_CHROMIUM to another binary, or PERSONAMAGIC_SKIP_BROWSER=1 to skip this test"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from personamagic.ui.app import build_app, launch_kwargs

    studio = Studio(Library(tmp_path_factory.mktemp("ui") / "library"), device="cpu", max_upload_mb=1)
    demo = build_app(studio, default_model="tiny")
    port = free_port()
    demo.launch(**launch_kwargs(studio, port=port), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", studio
    demo.close()
    studio.close()


def set_value(page, selector: str, text: str) -> None:
    """Type into a field until it holds `text` (a field in a just-opened accordion can be re-rendered
    right after it is first filled, losing the value)."""
    for _ in range(20):
        page.fill(selector, text)
        page.press(selector, "Tab")
        page.wait_for_timeout(100)
        if page.input_value(selector) == text:
            return
    raise AssertionError(f"{selector} does not keep the value {text!r}")


def wait_for(page, selector: str, studio) -> None:
    """wait_for_selector, failing with what the page and the job queue show."""
    try:
        page.wait_for_selector(selector)
    except Exception as err:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-failure.png"), full_page=True)
        statuses = {s: page.inner_text(s) for s in ("#photo-status", "#train-status", "#gen-status")}
        jobs = [(j.kind, j.label, j.state, j.phase, j.step, j.total, j.error) for j in studio.jobs._jobs.values()]
        raise AssertionError(f"{selector} did not appear ({type(err).__name__}); page: {statuses}; jobs: {jobs}")


def test_page_end_to_end(browser, server, tmp_path):
    url, studio = server
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(JOB_TIMEOUT_S * 1000)
    outside = []  # every request that leaves this server: telemetry, fonts, CDNs...
    context.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page, other = context.new_page(), context.new_page()
    page.goto(url)
    other.goto(url)

    # 1. upload the photo: the face and the mask are shown
    page.set_input_files("#photos input[type=file]", str(ROOT / "tests" / "data" / "astronaut.png"))
    wait_for(page, "#photo-status .pm-done", studio)
    assert page.locator("#face-preview img").count() >= 1

    # 2. personalize (3 steps after a 1-step warm-up and the automatic stage partition)
    set_value(page, "#concept-name textarea", "astronaut")
    set_value(page, "#train-steps input", "3")
    set_value(page, "#warmup-steps input", "1")
    page.click("#train")
    wait_for(page, "#train-status .pm-queued, #train-status .pm-running, #train-status .pm-done", studio)

    # meanwhile, another tab uploads bad files: clear messages there, no effect on this tab
    for name, content in (("notes.txt", b"not a photo"), ("big.png", b"\0" * (2 * 1024 * 1024))):
        path = tmp_path / name
        path.write_bytes(content)
    other.set_input_files("#photos input[type=file]", str(tmp_path / "notes.txt"))
    wait_for(other, "#photo-status .pm-error", studio)
    assert "notes.txt is not an image" in other.inner_text("#photo-status")
    other.set_input_files("#photos input[type=file]", str(tmp_path / "big.png"))  # over this server's 1 MB
    other.wait_for_selector(".toast-body")
    assert 'exceed the maximum allowed size of 1.0 Mb: "big.png"' in other.inner_text(".toast-body")
    assert "Traceback" not in other.content()

    wait_for(page, "#train-status .pm-done, #train-status .pm-error", studio)
    assert "saved in the library" in page.inner_text("#train-status"), page.inner_text("#train-status")
    assert "astronaut" in page.inner_text("#concepts")
    assert (studio.library.root / "astronaut" / CONCEPT_FILENAME).is_file()
    wait_for(page, "#concept-pictures img", studio)
    assert "stage partition" in page.inner_text("#concept-pictures")

    # the loss plot shows one visible line per loss term, each over every reported step (4: a
    # warm-up step and 3 training steps), and its legend, in full view, names them
    terms = history_terms(studio, "astronaut")
    assert {"loss", "mse"} <= terms
    lines = wait_for_plot_lines(page, len(terms))
    assert all(line["d"].count("L") == 3 for line in lines), lines
    assert len({line["stroke"] for line in lines}) == len(terms)  # a colour each
    assert set(page.evaluate(PLOT_LEGEND_JS)) == terms

    # 3. generate 2 images with the new concept (selected for us when training finished)
    set_value(page, "#num-images input", "2")
    set_value(page, "#gen-steps input", "3")
    page.click("#generate")
    wait_for(page, "#gen-status .pm-done, #gen-status .pm-error", studio)
    assert "2 image(s) made" in page.inner_text("#gen-status"), page.inner_text("#gen-status")
    gallery = page.locator("#gallery .thumbnail-item img, #gallery .grid-wrap img")
    assert gallery.count() == 2

    # downloads are the original PNG files, metadata included
    links = page.locator("#downloads a[href]")
    assert links.count() == 2
    from personamagic.jobs.image_record import METADATA_KEY

    body = context.request.get(links.first.get_attribute("href")).body()
    assert METADATA_KEY in Image.open(io.BytesIO(body)).text
    made = {p.read_bytes() for p in studio.library.images_dir.glob("*/*-seed*.png")}
    assert body in made
    shown = context.request.get(gallery.first.get_attribute("src")).body()
    assert shown in made  # the gallery serves the PNG as written, not a re-encoded copy

    # the other tab saw none of it
    assert other.locator("#gallery img").count() == 0
    assert other.inner_text("#train-status").strip() == ""

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
    if os.environ.get("PERSONAMAGIC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "ui.png", SCREENSHOT_DOC)

    # regenerate the second image from its metadata: same settings, a new job folder, a third image
    gallery.nth(1).click()
    page.keyboard.press("Escape")  # close the enlarged preview the click opened
    page.click("#regenerate")
    wait_for(page, '#gen-status .pm-done:has-text("1 image(s) made"), #gen-status .pm-error', studio)
    assert "1 image(s) made" in page.inner_text("#gen-status"), page.inner_text("#gen-status")
    assert page.input_value("#gen-seed input") == "1"  # the form shows the settings it reused
    assert page.locator("#downloads a[href]").count() == 3
    runs = sorted(studio.library.images_dir.iterdir())
    assert [len(list(run.glob("*-seed*.png"))) for run in runs] == [2, 1]

    # a long training, cancelled from the page: nothing of it stays in the library
    set_value(page, "#concept-name textarea", "cancelled")
    set_value(page, "#train-steps input", "1000")
    set_value(page, "#stage-window textarea", "400:800")
    page.click("#train")
    wait_for(page, "#train-status .pm-running", studio)  # set by a poll: the click's reply cleared the plot
    running = next(j for j in studio.jobs._jobs.values() if j.label == "cancelled")
    deadline = time.monotonic() + JOB_TIMEOUT_S  # loading the model can take a while on a busy machine
    while not running.snapshot()["history"] and not running.finished and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.snapshot()["history"], (running.state, running.error)
    lines = wait_for_plot_lines(page, len(terms))  # the new run's curves, drawn while it trains
    assert len({line["stroke"] for line in lines}) == len(terms)
    assert set(page.evaluate(PLOT_LEGEND_JS)) == terms
    assert not running.finished, running.state
    page.click("#cancel-train")
    wait_for(page, "#train-status .pm-cancelled", studio)
    assert "nothing was saved" in page.inner_text("#train-status")
    assert not (studio.library.root / "cancelled").exists() and not any(studio.library.staging_dir.iterdir())

    assert outside == []
    context.close()
