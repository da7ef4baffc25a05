"""Every image loader of both methods (NeTI's concept photos, ELITE's source images and masks,
ELITE personalization's images and masks) on hostile, odd and fuzzed files: each returns an
array of the right shape and dtype, or raises ImageError whose one line names the file; never
another exception, never a hang.

The fuzzed files run in a worker process with a deadline: a decoder stuck in C cannot be
interrupted in-process, and must fail the test rather than hang the suite."""
import io
import json
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from spacetime_jax.data.images import MAX_PIXELS, ImageError

REPO = Path(__file__).resolve().parents[1]
NUM_MUTATIONS = 500
FUZZ_SEED = 0
CALL_SECONDS = 5.0    # the most one loader call may take on one file (a file at MAX_PIXELS: ~1 s)
WORKER_SECONDS = 60   # the whole worker, imports included (about 3 s on 2 CPU cores)


def _loaders() -> dict[str, tuple[Callable, Callable]]:
    """name -> (loader of a path, check of what it returns)."""
    from spacetime_jax.data.images import load_image
    from spacetime_jax.elite import data, personalize

    def personalize_image(path):
        config = types.SimpleNamespace(images=str(path), masks="")
        return personalize.load_subjects(config)[0].image

    size = personalize.WORKING_SIZE
    return {
        "neti_image": (lambda p: load_image(p, 16),
                       lambda a: a.shape == (16, 16, 3) and a.dtype == np.uint8),
        "elite_image": (data.read_image,
                        lambda a: a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8
                        and min(a.shape[:2]) >= 1),
        "elite_mask": (data.read_mask, lambda a: a.ndim == 2 and a.dtype == bool),
        "personalize_image": (personalize_image,
                              lambda a: a.shape == (size, size, 3) and a.dtype == np.uint8),
        "personalize_mask": (personalize.read_mask, lambda a: a.ndim == 2 and a.dtype == bool),
    }


def _outcome(loader: Callable, check: Callable, path: Path) -> tuple[str, str]:
    """("array", shape) | ("refused", message) | ("WRONG", why): the contract, judged."""
    try:
        result = loader(path)
    except ImageError as err:
        message = str(err)
        if "\n" in message or str(path) not in message:
            return "WRONG", f"ImageError not one line naming the file: {message!r}"
        return "refused", message
    except Exception as err:  # the contract allows no other exception
        return "WRONG", f"{type(err).__name__}: {err}"
    if not check(result):
        return "WRONG", f"returned {type(result).__name__} {getattr(result, 'shape', '')}"
    return "array", str(result.shape)


# ---------------------------------------------------------------------------------------
# Valid seeds and their seeded mutations.

