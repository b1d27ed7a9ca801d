"""The HTTP server, for real: `tta-runtime serve` in a child process on a free loopback port, spoken to over
HTTP (issue #19, acceptance 1). Results are checked against the same models run in this process."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, prometheus-client) is not installed")

from tta_runtime import Runtime  # noqa: E402
from tta_runtime.hub import sample_image_path  # noqa: E402
from tta_runtime.serve.engine import fingerprint  # noqa: E402
from tta_runtime.serve.process import ServerProcess  # noqa: E402
from tta_runtime.serve.schemas import ErrorResponse, ModelsResponse, PredictResponse  # noqa: E402

SAMPLE = sample_image_path().read_bytes()
PNG = {"Content-Type": "image/png"}
SEG, CLS = "slot-shapes-32", "digits-cnn-bn"


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def shifted(kind: str) -> bytes:
    """The sample under another shift: inverted colours, or a gray noisy copy."""
    rgb = cv2.cvtColor(cv2.imread(str(sample_image_path())), cv2.COLOR_BGR2RGB)
    if kind == "invert":
        return png(255 - rgb)
    noisy = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2) + np.random.default_rng(0).normal(0, 25, rgb.shape)
    return png(np.clip(noisy, 0, 255).astype(np.uint8))


def decode_png(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels by name
    pat = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$", re.M)
    m = pat.search(text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", SEG, "--model", CLS, "--workers", "2", "--max-sessions", "3", "--max-steps", "50", "-v"]
    with ServerProcess(args, log=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def seg_rt():
    return Runtime.from_pretrained(SEG)


def test_health_ready_openapi_and_page(server):
    assert server.json("GET", "/healthz") == (200, {"status": "ok"})
    status, ready = server.json("GET", "/readyz")
    assert status == 200 and ready["ready"] and ready["models"] == [SEG, CLS]
    status, spec = server.json("GET", "/openapi.json")
    assert status == 200
    assert {"/v1/predict", "/v1/adapt", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/adapt"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "application/json"} <= set(body)
    params = {p["name"] for p in spec["paths"]["/v1/adapt"]["post"]["parameters"]}
    assert {"model", "steps", "lr", "recipe", "adapt", "overlay", "X-Session-Id"} <= params
    status, headers, page = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<title>" in page.lower()


def test_models_lists_both_with_fingerprints_of_the_folders(server):
    status, data = server.json("GET", "/v1/models")
    assert status == 200
    models = {m.name: m for m in ModelsResponse.model_validate(data).models}
    assert models[SEG].task == "segmentation" and models[SEG].default and models[SEG].num_slots == 8
    assert models[CLS].task == "classification" and models[CLS].labels == [str(i) for i in range(10)]
    for name in (SEG, CLS):
        assert models[name].weights_fingerprint == [fingerprint(Runtime.from_pretrained(name).model)] * 2


def test_predict_segmenter_matches_the_runtime_in_process(server, seg_rt):
    status, headers, raw = server.request("POST", "/v1/predict", SAMPLE, PNG)
    assert status == 200, raw
    res = PredictResponse.model_validate_json(raw)
    assert headers["x-request-id"] == res.request_id
    local = seg_rt.predict(str(sample_image_path()))
    assert res.model == SEG and res.task == "segmentation" and res.adaptation is None and res.image_size == [96, 96]
    labels = decode_png(res.segmentation.label_map_png)
    assert labels.shape == (96, 96) and labels.dtype == np.uint8
    assert (labels == local.segmentation).mean() > 0.999  # same weights, same pixels (threads may differ)
    assert res.ood.score == pytest.approx(local.ood_score, rel=1e-4) and res.ood.is_ood == local.is_ood
    assert res.ood.threshold == pytest.approx(seg_rt.calibration.threshold)
    areas = np.array(res.segmentation.slot_areas)
    assert areas.shape == (8,) and areas.sum() == pytest.approx(1, abs=1e-4)
    assert res.segmentation.slots_used == int((areas > 0).sum()) == len(np.unique(labels))
    assert res.overlay_png is None and res.classification is None


def test_the_three_ways_to_send_an_image_agree(server):
    raw = server.json("POST", "/v1/predict", SAMPLE, PNG)[1]
    boundary = uuid.uuid4().hex
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + SAMPLE + f"\r\n--{boundary}--\r\n".encode()
    form = server.json("POST", "/v1/predict?overlay=1", multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"})[1]
    js = server.json("POST", "/v1/predict", json.dumps({"image": "data:image/png;base64," + base64.b64encode(SAMPLE).decode()}).encode(),
                     {"Content-Type": "application/json"})[1]
    for other in (form, js):
        assert other["segmentation"]["label_map_png"] == raw["segmentation"]["label_map_png"]
        assert other["ood"] == raw["ood"]
    overlay = decode_png(form["overlay_png"])
    assert overlay.shape == (96, 96, 3)


def test_adapt_segmenter_episodic_reports_its_steps_and_leaves_the_pool_untouched(server, seg_rt):
    status, data = server.json("POST", "/v1/adapt?steps=4&overlay=1", SAMPLE, PNG)
    assert status == 200, data
    rep = PredictResponse.model_validate(data).adaptation
    assert rep.steps_requested == rep.steps_run == 4 and len(rep.losses) == 4 and rep.mode == "episodic"
    assert rep.recipe == seg_rt.recipe.name and rep.time_s > 0
    local = seg_rt.adapt_and_predict(str(sample_image_path()), steps=4)
    np.testing.assert_allclose(rep.losses, local.adaptation.losses, rtol=1e-3)
    models = server.json("GET", "/v1/models")[1]["models"]
    assert models[0]["weights_fingerprint"] == [fingerprint(seg_rt.model)] * 2  # episodic: bit-exact after


def test_classifier_predict_and_adapt(server):
    digit = np.zeros((32, 32, 3), np.uint8)
    cv2.putText(digit, "7", (8, 27), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 3)
    local = Runtime.from_pretrained(CLS).predict(digit)
    status, data = server.json("POST", f"/v1/predict?model={CLS}&top_k=3&overlay=1", png(digit), PNG)
    assert status == 200, data
    c = PredictResponse.model_validate(data).classification
    assert c.label == local.label and c.label_name == str(local.label)
    assert [t.label for t in c.top_k][0] == c.label and len(c.top_k) == 3
    assert [t.prob for t in c.top_k] == sorted((t.prob for t in c.top_k), reverse=True)
    assert sum(c.probs) == pytest.approx(1, abs=1e-5) and c.confidence == pytest.approx(max(c.probs))
    assert decode_png(data["overlay_png"]).ndim == 3
    status, data = server.json("POST", f"/v1/adapt?model={CLS}&steps=2&lr=0.001", png(digit), PNG)
    assert status == 200 and data["adaptation"]["steps_run"] == 2 and data["adaptation"]["method"] == "tent"


def test_sessions_keep_separate_weights_each_as_if_alone(server):
    """Two sessions adapting on different shifts, frames interleaved on a 2-worker server, each end where the
    same frames in a fresh continual Runtime in this process end; neither matches the other or the pool."""
    frames = {"a": shifted("invert"), "b": shifted("noise")}
    sids = {k: f"test-{k}-{uuid.uuid4().hex[:8]}" for k in frames}
    for i in range(3):
        for k in frames:
            status, data = server.json("POST", "/v1/adapt", frames[k], {**PNG, "X-Session-Id": sids[k]})
            assert status == 200, data
            assert data["session"] == {"id": sids[k], "status": "new" if i == 0 else "continued", "frame": i + 1}
            assert data["adaptation"]["mode"] == "continual" and data["adaptation"]["recipe"] == "slot_tta_stream"
    probe = {k: server.json("POST", "/v1/predict", SAMPLE, {**PNG, "X-Session-Id": sids[k]})[1] for k in frames}
    pool = server.json("POST", "/v1/predict", SAMPLE, PNG)[1]
    mse = {k: probe[k]["segmentation"]["recon_mse"] for k in frames}
    assert len({mse["a"], mse["b"], pool["segmentation"]["recon_mse"]}) == 3
    assert probe["a"]["ood"]["score"] == pool["ood"]["score"]  # OOD scores always use the loaded weights
    for k in frames:
        rt = Runtime.from_pretrained(SEG, recipe="slot_tta_stream", mode="continual", steps=10)
        path = server.log.parent / f"{k}.png"
        path.write_bytes(frames[k])
        for i in range(3):
            rt.adapt_and_predict(str(path), seed=i)
        assert rt.predict(str(sample_image_path())).recon_mse == pytest.approx(mse[k], rel=2e-3)


def test_sessions_are_evicted_lru_and_say_so(server):
    before = server.request("GET", "/metrics")[2].decode()
    ids = [f"evict-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]  # max_sessions is 3
    for sid in ids:
        assert server.json("POST", "/v1/predict", SAMPLE, {**PNG, "X-Session-Id": sid})[1]["session"]["status"] == "new"
    data = server.json("POST", "/v1/predict", SAMPLE, {**PNG, "X-Session-Id": ids[0]})[1]
    assert data["session"] == {"id": ids[0], "status": "restarted_after_eviction", "frame": 1}
    after = server.request("GET", "/metrics")[2].decode()
    assert metric(after, "tta_sessions_ended", reason="evicted") >= metric(before, "tta_sessions_ended", reason="evicted") + 2
    assert metric(after, "tta_sessions_active") == 3
    assert server.json("DELETE", f"/v1/sessions/{ids[0]}") == (200, {"dropped": ids[0]})
    assert server.json("DELETE", f"/v1/sessions/{ids[0]}")[0] == 404


def test_metrics_move(server):
    text = server.request("GET", "/metrics")[2].decode()
    ok = metric(text, "tta_http_requests_total", route="/v1/adapt", method="POST", status="200")
    bad = metric(text, "tta_http_requests_total", route="/v1/adapt", method="POST", status="422")
    steps = metric(text, "tta_adaptation_steps_total", model=SEG)
    hist = metric(text, "tta_http_request_duration_seconds_count", route="/v1/adapt")
    assert server.json("POST", "/v1/adapt?steps=3", SAMPLE, PNG)[0] == 200
    assert server.json("POST", "/v1/adapt?steps=9999", SAMPLE, PNG)[0] == 422
    text = server.request("GET", "/metrics")[2].decode()
    assert metric(text, "tta_http_requests_total", route="/v1/adapt", method="POST", status="200") == ok + 1
    assert metric(text, "tta_http_requests_total", route="/v1/adapt", method="POST", status="422") == bad + 1
    assert metric(text, "tta_adaptation_steps_total", model=SEG) == steps + 3
    assert metric(text, "tta_http_request_duration_seconds_count", route="/v1/adapt") == hist + 2
    assert metric(text, "tta_ready") == 1 and "tta_ood_flagged_total" in text


@pytest.mark.parametrize("method,path,body,headers,status,field", [
    ("POST", "/v1/predict?model=nope", SAMPLE, PNG, 422, "model"),
    ("POST", "/v1/adapt?steps=51", SAMPLE, PNG, 422, "steps"),
    ("POST", "/v1/adapt?lr=-1", SAMPLE, PNG, 422, "lr"),
    ("POST", "/v1/adapt?recipe=../../etc/passwd", SAMPLE, PNG, 422, "recipe"),
    ("POST", "/v1/predict?steps=3", SAMPLE, PNG, 422, "steps"),
    ("POST", "/v1/predict?colour=red", SAMPLE, PNG, 422, "colour"),
    ("POST", "/v1/predict", b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("POST", "/v1/predict", b"GIF89a\x01\x00\x01\x00", {"Content-Type": "image/png"}, 415, "image"),
    ("POST", "/v1/predict", SAMPLE[:40], PNG, 422, "image"),
    ("POST", "/v1/predict", b"", PNG, 422, "image"),
    ("POST", "/v1/adapt", SAMPLE, {**PNG, "X-Session-Id": "bad id!"}, 422, "X-Session-Id"),
    ("POST", f"/v1/adapt?model={CLS}&recipe=tent_continual", SAMPLE, PNG, 422, "recipe"),  # would leak across clients
    ("GET", "/v1/predict", None, {}, 405, None),
    ("GET", "/nothing-here", None, {}, 404, None),
])
def test_client_mistakes_are_4xx_json_naming_the_field(server, method, path, body, headers, status, field):
    got, hdrs, raw = server.request(method, path, body, headers)
    assert got == status, raw
    err = ErrorResponse.model_validate_json(raw)
    assert err.error.status == status and err.error.message and err.request_id == hdrs["x-request-id"]
    assert err.error.field == field


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """One worker, no queue, an 8 s deadline: backpressure and timeouts."""
    args = ["--model", SEG, "--workers", "1", "--max-queue", "0", "--timeout", "8", "--max-steps", "5000"]
    srv = ServerProcess(args, log=tmp_path_factory.mktemp("tight") / "server.log").start()
    yield srv
    srv.stop()


def test_queue_full_is_429_and_a_timeout_is_504_leaving_weights_bit_exact(tight, seg_rt):
    answers: dict[str, tuple[int, object]] = {}
    slow = threading.Thread(target=lambda: answers.update(slow=tight.json("POST", "/v1/adapt?steps=5000", SAMPLE, PNG)))
    slow.start()
    time.sleep(0.5)
    status, headers, raw = tight.request("POST", "/v1/predict", SAMPLE, PNG)
    assert status == 429 and headers["retry-after"] == "1" and json.loads(raw)["error"]["type"] == "queue_full"
    assert tight.json("GET", "/healthz") == (200, {"status": "ok"})  # the busy worker does not block health checks
    slow.join(60)
    status, err = answers["slow"]
    assert status == 504 and err["error"]["type"] == "timeout"
    for _ in range(100):  # the cancelled adaptation stops at its next step and frees the worker
        if tight.request("POST", "/v1/predict", SAMPLE, PNG)[0] == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker never came free after the timed-out adaptation")
    status, data = tight.json("GET", "/v1/models")
    assert data["models"][0]["weights_fingerprint"] == [fingerprint(seg_rt.model)]


def test_graceful_shutdown_finishes_the_open_request(tight):
    answers: dict[str, tuple[int, object]] = {}
    t = threading.Thread(target=lambda: answers.update(r=tight.json("POST", "/v1/adapt?steps=3", SAMPLE, PNG)))
    t.start()
    for _ in range(200):  # SIGTERM once the request is in the server's hands
        if metric(tight.request("GET", "/metrics")[2].decode(), "tta_requests_in_flight") >= 1:
            break
        time.sleep(0.05)
    assert tight.stop(timeout=30) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown (never -9)
    t.join(5)
    assert answers["r"][0] == 200 and answers["r"][1]["adaptation"]["steps_run"] == 3
