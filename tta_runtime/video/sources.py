"""Video sources: what a source is, opening it with OpenCV, and the reader thread that feeds a stream.

A source is a video file, a camera index (int or digit string), a URL OpenCV opens (rtsp://, http(s)://)
or an iterable of (H, W, 3) uint8 frames (an (N, H, W, 3) array included). `_resolve_source` decides
which, before any thread starts, so that a missing file or an unusable object raises at once.

The reader thread reads the source, keeps every `stride`-th frame and puts it on a bounded queue by a
policy: 'all' waits for room (every frame is processed), 'latest' drops the oldest waiting frame (for
live sources, where a stale frame is worth less than a fresh one). A file ends at its end; a file that
stops decoding early (truncated or corrupt) is skipped past for up to `_MAX_BAD_READS` frames in a row
and then ends with a warning; a live source that drops is reopened with exponential back-off. The
consumer never blocks for longer than `read_timeout_s` without progress: that is a stall, a
`StreamError`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from tta_runtime.device import import_cv2
from tta_runtime.errors import TTARuntimeError

log = logging.getLogger(__name__)

Source = Union[str, os.PathLike, int, Iterable[np.ndarray]]

# An http(s)/ftp URL's policy until it is open: 'all' if it declares a frame count (a file served over the
# network), else 'latest' (a live stream). Files (file:// URLs included), cameras, rtsp:// and other live
# protocols, and iterables are decided up front.
AUTO_POLICY = "auto"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_MAX_BAD_READS = 10  # unreadable frames in a row before a file is declared truncated / corrupt
_JOIN_TIMEOUT_S = 5.0  # how long close() waits for a reader blocked inside the source
_EXPECTED = (
    "a video file path, a camera index (int or digit string), an rtsp://, http(s):// or other URL OpenCV "
    "can open, or an iterable of (H, W, 3) uint8 frames"
)


class StreamError(TTARuntimeError):
    """A video source cannot be opened, stalled, dropped for good or failed; the message names it."""


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" | "camera" | "url" | "iterable"
    name: str  # for messages
    target: Any  # path str, camera index, URL, or the iterable

    @property
    def opencv(self) -> bool:
        return self.kind != "iterable"

    @property
    def served_file(self) -> bool:
        """A URL that may be a file served over the network (http, https, ftp), not a live protocol (rtsp, udp...)."""
        return self.kind == "url" and str(self.target).lower().startswith(("http://", "https://", "ftp://"))


def _resolve_source(source: Any) -> _Source:
    """What kind of source this is; a missing file or an unusable object raises here, before any thread."""
    if isinstance(source, (bool, np.bool_)):
        raise StreamError(f"cannot use {source!r} as a video source; expected {_EXPECTED}")
    if isinstance(source, (int, np.integer)):
        if source < 0:
            raise StreamError(f"camera index must be >= 0, got {source}; expected {_EXPECTED}")
        return _Source("camera", f"camera {int(source)}", int(source))
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode()
        if text.strip().isdigit():
            return _Source("camera", f"camera {int(text)}", int(text))
        if _URL.match(text) and not text.lower().startswith("file:"):
            return _Source("url", _redact(text), text)
        path = _file_path(text)
        _check_regular_file(path, text)
        return _Source("file", text, str(path))
    if isinstance(source, np.ndarray):
        if source.ndim == 4:  # (N, H, W, 3): frames stacked in one array
            return _Source("iterable", f"array of {source.shape[0]} frames", source)
        raise StreamError(
            f"cannot use a numpy array of shape {source.shape} as a video source; pass frames stacked as "
            f"(N, H, W, 3), or {_EXPECTED}"
        )
    if isinstance(source, Iterable):
        return _Source("iterable", f"{type(source).__name__} of frames", source)
    raise StreamError(f"cannot use a {type(source).__name__} as a video source; expected {_EXPECTED}")


def _file_path(text: str) -> Path:
    """A path, or a file:// URL (file:///tmp/a.mp4, file://localhost/tmp/a.mp4) as the path it names."""
    if not text.lower().startswith("file:"):
        return Path(text)
    url = urllib.parse.urlparse(text)
    if url.netloc not in ("", "localhost"):
        raise StreamError(f"cannot open video source {text!r}: a file:// URL must name a local file (file:///path), "
                          f"not one on host {url.netloc!r}")
    return Path(urllib.request.url2pathname(url.path))


