"""Scheduled jobs that run once cluster-wide (SPEC §7 "Scale-out").

Every replica builds the same APScheduler; each tick first takes a *lease* on the job's row in
``job_locks``, so however many replicas or processes tick, one runs the job at a time::

    INSERT job_locks(name) … ON CONFLICT DO NOTHING            -- the row exists
    UPDATE job_locks SET owner = :me, until = :now + ttl
     WHERE name = :name AND (until IS NULL OR until < :now OR owner = :me)
    rowcount 1 → we hold it: run, renewing the lease every ttl/3, then set until = now
    (after a scheduled job's successful run: until just before its next due time)
    UPDATE job_locks SET until = :now + ttl WHERE name = :name AND owner = :me  -- a renewal

The UPDATE is atomic on both stores: SQLite serialises writers (``BEGIN IMMEDIATE``), and
PostgreSQL re-checks the WHERE clause on the row it locked, so two callers never both see
rowcount 1.  A holder that crashes stops renewing; its lease expires after ``ttl`` and the next
tick anywhere takes over.  Times come from the callers' clocks (UTC): keep replicas NTP-synced
and ``ttl`` well above any skew.

A holder whose beat came late (a GC pause, CPU starvation, a VM pause, a store blip longer than
``ttl``) keeps its lease if nobody took it meanwhile: a renewal asks only that the owner is
still us, since a takeover is the one thing that changes the owner.  If another replica did take
it, the renewal fails and the run learns it: the keep-alive marks the lease lost, and
:func:`ensure_held` — which a job calls before each of its writes (a pull's page, a sync's
commit, an alert's post) — raises :class:`LeaseLost`, so the stalled run stops instead of
writing beside the new holder.  :func:`ensure_held` also renews at once when the last renewal
it knows of is older than ``ttl`` (the beat may be as late as the job), and ``run_exclusive``
raises :class:`LeaseLost` after a run that lost its lease without noticing.

Jobs are rows of :data:`JOBS` (name, interval, what to run); later features (reference sync,
alerts, retention) add a row with :func:`register`.  :func:`build_scheduler` returns the
scheduler unstarted: whoever owns the process (``ce-gateway serve``) starts and stops it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, or_, update

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.store.tables import job_locks
from gateway.store.util import insert_ignore

__all__ = ["JOBS", "PULL_CADRE_COLLEGE", "Job", "LeaseLost", "acquire", "build_scheduler",
           "default_owner", "ensure_held", "register", "release", "renew", "run_exclusive",
           "run_job"]

log = logging.getLogger(__name__)


class LeaseLost(GatewayError):
    """Another holder took this run's lease over (the run stalled past its TTL): stop writing."""


def default_owner() -> str:
    """A lease owner unique to this call: host, process and a random suffix."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(engine: Engine, name: str, ttl_seconds: float, owner: str,
            now: datetime | None = None) -> bool:
    """Take (or extend) the lease on ``name`` for ``ttl_seconds``; ``True`` if we hold it."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        insert_ignore(conn, job_locks, {"name": name, "owner": None, "until": None})
        taken = conn.execute(
            update(job_locks)
            .where(job_locks.c.name == name,
                   or_(job_locks.c.until.is_(None), job_locks.c.until < now,
                       job_locks.c.owner == owner))
            .values(owner=owner, until=now + timedelta(seconds=ttl_seconds))).rowcount
    return taken == 1


def renew(engine: Engine, name: str, ttl_seconds: float, owner: str) -> bool:
    """Extend a lease we still hold; ``False`` if it was lost (expired and taken over).

    A lease that expired while nobody took it is still ours (its owner is unchanged): it is
    extended, since the run it guards is still going.
    """
    now = datetime.now(UTC)
    with engine.begin() as conn:
        kept = conn.execute(
            update(job_locks)
            .where(job_locks.c.name == name, job_locks.c.owner == owner)
            .values(until=now + timedelta(seconds=ttl_seconds))).rowcount
    return kept == 1


