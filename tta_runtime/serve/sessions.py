"""Continual sessions: one adapted model state per client session id, bounded by count (LRU) and idle time.

A session owns its own `Runtime` (loaded from the model folder in continual mode), so sessions never see
each other's weights, nor those of the episodic worker pool. A session id that comes back after its
session was evicted or expired starts again from the loaded weights, and its response says so.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from tta_runtime.serve.settings import ServeError

SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TOMBSTONES_PER_SESSION = 8  # ended ids remembered (to say "restarted after eviction"), per kept session


@dataclass
class Session:
    id: str
    model: str
    runtime: Any
    lock: threading.Lock = field(default_factory=threading.Lock)  # one frame of a session at a time
    frames: int = 0
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


def check_session_id(value: str) -> str:
    if not SESSION_ID.match(value):
        raise ServeError(422, "invalid_session_id", f"X-Session-Id {value[:64]!r} is not a session id: use 1-128 characters "
                         "from letters, digits and . _ : - (e.g. a UUID)", field="X-Session-Id")
    return value


class SessionStore:
    """Sessions by id: `open` returns the session (creating it with `factory`) and its status, one of
    "new", "continued", "restarted_after_eviction", "restarted_after_expiry"."""

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        # Where several replicas hold sessions: claim(id) -> "elsewhere" when the id lived on another replica
        # (which died or lost it), so that its restart is reported, never silent.
        self.claim: Callable[[str], str | None] | None = None
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> "evicted" | "expired"
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, model: str, factory: Callable[[], Any]) -> tuple[Session, str]:
        if self.max_sessions == 0:
            raise ServeError(422, "sessions_disabled", "this server keeps no sessions (--max-sessions 0); drop the "
                             "X-Session-Id header, or start the server with --max-sessions N", field="X-Session-Id")
        with self._lock:
            self._expire(time.monotonic())
            s = self._sessions.get(session_id)
            if s is not None and s.model != model:
                raise ServeError(409, "session_model_mismatch", f"session {session_id!r} adapts model {s.model!r}, not "
                                 f"{model!r}: one session follows one model; use another X-Session-Id for {model!r}",
                                 field="X-Session-Id")
            if s is not None:
                self._sessions.move_to_end(session_id)
                s.last_used = time.monotonic()
        if s is not None:
            # Several replicas: if the session was served elsewhere meanwhile (its home replica was lost or busy),
            # this copy is stale: drop it and start again, saying so (never continue from old weights silently).
            if self.claim is None or self.claim(session_id) is None:
                return s, "continued"
            with self._lock:
                self._sessions.pop(session_id, None)
            ended = "elsewhere"
        else:
            with self._lock:
                ended = self._ended.pop(session_id, "")
        if ended != "elsewhere":
            elsewhere = self.claim(session_id) if self.claim is not None else None  # also registers this replica as its home
            ended = ended or elsewhere or ""
        status = {"evicted": "restarted_after_eviction", "expired": "restarted_after_expiry",
                  "elsewhere": "restarted_on_another_replica"}.get(ended, "new")
        runtime = factory()  # outside the store's lock: loading takes a while
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:  # another request of the same new session got there first
                return s, "continued"
            while len(self._sessions) >= self.max_sessions:
                old, _ = self._sessions.popitem(last=False)
                self._end(old, "evicted")
            s = self._sessions[session_id] = Session(session_id, model, runtime)
            return s, status

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl_s]:
            del self._sessions[sid]
            self._end(sid, "expired")

    def _end(self, session_id: str, why: str) -> None:
        if why == "evicted":
            self.evicted += 1
        else:
            self.expired += 1
        self._ended[session_id] = why
        while len(self._ended) > max(64, _TOMBSTONES_PER_SESSION * self.max_sessions):
            self._ended.popitem(last=False)

    def drop(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None