def _gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256],
                    -1).astype(np.uint8)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def valid_images() -> dict[str, bytes]:
    """One small file of each format and of the odd cases the loaders handle."""
    rgb = Image.fromarray(_gradient(24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (12, 12), c) for c in ("red", "green", "blue")]
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    gray16 = Image.fromarray((np.arange(96, dtype=np.uint16).reshape(8, 12) * 600))
    return {
        "rgb.png": _encoded(rgb, "PNG"),
        "palette_alpha.png": _encoded(palette, "PNG", transparency=0),
        "gray16.png": _encoded(gray16, "PNG"),
        "rotated.jpg": _encoded(rgb, "JPEG", quality=90, exif=exif.tobytes()),
        "progressive.jpg": _encoded(rgb.convert("L"), "JPEG", quality=80, progressive=True),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG", quality=90),
        "lossy.webp": _encoded(rgb, "WEBP", quality=80),
        "animated.webp": _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                  lossless=True),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rgba.bmp": _encoded(rgb.convert("RGBA"), "BMP"),
    }


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded corruption: bit flips, a truncation, a header edit, an insertion or a
    zeroed run."""
    out = bytearray(data)
    kind = str(rng.choice(["bitflip", "truncate", "header", "insert", "zeros"]))
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 17))):
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        del out[int(rng.integers(1, len(out))):]
    elif kind == "header":  # signatures, sizes, chunk lengths and types live in the first bytes
        for _ in range(int(rng.integers(1, 5))):
            out[int(rng.integers(min(64, len(out))))] = int(rng.integers(256))
    elif kind == "insert":
        at = int(rng.integers(len(out)))
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    else:
        start = int(rng.integers(len(out)))
        end = min(len(out), start + int(rng.integers(1, 33)))
        out[start:end] = bytes(end - start)
    return kind, bytes(out)


def write_fuzz_cases(folder: Path) -> list[Path]:
    """The valid seeds and NUM_MUTATIONS seeded mutations of them, as files."""
    rng = np.random.default_rng(FUZZ_SEED)
    seeds = valid_images()
    paths = []
    for name, data in seeds.items():
        paths.append(folder / f"valid_{name}")
        paths[-1].write_bytes(data)
    names = sorted(seeds)
    for i in range(NUM_MUTATIONS):
        name = names[i % len(names)]
        kind, data = mutate(seeds[name], rng)
        paths.append(folder / f"{i:03d}_{kind}_{name}")
        paths[-1].write_bytes(data)
    return paths


def run_worker(folder: str) -> None:
    """Child process: every loader on every file of `folder`, one JSON line per call; the
    line before each call names it, so a hang is reported by what started last."""
    loaders = _loaders()
    for path in sorted(Path(folder).iterdir()):
        for name, (loader, check) in loaders.items():
            print(json.dumps({"start": [path.name, name]}), flush=True)
            began = time.perf_counter()
            result, detail = _outcome(loader, check, path)
            print(json.dumps({"file": path.name, "loader": name, "result": result,
                              "detail": detail, "seconds": time.perf_counter() - began}),
                  flush=True)


def test_fuzzed_images_give_an_array_or_the_one_line_error(tmp_path):
    paths = write_fuzz_cases(tmp_path)
    command = [sys.executable, "-c",
               f"from tests.test_image_fuzz import run_worker; run_worker({str(tmp_path)!r})"]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=WORKER_SECONDS)
    except subprocess.TimeoutExpired as err:
        lines = (err.stdout or b"").decode().splitlines()
        pytest.fail(f"the loaders hung; last call started: {lines[-1] if lines else 'none'}")
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()
               if line.startswith("{") and '"result"' in line]
    assert len(records) == len(paths) * 5
    wrong = [r for r in records if r["result"] == "WRONG"]
    assert not wrong, wrong[:5]
    slow = [r for r in records if r["seconds"] > CALL_SECONDS]
    assert not slow, slow[:5]
    valid = [r for r in records if r["file"].startswith("valid_")]
    assert all(r["result"] == "array" for r in valid), valid
    mutated = [r for r in records if not r["file"].startswith("valid_")]
    outcomes = {kind: sum(r["result"] == kind for r in mutated) for kind in ("array", "refused")}
    # Both branches of the contract are exercised, not only one.
    assert outcomes["array"] > 100 and outcomes["refused"] > 100, outcomes


# ---------------------------------------------------------------------------------------
# Hostile files: every loader refuses them with one line naming the file.

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_bomb() -> bytes:
    """10 KB that decode to 9000 x 9000 (81 MP, over MAX_PIXELS; under PIL's own limit)."""
    side = 9000
    rows = zlib.compress(b"\0" * ((side // 8 + 1) * side), 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _gif_bomb() -> bytes:
    """A 35-byte GIF claiming 65535 x 65535 (4.3 G pixels, over PIL's own limit too)."""
    return (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b")


def _truncated_png() -> bytes:
    whole = valid_images()["rgb.png"]
    return whole[:len(whole) * 2 // 3]


HOSTILE = {  # name -> (file bytes, what the one line says)
    "zero_bytes.png": (b"", "the file is empty (0 bytes)"),
    "truncated.png": (_truncated_png(), "truncated or malformed"),
    "text.png": (b"just some notes\n", "not a PNG, JPEG, WebP, GIF or BMP image"),
    "postscript.jpg": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n",
                       "not a PNG, JPEG, WebP, GIF or BMP image"),
    "png_bomb.png": (_png_bomb(), f"9000 x 9000 = 81000000 pixels, over the limit of "
                                  f"{MAX_PIXELS}"),
    "gif_bomb.gif": (_gif_bomb(), f"4294836225 pixels, over the limit of {MAX_PIXELS}"),
}


@pytest.fixture(scope="module")
def loaders():
    return _loaders()


@pytest.mark.parametrize("loader_name", ["neti_image", "elite_image", "elite_mask",
                                         "personalize_image", "personalize_mask"])
@pytest.mark.parametrize("file_name", sorted(HOSTILE))
def test_hostile_file_is_refused_naming_it(tmp_path, loaders, loader_name, file_name):
    content, reason = HOSTILE[file_name]
    path = tmp_path / file_name
    path.write_bytes(content)
    result, message = _outcome(*loaders[loader_name], path)
    assert result == "refused", message
    assert reason in message


@pytest.mark.parametrize("file_name", ["png_bomb.png", "gif_bomb.gif"])
def test_bomb_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch, file_name):
    from PIL import ImageFile

    from spacetime_jax.data.images import load_image
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    path = tmp_path / file_name
    path.write_bytes(HOSTILE[file_name][0])
    started = time.perf_counter()
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path, 8)
    assert decoded == [] and time.perf_counter() - started < 1.0


# ---------------------------------------------------------------------------------------
# Odd but valid files: every loader reads them as a person sees them.

def test_png_named_jpg_and_exif_rotation_read_alike_by_every_loader(tmp_path, loaders):
    stored = _gradient(40, 30)  # 40 wide, 30 high as stored; orientation 6 shows 30 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "png_named.jpg"
    Image.fromarray(stored).save(path, format="PNG", exif=exif.tobytes())
    upright = np.rot90(stored, -1)
    np.testing.assert_array_equal(loaders["elite_image"][0](path), upright)
    assert loaders["elite_mask"][0](path).shape == loaders["personalize_mask"][0](path).shape \
        == (40, 30)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(upright)).resize(
        (16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(loaders["neti_image"][0](path), resized)
