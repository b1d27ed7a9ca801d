"""The page at / in a real headless Chromium against the real server (issue #19, acceptance 2): the bundled
OOD sample uploaded by the sample button, the file input and drag-and-drop; predict and adapt; what the page
shows is checked against the API's own answers; API errors reach the error box; nothing is fetched from
outside the server.

`TTA_SCREENSHOT=docs/img/serve_page.png pytest tests/test_serve_page.py -k sample_button` also writes the
README's screenshot (with the recipe's default steps instead of 10)."""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, prometheus-client) is not installed")

from playwright.sync_api import Page, sync_playwright  # the dev extra

from tta_runtime.hub import sample_image_path
from tta_runtime.serve.process import ServerProcess

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium executable on PATH (chromium, chromium-browser, "
                                "google-chrome); .ci/run installs Debian's `chromium` package")
# Headless, offline, as root: no sandbox (root), no calls home (the machine has no internet).
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SEG = "slot-shapes-32"
SAMPLE = sample_image_path()
SCREENSHOT = os.environ.get("TTA_SCREENSHOT")
RUN_TIMEOUT_MS = 280_000 if SCREENSHOT else 120_000  # the screenshot runs the recipe's default steps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(["--model", SEG, "--max-steps", "100", "--timeout", "300"], log=tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    """The page, loaded and ready; afterwards: no script error, and no request left the server's origin."""
    context = browser.new_context(viewport={"width": 1240, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    requests, errors = [], []
    pg.on("request", lambda r: requests.append(r.url))
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-state=ready]", timeout=30_000)
    yield pg
    context.close()
    assert errors == [], errors
    outside = [u for u in requests if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert outside == [], f"the page fetched from outside the server: {outside}"


def multipart(data: bytes, filename: str, ctype: str) -> tuple[bytes, dict[str, str]]:
    """The body a browser's FormData sends for one file field `image`."""
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


def api_predict(server, data: bytes) -> dict:
    status, body = server.json("POST", f"/v1/predict?model={SEG}&overlay=1", data, {"Content-Type": "image/png"})
    assert status == 200, body
    return body


def run(page: Page, mode: str, steps: str = "") -> None:
    page.select_option("#mode", mode)
    page.fill("#steps", steps)
    page.click("#run")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")


def image(page: Page, sel: str) -> dict:
    return page.eval_on_selector(sel, "e => ({src: e.getAttribute('src') || '', w: e.naturalWidth, h: e.naturalHeight,"
                                      " visible: e.checkVisibility()})")


def check_ood(page: Page, expected: dict) -> None:
    """The OOD score shown is the API's number for this image (to the digit; its full value in data-value)."""
    ood = expected["ood"]
    assert float(page.get_attribute("#ood-score", "data-value")) == ood["score"]
    assert page.inner_text("#ood-score") == f"{ood['score']:.3f}"
    verdict = "no calibration" if ood["is_ood"] is None else "out of distribution" if ood["is_ood"] else "in distribution"
    assert page.inner_text("#ood-verdict") == verdict


def test_adapt_on_the_sample_button(server, page):
    page.click("#sample")
    page.wait_for_function("document.querySelector('#file-name').textContent === 'ood_sample.png'")
    steps = "" if SCREENSHOT else "6"
    run(page, "adapt", steps)
    expected = api_predict(server, SAMPLE.read_bytes())

    inp, before, after = image(page, "#input"), image(page, "#masks-before"), image(page, "#masks-after")
    assert (inp["w"], inp["h"]) == (96, 96) and inp["src"].startswith("blob:")
    for img in (before, after):
        assert img["visible"] and img["src"].startswith("data:image/png;base64,") and (img["w"], img["h"]) == (96, 96)
    assert before["src"] == "data:image/png;base64," + expected["overlay_png"]  # predict is deterministic
    check_ood(page, expected)

    # the loss curve: one point per step's loss plus the final loss, on labelled axes
    n = int(steps or page.inner_text("#adapt-summary").split(" of ")[0])
    assert page.inner_text("#adapt-summary").startswith(f"{n} of {n} steps in ")
    assert page.get_attribute("#loss-line", "data-points") == str(n + 1)
    assert page.get_attribute("#loss-line", "d").count(",") == n + 1
    labels = page.eval_on_selector_all("#loss text.axis-label", "ts => ts.map(t => t.textContent)")
    assert labels == ["step", "loss"]
    # per-slot areas before and after, as many rows as slots that won pixels
    used = sum(a > 0 for a in expected["segmentation"]["slot_areas"])
    assert page.locator("#area-table tbody tr").count() >= used
    assert page.locator(".stack").count() == 2
    assert page.is_enabled("#run") and page.is_enabled("#sample")
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_adapt_on_an_uploaded_file_shows_working_while_it_runs(server, page):
    page.set_input_files("#file", str(SAMPLE))
    page.select_option("#mode", "adapt")
    page.fill("#steps", "3")
    page.click("#run")
    # while the requests run: controls disabled, a "working" status, results marked busy
    page.wait_for_selector("body[data-state=busy]", timeout=5_000)
    assert not page.is_enabled("#run") and not page.is_enabled("#file") and not page.is_enabled("#mode")
    assert page.inner_text("#status").startswith("Working")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert image(page, "#masks-after")["w"] == 96 and image(page, "#masks-before")["w"] == 96
    assert page.get_attribute("#loss-line", "data-points") == "4"
    check_ood(page, api_predict(server, SAMPLE.read_bytes()))
    assert page.is_enabled("#run") and page.is_hidden("#error")


def test_predict_on_a_dropped_image(server, page):
    data = SAMPLE.read_bytes()
    transfer = page.evaluate_handle("""b64 => { const t = new DataTransfer();
        t.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], 'dropped.png', {type: 'image/png'}));
        return t; }""", base64.b64encode(data).decode())
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.querySelector('#file-name').textContent === 'dropped.png'")
    run(page, "predict")
    expected = api_predict(server, data)
    assert image(page, "#masks-before")["src"] == "data:image/png;base64," + expected["overlay_png"]
    assert page.inner_text("#before-caption") == "Prediction"
    assert page.is_hidden("#after-figure") and page.is_hidden("#adaptation")  # predict: nothing adapted
    check_ood(page, expected)
    assert page.locator(".stack").count() == 1


def test_api_errors_reach_the_error_box(server, page):
    text = b"this is a text file, not an image\n"
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": text}])
    page.select_option("#mode", "adapt")
    page.click("#run")
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    status, body = server.json("POST", f"/v1/predict?model={SEG}&overlay=1", *multipart(text, "notes.txt", "text/plain"))
    assert status == 415, body
    assert page.is_visible("#error")
    assert page.inner_text("#error-message") == body["error"]["message"]
    assert f"415 {body['error']['type']}" in page.inner_text("#error")
    assert image(page, "#masks-before")["src"] == "" and page.is_enabled("#run")

    # an override the server refuses (over --max-steps): its 422 message, not a silent default
    page.set_input_files("#file", str(SAMPLE))
    page.fill("#steps", "1000")
    page.click("#run")
    page.wait_for_selector("body[data-state=error]", timeout=RUN_TIMEOUT_MS)
    status, body = server.json("POST", f"/v1/adapt?model={SEG}&overlay=1&steps=1000", SAMPLE.read_bytes(),
                               {"Content-Type": "image/png"})
    assert status == 422, body
    assert page.inner_text("#error-message") == body["error"]["message"]
    assert "steps" in body["error"]["message"]
