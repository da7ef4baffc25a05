"""Plots and grids a person looks at: PNGs of the expected size, labels in a real font that
keep their spaces and stay inside their cells, cells of at least MIN_TILE pixels."""
from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from spacetime_jax import visualize
from spacetime_jax.plots import (DPI, LOSS_PLOT, PANEL_HEIGHT_IN, TRADEOFF_HEIGHT_IN, WIDTH_IN,
                                 loss_panels, tradeoff_plot, write_loss_plot)
from spacetime_jax.visualize import LABEL_HEIGHT, MIN_TILE, fit_label, image_grid, label_font


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def ink_columns(strip: np.ndarray) -> np.ndarray:
    """The x of every column of a label strip that holds dark (text) pixels."""
    return np.flatnonzero((strip.min(axis=(0, 2)) < 128))


# ---------------------------------------------------------------------------------------
# Plots.


def test_loss_png_is_drawn_from_metrics_jsonl_one_panel_per_kind_of_metric(tmp_path):
    records = [{"step": 10, "loss": 2.0, "steps_per_s": None, "elapsed_s": 1.0},
               {"step": 20, "loss": 1.0, "held_out_loss": 1.5, "accuracy": 0.5,
                "steps_per_s": 4.0, "elapsed_s": 3.5},
               {"step": 30, "loss": 0.5, "steps_per_s": 4.0, "elapsed_s": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # The losses share a panel; accuracy gets its own; speed and time are not curves.
    assert loss_panels(records) == [["loss", "held_out_loss"], ["accuracy"]]
    path = write_loss_plot(tmp_path)
    assert path == tmp_path / LOSS_PLOT
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(WIDTH_IN * DPI), int(2 * PANEL_HEIGHT_IN * DPI)) == (800, 600)


def test_loss_png_is_written_into_a_gs_workdir(gcs):
    workdir = gcs.path(f"loss-{uuid.uuid4().hex[:8]}")
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    path = write_loss_plot(workdir, records)
    assert str(path) == f"{workdir}/{LOSS_PLOT}"
    assert decode(path.read_bytes()).size == (800, 300)


def test_no_metrics_no_loss_png(tmp_path):
    assert write_loss_plot(tmp_path) is None
    assert not (tmp_path / LOSS_PLOT).exists()


def test_the_fidelity_editability_plot_from_given_numbers():
    # The README's NeTI rows at 500 steps (bg, clip edit) and two of the other rows.
    curve = [("t=128", 0.844, 0.096), ("t=64", 0.875, 0.087), ("t=32", 0.875, 0.077),
             ("t=16", 0.922, 0.082), ("t=8", 1.000, 0.067)]
    others = [("textual_inversion", 0.672, 0.167), ("in words", 1.000, 0.058)]
    image = decode(tradeoff_plot(curve, others, title="t", x_label="x", y_label="y"))
    assert image.size == (int(WIDTH_IN * DPI), int(TRADEOFF_HEIGHT_IN * DPI)) == (800, 550)
    pixels = np.asarray(image.convert("RGB"), np.int16)
    # The curve is drawn in its blue, the other rows in red.
    is_color = lambda rgb: (np.abs(pixels - rgb).sum(axis=-1) < 60).sum()
    assert is_color((31, 79, 216)) > 200 and is_color((214, 39, 40)) > 100


# ---------------------------------------------------------------------------------------
# Grids.


def test_labels_keep_their_spaces():
    tile = np.full((1, 64, 64, 3), 255, np.uint8)
    widths = {}
    for text in ("a b", "ab"):
        grid = np.asarray(image_grid(tile, 1, 1, row_labels=[text]).convert("RGB"))
        columns = ink_columns(grid[:LABEL_HEIGHT])
        widths[text] = columns[-1] - columns[0] + 1
    space = label_font().getlength(" ")
    assert space >= 3
    assert widths["a b"] - widths["ab"] == pytest.approx(space, abs=1.5)


@pytest.mark.parametrize("side", [16, 48, 64, 100, 127, 128, 200])
def test_cells_are_at_least_min_tile_pixels(side):
    images = np.random.default_rng(side).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    grid = np.asarray(image_grid(images, 1, 2))
    scale = visualize.tile_scale(side, side)
    cell = side * scale
    assert cell >= MIN_TILE and (scale == 1 or side * (scale - 1) < MIN_TILE)
    assert grid.shape == (cell, 2 * cell, 3)
    # Nearest neighbour: each pixel becomes a scale x scale block.
    np.testing.assert_array_equal(grid[:, cell:], images[1].repeat(scale, 0).repeat(scale, 1))


def test_a_grid_has_a_title_then_column_labels_then_each_row_under_its_label():
    images = np.zeros((4, 64, 64, 3), np.uint8)
    grid = np.asarray(image_grid(images, 2, 2, row_labels=["row one", "row two"],
                                 col_labels=["seed 0", "seed 1"],
                                 title="NeTI <cat>, step 10: prompts x seeds 0, 1"))
    row_height = LABEL_HEIGHT + MIN_TILE
    assert grid.shape == (2 * LABEL_HEIGHT + 2 * row_height, 2 * MIN_TILE, 3)
    for strip_top in (0, LABEL_HEIGHT, 2 * LABEL_HEIGHT, 2 * LABEL_HEIGHT + row_height):
        strip = grid[strip_top:strip_top + LABEL_HEIGHT]
        assert strip.max() == 255 and len(ink_columns(strip)) > 10  # text on white
    for row in range(2):
        top = 3 * LABEL_HEIGHT + row * row_height
        assert (grid[top:top + MIN_TILE] == 0).all()  # the (black) images


@pytest.mark.parametrize("text", [
    "a photo of a <crescent> on a green background",
    "a photo of a <crescent> " + "very " * 40 + "long",
    "unbreakable_" * 20,
])
def test_long_labels_wrap_shrink_or_cut_but_never_leave_their_cell(text):
    width = MIN_TILE - 2 * visualize.PADDING
    lines, font = fit_label(text, width)
    assert 1 <= len(lines) <= visualize.MAX_LINES
    assert visualize.MIN_FONT_SIZE <= font.size <= visualize.FONT_SIZE
    assert all(font.getlength(line) <= width for line in lines)
    cut = visualize.ELLIPSIS in lines[-1]
    assert cut == (" ".join(lines) != text)  # only a cut label loses words, and says so
    # Drawn in a column label: the ink stays inside the column.
    images = np.full((2, 64, 64, 3), 255, np.uint8)
    grid = np.asarray(image_grid(images, 1, 2, col_labels=[text, ""]).convert("RGB"))
    assert ink_columns(grid[:LABEL_HEIGHT]).max() < MIN_TILE
