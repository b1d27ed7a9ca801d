"""`tta-runtime bench serve` (issue #19): a real server in a child process, real HTTP load from client
threads, an in-process predict loop beside it; the JSON's counts must add up and agree with the server's
own /metrics."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, prometheus-client) is not installed")

from tta_runtime.cli.main import main
from tta_runtime.hub import DEFAULT_MODEL

CLIENTS, PER_CLIENT, STEPS = 2, 10, 2


@pytest.mark.slow
def test_bench_serve_small_mix(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "serve", "--clients", str(CLIENTS), "--requests", str(PER_CLIENT), "--adapt-fraction", "0.5",
            "--steps", str(STEPS), "--threads", "1", "--warmup", "2", "--direct", "6", "--serial", "5",
            "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "HTTP load, adapt" in printed and "in-process predict" in printed and f"wrote {out}" in printed

    assert r["command"] == "tta-runtime " + " ".join(argv)
    assert r["settings"]["model"] == DEFAULT_MODEL and r["settings"]["threads"] == 1
    assert r["machine"]["cpu_count"] >= 1 and r["machine"]["torch"]
    assert r["timestamp"].endswith("+00:00")

    load = r["load"]
    n = CLIENTS * PER_CLIENT
    assert load["requests"] == n == sum(load["status_counts"].values())
    assert load["by_route"] == {"predict": n // 2, "adapt": n // 2}
    assert r["settings"]["adapt_requests_per_client"] == PER_CLIENT // 2
    assert load["status_counts"] == {"200": n} and load["errors"] == 0 and load["error_samples"] == [] and r["errors"] == 0
    assert load["connections_opened"] == CLIENTS  # one keep-alive connection per client, never re-opened
    lat = load["latency_ms"]
    assert lat["all"]["count"] == n and lat["predict"]["count"] == lat["adapt"]["count"] == n // 2
    for stats in (*lat.values(), r["serial"]["latency_ms"]["predict"], r["direct"]["latency_ms"]):
        assert 0 < stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert load["throughput_rps"] == pytest.approx(n / load["wall_s"], rel=1e-2)

    m = r["metrics"]  # the server's own counters over the load, beside the client's
    assert m["agrees_with_client"]
    assert m["requests"] == {"POST /v1/adapt 200": {"client": n // 2, "server": n // 2},
                             "POST /v1/predict 200": {"client": n // 2, "server": n // 2}}
    assert m["predictions"] == {"predict": n // 2, "adapt": n // 2}
    assert 0 < m["adaptation_steps"] == m["adaptation_steps_client"] == load["adaptation_steps_run"] <= n // 2 * STEPS
    assert set(m["server_mean_latency_ms"]) == {"predict", "adapt"}

    assert r["rss"]["before_bytes"] > 50 << 20 and r["rss"]["after_bytes"] > 50 << 20
    assert r["rss"]["peak_sampled_bytes"] >= max(r["rss"]["before_bytes"], r["rss"]["after_bytes"])
    assert r["serial"]["requests"] == r["serial"]["latency_ms"]["predict"]["count"] == 5 and r["serial"]["errors"] == 0
    assert r["direct"]["requests"] == r["direct"]["latency_ms"]["count"] == 6 and r["direct"]["torch_threads"] == 1
    assert r["same_weights"]  # the in-process loop ran the weights the server served
    for ratios in r["ratios"].values():
        assert all(v > 0 for v in ratios.values())


@pytest.mark.parametrize("bad, says", [
    (["--adapt-fraction", "1.5"], "adapt_fraction (--adapt-fraction) must be from 0 to 1; got 1.5"),
    (["--clients", "0"], "clients (--clients) must be from 1 to 256; got 0"),
    (["--taskset", "a-b"], "--taskset takes a CPU list"),
    (["--taskset", "4096"], "names CPUs this process may not use ([4096])"),
    (["--image", "/nonexistent.png"], "is not a readable regular file"),
])
def test_bench_serve_refuses_bad_options_before_starting(bad, says, capsys):
    assert main(["bench", "serve", "--no-progress", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err
