"""Pictures of a training run (drawn with Pillow): the loss curves, the histogram of the σ actually drawn
against the density that was asked for, and MDLRC's β₁ and learning rate.

Labels are ASCII ("sigma", "beta1"): Pillow's built-in font has no Greek letters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..merging.training.schedules import TimestepSampler, training_progress
from .training_runtime import TrainingLog

WIDTH, PANEL_HEIGHT = 640, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 26, 36
BACKGROUND, AXIS, TEXT, RANGE_SHADE = (24, 24, 24), (120, 120, 120), (220, 220, 220), (48, 64, 48)
COLORS = {"loss": (78, 121, 167), "range": (242, 142, 43), "consistency": (89, 161, 79), "density": (225, 87, 89)}
HISTOGRAM_BINS = 40
LEGEND_WIDTH = 96
_DENSITY_POINTS = 200
_PROGRESS_POINTS = 21


class _Panel:
    """One plot area: maps data coordinates to pixels inside the margins of its image."""

    def __init__(self, title: str, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.image = Image.new("RGB", (WIDTH, PANEL_HEIGHT), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.x_range, self.y_range = x_range, _padded(y_range)
        self.draw.text((MARGIN_LEFT, 6), title, fill=TEXT, font=self.font)
        left, top, right, bottom = self.box
        self.draw.rectangle([left, top, right, bottom], outline=AXIS)
        self.draw.text((4, top), f"{self.y_range[1]:.3g}", fill=TEXT, font=self.font)
        self.draw.text((4, bottom - 10), f"{self.y_range[0]:.3g}", fill=TEXT, font=self.font)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, PANEL_HEIGHT - MARGIN_BOTTOM

    def point(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    def line(self, xs: Sequence[float], ys: Sequence[float], color) -> None:
        points = [self.point(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=2)
        elif points:
            self.draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        """Colour keys in the top-right corner inside the plot box."""
        x, y = WIDTH - MARGIN_RIGHT - LEGEND_WIDTH * len(entries), MARGIN_TOP + 5
        for label, color in entries:
            self.draw.rectangle([x, y + 2, x + 10, y + 10], fill=color)
            self.draw.text((x + 14, y), label, fill=TEXT, font=self.font)
            x += LEGEND_WIDTH

    def x_labels(self, labels: Sequence[tuple[float, str]]) -> None:
        bottom = self.box[3]
        for x, text in labels:
            px, _ = self.point(x, self.y_range[0])
            self.draw.text((px - 14, bottom + 4), text, fill=TEXT, font=self.font)


def _padded(value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = value_range
    if not (np.isfinite(low) and np.isfinite(high)):
        return 0.0, 1.0
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    return low, high + 0.05 * (high - low)


def loss_panel(log: TrainingLog) -> Image.Image:
    """Total, range and consistency loss per optimiser step."""
    steps = list(range(1, len(log.loss) + 1))
    series = [("total", log.loss, COLORS["loss"]), ("range", log.range_loss, COLORS["range"])]
    if any(value > 0 for value in log.consistency_loss):
        series.append(("consistency", log.consistency_loss, COLORS["consistency"]))
    values = [v for _, ys, _ in series for v in ys if np.isfinite(v)] or [0.0]
    evaluation = ""
    if len(log.eval_range_loss) == 2:
        evaluation = f"   (fixed eval batch: range loss {log.eval_range_loss[0]:.4g} -> {log.eval_range_loss[1]:.4g})"
    panel = _Panel(f"loss per step{evaluation}", (1, max(len(steps), 2)), (min(0.0, min(values)), max(values)))
    for _, ys, color in reversed(series):  # the total last, on top
        panel.line(steps, ys, color)
    panel.legend([(name, color) for name, _, color in series])
    panel.x_labels([(1, "1"), (max(len(steps), 2), str(len(steps)))])
    return panel.image


def sigma_histogram_panel(log: TrainingLog, sampler: TimestepSampler, steps: int) -> Image.Image:
    """Histogram of the drawn normalised times, the expected density over the run, and the expert's range."""
    times = np.asarray(log.normalized_time, dtype=np.float64)
    counts, edges = np.histogram(times, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    heights = counts / max(len(times), 1) / (edges[1] - edges[0])
    grid = torch.linspace(0, 1, _DENSITY_POINTS, dtype=torch.float64)
    expected = expected_density(sampler, grid, steps).numpy()
    top = max(float(heights.max(initial=0.0)), float(expected.max(initial=0.0)), 1e-9)
    title = f"sigma drawn: {len(times)} samples (bars) vs requested density (line); shaded: the expert's range"
    panel = _Panel(title, (0.0, 1.0), (0.0, top))
    low, high = log.range_normalized_time
    left, top_px = panel.point(low, top)
    right, bottom_px = panel.point(high, 0.0)
    panel.draw.rectangle([left, top_px, right, bottom_px], fill=RANGE_SHADE)
    for count, start, end in zip(heights, edges[:-1], edges[1:], strict=True):
        if count > 0:
            x0, y0 = panel.point(start, count)
            x1, y1 = panel.point(end, 0.0)
            panel.draw.rectangle([x0 + 1, y0, x1 - 1, y1], fill=COLORS["loss"])
    panel.line(grid.tolist(), expected.tolist(), COLORS["density"])
    panel.legend([("drawn", COLORS["loss"]), ("requested", COLORS["density"])])
    panel.x_labels(_sigma_ticks(log.schedule_sigma))
    caption = "x: sigma at the ticks, spaced as normalised time (0 = clean, 1 = pure noise)"
    panel.draw.text((MARGIN_LEFT, PANEL_HEIGHT - 14), caption, fill=AXIS, font=panel.font)
    return panel.image


def expected_density(sampler: TimestepSampler, times: torch.Tensor, steps: int) -> torch.Tensor:
    """The marginal density of the drawn times averaged over the run (the curriculum moves it)."""
    count = min(max(steps, 1), _PROGRESS_POINTS)
    progresses = [training_progress(round(i * (steps - 1) / max(count - 1, 1)), steps) for i in range(count)]
    return torch.stack([sampler.density(times, progress) for progress in progresses]).mean(dim=0)


def _sigma_ticks(schedule_sigma: Sequence[float]) -> list[tuple[float, str]]:
    if len(schedule_sigma) < 11:
        return [(0.0, "clean"), (1.0, "noise")]
    return [(u / 10, f"{schedule_sigma[u]:.3g}") for u in (0, 3, 5, 8, 10)]


def momentum_panel(log: TrainingLog) -> Image.Image:
    """β₁ and the learning rate relative to its largest value, per optimiser step."""
    steps = list(range(1, len(log.beta1) + 1))
    peak = max(log.lr, default=1.0) or 1.0
    panel = _Panel(f"MDLRC: beta1 and lr / {peak:.3g} per step", (1, max(len(steps), 2)), (0.0, 1.0))
    panel.line(steps, log.beta1, COLORS["range"])
    panel.line(steps, [lr / peak for lr in log.lr], COLORS["consistency"])
    panel.legend([("beta1", COLORS["range"]), ("lr / max", COLORS["consistency"])])
    return panel.image


def stacked(panels: Sequence[Image.Image]) -> Image.Image:
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(panels)), BACKGROUND)
    for index, panel in enumerate(panels):
        image.paste(panel, (0, index * PANEL_HEIGHT))
    return image


def to_image_batch(image: Image.Image) -> torch.Tensor:
    """A Pillow image as ComfyUI's IMAGE: (1, H, W, 3) floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
