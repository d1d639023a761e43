"""operators/decode.py: every input ends as 8-bit RGB of the right size, or as a typed reject."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from operators import contracts
from operators.contracts import RejectError
from operators.decode import decode_image

ALL = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
CAP = 10_000_000


def _enc(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _decode(data: bytes | None, max_pixels: int = CAP, allowed: tuple[str, ...] = ALL,
            max_bytes: int | None = None) -> Image.Image:
    return decode_image(data, max_pixels, allowed, max_bytes=max_bytes)


def _reject(data: bytes | None, **kw: object) -> RejectError:
    with pytest.raises(RejectError) as ei:
        _decode(data, **kw)  # type: ignore[arg-type]
    return ei.value


def _px(img: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _png_header_only(w: int, h: int, color_type: int = 2, bit_depth: int = 8) -> bytes:
    """A tiny PNG whose IHDR declares ``w`` x ``h`` but whose IDAT holds a handful of bytes."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------
# happy paths
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"])
def test_rgb_roundtrip_keeps_size_and_mode(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WEBP")
    img = Image.new("RGB", (37, 23), (200, 40, 10))
    out = _decode(_enc(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (37, 23)
    r, g, b = _px(out, 18, 11)
    # Lossy formats move colours a little, not a lot.
    assert abs(r - 200) <= 8 and abs(g - 40) <= 8 and abs(b - 10) <= 8


def test_png_pixels_are_exact() -> None:
    img = _noise(16, 9, seed=3)
    out = _decode(_enc(img, "PNG"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


# ------------------------------------------------------------------------------------------------
# rejects
# ------------------------------------------------------------------------------------------------


def test_none_is_null_payload() -> None:
    assert _reject(None).error_type == contracts.NULL_PAYLOAD == "null_payload"


def test_zero_bytes_is_empty_image() -> None:
    assert _reject(b"").error_type == contracts.EMPTY_IMAGE == "empty_image"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_undecodable(seed: int) -> None:
    data = np.random.default_rng(seed).bytes(777)
    assert _reject(data).error_type == "undecodable"


def test_text_is_undecodable() -> None:
    assert _reject(b"this is not an image at all").error_type == "undecodable"


@pytest.mark.parametrize(
    "img",
    [
        pytest.param(_noise(96, 96), id="textured-cut-in-scan-data"),
        # A flat image is almost all header: cutting it in half cuts a header segment.
        pytest.param(Image.new("RGB", (64, 64), (10, 200, 30)), id="flat-cut-in-header"),
    ],
)
def test_jpeg_cut_in_half_is_truncated(img: Image.Image) -> None:
    data = _enc(img, "JPEG", quality=90)
    err = _reject(data[: len(data) // 2])
    assert err.error_type == "truncated_image", err.message


def test_png_cut_in_half_is_truncated_not_padded() -> None:
    data = _enc(_noise(64, 64), "PNG")
    assert _reject(data[: len(data) // 2]).error_type == "truncated_image"


def test_truncated_images_stay_errors_globally() -> None:
    # Importing decode must leave PIL refusing truncated data (no silent grey padding).
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt,size", [("PPM", (8, 8)), ("ICO", (16, 16)), ("TGA", (8, 8))])
def test_formats_outside_allow_list_are_unsupported(fmt: str, size: tuple[int, int]) -> None:
    data = _enc(Image.new("RGB", size, (1, 2, 3)), fmt)
    # PIL itself can read these: the rejection comes from the allow-list, not a decode failure.
    assert Image.open(io.BytesIO(data)).format == fmt
    err = _reject(data)
    assert err.error_type == "unsupported_format"
    assert fmt in err.message


def test_allowed_formats_restriction_is_respected() -> None:
    png = _enc(Image.new("RGB", (8, 8)), "PNG")
    jpeg = _enc(Image.new("RGB", (8, 8)), "JPEG")
    assert _decode(jpeg, allowed=("JPEG",)).size == (8, 8)
    err = _reject(png, allowed=("JPEG",))
    assert err.error_type == "unsupported_format"
    assert "PNG" in err.message
    assert _decode(png, allowed=("PNG",)).size == (8, 8)


def test_max_bytes_is_file_too_large() -> None:
    data = _enc(_noise(32, 32), "PNG")
    assert _decode(data, max_bytes=len(data)).size == (32, 32)  # the cap itself is allowed
    err = _reject(data, max_bytes=len(data) - 1)
    assert err.error_type == "file_too_large"
    assert str(len(data)) in err.message


# ------------------------------------------------------------------------------------------------
# decompression bombs: rejected from the header, before any pixel is decoded
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every pixel load; the bomb tests assert that none happened."""
    calls: list[tuple[int, int]] = []
    real_file_load = ImageFile.ImageFile.load
    real_image_load = Image.Image.load

    def spy_file(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        calls.append(self.size)
        return real_file_load(self)

    def spy_image(self: Image.Image):  # type: ignore[no-untyped-def]
        calls.append(self.size)
        return real_image_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_file)
    monkeypatch.setattr(Image.Image, "load", spy_image)
    return calls


def test_load_spy_sees_normal_decodes(load_calls: list[tuple[int, int]]) -> None:
    # Guards the bomb tests below: the spy really is on the path decode_image takes.
    _decode(_enc(Image.new("RGB", (12, 7)), "PNG"))
    assert (12, 7) in load_calls


def test_real_huge_bilevel_png_is_a_bomb(load_calls: list[tuple[int, int]]) -> None:
    # 20000 x 20000 1-bit: ~50 KB on disk, 400 MP (hundreds of MB) once decoded.
    data = _enc(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 200_000
    load_calls.clear()  # encoding it loaded the source image; only decoding counts
    err = _reject(data, max_pixels=89_478_485)
    assert err.error_type == "decompression_bomb"
    assert load_calls == []


def test_header_over_configured_cap_is_rejected_before_load(load_calls: list[tuple[int, int]]) -> None:
    # 5000 x 5000 RGB is under PIL's own bomb limit, so only our cap can stop it.
    data = _png_header_only(5000, 5000)
    assert len(data) < 1000
    err = _reject(data, max_pixels=1_000_000)
    assert err.error_type == "decompression_bomb"
    assert "5000x5000" in err.message
    assert load_calls == []


def test_crafted_giant_header_is_a_bomb(load_calls: list[tuple[int, int]]) -> None:
    data = _png_header_only(60000, 60000)
    assert _reject(data).error_type == "decompression_bomb"
    assert load_calls == []


def test_pixel_cap_boundary() -> None:
    data = _enc(Image.new("RGB", (10, 10)), "PNG")
    assert _decode(data, max_pixels=100).size == (10, 10)
    assert _reject(data, max_pixels=99).error_type == "decompression_bomb"


def test_exif_rotation_does_not_bypass_cap() -> None:
    # The cap applies to the stored size (w*h is rotation invariant); 40x20 = 800 pixels.
    data = _exif_rotated_jpeg()
    assert _reject(data, max_pixels=799).error_type == "decompression_bomb"


# ------------------------------------------------------------------------------------------------
# modes: everything ends as 8-bit RGB with the right values
# ------------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = _enc(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = _decode(data)
    assert out.mode == "RGB" and out.size == (16, 8)
    r, g, b = _px(out, 8, 4)
    assert r >= 240 and g <= 15 and b <= 15


@pytest.mark.parametrize("value,expected", [(65535, 255), (32768, 128), (0, 0), (257, 1)])
def test_16bit_grayscale_png_is_rescaled_not_clipped(value: int, expected: int) -> None:
    arr = np.full((6, 5), value, dtype=np.uint16)
    data = _enc(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = _decode(data)
    assert out.mode == "RGB" and out.size == (5, 6)
    got = np.asarray(out)
    assert np.all(np.abs(got.astype(int) - expected) <= 1), (value, got[0, 0])


def test_16bit_gradient_keeps_order() -> None:
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(_decode(_enc(Image.fromarray(arr), "PNG")))[..., 0].astype(int).ravel()
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out) >= 0)
    assert len(np.unique(out)) > 32  # not collapsed to 0/255 by clipping


def test_palette_png_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0 = black, 1 = red
    img.putpixel((3, 1), 1)
    data = _enc(img, "PNG", transparency=0)  # black is the transparent entry
    src = Image.open(io.BytesIO(data))
    assert src.mode == "P" and "transparency" in src.info
    out = _decode(data)
    assert out.mode == "RGB" and out.size == (4, 2)
    assert _px(out, 0, 0) == (255, 255, 255)  # transparent -> white, not black
    assert _px(out, 3, 1) == (255, 0, 0)


def test_gif_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    out = _decode(_enc(img, "GIF", transparency=0))
    assert _px(out, 0, 0) == (255, 255, 255)
    assert _px(out, 1, 1) == (0, 0, 255)


def test_palette_without_transparency_keeps_colours() -> None:
    img = Image.new("P", (3, 3), 0)
    img.putpalette([0, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 6))
    img.putpixel((2, 2), 1)
    out = _decode(_enc(img, "PNG"))
    assert _px(out, 0, 0) == (0, 0, 0)
    assert _px(out, 2, 2) == (0, 128, 0)


def test_rgba_alpha_zero_is_white_and_opaque_keeps_colour() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    out = _decode(_enc(Image.fromarray(arr, "RGBA"), "PNG"))
    assert out.mode == "RGB" and out.size == (3, 2)
    assert _px(out, 0, 0) == (255, 255, 255)
    assert _px(out, 1, 0) == (0, 0, 255)
    assert all(abs(v - 127) <= 2 for v in _px(out, 2, 0))


def test_la_mode_composites_on_white() -> None:
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[0, 0] = (0, 0)  # transparent black
    arr[0, 1] = (0, 255)  # opaque black
    arr[1, 0] = (200, 255)
    data = _enc(Image.fromarray(arr, "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = _decode(data)
    assert out.mode == "RGB"
    assert _px(out, 0, 0) == (255, 255, 255)
    assert _px(out, 1, 0) == (0, 0, 0)
    assert _px(out, 0, 1) == (200, 200, 200)


def test_bilevel_becomes_black_and_white_rgb() -> None:
    img = Image.new("1", (9, 5), 0)
    img.putpixel((4, 2), 1)
    data = _enc(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = _decode(data)
    assert out.mode == "RGB" and out.size == (9, 5)
    assert _px(out, 0, 0) == (0, 0, 0)
    assert _px(out, 4, 2) == (255, 255, 255)


def test_grayscale_becomes_rgb_with_same_value() -> None:
    img = Image.new("L", (7, 3), 77)
    out = _decode(_enc(img, "PNG"))
    assert out.mode == "RGB" and out.size == (7, 3)
    assert _px(out, 6, 2) == (77, 77, 77)


def test_grayscale_jpeg_becomes_rgb() -> None:
    out = _decode(_enc(Image.new("L", (8, 8), 150), "JPEG", quality=95))
    assert out.mode == "RGB"
    assert all(abs(v - 150) <= 3 for v in _px(out, 4, 4))


# ------------------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------------------


def _exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """40x20 stored: left half red, right half blue; EXIF says how to display it."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _enc(Image.fromarray(arr, "RGB"), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_is_applied() -> None:
    data = _exif_rotated_jpeg(6)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    out = _decode(data)
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    # Orientation 6 = rotate 90 degrees clockwise to display: the left (red) half ends on top.
    top, bottom = _px(out, 10, 5), _px(out, 10, 34)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_exif_orientation_1_keeps_size() -> None:
    assert _decode(_exif_rotated_jpeg(1)).size == (40, 20)


def test_broken_exif_does_not_lose_the_image() -> None:
    img = _noise(10, 6)
    data = _enc(img, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    out = _decode(data)
    assert out.mode == "RGB" and out.size == (10, 6)
