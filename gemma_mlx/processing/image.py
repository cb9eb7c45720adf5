"""Images to 48×48 patches, as Gemma4UnifiedImageProcessor does (brief §4.1).

RGB conversion (transparent pixels composited over white, EXIF orientation applied, first frame of animated
images), an aspect-preserving bicubic antialiased resize to the soft-token budget, values / 255 with no
mean/std, then 48×48 tiles in raster order, each flattened as (row y, column x, channel c), with positions
(x = column, y = row). The tile size is patch_size × pooling_kernel_size from the model config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError
from .media import describe, open_binary

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)
MAX_IMAGE_PIXELS = 100_000_000  # beyond this a file is treated as a decompression bomb


@dataclass
class ImageFeatures:
    pixel_values: np.ndarray  # (N, tile*tile*3) float32 in [0, 1]
    position_ids: np.ndarray  # (N, 2) int32, (x, y) tile coordinates
    size: tuple[int, int]  # resized (height, width)

    @property
    def num_soft_tokens(self) -> int:
        return self.pixel_values.shape[0]


def load_image(src) -> Image.Image:
    """An RGB PIL image from a path, bytes, file object, PIL image or HWC uint8 array."""
    if isinstance(src, Image.Image):
        image = src
    elif isinstance(src, np.ndarray):
        if src.ndim not in (2, 3) or src.size == 0:
            raise MediaError(f"image array must be HW or HWC and non-empty, got shape {src.shape}")
        arr = src if src.dtype == np.uint8 else np.clip(src * (255 if src.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    else:
        f = open_binary(src)
        try:
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            image = Image.open(f)
            image.load()
        except Image.DecompressionBombError as e:
            raise MediaError(f"{describe(src)}: image is too large ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{describe(src)}: not a readable image ({e})") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise MediaError(f"{describe(src)}: {image.width}×{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{describe(src)}: image has no pixels")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated images: the first frame (pass the file as a video for all frames)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "I;16" or image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
    return image.convert("RGB")


def aspect_ratio_preserving_size(height: int, width: int, max_soft_tokens: int, patch_size: int = 16,
                                 pooling_kernel_size: int = 3) -> tuple[int, int]:
    """Target (height, width): multiples of the tile size with at most max_soft_tokens tiles, aspect kept."""
    if max_soft_tokens not in SUPPORTED_BUDGETS:
        raise MediaError(f"max_soft_tokens must be one of {SUPPORTED_BUDGETS}, got {max_soft_tokens}")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise MediaError(f"cannot resize a {height}×{width} image to a non-empty multiple of {side} pixels")
    max_side = (max_patches // pooling_kernel_size**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, max_side), side
    return th, tw


def tile_image(pixels: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles (N, tile*tile*C), positions (N, 2) as (x, y)) of an HWC array whose sides are multiples of tile."""
    h, w, c = pixels.shape
    rows, cols = h // tile, w // tile
    tiles = pixels.reshape(rows, tile, cols, tile, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    ys, xs = np.divmod(np.arange(rows * cols), cols)
    return tiles, np.stack([xs, ys], axis=-1).astype(np.int32)


def preprocess_image(src, max_soft_tokens: int = 280, patch_size: int = 16,
                     pooling_kernel_size: int = 3) -> ImageFeatures:
    """ImageFeatures of one image at the given soft-token budget."""
    image = load_image(src)
    th, tw = aspect_ratio_preserving_size(image.height, image.width, max_soft_tokens, patch_size,
                                          pooling_kernel_size)
    if (th, tw) != (image.height, image.width):
        image = image.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    tiles, positions = tile_image(pixels, patch_size * pooling_kernel_size)
    return ImageFeatures(tiles, positions, (th, tw))


def pad_features(features: list[ImageFeatures], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The padded batch transformers produces: pixels (B, length, D) with 0s, positions (B, length, 2) with -1s."""
    length = length or max(f.num_soft_tokens for f in features)
    dim = features[0].pixel_values.shape[1]
    pixels = np.zeros((len(features), length, dim), np.float32)
    positions = np.full((len(features), length, 2), -1, np.int32)
    for i, f in enumerate(features):
        pixels[i, : f.num_soft_tokens] = f.pixel_values
        positions[i, : f.num_soft_tokens] = f.position_ids
    return pixels, positions
