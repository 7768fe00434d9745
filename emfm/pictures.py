"""Pictures a run leaves behind: a PNG in the run directory, the same image in TensorBoard / W&B, every column
named (a grid of unnamed panels leaves the reader guessing which is the truth and which the prediction)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

LINE = 16            # pixels of one line of text in the band above the panels


def titled(image: Image.Image, titles: Sequence[str], heading: str = "") -> Image.Image:
    """``image`` (equal columns side by side) under a white band naming each column, and a heading line above
    them if given; a name wider than its column is cut short."""
    lines = 2 if heading else 1
    font = ImageFont.load_default(size=LINE - 4)
    out = Image.new(image.mode, (image.width, image.height + lines * LINE), "white")
    out.paste(image, (0, lines * LINE))
    draw = ImageDraw.Draw(out)
    black = 0 if image.mode == "L" else (0, 0, 0)
    if heading:
        draw.text((4, 1), heading, fill=black, font=font)
    width = image.width / len(titles)
    for i, title in enumerate(titles):
        while title and draw.textlength(title, font=font) > width - 4:
            title = title[:-1]
        draw.text((i * width + width / 2, (lines - 1) * LINE + 1), title, fill=black, font=font, anchor="ma")
    return out


def publish(trainer: pl.Trainer, grid: torch.Tensor, path: Path, tag: str, titles: Sequence[str],
            heading: str = "") -> Path:
    """Save a (C, H, W) image grid in [0, 1], its columns named by ``titles``, as PNG, and send it to the
    TensorBoard / W&B loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = titled(to_pil_image(grid.clamp(0, 1)), titles, heading)
    picture.save(path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, pil_to_tensor(picture), global_step=trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[np.asarray(picture)], step=trainer.global_step)
    return path
