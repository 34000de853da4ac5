"""Real `fastpath serve` processes on free 127.0.0.1 ports, for tests and benchmarks.

Each server runs in its own process group (API server, engine core, workers), so it is
stopped, or killed to simulate a crash, as a whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from fastpath.cli.common import LOG_LEVEL_ENV

START_TIMEOUT = 600.0  # seconds: ~30 s on an idle 2-core machine, minutes when it is shared
VLLM_INFO_LINE = re.compile(r"^\(\w+ pid=\d+\) INFO ", re.MULTILINE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One `python -m fastpath.cli serve MODEL ...` process group, its URL and its log."""

    def __init__(self, model: str, flags: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "fastpath.cli", "serve", model, "--host", "127.0.0.1",
                   "--port", str(self.port), *flags]
        # The level an in-process `fastpath` command of an earlier test left in os.environ
        # would pass for the user's own and silence -v: servers start from the user's env.
        inherited = {k: v for k, v in os.environ.items() if k != LOG_LEVEL_ENV}
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            env={**inherited, **(env or {})})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until /health answers 200; fails with the log's tail if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastpath serve exited with {self.process.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"fastpath serve not ready after {timeout} s:\n"
                           f"{self.log_text()[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after 60 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlived the server


@contextlib.contextmanager
def running(model: str, flags: Sequence[str], log: Path, **kwargs) -> Iterator[Server]:
    """A ready server for the duration of the block; always stopped."""
    server = Server(model, flags, log, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
