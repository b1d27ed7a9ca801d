"""The app on Ray Serve, for real (issue #20): a local Ray cluster (num_cpus=2) on loopback, started once for
this module, with 2 worker replicas behind the HTTP proxy. Checked:
- both replicas answer;
- sessions stay on their replica and keep their own weights;
- batching gives what one-at-a-time gives;
- a killed replica costs only 503s with a JSON body, and it is replaced;
- its sessions say they restarted.

Set TTA_RAY_FAULT_JSON=path to write the fault test's counts (docs/results/serve/ray_fault.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
ray = pytest.importorskip("ray", reason="the ray extra (ray[serve]) is not installed: pip install 'tta-runtime[ray]'")

from tta_runtime import Runtime  # noqa: E402
from tta_runtime.hub import sample_image_path  # noqa: E402
from tta_runtime.serve import ray_app  # noqa: E402
from tta_runtime.serve.process import ServerProcess, free_port  # noqa: E402
from tta_runtime.serve.settings import RaySettings, ServeSettings  # noqa: E402

SAMPLE = sample_image_path().read_bytes()
PNG = {"Content-Type": "image/png"}
SEG = "slot-shapes-32"
RAY = RaySettings(replicas=2, num_cpus=1, max_batch_size=8, batch_wait_timeout_s=0.05, health_check_period_s=1)


def variant(k: int) -> bytes:
    """The sample with its colour channels rolled and brightness scaled: a different image per k."""
    rgb = cv2.cvtColor(cv2.imread(str(sample_image_path())), cv2.COLOR_BGR2RGB)
    out = np.clip(np.roll(rgb, k % 3, axis=2) * (0.6 + 0.1 * k), 0, 255).astype(np.uint8)
    return cv2.imencode(".png", cv2.cvtColor(out, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    ray_app.start(ServeSettings(models=(SEG,), max_sessions=8), RAY, port=port, num_cpus=2)
    client = ServerProcess(port=port)  # only its HTTP helpers: the server is Ray's proxy
    for _ in range(600):
        try:
            if client.request("GET", "/readyz", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    yield client
    ray_app.stop()


def parallel(fn, args_list, threads=4):
    out = [None] * len(args_list)

    def run(idx):
        for i in idx:
            out[i] = fn(*args_list[i])

    ts = [threading.Thread(target=run, args=(range(t, len(args_list), threads),)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return out


def test_both_replicas_answer_with_their_id_in_a_header(cluster):
    got = parallel(lambda: cluster.request("POST", "/v1/predict", SAMPLE, PNG), [()] * 24)
    assert all(status == 200 for status, _, _ in got), [g[2][:200] for g in got if g[0] != 200]
    replicas = {h["x-replica-id"] for _, h, _ in got}
    assert len(replicas) == 2 and replicas == {n.rsplit("#", 1)[1] for n in ray_app.replica_actors(RAY)}
    assert all(json.loads(b)["replica"] == h["x-replica-id"] for _, h, b in got)


def test_sessions_stick_to_their_replica_and_keep_their_own_weights(cluster):
    sids = [f"ray-{k}-{uuid.uuid4().hex[:6]}" for k in range(3)]

    def frames(k):
        homes, statuses = set(), []
        for f in range(20):
            status, h, raw = cluster.request("POST", "/v1/adapt?steps=2", variant(k), {**PNG, "X-Session-Id": sids[k]})
            assert status == 200, raw[:300]
            body = json.loads(raw)
            homes.add(h["x-replica-id"])
            statuses.append(body["session"]["status"])
            assert body["session"]["frame"] == f + 1 and body["adaptation"]["mode"] == "continual"
        return homes, statuses

    runs = parallel(frames, [(k,) for k in range(3)], threads=3)
    for homes, statuses in runs:
        assert len(homes) == 1, f"a session moved between replicas: {homes}"
        assert statuses == ["new"] + ["continued"] * 19
    probe = [json.loads(cluster.request("POST", "/v1/predict", SAMPLE, {**PNG, "X-Session-Id": s})[2]) for s in sids]
    loaded = json.loads(cluster.request("POST", "/v1/predict", SAMPLE, PNG)[2])
    mse = [p["segmentation"]["recon_mse"] for p in probe] + [loaded["segmentation"]["recon_mse"]]
    assert len(set(mse)) == 4, f"sessions share weights with each other or with the loaded model: {mse}"
    assert loaded["segmentation"]["recon_mse"] == pytest.approx(Runtime.from_pretrained(SEG).predict(str(sample_image_path())).recon_mse, rel=1e-4)


def test_batched_predictions_equal_one_at_a_time(cluster):
    images = [variant(k) for k in range(8)]
    got = parallel(lambda img: cluster.request("POST", "/v1/predict", img, PNG), [(img,) for img in images], threads=8)
    bodies = [json.loads(b) for _, _, b in got]
    assert all(s == 200 for s, _, _ in got)
    assert max(b["batched"] or 1 for b in bodies) > 1, "no two requests shared a forward pass"
    rt = Runtime.from_pretrained(SEG)
    for img, body in zip(images, bodies):
        local = rt.predict(cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR), channel_order="bgr")
        labels = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(body["segmentation"]["label_map_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert (labels == local.segmentation).mean() > 0.999
        assert body["segmentation"]["recon_mse"] == pytest.approx(local.recon_mse, rel=1e-4, abs=1e-7)
        assert body["ood"]["score"] == pytest.approx(local.ood_score, rel=1e-4, abs=1e-6)


def test_batched_adaptations_equal_one_at_a_time(cluster):
    """Episodic adapt requests with a recipe that has an [execution] section are adapted together (each image
    with its own weights); each answer matches that image adapted alone in this process."""
    images = [variant(k) for k in range(6)]
    path = "/v1/adapt?recipe=slot_tta_batched&steps=3"
    got = parallel(lambda img: cluster.request("POST", path, img, PNG), [(img,) for img in images], threads=6)
    assert all(s == 200 for s, _, _ in got), [b[:200] for s, _, b in got if s != 200]
    bodies = [json.loads(b) for _, _, b in got]
    assert max(b["batched"] or 1 for b in bodies) > 1, "no two adaptations ran together"
    rt = Runtime.from_pretrained(SEG, recipe="slot_tta_batched", steps=3)
    for img, body in zip(images, bodies):
        local = rt.adapt_and_predict(cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR), channel_order="bgr")
        assert body["adaptation"]["steps_run"] == local.adaptation.steps_run == 3
        np.testing.assert_allclose(body["adaptation"]["losses"], local.adaptation.losses, rtol=1e-3)
        assert body["segmentation"]["recon_mse"] == pytest.approx(local.recon_mse, rel=1e-3)


def test_a_killed_replica_costs_only_503s_and_comes_back(cluster):
    before = set(ray_app.replica_actors(RAY))
    # sessions until one lives on each replica; the first replica's will be killed
    homes: dict[str, str] = {}
    for k in range(12):
        sid = f"fault-{k}-{uuid.uuid4().hex[:6]}"
        status, h, _ = cluster.request("POST", "/v1/adapt?steps=1", SAMPLE, {**PNG, "X-Session-Id": sid})
        assert status == 200
        homes[sid] = h["x-replica-id"]
        if len(set(homes.values())) == 2:
            break
    victim_id = sorted(set(homes.values()))[0]
    victim = next(n for n in before if n.endswith("#" + victim_id))
    counts: Counter[str] = Counter()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, headers, raw = cluster.request("POST", "/v1/predict", SAMPLE, PNG, timeout=60)
            except Exception as e:  # a hang past the timeout or a dropped connection: never acceptable
                counts[f"exception {type(e).__name__}"] += 1
                continue
            if status == 200:
                counts["200"] += 1
            elif status == 503 and headers.get("content-type", "").startswith("application/json") and json.loads(raw)["error"]:
                counts["503 json"] += 1
            else:
                counts[f"{status} {raw[:80]!r}"] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    # a long adaptation certainly in flight on the victim when it dies: it must come back as a 503 with a JSON body
    lost_sid = next(s for s, home in homes.items() if home == victim_id)
    in_flight: dict[str, tuple[int, dict[str, str], bytes]] = {}
    long = threading.Thread(target=lambda: in_flight.update(r=cluster.request(
        "POST", "/v1/adapt?steps=1000", SAMPLE, {**PNG, "X-Session-Id": lost_sid}, timeout=120)))
    for t in [*threads, long]:
        t.start()
    time.sleep(2)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    replaced = replaced_s = served_s = None
    while time.monotonic() - t_kill < 180 and replaced is None:
        now = set(ray_app.replica_actors(RAY))
        if len(now) == 2 and victim not in now:
            replaced, replaced_s = (now - before).pop(), time.monotonic() - t_kill
        time.sleep(0.5)
    new_id = replaced.rsplit("#", 1)[1] if replaced else None
    served_by_new = False
    while new_id and time.monotonic() - t_kill < 240 and not served_by_new:
        served_by_new = cluster.request("POST", "/v1/predict", SAMPLE, PNG)[1].get("x-replica-id") == new_id
        served_s = time.monotonic() - t_kill
    stop.set()
    for t in [*threads, long]:
        t.join(120)
    status, headers, raw = in_flight["r"]
    in_flight_answer = {"status": status, "type": json.loads(raw)["error"]["type"] if status != 200 else None}
    # sessions that lived on the killed replica say so on their next frame
    lost = [s for s, home in homes.items() if home == victim_id]
    kept = [s for s, home in homes.items() if home != victim_id]
    statuses = {s: json.loads(cluster.request("POST", "/v1/adapt?steps=1", SAMPLE, {**PNG, "X-Session-Id": s})[2])["session"]["status"]
                for s in lost + kept}
    report = {
        "command": "TTA_RAY_FAULT_JSON=docs/results/serve/ray_fault.json pytest tests/test_serve_ray.py -k killed",
        "replicas": RAY.replicas, "load_threads": 4, "responses": dict(counts),
        "in_flight_adaptation_on_killed_replica": in_flight_answer,
        "replacement_running_after_s": None if replaced_s is None else round(replaced_s, 1),
        "replacement_served_after_s": None if served_s is None else round(served_s, 1), "new_replica_served": served_by_new, "sessions_on_killed_replica": {s: statuses[s] for s in lost},
        "sessions_elsewhere": {s: statuses[s] for s in kept},
    }
    if os.environ.get("TTA_RAY_FAULT_JSON"):
        Path(os.environ["TTA_RAY_FAULT_JSON"]).parent.mkdir(parents=True, exist_ok=True)
        Path(os.environ["TTA_RAY_FAULT_JSON"]).write_text(json.dumps(report, indent=2) + "\n")
    assert set(counts) <= {"200", "503 json"}, report
    assert in_flight_answer == {"status": 503, "type": "replica_lost"} and headers["content-type"].startswith("application/json"), report
    assert counts["200"] > 0 and replaced is not None and served_by_new, report
    assert all(statuses[s] == "restarted_on_another_replica" for s in lost) and lost, report
    assert all(statuses[s] == "continued" for s in kept), report


def test_config_out_is_a_serve_config_with_fractional_gpus(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    r = subprocess.run([sys.executable, "-m", "tta_runtime.cli", "serve", "--ray", "--config-out", str(out), "--replicas", "3",
                        "--num-gpus", "0.5", "--device", "cuda", "--model", SEG, "--model", "digits-cnn-bn"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import yaml

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    app = cfg.applications[0]
    assert app.import_path == "tta_runtime.serve.ray_app:app_builder"
    worker = app.deployments[0]
    assert worker.num_replicas == 3 and worker.ray_actor_options.num_gpus == 0.5 and app.args["serve"]["device"] == "cuda"
    cpu = subprocess.run([sys.executable, "-m", "tta_runtime.cli", "serve", "--ray", "--config-out", str(tmp_path / "x.yaml"),
                          "--num-gpus", "0.5"], capture_output=True, text=True, timeout=120)
    assert cpu.returncode == 2 and "--device cuda" in cpu.stderr  # GPUs reserved for a model left on the CPU: refused
    built = ray_app.app_builder(app.args)  # what `serve run` builds from it
    assert type(built).__name__ == "Application"


def test_without_ray_the_error_names_the_extra_and_nothing_else_imports_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from tta_runtime.cli.main import main\n"
            "raise SystemExit(main(['serve', '--ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tta-runtime[ray]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    pkg = Path(__file__).resolve().parents[1] / "tta_runtime"
    importers = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
                 if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())}
    assert importers == {"serve/ray_app.py"}