def _check_regular_file(path: Path, text: str) -> None:
    """StreamError unless `path` is a regular file (a FIFO or a device could block a read forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        what = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror or e})"
        raise StreamError(f"cannot open video source {text!r}: the file {what}; expected {_EXPECTED}") from None
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise StreamError(
            f"cannot open video source {text!r}: it is {what}, not a regular file; give a video file, or stream "
            "a pipe's frames as an iterable of (H, W, 3) uint8 arrays"
        )


def _redact(url: str) -> str:
    """The URL without a password, for messages and JSON (rtsp://user:secret@host -> rtsp://user:***@host)."""
    return re.sub(r"(//[^/:@]+:)[^/@]*@", r"\1***@", url)


def _open_capture(source: _Source, timeout_ms: int) -> Any:
    """An opened cv2.VideoCapture for `source`, or StreamError. (A seam for tests that fake live sources.)"""
    cv2 = import_cv2()
    if source.kind == "url":  # FFmpeg honours these: a dead host or stream cannot block a read forever
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        cap = cv2.VideoCapture(source.target, cv2.CAP_FFMPEG, params)
    else:
        cap = cv2.VideoCapture(source.target)
    if not cap.isOpened():
        cap.release()
        hint = {
            "file": "a video file OpenCV can decode (mp4, avi, mkv, ...); it may be corrupt, truncated (an mp4 "
            "cut short loses its index) or not a video",
            "camera": "a connected camera at that index",
            "url": "a reachable stream (check the address, credentials and that the stream is live)",
        }[source.kind]
        raise StreamError(f"OpenCV could not open video source {source.name!r}; expected {hint}")
    return cap


# --------------------------------------------------------------------------------------------------
# The reader thread


@dataclass
class _Frame:
    index: int  # position in the source (0-based, before stride / drops)
    image: Any
    t_capture: float  # time.perf_counter() when the reader got it


@dataclass
class _End:
    reason: str
    warning: str | None = None


@dataclass
class _Failure:
    error: BaseException


class _Reader:
    """Reads the source in a thread into a bounded queue, by `policy`; never blocks the consumer."""

    def __init__(
        self, source: _Source, *, policy: str, stride: int, buffer: int, read_timeout_s: float, reconnect: int,
        backoff_s: float, buffer_given: bool = True,
    ) -> None:
        self.source, self.policy, self.stride, self.buffer_given = source, policy, stride, buffer_given
        self.read_timeout_s, self.reconnect, self.backoff_s = read_timeout_s, reconnect, backoff_s
        self.queue: queue.Queue[_Frame | _End | _Failure] = queue.Queue(maxsize=buffer)
        self.stop = threading.Event()
        self.info: dict[str, Any] = {}  # fps, frame_count: set before the first frame is queued
        self.frames_in = self.dropped = self.skipped_stride = self.unreadable = self.reconnects = 0
        self.last_alive = time.monotonic()  # the reader's last sign of progress (a read, a reconnect attempt)
        self.thread = threading.Thread(target=self._run, name="tta-stream-reader", daemon=True)

    # -- thread body ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            end = self._read_iterable() if self.source.kind == "iterable" else self._read_capture()
        except BaseException as e:  # noqa: BLE001 - whatever the source raised reaches the consumer
            end = _Failure(e)
        self._put_final(end)

    def _read_iterable(self) -> _End | None:
        self.info = {"fps": None, "frame_count": len(self.source.target) if hasattr(self.source.target, "__len__") else None}
        index = 0
        for frame in self.source.target:
            self.last_alive = time.monotonic()
            if self.stop.is_set():
                return None
            self._take(index, frame)
            index += 1
        return _End("end of source")

    def _read_capture(self) -> _End | _Failure | None:
        cv2 = import_cv2()
        timeout_ms = max(1, int(self.read_timeout_s * 1000))
        cap = _open_capture(self.source, timeout_ms)
        try:
            fps = float(cap.get(cv2.CAP_PROP_FPS))
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            # a URL with a frame count is a file served over the network: it ends, it does not drop
            live = self.source.kind == "camera" or (self.source.kind == "url" and count <= 0)
            if self.policy == AUTO_POLICY:  # before the first frame is queued
                self.policy = "latest" if live else "all"
                if not self.buffer_given:
                    self.queue.maxsize = 1 if live else 4
            self.info = {
                "fps": fps if math.isfinite(fps) and 0 < fps < 1000 else None,  # 0 or NaN on many streams
                "frame_count": count if count > 0 and not live else None,
            }
            index, bad = 0, 0
            while not self.stop.is_set():
                keep = index % self.stride == 0
                if keep:
                    ok, frame = cap.read()
                else:  # grab without decoding: stride costs no decode time on files
                    ok, frame = cap.grab(), None
                self.last_alive = time.monotonic()
                if ok:
                    bad = 0
                    if keep:
                        self._take(index, frame)
                    else:
                        self.frames_in += 1
                        self.skipped_stride += 1
                    index += 1
                    continue
                if live:
                    cap.release()
                    cap = self._reconnect(cv2)
                    if cap is None:
                        return None if self.stop.is_set() else _Failure(StreamError(
                            f"lost video source {self.source.name!r}; {self.reconnect} reconnect attempts failed"
                        ))
                    continue
                count = self.info["frame_count"]
                if count is not None and index >= count:
                    return _End("end of file")
                bad += 1
                if bad > _MAX_BAD_READS or count is None:
                    if index == 0 and self.frames_in == 0:
                        return _Failure(StreamError(
                            f"opened video source {self.source.name!r} but could not decode any frame: the file is "
                            "corrupt, truncated or in a codec this OpenCV build lacks"
                        ))
                    if count is None:
                        return _End("end of file")
                    return _End(
                        "truncated or corrupt file",
                        f"{self.source.name}: no frame could be decoded after frame {index - bad + 1} of the "
                        f"{count} the file declares (truncated or corrupt); stopping",
                    )
                self.unreadable += 1  # a damaged frame inside the file: the decoder usually recovers
                index += 1
            return None
        finally:
            if cap is not None:
                cap.release()

    def _reconnect(self, cv2: Any) -> Any:
        """Reopen a live source with exponential back-off; None when every attempt failed (or we stop)."""
        for attempt in range(self.reconnect):
            delay = min(self.backoff_s * 2**attempt, 8.0)
            log.warning("%s dropped; reconnecting in %.1f s (attempt %d of %d)", self.source.name, delay, attempt + 1, self.reconnect)
            if self.stop.wait(delay):
                return None
            self.last_alive = time.monotonic()
            try:
                cap = _open_capture(self.source, max(1, int(self.read_timeout_s * 1000)))
            except StreamError:
                self.last_alive = time.monotonic()
                continue
            self.reconnects += 1
            self.last_alive = time.monotonic()
            return cap
        return None

    def _take(self, index: int, frame: Any) -> None:
        self.frames_in += 1
        if index % self.stride:
            self.skipped_stride += 1
            return
        item = _Frame(index, frame, time.perf_counter())
        if self.policy == "latest":
            while True:
                try:
                    self.queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self.queue.get_nowait()  # the oldest waiting frame is stale: drop it
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self.stop.is_set():  # 'all': wait for room, but never past a stop
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _put_final(self, item: _End | _Failure | None) -> None:
        if item is None:  # stopped by the consumer: nobody reads the queue any more
            return
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    # -- consumer side -------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def next(self) -> _Frame | _End | _Failure:
        """The next item; a reader without any progress for `read_timeout_s` is a stall (StreamError)."""
        waited_from = time.monotonic()
        while True:
            try:
                return self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
            now = time.monotonic()
            if not self.thread.is_alive() and self.queue.empty():
                return _Failure(StreamError(f"the reader of {self.source.name!r} ended without a reason (a bug)"))
            if now - max(waited_from, self.last_alive) > self.read_timeout_s:
                return _Failure(StreamError(
                    f"video source {self.source.name!r} stalled: no frame for {self.read_timeout_s:g} s "
                    "(read_timeout_s); stopping"
                ))

    def close(self) -> bool:
        """Stop and join the thread; False if it is still blocked inside the source after the timeout."""
        self.stop.set()
        while True:  # free a reader waiting for room
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive():
            self.thread.join(_JOIN_TIMEOUT_S)
        return not self.thread.is_alive()
