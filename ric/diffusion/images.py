"""Image helpers shared by the image data sets, rewards and policy: one way to open, resize and tile images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def as_image(x: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, an ``HxWx3`` uint8 array, or a ``3xHxW`` tensor in
    ``[0, 1]``: rewards accept whatever the data set or the policy hands them."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (str, Path)):
        with Image.open(x) as im:
            return im.convert("RGB")
    if isinstance(x, torch.Tensor):
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"an image tensor must be 3xHxW in [0, 1], got shape {tuple(x.shape)}")
        x = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise ValueError(f"an image array must be HxWx3 uint8, got {x.shape} {x.dtype}")
        return Image.fromarray(x)
    raise TypeError(f"cannot read an image from {type(x).__name__}: {str(x)[:80]!r}")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest side resized to ``size`` (bicubic), then the centre ``size x size`` crop."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``3xHxW`` float tensor in ``[-1, 1]`` (the VAE's input range)."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_grid(rows: Sequence[Sequence[Image.Image]], cell: int = 128, pad: int = 2) -> Image.Image:
    """Tile images (``rows[i][j]``) into one white-padded picture of ``cell``-pixel squares."""
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    grid = Image.new("RGB", (n_cols * (cell + pad) + pad, n_rows * (cell + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(
                as_image(img).resize((cell, cell), Image.BICUBIC), (pad + j * (cell + pad), pad + i * (cell + pad))
            )
    return grid
