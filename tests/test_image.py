"""Every image format/mode decodes to RGB; broken files raise ImageDecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visiontune.data.image import ImageDecodeError, load_image


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "RGB"])
def test_modes_become_rgb(tmp_path, mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = _save(Image.new(mode, (20, 10)), tmp_path / f"x.{fmt.lower()}", format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(_save(img, tmp_path / "t.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    out = load_image(_save(img, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.new("I;16", (3, 1))
    img.frombytes(arr.astype("<u2").tobytes())
    path = _save(img, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))[0, :, 0]
    assert out[0] == 0 and 126 <= out[1] <= 129 and out[2] == 255


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, _ = load_image(path).getpixel((4, 4))
    assert r > 200 and g < 50


def test_bytes_and_webp(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(buf, format="WEBP", lossless=True)
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(path)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not an image")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(cut)


@pytest.mark.parametrize("factor", [1.5, 3])  # between 1x and 2x the limit Pillow only warns
def test_decompression_bomb_refused(tmp_path, monkeypatch, factor):
    path = _save(Image.new("L", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / factor))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path)
