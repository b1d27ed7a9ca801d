"""A server in a child process (`tta-runtime serve` on a free loopback port), for tests, benchmarks and
scripts that talk real HTTP to it: started, waited for until ready, measured (RSS), stopped gracefully."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tta_runtime.errors import TTARuntimeError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(["--model", "digits-cnn-bn"]) as srv: srv.request("GET", "/healthz")`.

    `args`: extra `tta-runtime serve` arguments; `ready_timeout`: seconds to wait for /readyz; the child's
    output goes to `log` (a file path) or is discarded."""

    def __init__(self, args: list[str] | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 ready_timeout: float = 120.0, log: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.args, self.ready_timeout, self.log, self.env = list(args or []), ready_timeout, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "tta_runtime.cli", "serve", "--host", self.host, "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        self._out = out
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TTARuntimeError(f"`{' '.join(cmd[2:])}` exited with status {self.proc.returncode} before it was ready"
                                      + (f"; see {self.log}" if self.log else ""))
            try:
                status, _, _ = self.request("GET", "/readyz", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TTARuntimeError(f"the server was not ready within {self.ready_timeout:g} s")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on a fresh connection: (status, headers with lower-case names, body)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 120.0) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, headers, timeout)
        return status, json.loads(data)

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise TTARuntimeError("no VmRSS in /proc: resident memory is measured on Linux only")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: open requests finish), then SIGKILL after `timeout`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            self._out.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