def release(engine: Engine, name: str, owner: str, hold_until: datetime | None = None) -> None:
    """End our lease now (a no-op if someone else holds it); the owner stays for the record.

    ``hold_until`` keeps others out until then instead (a scheduled job's next due time).
    """
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(update(job_locks)
                     .where(job_locks.c.name == name, job_locks.c.owner == owner)
                     .values(until=max(now, hold_until) if hold_until else now))


@dataclass
class _Held:
    """The lease a running job holds, shared by the job's thread and its keep-alive."""

    engine: Engine
    name: str
    ttl_seconds: float
    owner: str
    # time.monotonic() just before the last renewal (or the acquire) that we know succeeded:
    # until ``ttl_seconds`` after it nobody else can hold the lease.
    confirmed: float
    lost: threading.Event = field(default_factory=threading.Event)

    def renew(self) -> bool:
        at = time.monotonic()
        if renew(self.engine, self.name, self.ttl_seconds, self.owner):
            self.confirmed = max(self.confirmed, at)
            return True
        if not self.lost.is_set():
            log.warning("lease %s lost by %s while its job ran: another holder took it over",
                        self.name, self.owner)
            self.lost.set()
        return False


_HELD: ContextVar[_Held | None] = ContextVar("gateway_job_lease", default=None)


def ensure_held() -> None:
    """Raise :class:`LeaseLost` if the lease the current job runs under was taken over.

    Jobs call it before each write; outside :func:`run_exclusive` it does nothing.  It costs no
    query while the last renewal known is younger than the TTL (nobody can have taken the lease
    since); after that, as after a stall, it renews the lease itself to find out.
    """
    held = _HELD.get()
    if held is None:
        return
    if not held.lost.is_set() and time.monotonic() - held.confirmed >= held.ttl_seconds:
        held.renew()
    if held.lost.is_set():
        raise LeaseLost(f"the lease {held.name} was taken over while this run stalled")


def _keep_alive(held: _Held, done: threading.Event) -> None:
    while not done.wait(held.ttl_seconds / 3):
        try:
            if not held.renew():
                return
        except Exception:  # noqa: BLE001 - a store blip; the next beat tries again
            log.warning("could not renew lease %s", held.name, exc_info=True)


def run_exclusive(engine: Engine, name: str, ttl_seconds: float, fn: Callable[[], Any],
                  owner: str | None = None, *, keep_alive: bool = True,
                  hold_seconds: float = 0.0) -> bool:
    """Run ``fn`` if we can take the cluster-wide lease ``name``; ``False`` if someone holds it.

    While ``fn`` runs the lease is renewed every ``ttl_seconds / 3`` (``keep_alive``), so a
    long run keeps it and a crashed holder loses it within ``ttl_seconds``.  Exceptions from
    ``fn`` propagate after the lease is released.  After a successful run the lease is kept
    until ``hold_seconds`` after the start, so nobody runs it again before then.

    ``fn`` should call :func:`ensure_held` before its writes.  A run that lost the lease to
    another holder raises :class:`LeaseLost` (from ``fn``, or here once ``fn`` has returned).
    """
    me = owner or default_owner()
    confirmed = time.monotonic()
    started = datetime.now(UTC)
    if not acquire(engine, name, ttl_seconds, me, started):
        return False
    held = _Held(engine, name, ttl_seconds, me, confirmed)
    done = threading.Event()
    beat = threading.Thread(target=_keep_alive, args=(held, done), name=f"lease:{name}",
                            daemon=True)
    if keep_alive:
        beat.start()
    succeeded = False
    token = _HELD.set(held)
    try:
        fn()
        succeeded = True
    finally:
        _HELD.reset(token)
        done.set()
        if keep_alive:
            beat.join()
        # A lost lease is another holder's now: this release leaves it alone (owner ≠ us).
        release(engine, name, me, started + timedelta(seconds=hold_seconds)
                if succeeded and hold_seconds > 0 else None)
    if held.lost.is_set():
        raise LeaseLost(f"the lease {name} was taken over while this run went on; "
                        "another replica may have run the job beside it")
    return True


