"""Mock of the provincial CE management system (SPEC §5, "Downstream").

A real FastAPI app that imitates the management system's intake and reference API, with
fault injection and a read-back of everything it received, so delivery tests and the demo
can check "effectively once, in order" from the receiving side.

What it may touch: nothing outside this process. It imports nothing from ``gateway/`` or
``adapters/``; all state lives on the app (``app.state.mock``), guarded by one lock, so
several apps can run side by side in one test session.

Endpoints:
- ``POST /api/v1/ce-records/batch`` (``Idempotency-Key`` header, ``{"records": [...]}``)
- ``GET  /api/v1/reference/{bases|plans|deferrals|title-applicants}?since=&cursor=``
- ``GET  /_mock/applied``, ``GET /_mock/applied/{record_id}`` (read-back)
- ``GET|POST /_mock/faults``, ``POST /_mock/reset``, ``POST /_mock/reference/{kind}``
- ``GET  /healthz``
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, cast

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

__all__ = [
    "MAX_BATCH",
    "PAGE_SIZE",
    "REFERENCE_KINDS",
    "Faults",
    "MockState",
    "create_app",
    "serve",
]

MAX_BATCH = 500
PAGE_SIZE = 100
REFERENCE_KINDS = ("bases", "plans", "deferrals", "title-applicants")

Reply = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class Faults:
    """What goes wrong, and how often. Mutable at run time (directly or via /_mock/faults)."""

    error_rate: float = 0.0  # share of intake requests answered 503, not applied
    latency_ms: int = 0  # added to every intake request (async sleep)
    outage: bool = False  # while true every intake request gets 503 + Retry-After
    outage_until: float | None = None  # unix time; an outage window that ends by itself
    rate_limit_every: int = 0  # every Nth intake request gets 429 + Retry-After, not applied
    retry_after: str = "1"  # the Retry-After sent with those 429s and outage 503s ("" = none)
    lost_reply_rate: float = 0.0  # share of fresh requests applied, then answered 503
    duplicate_receipts: bool = False  # each receipt appears twice in the reply
    replay_conflict: bool = False  # a replayed key answers 409 (SPEC: "already applied")
    reject_ids: set[str] = field(default_factory=set)  # id_number, record_id or exact title
    reject_title_marker: str = "[REJECT]"  # a title containing it is rejected
    seed: int | None = None  # seeds the random.Random behind error/lost-reply draws

    def in_outage(self, now: float | None = None) -> bool:
        """True while the flag is set or the outage window has not yet ended."""
        if self.outage:
            return True
        now = time.time() if now is None else now
        return self.outage_until is not None and now < self.outage_until

    def start_outage(self, seconds: float | None = None) -> None:
        """Start an outage: open-ended, or ending by itself after ``seconds``."""
        if seconds is None:
            self.outage = True
        else:
            self.outage_until = time.time() + seconds

    def stop_outage(self) -> None:
        """End any outage now."""
        self.outage = False
        self.outage_until = None

    def as_json(self) -> dict[str, Any]:
        """The faults as JSON-ready data (the set becomes a sorted list)."""
        data = asdict(self)
        data["reject_ids"] = sorted(self.reject_ids)
        return data


_FAULT_FIELDS = frozenset(f.name for f in fields(Faults))
_FAULTS_ADAPTER = TypeAdapter(Faults)


def _receipt(
    record_id: str, version: int, status: str, receipt_no: str | None, reason: str | None
) -> dict[str, Any]:
    return {
        "record_id": record_id,
        "version": version,
        "status": status,
        "receipt_no": receipt_no,
        "reason": reason,
    }


def _parse_records(raw: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """Minimal validation: the body shape, the batch size, and record_id/version per record."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return [], "body is not valid JSON"
    records = body.get("records") if isinstance(body, dict) else None
    if not isinstance(records, list):
        return [], 'body must be {"records": [...]}'
    if not 1 <= len(records) <= MAX_BATCH:
        return [], f"records must hold 1-{MAX_BATCH} items, got {len(records)}"
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            return [], f"records[{i}] is not an object"
        rid, ver = rec.get("record_id"), rec.get("version")
        if not isinstance(rid, str) or not rid:
            return [], f"records[{i}].record_id missing or not a string"
        if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
            return [], f"records[{i}].version missing or not a positive integer"
    return records, None


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _sub(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


class MockState:
    """Everything the mock remembers; every method takes the lock."""

    def __init__(self, faults: Faults) -> None:
        self.lock = threading.Lock()
        self.faults = faults  # shared with the caller on purpose: tests flip it directly
        self._initial = replace(faults, reject_ids=set(faults.reject_ids))
        self._clear()

    def _clear(self) -> None:
        self.rng = random.Random(self.faults.seed)
        self.applied: list[dict[str, Any]] = []
        self.bodies: dict[tuple[str, int], dict[str, Any]] = {}
        self.receipt_nos: dict[tuple[str, int], str] = {}
        self.highest: dict[str, int] = {}
        self.out_of_order: list[dict[str, Any]] = []
        self.apply_calls: Counter[tuple[str, int]] = Counter()
        self.replies: dict[str, tuple[list[list[Any]], dict[str, Any]]] = {}
        self.key_mismatch: list[dict[str, Any]] = []
        self.by_status: Counter[str] = Counter()
        self.intake_seen = 0
        self.receipt_seq = 0
        self.reference: dict[str, list[dict[str, Any]]] = {k: [] for k in REFERENCE_KINDS}

    def reset(self) -> None:
        """Forget everything received; restore the faults the app was created with."""
        with self.lock:
            for name in _FAULT_FIELDS:
                setattr(self.faults, name, getattr(self._initial, name))
            self.faults.reject_ids = set(self._initial.reject_ids)
            self._clear()

    def update_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a partial update; raises ValueError on unknown fields or bad values."""
        unknown = set(changes) - _FAULT_FIELDS - {"outage_seconds"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        seconds = changes.get("outage_seconds")
        plain = {k: v for k, v in changes.items() if k != "outage_seconds"}
        with self.lock:
            merged = {**self.faults.as_json(), **plain}
            try:
                checked = _FAULTS_ADAPTER.validate_python(merged)
                if seconds is not None and not isinstance(seconds, int | float):
                    raise ValueError("outage_seconds must be a number")
            except ValidationError as exc:
                raise ValueError(str(exc)) from exc
            for name in _FAULT_FIELDS:
                setattr(self.faults, name, getattr(checked, name))
            if seconds is not None:
                self.faults.start_outage(float(seconds))
            if "seed" in plain:
                self.rng = random.Random(self.faults.seed)
            return self.faults.as_json()

    # -- intake ---------------------------------------------------------------------------

    def intake(self, key: str | None, raw: bytes) -> Reply:
        """Answer one batch request: faults first, then replay or apply."""
        with self.lock:
            status, body, headers = self._intake(key, raw)
            self.by_status[str(status)] += 1
            return status, body, headers

    def _intake(self, key: str | None, raw: bytes) -> Reply:
        f = self.faults
        retry = {"Retry-After": f.retry_after} if f.retry_after else {}
        if f.in_outage():
            return 503, {"error": "service unavailable (outage)"}, retry
        self.intake_seen += 1
        if f.rate_limit_every > 0 and self.intake_seen % f.rate_limit_every == 0:
            return 429, {"error": "too many requests"}, retry
        if f.error_rate > 0 and self.rng.random() < f.error_rate:
            return 503, {"error": "injected server error"}, {}
        if not key:
            return 400, {"error": "missing Idempotency-Key header"}, {}
        records, error = _parse_records(raw)
        if error is not None:
            return 400, {"error": error}, {}
        wanted = [[r["record_id"], r["version"]] for r in records]
        if key in self.replies:
            stored, reply = self.replies[key]
            if stored != wanted:  # a gateway bug: one key must always carry the same batch
                self.key_mismatch.append({"idempotency_key": key, "first": stored, "now": wanted})
            return (409 if f.replay_conflict else 200), reply, {}
        receipts = [self._apply_one(key, r) for r in records]
        if f.duplicate_receipts:
            receipts = [dict(r) for r in receipts for _ in range(2)]
        reply = {"receipts": receipts}
        self.replies[key] = (wanted, reply)
        # Only a fresh application can lose its reply; a replay answers normally.
        if f.lost_reply_rate > 0 and self.rng.random() < f.lost_reply_rate:
            return 503, {"error": "reply lost (the request was applied)"}, {}
        return 200, reply, {}

    def _apply_one(self, key: str, rec: dict[str, Any]) -> dict[str, Any]:
        rid, ver = cast(str, rec["record_id"]), cast(int, rec["version"])
        prior = self.receipt_nos.get((rid, ver))
        if prior is not None:
            return _receipt(rid, ver, "duplicate", prior, "record version already applied")
        reason = self._reject_reason(rid, rec)
        if reason is not None:
            return _receipt(rid, ver, "rejected", None, reason)
        self.receipt_seq += 1
        year = rec.get("year")
        year = year if isinstance(year, int) else datetime.now(UTC).year
        receipt_no = f"CE{year}-{self.receipt_seq:08d}"
        self._record_applied(key, rid, ver, rec, receipt_no)
        return _receipt(rid, ver, "accepted", receipt_no, None)

    def _reject_reason(self, rid: str, rec: dict[str, Any]) -> str | None:
        f = self.faults
        id_number = _sub(rec, "person").get("id_number")
        title = _sub(rec, "activity").get("title")
        if isinstance(title, str) and f.reject_title_marker and f.reject_title_marker in title:
            return f"activity title carries {f.reject_title_marker}"
        for label, value in (("id_number", id_number), ("record_id", rid), ("title", title)):
            if isinstance(value, str) and value in f.reject_ids:
                return f"{label} is on the reject list"
        return None

    def _record_applied(
        self, key: str, rid: str, ver: int, rec: dict[str, Any], receipt_no: str
    ) -> None:
        # Counted on every call, not derived from the guard above, so a broken guard shows.
        self.apply_calls[(rid, ver)] += 1
        highest = self.highest.get(rid)
        if highest is not None and ver < highest:
            self.out_of_order.append(
                {
                    "record_id": rid,
                    "version": ver,
                    "highest_applied": highest,
                    "idempotency_key": key,
                }
            )
        else:
            self.highest[rid] = ver
        self.applied.append(
            {
                "record_id": rid,
                "version": ver,
                "withdrawn": bool(rec.get("withdrawn", False)),
                "receipt_no": receipt_no,
                "idempotency_key": key,
                "seq": len(self.applied) + 1,
            }
        )
        self.receipt_nos[(rid, ver)] = receipt_no
        self.bodies[(rid, ver)] = rec

    # -- read-back ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What /_mock/applied answers."""
        with self.lock:
            return {
                "applied": [dict(a) for a in self.applied],
                "out_of_order": [dict(o) for o in self.out_of_order],
                "requests": {
                    "total": sum(self.by_status.values()),
                    "by_status": dict(self.by_status),
                },
                "double_applied": [
                    {"record_id": rid, "version": ver, "times": n}
                    for (rid, ver), n in self.apply_calls.items()
                    if n > 1
                ],
                "key_mismatch": [dict(m) for m in self.key_mismatch],
            }

    def record_versions(self, record_id: str) -> list[dict[str, Any]]:
        """Every applied version of one record, in the order applied, with its body."""
        with self.lock:
            return [
                {**a, "record": self.bodies[(a["record_id"], a["version"])]}
                for a in self.applied
                if a["record_id"] == record_id
            ]

    # -- reference data -------------------------------------------------------------------

    def load_reference(self, kind: str, items: list[dict[str, Any]]) -> int:
        """Append items, stamping ``updated_at`` where the item has none; returns the total."""
        now = datetime.now(UTC).isoformat()
        stamped = []
        for item in items:
            item = {**item, "updated_at": item.get("updated_at") or now}
            _parse_time(str(item["updated_at"]))  # ValueError reaches the route as a 400
            stamped.append(item)
        with self.lock:
            self.reference[kind].extend(stamped)
            return len(self.reference[kind])

    def reference_page(self, kind: str, since: str | None, cursor: str | None) -> dict[str, Any]:
        """One page; ``since`` is inclusive (sync is at-least-once and upserts are idempotent)."""
        offset = int(cursor) if cursor else 0
        if offset < 0:
            raise ValueError("cursor must not be negative")
        floor = _parse_time(since) if since else None
        with self.lock:
            items = self.reference[kind]
            if floor is not None:
                items = [i for i in items if _parse_time(str(i["updated_at"])) >= floor]
            page = [dict(i) for i in items[offset : offset + PAGE_SIZE]]
            more = offset + PAGE_SIZE < len(items)
        return {"items": page, "next": str(offset + PAGE_SIZE) if more else None}


def _state(request: Request) -> MockState:
    return cast(MockState, request.app.state.mock)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(faults: Faults | None = None) -> FastAPI:
    """Build a fresh mock; ``faults`` is used live (mutating it changes behaviour at once)."""
    app = FastAPI(title="Mock Qinghai CE management system", version="1")
    app.state.mock = MockState(faults if faults is not None else Faults())

    @app.post("/api/v1/ce-records/batch")
    async def intake_batch(request: Request) -> JSONResponse:
        state = _state(request)
        if state.faults.latency_ms > 0:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        raw = await request.body()
        status, body, headers = state.intake(request.headers.get("Idempotency-Key"), raw)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/api/v1/reference/{kind}")
    async def reference(
        request: Request, kind: str, since: str | None = None, cursor: str | None = None
    ) -> JSONResponse:
        if kind not in REFERENCE_KINDS:
            return _error(404, f"unknown reference kind {kind!r}")
        try:
            return JSONResponse(_state(request).reference_page(kind, since, cursor))
        except ValueError as exc:
            return _error(400, f"bad since or cursor: {exc}")

    @app.post("/_mock/reference/{kind}")
    async def load_reference(request: Request, kind: str) -> JSONResponse:
        if kind not in REFERENCE_KINDS:
            return _error(404, f"unknown reference kind {kind!r}")
        try:
            body = json.loads(await request.body())
            items = body["items"]
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ValueError("items must be a list of objects")
            total = _state(request).load_reference(kind, items)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f'body must be {{"items": [...]}}: {exc}')
        return JSONResponse({"loaded": len(items), "total": total})

    @app.get("/_mock/applied")
    async def applied(request: Request) -> JSONResponse:
        return JSONResponse(_state(request).snapshot())

    @app.get("/_mock/applied/{record_id}")
    async def applied_record(request: Request, record_id: str) -> JSONResponse:
        versions = _state(request).record_versions(record_id)
        return JSONResponse({"record_id": record_id, "versions": versions})

    @app.get("/_mock/faults")
    async def get_faults(request: Request) -> JSONResponse:
        return JSONResponse(_state(request).faults.as_json())

    @app.post("/_mock/faults")
    async def set_faults(request: Request) -> JSONResponse:
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of Faults fields")
            return JSONResponse(_state(request).update_faults(changes))
        except ValueError as exc:
            return _error(400, str(exc))

    @app.post("/_mock/reset")
    async def reset(request: Request) -> JSONResponse:
        _state(request).reset()
        return JSONResponse({"reset": True})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(host: str = "127.0.0.1", port: int = 8780, faults: Faults | None = None) -> None:
    """Run the mock under uvicorn until interrupted."""
    uvicorn.run(create_app(faults), host=host, port=port, log_level="warning")
