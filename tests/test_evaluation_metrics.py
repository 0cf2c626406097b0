"""Evaluation metrics: T-Sim with a tiny random CLIP, I-Pre with real offline face models, the no-face
conventions, and `evaluate images` end to end."""

import json
import math

import numpy as np
import pytest
from _concepts import random_concept
from PIL import Image, ImageOps

from personamagic.cli import build_parser
from personamagic.evaluation import cli as evaluation_cli
from personamagic.evaluation.identity_preservation import IdentityPreservation, load_face_embedder
from personamagic.evaluation.statistics import identity_scores, mean_std, summarize
from personamagic.evaluation.text_similarity import CLIP_S_WEIGHT, TextSimilarity, replace_placeholders
from personamagic.models.tiny import build_tiny_clip
from personamagic.faces import load_photo
from personamagic.jobs.generate_config import GenerateConfig
from personamagic.jobs.image_record import image_metadata, png_info


@pytest.fixture(scope="module")
def tiny_clip():
    model, processor = build_tiny_clip()
    return TextSimilarity(model, processor, "tiny")


@pytest.fixture(scope="module")
def sface():
    return IdentityPreservation(load_face_embedder("sface"))


def gradient_image(size=256) -> Image.Image:
    """A plain horizontal gray ramp: no face anywhere."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.repeat(np.tile(ramp[None, :, None], (size, 1, 1)), 3, axis=2))


# --------------------------------------------------------------------------------------------------
# T-Sim


def test_placeholder_is_replaced_before_tokenising(tiny_clip):
    seen = []

    class RecordingProcessor:
        def __call__(self, **kwargs):
            seen.append(kwargs["text"])
            return tiny_clip.processor(**kwargs)

    spy = TextSimilarity(tiny_clip.model, RecordingProcessor(), "tiny")
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    [score] = spy.score([image], ["a photo of S* as a chef"], supercategory="face")
    assert seen == [["a photo of face as a chef"]]
    assert score.text == "a photo of face as a chef"
    [plain] = tiny_clip.score([image], ["a photo of face as a chef"], placeholders=())
    [literal] = tiny_clip.score([image], ["a photo of S* as a chef"], placeholders=())
    assert score.t_sim == pytest.approx(plain.t_sim, abs=1e-6)
    assert score.t_sim != pytest.approx(literal.t_sim, abs=1e-6)  # "S*" is not "face" to CLIP


def test_replace_placeholders_longest_first():
    assert replace_placeholders("S** and S*", ["S*", "S**"], "face") == "face and face"
    assert replace_placeholders("a photo of <me>", ["<me>"], "person") == "a photo of person"
    assert replace_placeholders("S*2 and S*", ["S*"], "face", {"S*2": "painting"}) == "painting and face"


def test_t_sim_is_finite_on_three_scales(tiny_clip):
    images = [Image.new("RGB", (48, 80), c) for c in ((0, 0, 0), (255, 255, 255), (10, 200, 30))]
    scores = tiny_clip.score(images, ["S* in the jungle", "An oil painting of S*", "A vintage photograph of S*"],
                             batch_size=2)
    assert len(scores) == 3
    for score in scores:
        assert math.isfinite(score.t_sim) and -1.0 <= score.t_sim <= 1.0
        assert score.t_sim_100 == pytest.approx(100 * score.t_sim)
        assert score.clip_s == pytest.approx(CLIP_S_WEIGHT * max(score.t_sim, 0.0))
    # The same image and prompt in another batch give the same score.
    [again] = tiny_clip.score(images[2:], ["A vintage photograph of S*"])
    assert again.t_sim == pytest.approx(scores[2].t_sim, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# I-Pre with real weights (YuNet + SFace, offline)


def test_mirror_image_scores_far_above_another_person(sface, astronaut, grace_hopper):
    reference = sface.reference([astronaut])
    photo = load_photo(astronaut)
    mirror = sface.score(ImageOps.mirror(photo), reference)
    other = sface.score(load_photo(grace_hopper), reference)
    assert mirror.face_found and other.face_found
    assert mirror.i_pre > 0.8
    assert other.i_pre < 0.4
    assert mirror.i_pre - other.i_pre > 0.5


def test_sface_features_are_opencvs_own(astronaut):
    import cv2

    from personamagic.evaluation.identity_preservation import SFaceEmbedder, yunet_row
    from personamagic.faces import default_face_detector

    embedder = SFaceEmbedder()
    photo = load_photo(astronaut)
    face = default_face_detector().detect(photo)[0]
    ours = embedder.embed(photo, face)
    if hasattr(cv2.dnn, "ENGINE_CLASSIC"):
        pytest.skip("OpenCV 5's FaceRecognizerSF.feature cannot run this model; nothing to compare with")
    bgr = np.ascontiguousarray(np.asarray(photo)[:, :, ::-1])
    recognizer = embedder._recognizer
    reference = recognizer.feature(recognizer.alignCrop(bgr, yunet_row(face))).reshape(-1)
    np.testing.assert_array_equal(ours, reference)


def test_no_face_counts_under_three_conventions(sface, astronaut):
    reference = sface.reference([astronaut])
    no_face = sface.score(gradient_image(), reference)
    assert not no_face.face_found and no_face.i_pre is None and no_face.num_faces == 0
    found = sface.score(ImageOps.mirror(load_photo(astronaut)), reference)
    records = [
        {"t_sim": 0.3, "t_sim_100": 30.0, "clip_s": 0.75, "face_found": found.face_found, "i_pre": found.i_pre},
        {"t_sim": 0.2, "t_sim_100": 20.0, "clip_s": 0.5, "face_found": no_face.face_found, "i_pre": no_face.i_pre},
    ]
    summary = summarize(records)
    assert summary["face_detection_rate"] == 0.5 and summary["faces_found"] == 1
    assert summary["i_pre"]["paper"]["mean"] == pytest.approx((found.i_pre - 1.0) / 2)
    assert summary["i_pre"]["zero"]["mean"] == pytest.approx(found.i_pre / 2)
    assert summary["i_pre"]["excluded"] == {"mean": pytest.approx(found.i_pre), "std": 0.0, "n": 1}
    assert summarize(records[:1])["face_detection_rate"] == 1.0  # the face-less image lowered it


def test_reference_without_a_face_is_a_user_error(sface, tmp_path):
    from personamagic.errors import PhotoError

    path = tmp_path / "gradient.png"
    gradient_image().save(path)
    with pytest.raises(PhotoError, match="no face found in the reference photo"):
        sface.reference([path])


def test_arcface_family_backend_runs_on_detected_faces(astronaut, grace_hopper):
    metric = IdentityPreservation(load_face_embedder("tiny"))  # random IResNet: interface only
    reference = metric.reference([astronaut])
    assert reference.shape == (1, 32) and np.all(np.isfinite(reference))
    same = metric.score(load_photo(astronaut), reference)
    assert same.face_found and same.i_pre == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(metric.score(load_photo(grace_hopper), reference).i_pre)


def test_dlib_backend_when_installed(astronaut, grace_hopper):
    pytest.importorskip("dlib")
    metric = IdentityPreservation(load_face_embedder("dlib"))
    reference = metric.reference([astronaut])
    mirror = metric.score(ImageOps.mirror(load_photo(astronaut)), reference).i_pre
    other = metric.score(load_photo(grace_hopper), reference).i_pre
    assert mirror > other  # dlib's cosines sit high for everyone; only the order is meaningful


def test_statistics_by_hand():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    records = [{"face_found": True, "i_pre": 0.5}, {"face_found": False, "i_pre": None}]
    assert identity_scores(records, "paper") == [0.5, -1.0]
    assert identity_scores(records, "zero") == [0.5, 0.0]
    assert identity_scores(records, "excluded") == [0.5]
    with pytest.raises(ValueError, match="unknown no-face convention"):
        identity_scores(records, "median")


# --------------------------------------------------------------------------------------------------
# `evaluate images`


def _save_generated(path, image, prompt, seed=0, concepts=None):
    """A PNG with `generate`'s metadata; `concepts`: (placeholder, supercategory) pairs, default <me>/face."""
    from personamagic.models import build_tiny_components

    base = build_tiny_components()
    concepts = [random_concept(base, placeholder=p, supercategory=s) for p, s in concepts or [("<me>", "face")]]
    config = GenerateConfig(prompts=[prompt], seed=seed, num_images=1)
    meta = image_metadata(prompt, seed, config, concepts, "tiny", image.size)
    image.save(path, format="PNG", pnginfo=png_info(meta))


