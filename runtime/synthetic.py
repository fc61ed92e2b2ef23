"""The synthetic images every benchmark uses: deterministic JPEGs that compress and decode like photographs.

Each image is a smooth colour field (a random 16x12 grid, bicubic-upscaled) with mild noise on top, neither flat
colour (which JPEG shrinks to nothing) nor pure noise (which decodes far slower than a photograph). The same
count and size always give the same bytes: image i depends only on the images before it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

SIZE = (640, 480)  # (width, height): the common COCO landscape image


def synthetic_jpegs(count: int, size: tuple[int, int] = SIZE) -> Iterator[bytes]:
    """`count` JPEG files (quality 90) of `size` (width, height), as bytes."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue()


def synthetic_images(folder: Path, count: int, size: tuple[int, int] = SIZE) -> list[Path]:
    """`synthetic_jpegs` written to `folder` as 000000.jpg, 000001.jpg, ..."""
    paths = []
    for i, data in enumerate(synthetic_jpegs(count, size)):
        path = Path(folder) / f"{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def decoded_images(count: int, size: tuple[int, int] = SIZE) -> list[Image.Image]:
    """`synthetic_jpegs` decoded to RGB, as the loader gives them."""
    images = []
    for data in synthetic_jpegs(count, size):
        with Image.open(io.BytesIO(data)) as image:
            images.append(image.convert("RGB"))
    return images
