"""Decoding: image files and PIL images to numpy arrays, and the layout check every numpy image passes.

Each function returns or checks an (H, W) or (H, W, C) array, C in (1, 3, 4), and raises
`InvalidInputError` naming what was received and what is expected.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Any

import numpy as np
import torch

from tta_runtime.device import import_cv2
from tta_runtime.errors import InvalidInputError

EXPECTED = (
    "expected one image: a numpy HxWxC array (C = 3 RGB, 1 gray, 4 RGBA; or HxW gray) of uint8, uint16 "
    "or float in [0, 1], a torch tensor (3, H, W) or (1, 3, H, W), a PIL image, or a path to an image file"
)


def read_file(path: str | os.PathLike[str], max_pixels: int) -> tuple[np.ndarray, str, str]:
    """Decode an image file with OpenCV; return (H, W) or (H, W, 3) BGR, 8 or 16 bit.

    Only regular files are read (a FIFO or device is refused before it is opened for reading, so nothing
    blocks), at most `file_size_limit(max_pixels)` bytes, and the size in the file's header is checked
    against `max_pixels` before anything is decoded (`image_header_size`): a decompression bomb costs
    the bytes of the file, not the pixels it declares."""
    name = os.fspath(path)
    if not isinstance(name, str):
        raise InvalidInputError(f"got a bytes path {name!r}; pass the path as str or pathlib.Path")
    if name == "" or name.isspace():
        raise InvalidInputError(f"got the string {name!r}, which is not a path; {EXPECTED}")
    data = _read_regular_file(name, file_size_limit(max_pixels))
    return decode_bytes(data, max_pixels, repr(name))


def decode_bytes(data: bytes, max_pixels: int, name: str = "the image") -> tuple[np.ndarray, str, str]:
    """Decode an encoded image (the bytes of a file or an upload); return (H, W) or (H, W, 3) BGR, 8 or 16 bit,
    its channel order and a description. The size in the header is checked against `max_pixels` before
    anything is decoded (`image_header_size`). `name` says what the bytes are in error messages."""
    cv2 = import_cv2()
    size = image_header_size(data)
    if size is None:
        raise InvalidInputError(
            f"{name} is not a readable image: its first bytes ({len(data)} in all) are no header of {HEADER_FORMATS} "
            "with a size, which is read before decoding. Decode other formats yourself and pass the pixels as an array"
        )
    check_pixels(size, max_pixels, f"{name} (size from its header)")
    decoded = None
    try:
        # ANYDEPTH keeps 16-bit files 16-bit; ANYCOLOR keeps gray files gray and drops alpha. Unlike
        # IMREAD_UNCHANGED, these flags apply the EXIF orientation, so phone photos come out upright.
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error:
        decoded = None
    if decoded is None:
        raise InvalidInputError(
            f"{name} is not a readable image (PNG, JPEG, BMP, TIFF, WebP, ...): OpenCV could not decode "
            f"its {len(data)} bytes"
        )
    what = f"{name} ({decoded.dtype}, shape {tuple(decoded.shape)})"
    return check_numpy_layout(decoded, what), "bgr", what


def image_format(data: bytes) -> str | None:
    """The format an encoded image's first bytes announce ("png", "jpeg", "bmp", "webp", "tiff", "gif", ...),
    or None. Only the magic bytes are read; `image_header_size` then reads the declared size."""
    for magic, fmt in _FORMATS:
        if data.startswith(magic) and (fmt != "webp" or data[8:12] == b"WEBP"):
            return fmt
    return None


def file_size_limit(max_pixels: int) -> int:
    """The largest image file read, in bytes: 16 bytes a pixel (4 float32 channels) plus 16 MiB of metadata."""
    return 16 * max_pixels + (16 << 20)


def _read_regular_file(name: str, limit: int) -> bytes:
    """The bytes of a regular file (at most `limit`). Opened non-blocking and checked with fstat before
    any read: a FIFO, device or socket is refused, never read (a FIFO without a writer would block)."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {name!r}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot open {name!r}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise InvalidInputError(f"{name!r} is a directory, not an image file")
        raise InvalidInputError(
            f"{name!r} is not a regular file (a FIFO, device or socket); image paths must name regular files: "
            "read the stream yourself and pass the decoded frames"
        )
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise InvalidInputError(f"cannot read {name!r}: {exc}") from None
    if len(data) > limit:
        raise InvalidInputError(
            f"{name!r} is larger than {limit} bytes, more than any image within max_pixels can take; downscale the "
            "image or raise the max_pixels runtime option"
        )
    return data


def check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    """Refuse an image of (height, width) over `max_pixels`, before its pixels are decoded or converted."""
    height, width = size
    if height * width > max_pixels:
        raise InvalidInputError(
            f"got {what}: {height}x{width} = {height * width} pixels is more than max_pixels = "
            f"{max_pixels}; downscale the image or raise the max_pixels runtime option"
        )


