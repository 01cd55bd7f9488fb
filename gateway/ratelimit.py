"""Per-partner rate limits: 429 ``RATE_LIMITED`` with ``Retry-After`` (issue 6, SPEC §7).

The limiter is GCRA, the generic cell rate algorithm: a token bucket kept as one number per
key, the *theoretical arrival time* (TAT).  With ``T`` = 60 s / RATE_LIMIT_PER_MINUTE and a
tolerance ``tau`` = (RATE_LIMIT_BURST - 1) x ``T``, a request at ``now`` conforms when
``max(TAT, now) - now <= tau``, and then moves TAT to ``max(TAT, now) + T``.  So a quiet
partner may send RATE_LIMIT_BURST requests at once, and then one every ``T``.

The TAT lives in the store (``rate_limits``, one row per app key), so every replica behind the
load balancer counts against the same budget (SPEC §7 "scale-out").  One statement per
request, inside the transaction that remembers the request's nonce (gateway/api/deps.py):
``INSERT … ON CONFLICT (bucket) DO UPDATE SET tat = … WHERE <conforms> RETURNING tat``,
the same on PostgreSQL (row lock on the partner's row) and SQLite (≥ 3.35).  No row returned
means "refused"; only then a second statement reads the TAT for an exact ``Retry-After``.

Only authenticated requests are counted (the caller checks the HMAC first), so a flood of
unsigned or badly signed requests cannot spend a real partner's budget.  Replicas' clocks are
assumed to agree to well under ``T`` (NTP); a skew only shifts one partner's budget slightly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.errors import PayloadRejected
from gateway.store.tables import rate_limits

__all__ = ["Limit", "RateLimited", "admit"]


class RateLimited(PayloadRejected):
    """429 ``RATE_LIMITED``; ``headers`` carries ``Retry-After`` in whole seconds."""

    status_code = 429
    default_code = "RATE_LIMITED"

    def __init__(self, retry_after: int) -> None:
        super().__init__(detail=f"(retry after {retry_after} s)", detail_zh=f"（请在 {retry_after} 秒后重试）")
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


@dataclass(frozen=True)
class Limit:
    per_minute: int  # > 0
    burst: int  # >= 1

    @property
    def interval_ms(self) -> int:
        """``T``, rounded up so the configured rate is never exceeded."""
        return -(-60_000 // self.per_minute)

    @property
    def tolerance_ms(self) -> int:
        return (self.burst - 1) * self.interval_ms


def admit(conn: Connection, key: str, limit: Limit, now_ms: int | None = None) -> int | None:
    """Count one request against ``key``: ``None`` if it conforms, else seconds to wait."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    step, tau = limit.interval_ms, limit.tolerance_ms
    postgres = conn.dialect.name == "postgresql"
    insert = pg_insert if postgres else sqlite_insert
    # SQLite's two-argument max() is its scalar GREATEST.
    start = (func.greatest if postgres else func.max)(rate_limits.c.tat_ms, now)
    statement = insert(rate_limits).values(bucket=key, tat_ms=now + step).on_conflict_do_update(
        index_elements=[rate_limits.c.bucket], set_={"tat_ms": start + step},
        where=start - now <= tau,
    ).returning(rate_limits.c.tat_ms)
    if conn.execute(statement).first() is not None:
        return None
    tat = conn.execute(select(rate_limits.c.tat_ms).where(rate_limits.c.bucket == key)).scalar()
    # Refused means TAT - now > tau, and TAT never runs more than tau + T ahead: 0 < wait <= T.
    wait_ms = step if tat is None else max(int(tat) - now - tau, 1)
    return max(1, math.ceil(min(wait_ms, step) / 1000))
