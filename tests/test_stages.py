"""Stage regulation (SPEC §2): IoU, partition of hand-made curves, attention capture."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from personamagic.method.attention import PersonaMagicAttnProcessor, attention_processors, is_cross_attention
from personamagic.method.stages import (
    PartitionError,
    Stage,
    StageWindow,
    attention_iou,
    average_maps,
    capturing_attention,
    partition_stages,
)

GRID10 = list(range(900, -1, -100))  # 900, 800, ..., 0
DDIM50 = list(range(981, 0, -20))  # SD's 50-step DDIM grid


# -- attention_iou -----------------------------------------------------------------------------------


def test_iou_of_hand_made_maps():
    attention = np.zeros((4, 4))
    attention[:2, :2] = 1.0
    mask = np.zeros((4, 4))
    mask[0, :] = 1.0
    assert attention_iou(attention, mask) == pytest.approx(2 / 6)
    assert attention_iou(attention, attention) == pytest.approx(1.0)
    assert attention_iou(attention, 1 - attention) == 0.0


def test_iou_normalises_the_map_and_resizes_the_mask():
    attention = np.full((4, 4), 0.2)
    attention[2:, 2:] = 0.3  # raw probabilities: only the min-max normalised map crosses 0.5
    mask = np.zeros((16, 16))
    mask[8:, 8:] = 1  # the same quadrant at 4x the resolution
    assert attention_iou(attention, mask) == pytest.approx(1.0)
    assert attention_iou(attention, mask, threshold=1.0) == 0.0  # strict: nothing exceeds the maximum


def test_iou_degenerate_inputs():
    assert attention_iou(np.full((4, 4), 0.3), np.ones((4, 4))) == 0.0  # flat map selects nothing
    with pytest.raises(PartitionError, match="empty"):
        attention_iou(np.eye(4), np.zeros((4, 4)))
    broken = np.eye(4)
    broken[0, 1] = np.nan
    with pytest.raises(PartitionError, match="NaN"):
        attention_iou(broken, np.ones((4, 4)))


# -- the stage table ---------------------------------------------------------------------------------


def test_a_window_gives_each_timestep_its_stage_and_its_source_of_s_star():
    window = StageWindow(400, 800, 1000)
    t = (999, 800, 799, 400, 399, 0)
    assert [window.stage(x) for x in t] == [Stage.STATIC_1] * 2 + [Stage.DYNAMIC] * 2 + [Stage.STATIC_2] * 2
    assert [window.mapper_timestep(x) for x in t] == [None, None, 799, 400, 400, 400]  # None: the word
    assert [window.span(stage) for stage in Stage] == [(800, 1000), (400, 800), (0, 400)]
    whole = StageWindow(0, 1000, 1000)  # no static stage
    assert whole.span(Stage.STATIC_1) == (1000, 1000) and whole.span(Stage.STATIC_2) == (0, 0)


def test_the_stage_names_are_those_plots_and_exported_files_show():
    import json

    assert [str(stage) for stage in Stage] == ["static 1", "dynamic", "static 2"]
    assert f"{Stage.STATIC_2}" == "static 2" and json.dumps([Stage.STATIC_1]) == '["static 1"]'


# -- partition_stages on hand-made curves ------------------------------------------------------------

MONOTONE = [(900 - t) / 1000 for t in GRID10]  # IoU rises as t falls: r = 0, .11, ..., 1


def test_monotone_curve():
    assert partition_stages(GRID10, MONOTONE, min_dynamic_fraction=0.05).grid_window == (200, 300)
    # The default minimum width (0.2 T = 200) widens the 100-wide stage around its centre.
    assert partition_stages(GRID10, MONOTONE).grid_window == (150, 350)


def test_order_of_timesteps_does_not_matter():
    shuffled = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    t = [GRID10[i] for i in shuffled]
    iou = [MONOTONE[i] for i in shuffled]
    assert partition_stages(t, iou, min_dynamic_fraction=0.05).grid_window == (200, 300)


def test_widening_keeps_the_stage_flags_consistent():
    # r rises sharply at t = 500: the raw dynamic stage is one grid step; widened, static 1 remains above.
    curve = [0.1] * 4 + [0.75] + [1.0] * 5
    result = partition_stages(GRID10, curve, 0.7, 0.8)
    assert result.widened and result.has_static1 and result.has_static2
    assert (result.t_lo, result.t_hi) == (400, 600)
    top = partition_stages(GRID10, [1.0] * 9 + [0.5], 0.7, 0.8)  # at once above lambda2: nothing dynamic at the top
    assert top.widened and not top.has_static1 and (top.t_lo, top.t_hi) == (700, 900)


def test_lambda2_one_gives_no_static_2_and_small_lambda1_no_static_1():
    assert partition_stages(GRID10, MONOTONE, 0.7, 1.0).grid_window == (0, 300)
    result = partition_stages(GRID10, MONOTONE, 0.05, 0.8)
    assert not result.has_static1 and result.has_static2
    assert (result.t_lo, result.t_hi) == (200, 900)


def test_noisy_curve_lands_within_a_grid_step_of_the_clean_one():
    rng = np.random.default_rng(0)
    noisy = np.clip(np.array(MONOTONE) + rng.normal(0, 0.03, len(MONOTONE)), 0, None)
    t_lo, t_hi = partition_stages(GRID10, noisy, min_dynamic_fraction=0.05).grid_window
    assert abs(t_lo - 200) <= 100 and abs(t_hi - 300) <= 100 and t_lo < t_hi


def test_step_shaped_curve():
    step = [0.2] * 5 + [1.0] * 5  # t >= 500: 0.2, t < 500: 1.0; smoothing puts t=400 at 0.73
    assert partition_stages(GRID10, step, min_dynamic_fraction=0.05).grid_window == (400, 500)


@pytest.mark.parametrize("curve", [[0.4] * 10, [0.0] * 10])
def test_flat_curve_gives_the_whole_range_with_a_warning(curve, caplog):
    result = partition_stages(GRID10, curve)
    assert result.flat and (result.t_lo, result.t_hi) == (0, 900)
    assert "flat" in caplog.text


def test_nan_curve_and_bad_arguments_raise():
    with pytest.raises(PartitionError, match="NaN"):
        partition_stages(GRID10, [0.1] * 9 + [float("nan")]).grid_window
    with pytest.raises(PartitionError, match="equal length"):
        partition_stages(GRID10, [0.1] * 9).grid_window
    with pytest.raises(PartitionError, match="lambda1"):
        partition_stages(GRID10, MONOTONE, 0.9, 0.8).grid_window


def test_returns_ints_inside_the_probed_range():
    curve = 1 / (1 + np.exp((np.array(DDIM50) - 500) / 80))
    t_lo, t_hi = partition_stages(DDIM50, curve).grid_window
    assert isinstance(t_lo, int) and isinstance(t_hi, int)
    assert min(DDIM50) <= t_lo <= t_hi <= max(DDIM50)


PAPER_ROWS = [(0.5, 1.0), (0.6, 1.0), (0.7, 1.0), (0.8, 1.0), (0.7, 0.9), (0.7, 0.8)]


def test_paper_ablation_rows_give_nested_windows():
    # A gentle rise of the relative IoU (0.56 at t = 981 to 1.0 at t = 1), as in the paper's Fig. 2.
    curve = [1 - 0.45 * t / 1000 for t in DDIM50]
    windows = {row: partition_stages(DDIM50, curve, *row).grid_window for row in PAPER_ROWS}
    assert windows[(0.5, 1.0)] == (1, 981)  # the paper's "unpartitioned" setting

    def inside(a, b):
        return b[0] <= a[0] and a[1] <= b[1]

    for small, large in [((0.6, 1.0), (0.5, 1.0)), ((0.7, 1.0), (0.6, 1.0)), ((0.8, 1.0), (0.7, 1.0)),
                         ((0.7, 0.9), (0.7, 1.0)), ((0.7, 0.8), (0.7, 0.9))]:
        assert inside(windows[small], windows[large]), (small, windows[small], large, windows[large])
    assert len(set(windows.values())) == len(PAPER_ROWS)  # each row really changes the window


# -- capture ------------------------------------------------------------------------------------------


def test_capture_records_probabilities_by_layer_name_and_keeps_outputs(tiny_base):
    unet = tiny_base.unet
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, tiny_base.hidden_size, generator=g)
    t = torch.tensor([100, 800])
    with attention_processors(unet):
        reference = unet(latents, t, hidden).sample
        with capturing_attention(unet, torch.arange(77)) as store:
            captured = unet(latents, t, hidden).sample
        assert all(isinstance(p, PersonaMagicAttnProcessor) for p in unet.attn_processors.values())
    assert torch.allclose(captured, reference, atol=1e-5)
    cross = {name for name in unet.attn_processors if is_cross_attention(name)}
    assert set(store) == cross
    for probabilities in store.values():
        assert torch.allclose(probabilities.sum(-1), torch.ones(()), atol=1e-5)  # all columns: rows sum to 1
    maps = average_maps(store, 16)
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(2))


def test_processors_restored_after_an_error_inside_the_capture(tiny_base):
    unet = tiny_base.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="inside"):
        with capturing_attention(unet, torch.tensor([4])):
            raise RuntimeError("error inside the capture")
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_trainer_finds_a_window_and_records_the_curve(tiny_base, astronaut):
    from personamagic.faces import prepare_photo
    from personamagic.faces.masks import landmark_mask
    from personamagic.jobs.personalize import pil_to_tensor
    from personamagic.training import Trainer, TrainConfig, prepare_training_data

    photo = prepare_photo(astronaut, tiny_base.resolution)
    data = prepare_training_data(
        tiny_base.vae,
        pil_to_tensor(photo.image)[None],
        torch.from_numpy(landmark_mask(photo.face, tiny_base.resolution))[None, None],
        torch.randn(1, 16),
    )
    config = TrainConfig(use_id_loss=False, partition_warmup_steps=2, partition_timesteps=10, max_train_steps=1)
    with Trainer(tiny_base, data, config) as trainer:
        initial = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
        partition = trainer.find_stage_window()
        assert len(partition.timesteps) == 10 and all(0 <= v <= 1 for v in partition.iou)
        t_lo, t_hi = trainer.stage_window
        assert 0 <= t_lo < t_hi <= 1000 and trainer.stages["window"] == [t_lo, t_hi]
        # default: the mapper continues from the warm-up
        assert not all(torch.equal(initial[k], v) for k, v in trainer.mapper.state_dict().items())
        trainer.train()
        concept = trainer.concept("tiny")
    assert concept.stage_window == (t_lo, t_hi) and concept.stages["iou"] == partition.iou
    assert concept.stages["restarted"] is False
    with Trainer(tiny_base, data, replace(config, restart_after_partition=True)) as trainer:
        trainer.find_stage_window()
        assert all(torch.equal(initial[k], v) for k, v in trainer.mapper.state_dict().items())


# -- what the user is shown of a partition -------------------------------------------------------------


def _shown_stages(curve, lambda1=0.7, lambda2=0.8):
    """The stages dict a concept stores for this curve (as the trainer builds it)."""
    from personamagic.method.stages import StageWindow

    partition = partition_stages(GRID10, curve, lambda1, lambda2)
    return {"method": "auto", **partition.to_dict(), "window": StageWindow.from_partition(partition, 1000, 0.2).to_list()}


def _legend_and_label(stages, supercategory):
    from personamagic.jobs.plots import stages_plot

    (ax,) = stages_plot(stages, 1000, supercategory).axes
    return ax.get_legend_handles_labels()[1], ax.get_ylabel()


def test_the_stage_plot_names_the_supercategory_and_draws_no_empty_stage():
    # small lambda1: the dynamic stage reaches T, so there is no static-1 band to draw
    top = _shown_stages(MONOTONE, lambda1=0.05)
    assert top["window"][1] == 1000
    labels, ylabel = _legend_and_label(top, "painting")
    assert not any(label.startswith("static 1") for label in labels)
    assert "static 2 (frozen)" in labels and "painting" in ylabel and "face" not in ylabel
    # a window strictly inside the schedule shows all three stages, static 1 as the supercategory word
    labels, _ = _legend_and_label(_shown_stages(MONOTONE), "face")
    assert {"static 1 ('face')", "dynamic (mapper, trained)", "static 2 (frozen)"} <= set(labels)


def test_the_partition_line_states_the_minimum_width_it_used():
    from personamagic.jobs.personalize import describe_partition

    widened = _shown_stages([0.1] * 4 + [0.75] + [1.0] * 5)
    assert widened["widened"]
    assert "35% of the schedule" in describe_partition(widened, 0.35)
    assert "widened" not in describe_partition(_shown_stages(MONOTONE, lambda1=0.05) | {"widened": False}, 0.2)
