"""Reading one image file into a tensor, for training data and for ``unroll attention`` alike.

Whatever is wrong with a file (missing, a directory, unreadable, cut short, not an image, a
decompression bomb) is an :class:`~unroll.errors.UnrollError` naming it; no exception or
warning of PIL's reaches the user.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from unroll.errors import UnrollError, excerpt

#: the most pixels (width x height) an image may have: 64 megapixels, about 200 MB decoded as
#: RGB, far more than any recipe's image size needs. It sits below PIL's own decompression-bomb
#: limit (about 89 megapixels; PIL refuses files over twice that itself), so a file declaring
#: more is refused here by its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 64_000_000

_MODES = {1: "L", 3: "RGB"}


def image_mode(channels: int, where: str | Path) -> str:
    """The PIL mode images are converted to for ``channels`` (the recipe's architecture.channels)."""
    mode = _MODES.get(channels)
    if mode is None:
        raise UnrollError(f"images with {channels} channels are not supported (architecture.channels must be 1 or 3)",
                          where=str(where))
    return mode


def read_image(path: str | Path, image_size: int, channels: int, strict: bool = True) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1], resized to ``image_size`` x ``image_size`` (see :func:`open_image`)."""
    image = open_image(path, channels, strict).resize((image_size, image_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).reshape(image_size, image_size, channels).permute(2, 0, 1)


def open_image(path: str | Path, channels: int, strict: bool = False):
    """The decoded PIL image in the mode of ``channels`` (``L`` or ``RGB``), at its own size.

    An alpha band is dropped and a palette image is expanded. ``strict``: the file must already
    have ``channels`` colour bands (a palette counts as 3), so a picture never changes colour
    unnoticed; otherwise any image is converted, as a large data set needs (ImageNet holds a few
    grey and CMYK JPEGs among its colour ones).
    """
    from PIL import Image

    path = Path(path)
    mode = image_mode(channels, path)
    if path.is_dir():
        raise UnrollError("expected an image file, found a directory", where=str(path))
    if not path.exists():
        raise UnrollError("no such image file", where=str(path))
    # PIL reports odd files through warnings too (corrupt EXIF, palette transparency): the
    # checks below decide, the warnings are dropped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_large(f"{width}×{height}", path)
                bands = [b for b in img.getbands() if b != "A"]
                if strict and len(bands) != channels and not (img.mode == "P" and channels == 3):
                    raise UnrollError(f"expected {channels}-channel images (the recipe's architecture.channels), "
                                      f"found {len(bands)} channels ({img.mode})", where=str(path))
                converted = img.convert(mode)
                converted.load()  # decode now, inside the checks: a damaged file fails here
        except UnrollError:
            raise
        except Image.DecompressionBombError as e:  # more than twice PIL's limit: refused at open
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_large(f"{int(found[1]):,}" if found else "more", path) from None
        except PermissionError:
            raise UnrollError("cannot read the file: permission denied", where=str(path)) from None
        except Exception as e:  # a damaged file can fail anywhere inside PIL's decoders
            raise _unreadable(e, path) from None
    return converted


def _too_large(size: str, path: Path) -> UnrollError:
    return UnrollError(f"image of {size} pixels exceeds the limit of {MAX_IMAGE_PIXELS:,}; resize it first",
                       where=str(path))


def _unreadable(e: Exception, path: Path) -> UnrollError:
    from PIL import UnidentifiedImageError

    # PIL says "image file is truncated" or "Truncated File Read", depending on the format
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return UnrollError("truncated image: the file ends before its pixel data does", where=str(path))
    if isinstance(e, UnidentifiedImageError):
        return UnrollError("not a readable image (no image format recognised)", where=str(path))
    return UnrollError(f"not a readable image ({excerpt(str(e) or type(e).__name__)})", where=str(path))
