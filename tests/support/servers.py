"""Real servers for tests: uvicorn on 127.0.0.1 in a thread, or a gateway in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.demo import free_port


def poll(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
         what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port in a thread; yields its base URL.

    The socket is bound here and handed to uvicorn, so no other test (another xdist worker)
    can take the port between choosing and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    poll(lambda: server.started, 30, what="uvicorn start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class GatewayProcess:
    """``ce-gateway serve`` as a real child process (for crash tests: SIGKILL it)."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.log_path, self.args = env, log_path, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port), *self.args],
            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            # A child that died (say, its port was taken meanwhile) must not pass as ready on
            # whatever else answers that port.
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}; see {self.log_path}")
            return httpx.get(f"{self.url}/readyz").status_code == 200

        poll(ready, 60, what="gateway readiness")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown hooks, no flushing
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, 20)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM ``proc`` if it still runs, and SIGKILL it if it has not exited ``timeout`` s later."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


class WorkerProcess:
    """``ce-gateway worker`` as a real child process: delivery, batch files, scheduled jobs.

    Ready once its delivery worker logged that it started; :meth:`owns` tells whether a lease
    owner (``host:pid:suffix``) is this process.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env, self.log_path, self.args = env, log_path, args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def owns(self, lease_owner: str | None) -> bool:
        return lease_owner is not None and f":{self.pid}:" in lease_owner

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", *self.args],
                                     env={**os.environ, **self.env}, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}; see {self.log_path}")
            return any("delivery worker" in line and self.owns(line) and "started" in line
                       for line in self.log_path.read_text(errors="replace").splitlines())

        poll(started, 60, what="worker start")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: leases stay held until they expire
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, 30)


def start_all(*processes: Any) -> None:
    """Start gateway and worker processes side by side (each ``start()`` waits for readiness)."""
    errors: list[BaseException] = []

    def run(process: Any) -> None:
        try:
            process.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