def test_evaluate_images_reads_prompts_from_metadata(tmp_path, astronaut, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    mirror = ImageOps.mirror(load_photo(astronaut))
    _save_generated(folder / "000-mirror.png", mirror, "a photo of <me> as an astronaut")
    _save_generated(folder / "001-ramp.png", gradient_image(), "<me> in the jungle", seed=1)
    gradient_image().save(folder / "grid.png")  # generate's contact sheet: not scored
    code = evaluation_cli.main(["images", str(folder), "--reference", str(astronaut), "--clip-model", "tiny",
                                "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    records = {r["path"].rsplit("/", 1)[-1]: r for r in scores["images"]}
    assert sorted(records) == ["000-mirror.png", "001-ramp.png"]
    mirror, ramp = records["000-mirror.png"], records["001-ramp.png"]
    assert mirror["text"] == "a photo of face as an astronaut" and ramp["text"] == "face in the jungle"
    assert mirror["face_found"] and mirror["i_pre"] > 0.8
    assert not ramp["face_found"] and ramp["i_pre"] is None
    summary = scores["summary"]
    assert summary["images"] == 2 and summary["face_detection_rate"] == 0.5
    assert summary["clip_model"] == "tiny" and summary["face_model"] == "sface"
    assert summary["i_pre"]["paper"]["mean"] == pytest.approx((mirror["i_pre"] - 1) / 2)
    assert "faces found in 1 of 2 images" in out and "no face = -1" in out


def test_each_concept_gets_its_own_supercategory_from_the_metadata(tmp_path, astronaut, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _save_generated(folder / "000-x.png", load_photo(astronaut), "<me> in the style of <style>",
                    concepts=[("<me>", "face"), ("<style>", "painting")])
    _save_generated(folder / "001-y.png", gradient_image(), "a <style> of a S* cat", concepts=[("<style>", "painting")])
    code = evaluation_cli.main(["images", str(folder), "--reference", str(astronaut), "--clip-model", "tiny",
                                "--supercategory", "person", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "out" / "scores.json").read_text())["images"]
    # S* is no concept of the second image: it gets --supercategory
    assert [r["text"] for r in records] == ["face in the style of painting", "a painting of a person cat"]


def test_evaluate_images_mistakes_are_one_line_errors(tmp_path, astronaut, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    load_photo(astronaut).save(folder / "plain.png")  # no personamagic metadata
    code = evaluation_cli.main(["images", str(folder), "--reference", str(astronaut), "--clip-model", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--prompt" in err and err.count("\n") == 1
    code = evaluation_cli.main(["images", str(tmp_path / "missing"), "--reference", str(astronaut)])
    assert code == 2 and "is not a folder" in capsys.readouterr().err
    code = evaluation_cli.main(["images", str(folder)])  # no --reference
    assert code == 2 and "--reference" in capsys.readouterr().err
    code = evaluation_cli.main(["images", str(folder), "-r", str(tmp_path / "me.jpg"), "-p", "S*"])
    assert code == 2 and "me.jpg does not exist" in capsys.readouterr().err
    code = evaluation_cli.main(["images", str(folder), "-r", str(astronaut), "-p", "S*", "--clip-model",
                                str(tmp_path / "no-clip")])
    assert code == 2 and "could not load the CLIP model" in capsys.readouterr().err


def test_evaluate_registers_on_the_project_parser():
    parser = build_parser()  # `evaluate` is wired into the project's parser
    args = parser.parse_args(["evaluate", "run", "tiny-demo", "--shard", "1/2", "--dry-run"])
    assert (args.command, args.evaluate_command, args.config, args.shard, args.dry_run) == (
        "evaluate", "run", "tiny-demo", "1/2", True)
    args = parser.parse_args(["evaluate", "images", "out", "-r", "me.jpg", "-r", "me2.jpg"])
    assert args.reference == ["me.jpg", "me2.jpg"] and args.clip_model == "openai/clip-vit-base-patch32"
