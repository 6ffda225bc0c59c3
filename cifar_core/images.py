"""Any user-supplied image -> the uint8 3x32x32 tensor the models see, or a clear ImageInputError.

Uploads are untrusted: every failure mode (not an image, truncated, decompression bomb, odd
modes such as CMYK / 16-bit / palette-with-transparency, EXIF rotation, animation) ends either
in a plain RGB image or in one exception type whose message can be shown to a user as is.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 20 * 1024 * 1024   # larger uploads are refused before decoding
MAX_PIXELS = 50_000_000             # ~7000x7000; above it decoding could take GBs of memory
MODEL_SIZE = 32                     # what CIFAR-10 models are trained on


class ImageInputError(ValueError):
    """The input is not a usable image; str(e) is a user-facing explanation."""


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"no such file: {path.name}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageInputError(f"the file is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                                  f"{MAX_FILE_BYTES // 2**20} MB")
        data = path.read_bytes()
    else:
        raise ImageInputError(f"expected an image file, got {type(source).__name__}")
    if not data:
        raise ImageInputError("the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageInputError(f"the file is {len(data) / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB")
    return data


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (how viewers show it);
    high-bit-depth images are rescaled rather than clipped (PIL's convert clips 16-bit to 255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        else:  # 32-bit int / float: stretch the actual range
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.uint8(np.clip(np.nan_to_num(a), 0, 255).round()), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(source, draft_side: int = MODEL_SIZE * 4) -> Image.Image:
    """Decode a path / bytes / PIL image / HxW(x3|4) uint8 array into an upright RGB PIL image. A large JPEG is
    decoded at a reduced scale that keeps both sides >= draft_side (the 32x32 models need 128)."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        im = source
    else:
        data = _read_bytes(source)
        try:
            with warnings.catch_warnings():
                # A bomb *warning* (between 1x and 2x PIL's limit) becomes an error here: our cap is ours.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            if isinstance(e, UnidentifiedImageError):
                raise ImageInputError("this file is not an image we can read (supported: PNG, JPEG, WebP, "
                                      "GIF, BMP, TIFF)") from None
            raise ImageInputError(f"the image is too large to decode safely ({e})") from None
        except Exception as e:  # malformed headers raise assorted errors inside PIL
            raise ImageInputError(f"could not read the image: {e}") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageInputError("the image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"the image is {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} "
                              "megapixels")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP/TIFF: classify the first frame
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            # A phone photo is decoded at 1/2..1/8 scale directly (still >= 4x the model's side): much faster.
            im.draft(im.mode, (draft_side, draft_side))
        im.load()  # decode now, so truncation is reported here and not later
        im = ImageOps.exif_transpose(im)
        return _to_8bit_rgb(im)
    except ImageInputError:
        raise
    except OSError as e:  # truncated or corrupt data
        raise ImageInputError(f"the image data is damaged or incomplete ({e})") from None
    except Exception as e:
        raise ImageInputError(f"could not decode the image: {e}") from None


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageInputError(f"expected an HxW, HxWx3 or HxWx4 image array, got shape {a.shape}")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageInputError(f"the image is {a.shape[1]}x{a.shape[0]} pixels; the limit is "
                              f"{MAX_PIXELS / 1e6:.0f} megapixels")
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2]
    return _to_8bit_rgb(Image.fromarray(np.ascontiguousarray(a), mode))


def to_model_input(im: Image.Image, size: int = MODEL_SIZE) -> torch.Tensor:
    """Center square crop (CIFAR objects fill a square frame) and an antialiased resize to
    size x size -> uint8 3 x size x size. Predictor resizes further for models with larger inputs."""
    square = ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_for_model(source, size: int = MODEL_SIZE) -> torch.Tensor:
    """The one call the app makes: upload -> uint8 3 x size x size, or ImageInputError."""
    return to_model_input(load_image(source), size)
