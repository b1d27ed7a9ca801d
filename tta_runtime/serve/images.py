"""Request bodies to images: a multipart upload, a raw image body or base64 in JSON, with every limit
checked before the work it guards (body size while reading, pixel count from the header before decoding).

Status codes: 413 body or image too large, 415 a content type or image format the API does not take,
400 a malformed body (multipart, JSON, base64), 422 an image that claims a format but does not decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import numpy as np

from tta_runtime.decode import check_pixels, decode_bytes, image_format, image_header_size
from tta_runtime.errors import InvalidInputError
from tta_runtime.serve.settings import ServeError

FORMATS = ("png", "jpeg", "webp", "bmp")
RAW_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/x-ms-bmp", "application/octet-stream")
ACCEPTED = ("multipart/form-data (field 'image'), a raw image/png, image/jpeg, image/webp or image/bmp body "
            "(or application/octet-stream), or application/json {\"image\": \"<base64>\", ...}")


async def read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, declared or streamed, or when it has
    not arrived within `timeout` seconds (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServeError(400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a byte count")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit, "at least ")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ServeError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s "
                         f"({size:,} bytes so far); send it faster or smaller") from None
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache: request.form() parses these bytes, not the spent stream
    return body


def _too_large(size: int, limit: int, prefix: str = "") -> ServeError:
    return ServeError(413, "payload_too_large", f"the request body is {prefix}{size:,} bytes; this server takes at most "
                      f"{limit:,} (--max-body-bytes): send a smaller or more compressed image")


async def image_and_options(request: Any, body: bytes) -> tuple[bytes, dict[str, Any], str]:
    """(the encoded image, options given in the body, how it came) from a request whose body was read."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _multipart(request), {}, "multipart field 'image'"
    if ctype == "application/json":
        return _json(body)
    if ctype in RAW_TYPES:
        return body, {}, f"{ctype} body"
    got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
    raise ServeError(415, "unsupported_media_type", f"got {got}; send the image as {ACCEPTED}", field="Content-Type")


async def _multipart(request: Any) -> bytes:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=1, max_fields=0)
    except Exception as e:  # Starlette raises its own HTTPException / MultiPartException on a malformed body
        raise ServeError(400, "bad_multipart", f"the multipart body could not be parsed ({getattr(e, 'detail', e)}); "
                         "send one file field named 'image'") from None
    try:
        keys = list(form.keys())
        if keys != ["image"] or not isinstance(form["image"], UploadFile):
            raise ServeError(422, "bad_multipart", f"got multipart fields {keys[:8]}; expected exactly one file field named "
                             "'image' (options go in the query string)", field="image")
        return await form["image"].read()
    finally:
        await form.close()


def _json(body: bytes) -> tuple[bytes, dict[str, Any], str]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int past Python's digit limit
        raise ServeError(400, "bad_json", f"the body is not valid JSON ({str(e)[:120]}); expected "
                         "{\"image\": \"<base64>\", ...}") from None
    if not isinstance(data, dict):
        raise ServeError(422, "bad_json", f"the JSON body is a {type(data).__name__}; expected an object "
                         "{\"image\": \"<base64>\", ...}")
    text = data.pop("image", None)
    if not isinstance(text, str):
        raise ServeError(422, "missing_image", "the JSON body has no \"image\" string; put the image file's bytes "
                         "there as base64", field="image")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise ServeError(422, "bad_base64", f"a data URL must be base64 ({head[:60]!r}...)", field="image")
    try:
        return base64.b64decode(text, validate=True), data, "JSON field 'image'"
    except (binascii.Error, ValueError) as e:
        raise ServeError(400, "bad_base64", f"\"image\" is not valid base64 ({e}); encode the file's bytes with "
                         "standard base64", field="image") from None


def decode_image(data: bytes, max_pixels: int, where: str) -> np.ndarray:
    """The image in `data` as an (H, W[, C]) array in BGR order (OpenCV's), checked format first, then the
    pixel count from the header, and only then decoded."""
    if not data:
        raise ServeError(422, "empty_image", f"the {where} is empty; send the bytes of a PNG, JPEG, WebP or BMP file",
                         field="image")
    fmt = image_format(data)
    if fmt not in FORMATS:
        seen = f"a {fmt.upper()} image" if fmt else f"bytes starting {data[:8].hex(' ')!r} (no known image header)"
        raise ServeError(415, "unsupported_image", f"the {where} holds {seen}; this API takes PNG, JPEG, WebP or BMP",
                         field="image")
    size = image_header_size(data)
    if size is None:
        raise ServeError(422, "corrupt_image", f"the {where} starts like a {fmt.upper()} file but its header is cut "
                         f"short or invalid ({len(data):,} bytes in all)", field="image")
    try:
        check_pixels(size, max_pixels, f"a {fmt.upper()} image in the {where}")
    except InvalidInputError as e:
        raise ServeError(413, "image_too_large", str(e).replace("raise the max_pixels runtime option",
                         "ask the operator to raise --max-pixels"), field="image") from None
    try:
        array, _, _ = decode_bytes(data, max_pixels, f"the {fmt.upper()} image in the {where}")
    except InvalidInputError as e:
        raise ServeError(422, "corrupt_image", str(e), field="image") from None
    return array
