"""Sample grids stay small to write at real image sizes, and every image lands in its own cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo.callbacks import SampleGrid
from sdpo.grids import GRID_HEADER_HEIGHT, GRID_LABEL_WIDTH, GRID_MAX_SIDE, fit_to_grid


def latest(prompts: int, side: int) -> dict:
    """What the module keeps of an iteration, with flat images: prompt p's 1-step image is grey p/10, its T-step
    images a and b are pure red and pure blue."""
    first = torch.stack([torch.full((3, side, side), p / 10) for p in range(prompts)])
    last = torch.zeros(prompts, 2, 3, side, side)
    last[:, 0, 0] = 1.0
    last[:, 1, 2] = 1.0
    return {"prompts": [f"prompt {p}" for p in range(prompts)], "num_steps": 50, "first_images": first,
            "last_images": last, "first_rewards": torch.rand(prompts), "last_rewards": torch.rand(prompts, 2)}


@pytest.mark.parametrize(("side", "cell"), [(512, GRID_MAX_SIDE), (16, 64)])
def test_sample_grid_cells_are_bounded_and_hold_their_images(side, cell):
    """512 px images are drawn at GRID_MAX_SIDE (a fixed 4x scale made a 300-megapixel grid that took seconds to
    write every saving iteration); 16 px test images are still scaled up so their captions fit."""
    grid = SampleGrid(dirpath="unused", max_prompts=3).make_grid(latest(prompts=5, side=side))
    assert grid.size == (GRID_LABEL_WIDTH + 3 * cell, GRID_HEADER_HEIGHT + 3 * cell)
    pixels = np.asarray(grid)
    for p in range(3):
        y = GRID_HEADER_HEIGHT + p * cell + cell // 2
        centre = [pixels[y, GRID_LABEL_WIDTH + j * cell + cell // 2] for j in range(3)]
        assert list(centre[0]) == [round(255 * p / 10)] * 3
        assert list(centre[1]) == [255, 0, 0] and list(centre[2]) == [0, 0, 255]


def test_a_sample_grid_says_when_it_shows_fewer_prompts_than_the_iteration_had():
    def corner_ink(prompts: int) -> int:  # dark pixels above the row captions
        grid = np.asarray(SampleGrid(dirpath="unused", max_prompts=3).make_grid(latest(prompts=prompts, side=16)))
        return int((grid[:GRID_HEADER_HEIGHT, :GRID_LABEL_WIDTH] < 128).any(axis=-1).sum())

    assert corner_ink(5) > 0 and corner_ink(3) == 0
    assert "(first 3 of 5 prompts)" in SampleGrid(dirpath="unused", max_prompts=3).caption(latest(5, 16), epoch=2)


def test_fit_to_grid_averages_what_it_shrinks():
    """A 1-pixel checkerboard at 1024 px becomes flat grey at 256 px (antialiased), not an aliased pattern."""
    board = ((torch.arange(1024)[:, None] + torch.arange(1024)[None, :]) % 2).float().expand(2, 3, 1024, 1024)
    small, scale = fit_to_grid(board)
    assert small.shape == (2, 3, GRID_MAX_SIDE, GRID_MAX_SIDE) and scale == 1
    assert small.mean().item() == pytest.approx(0.5, abs=1e-3) and small.std().item() < 0.01
    tiny, scale = fit_to_grid(board[..., :16, :16])
    assert torch.equal(tiny, board[..., :16, :16]) and scale == 4


def test_row_captions_wrap_to_the_label_column_and_keep_the_rewards():
    """Long prompts were cut to 18-22 characters, so prompts sharing a beginning looked alike; they now wrap over
    the lines the row has, the rewards line stays whole, and nothing is wider than the column."""
    from PIL import Image, ImageDraw

    from sdpo.grids import fit_caption

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed, trending on artstation"
    short = fit_caption(draw, f"{prompt}\n1:0.512 4:0.498/0.501", 146, 60)
    lines = short.split("\n")
    assert lines[-1] == "1:0.512 4:0.498/0.501" and lines[-2].endswith("...") and len(lines) >= 3
    assert " ".join(lines[:-1]).startswith("a photograph of an astronaut riding")
    assert all(draw.textlength(line) <= 146 for line in lines)
    tall = fit_caption(draw, prompt, 146, 256)  # a 256 px row holds the whole prompt
    assert tall.replace("\n", " ") == prompt
    word = fit_caption(draw, "x" * 200, 146, 256)  # one unbreakable word is cut by character
    assert word.replace("\n", "") == "x" * 200 and all(draw.textlength(line) <= 146 for line in word.split("\n"))
    grid = SampleGrid(dirpath="unused", max_prompts=2).make_grid(latest(prompts=2, side=16) | {"prompts": [prompt] * 2})
    assert grid.size == (GRID_LABEL_WIDTH + 3 * 64, GRID_HEADER_HEIGHT + 2 * 64)
