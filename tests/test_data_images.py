"""Image loading and LLaVA/CLIP preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from accelbench.errors import DataError
from accelbench.train.images import (
    CLIP_MEAN, CLIP_STD, PAD_COLOR, expand2square, load_image, make_image_transform, safe_image_path,
)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip_reference(image_size: int):
    """transformers' own PIL CLIP processor, configured like LLaVA's (no download)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        pytest.skip("transformers has no CLIPImageProcessorPil")
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def test_pad_color_is_llava_mean_colour():
    assert PAD_COLOR == (122, 116, 104)


@pytest.mark.parametrize("size", [(90, 40), (40, 90), (56, 56), (300, 200)])
def test_crop_matches_clip_image_processor(size):
    img = noise(*size)
    ref = clip_reference(56)(images=img, return_tensors="pt")["pixel_values"][0]
    out = make_image_transform(56, "crop")(img)
    assert out.dtype == torch.float32 and out.shape == (3, 56, 56)
    assert torch.allclose(out, ref, atol=1e-5)


def test_pad_is_expand2square_then_clip():
    img = noise(90, 40)
    square = expand2square(img)
    assert square.size == (90, 90)
    assert square.getpixel((0, 0)) == PAD_COLOR and square.getpixel((45, 89)) == PAD_COLOR
    assert square.crop((0, 25, 90, 65)).tobytes() == img.tobytes()  # centred vertically
    ref = clip_reference(56)(images=square, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(make_image_transform(56, "pad")(img), ref, atol=1e-5)


def test_pad_keeps_content_that_crop_drops():
    img = Image.new("RGB", (120, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 40))  # a red strip on the far left
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert make_image_transform(56, "crop")(img)[0].max() < red - 0.5
    padded = make_image_transform(56, "pad")(img)
    assert padded[0].max() > red - 0.2
    assert padded[:, 0, 28].abs().max() < 0.02  # the padding normalises to ~0 (the mean colour)


def test_normalisation_of_a_solid_image():
    out = make_image_transform(8, "crop")(Image.new("RGB", (8, 8), (255, 0, 128)))
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert torch.allclose(out[:, 3, 3], torch.tensor(expected), atol=1e-5)


def test_bad_transform_arguments():
    with pytest.raises(ValueError):
        make_image_transform(56, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_image_transform(0, "crop")


def test_load_image_converts_to_rgb(tmp_path: Path):
    Image.new("RGBA", (5, 7), (1, 2, 3, 4)).save(tmp_path / "a.png")
    Image.new("L", (3, 3), 9).save(tmp_path / "sub.png")
    img = load_image(tmp_path, "a.png")
    assert img.mode == "RGB" and img.size == (5, 7)
    assert load_image(str(tmp_path), "sub.png").mode == "RGB"


def test_load_image_missing_and_corrupt(tmp_path: Path):
    with pytest.raises(DataError, match="missing.png.*does not exist"):
        load_image(tmp_path, "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="bad.jpg.*cannot be decoded"):
        load_image(tmp_path, "bad.jpg")


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", "..", "a\\..\\..\\x.png"])
def test_paths_must_stay_inside_folder(tmp_path: Path, rel: str):
    with pytest.raises(DataError, match="escapes the image folder.*relative to --image-folder"):
        load_image(tmp_path, rel)


@pytest.mark.parametrize("rel", ["", None, 3, "a\x00b"])
def test_non_paths_are_data_errors(tmp_path: Path, rel):
    with pytest.raises(DataError):
        safe_image_path(tmp_path, rel)


def test_nested_relative_path_is_fine(tmp_path: Path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "coco" / "train2017" / "1.png")
    assert load_image(tmp_path, "coco/train2017/1.png").size == (4, 4)
    assert safe_image_path(tmp_path, "./coco/x..y.png") == tmp_path / "coco" / "x..y.png"
