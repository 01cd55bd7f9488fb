"""Mock of the Qinghai Cadre Network College's completions API (SPEC §8, ``cadre_college``).

A real FastAPI app serving a generated, *growing*, deterministic set of public-subject course
completions, page by page behind an opaque cursor, with fault injection and read-backs, so the
puller's tests and the demo can check "every completion once, none missing" from this side.

What it may touch: nothing outside this process.  It imports nothing from ``gateway/`` or
``adapters/``; all state lives on the app (``app.state.mock``), guarded by one lock.

Completion ``n`` (1-based) is a pure function of ``(seed, year, n)``: person ``(n-1) // 12``
takes the twelve courses in a seeded order, so no two completions share a person and course
(the gateway would rightly call that a duplicate).  Completion times fall between 1 January
and the day the app was created (Beijing time), never after the year closes on 30 December.

Endpoints:
- ``GET  /api/completions?cursor=<opaque>&limit=<n>`` → ``{"data", "next_cursor", "has_more"}``
- ``POST /_mock/grow`` ``{"n": 50}`` (new completions appear), ``GET /_mock/stats``,
  ``GET /_mock/served`` (every xh served), ``GET /_mock/completions`` (every xh generated)
- ``GET|POST /_mock/faults``, ``POST /_mock/reset``, ``GET /healthz``
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from mock_partners.generators import GenPerson, make_person

__all__ = ["COURSES", "DEFAULT_LIMIT", "MAX_LIMIT", "Faults", "CollegeState", "create_app",
           "decode_cursor", "encode_cursor", "serve"]

BEIJING = ZoneInfo("Asia/Shanghai")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
LOG_SIZE = 1000
# Public-subject (公需科目) online courses: (course id, title, hours).
COURSES: tuple[tuple[str, str, int], ...] = (
    ("KC001", "习近平新时代中国特色社会主义思想专题", 6),
    ("KC002", "专业技术人员职业道德与诚信建设", 3),
    ("KC003", "数字经济与创新驱动发展", 4),
    ("KC004", "生态文明建设与三江源保护", 4),
    ("KC005", "人工智能与数字化转型", 3),
    ("KC006", "专业技术人员心理健康与压力管理", 2),
    ("KC007", "知识产权保护实务", 2),
    ("KC008", "乡村振兴战略解读", 3),
    ("KC009", "铸牢中华民族共同体意识", 5),
    ("KC010", "法治政府建设专题", 2),
    ("KC011", "推动高质量发展专题", 4),
    ("KC012", "保密知识与网络安全", 1),
)

Reply = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class Faults:
    """What goes wrong on ``GET /api/completions``.  Mutable at run time."""

    error_rate: float = 0.0  # share of page requests answered 503 (seeded draws)
    fail_next: int = 0  # the next N page requests answer 503, then it counts down to 0
    rate_limit_every: int = 0  # every Nth page request answers 429
    retry_after: str = "1"  # the Retry-After header sent with 429 and 503 ("" = none)
    latency_ms: int = 0  # added to every page request (async sleep)
    outage: bool = False  # while true every page request answers 503
    bad_item_every: int = 0  # every Nth completion is served with a broken id check digit
    seed: int | None = None  # seeds the draws behind error_rate

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


_FAULT_FIELDS = frozenset(f.name for f in fields(Faults))
_FAULTS_ADAPTER = TypeAdapter(Faults)


def encode_cursor(after: int) -> str:
    """The opaque cursor for "everything after completion ``after``"."""
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Inverse of :func:`encode_cursor`; ``ValueError`` for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable cursor {cursor[:40]!r}") from exc
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ValueError(f"unreadable cursor {cursor[:40]!r}")
    return after


class CollegeState:
    """The completions, the faults and what was served; every public method takes the lock."""

    def __init__(self, *, seed: int, initial: int, growth_per_call: int, faults: Faults,
                 year: int | None = None, today: date | None = None) -> None:
        self.lock = threading.Lock()
        self.seed, self.growth_per_call = seed, growth_per_call
        self.faults = faults  # shared with the caller on purpose: tests flip it directly
        self._initial_faults = replace(faults)
        self._initial_total = initial
        today = today or datetime.now(BEIJING).date()
        self.year = year or today.year
        # Completions fall on 1 Jan … min(today, 30 Dec): never in the future, never after close.
        last = min(today, date(self.year, 12, 30)) if today.year == self.year else date(self.year, 12, 30)
        self._days = max(1, (last - date(self.year, 1, 1)).days + 1)
        self._people: dict[int, GenPerson] = {}
        self._clear()

    def _clear(self) -> None:
        self.total = self._initial_total
        self.rng = random.Random(self.faults.seed)
        self.requests = 0
        self.page_requests = 0
        self.by_status: dict[str, int] = {}
        self.items_served = 0
        self.served: set[int] = set()
        self.log: list[dict[str, Any]] = []

    # -- the data -------------------------------------------------------------------------
    def _person(self, index: int) -> GenPerson:
        person = self._people.get(index)
        if person is None:
            person = make_person(random.Random(f"{self.seed}/person/{index}"))
            self._people[index] = person
        return person

    def xh(self, seq: int) -> str:
        return f"GB{self.year}{seq:09d}"

    def completion(self, seq: int) -> dict[str, Any]:
        """Completion ``seq`` (1-based): the same item every time for one seed and year."""
        index, slot = divmod(seq - 1, len(COURSES))
        order = random.Random(f"{self.seed}/order/{index}").sample(range(len(COURSES)), len(COURSES))
        kcbh, kcmc, hours = COURSES[order[slot]]
        rng = random.Random(f"{self.seed}/{self.year}/done/{seq}")
        day = date(self.year, 1, 1) + timedelta(days=rng.randrange(self._days))
        at = datetime.combine(day, time()) + timedelta(seconds=rng.randrange(86400))
        person = self._person(index)
        return {"xh": self.xh(seq), "sfzh": person.id_number, "xm": person.name,
                "dwmc": person.employer, "dqdm": person.region, "kcbh": kcbh, "kcmc": kcmc,
                "xs": hours, "wcsj": at.strftime("%Y-%m-%d %H:%M:%S"),
                "zsbh": f"QHGBWY{self.year}{seq:08d}"}

    def _served_item(self, seq: int) -> dict[str, Any]:
        item = self.completion(seq)
        every = self.faults.bad_item_every
        if every > 0 and seq % every == 0:
            last = item["sfzh"][-1]
            item["sfzh"] = item["sfzh"][:-1] + ("1" if last != "1" else "2")
        return item

    def grow(self, n: int) -> int:
        with self.lock:
            self.total += max(0, n)
            return self.total

    # -- the API --------------------------------------------------------------------------
    def page(self, cursor: str | None, limit: int | None) -> Reply:
        with self.lock:
            status, body, headers, entry = self._page(cursor, limit)
            self.requests += 1
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
            self.log = [*self.log[-(LOG_SIZE - 1):], {**entry, "status": status}]
            return status, body, headers

    def _page(self, cursor: str | None, limit: int | None) -> tuple[int, dict[str, Any], dict[str, str], dict[str, Any]]:
        f = self.faults
        entry: dict[str, Any] = {"cursor": cursor, "after": None, "served": 0}
        retry = {"Retry-After": f.retry_after} if f.retry_after else {}
        if f.outage:
            return 503, {"error": "service unavailable (outage)"}, retry, entry
        self.page_requests += 1
        if f.fail_next > 0:
            f.fail_next -= 1
            return 503, {"error": "injected failure"}, retry, entry
        if f.rate_limit_every > 0 and self.page_requests % f.rate_limit_every == 0:
            return 429, {"error": "too many requests"}, retry, entry
        if f.error_rate > 0 and self.rng.random() < f.error_rate:
            return 503, {"error": "injected server error"}, retry, entry
        try:
            after = decode_cursor(cursor) if cursor else 0
        except ValueError as exc:
            return 400, {"error": str(exc)}, {}, entry
        size = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= size <= MAX_LIMIT:
            return 400, {"error": f"limit must be 1-{MAX_LIMIT}"}, {}, entry
        self.total += self.growth_per_call
        last = min(self.total, after + size)
        data = [self._served_item(seq) for seq in range(after + 1, last + 1)]
        self.served.update(range(after + 1, last + 1))
        self.items_served += len(data)
        entry.update(after=after, served=len(data))
        body = {"data": data, "next_cursor": encode_cursor(max(after, last)),
                "has_more": last < self.total}
        return 200, body, {}, entry

    # -- read-back and control ------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"total": self.total, "requests": self.requests,
                    "by_status": dict(self.by_status), "items_served": self.items_served,
                    "distinct_served": len(self.served), "log": [dict(e) for e in self.log]}

    def served_ids(self) -> list[str]:
        with self.lock:
            return [self.xh(seq) for seq in sorted(self.served)]

    def all_ids(self) -> list[str]:
        with self.lock:
            return [self.xh(seq) for seq in range(1, self.total + 1)]

    def update_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a partial update; ``ValueError`` on unknown fields or bad values."""
        unknown = set(changes) - _FAULT_FIELDS
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        with self.lock:
            try:
                checked = _FAULTS_ADAPTER.validate_python({**self.faults.as_json(), **changes})
            except ValidationError as exc:
                raise ValueError(str(exc)) from exc
            for name in _FAULT_FIELDS:
                setattr(self.faults, name, getattr(checked, name))
            if "seed" in changes:
                self.rng = random.Random(self.faults.seed)
            return self.faults.as_json()

    def reset(self) -> None:
        """Back to the initial completions and faults; forget what was served."""
        with self.lock:
            for name in _FAULT_FIELDS:
                setattr(self.faults, name, getattr(self._initial_faults, name))
            self._clear()


