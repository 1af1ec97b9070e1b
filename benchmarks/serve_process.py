"""A ``dsray serve --api-key`` subprocess for probes and benchmarks, and what its processes listen on.

``Server`` starts ``dsray serve`` (output drained on a thread), waits for it, reads its request
gauges and stops it with SIGINT. (What its processes listen on: ``dsray.testing.descendants`` and
``listening``, which the front-door tests use too.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import requests

API_KEY = "probe-key"


class Server:
    """A ``dsray serve`` subprocess, its output drained on a thread."""

    def __init__(self, model: str | None, port: int, extra: list[str]):
        cmd = [sys.executable, "-m", "dsray.cli", "serve", *([model] if model else []), "--port", str(port)]
        cmd += ["--api-key", API_KEY, *extra]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "dsray: serving" in line:
                self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            self.stop()
            raise RuntimeError("dsray serve did not start:\n" + "".join(self.lines[-40:]))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def running(self) -> float | None:
        """Requests the engine runs or queues now (its gauges on /metrics)."""
        try:
            text = requests.get(self.url + "/metrics", headers=self.auth, timeout=10).text
        except requests.RequestException:
            return None
        total = 0.0
        for name in ("dsray:num_requests_running", "dsray:num_requests_waiting"):
            total += sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
        return total
