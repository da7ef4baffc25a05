"""Concept image loading and the cached VAE latent moments."""
import struct
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spacetime_jax.data import latents
from spacetime_jax.data.images import (ImageError, find_image_files, hflip, load_concept_images,
                                       load_image, read_upright, to_rgb)
from spacetime_jax.data.latents import (LatentMoments, concept_latent_cache, encode_moments,
                                        sample_latents)
from spacetime_jax.errors import UserError
from spacetime_jax.models.pretrained import load_vae
from spacetime_jax.tools.make_tiny_model import make_tiny_model

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (survives lossy codecs) that differs per seed."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 / (width - 1), y * 255 / (height - 1),
                (x + y + 40 * seed) % 256]
    return np.stack(channels, -1).round().astype(np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _color_block(width: int, height: int, color) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (height, width, 3)).copy()


# ---------------------------------------------------------------------------------------
# Single images.

@pytest.mark.parametrize("suffix,kwargs,atol", [
    (".png", {}, 0), (".bmp", {}, 0), (".webp", {"lossless": True}, 0),
    (".jpg", {"quality": 95}, 8), (".JPEG", {"quality": 95, "format": "JPEG"}, 8),
    (".webp", {"quality": 95}, 12)])
def test_formats_load_as_their_pixels(tmp_path, suffix, kwargs, atol):
    pixels = _gradient(32, 32)
    loaded = load_image(_save(pixels, tmp_path / f"img{suffix}", **kwargs), 32)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8
    assert np.abs(loaded.astype(int) - pixels).max() <= atol


def test_exif_orientation_6_is_rotated_upright(tmp_path):
    # Stored 32 wide x 16 high: left half red, right half blue. Orientation 6 says "rotate
    # 90 degrees clockwise to display": upright it is 16 x 32, red on top, blue below.
    stored = np.concatenate([_color_block(16, 16, RED), _color_block(16, 16, BLUE)], axis=1)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = _save(stored, tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    upright = load_image(path, 16)
    # Pixels where the two readings disagree: unrotated, (2, 13) is blue and (13, 2) red.
    assert np.abs(upright[2, 13].astype(int) - RED).max() <= 10
    assert np.abs(upright[13, 2].astype(int) - BLUE).max() <= 10


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0] = (10, 20, 30, 0)      # fully transparent: its stored colour must not show
    rgba[1] = (200, 0, 0, 255)     # opaque: kept
    rgba[2] = (0, 0, 0, 128)       # half transparent black over white: mid grey
    rgba[3] = (0, 0, 255, 255)
    loaded = load_image(_save(rgba, tmp_path / "cutout.png"), 4)  # same size: no resampling
    np.testing.assert_array_equal(loaded[0], np.full((4, 3), 255))
    np.testing.assert_array_equal(loaded[1], np.tile([200, 0, 0], (4, 1)))
    assert np.abs(loaded[2].astype(int) - 127).max() <= 1
    np.testing.assert_array_equal(loaded[3], np.tile(BLUE, (4, 1)))


def test_gray_with_alpha_is_composited_onto_white(tmp_path):
    la = Image.new("LA", (4, 4), (50, 0))
    la.putpixel((0, 0), (50, 255))
    loaded = load_image(_save(np.asarray(la), tmp_path / "la.png"), 4)
    np.testing.assert_array_equal(loaded[0, 0], [50, 50, 50])
    np.testing.assert_array_equal(loaded[1, 1], WHITE)


def test_grayscale_becomes_equal_rgb_channels(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    loaded = load_image(_save(gray, tmp_path / "gray.png"), 4)
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=-1))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # PIL's own convert("RGB") maps every 16-bit value above 255 to white.
    values = np.array([[0, 257 * 128], [65535, 257 * 40]], np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    loaded = load_image(path, 2)
    np.testing.assert_array_equal(loaded[..., 0], [[0, 128], [255, 40]])
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (32, 16), (0, 0, 0, 0))         # no ink: white
    cmyk.paste((255, 0, 0, 0), (16, 0, 32, 16))              # cyan ink: (0, 255, 255)
    path = tmp_path / "print.jpg"
    cmyk.save(path, quality=95)
    loaded = load_image(path, 16)
    assert np.abs(loaded[8, 2].astype(int) - WHITE).max() <= 8
    assert np.abs(loaded[8, 13].astype(int) - (0, 255, 255)).max() <= 8