# PIL modes whose numpy view is already something _prepare_array understands; everything else (palette,
# 1-bit, CMYK, YCbCr, LA, ...) is converted to RGB by PIL first.
_PIL_DIRECT_MODES = ("RGB", "RGBA", "L", "I;16", "I;16L", "I;16B", "I", "F")


def pil_to_array(image: Any, max_pixels: int) -> tuple[np.ndarray, str, str]:
    """A PIL image -> (H, W) or (H, W, 3|4) numpy array, RGB. Its size (from the file's header: PIL
    decodes lazily) is checked against `max_pixels` before its pixels are read."""
    mode = getattr(image, "mode", None)
    what = f"PIL image mode={mode!r} size={getattr(image, 'size', None)}"
    size = getattr(image, "size", None)
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise InvalidInputError(f"got {what}; a PIL image with a (width, height) size is expected")
    check_pixels((size[1], size[0]), max_pixels, what)
    try:
        if mode not in _PIL_DIRECT_MODES:
            image = image.convert("RGB")
        arr = np.asarray(image)
    except Exception as exc:  # PIL loads lazily: a truncated file fails here, with its own error types
        raise InvalidInputError(f"could not read {what}: {exc}") from exc
    return check_numpy_layout(arr, what), "rgb", what


def check_numpy_layout(arr: np.ndarray, what: str) -> np.ndarray:
    """Check dtype kind, ndim, channel count and emptiness of a numpy image; return it unchanged."""
    kind = arr.dtype.kind
    if kind == "b":
        raise InvalidInputError(
            f"got {what}; bool images are ambiguous (0/1 or 0/255?): convert to uint8 (x * 255) or float"
        )
    if kind == "c":
        raise InvalidInputError(f"got {what}; complex images are not accepted: pass the real part or abs()")
    if kind not in "uif":
        raise InvalidInputError(f"got {what}; numeric pixels are expected (uint8, uint16 or float)")
    if arr.ndim == 4 and arr.shape[0] == 1:
        raise InvalidInputError(
            f"got {what}; numpy images must be HxWxC without a batch axis: pass arr[0]"
        )
    if arr.ndim == 4:
        raise InvalidInputError(
            f"got {what}; predict takes one image, not a batch of {arr.shape[0]}: pass one HxWxC image"
        )
    if arr.ndim not in (2, 3):
        raise InvalidInputError(f"got {what}; numpy images must be HxWxC (or HxW gray), got {arr.ndim}-D")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        gray = f"; a batch of {arr.shape[0]} gray images is (N, H, W, 1): pass arr[..., None]"
        if arr.shape[0] in (1, 3, 4):
            raise InvalidInputError(
                f"got {what}; it looks channels-first; numpy images must be HxWxC — use "
                f"arr.transpose(1, 2, 0){gray}"
            )
        raise InvalidInputError(
            f"got {what}; numpy images must be HxWxC with C = 3 (RGB), 1 (gray) or 4 (RGBA), "
            f"got C = {arr.shape[2]}{gray}"
        )
    if arr.size == 0:
        raise InvalidInputError(f"got {what}; the image is empty (a zero-sized axis)")
    return arr


def describe(x: object) -> str:
    """What a value is, for error messages: type, and dtype / shape / device where it has them."""
    if isinstance(x, np.ndarray):
        return f"numpy array dtype={x.dtype} shape={tuple(x.shape)}"
    if isinstance(x, torch.Tensor):
        shape = f"nested of {x.size(0)}" if x.is_nested else tuple(x.shape)  # a nested tensor has no single shape
        return f"torch.Tensor dtype={x.dtype} shape={shape} device={x.device}"
    if isinstance(x, str):
        return f"str {x!r}"
    return "an object of type " + f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")


# ----------------------------------------------------------------------------------------------------
# Image sizes from file headers, without decoding

