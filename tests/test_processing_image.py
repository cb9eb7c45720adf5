"""Image preprocessing against transformers 5.23's own code, on the real fixture photos (brief §4.1, traps 12-14).

transformers' Gemma4UnifiedImageProcessor imports torchvision at module level, which cannot be installed beside
this torch build. What it computes is still reachable without it:

- the resize rule is importable from ``processing_gemma4_unified`` (the processor module needs no torchvision);
- its tiling (``convert_image_to_patches`` + ``patches_merge``) and padding are pure torch functions, compiled
  here straight from the installed source file;
- the Gemma 4 (non-unified) *PIL* image processor runs the same resize rule end to end with PIL, so its output
  merged 3×3 is transformers' result with PIL resampling;
- torchvision's resize of a uint8 CPU tensor is ``torch.nn.functional.interpolate(..., "bicubic",
  antialias=True)`` on the uint8 tensor itself (torchvision/transforms/v2/functional/_geometry.py,
  ``resize_image``: native uint8 path for BICUBIC on CPU), so that call is the reference resize.
"""

from __future__ import annotations

import ast
import io
import math
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES
from gemma_mlx.errors import InputError, MediaError
from gemma_mlx.processing.image import (
    SUPPORTED_SOFT_TOKENS,
    ImageFeatures,
    aspect_ratio_preserving_size,
    image_features,
    load_image,
    num_image_tokens,
    pad_image_features,
    preprocess_image,
)

MEDIA = FIXTURES / "media"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")


def reference_functions(module_file: str, names: set[str]) -> types.SimpleNamespace:
    """Top-level functions of a transformers gemma4_unified source file, compiled without its imports."""
    import transformers

    path = Path(transformers.__file__).parent / "models" / "gemma4_unified" / module_file
    tree = ast.parse(path.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {f.name for f in funcs} == names, f"{module_file} no longer defines {names}"
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


@pytest.fixture(scope="module")
def hf():
    return reference_functions("image_processing_gemma4_unified.py",
                               {"convert_image_to_patches", "patches_merge", "pad_along_first_dim"})


def hf_tiles(pixels_chw: torch.Tensor, hf, patch_size=16, kernel=3):
    """transformers' _preprocess steps 3-5 on an already resized, rescaled (C, H, W) image."""
    teacher = hf.convert_image_to_patches(pixels_chw, patch_size)
    ph, pw = pixels_chw.shape[1] // patch_size, pixels_chw.shape[2] // patch_size
    grid = torch.meshgrid(torch.arange(pw), torch.arange(ph), indexing="xy")
    positions = torch.stack(grid, dim=-1).reshape(teacher.shape[0], 2)
    merged, merged_pos = hf.patches_merge(teacher[None], positions[None], teacher.shape[0] // kernel**2)
    return merged[0], merged_pos[0]


def photo(name: str) -> Image.Image:
    return Image.open(MEDIA / name).convert("RGB")


# -- resize rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, budget, expected, tokens", [
    ((1024, 768), 280, (912, 672), 266), ((1080, 1920), 280, (576, 1056), 264), ((4000, 100), 280, (5040, 96), 210),
    ((64, 64), 280, (768, 768), 256), ((1000, 1000), 280, (768, 768), 256), ((2048, 2048), 280, (768, 768), 256),
    ((1080, 1920), 1120, (1200, 2112), 1100), ((1080, 1920), 70, (288, 528), 66),
])
def test_resize_rule_brief_examples(size, budget, expected, tokens):
    assert aspect_ratio_preserving_size(*size, budget) == expected
    assert num_image_tokens(*size, budget) == tokens


def test_resize_rule_equals_transformers_over_a_sweep():
    from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

    rng = np.random.RandomState(0)
    sizes = [tuple(map(int, s)) for s in rng.randint(1, 6000, size=(300, 2))]
    sizes += [tuple(map(int, s)) for s in np.exp(rng.uniform(0, np.log(20000), size=(200, 2))).astype(int) + 1]
    sizes += [(1, 1), (1, 5000), (5000, 1), (47, 47), (48, 48), (1, 100000), (3, 40000), (768, 768), (912, 672)]
    for budget in SUPPORTED_SOFT_TOKENS:
        for h, w in sizes:
            want = get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
            got = aspect_ratio_preserving_size(h, w, budget)
            assert got == want, (h, w, budget)
            assert got[0] % 48 == 0 and got[1] % 48 == 0 and num_image_tokens(h, w, budget) <= budget
    # Nothing hard-codes 16 × 3: other patch/kernel sizes follow the same rule.
    for patch, kernel in ((14, 2), (16, 4), (8, 3)):
        for h, w in sizes[:60]:
            assert aspect_ratio_preserving_size(h, w, 280, patch, kernel) == \
                get_aspect_ratio_preserving_size(h, w, patch, 280 * kernel**2, kernel), (h, w, patch, kernel)


