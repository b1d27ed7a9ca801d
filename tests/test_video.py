"""Streaming video: real files written by OpenCV, the reader thread's life, policies, robustness, stats, CLI.

Most tests run the tiny random model (16x16, 3 slots: milliseconds per frame), because they test the
stream, not the model; the ones about continual adaptation and the OOD gate use the shipped model on a
few frames. Every test checks that no reader thread is left behind.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

import tta_runtime as tta
from tta_runtime.cli.main import main
from tta_runtime.data.video import SHIFT_KINDS, make_shifted_video, shifted_frames
from tta_runtime.evaluation.bench_stream import bench_stream
from tta_runtime.video import (
    CollapseMonitor,
    SceneCutDetector,
    StreamError,
    load_ground_truth,
    stream,
)
from tta_runtime.video import sources
from tta_runtime.video.stats import _LogHistogram, _Series

READER = "tta-stream-reader"


def readers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == READER and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leftover_reader() -> Iterator[None]:
    yield
    assert not readers_alive(), "a stream left its reader thread running"


@pytest.fixture
def tiny(tiny_model_dir: pathlib.Path) -> tta.Runtime:
    return tta.Runtime.from_pretrained(tiny_model_dir)


def write_mp4(path: pathlib.Path, frames: list[np.ndarray], fps: float = 20.0, fourcc: str = "mp4v") -> pathlib.Path:
    """Write RGB frames with OpenCV (converted to the BGR the writer takes)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_all(path: pathlib.Path) -> tuple[int, tuple[int, int], float]:
    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, f = cap.read()
        if not ok:
            break
        n, size = n + 1, f.shape[:2]
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return n, size, fps


def frames_of(n: int, size: int = 48, kind: str = "textured_background", seed: int = 0) -> list[np.ndarray]:
    return [f for f, _ in shifted_frames(n, kind=kind, size=size, seed=seed)]


# ----------------------------------------------------------------------------------------------------
# The generator


def test_generated_video_and_masks_round_trip(tmp_path: pathlib.Path) -> None:
    v = make_shifted_video(tmp_path / "g.mp4", 12, shift_at=5, size=48, fps=10, seed=3)
    n, size, fps = read_all(v.video)
    assert (n, size, fps) == (12, (48, 48), 10.0)
    with np.load(v.masks) as data:
        inst, shift_at = data["instances"], int(data["shift_at"])
    assert inst.shape == (12, 48, 48) and inst.dtype == np.uint8 and shift_at == 5
    pairs = list(shifted_frames(12, shift_at=5, size=48, seed=3))
    assert all(np.array_equal(m, ids) for m, (_, ids) in zip(inst, pairs))  # masks exact, deterministic
    ids = set(np.unique(inst)) - {0}
    assert 2 <= len(ids) <= 4 and ids <= {1, 2, 3, 4}
    # the objects move smoothly: a few pixels change between frames, not the whole picture
    moved = [(inst[t] != inst[t + 1]).mean() for t in range(11)]
    assert 0 < np.mean(moved) < 0.1


def test_frames_before_the_shift_do_not_depend_on_the_kind() -> None:
    runs = {k: list(shifted_frames(6, shift_at=3, kind=k, size=40, seed=1)) for k in SHIFT_KINDS}
    first = runs[SHIFT_KINDS[0]]
    for kind, frames in runs.items():
        for t in range(6):
            assert np.array_equal(frames[t][1], first[t][1]), "masks never depend on the kind"
            same = np.array_equal(frames[t][0], first[t][0])
            assert same if t < 3 else (same == (kind == SHIFT_KINDS[0])), (kind, t)


def test_generator_rejects_bad_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(tta.ConfigError, match="shift kind"):
        next(shifted_frames(4, kind="fog"))
    with pytest.raises(tta.ConfigError, match="shift_at"):
        next(shifted_frames(4, shift_at=9))
    with pytest.raises(tta.ConfigError, match=".mp4"):
        make_shifted_video(tmp_path / "x.avi", 4)


# ----------------------------------------------------------------------------------------------------
# Files in, annotated video out


