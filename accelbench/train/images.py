"""Image loading and CLIP preprocessing the way LLaVA-1.5 does it.

Pretraining uses CLIPImageProcessor's own path (shortest edge to S, bicubic, centre crop);
finetuning first pads to a square with the CLIP mean colour (LLaVA's ``expand2square``,
``image_aspect_ratio="pad"``) so nothing is cropped away, then resizes.
"""
from __future__ import annotations

import functools

import os
from pathlib import Path, PurePosixPath
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

from accelbench.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)

Aspect = Literal["crop", "pad"]


def safe_image_path(image_folder: str | os.PathLike[str], rel_path: object) -> Path:
    """Join ``rel_path`` to the folder, refusing anything that could leave it.

    The check is lexical (no symlink resolution) so image folders that are themselves
    symlink farms onto other disks keep working.
    """
    if not isinstance(rel_path, str) or not rel_path:
        raise DataError(f"image path {rel_path!r} is not a non-empty string: "
                        "set the record's 'image' to a path relative to the image folder")
    if "\x00" in rel_path:
        raise DataError(f"image path {rel_path!r} contains a NUL byte: fix the record's 'image'")
    parts = PurePosixPath(rel_path.replace("\\", "/"))
    if parts.is_absolute() or os.path.isabs(rel_path) or ".." in parts.parts:
        raise DataError(
            f"image path {rel_path!r} escapes the image folder {str(image_folder)!r}: "
            "data files must use paths relative to --image-folder without '..' "
            "(move the image under the folder or fix the record's 'image')"
        )
    return Path(image_folder) / rel_path


def load_image(image_folder: str | os.PathLike[str], rel_path: str) -> Image.Image:
    """Open one image as RGB; a missing or undecodable file is a ``DataError`` naming it."""
    path = safe_image_path(image_folder, rel_path)
    if not os.path.isfile(path):  # unlike Path.is_file, never raises (e.g. name too long)
        raise DataError(f"image file {str(path)!r} does not exist (record image {rel_path!r})")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces a full decode inside the try
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        raise DataError(f"image file {str(path)!r} cannot be decoded: {exc}") from exc


def verify_image(path: Path) -> str | None:
    """Cheap integrity check (PIL ``verify``): None when fine, else the reason."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # any decoder failure means a corrupt file
        return f"{type(exc).__name__}: {exc}"
    return None


def expand2square(img: Image.Image, background: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square of ``background``."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor resize: shortest edge to ``size``, the other scaled (int-truncated)."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == img.size:
        return img
    return img.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    top, left = (height - size) // 2, (width - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float32, rescaled by 1/255 and CLIP-normalised."""
    array = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def make_image_transform(image_size: int, aspect: Aspect) -> Callable[[Image.Image], torch.Tensor]:
    """Build PIL image -> float tensor [3, S, S]; ``aspect`` is "crop" (pretrain) or "pad"."""
    if aspect not in ("crop", "pad"):
        raise ValueError(f"aspect must be 'crop' or 'pad', not {aspect!r}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, not {image_size}")
    # a partial of a module-level function pickles, so data-loader worker processes can take it
    return functools.partial(_transform, image_size=image_size, aspect=aspect)


def _transform(img: Image.Image, *, image_size: int, aspect: Aspect) -> torch.Tensor:
    img = img.convert("RGB")
    if aspect == "pad":
        img = expand2square(img)
    img = center_crop(resize_shortest_edge(img, image_size), image_size)
    return to_normalized_tensor(img)