def test_resize_rule_edges():
    from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

    # A side floors to 0 exactly when the aspect ratio exceeds the budget (f·H < 48 ⟺ W/H > max_soft_tokens);
    # it becomes one tile and the other min(floor(W/H), budget) = budget tiles.
    assert aspect_ratio_preserving_size(1, 5000, 280) == (48, 280 * 48)
    assert aspect_ratio_preserving_size(5000, 1, 70) == (70 * 48, 48)
    assert aspect_ratio_preserving_size(10, 2810, 280) == (48, 280 * 48)
    assert aspect_ratio_preserving_size(10, 2790, 280) == (48, 279 * 48)  # ratio 279: no side floors to 0
    # Both sides flooring to 0 needs f²·H·W = budget·48² < 48²: impossible for any valid budget. The reference
    # raises for it (max_patches 0); ours refuses such a budget before getting there.
    with pytest.raises(ValueError, match="0 x 0"):
        get_aspect_ratio_preserving_size(5, 5, 16, 0, 3)
    for bad in (0, 300, 279, -70, 2240):
        with pytest.raises(InputError, match=r"one of \(70, 140, 280, 560, 1120\)"):
            aspect_ratio_preserving_size(100, 100, bad)
        with pytest.raises(InputError, match="one of"):
            preprocess_image(np.zeros((8, 8, 3), np.uint8), bad)
    for h, w in ((0, 10), (10, 0), (-5, 10)):
        with pytest.raises(MediaError, match="no pixels"):
            aspect_ratio_preserving_size(h, w, 280)


# -- tiles -----------------------------------------------------------------------------------------------------


