"""Real processes for the benchmarks: servers on 127.0.0.1, workers, stores, peak RSS.

Every server the benchmarks measure runs in its own child process (uvicorn on 127.0.0.1), so
the client and the server never share a GIL and ``/proc/<pid>/status`` (``VmHWM``) gives each
one's own peak RSS.  PostgreSQL runs get a fresh schema each, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gateway.demo import free_port
from gateway.store.db import normalize_url

ROOT = Path(__file__).resolve().parent.parent
PG_ENVS = ("BENCH_POSTGRES_URL", "CE_GATEWAY_TEST_POSTGRES_URL")
SECRET_KEY = "bench-secret-key-not-for-production"


def postgres_base() -> str | None:
    """The PostgreSQL server to measure on, if one was named (BENCH_POSTGRES_URL first)."""
    for name in PG_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Call ``check`` until it returns something truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set of a live process (``VmHWM``), in MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """One child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, list(argv), env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid) if self.alive() else 0.0

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid) if self.alive() else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Server(Proc):
    """A uvicorn server on a free 127.0.0.1 port, ready once ``ready_path`` answers 200."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path,
                 port: int, ready_path: str) -> None:
        super().__init__(name, argv, env, log_dir)
        self.port, self.ready_path = port, ready_path
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> Server:
        super().start()

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            return httpx.get(self.url + self.ready_path, timeout=2).status_code == 200

        poll(ready, 60, f"{self.name} to answer {self.ready_path}", interval=0.05)
        return self


def uvicorn_server(name: str, factory: str, env: dict[str, str], log_dir: Path,
                   ready_path: str = "/healthz") -> Server:
    """``uvicorn --factory module:create_app`` (the mock, the floor) without access logs."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--no-access-log"]
    return Server(name, argv, env, log_dir, port, ready_path)


def gateway_server(env: dict[str, str], log_dir: Path, name: str = "gateway") -> Server:
    """``ce-gateway serve --no-worker``: HTTP only, as a replica behind a load balancer runs."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--no-worker", "--port", str(port)]
    return Server(name, argv, env, log_dir, port, "/readyz")


def worker_proc(env: dict[str, str], log_dir: Path, name: str) -> Proc:
    """``ce-gateway worker``: one standalone delivery worker."""
    return Proc(name, [sys.executable, "-m", "gateway.cli", "worker"], env, log_dir)


@contextmanager
def running(*procs: Proc) -> Iterator[None]:
    """Start the processes in order; stop them all (last first) however the block ends."""
    started: list[Proc] = []
    try:
        for proc in procs:
            started.append(proc)
            proc.start()
        yield
    finally:
        for proc in reversed(started):
            proc.stop()


@contextmanager
def postgres_schema(base: str) -> Iterator[str]:
    """A fresh schema on ``base``; yields a URL whose search_path is that schema."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(normalize_url(base)).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def sqlite_file(path: Path) -> Iterator[str]:
    """A fresh SQLite file (WAL files included), removed afterwards; yields its URL."""
    def remove() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    remove()
    try:
        yield f"sqlite:///{path}"
    finally:
        remove()


def store(backend: str, workdir: Path, name: str) -> Any:
    """A context manager for a fresh store of ``backend`` ("sqlite" or "postgres")."""
    if backend == "sqlite":
        return sqlite_file(workdir / f"{name}.sqlite3")
    base = postgres_base()
    if base is None:
        raise RuntimeError("no PostgreSQL URL (BENCH_POSTGRES_URL or CE_GATEWAY_TEST_POSTGRES_URL)")
    return postgres_schema(base)


def gateway_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked gateway process (scheduled jobs off)."""
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_RETENTION_INTERVAL_SECONDS": "0", "CE_GATEWAY_ALERT_INTERVAL_SECONDS": "0",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env
