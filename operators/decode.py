"""Image decoding with a reason for every failure (the rows that fail become reject rows).

Safe by construction: the pixel cap is checked from the header before any pixel is decoded, only
an allow-list of formats is decoded, truncated files are errors (never padded), EXIF orientation is
applied, and every mode (CMYK, 16-bit, palette+alpha, LA/RGBA, 1-bit) ends as 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from operators import contracts as C

# Truncated data must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

class DecodeLimits(NamedTuple):
    """What an image must satisfy to be decoded (``embed.max_image_pixels``, ``allowed_formats``,
    ``max_image_bytes``): one value, built from the config in one place (``EmbedConfig.decode_limits``) and
    used by every decode of a run: embed, rerank, training, the live path, thumbnails."""

    max_pixels: int = C.DEFAULT_MAX_IMAGE_PIXELS
    allowed_formats: tuple[str, ...] = C.ALLOWED_FORMATS
    max_bytes: int | None = C.DEFAULT_MAX_IMAGE_BYTES


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16/32-bit grayscale: rescale to 8 bits (PIL's convert would clip everything above 255).
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparency over white, as a browser would show it.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK (PIL inverts Adobe CMYK JPEGs), L, 1, P, YCbCr, LAB, HSV


def _oserror_kind(e: OSError) -> str:
    msg = str(e).lower()
    return C.TRUNCATED if "truncated" in msg or "broken data stream" in msg else C.UNDECODABLE


def decode_image(data: bytes | None, max_pixels: int, allowed_formats: tuple[str, ...],
                 max_bytes: int | None = None) -> Image.Image:
    """Decode ``data`` into an 8-bit RGB PIL image or raise :class:`operators.contracts.RejectError`."""
    if data is None:
        raise C.RejectError(C.NULL_PAYLOAD, "image is null")
    if len(data) == 0:
        raise C.RejectError(C.EMPTY_IMAGE, "image has zero bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise C.RejectError(C.TOO_LARGE, f"image is {len(data)} bytes, cap is {max_bytes}")
    with warnings.catch_warnings():
        # Our own header check below enforces the configured cap; PIL's warning is redundant.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise C.RejectError(C.BOMB, f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise C.RejectError(C.UNDECODABLE, f"not a recognised image ({len(data)} bytes)") from None
        except OSError as e:  # e.g. a JPEG cut inside its header
            raise C.RejectError(_oserror_kind(e), f"{type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any header failure is an undecodable row
            raise C.RejectError(C.UNDECODABLE, f"{type(e).__name__}: {e}") from None
        fmt = (img.format or "").upper()
        if fmt not in allowed_formats:
            raise C.RejectError(C.UNSUPPORTED, f"format {fmt or 'unknown'} is not one of {list(allowed_formats)}")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise C.RejectError(C.UNDECODABLE, f"invalid size {w}x{h}")
        if w * h > max_pixels:
            raise C.RejectError(C.BOMB, f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}")
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise C.RejectError(C.BOMB, f"decompression bomb: {e}") from None
        except OSError as e:
            raise C.RejectError(_oserror_kind(e), f"{type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise C.RejectError(C.UNDECODABLE, f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001,S110 - a broken EXIF block only loses the rotation
        pass
    return _to_rgb(img)
