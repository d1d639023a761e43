"""The sample's adversarial rows (``make_sample(bad_rows=True)``): what a real corpus throws at the pipeline,
each with the reject reason or the conversion it expects. Empty, undecodable and truncated images, a
decompression bomb, an unsupported format, null and duplicate ids, an unreadable URI; CMYK, 16-bit, palette
with transparency, EXIF-rotated and RGBA images; ids and captions holding markup that would run script if
a page ever rendered them. Tests check every consumer against this list; the quickstart shows the rejects."""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from operators import contracts as C
from pipelines.sample_images import BACKGROUNDS, COLORS, Pair, Scene, draw_shape, encode, random_scene, render

BOMB_SIZE = (20000, 20000)  # 400M pixels: over PIL's own 2 * MAX_IMAGE_PIXELS limit, so open() refuses it
# The markup bad rows would set window.<XSS_FLAG> if a page ever ran them (the explorer tests check it does not).
XSS_FLAG = "mmrXss"
MARKUP_CASES = ("markup_caption_script", "markup_id_img")
STREAM_BAD = 2  # the bad rows' numpy SeedSequence key (the sample's other streams: pipelines/sample.py)


@dataclass
class BadRow:
    """One adversarial row: ``bad`` records its case, what the pipeline should do and why."""

    slot: str
    doc_id: str | None
    data: bytes | None
    ext: str
    text: str
    pairs: frozenset[Pair] | None
    bad: dict[str, Any]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid mode-"1" PNG of BOMB_SIZE, all black: ~50 KB on disk, 400M pixels once decoded.

    Built by hand (never allocated as an image); the size is readable from the IHDR header alone.
    """
    w, h = BOMB_SIZE
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    co = zlib.compressobj(9)
    block = row * 1000
    parts = [co.compress(block) for _ in range(h // 1000)]
    parts.append(co.compress(row * (h % 1000)))
    parts.append(co.flush())
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


def truncate_jpeg(data: bytes) -> bytes:
    """Cut a JPEG halfway through its entropy-coded data: headers intact, so open() works, load() fails."""
    sos = data.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("not a baseline JPEG")
    sos_end = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return data[: sos_end + (len(data) - sos_end) // 2]


def exif_rotated(upright: Image.Image) -> bytes:
    """Stored pixels rotated 90 degrees counter-clockwise; EXIF orientation 6 says "rotate 90 CW to view"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())


