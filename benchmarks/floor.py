"""The floor of canonical ingest: a server that only parses the JSON and bulk-inserts it.

``uvicorn --factory benchmarks.floor:create_app`` with ``BENCH_FLOOR_DATABASE_URL`` (a
``sqlite:///`` file or a ``postgresql://`` URL).  ``POST /v1/records`` takes the very bodies the
gateway takes (``{"records": [...]}``, signed headers ignored), parses them with orjson and
stores every record as one row (source id + its JSON) with one ``executemany`` and one commit
per request — the least any server that durably accepts these batches must do.  SQLite gets the
gateway store's settings (WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``), so the two differ
only in the gateway's own work: signature, validation, rules, dedup, versions, outbox, audit.
"""

from __future__ import annotations

import os
import queue
import sqlite3
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

TABLE = ("CREATE TABLE IF NOT EXISTS floor_records (id {pk}, source_record_id TEXT NOT NULL, "
         "payload TEXT NOT NULL)")


class Store:
    """A pool of DB-API connections, one per concurrent request, made on demand."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite:///")
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        conn = self._connect()
        pk = "INTEGER PRIMARY KEY" if self.sqlite else "BIGSERIAL PRIMARY KEY"
        conn.execute(TABLE.format(pk=pk))
        if not self.sqlite:
            conn.commit()
        self._idle.put(conn)
        marker = "?" if self.sqlite else "%s"
        self.sql = f"INSERT INTO floor_records (source_record_id, payload) VALUES ({marker}, {marker})"

    def _connect(self) -> Any:
        if self.sqlite:
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None,
                                   check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA wal_autocheckpoint=20000")
            conn.execute("PRAGMA busy_timeout=60000")
            return conn
        import psycopg

        return psycopg.connect(self.url)

    def insert(self, records: list[dict[str, Any]]) -> int:
        rows = [(str(r["source_record_id"]), orjson.dumps(r).decode()) for r in records]
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            if self.sqlite:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(self.sql, rows)
                conn.execute("COMMIT")
            else:
                with conn.cursor() as cur:
                    cur.executemany(self.sql, rows)
                conn.commit()
        finally:
            self._idle.put(conn)
        return len(rows)


def create_app() -> FastAPI:
    store = Store(os.environ["BENCH_FLOOR_DATABASE_URL"])
    app = FastAPI(title="ingest floor")

    @app.post("/v1/records")
    async def records(request: Request) -> Response:
        body = await request.body()
        inserted = await run_in_threadpool(store.insert, orjson.loads(body)["records"])
        return Response(orjson.dumps({"inserted": inserted}), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app