def test_palette_images_use_their_colours_and_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # 0: red, 1: green
    palette.putpixel((3, 3), 1)
    palette.save(tmp_path / "palette.png")
    loaded = load_image(tmp_path / "palette.png", 4)
    np.testing.assert_array_equal(loaded[0, 0], RED)
    np.testing.assert_array_equal(loaded[3, 3], GREEN)
    # Palette index 0 marked transparent: those pixels go to white, index 1 stays green.
    palette.save(tmp_path / "palette_alpha.png", transparency=0)
    with_alpha = load_image(tmp_path / "palette_alpha.png", 4)
    np.testing.assert_array_equal(with_alpha[0, 0], WHITE)
    np.testing.assert_array_equal(with_alpha[3, 3], GREEN)


def test_non_square_is_resized_whole_not_cropped(tmp_path):
    # 40 x 20: red | green | blue in bands of 10, 20, 10 columns. A centre crop would lose
    # the red and blue bands; a plain resize keeps them at the edges.
    wide = np.concatenate([_color_block(10, 20, RED), _color_block(20, 20, GREEN),
                           _color_block(10, 20, BLUE)], axis=1)
    loaded = load_image(_save(wide, tmp_path / "wide.png"), 16)
    assert loaded.shape == (16, 16, 3)
    np.testing.assert_array_equal(loaded[8, 1], RED)
    np.testing.assert_array_equal(loaded[8, 8], GREEN)
    np.testing.assert_array_equal(loaded[8, 14], BLUE)


def test_bicubic_resize_matches_pil(tmp_path):
    pixels = _gradient(48, 24)
    expected = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(load_image(_save(pixels, tmp_path / "g.png"), 16), expected)


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)
    whole = _save(noise, tmp_path / "whole.jpg", quality=90).read_bytes()
    (tmp_path / "cat").mkdir()
    cut = tmp_path / "cat" / "3.jpg"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ImageError, match=r"cannot read image .*cat/3\.jpg: truncated"):
        load_image(cut, 64)


def test_text_file_named_png_is_an_error_naming_it(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all\n")
    with pytest.raises(UserError, match=r"cannot read image .*notes\.png"):
        load_image(fake, 16)


def _png(rows: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit colour): rows (H, W[, C]) of samples."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    height, width = rows.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + row.astype(dtype).tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_sixteen_bit_rgb_png_keeps_its_colours(tmp_path):
    samples = np.array([[[0, 32768, 65535], [2570, 51400, 300]]], np.uint16)  # 1 x 2 RGB
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(samples, color_type=2))
    pixels = np.asarray(to_rgb(read_upright(path)), int)
    assert np.abs(pixels - samples / 257).max() <= 1  # 65535 -> 255, not clipped to white


def test_sixteen_bit_rgba_png_is_composited_onto_white(tmp_path):
    samples = np.array([[[65535, 0, 0, 65535], [0, 0, 65535, 0]]], np.uint16)
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png(samples, color_type=6))
    loaded = load_image(path, 2)[0]  # 2 x 1 -> 2 x 2: rows repeated
    assert np.abs(loaded[0].astype(int) - RED).max() <= 1
    np.testing.assert_array_equal(loaded[1], WHITE)  # fully transparent blue: the background


def test_png_named_jpg_is_read_by_its_content(tmp_path):
    pixels = _gradient(16, 16)
    path = tmp_path / "actually_a_png.jpg"
    Image.fromarray(pixels).save(path, format="PNG")
    np.testing.assert_array_equal(load_image(path, 16), pixels)  # lossless: no JPEG decode