def bad_rows(seed: int, first_slot: int, image_size: int, shards: int, image_uri: bool,
             blocks: Sequence[Sequence[Any]], slot_id: Callable[[int], str]) -> list[tuple[int, int, BadRow]]:
    """The bad/odd rows as (shard, insert position among that shard's clean docs, row). ``blocks``: each shard's
    clean rows (``.doc_id``), which duplicate-id rows repeat; ``slot_id(i)``: the file-name id of row slot i."""
    size = (image_size, image_size)
    specs: list[tuple[str, str, str | None, str]] = [
        ("empty_image", "reject", C.EMPTY_IMAGE, "zero-byte image"),
        ("undecodable", "reject", C.UNDECODABLE, "random bytes, no image signature"),
        ("truncated_image", "reject", C.TRUNCATED,
         "JPEG cut halfway through its scan data: header opens, load() raises"),
        ("decompression_bomb", "reject", C.BOMB,
         f"mode-1 PNG whose header declares {BOMB_SIZE[0]}x{BOMB_SIZE[1]} pixels (~50 KB file)"),
        ("unsupported_format", "reject", C.UNSUPPORTED,
         "PPM image: PIL opens it but the format is not in the allowed set"),
        ("null_id", "reject", C.NULL_ID, "doc_id is null (image is valid)"),
        ("duplicate_id_same_shard", "reject", C.DUPLICATE_ID,
         "doc_id repeats an earlier row of the same shard (image is valid)"),
        ("duplicate_id_cross_shard", "reject", C.DUPLICATE_ID,
         "doc_id repeats a row of an earlier shard (image is valid)"),
    ]
    if shards < 2:
        specs = [s for s in specs if s[0] != "duplicate_id_cross_shard"]
    if image_uri:
        specs.append(("uri_unreadable", "reject", C.URI_UNREADABLE, "image_uri points at a missing file"))
    specs += [
        ("cmyk_jpeg", "accept", None, "CMYK JPEG (mode CMYK); convert to RGB"),
        ("gray16_png", "accept", None, "16-bit grayscale PNG (mode I;16); scale to 8 bits"),
        ("palette_png_trns", "accept", None, "palette PNG with a transparent colour (mode P + tRNS)"),
        ("exif_rotated_jpeg", "accept", None,
         "JPEG stored rotated 90 degrees CCW with EXIF orientation 6; exif_transpose restores it"),
        ("rgba_png", "accept", None, "RGBA PNG with a half-transparent background"),
        ("gray_l_png", "accept", None, "8-bit grayscale PNG (mode L)"),
        ("markup_caption_script", "accept", None,
         "valid PNG whose caption starts with a <script> element that would set window." + XSS_FLAG),
        ("markup_id_img", "accept", None,
         "valid PNG whose doc_id and caption hold an <img> element whose onerror would set window." + XSS_FLAG),
    ]
    gray_palette = {"white": (255, 255, 255), "black": (0, 0, 0)}
    out: list[tuple[int, int, BadRow]] = []
    duplicated: set[str | None] = set()  # each duplicate_id row repeats a different clean doc
    for k, (case, expect, error_type, why) in enumerate(specs):
        rng = np.random.default_rng([seed, STREAM_BAD, k])
        slot = slot_id(first_slot + k)
        scene = random_scene(rng, size)
        img = render(scene, size)
        shard = k % shards
        lo = 0
        doc_id: str | None = slot
        pairs: frozenset[Pair] | None = None
        caption = scene.caption
        ext, data, fmt, mode = ".png", None, None, None
        if case == "empty_image":
            data = b""
        elif case == "undecodable":
            data = b"\x00NOTANIMAGE" + rng.bytes(245)
            ext = ".bin"
        elif case == "truncated_image":
            data, ext, fmt, mode = truncate_jpeg(encode(img, "JPEG")), ".jpg", "JPEG", "RGB"
        elif case == "decompression_bomb":
            data, fmt, mode = bomb_png(), "PNG", "1"
        elif case == "unsupported_format":
            data, ext, fmt, mode = encode(img, "PPM"), ".ppm", "PPM", "RGB"
        elif case == "null_id":
            data, fmt, mode, doc_id = encode(img, "PNG"), "PNG", "RGB", None
        elif case.startswith("duplicate_id"):
            data, fmt, mode = encode(img, "PNG"), "PNG", "RGB"
            if case == "duplicate_id_cross_shard":
                shard = shard if shard > 0 else shards - 1
                earlier = [r for b in blocks[:shard] for r in b if r.doc_id not in duplicated]
                doc_id = earlier[int(rng.integers(len(earlier)))].doc_id
            else:
                j = int(rng.integers(len(blocks[shard])))
                doc_id, lo = blocks[shard][j].doc_id, j + 1
            duplicated.add(doc_id)
        elif case == "uri_unreadable":
            data = None
        elif case == "cmyk_jpeg":
            data, ext, fmt, mode = encode(img.convert("CMYK"), "JPEG"), ".jpg", "JPEG", "CMYK"
            pairs = frozenset(scene.pairs)
        elif case in ("gray16_png", "gray_l_png"):
            scene = Scene(tuple(("white", s) for _c, s in scene.pairs), "black", scene.boxes)
            caption = scene.caption
            gray = render(scene, size, gray_palette).convert("L")
            if case == "gray16_png":
                gray = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
            data, fmt, mode = encode(gray, "PNG"), "PNG", gray.mode
            # "white" is no query colour: these docs are judged but match no query.
            pairs = frozenset(scene.pairs)
        elif case == "palette_png_trns":
            # Index 0 is the background and is fully transparent (tRNS); shapes use indices 1..k.
            pimg = Image.new("P", size, 0)
            pal = list(BACKGROUNDS[scene.background])
            pd = ImageDraw.Draw(pimg)
            for n, ((c, s), (cx, cy, r)) in enumerate(zip(scene.pairs, scene.boxes, strict=True), start=1):
                pal += list(COLORS[c])
                draw_shape(pd, s, cx, cy, r, n)
            pimg.putpalette(pal)
            data, fmt, mode = encode(pimg, "PNG", transparency=0), "PNG", "P"
            pairs = frozenset(scene.pairs)
        elif case == "exif_rotated_jpeg":
            w, h = image_size, max(16, image_size * 3 // 4)  # not square: the rotation shows in the size
            scene = random_scene(rng, (w, h))
            caption = scene.caption
            data, ext, fmt, mode = exif_rotated(render(scene, (w, h))), ".jpg", "JPEG", "RGB"
            pairs = frozenset(scene.pairs)
        elif case == "rgba_png":
            rgba = img.convert("RGBA")
            alpha = Image.new("L", size, 128)  # shapes opaque, background half transparent
            mask = Image.new("L", size, 0)
            md = ImageDraw.Draw(mask)
            for (_c, s), (cx, cy, r) in zip(scene.pairs, scene.boxes, strict=True):
                draw_shape(md, s, cx, cy, r, 255)
            rgba.putalpha(Image.composite(Image.new("L", size, 255), alpha, mask))
            data, fmt, mode = encode(rgba, "PNG"), "PNG", "RGBA"
            pairs = frozenset(scene.pairs)
        elif case.startswith("markup_"):
            # Untrusted text for every consumer that renders ids or captions (the explorer page, notebooks).
            data, fmt, mode = encode(img, "PNG"), "PNG", "RGB"
            pairs = frozenset(scene.pairs)
            if case == "markup_caption_script":
                caption = f'<script>window.{XSS_FLAG}="caption"</script> {scene.caption}'
            else:  # no whitespace in the id (TREC run files are space-separated)
                doc_id = f"<img/src/onerror=window.{XSS_FLAG}=1>{slot}"
                caption = f'<img src=x onerror="window.{XSS_FLAG}=1"> {scene.caption}'
        pos = int(rng.integers(lo, len(blocks[shard]) + 1))
        bad = {"case": case, "expect": expect, "error_type": error_type, "why": why, "doc_id": doc_id,
               "image_format": fmt, "image_mode": mode}
        out.append((shard, pos, BadRow(slot, doc_id, data, ext, caption, pairs, bad)))
    return out
