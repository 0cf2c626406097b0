"""Pictures of the stage partition: the IoU curve with its stages, and S*'s attention over the photo."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..method.stages import Stage, StageWindow

STAGE_COLORS = {Stage.STATIC_1: "#9ecae1", Stage.DYNAMIC: "#fdd49e", Stage.STATIC_2: "#c7e9c0"}


def figure_to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def stages_figure(stages: dict, num_train_timesteps: int = 1000, supercategory: str = "face") -> Image.Image:
    """The picture of `stages_plot`."""
    return figure_to_image(stages_plot(stages, num_train_timesteps, supercategory))


def stages_plot(stages: dict, num_train_timesteps: int = 1000, supercategory: str = "face"):
    """IoU (raw and relative, smoothed) against t, the λ lines, and the stages the window has shaded
    (a static stage of zero width is neither drawn nor named in the legend); a matplotlib Figure."""
    from matplotlib.figure import Figure  # the Figure API renders with Agg, no global backend switch

    t = np.asarray(stages["timesteps"])
    window = StageWindow(*stages["window"], num_train_timesteps)
    figure = Figure(figsize=(7.5, 3.6))
    ax = figure.add_subplot(1, 1, 1)
    labels = {Stage.STATIC_1: f"{Stage.STATIC_1} ('{supercategory}')",
              Stage.DYNAMIC: f"{Stage.DYNAMIC} (mapper, trained)",
              Stage.STATIC_2: f"{Stage.STATIC_2} (frozen)"}
    for stage in Stage:
        start, end = window.span(stage)
        if end > start:
            ax.axvspan(start, end, color=STAGE_COLORS[stage], alpha=0.6, label=labels[stage])
    ax.plot(t, stages["iou"], "o-", color="#636363", markersize=3, label="IoU")
    ax.plot(t, stages["relative_iou"], "-", color="#d94801", linewidth=2, label="relative IoU (smoothed)")
    ax.axhline(stages["lambda1"], color="#08519c", linestyle="--", linewidth=1, label=f"λ1 = {stages['lambda1']}")
    ax.axhline(stages["lambda2"], color="#54278f", linestyle=":", linewidth=1.5, label=f"λ2 = {stages['lambda2']}")
    ax.set_xlim(num_train_timesteps, 0)  # the reverse process runs from T down to 0
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("timestep t (denoising runs left to right, from T to 0)")
    ax.set_ylabel(f"IoU of S* attention with the {supercategory} mask")
    ax.set_title(f"stage partition: dynamic stage {window.lo} ≤ t < {window.hi}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def attention_figure(photo: Image.Image, maps, stages: dict, count: int = 6,
                     num_train_timesteps: int = 1000) -> Image.Image:
    """S*'s attention map over the photo at `count` timesteps spread over the grid (paper Fig. 2)."""
    from matplotlib.figure import Figure  # the Figure API renders with Agg, no global backend switch

    maps = np.asarray(maps, dtype=np.float32)
    t = stages["timesteps"]
    window = StageWindow(*stages["window"], num_train_timesteps)
    picks = np.linspace(0, len(t) - 1, num=min(count, len(t))).round().astype(int)
    figure = Figure(figsize=(2.0 * len(picks), 2.4))
    photo = photo.convert("RGB")
    for column, index in enumerate(picks):
        ax = figure.add_subplot(1, len(picks), column + 1)
        heat = Image.fromarray((maps[index] * 255).astype(np.uint8)).resize(photo.size, Image.Resampling.BILINEAR)
        ax.imshow(photo)
        ax.imshow(np.asarray(heat), cmap="jet", alpha=0.5, vmin=0, vmax=255)
        ax.set_title(f"t={t[index]}  IoU={stages['iou'][index]:.2f}\n{window.stage(t[index])}", fontsize=8)
        ax.axis("off")
    return figure_to_image(figure)