@pytest.mark.parametrize("frames_format", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(tmp_path, frames_format):
    frames = [Image.fromarray(_color_block(8, 8, color)) for color in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{frames_format.lower()}"
    frames[0].save(path, format=frames_format, save_all=True, append_images=frames[1:],
                   **({"lossless": True} if frames_format == "WEBP" else {}))
    with Image.open(path) as img:
        assert img.n_frames == 3
    np.testing.assert_array_equal(load_image(path, 8), _color_block(8, 8, RED))


# Stored 2 wide x 3 high, values 0..5 row by row; each EXIF orientation as a viewer shows it
# (EXIF 2.3: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 cw, 7 transverse,
# 8 rotate 90 ccw).
STORED = np.arange(6).reshape(3, 2)
UPRIGHT = {1: STORED, 2: STORED[:, ::-1], 3: STORED[::-1, ::-1], 4: STORED[::-1],
           5: STORED.T, 6: np.rot90(STORED, -1), 7: np.rot90(STORED)[:, ::-1],
           8: np.rot90(STORED)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_upright(tmp_path, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray((STORED * 40).astype(np.uint8)).save(path, exif=exif.tobytes())
    shown = np.asarray(read_upright(path)) // 40
    np.testing.assert_array_equal(shown, UPRIGHT[orientation])


def test_unreadable_exif_is_shown_as_stored(tmp_path, caplog):
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(_gradient(16, 8)).save(path, quality=95, exif=b"Exif\0\0MM\0*garbage")
    assert load_image(path, 8).shape == (8, 8, 3)
    assert read_upright(path).size == (16, 8)
    # PIL's warning names no file; it is logged with the file's name.
    assert "bad_exif.jpg: Corrupt EXIF data" in caplog.text


def test_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^cannot read image .*zero\.png: the file is empty "
                                         r"\(0 bytes\)$"):
        load_image(tmp_path / "zero.png", 8)


def test_truncated_png_is_an_error_naming_it(tmp_path):
    whole = _save(_gradient(64, 64), tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(ImageError, match=r"^cannot read image .*cut\.png: truncated"):
        load_image(tmp_path / "cut.png", 8)


@pytest.mark.parametrize("name,content", [
    ("tiff.png", b"II*\0\x08\0\0\0" + b"\0" * 32),
    # PIL's EPS decoder would start Ghostscript; it is never tried.
    ("postscript.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")])
def test_formats_outside_the_list_are_refused_by_content(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=rf"^cannot read image .*{name}: not a PNG, JPEG, WebP, "
                                         r"GIF or BMP image"):
        load_image(tmp_path / name, 8)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ImageError, match=r"cannot read image .*gone\.png: no such file"):
        load_image(tmp_path / "gone.png", 8)


def test_hflip_reverses_columns_only():
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    flipped = hflip(images)
    np.testing.assert_array_equal(flipped[:, :, 0], images[:, :, 3])
    np.testing.assert_array_equal(flipped[:, 1, :, 2], images[:, 1, ::-1, 2])
    np.testing.assert_array_equal(hflip(flipped), images)


# ---------------------------------------------------------------------------------------
# Folders.

def _concept_folder(folder: Path, names=("b.png", "a.jpg", "c.webp")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        kwargs = {"lossless": True} if name.endswith(".webp") else {}
        _save(_gradient(24, 16, seed), folder / name, **kwargs)
    return folder


def test_folder_loads_in_sorted_order_every_time(tmp_path):
    folder = _concept_folder(tmp_path / "cat")
    images, paths = load_concept_images(folder, 16)
    assert [p.name for p in paths] == ["a.jpg", "b.png", "c.webp"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[1], load_image(folder / "b.png", 16))
    again, _ = load_concept_images(folder, 16)
    np.testing.assert_array_equal(images, again)


def test_folder_skips_hidden_files_and_reports_other_non_images(tmp_path):
    folder = _concept_folder(tmp_path / "cat", names=("a.png", "B.JPG"))
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    (folder / "._a.png").write_bytes(b"macOS resource fork, not an image")
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    listing = find_image_files(folder)
    assert [p.name for p in listing.paths] == ["B.JPG", "a.png"]
    assert listing.ignored == ["notes.txt", "sub"]
    images, _ = load_concept_images(folder, 8)
    assert images.shape == (2, 8, 8, 3)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ImageError, match=r"image folder .*nowhere does not exist"):
        load_concept_images(tmp_path / "nowhere", 16)


def test_file_instead_of_folder_is_an_error(tmp_path):
    path = _save(_gradient(8, 8), tmp_path / "one.png")
    with pytest.raises(ImageError, match=r"one\.png is not a folder"):
        load_concept_images(path, 16)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"no images \(\.jpg, \.jpeg, \.png, \.webp, \.bmp, "
                                         r"\.gif\) in .*empty$"):
        load_concept_images(tmp_path / "empty", 16)


def test_folder_without_images_names_what_it_holds(tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "cat.tiff").write_bytes(b"II*\0")
    (folder / "readme.txt").write_text("x")
    (folder / ".DS_Store").write_text("x")
    with pytest.raises(ImageError, match=r"no images .* in .*wrong; it holds only: cat\.tiff, "
                                         r"readme\.txt$"):
        load_concept_images(folder, 16)


def test_one_bad_image_stops_the_whole_folder(tmp_path):
    folder = _concept_folder(tmp_path / "cat")
    (folder / "d.png").write_text("oops")
    (folder / "e.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ImageError, match=r"cannot read image .*cat/d\.png: .*; also unreadable: "
                                         r"e\.jpg$"):
        load_concept_images(folder, 16)


# ---------------------------------------------------------------------------------------
# Latent moments.

RESOLUTION = 32  # the tiny VAE downsamples 8x: 4 x 4 latents


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd1", vision=False)
    return load_vae(folder / "vae")


@pytest.fixture()
def concept_images(tmp_path):
    images, _ = load_concept_images(_concept_folder(tmp_path / "cat"), RESOLUTION)
    return images


def test_encode_moments_match_the_vae_on_scaled_pixels(tiny_vae, concept_images):
    vae, params, config = tiny_vae
    mean, logvar = encode_moments(vae, params, concept_images, batch_size=2)  # 2 + padded 1
    assert mean.shape == logvar.shape == (3, 4, 4, config.latent_channels)
    assert mean.dtype == logvar.dtype == np.float32
    pixels = jnp.asarray(concept_images, jnp.float32) / 127.5 - 1.0
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    ref_mean, ref_logvar = encode(params, pixels)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-5)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-5)


