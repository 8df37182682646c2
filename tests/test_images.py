"""Image inputs (ImageFolder data and ``unroll attention --image``): every bad file is an
UnrollError naming it and saying what is wrong, never a PIL exception or warning; named data
sets that do not fit the recipe say what would."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unroll.attention import load_image
from unroll.cli import main
from unroll.errors import UnrollError
from unroll.images import MAX_IMAGE_PIXELS, read_image
from unroll.train import data as datasets

ROOT = Path(__file__).resolve().parents[1]


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares ``width`` x ``height`` grey pixels in a few dozen bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise_image(fmt: str) -> bytes:
    """An RGB image file whose pixel data is most of its bytes (noise does not compress)."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def class_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """An ImageFolder with one class holding ``files``."""
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return tmp_path / "data"


def both_refuse(path: Path, tmp_path: Path, *expected: str) -> None:
    """``load_image`` and reading the image from an ``image_folder`` each raise an UnrollError naming ``path`` and saying
    ``expected``, with any warning turned into an error that would escape."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnrollError) as single:
            load_image(path, 8, 3)
        root = class_folder(tmp_path, {path.name: path.read_bytes()})
        with pytest.raises(UnrollError) as folder:
            datasets.image_folder(root, 3)[0]
    for error, where in ((single.value, path), (folder.value, root / "a" / path.name)):
        assert error.where == str(where)
        for text in expected:
            assert text in error.message, error.message


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "gif", "tiff"])
def test_an_image_cut_in_half_is_a_truncated_image(tmp_path, fmt):
    content = noise_image(fmt)
    path = tmp_path / f"half.{fmt}"
    path.write_bytes(content[: len(content) // 2])
    both_refuse(path, tmp_path, "truncated image")


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000), (9000, 9000)])
def test_a_decompression_bomb_is_refused_with_its_size(tmp_path, size):
    # PIL raises above twice its limit, warns above it, and says nothing below (9000²): all three refused
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(*size))
    assert len(path.read_bytes()) < 100 and size[0] * size[1] > MAX_IMAGE_PIXELS
    pixels = f"{size[0]}×{size[1]}" if size[0] < 30000 else f"{size[0] * size[1]:,}"
    both_refuse(path, tmp_path, f"image of {pixels} pixels exceeds the limit of {MAX_IMAGE_PIXELS:,}")


def test_an_image_within_the_limit_is_read(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((4, 4000), 255, dtype=np.uint8)).save(path)
    assert torch.equal(load_image(path, 8, 1), torch.ones(1, 8, 8))


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 10, noise_image("png")[:20]])
def test_garbage_is_not_a_readable_image(tmp_path, content):
    path = tmp_path / "garbage.png"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnrollError) as error:
            load_image(path, 8, 3)
    assert error.value.where == str(path)
    assert "not a readable image" in error.value.message or "truncated image" in error.value.message


def test_a_tiff_with_corrupt_metadata_warns_nothing(tmp_path):
    # PIL warns "Corrupt EXIF data" for this one before failing: the warning must not escape
    path = tmp_path / "cut.tiff"
    path.write_bytes(noise_image("tiff")[:20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnrollError, match="not a readable image"):
            load_image(path, 8, 3)


def test_a_directory_named_like_an_image(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UnrollError) as error:
        load_image(tmp_path / "dir.png", 8, 3)
    assert error.value.where == str(tmp_path / "dir.png") and "found a directory" in error.value.message
    root = tmp_path / "data"
    (root / "a" / "sub.jpg").mkdir(parents=True)  # a folder is no image: the class has none
    with pytest.raises(UnrollError) as error:
        datasets.image_folder(root, 3)
    assert error.value.where == str(root) and "one sub-folder per class" in error.value.message


def test_a_missing_image(tmp_path):
    with pytest.raises(UnrollError) as error:
        load_image(tmp_path / "nowhere.png", 8, 3)
    assert error.value.where == str(tmp_path / "nowhere.png") and error.value.message == "no such image file"


@pytest.mark.parametrize("channels", [2, 4])
def test_load_image_with_an_unsupported_channel_count(tmp_path, channels):
    path = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    with pytest.raises(UnrollError, match=f"images with {channels} channels are not supported"):
        load_image(path, 8, channels)


# --- what keeps working ----------------------------------------------------------------------------


def test_alpha_is_dropped_and_palettes_expand(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10  # red, nearly transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
    for name in ("rgba.png", "palette.png"):
        image = read_image(tmp_path / name, 8, 3)
        assert torch.equal(image, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 8, 8)), name


def test_an_image_folder_converts_each_image_to_the_recipes_channels(tmp_path):
    root = class_folder(tmp_path, {"rgb.png": noise_image("png")})
    grey = datasets.image_folder(root, 1)[0][0]
    assert grey.mode == "L"
    expected = Image.open(root / "a" / "rgb.png").convert("L")
    assert np.array_equal(np.asarray(grey), np.asarray(expected))


# --- named data sets ---------------------------------------------------------------------------------


def test_digits_for_a_224_pixel_colour_recipe_says_what_would_fit(tmp_path, capsys):
    rc = main(["train", str(ROOT / "recipes/crate_tiny.yaml"), "--data", "digits", "--out", str(tmp_path / "o"),
               "--set", "training.batch_size=8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "digits are 1×8×8 images, the recipe's are 3×224×224" in err
    assert "train recipes/crate_digits.yaml, or give --data an ImageFolder of your images" in err
    assert len(err.strip().splitlines()) <= 4 and "Traceback" not in err


def test_mixtures_too_small_for_the_recipe_say_what_to_raise():
    with pytest.raises(UnrollError) as error:
        datasets.open_data("mixtures", 2, 1)
    assert "need images of at least 12 pixels, the recipe's have 1×2×2" in error.value.message
    assert "raise architecture.image_size" in error.value.message


def test_mixtures_of_large_images_are_refused_at_once(tmp_path, capsys):
    # generating them takes a QR of a (values × values) matrix: minutes at 64×64×3, 90 GB at 224×224×3
    rc = main(["train", str(ROOT / "recipes/crate_tiny.yaml"), "--data", "mixtures", "--out", str(tmp_path / "o"),
               "--set", "training.batch_size=8"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "Traceback" not in err
    assert ("mixtures are generated for small images: at most 4,096 values per image (channels × height × width), "
            "the recipe's have 150,528") in err and "give --data an ImageFolder" in err
    with pytest.raises(UnrollError, match="at most 4,096 values per image .*, the recipe's have 4,225 "):
        datasets.open_data("mixtures", 65, 1)


def test_unknown_data_is_neither_a_name_nor_a_directory(tmp_path):
    with pytest.raises(UnrollError) as error:
        datasets.open_data(str(tmp_path / "digitz"), 8, 1)
    assert error.value.where == str(tmp_path / "digitz")
    assert error.value.message == f"no such data directory; expected {datasets.DATA_HELP}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnrollError, match="found a file; expected digits, mixtures, an ImageFolder directory"):
        datasets.open_data(str(tmp_path / "file"), 8, 1)