def test_tiles_positions_and_padding_equal_transformers_without_resize(hf):
    """An image already at its target size is not resized by either side, so everything must be bit-identical:
    values (uint8 × float32(1/255), as TorchvisionBackend.rescale computes on a uint8 tensor), tile order and
    flattening (y, x, c), positions (x = column, y = row) and the padded batch layout."""
    images = [photo("chelsea.png").resize((672, 912)), photo("coffee.png").resize((960, 624)),
              photo("astronaut.png").resize((384, 384))]
    budgets = [280, 280, 70]
    ours = [preprocess_image(im, b) for im, b in zip(images, budgets)]
    for im, f, b in zip(images, ours, budgets):
        assert f.size == (im.height, im.width)  # fixed points of the rule: no resize
        chw = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
        ref_px, ref_pos = hf_tiles(chw * (1 / 255), hf)
        assert f.pixel_values.dtype == np.float32 and f.position_ids.dtype == np.int32
        assert np.array_equal(f.pixel_values, ref_px.numpy())
        assert np.array_equal(f.position_ids, ref_pos.numpy())
        # The documented flattening, written out: tile (x, y) holds rows 48y.., columns 48x.., index (r·48+c)·3+ch.
        k = 7
        x, y = f.position_ids[k]
        block = np.asarray(im)[48 * y: 48 * y + 48, 48 * x: 48 * x + 48] * np.float32(1 / 255)
        assert np.array_equal(f.pixel_values[k], block.reshape(-1))
        assert f.num_soft_tokens == (im.height // 48) * (im.width // 48) <= b
    # Batch layout: each image padded to the budget with pixel 0 and position (-1, -1).
    px, pos = pad_image_features(ours[:2], 280)
    for i, (im, f) in enumerate(zip(images[:2], ours[:2])):
        chw = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
        ref_px, ref_pos = hf.pad_along_first_dim(*hf_tiles(chw * (1 / 255), hf), 280)
        assert np.array_equal(px[i], ref_px.numpy()) and np.array_equal(pos[i], ref_pos.numpy())
    assert px.shape == (2, 280, 6912) and pos.shape == (2, 280, 2)
    assert (pos[0, ours[0].num_soft_tokens:] == -1).all() and (px[0, ours[0].num_soft_tokens:] == 0).all()
    compact_px, compact_pos = pad_image_features(ours)  # only to the longest: the model drops padding rows anyway
    assert compact_px.shape == (3, 266, 6912) and (compact_pos[2, 64:] == -1).all()
    with pytest.raises(InputError, match="more than the padded length 70"):
        pad_image_features(ours, 70)


def test_whole_pipeline_equals_transformers_pil_backend(hf):
    """transformers' Gemma 4 PIL image processor (same rule, PIL bicubic resize) merged 3×3 with the unified
    patches_merge is transformers' unified output with PIL resampling: the resized pixels must be identical and
    the values equal up to its float64 rescale (≤ 1 ulp of float32)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    for name in PHOTOS:
        image = photo(name)
        for budget in (70, 280, 1120):
            ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(image, return_tensors="np")
            n = int(ref["num_soft_tokens_per_image"][0])
            teacher = torch.from_numpy(ref["pixel_values"][0, : n * 9])
            positions = torch.from_numpy(ref["image_position_ids"][0, : n * 9])
            merged, merged_pos = hf.patches_merge(teacher[None], positions[None], n)
            ours = preprocess_image(MEDIA / name, budget)
            assert ours.num_soft_tokens == n
            assert np.array_equal(ours.position_ids, merged_pos[0].numpy())
            theirs = merged[0].numpy()
            assert np.array_equal(np.rint(ours.pixel_values * 255), np.rint(theirs * 255)), (name, budget)
            assert np.abs(ours.pixel_values - theirs).max() <= 6e-8


def test_pil_resize_vs_torchvision_resize_bounded():
    """What transformers computes (torchvision: torch's antialiased bicubic on the uint8 tensor) against our PIL
    resize, on the real photos at three budgets. Both use the a = -0.5 antialiased cubic kernel (torch adopted
    PIL's for antialias=True); they differ only in fixed-point rounding. Measured: max |Δ| = 2 levels of 255,
    mean ≤ 0.14 levels (≤ 14% of values off by one, on chelsea's near-1× downscale; ≤ 0.6% elsewhere), i.e.
    ≤ 0.0078 on the model's [0, 1] scale. Bound asserted: max ≤ 2, mean ≤ 0.2 levels."""
    for name in PHOTOS:
        image = photo(name)
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()[None]
        for budget in (70, 280, 1120):
            th, tw = aspect_ratio_preserving_size(image.height, image.width, budget)
            theirs = torch.nn.functional.interpolate(chw, size=(th, tw), mode="bicubic", antialias=True,
                                                     align_corners=False)[0].permute(1, 2, 0).numpy()
            ours = preprocess_image(image, budget)
            ref_tiles = image_features(Image.fromarray(theirs), budget)  # tiles of their pixels, no resize
            diff = np.abs(ours.pixel_values - ref_tiles.pixel_values) * 255
            assert diff.max() <= 2 + 1e-4 and diff.mean() <= 0.2, (name, budget, diff.max(), diff.mean())


def test_real_photos_sizes_and_token_counts():
    expected = {  # (H, W) of the original -> size and tokens at 70 / 280 / 1120
        "astronaut.png": [((384, 384), 64), ((768, 768), 256), ((1584, 1584), 1089)],
        "chelsea.png": [((288, 480), 60), ((624, 960), 260), ((1296, 1968), 1107)],
        "coffee.png": [((288, 480), 60), ((624, 960), 260), ((1296, 1920), 1080)],
    }
    for name, rows in expected.items():
        for budget, (size, tokens) in zip((70, 280, 1120), rows):
            f = preprocess_image(MEDIA / name, budget)
            assert (f.size, f.num_soft_tokens) == (size, tokens), (name, budget)
            assert f.pixel_values.shape == (tokens, 6912) and f.position_ids.shape == (tokens, 2)
            assert 0.0 <= f.pixel_values.min() and f.pixel_values.max() <= 1.0
            rows_, cols = size[0] // 48, size[1] // 48
            assert f.position_ids[:, 0].max() == cols - 1 and f.position_ids[:, 1].max() == rows_ - 1
            assert f.position_ids[cols].tolist() == [0, 1]  # raster order: the second row starts after `cols` tiles
    small = preprocess_image(np.full((64, 64, 3), 200, np.uint8))  # upscaled to the budget (trap 14)
    assert small.size == (768, 768) and np.allclose(small.pixel_values, 200 / 255)
    with pytest.raises(ValueError):
        ImageFeatures(small.pixel_values, small.position_ids, 3, small.size)


# -- loading ---------------------------------------------------------------------------------------------------


def test_every_source_kind_gives_the_same_image(tmp_path):
    path = MEDIA / "chelsea.png"
    want = np.asarray(photo("chelsea.png"))
    rgba = np.dstack([want, np.full(want.shape[:2], 255, np.uint8)])
    sources = [path, str(path), path.read_bytes(), bytearray(path.read_bytes()), open(path, "rb"),
               io.BytesIO(path.read_bytes()), Image.open(path), want, want.astype(np.float32) / 255, rgba,
               want.astype(np.int64)]
    for src in sources:
        image = load_image(src)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), want), type(src)
    gray = want[..., 0]
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(gray[..., None])), np.asarray(load_image(gray)))


