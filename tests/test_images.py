"""Upload decoding: every odd-but-valid image becomes a 3x32x32 uint8 tensor, every bad one a clear
ImageInputError (never another exception type, which would surface as a generic server error)."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_core import images
from cifar_core.images import ImageInputError, decode_for_model, load_image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48, mode="RGB") -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    return Image.fromarray(a).convert(mode)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_model_input(fmt):
    x = decode_for_model(encode(gradient(), fmt))
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert x.float().std() > 10  # real content, not a blank frame


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I", "F", "YCbCr"])
def test_modes(mode):
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    assert decode_for_model(encode(gradient(mode=mode), fmt)).shape == (3, 32, 32)


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_for_model(encode(im, "PNG")).min() == 255


def test_palette_with_transparency():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0] * 256)
    im.info["transparency"] = 0
    assert decode_for_model(encode(im, "PNG", transparency=0)).min() == 255


def test_16bit_is_rescaled_not_clipped():
    a = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits; a naive convert clips to white
    im = Image.fromarray(a)  # uint16 -> mode I;16
    assert im.mode == "I;16"
    x = decode_for_model(encode(im, "PNG"))
    assert 120 <= int(x.float().mean()) <= 135


def test_exif_rotation_is_applied():
    im = gradient(64, 32)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = load_image(encode(im, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (32, 64)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    x = decode_for_model(buf.getvalue())
    assert x[0].float().mean() > 200 and x[2].float().mean() < 50


def test_tiny_and_non_square_images():
    assert decode_for_model(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))[:, 0, 0].tolist() == [10, 20, 30]
    assert decode_for_model(encode(gradient(500, 20), "PNG")).shape == (3, 32, 32)


def test_arrays_and_pil_inputs():
    assert decode_for_model(np.zeros((10, 12), np.uint8)).shape == (3, 32, 32)
    assert decode_for_model(np.zeros((10, 12, 4), np.float32)).shape == (3, 32, 32)
    assert decode_for_model(gradient()).shape == (3, 32, 32)
    with pytest.raises(ImageInputError):
        decode_for_model(np.zeros((10, 12, 5), np.uint8))


def test_files_on_disk(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(gradient(), "PNG"))
    assert decode_for_model(str(path)).shape == (3, 32, 32)
    with pytest.raises(ImageInputError, match="no such file"):
        decode_for_model(tmp_path / "missing.png")


@pytest.mark.parametrize("payload,message", [
    (b"", "empty"),
    (b"this is a text file, not a picture", "not an image"),
    (b"%PDF-1.4\n" + b"0" * 100, "not an image"),
])
def test_non_images(payload, message):
    with pytest.raises(ImageInputError, match=message):
        decode_for_model(payload)


def test_truncated_file():
    data = encode(gradient(256, 256), "JPEG")
    with pytest.raises(ImageInputError, match="damaged or incomplete"):
        decode_for_model(data[: len(data) // 2])
    png = encode(gradient(256, 256), "PNG")
    with pytest.raises(ImageInputError):
        decode_for_model(png[: len(png) // 2])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height: a decompression bomb needs no pixel data to be dangerous."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8000, 20000, 60000])
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(ImageInputError, match="too large|limit"):
        decode_for_model(png_header_only(side, side))


def test_file_size_cap(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageInputError, match="limit"):
        decode_for_model(b"0" * 2000)
    path = tmp_path / "big.png"
    path.write_bytes(b"0" * 2000)
    with pytest.raises(ImageInputError, match="limit"):
        decode_for_model(path)


def test_wrong_type():
    with pytest.raises(ImageInputError):
        decode_for_model(12345)
