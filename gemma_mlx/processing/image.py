"""Images to raw 48×48 tiles, as Gemma4UnifiedImageProcessor does (brief §4.1).

Pipeline: RGB conversion (``load_image``), an aspect-preserving resize so the image holds at most
``max_soft_tokens`` tiles (``aspect_ratio_preserving_size``; small images are scaled *up*), values × 1/255 with
no mean/std, then tiles of (patch_size × pooling_kernel_size)² pixels in raster order, each flattened as
(row y, column x, channel c), with positions (x = column, y = row). Nothing here hard-codes 48: the tile side is
derived from the model config's patch_size (16) and pooling_kernel_size (3).

Choices a user can see:

- Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over **white**, as
  transformers' ``convert_to_rgb`` does, so a transparent logo reads as dark-on-white, not on black.
- EXIF orientation is applied, so a phone photo is seen upright (as transformers' ``load_image`` does).
- Animated images (GIF, APNG, WebP) give their **first frame**; pass the file to ``load_video`` for motion.
- 16-bit images are scaled to 8 bits by value/257 (PIL's own ``convert("RGB")`` would clip them to white).
- Files above ``MAX_IMAGE_PIXELS`` are refused before their pixels are decoded (decompression bombs).
- Resizing uses PIL's antialiased bicubic; transformers uses torch's antialiased bicubic on uint8, which is
  designed to match PIL (same a = -0.5 kernel). Measured on the real test photos: at most 2/255 apart on any
  value, ≤ 0.14/255 on average (tests/test_processing_image.py); with no resize the tiles are bit-identical.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, MediaError
from .media import describe, read_bytes

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
# PIL's own hard limit (2 × its warning threshold, ≈ 13 377² pixels): larger than any camera photo, and past it
# PIL refuses to open the file anyway. Checked from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

# transformers rescales uint8 tensors with `image * (1/255)`, i.e. a float32 multiply by the rounded reciprocal;
# x / 255 differs from that in the last bit for 126 of the 256 levels, so the multiply is kept for bit parity.
_RESCALE = np.float32(1 / 255)


@dataclass
class ImageFeatures:
    """One preprocessed image (or video frame): its tiles, their grid positions and the resized size."""

    pixel_values: np.ndarray  # (N, tile*tile*3) float32 in [0, 1], tiles in raster order
    position_ids: np.ndarray  # (N, 2) int32: (x = column, y = row) in the tile grid
    num_soft_tokens: int  # N: the number of soft tokens the image takes in the prompt
    size: tuple[int, int]  # (height, width) after resizing, multiples of the tile side

    def __post_init__(self):
        if self.pixel_values.shape[0] != self.num_soft_tokens or self.position_ids.shape != (self.num_soft_tokens, 2):
            raise ValueError(f"ImageFeatures: {self.pixel_values.shape[0]} tiles, {self.position_ids.shape} positions, "
                             f"num_soft_tokens={self.num_soft_tokens}")


# -- loading ---------------------------------------------------------------------------------------------------


def load_image(src, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An upright RGB PIL image from a path, bytes, binary file object, PIL image, or HW/HWC array."""
    name = describe(src)
    if isinstance(src, Image.Image):
        image = src
        _check_size(image, name, max_pixels)  # a lazily opened image is not decoded yet: refuse bombs first
        try:
            image.load()  # a lazily opened PIL image may still hold a truncated file
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"corrupt or truncated image ({e})") from None
    elif isinstance(src, np.ndarray):
        image = _image_from_array(src)
    else:
        data = read_bytes(src)
        with warnings.catch_warnings():
            # PIL warns between its two thresholds; our own limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:
                raise MediaError(f"{name}: image is too large to decode safely ({e})") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise MediaError(f"{name}: not a readable image (unsupported format or corrupt file: {e})") from None
            _check_size(image, name, max_pixels)  # from the header, before decoding
            try:
                image.load()  # animated images: frame 0, the frame Image.open positions on
            except Image.DecompressionBombError as e:
                raise MediaError(f"{name}: image is too large to decode safely ({e})") from None
            except (OSError, SyntaxError, ValueError) as e:
                raise MediaError(f"{name}: corrupt or truncated image ({e})") from None
    _check_size(image, name, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not make an otherwise fine image unreadable
        pass
    return _to_rgb(image, name)


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise MediaError(f"{name}: image has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise MediaError(f"{name}: image is {w}×{h} = {w * h} pixels, more than the {max_pixels} allowed "
                         "(a decompression bomb or an absurd size); downscale it first")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer and float grey: PIL's convert("RGB") clips values > 255 to white; scale instead.
        arr = np.asarray(image, dtype=np.float64)
        if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F":
            arr = arr / 257.0  # the 16-bit range 0..65535 onto 0..255
        arr = np.nan_to_num(arr, nan=0.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"{name}: cannot convert an image in mode {mode} to RGB ({e})") from None


def _image_from_array(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        hint = " (channels first? pass HWC)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise MediaError(f"an image array must be HW or HWC with 1, 3 or 4 channels, got shape {a.shape}{hint}")
    if a.size == 0:
        raise MediaError(f"image array has no pixels (shape {a.shape})")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise MediaError("a float image array must hold finite values in [0, 1]")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise MediaError(f"an integer image array must hold values 0..255, got {a.min()}..{a.max()}")
        a = a.astype(np.uint8)
    else:
        raise MediaError(f"unsupported image array dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


# -- resize rule -----------------------------------------------------------------------------------------------


def check_budget(max_soft_tokens: int) -> None:
    """Raise InputError unless max_soft_tokens is one of the budgets the model was trained with."""
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise InputError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")


def aspect_ratio_preserving_size(height: int, width: int, max_soft_tokens: int, patch_size: int = 16,
                                 pooling_kernel_size: int = 3) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of the tile side, at most max_soft_tokens tiles.

    transformers' ``get_aspect_ratio_preserving_size`` with max_patches = max_soft_tokens · kernel². The image is
    scaled to fill the budget (up or down), each side floored to a tile multiple; a side that floors to 0 becomes
    one tile and the other ``min(floor(long/short), max_soft_tokens)`` tiles. Both sides flooring to 0 would need
    f²·H·W = max_soft_tokens·tile² < tile², so it cannot happen for a valid budget; it is still refused.
    """
    check_budget(max_soft_tokens)
    if patch_size < 1 or pooling_kernel_size < 1:
        raise InputError("patch_size and pooling_kernel_size must be positive, "
                         f"got {patch_size}, {pooling_kernel_size}")
    if height < 1 or width < 1:
        raise MediaError(f"cannot resize a {height}×{width} image: it has no pixels")
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
    if th * tw > target_px:  # mirrors the reference's own guard (floating-point safety)
        raise MediaError(f"resizing {height}×{width} to {th}×{tw} would exceed {max_soft_tokens} soft tokens")
    return th, tw


def num_image_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, patch_size: int = 16,
                     pooling_kernel_size: int = 3) -> int:
    """The number of soft tokens an image of this size takes (without loading it)."""
    th, tw = aspect_ratio_preserving_size(height, width, max_soft_tokens, patch_size, pooling_kernel_size)
    side = patch_size * pooling_kernel_size
    return (th // side) * (tw // side)


# -- tiles -----------------------------------------------------------------------------------------------------


def patchify(pixels: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles (N, tile·tile·C) in raster order, each flattened (y, x, c); positions (N, 2) int32 as (x, y))."""
    h, w, c = pixels.shape
    if h % tile or w % tile:
        raise ValueError(f"a {h}×{w} image is not a whole number of {tile}-pixel tiles")
    rows, cols = h // tile, w // tile
    tiles = pixels.reshape(rows, tile, cols, tile, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile * tile * c)
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
    return np.ascontiguousarray(tiles), np.stack([xs, ys], axis=-1).astype(np.int32)


def image_features(image: Image.Image, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, patch_size: int = 16,
                   pooling_kernel_size: int = 3, *, video_frame: bool = False) -> ImageFeatures:
    """ImageFeatures of an RGB PIL image (see preprocess_image); video_frame selects the video rescale."""
    th, tw = aspect_ratio_preserving_size(image.height, image.width, max_soft_tokens, patch_size,
                                          pooling_kernel_size)
    if (th, tw) != (image.height, image.width):  # like the reference, an image already at its size is untouched
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32)
    # Bit parity with transformers: the image processor multiplies by 1/255; the video processor "normalises"
    # with std 255 (its rescale is fused into normalize), which divides.
    pixels = pixels / np.float32(255) if video_frame else pixels * _RESCALE
    tiles, positions = patchify(pixels, patch_size * pooling_kernel_size)
    return ImageFeatures(tiles, positions, tiles.shape[0], (th, tw))


def preprocess_image(image, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, patch_size: int = 16,
                     pooling_kernel_size: int = 3) -> ImageFeatures:
    """ImageFeatures of one image (any source load_image takes) at the given soft-token budget."""
    check_budget(max_soft_tokens)
    return image_features(load_image(image), max_soft_tokens, patch_size, pooling_kernel_size)


def pad_image_features(features: list[ImageFeatures], max_soft_tokens: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (B, L, D) float32 padded with 0, position_ids (B, L, 2) int32 padded with -1).

    L = max_soft_tokens gives transformers' layout (every image padded to the budget); None pads only to the
    longest image, which the model reads the same way (padding rows are dropped by their (-1, -1) position).
    """
    features = list(features)
    if not features:
        raise InputError("pad_image_features needs at least one image")
    longest = max(f.num_soft_tokens for f in features)
    length = longest if max_soft_tokens is None else max_soft_tokens
    if longest > length:
        raise InputError(f"an image has {longest} soft tokens, more than the padded length {length}")
    dims = {f.pixel_values.shape[1] for f in features}
    if len(dims) != 1:
        raise InputError(f"images of different tile sizes cannot share a batch: {sorted(dims)}")
    pixels = np.zeros((len(features), length, dims.pop()), np.float32)
    positions = np.full((len(features), length, 2), -1, np.int32)
    for i, f in enumerate(features):
        pixels[i, : f.num_soft_tokens] = f.pixel_values
        positions[i, : f.num_soft_tokens] = f.position_ids
    return pixels, positions