def _state(request: Request) -> CollegeState:
    return cast(CollegeState, request.app.state.mock)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_object(request: Request) -> dict[str, Any]:
    body = json.loads(await request.body() or b"{}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def create_app(seed: int = 1, initial: int = 100, growth_per_call: int = 0,
               faults: Faults | None = None, *, year: int | None = None,
               today: date | None = None) -> FastAPI:
    """A fresh mock college with ``initial`` completions; ``faults`` is used live.

    ``growth_per_call`` completions appear at every page request that gets through the faults
    (before its page is cut), as if students kept finishing courses while the gateway pulls.
    """
    app = FastAPI(title="Mock Qinghai Cadre Network College", version="1")
    app.state.mock = CollegeState(seed=seed, initial=initial, growth_per_call=growth_per_call,
                                  faults=faults if faults is not None else Faults(), year=year,
                                  today=today)

    @app.get("/api/completions")
    async def completions(request: Request, cursor: str | None = None,
                          limit: str | None = None) -> JSONResponse:
        state = _state(request)
        if state.faults.latency_ms > 0:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        try:
            size = int(limit) if limit is not None else None
        except ValueError:
            return _error(400, "limit must be an integer")
        status, body, headers = state.page(cursor, size)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.post("/_mock/grow")
    async def grow(request: Request) -> JSONResponse:
        try:
            n = (await _json_object(request)).get("n", 0)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError("n must be a non-negative integer")
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse({"total": _state(request).grow(n)})

    @app.get("/_mock/stats")
    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(_state(request).stats())

    @app.get("/_mock/served")
    async def served(request: Request) -> JSONResponse:
        return JSONResponse({"ids": _state(request).served_ids()})

    @app.get("/_mock/completions")
    async def generated(request: Request) -> JSONResponse:
        return JSONResponse({"ids": _state(request).all_ids()})

    @app.get("/_mock/faults")
    async def get_faults(request: Request) -> JSONResponse:
        return JSONResponse(_state(request).faults.as_json())

    @app.post("/_mock/faults")
    async def set_faults(request: Request) -> JSONResponse:
        try:
            return JSONResponse(_state(request).update_faults(await _json_object(request)))
        except ValueError as exc:
            return _error(400, str(exc))

    @app.post("/_mock/reset")
    async def reset(request: Request) -> JSONResponse:
        _state(request).reset()
        return JSONResponse({"reset": True})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "time": datetime.now(UTC).isoformat()}

    return app


def serve(host: str = "127.0.0.1", port: int = 8781, **kwargs: Any) -> None:
    """Run the mock under uvicorn until interrupted; ``kwargs`` go to :func:`create_app`."""
    uvicorn.run(create_app(**kwargs), host=host, port=port, log_level="warning")