def test_file_stream_writes_annotated_video_with_same_count_and_size(tmp_path: pathlib.Path, tiny: tta.Runtime) -> None:
    v = make_shifted_video(tmp_path / "in.mp4", 10, size=64, fps=12, seed=0)
    out = tmp_path / "out" / "annotated.mp4"
    with stream(tiny, v.video, steps_per_frame=1, ground_truth=v.masks, out=out) as s:
        got = list(s)
    assert [f.index for f in got] == list(range(10))
    assert all(f.result.segmentation.shape == (64, 64) and f.annotated.shape == (64, 64, 3) for f in got)
    assert read_all(out) == (10, (64, 64), 12.0)  # same count, size and rate as the source
    d = s.stats.to_dict()
    assert d["frames"] == {"in": 10, "processed": 10, "dropped": 0, "skipped_stride": 0, "invalid": 0, "unreadable": 0, "written": 10}
    assert d["source_fps"] == 12.0 and d["source_frames"] == 10 and d["frame_size"] == [64, 64]
    assert d["stop_reason"] == "end of file"
    lat = d["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] * 1.02
    assert d["adaptation"]["steps_total"] == sum(f.steps for f in got) == 10  # adapt="always", 1 step each
    assert d["fg_ari"]["frames"] == 10 and d["fg_ari"]["mean"] == pytest.approx(np.mean([f.fg_ari for f in got]))
    json.dumps(d)  # JSON-ready


def test_opencv_frames_are_converted_from_bgr(tmp_path: pathlib.Path, tiny: tta.Runtime) -> None:
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220  # RGB red; the file stores it as BGR (0, 0, 220)
    path = write_mp4(tmp_path / "red.mp4", [red] * 3)
    with stream(tiny, path, adapt="never") as s:
        image = next(s).result.image
    assert image[..., 0].mean() > 180 and image[..., 2].mean() < 40
    # an iterable of BGR frames with channel_order="bgr" gives the same RGB picture
    bgr = np.ascontiguousarray(red[..., ::-1])
    with stream(tiny, [bgr], adapt="never", channel_order="bgr") as s:
        assert np.array_equal(next(s).result.image, red)
    with pytest.raises(tta.ConfigError, match="OpenCV sources"):
        stream(tiny, path, channel_order="rgb")


def test_stride_and_max_frames(tiny: tta.Runtime) -> None:
    frames = frames_of(12, size=32)
    with stream(tiny, frames, adapt="never", stride=3) as s:
        assert [f.index for f in s] == [0, 3, 6, 9]
    assert s.stats.frames_in == 12 and s.stats.frames_skipped_stride == 8
    with stream(tiny, np.stack(frames), adapt="never", max_frames=5) as s:
        assert len(list(s)) == 5
    assert s.stats.stop_reason == "max_frames"


def test_progress_is_one_bar_for_the_whole_stream(tiny: tta.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    bars: list[_Bar] = []

    class _Bar:
        def __init__(self, *args, **kwargs) -> None:
            self.kwargs, self.n, self.closed = kwargs, 0, False
            bars.append(self)

        def update(self, n: int = 1) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    with stream(tiny, np.stack(frames_of(6, size=32)), steps_per_frame=1, stride=2, progress=True) as s:
        assert len(list(s)) == 3
    assert len(bars) == 1, "one bar for the stream, never one per frame or adaptation step"
    assert bars[0].kwargs["total"] == 3 and bars[0].n == 3 and bars[0].closed
    with stream(tiny, frames_of(2, size=32), adapt="never") as s:
        list(s)
    assert len(bars) == 1  # progress=False: no bar at all


def test_the_stream_loads_nothing_from_the_lab(tiny_model_dir: pathlib.Path) -> None:
    """A stream over frames imports no data generator, training loop, evaluation or CLI module.

    Measured as what the stream adds to the modules the runtime itself loaded (the runtime's own
    imports are tested with the runtime)."""
    code = (
        "import sys, numpy as np, tta_runtime as tta\n"
        f"rt = tta.Runtime.from_pretrained({str(tiny_model_dir)!r})\n"
        "before = set(sys.modules)\n"
        "from tta_runtime.video import stream\n"
        "frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)\n"
        "with stream(rt, frames, steps_per_frame=1, annotate=True) as s:\n"
        "    assert len(list(s)) == 3\n"
        "lab = ('tta_runtime.data', 'tta_runtime.training', 'tta_runtime.evaluation', 'tta_runtime.cli')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(lab)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------
# The reader thread is always joined


def test_reader_joined_on_close_half_way(tiny: tta.Runtime) -> None:
    s = stream(tiny, itertools.cycle(frames_of(2, size=32)), adapt="never")  # endless source
    next(s), next(s)
    assert readers_alive()
    s.close()
    assert not readers_alive() and s.stats.stop_reason == "closed by the caller"
    s.close()  # twice is fine


def test_reader_joined_when_the_callers_loop_raises(tiny: tta.Runtime) -> None:
    with pytest.raises(RuntimeError, match="caller"):
        with stream(tiny, itertools.cycle(frames_of(2, size=32)), adapt="never") as s:
            for _ in s:
                raise RuntimeError("caller failed")
    assert not readers_alive()


def test_reader_joined_and_weights_restored_when_the_model_raises(
    fresh_runtime: tta.Runtime, state, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = state.snapshot(fresh_runtime.model)
    real = fresh_runtime.adapt_and_predict
    calls = itertools.count()

    def flaky(*a, **kw):
        if next(calls) == 2:
            raise RuntimeError("model failed")
        return real(*a, **kw)

    monkeypatch.setattr(fresh_runtime, "adapt_and_predict", flaky)
    s = stream(fresh_runtime, itertools.cycle(frames_of(3, size=32)), steps_per_frame=1)
    with pytest.raises(RuntimeError, match="model failed"):
        for _ in s:
            pass
    assert not readers_alive()
    assert "model failed" in s.stats.stop_reason
    state.assert_bit_exact(fresh_runtime.model, loaded)  # the stream's adaptation was undone


def test_continual_adaptation_warm_starts_and_resets_at_the_end(fresh_runtime: tta.Runtime, state) -> None:
    loaded = state.snapshot(fresh_runtime.model)
    frames = frames_of(3, size=32, kind="noise", seed=2)
    changed = []
    with stream(fresh_runtime, frames, steps_per_frame=2, reset_on_cut=False) as s:
        for f in s:
            changed.append(len(state.changed(fresh_runtime.model, loaded)))
            assert f.steps == 2 and f.result.adaptation.mode == "continual"
    assert all(c > 0 for c in changed)  # the weights moved and carried over from frame to frame
    state.assert_bit_exact(fresh_runtime.model, loaded)  # and the stream leaves the loaded weights


def test_stochastic_restore_bounds_the_streams_drift(fresh_runtime: tta.Runtime, state) -> None:
    """The stream recipe restores weights (CoTTA) by default; restore_prob=1 undoes every step, 0 none."""
    loaded = state.snapshot(fresh_runtime.model)
    frames = frames_of(3, size=32, kind="noise", seed=2)
    with stream(fresh_runtime, frames, steps_per_frame=2, reset_on_cut=False) as s:
        list(s)
    assert s.stats.to_dict()["options"]["restore_prob"] == 0.01  # adapters/slot_tta_stream.toml
    with stream(fresh_runtime, frames, steps_per_frame=2, reset_on_cut=False, restore_prob=1.0) as s:
        for _ in s:
            state.assert_bit_exact(fresh_runtime.model, loaded)  # each step went back to the loaded weights
    with stream(fresh_runtime, frames, steps_per_frame=2, reset_on_cut=False, restore_prob=0.0) as s:
        moved = [len(state.changed(fresh_runtime.model, loaded)) for _ in s]
    assert s.stats.restore_prob == 0.0 and all(m > 0 for m in moved)


# ----------------------------------------------------------------------------------------------------
# Policies


def _timed_source(n: int, every_s: float, size: int = 32) -> Iterator[np.ndarray]:
    frames = frames_of(4, size=size)
    for i in range(n):
        time.sleep(every_s)
        yield frames[i % 4]


def test_latest_policy_drops_stale_frames_and_keeps_latency_bounded(tiny: tta.Runtime) -> None:
    # a source at ~500 fps, a model step of several ms: the source is faster than the model
    with stream(tiny, _timed_source(80, 0.002), policy="latest", buffer=1, steps_per_frame=3) as s:
        got = list(s)
    st = s.stats
    assert st.frames_in == 80 and st.frames_dropped > 0
    assert st.frames_processed + st.frames_dropped == st.frames_in == len(got) + st.frames_dropped
    # a frame waits at most for the frame before it: latency <= about two processing times
    assert st.latency.max <= 2 * st.process.max + 30
    # policy="all" on the same source processes every frame, and frames queue up behind the model
    with stream(tiny, _timed_source(80, 0.002), policy="all", buffer=8, steps_per_frame=3) as s2:
        list(s2)
    assert s2.stats.frames_processed == 80 and s2.stats.frames_dropped == 0
    assert s2.stats.latency.percentile(90) > st.latency.percentile(90)


# ----------------------------------------------------------------------------------------------------
# Robustness


def test_unopenable_sources_raise_clear_errors(tmp_path: pathlib.Path, tiny: tta.Runtime) -> None:
    with pytest.raises(StreamError, match=r"missing\.mp4.*does not exist.*camera index"):
        stream(tiny, tmp_path / "missing.mp4")
    with pytest.raises(StreamError, match="cannot use a float"):
        stream(tiny, 3.5)
    with pytest.raises(StreamError, match=r"shape \(4, 4\)"):
        stream(tiny, np.zeros((4, 4)))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    s = stream(tiny, text)
    with pytest.raises(StreamError, match=r"could not open video source .*notes\.mp4.*corrupt, truncated"):
        next(s)
    with pytest.raises(StreamError, match="camera 97"):
        next(stream(tiny, 97))


def test_truncated_mp4_is_a_clear_error(tmp_path: pathlib.Path, tiny: tta.Runtime) -> None:
    path = write_mp4(tmp_path / "full.mp4", frames_of(20, size=48))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])  # OpenCV writes the mp4 index last: it is gone
    with pytest.raises(StreamError, match=r"cut\.mp4.*truncated"):
        with stream(tiny, cut) as s:
            list(s)
    assert s.stats.frames_processed == 0 and s.stats.stop_reason.startswith("error")


def test_truncated_avi_ends_early_with_a_warning(tmp_path: pathlib.Path, tiny: tta.Runtime, caplog) -> None:
    path = write_mp4(tmp_path / "full.avi", frames_of(20, size=48), fourcc="MJPG")
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # frames are self-contained; the header still says 20
    with caplog.at_level(logging.WARNING, logger="tta_runtime.video"), stream(tiny, cut, adapt="never") as s:
        got = list(s)
    assert 0 < len(got) < 20
    assert s.stats.stop_reason == "truncated or corrupt file"
    assert any("truncated or corrupt" in w for w in s.stats.warnings)
    assert "truncated or corrupt" in caplog.text


def test_damaged_frames_inside_a_file_are_skipped(tmp_path: pathlib.Path, tiny: tta.Runtime) -> None:
    path = write_mp4(tmp_path / "full.mp4", frames_of(30, size=48))
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 3 : n // 3 + 1500] = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    bad = tmp_path / "damaged.mp4"
    bad.write_bytes(bytes(data))
    with stream(tiny, bad, adapt="never") as s:
        got = list(s)
    # the stream survives the damage and ends cleanly; whatever OpenCV could decode was processed
    assert 0 < len(got) <= 30
    assert s.stats.frames_processed + s.stats.frames_unreadable <= 30 + sources._MAX_BAD_READS
    assert s.stats.stop_reason in ("end of file", "truncated or corrupt file")


def test_frames_of_the_wrong_size_or_channels_are_skipped_with_a_warning(tiny: tta.Runtime, caplog) -> None:
    good = frames_of(1, size=32)[0]
    frames = [
        good, good[:16], good[..., 0], np.dstack([good, good[..., :1]]), good.astype(np.float32), None, "frame", good,
    ]
    with caplog.at_level(logging.WARNING, logger="tta_runtime.video"), stream(tiny, frames, adapt="never") as s:
        got = list(s)
    assert [f.index for f in got] == [0, 7]
    assert s.stats.frames_invalid == 6 and s.stats.frames_in == 8
    assert "frame 1 skipped: shape (16, 32, 3)" in caplog.text
    assert "frame 4 skipped: dtype float32" in caplog.text


def test_a_stalled_source_stops_with_an_error_not_a_hang(tiny: tta.Runtime) -> None:
    def stalls() -> Iterator[np.ndarray]:
        frames = frames_of(2, size=32)
        yield from frames
        time.sleep(1.0)  # a camera that stops delivering
        yield frames[0]

    t0 = time.monotonic()
    s = stream(tiny, stalls(), adapt="never", read_timeout_s=0.3)
    with pytest.raises(StreamError, match=r"stalled: no frame for 0\.3 s"):
        for _ in s:
            pass
    assert s.stats.frames_processed == 2
    assert time.monotonic() - t0 < 4  # the reader was joined after its sleep, nothing hung


def test_source_errors_reach_the_caller(tiny: tta.Runtime) -> None:
    def broken() -> Iterator[np.ndarray]:
        yield frames_of(1, size=32)[0]
        raise OSError("device unplugged")

    with pytest.raises(StreamError, match="device unplugged"), stream(tiny, broken(), adapt="never") as s:
        list(s)


class _FakeCapture:
    """A live source that delivers `n` frames then fails, like a network camera that drops."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.full((24, 24, 3), 90, np.uint8)

    def grab(self) -> bool:
        return self.read()[0]

    def get(self, prop: int) -> float:
        return 0.0  # live streams often report no fps and no frame count

    def release(self) -> None:
        pass


def test_live_source_reconnects_with_backoff_then_gives_up(tiny: tta.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    opens = iter([_FakeCapture(3), StreamError("refused"), _FakeCapture(2)])

    def fake_open(source, timeout_ms):
        nxt = next(opens, StreamError("refused"))
        if isinstance(nxt, Exception):
            raise nxt
        return nxt

    monkeypatch.setattr(sources, "_open_capture", fake_open)  # the reader looks it up there
    url = "rtsp://user:secret@cam.local/live"
    live = stream(tiny, url, adapt="never")
    assert (live.stats.policy, live.stats.buffer) == ("latest", 1) and "secret" not in live.stats.source  # redacted
    live.close()
    s = stream(tiny, url, adapt="never", policy="all", reconnect=3, backoff_s=0.01)  # "all": count every frame
    got = []
    with pytest.raises(StreamError, match=r"lost video source .*3 reconnect attempts failed"):
        for f in s:
            got.append(f)
    assert len(got) == 5 and s.stats.reconnects == 1


# ----------------------------------------------------------------------------------------------------
# Resets, gating, budgets


def test_scene_cut_detector() -> None:
    frames = frames_of(6, size=64, seed=4)  # textured background from frame 3
    det = SceneCutDetector()
    cuts = [det.update(f) for f in frames]
    assert cuts == [False, False, False, True, False, False]
    with pytest.raises(tta.ConfigError, match="cut threshold"):
        SceneCutDetector(0)


def test_stream_resets_on_a_scene_cut(tiny: tta.Runtime) -> None:
    frames = frames_of(6, size=48, seed=4)
    with stream(tiny, frames, steps_per_frame=1) as s:
        resets = [f.reset for f in s]
    assert resets[3] == "scene cut" and s.stats.resets["scene_cut"] == 1
    with stream(tiny, frames, steps_per_frame=1, reset_on_cut=False) as s:
        assert all(f.reset is None or "collapse" in f.reset for f in s)
    assert s.stats.resets["scene_cut"] == 0


def test_periodic_reset(tiny: tta.Runtime) -> None:
    frame = frames_of(1, size=32)[0]
    with stream(tiny, [frame] * 7, steps_per_frame=1, reset_every=3) as s:
        assert [f.index for f in s if f.reset == "periodic"] == [3, 6]
    assert s.stats.resets == {"periodic": 2} and s.stats.to_dict()["options"]["reset_every"] == 3


def _result(masks: np.ndarray, mse: float = 0.01, rolled_back: bool = False) -> tta.Result:
    rep = tta.AdaptationReport(recipe="r", method="m", mode="continual", params="all", params_adapted=1, steps_requested=1)
    rep.rolled_back, rep.rollback_reason = rolled_back, "non-finite loss at step 0" if rolled_back else None
    return tta.Result(masks=masks, segmentation=masks.argmax(0), reconstruction=None, ood_score=0.0, ood_scorer="x", recon_mse=mse, adaptation=rep)


def test_collapse_monitor_signals() -> None:
    rng = np.random.default_rng(0)
    healthy = np.zeros((4, 32, 32), np.float32)
    for k in range(4):
        healthy[k, :, k * 8 : (k + 1) * 8] = 1  # four slots, four stripes
    collapsed = np.zeros_like(healthy)
    collapsed[0] = 1
    mon = CollapseMonitor(window=4)
    assert all(mon.update(_result(healthy, 0.01 + 0.001 * rng.random())) is None for _ in range(10))
    assert mon.rank == pytest.approx(4.0, abs=0.01)
    reasons = [mon.update(_result(collapsed)) for _ in range(4)]
    assert reasons[:2] == [None, None] and "slots collapsed" in reasons[-1]
    mon.reset()
    assert "rollback" in mon.update(_result(healthy, rolled_back=True))
    mon = CollapseMonitor(window=4, patience=2)
    for _ in range(4):
        mon.update(_result(healthy, 0.01))
    assert mon.update(_result(healthy, 0.05)) is None
    assert "loss" in mon.update(_result(healthy, 0.05))


def test_collapse_triggers_a_reset_in_the_stream(tiny: tta.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CollapseMonitor, "update", lambda self, result: "forced")
    with stream(tiny, frames_of(3, size=32), steps_per_frame=1, reset_on_cut=False) as s:
        resets = [f.reset for f in s]
    assert resets == ["collapse: forced"] * 3 and s.stats.resets["collapse"] == 3
    with stream(tiny, frames_of(3, size=32), adapt="never", reset_on_cut=False) as s:  # nothing adapted, no reset
        assert [f.reset for f in s] == [None] * 3


def test_when_ood_gate_latches_until_a_reset(runtime: tta.Runtime, source_state, state) -> None:
    frames = [f for f, _ in shifted_frames(8, shift_at=3, size=48, seed=5)]
    with stream(runtime, frames, adapt="when_ood", steps_per_frame=1) as s:
        got = list(s)
    flagged_since_reset = False
    for f in got:
        if f.reset == "scene cut":
            flagged_since_reset = False
        flagged_since_reset |= bool(f.result.is_ood)
        assert (f.steps > 0) == flagged_since_reset, "adapts exactly from the first flagged frame on"
    state.assert_bit_exact(runtime.model, source_state)
    with pytest.raises(tta.ConfigError, match="calibration"):
        stream(tta.Runtime.from_pretrained(runtime.folder, load_calibration=False), frames, adapt="when_ood")


def test_latency_budget_cuts_the_steps(tiny: tta.Runtime) -> None:
    with stream(tiny, frames_of(5, size=32), steps_per_frame=50, latency_budget_ms=0.001, reset_on_cut=False) as s:
        steps = [f.steps for f in s]
    # the first frame's fixed cost is unknown: one step, then the fixed cost alone exceeds the budget
    assert steps[0] == 1 and steps[1:] == [0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------
# Statistics


def test_percentiles_in_fixed_memory_are_within_two_percent() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=3.0, sigma=1.0, size=20_000)
    h = _LogHistogram()
    for v in values:
        h.add(v)
    for q in (50, 90, 99):
        assert h.percentile(q) == pytest.approx(np.percentile(values, q), rel=0.025)
    assert h.max == values.max() and h.counts.size == 902


def test_series_stays_bounded() -> None:
    s = _Series(capacity=8)
    for i in range(1000):
        s.add(i, float(i))
    d = s.to_dict()
    assert len(d["mean"]) <= 8 and d["frames_per_bucket"] == 128
    assert d["mean"][0] == pytest.approx(63.5)


def test_ground_truth_lookups(tmp_path: pathlib.Path) -> None:
    maps = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "gt.npz", instances=maps)
    look = load_ground_truth(tmp_path / "gt.npz")
    assert look(2).shape == (8, 8) and look(3) is None
    np.savez(tmp_path / "bad.npz", other=maps)
    with pytest.raises(tta.InvalidInputError, match="no 'instances'"):
        load_ground_truth(tmp_path / "bad.npz")


def test_ground_truth_of_another_size_is_an_error(tiny: tta.Runtime) -> None:
    with pytest.raises(tta.InvalidInputError, match="ground truth for frame 0"), stream(
        tiny, frames_of(2, size=32), adapt="never", ground_truth=np.zeros((2, 16, 16), np.uint8)
    ) as s:
        list(s)


def test_bad_options_are_config_errors(tiny: tta.Runtime) -> None:
    frames = frames_of(1, size=32)
    for kw, match in [
        ({"policy": "newest"}, "policy"), ({"stride": 0}, "stride"), ({"adapt": "sometimes"}, "adapt"),
        ({"latency_budget_ms": -1}, "latency_budget_ms"), ({"recipe": "no_such_recipe"}, "recipe"),
        ({"channel_order": "bgra"}, "channel_order"), ({"reset_every": 0}, "reset_every"),
        ({"restore_prob": 1.5}, "restore_prob"),
    ]:
        with pytest.raises(tta.TTARuntimeError, match=match):
            stream(tiny, frames, **kw)


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_generates_streams_and_compares(tmp_path: pathlib.Path, capsys) -> None:
    gen, out, stats, png = (tmp_path / n for n in ("gen.mp4", "annotated.mp4", "stats.json", "frame.png"))
    code = main([
        "stream", "--generate", str(gen), "--frames", "8", "--size", "48", "--seed", "2", "--steps-per-frame", "1",
        "--out", str(out), "--json", str(stats), "--compare", "--frame-png", str(png),
    ])
    assert code == 0
    assert read_all(out)[:2] == (8, (48, 48))
    report = json.loads(stats.read_text())
    assert report["video"]["shift_at"] == 4 and report["stats"]["frames"]["written"] == 8
    fg = report["fg_ari"]
    assert set(fg) == {"always", "never"} and fg["always"]["after_shift"]["frames"] == 4
    assert report["margin"]["after_shift"] == pytest.approx(fg["always"]["after_shift"]["mean"] - fg["never"]["after_shift"]["mean"])
    assert report["predict_only_stats"]["adaptation"]["steps_total"] == 0
    assert cv2.imread(str(png)) is not None and report["frame_png"]["index"] == 7
    assert main(["stream", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4" in capsys.readouterr().err


def test_bench_stream_measures_memory_over_a_stream(tiny_model_dir: pathlib.Path) -> None:
    r = bench_stream(str(tiny_model_dir), frames=12, warmup=4, size=32)
    assert r["frames_processed"] == 12 and r["frames_written"] == 12 and r["adapt_steps_total"] == 12
    assert r["peak_rss_mb_after_warmup"] >= r["rss_mb_at_warmup"] > 0 and r["target_growth_mb"] == 50
    with pytest.raises(tta.ConfigError, match="must exceed warmup"):
        bench_stream(str(tiny_model_dir), frames=4, warmup=4)


def test_cli_bench_stream_reports_rss_growth(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "stream", "--frames", "24", "--warmup", "8", "--size", "32", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["frames_processed"] == 24 and r["adapt_steps_total"] == 24 and r["steps_per_frame"] == 1
    assert r["restore_prob"] == 0.01  # the stream recipe's
    assert r["peak_rss_mb_after_warmup"] >= r["rss_mb_at_warmup"] > 0
    assert r["peak_rss_growth_mb"] == pytest.approx(r["peak_rss_mb_after_warmup"] - r["rss_mb_at_warmup"], abs=0.02)
