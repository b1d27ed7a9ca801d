"""At least 1,000 bad requests against a real server (issue #19, acceptance 3): every answer is a 4xx with a
JSON error body; afterwards the server is healthy, its memory grew by less than 50 MB, and its weights are
bit-exact to the model folder's.

The requests are generated from a fixed seed (reproducible), in families: truncated and corrupt images,
wrong content types and formats, huge declared dimensions, oversize bodies, bad JSON and base64, bad
multipart bodies, bad options, bad session ids, wrong methods and unknown routes."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, prometheus-client) is not installed")

from tta_runtime import Runtime  # noqa: E402
from tta_runtime.hub import sample_image_path  # noqa: E402
from tta_runtime.serve.engine import fingerprint  # noqa: E402
from tta_runtime.serve.process import ServerProcess  # noqa: E402

SAMPLE = sample_image_path().read_bytes()
MAX_BODY = 64 << 10
Request = tuple[str, str, bytes | None, dict[str, str]]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and ends right after its (valid-CRC) IHDR chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def huge_images(rng: np.random.Generator) -> Iterator[bytes]:
    """Headers of PNG, JPEG, BMP and WebP files declaring more than 4096 x 4096 pixels (no pixel data follows)."""
    w, h = (int(v) for v in rng.integers(4100, 60000, size=2))
    yield png_header(w, h)
    yield b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", h, w) + b"\x03" + bytes(9)
    yield b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)
    yield b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4) + (min(w, 16384) - 1).to_bytes(3, "little") + (min(h, 16384) - 1).to_bytes(3, "little")


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "fuzzb") -> tuple[bytes, dict[str, str]]:
    body = b""
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def bad_requests(seed: int = 0) -> Iterator[Request]:
    rng = np.random.default_rng(seed)
    png = {"Content-Type": "image/png"}
    route = lambda: str(rng.choice(["/v1/predict", "/v1/adapt"]))  # noqa: E731
    for _ in range(120):  # truncated images
        yield "POST", route(), SAMPLE[: int(rng.integers(1, len(SAMPLE) - 1))], png
    for _ in range(120):  # corrupt images: bytes flipped after the signature
        b = bytearray(SAMPLE)
        for j in rng.integers(8, len(SAMPLE), size=int(rng.integers(1, 8))):
            b[j] ^= int(rng.integers(1, 256))
        yield "POST", route(), bytes(b), png
    for _ in range(30):  # huge declared dimensions, each format, raw and as JSON
        for data in huge_images(rng):
            yield "POST", route(), data, {"Content-Type": "application/octet-stream"}
            yield "POST", route(), json.dumps({"image": base64.b64encode(data).decode()}).encode(), {"Content-Type": "application/json"}
    for _ in range(60):  # wrong content types, and images of formats the API does not take
        ctype = str(rng.choice(["text/plain", "application/xml", "image/svg+xml", "video/mp4", "application/x-www-form-urlencoded", ""]))
        yield "POST", route(), SAMPLE, {"Content-Type": ctype} if ctype else {}
        other = rng.choice([b"GIF89a" + bytes(20), b"II*\x00" + bytes(20), b"%PDF-1.4" + bytes(20), bytes(rng.integers(0, 256, 64, dtype=np.uint8))])
        yield "POST", route(), bytes(other), png
    for _ in range(40):  # oversize bodies: declared, sent, and streamed in chunks with no declared length
        yield "POST", route(), bytes(MAX_BODY + int(rng.integers(1, 4096))), png
        yield "POST", route(), SAMPLE + bytes(MAX_BODY), {"Content-Type": "application/json"}
        yield "POST", route(), [SAMPLE] * (MAX_BODY // len(SAMPLE) + 2), png  # a list: sent chunked
    for _ in range(30):  # bad JSON and base64
        yield "POST", route(), bytes(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8)), {"Content-Type": "application/json"}
        for doc in ([1, 2], {"img": "x"}, {"image": 12}, {"image": "@@not base64@@"}, {"image": "data:image/png,xyz"},
                    {"image": base64.b64encode(SAMPLE).decode(), "steps": "many"}, "[" * 5000,
                    '{"image": "x", "steps": 1' + "1" * 5000 + "}"):  # an int past Python's digit limit
            yield "POST", route(), (doc if isinstance(doc, str) else json.dumps(doc)).encode(), {"Content-Type": "application/json"}
    for _ in range(25):  # bad multipart bodies
        yield ("POST", route(), *multipart([("picture", SAMPLE, "a.png")]))
        yield ("POST", route(), *multipart([("image", SAMPLE, "a.png"), ("image", SAMPLE, "b.png")]))
        yield ("POST", route(), *multipart([("image", b"hello", None)]))
        yield "POST", route(), b"--nope\r\n\r\n", {"Content-Type": "multipart/form-data"}
    options = ["steps=-1", "steps=abc", "steps=100000000", "steps=1.5", "lr=0", "lr=nan", "lr=inf", "lr=-3", "lr=2",
               "recipe=nope", "recipe=../adapters/tent", "adapt=sometimes", "model=nope", "top_k=0", "top_k=x",
               "overlay=maybe", "colour=red", "steps=1&steps=2", "model=" + "m" * 300]
    for _ in range(12):  # bad options (every one refused before any work)
        for q in options:
            yield "POST", f"/v1/adapt?{q}", SAMPLE, png
        yield "POST", "/v1/predict?steps=2", SAMPLE, png
    for sid in ["", " ", "a b", "x" * 129, "ünïcode", "semi;colon", "slash/es"] * 5:  # bad session ids
        yield "POST", route(), SAMPLE, {**png, "X-Session-Id": sid}
    for _ in range(10):  # wrong methods and routes
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            yield method, route(), None, {}
        yield "POST", "/healthz", SAMPLE, png
        yield "POST", "/v1/models", SAMPLE, png
        yield "GET", "/v1/nothing", None, {}
        yield "GET", "/v1/samples/../../etc/passwd", None, {}
        yield "GET", "/static/../app.py", None, {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with ServerProcess(["--max-body-bytes", str(MAX_BODY), "--workers", "1"], log=log) as srv:
        yield srv


def test_a_thousand_bad_requests_get_4xx_json_and_change_nothing(server):
    requests = list(bad_requests())
    assert len(requests) >= 1000
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)

    def send(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
        nonlocal conn
        for attempt in (0, 1):  # the server may close a keep-alive connection after an error: reconnect once
            try:
                conn.request(method, path, body=body, headers=headers, encode_chunked=isinstance(body, list))
                resp = conn.getresponse()
                return resp.status, resp.getheader("content-type", ""), resp.read()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    for req in requests[:50]:  # warm-up: allocator pools and lazy imports settle before the baseline
        send(*req)
    rss0 = server.rss_bytes()
    statuses: Counter[int] = Counter()
    wrong = []
    for method, path, body, headers in requests:
        status, ctype, raw = send(method, path, body, headers)
        statuses[status] += 1
        ok = 400 <= status < 500 and ctype.startswith("application/json")
        if ok:
            err = json.loads(raw)
            ok = err["error"]["status"] == status and bool(err["error"]["message"]) and bool(err["request_id"])
        if not ok:
            wrong.append((method, path[:60], headers.get("Content-Type"), (body or b"")[:16], status, raw[:200]))
    conn.close()
    rss1 = server.rss_bytes()
    assert not wrong, f"{len(wrong)} of {len(requests)} answers were not a 4xx JSON error, e.g. {wrong[:3]}"
    assert {400, 404, 405, 413, 415, 422} <= set(statuses), statuses
    assert server.json("GET", "/healthz") == (200, {"status": "ok"})
    assert rss1 - rss0 < 50 << 20, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MB over {len(requests)} bad requests"
    models = server.json("GET", "/v1/models")[1]["models"]
    assert models[0]["weights_fingerprint"] == [fingerprint(Runtime.from_pretrained(models[0]["name"]).model)]
    status, data = server.json("POST", "/v1/predict", SAMPLE, {"Content-Type": "image/png"})
    assert status == 200 and data["segmentation"]["num_slots"] == 8  # and it still answers good requests