def test_modes_equal_transformers_convert_to_rgb():
    """Transparency over white, palettes, grey, CMYK: the same RGB as transformers' convert_to_rgb (PIL path)."""
    from transformers.image_transforms import convert_to_rgb

    base = photo("chelsea.png")
    alpha = Image.linear_gradient("L").resize(base.size)  # 0 (transparent) at the top to 255 at the bottom
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    keyed = base.convert("P")  # palette image whose colour 0 is transparent (GIF-style)
    keyed.info["transparency"] = 0
    images = {"RGBA": rgba, "LA": la, "PA": rgba.convert("PA"), "P": base.convert("P"), "P+transparency": keyed,
              "L": base.convert("L"), "1": base.convert("1"), "CMYK": base.convert("CMYK"),
              "YCbCr": base.convert("YCbCr"), "RGB": base}
    for name, image in images.items():
        ours = np.asarray(load_image(image))
        theirs = convert_to_rgb(image, return_numpy=True)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), name
    top = np.asarray(load_image(rgba))[0]
    assert (top == 255).all()  # fully transparent row -> white, not the cat and not black
    bottom = np.asarray(load_image(rgba))[-1].astype(int)
    assert np.abs(bottom - np.asarray(base)[-1]).max() <= 1  # opaque row unchanged
    # Premultiplied alpha ("RGBa") is composited too (convert_to_rgb looks for "A" only and gives black there);
    # it differs from straight RGBA only by the premultiplied rounding.
    premultiplied = np.asarray(load_image(rgba.convert("RGBa"))).astype(int)
    assert (premultiplied[0] == 255).all()
    assert np.abs(premultiplied - np.asarray(load_image(rgba)).astype(int)).mean() < 0.5


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray8 = np.asarray(photo("coffee.png").convert("L"))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # a real 16-bit PNG
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(np.asarray(load_image(path))[..., 0], gray8)
    assert np.array_equal(np.asarray(load_image(gray8.astype(np.uint16) * 257))[..., 0], gray8)
    floats = Image.fromarray(gray8.astype(np.float32) / 255)  # mode F in [0, 1]
    assert np.array_equal(np.asarray(load_image(floats))[..., 0], gray8)


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation, transpose):
    image = photo("chelsea.png")
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif, quality=95)
    stored = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # the pixels as stored, not yet upright
    upright = load_image(buf.getvalue())
    assert np.array_equal(np.asarray(upright), np.asarray(stored.transpose(transpose)))
    assert upright.size == (stored.size[::-1] if orientation in (6, 8) else stored.size)


def test_animated_images_give_their_first_frame(tmp_path):
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220)]
    frames = [Image.new("RGB", (64, 48), c) for c in colours]
    for ext in ("gif", "png", "webp"):
        path = tmp_path / f"anim.{ext}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert getattr(Image.open(path), "n_frames", 1) == 3
        first = np.asarray(load_image(path)).reshape(-1, 3).mean(axis=0)
        assert np.abs(first - colours[0]).max() < 8, (ext, first)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR claims width × height (CRC fixed), as a decompression bomb would."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (tmp_path / "truncated.png").write_bytes((MEDIA / "chelsea.png").read_bytes()[:60_000])
    (tmp_path / "bomb.png").write_bytes(_png_with_header_size(100_000, 100_000))
    (tmp_path / "folder.png").mkdir()
    cases = {"empty.png": "empty", "junk.png": "not a readable image", "vector.svg": "not a readable image",
             "truncated.png": "corrupt or truncated", "bomb.png": "too large", "missing.png": "no such file",
             "folder.png": "not a regular file"}
    for name, message in cases.items():
        with pytest.raises(MediaError, match=message) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)  # the error names the file
    with pytest.raises(MediaError, match="more than the 10000 allowed"):
        load_image(MEDIA / "astronaut.png", max_pixels=10_000)
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="no pixels"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(MediaError, match="channels first"):
        load_image(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(MediaError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0))
    with pytest.raises(MediaError, match="0..255"):
        load_image(np.full((4, 4, 3), 300))
    with pytest.raises(MediaError, match="cannot read media from a int"):
        load_image(42)