# -- the jobs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One scheduled job: also the name of its lease."""

    name: str
    run: Callable[[Engine, Settings], object]
    interval_seconds: Callable[[Settings], float]  # ≤ 0 turns the job off
    lease_seconds: Callable[[Settings], float] = lambda s: s.job_lease_seconds
    run_at_start: bool = True  # first tick as soon as the scheduler starts


class JobFailed(Exception):
    """A job's run failed in a way it has already recorded (no traceback to log)."""


def _pull_cadre_college(engine: Engine, settings: Settings) -> object:
    from gateway.pull.cadre_college import pull_once  # keeps this module light to import

    result = pull_once(engine, settings)
    if result.error is not None and not result.cursor_moved:
        # Recorded as the pull's last_error; failing the run frees the lease for the next tick.
        raise JobFailed(result.error)
    return result


PULL_CADRE_COLLEGE = Job("pull:cadre_college", _pull_cadre_college,
                         lambda s: s.pull_interval_seconds)

JOBS: dict[str, Job] = {job.name: job for job in (PULL_CADRE_COLLEGE,)}


def register(job: Job) -> Job:
    """Add a job to :data:`JOBS` (a later feature's own row); names are unique."""
    if job.name in JOBS and JOBS[job.name] is not job:
        raise ValueError(f"a job named {job.name!r} is already registered")
    JOBS[job.name] = job
    return job


def run_job(engine: Engine, settings: Settings, job: Job) -> bool:
    """One tick of ``job`` under its lease; ``True`` if this process ran it to completion."""
    try:
        # Every worker ticks every interval at its own phase: a run holds the lease until just
        # before the next due time, so the job runs once an interval cluster-wide, not once a
        # tick of each worker.  A failed run releases at once: the next tick anywhere retries.
        ran = run_exclusive(engine, job.name, job.lease_seconds(settings),
                            lambda: job.run(engine, settings),
                            hold_seconds=0.9 * float(job.interval_seconds(settings)))
    except JobFailed as exc:
        log.warning("scheduled job %s failed: %s", job.name, exc)
        return False
    except LeaseLost as exc:
        log.warning("scheduled job %s stopped: %s", job.name, exc)
        return False
    except Exception:  # noqa: BLE001 - one failed tick must not stop the schedule
        log.exception("scheduled job %s failed", job.name)
        return False
    if not ran:
        log.debug("scheduled job %s is running elsewhere; skipped", job.name)
    return ran


def build_scheduler(engine: Engine, settings: Settings,
                    jobs: dict[str, Job] | None = None) -> BackgroundScheduler:
    """A scheduler with every enabled job of ``jobs`` (default :data:`JOBS`); not started.

    ``coalesce`` folds missed ticks into one, ``max_instances=1`` keeps this process from
    overlapping itself, and the lease keeps the cluster from doing so.
    """
    tz = ZoneInfo(settings.timezone)
    scheduler = BackgroundScheduler(timezone=tz)
    for job in (JOBS if jobs is None else jobs).values():
        interval = float(job.interval_seconds(settings))
        if interval <= 0:
            log.info("scheduled job %s is off (interval %s)", job.name, interval)
            continue
        extra: dict[str, Any] = {"next_run_time": datetime.now(tz)} if job.run_at_start else {}
        scheduler.add_job(run_job, trigger=IntervalTrigger(seconds=interval, timezone=tz),
                          args=(engine, settings, job), id=job.name, name=job.name,
                          coalesce=True, max_instances=1,
                          misfire_grace_time=max(1, int(interval)), replace_existing=True,
                          **extra)
    return scheduler
