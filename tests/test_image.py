"""``load_image``: every format and mode decodes to RGB with the right pixels; every broken input
raises ImageDecodeError with its kind; decompression bombs are refused from the header."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, save_image, write_corrupt_files
from PIL import Image, ImageFile

from visiontune.core.errors import ImageDecodeError
from visiontune.data import preprocess as preprocess_mod
from visiontune.data.image import load_image


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "RGB"])
def test_modes_become_rgb(tmp_path, mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (20, 10)).save(path, format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_bytes_and_webp():
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(buf, format="WEBP", lossless=True)
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("name,kind,needle", [("empty", "zero-size", "empty"), ("text", "non-image", "not an image"),
                                              ("truncated", "truncated", "truncated")])
def test_broken_files_name_their_kind(tmp_path, name, kind, needle):
    path = write_corrupt_files(tmp_path)[name]
    with pytest.raises(ImageDecodeError, match=needle) as info:
        load_image(path)
    assert info.value.kind == kind


def test_missing_file_is_kind_missing(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.kind == "missing"


@pytest.mark.parametrize("factor", [1.5, 3])  # between 1x and 2x the limit Pillow only warns
def test_decompression_bomb_refused(tmp_path, monkeypatch, factor):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / factor))
    with pytest.raises(ImageDecodeError, match="decompression bomb") as info:
        load_image(path)
    assert info.value.kind == "decompression-bomb"


def test_rgb_png_is_returned_unchanged(tmp_path):
    src = make_image(np.random.default_rng(0), (10, 120, 230))
    assert np.array_equal(pixels(load_image(save_image(src, tmp_path / "rgb.png"))), np.asarray(src))


def test_path_str_bytes_and_pil_inputs_decode_identically(tmp_path):
    path = save_image(make_image(np.random.default_rng(0), (200, 100, 0)), tmp_path / "a b.jpg", quality=90)
    reference = pixels(load_image(path))
    assert np.array_equal(reference, pixels(load_image(str(path))))
    assert np.array_equal(reference, pixels(load_image(path.read_bytes())))
    assert np.array_equal(reference, pixels(load_image(Image.open(path))))


def test_mode_L_grey_is_replicated(tmp_path):
    grey = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    out = pixels(load_image(save_image(Image.fromarray(grey, "L"), tmp_path / "l.png")))
    for c in range(3):
        assert np.array_equal(out[..., c], grey)


def test_mode_LA_opaque_keeps_grey_transparent_becomes_white(tmp_path):
    arr = np.zeros((4, 4, 2), dtype=np.uint8)
    arr[..., 0] = 50
    arr[:2, :, 1] = 255
    path = save_image(Image.fromarray(arr, "LA"), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    out = pixels(load_image(path))
    assert (out[:2] == 50).all()
    assert (out[2:] == 255).all()  # the hidden dark grey must not show through


def test_palette_transparency_keeps_visible_pixels(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # 0 black (transparent), 1 red
    img.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = pixels(load_image(path))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert (out[1:] == 255).all()


def test_rgba_opaque_half_and_fully_transparent(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)
    arr[0, 1] = (10, 20, 30, 255)
    arr[0, 2] = (0, 0, 0, 128)
    arr[1, :] = (200, 0, 0, 0)
    out = pixels(load_image(save_image(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (10, 20, 30)
    assert all(abs(v - 127) <= 2 for v in out[0, 2])  # black at 50% over white
    assert (out[1] == 255).all()


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk_colour_is_converted(tmp_path, suffix):
    path = save_image(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / f"cyan{suffix}",
                      **({"quality": 95} if suffix == ".jpg" else {}))
    assert Image.open(path).mode == "CMYK"
    out = pixels(load_image(path))
    assert np.abs(out - np.array([0, 255, 255])).max() <= 6


def test_16_bit_values_scaled_by_257(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = save_image(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    out = pixels(load_image(path))
    assert out[0, :, 0].tolist()[:3] == [0, 1, 4]  # 1000 -> 4: scaled, not clipped to 255
    assert abs(out[0, 3, 0] - 128) <= 1 and out[0, 4, 0] == 255
    assert (out == out[..., :1]).all()


def test_16_bit_ramp_spreads_over_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    out = pixels(load_image(save_image(Image.fromarray(ramp), tmp_path / "ramp.png")))[..., 0].ravel()
    assert (np.diff(out) >= 0).all() and out[0] == 0 and out[-1] == 255
    assert len(np.unique(out)) > 32


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _is_red(p):
    return p[0] > 200 and p[2] < 60


def _is_blue(p):
    return p[2] > 200 and p[0] < 60


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "blue_at"),
    [
        (1, (40, 20), (10, 5), (10, 35)),  # (row, col) probes
        (3, (40, 20), (10, 35), (10, 5)),  # 180 degrees: left/right swap
        (6, (20, 40), (5, 10), (35, 10)),  # 90 degrees clockwise: stored left goes on top
        (8, (20, 40), (35, 10), (5, 10)),  # 90 degrees counter-clockwise: stored left at the bottom
    ],
)
def test_exif_orientation_direction(tmp_path, orientation, size, red_at, blue_at):
    img = load_image(_oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation))
    assert img.size == size
    out = pixels(img)
    assert _is_red(out[red_at]) and _is_blue(out[blue_at])


def test_animated_gif_first_frame_everywhere(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    opened = Image.open(path)
    opened.seek(2)  # a caller's image left on a later frame is rewound too
    for source in (path, path.read_bytes(), opened):
        out = pixels(load_image(source))
        assert (np.abs(out - np.array([255, 0, 0])) <= 2).all()


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".ppm", ".webp"])
def test_lossless_formats_round_trip_exactly(tmp_path, suffix):
    src = make_image(np.random.default_rng(3), (20, 200, 90))
    path = save_image(src, tmp_path / f"x{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    assert np.array_equal(pixels(load_image(path)), np.asarray(src))


def test_truncated_jpeg_fails_from_bytes_too_and_global_flag_untouched(tmp_path):
    path = write_corrupt_files(tmp_path)["truncated"]
    with pytest.raises(ImageDecodeError):
        load_image(path.read_bytes())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_other_unreadable_inputs(tmp_path):
    for source in (b"", tmp_path / "does-not-exist.png", b"GIF89a-garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20):
        with pytest.raises(ImageDecodeError) as info:
            load_image(source)
        assert str(info.value)


def _png_bytes(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(40, 40), (100, 100)], ids=["warning-range", "error-range"])
def test_decompression_bomb_from_bytes_and_no_warning_leaks(tmp_path, monkeypatch, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # refused in both ranges (Pillow itself only warns in the lower one); visiontune installs a
    # filter hiding Pillow's warning, which pytest's own filters override here
    with pytest.raises(ImageDecodeError, match="(?i)bomb"):
        load_image(path.read_bytes())
    with pytest.raises(ImageDecodeError, match="(?i)bomb"):
        load_image(path)
    assert load_image(_png_bytes((20, 20))).size == (20, 20)  # under the limit: fine


def test_decompression_bomb_refused_while_another_thread_decodes(tmp_path, monkeypatch):
    """Two load_image calls interleaved deterministically, as scan_files' thread pool can."""
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(bomb)  # 1,600 px: Pillow only warns between MAX and 2*MAX
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    real_open = preprocess_mod.open_image
    small_inside, bomb_inside, small_done = threading.Event(), threading.Event(), threading.Event()

    def scripted_open(source):
        if Path(str(source)) == small:
            small_inside.set()
            bomb_inside.wait(5)  # both calls are now inside load_image's catch_warnings
        else:
            small_inside.wait(5)
            bomb_inside.set()
            small_done.wait(5)  # the other call has returned and restored the filters
        return real_open(source)

    monkeypatch.setattr(preprocess_mod, "open_image", scripted_open)
    outcome = {}

    def run(path, key):
        try:
            outcome[key] = load_image(path).size
        except ImageDecodeError as exc:
            outcome[key] = exc
        finally:
            if key == "small":
                small_done.set()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=run, args=(small, "small")),
                   threading.Thread(target=run, args=(bomb, "bomb"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert outcome["small"] == (20, 20)
    assert isinstance(outcome["bomb"], ImageDecodeError)