HEADER_FORMATS = "PNG, JPEG, BMP, TIFF, WebP, GIF, PNM/PFM, Sun raster, Radiance HDR, AVIF, JPEG 2000"
_HEADER_SCAN = 1 << 20  # JPEG segments and ISO boxes are looked for in the first MiB


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) as an image file's header declares it, or None when the format is not one of
    `HEADER_FORMATS` or the header is cut short. Reads a few header fields only (no pixel data)."""
    try:
        for magic, parse in _PARSERS:
            if data.startswith(magic):
                size = parse(data)
                return size if size is not None and min(size) > 0 else None
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _png(d: bytes) -> tuple[int, int] | None:
    if d[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", d[16:24])
    return h, w


def _jpeg(d: bytes) -> tuple[int, int] | None:
    i, end = 2, min(len(d), _HEADER_SCAN)
    while i + 4 <= end:
        if d[i] != 0xFF:
            return None
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before the data
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame marker
            h, w = struct.unpack(">HH", d[i + 5 : i + 9])
            return h, w
        i += 2 + struct.unpack(">H", d[i + 2 : i + 4])[0]
    return None


def _bmp(d: bytes) -> tuple[int, int] | None:
    if struct.unpack("<I", d[14:18])[0] == 12:  # OS/2 core header
        w, h = struct.unpack("<HH", d[18:22])
        return h, w
    w, h = struct.unpack("<ii", d[18:26])
    return abs(h), abs(w)


def _tiff(d: bytes) -> tuple[int, int] | None:
    e = "<" if d[:2] == b"II" else ">"
    big = struct.unpack(e + "H", d[2:4])[0] == 43  # BigTIFF
    if big:
        offset = struct.unpack(e + "Q", d[8:16])[0]
        count, entry, head = struct.unpack(e + "Q", d[offset : offset + 8])[0], 20, 8
    else:
        offset = struct.unpack(e + "I", d[4:8])[0]
        count, entry, head = struct.unpack(e + "H", d[offset : offset + 2])[0], 12, 2
    found = {}
    for k in range(min(count, 4096)):
        p = offset + head + k * entry
        tag, typ = struct.unpack(e + "HH", d[p : p + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT, LONG or LONG8
            value = d[p + (12 if big else 8) :]
            found[tag] = struct.unpack(e + {3: "H", 4: "I", 16: "Q"}[typ], value[: {3: 2, 4: 4, 16: 8}[typ]])[0]
    return (found[257], found[256]) if len(found) == 2 else None


def _webp(d: bytes) -> tuple[int, int] | None:
    if d[8:12] != b"WEBP":
        return None
    chunk = d[12:16]
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", d[26:30])
        return h & 0x3FFF, w & 0x3FFF
    if chunk == b"VP8L" and d[20] == 0x2F:
        bits = struct.unpack("<I", d[21:25])[0]
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(d[27:30], "little") + 1, int.from_bytes(d[24:27], "little") + 1
    return None


def _gif(d: bytes) -> tuple[int, int] | None:
    w, h = struct.unpack("<HH", d[6:10])
    return h, w


def _pnm(d: bytes) -> tuple[int, int] | None:
    if d[1:2] not in b"123456fF" or len(d) < 3:
        return None
    tokens: list[bytes] = []
    for line in d[2:4096].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            return int(tokens[1]), int(tokens[0])
    return None


def _sun_raster(d: bytes) -> tuple[int, int] | None:
    w, h = struct.unpack(">II", d[4:12])
    return h, w


def _radiance(d: bytes) -> tuple[int, int] | None:
    head = d[:65536]
    end = head.find(b"\n\n")
    if end < 0:
        return None
    parts = head[end + 2 :].split(b"\n", 1)[0].split()  # e.g. "-Y 480 +X 640" (or X first for rotated files)
    dims = {parts[0][1:]: int(parts[1]), parts[2][1:]: int(parts[3])}
    return dims[b"Y"], dims[b"X"]


def _iso_box(d: bytes, box: bytes, skip: int, order: str) -> tuple[int, int] | None:
    """Largest (height, width) over the `box` boxes (AVIF 'ispe', JPEG 2000 'ihdr') in the first MiB."""
    head, best, i = d[:_HEADER_SCAN], None, 0
    while (i := head.find(box, i)) >= 0:
        a, b = struct.unpack(">II", head[i + 4 + skip : i + 12 + skip])
        size = (b, a) if order == "wh" else (a, b)
        best = size if best is None or size[0] * size[1] > best[0] * best[1] else best
        i += 4
    return best


def _j2k_codestream(d: bytes) -> tuple[int, int] | None:
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", d[8:24])  # the SIZ marker segment right after SOC
    return ysiz - yo, xsiz - xo


_PARSERS: tuple[tuple[bytes, Any], ...] = (
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"BM", _bmp),
    (b"II*\x00", _tiff), (b"MM\x00*", _tiff), (b"II+\x00", _tiff), (b"MM\x00+", _tiff),
    (b"RIFF", _webp),
    (b"GIF87a", _gif), (b"GIF89a", _gif),
    (b"P", _pnm),
    (b"\x59\xa6\x6a\x95", _sun_raster),
    (b"#?", _radiance),
    (b"\x00\x00\x00\x0cjP  ", lambda d: _iso_box(d, b"ihdr", 0, "hw")),
    (b"\xff\x4f\xff\x51", _j2k_codestream),
    (b"\x00\x00\x00", lambda d: _iso_box(d, b"ispe", 4, "wh") if d[4:8] == b"ftyp" else None),
)


_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"), (b"RIFF", "webp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"),
    (b"GIF87a", "gif"), (b"GIF89a", "gif"),
)