def test_resolution_not_divisible_by_the_vae_factor_is_an_error(tiny_vae):
    vae, params, _ = tiny_vae
    with pytest.raises(UserError, match="not a multiple of 8"):
        encode_moments(vae, params, np.zeros((1, 36, 36, 3), np.uint8))


def _counting_encoder(monkeypatch) -> list:
    calls = []
    real = latents.encode_moments

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_moments", counted)
    return calls


def test_cache_holds_images_then_flips(tiny_vae, concept_images, tmp_path):
    vae, params, config = tiny_vae
    moments = concept_latent_cache(tmp_path / "run", vae, params, concept_images, "tiny")
    n = len(concept_images)
    assert moments.mean.shape == moments.logvar.shape == (2 * n, 4, 4, config.latent_channels)
    # Encoded apart in batches of 2: the cache's single batch of 6 must agree row by row.
    mean, logvar = encode_moments(vae, params, concept_images, batch_size=2)
    flip_mean, flip_logvar = encode_moments(vae, params, hflip(concept_images), batch_size=2)
    np.testing.assert_allclose(moments.mean[:n], mean, atol=1e-5)
    np.testing.assert_allclose(moments.logvar[:n], logvar, atol=1e-5)
    np.testing.assert_allclose(moments.mean[n:], flip_mean, atol=1e-5)
    np.testing.assert_allclose(moments.logvar[n:], flip_logvar, atol=1e-5)
    # Flipped images really give other latents (the VAE is not mirror-symmetric).
    assert np.abs(moments.mean[n:] - moments.mean[:n]).max() > 1e-3
    assert (tmp_path / "run" / "latent_moments.npz").is_file()


