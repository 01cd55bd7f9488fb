"""(a) Canonical ingest over HTTP: the gateway against a floor server, in the same run.

Both servers are real uvicorn processes on 127.0.0.1 and get the same signed
``POST /v1/records`` bodies (1,000 seeded canonical records each) from the same asyncio client at
the same concurrency.  The gateway runs as ``ce-gateway serve --no-worker`` on a fresh store;
the floor (:mod:`benchmarks.floor`) only parses the JSON and bulk-inserts it into the same kind
of store.  Each server first takes one warm-up request of other records, not timed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
from sqlalchemy.engine import make_url

from benchmarks import procs
from gateway.accounts import add_partner
from gateway.secrets_box import SecretBox
from gateway.signing import AsyncSigningClient
from gateway.store.db import make_engine, upgrade
from mock_partners import generators as gen

YEAR = 2026  # the generator's CE year; past its close the run extends it, as the demo does


def year_extension() -> dict[int, date]:
    """Keep the seeded year open (YEAR_CLOSE_EXTENSIONS) once the calendar has passed it."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return {YEAR: date(today.year + 1, 12, 30)} if today > date(YEAR, 12, 30) else {}


def year_env() -> dict[str, str]:
    """:func:`year_extension` as the environment of a gateway process."""
    return {"CE_GATEWAY_YEAR_CLOSE_EXTENSIONS": ",".join(f"{y}={d}" for y, d in
                                                         year_extension().items())
            } if year_extension() else {}


def make_records(count: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    """``count`` valid, distinct canonical submissions (seeded: every run sends the same)."""
    rng = random.Random(seed)
    return [gen.canonical_submission(rng, f"{prefix}-{i:07d}", year=YEAR) for i in range(count)]


def make_bodies(records: list[dict[str, Any]], per_request: int) -> list[bytes]:
    return [orjson.dumps({"records": records[i: i + per_request]})
            for i in range(0, len(records), per_request)]


@dataclass
class Run:
    """One server's timed run."""

    records: int
    requests: int
    seconds: float
    latencies: list[float]
    peak_rss_mb: float
    counts: dict[str, int]
    cpu_seconds: float  # the server process's CPU time (all threads) over the timed run

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def cpu_us(self) -> float:
        """Server CPU per record, µs: steadier than wall time on a busy machine."""
        return self.cpu_seconds / self.records * 1e6

    def pct(self, q: float) -> float:
        """Nearest-rank percentile of the request latencies, in seconds."""
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1]


async def _drive(url: str, app_key: str, secret: str, bodies: list[bytes],
                 concurrency: int) -> tuple[float, list[float], list[httpx.Response]]:
    """Send every body, ``concurrency`` at a time; returns wall time, latencies, responses."""
    todo: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        todo.put_nowait(body)
    latencies: list[float] = []
    responses: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncSigningClient(url, app_key, secret, timeout=600, limits=limits) as client:

        async def sender() -> None:
            while not todo.empty():
                body = todo.get_nowait()
                started = time.perf_counter()
                response = await client.post("/v1/records", content=body,
                                             headers={"Content-Type": "application/json"})
                latencies.append(time.perf_counter() - started)
                responses.append(response)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return seconds, latencies, responses


def _counts(responses: list[httpx.Response], floor: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for response in responses:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        data = orjson.loads(response.content)
        answer = {"inserted": data["inserted"]} if floor else data["counts"]
        for key, value in answer.items():
            counts[key] = counts.get(key, 0) + int(value)
    return counts


def _measure(server: procs.Server, app_key: str, secret: str, warmup: list[bytes],
             bodies: list[bytes], records: int, concurrency: int, floor: bool) -> Run:
    _counts(asyncio.run(_drive(server.url, app_key, secret, warmup, concurrency))[2], floor)
    cpu = server.cpu_seconds()
    seconds, latencies, responses = asyncio.run(
        _drive(server.url, app_key, secret, bodies, concurrency))
    cpu = server.cpu_seconds() - cpu
    counts = _counts(responses, floor)
    stored = counts.get("inserted", 0) if floor else sum(
        counts.get(k, 0) for k in ("accepted", "duplicate", "conflict"))
    if stored != records or counts.get("rejected", 0):
        raise RuntimeError(f"{server.name} did not store every record: {counts}")
    return Run(records, len(bodies), seconds, latencies, server.peak_rss_mb(), counts, cpu)


def _libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as the plain libpq URL psycopg connects with."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run(backend: str, workdir: Path, count: int, per_request: int,
        concurrency: int) -> dict[str, Any]:
    """Measure the floor, then the gateway, on ``backend``; returns both runs and the ratio."""
    records = make_records(count, "BENCH", seed=20261126)
    bodies = make_bodies(records, per_request)
    warmup = make_bodies(make_records(per_request, "WARM", seed=7), per_request)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with procs.store(backend, workdir, "floor") as floor_url:
        env = {"BENCH_FLOOR_DATABASE_URL": floor_url if backend == "sqlite" else _libpq(floor_url)}
        server = procs.uvicorn_server(f"floor-{backend}", "benchmarks.floor:create_app", env, logs)
        with procs.running(server):
            floor = _measure(server, "floor", "unused-secret", warmup, bodies, count,
                             concurrency, floor=True)
    with procs.store(backend, workdir, "gateway") as gw_url:
        upgrade(gw_url)
        engine = make_engine(gw_url)
        try:
            partner = add_partner(engine, SecretBox(procs.SECRET_KEY), "bench-canonical",
                                  "canonical")
        finally:
            engine.dispose()
        server = procs.gateway_server(procs.gateway_env(gw_url, **year_env()), logs,
                                      name=f"gateway-{backend}")
        with procs.running(server):
            gateway = _measure(server, partner.app_key, partner.secret, warmup, bodies, count,
                               concurrency, floor=False)
    return {"backend": backend, "floor": floor, "gateway": gateway,
            "ratio": gateway.seconds / floor.seconds,
            "cpu_ratio": gateway.cpu_seconds / floor.cpu_seconds, "concurrency": concurrency,
            "per_request": per_request}
