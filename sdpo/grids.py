"""Labelled image grids (sample grids during training, evaluation grids) at a size that stays small to write.

Cells are the images at a side of at most ``GRID_MAX_SIDE``: tiny test images are scaled up so captions fit, and
real ones (512-1024 px) are scaled down, because a grid of 8 prompts x 3 images of 512 px drawn 4x larger (what a
fixed scale gives) has 300 megapixels and takes seconds to write as PNG in every iteration that saves one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

GRID_LABEL_WIDTH = 150  # pixels of the row-caption column on the left of every grid
GRID_HEADER_HEIGHT = 16  # pixels of the column-title row on top
GRID_MAX_SIDE = 256  # grid cells of bigger images are downsampled to this side
GRID_FONT_SIZE = 10


@functools.lru_cache(maxsize=1)
def grid_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships: PIL's built-in font draws spaces so narrow that "A green rabbit" reads
    "Agreen rabbit". PIL's font when matplotlib's file is missing."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"),
                                  GRID_FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default()


def drawing(image: Image.Image) -> ImageDraw.ImageDraw:
    """An ``ImageDraw`` on ``image`` that writes in the grid font."""
    draw = ImageDraw.Draw(image)
    draw.font = grid_font()
    return draw


def image_grid(rows: list[list[torch.Tensor]], captions: list[str], header: list[str], scale: int = 1,
               cell_captions: list[list[str]] | None = None, corner: str = "") -> Image.Image:
    """A labelled grid: one row per prompt, one column per image kind. Images are [3, H, W] in [0, 1]; pass them
    and ``scale`` through ``fit_to_grid``.

    The grid is ``GRID_LABEL_WIDTH + W*scale*columns`` wide and ``GRID_HEADER_HEIGHT + H*scale*rows`` high; the
    header row grows when a column title or ``corner`` (what the cell captions are, above the row captions) needs
    more than one line. ``cell_captions`` (same layout as ``rows``; lines split by "\n") are printed on a white
    box in each cell's bottom-left corner.
    """
    h, w = rows[0][0].shape[-2:]
    cell_h, cell_w = h * scale, w * scale
    label_w = GRID_LABEL_WIDTH
    measure = drawing(Image.new("RGB", (1, 1)))
    titles = ["\n".join(_wrap(measure, title, cell_w - 4)) for title in header]
    corner_text = "\n".join(_wrap(measure, corner, label_w - 4)) if corner else ""
    lines = max(text.count("\n") + 1 for text in [*titles, corner_text])
    head_h = GRID_HEADER_HEIGHT if lines == 1 else GRID_HEADER_HEIGHT + (lines - 1) * _line_height(measure)
    grid = Image.new("RGB", (label_w + cell_w * len(header), head_h + cell_h * len(rows)), "white")
    draw = drawing(grid)
    if corner_text:
        draw.multiline_text((2, 2), corner_text, fill="black")
    for j, title in enumerate(titles):
        draw.multiline_text((label_w + j * cell_w + 2, 2), title, fill="black")
    for i, (row, caption) in enumerate(zip(rows, captions, strict=True)):
        draw.text((2, head_h + i * cell_h + 2), fit_caption(draw, caption, label_w - 4, cell_h - 4), fill="black")
        for j, image in enumerate(row):
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (label_w + j * cell_w, head_h + i * cell_h))
            if cell_captions is not None and cell_captions[i][j]:
                text = cell_captions[i][j]
                x = label_w + j * cell_w + 1
                y = head_h + (i + 1) * cell_h - draw.multiline_textbbox((0, 0), text)[3] - 1  # on the bottom edge
                box = draw.multiline_textbbox((x, y), text)
                draw.rectangle(box, fill="white")
                draw.multiline_text((x, y), text, fill="black")
    return grid


def _line_height(draw: ImageDraw.ImageDraw) -> int:
    """Pixels from one line of PIL's multiline text to the next (its spacing is 4 px)."""
    return draw.textbbox((0, 0), "Ag")[3] + 4


def score_captions(scores: dict[str, Tensor], index: tuple) -> str:
    """The cell caption of one image: each reward's score at ``index``, one line per reward."""
    return "\n".join(f"{float(values[index]):.3f}" for values in scores.values())


def _wrap(draw: ImageDraw.ImageDraw, paragraph: str, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than the column is cut by character."""
    lines: list[str] = []
    line = ""
    for word in paragraph.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word) > width and len(word) > 1:
            cut = 1
            while cut < len(word) and draw.textlength(word[: cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return [*lines, line] if line else lines or [""]


def fit_caption(draw: ImageDraw.ImageDraw, caption: str, width: int, height: int) -> str:
    """``caption`` wrapped to the row-caption column, as many lines as the row's height holds. Its last paragraph
    (e.g. a row's rewards) is kept whole; the first (the prompt) loses its end, marked "...", when space runs out,
    so long prompts that share a beginning still differ on screen as far as the space allows."""
    room = max(1, height // _line_height(draw))
    paragraphs = [_wrap(draw, part, width) for part in caption.split("\n")]
    tail = [line for lines in paragraphs[1:] for line in lines]
    head_room = max(1, room - len(tail))
    head = paragraphs[0]
    if len(head) > head_room:
        head = head[:head_room]
        last = head[-1]
        while last and draw.textlength(last + "...") > width:
            last = last[:-1]
        head[-1] = last + "..."
    return "\n".join([*head, *tail][:max(room, 1 + len(tail))])


def grid_scale(side: int) -> int:
    """Integer upscaling of grid cells: tiny images become >= 64 px so captions fit under them."""
    return max(1, 64 // max(1, side))


def fit_to_grid(images: Tensor) -> tuple[Tensor, int]:
    """``images`` [..., 3, H, W] downsampled (antialiased) to ``GRID_MAX_SIDE`` when bigger, and the integer scale
    that ``image_grid`` should draw them at."""
    side = images.shape[-1]
    if side > GRID_MAX_SIDE:
        flat = images.float().flatten(0, -4)
        flat = torch.nn.functional.interpolate(flat, size=GRID_MAX_SIDE, mode="bilinear", antialias=True)
        images = flat.unflatten(0, images.shape[:-3])
    return images, grid_scale(images.shape[-1])