def test_cache_is_reused_and_recomputed_when_inputs_change(tiny_vae, concept_images, tmp_path,
                                                           monkeypatch):
    vae, params, _ = tiny_vae
    calls = _counting_encoder(monkeypatch)
    first = concept_latent_cache(tmp_path, vae, params, concept_images, "tiny")
    assert calls == [6]  # 3 images + 3 flips, encoded once
    second = concept_latent_cache(tmp_path, vae, params, concept_images, "tiny")
    assert calls == [6]  # read from the file
    np.testing.assert_array_equal(second.mean, first.mean)
    np.testing.assert_array_equal(second.logvar, first.logvar)

    changed = concept_images.copy()
    changed[1, 5, 5, 0] ^= 1  # one bit of one pixel
    third = concept_latent_cache(tmp_path, vae, params, changed, "tiny")
    assert calls == [6, 6]
    assert np.abs(third.mean[1] - first.mean[1]).max() > 0
    np.testing.assert_array_equal(third.mean[0], first.mean[0])

    concept_latent_cache(tmp_path, vae, params, changed, "another/model")
    assert calls == [6, 6, 6]
    concept_latent_cache(tmp_path, vae, params, changed, "another/model")
    assert calls == [6, 6, 6]

    # The same model id with other weights (a folder retrained in place) is recomputed.
    retrained = jax.tree.map(lambda x: x * 1.01, params)
    concept_latent_cache(tmp_path, vae, retrained, changed, "another/model")
    assert calls == [6, 6, 6, 6]


def test_corrupt_cache_file_is_recomputed(tiny_vae, concept_images, tmp_path, monkeypatch):
    vae, params, _ = tiny_vae
    (tmp_path / "latent_moments.npz").write_bytes(b"PK\3\4 half a zip")
    calls = _counting_encoder(monkeypatch)
    moments = concept_latent_cache(tmp_path, vae, params, concept_images, "tiny")
    assert calls == [6] and moments.mean.shape[0] == 6
    concept_latent_cache(tmp_path, vae, params, concept_images, "tiny")
    assert calls == [6]


# One compiled sampler and one set of shapes for the sampling tests: compiling the threefry
# normal draw costs seconds on a busy CPU. Indices, moments and key are traced, as in a step.
_sample = jax.jit(sample_latents)
_DRAW_ROWS = jnp.asarray([0, 1] * 2048)


def _two_row_moments(mean0, var0, mean1, var1) -> LatentMoments:
    mean = np.stack([np.full((4, 4, 4), mean0), np.full((4, 4, 4), mean1)])
    logvar = np.log(np.stack([np.full((4, 4, 4), var0), np.full((4, 4, 4), var1)]))
    return LatentMoments(mean.astype(np.float32), logvar.astype(np.float32))


def test_sample_latents_has_the_moments_statistics():
    moments = _two_row_moments(2.0, 0.25, -1.0, 4.0)
    drawn = np.asarray(_sample(jax.random.key(0), moments, _DRAW_ROWS, 0.5))
    assert drawn.shape == (4096, 4, 4, 4)
    row0, row1 = drawn[0::2], drawn[1::2]  # 32768 draws each
    # Scaled by 0.5: means 1.0 and -0.5, standard deviations 0.25 and 1.0.
    assert abs(row0.mean() - 1.0) < 0.01 and abs(row0.std() - 0.25) < 0.01
    assert abs(row1.mean() + 0.5) < 0.02 and abs(row1.std() - 1.0) < 0.02


def test_sample_latents_is_deterministic_per_key():
    moments = _two_row_moments(0.3, 0.5, -0.7, 2.0)
    a = _sample(jax.random.key(1), moments, _DRAW_ROWS, 0.18215)
    b = _sample(jax.random.key(1), moments, _DRAW_ROWS, 0.18215)
    c = _sample(jax.random.key(2), moments, _DRAW_ROWS, 0.18215)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.99


def test_sample_latents_picks_the_indexed_rows():
    # Variance exp(-1000) = 0: each draw is its row's mean, scaled.
    unit = _two_row_moments(0.3, 1.0, -0.7, 1.0)
    moments = LatentMoments(unit.mean, unit.logvar - 1e3)
    drawn = np.asarray(_sample(jax.random.key(3), moments, _DRAW_ROWS[::-1], 2.0))
    np.testing.assert_allclose(drawn[0], 2.0 * moments.mean[1], atol=1e-6)
    np.testing.assert_allclose(drawn[1], 2.0 * moments.mean[0], atol=1e-6)
