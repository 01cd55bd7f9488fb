"""Cluster-wide job leases and the scheduler, on SQLite and PostgreSQL.

One holder at a time across threads, engines and processes; a crashed holder's lease expires;
a long run keeps its lease alive; the scheduler registers and runs the pull job.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from gateway.config import Settings
from gateway.pull.cadre_college import PARTNER
from gateway.scheduling import (
    JOBS,
    PULL_CADRE_COLLEGE,
    Job,
    LeaseLost,
    acquire,
    build_scheduler,
    ensure_held,
    renew,
    run_exclusive,
    run_job,
)
from gateway.store.db import make_engine
from gateway.store.tables import job_locks, records
from mock_partners.cadre_college import create_app
from tests.support.servers import poll, uvicorn_thread

REPO = Path(__file__).resolve().parents[2]
NAME = "test:job"


def lease_until(engine: Engine, name: str = NAME) -> datetime | None:
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            select(job_locks.c.until).where(job_locks.c.name == name)).scalar_one_or_none()
        return value


class Holder:
    """Runs ``run_exclusive`` in a thread and keeps the lease until told to let go."""

    def __init__(self, engine: Engine, ttl: float = 30.0, name: str = NAME) -> None:
        self.inside, self.go = threading.Event(), threading.Event()
        self.result: bool | None = None
        self.thread = threading.Thread(target=self._run, args=(engine, ttl, name), daemon=True)

    def _run(self, engine: Engine, ttl: float, name: str) -> None:
        def job() -> None:
            self.inside.set()
            assert self.go.wait(30)

        self.result = run_exclusive(engine, name, ttl, job)

    def __enter__(self) -> Holder:
        self.thread.start()
        assert self.inside.wait(30), "the holder never got the lease"
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.thread.join(30)


def test_only_one_of_two_threads_runs_the_job(engine: Engine) -> None:
    ran: list[str] = []
    with Holder(engine) as holder:
        assert run_exclusive(engine, NAME, 30, lambda: ran.append("second")) is False
    assert holder.result is True and ran == []
    # Released on return: the next caller gets it at once.
    assert run_exclusive(engine, NAME, 30, lambda: ran.append("third")) is True
    assert ran == ["third"]


def test_concurrent_callers_never_overlap(engine: Engine) -> None:
    lock, active, peak, runs = threading.Lock(), [0], [0], [0]
    start = threading.Barrier(4)

    def job() -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            runs[0] += 1
        lease_until(engine)  # a little store work while holding the lease
        with lock:
            active[0] -= 1

    def caller() -> None:
        start.wait(30)
        for _ in range(10):
            run_exclusive(engine, NAME, 30, job, keep_alive=False)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] == 1 and runs[0] >= 1


HOLD_SCRIPT = textwrap.dedent("""
    import sys
    from gateway.scheduling import run_exclusive
    from gateway.store.db import make_engine

    def job():
        print("holding", flush=True)
        sys.stdin.readline()

    print(run_exclusive(make_engine(sys.argv[1]), sys.argv[2], 30, job), flush=True)
""")


def test_a_lease_held_by_another_process_or_engine_excludes_us(db_url: str, engine: Engine) -> None:
    other_engine = make_engine(db_url)
    with subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, db_url, NAME], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "holding"
            ran: list[int] = []
            assert run_exclusive(engine, NAME, 30, lambda: ran.append(1)) is False
            assert run_exclusive(other_engine, NAME, 30, lambda: ran.append(2)) is False
            proc.stdin.write("done\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "True"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    try:
        assert run_exclusive(other_engine, NAME, 30, lambda: ran.append(3)) is True
        assert ran == [3]
        # And the other way round: our engine holds it, the second engine is refused.
        with Holder(engine):
            assert run_exclusive(other_engine, NAME, 30, lambda: ran.append(4)) is False
        assert ran == [3]
    finally:
        other_engine.dispose()


def test_an_expired_lease_lets_another_take_over(engine: Engine) -> None:
    # A holder that took the lease and died: nobody releases or renews it.  The TTL leaves a
    # loaded machine ample time for the refusal below; the takeover must wait the TTL out.
    ttl = 3.0
    before = datetime.now(UTC)
    assert acquire(engine, NAME, ttl, "crashed-replica") is True
    ran: list[int] = []
    assert run_exclusive(engine, NAME, 30, lambda: ran.append(1)) is False
    poll(lambda: run_exclusive(engine, NAME, 30, lambda: ran.append(2)), 15, interval=0.1,
         what="the dead holder's lease to expire")
    assert datetime.now(UTC) - before >= timedelta(seconds=ttl)  # not taken before it expired
    assert ran == [2]
    assert renew(engine, NAME, 30, "crashed-replica") is False  # it cannot take it back


def test_a_long_run_keeps_its_lease_alive(engine: Engine) -> None:
    # Renewed every ttl / 3: the lease is lost only if a renewal comes ttl * 2/3 late, which
    # a loaded machine does not do in seconds.
    ttl = 2.0
    refused: list[bool] = []

    def long_job() -> None:
        started = datetime.now(UTC)
        # Wait until the first lease has expired, and a renewal has pushed it on.
        poll(lambda: (datetime.now(UTC) - started > timedelta(seconds=ttl + 0.5)
                      and (lease_until(engine) or started) > datetime.now(UTC)),
             15, interval=0.05, what="a renewed lease")
        refused.append(not acquire(engine, NAME, 5, "another-replica"))

    assert run_exclusive(engine, NAME, ttl, long_job) is True
    assert refused == [True]
    until = lease_until(engine)
    assert until is not None and until <= datetime.now(UTC)  # released on return


def test_build_scheduler_registers_the_pull_job(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(db_url, pull_interval_seconds=123, timezone="Asia/Shanghai")
    scheduler = build_scheduler(engine, settings)
    assert not scheduler.running
    job = scheduler.get_job("pull:cadre_college")
    assert job is not None and job.id in JOBS
    assert job.trigger.interval == timedelta(seconds=123)
    assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time == 123
    assert job.args == (engine, settings, PULL_CADRE_COLLEGE)

    off = build_scheduler(engine, make_settings(db_url, pull_interval_seconds=0))
    assert off.get_job("pull:cadre_college") is None

    extra = Job("test:extra", lambda _e, _s: None, lambda _s: 45)
    custom = build_scheduler(engine, settings, jobs={extra.name: extra})
    assert [j.id for j in custom.get_jobs()] == ["test:extra"]


@pytest.fixture
def college_url() -> Iterator[str]:
    with uvicorn_thread(create_app(seed=21, initial=75)) as url:
        yield url


def _pulled(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(records)
                                .where(records.c.partner_id == PARTNER.partner_id)).scalar_one())


def test_the_scheduled_pull_runs_under_its_lease(
        db_url: str, engine: Engine, college_url: str,
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(db_url, cadre_college_url=college_url, pull_interval_seconds=3600,
                             pull_page_size=30)
    # Held elsewhere: this replica's tick does nothing.
    with Holder(engine, name=PULL_CADRE_COLLEGE.name):
        assert run_job(engine, settings, PULL_CADRE_COLLEGE) is False
    assert _pulled(engine) == 0

    scheduler = build_scheduler(engine, settings)
    scheduler.start()  # the first tick runs at once
    try:
        poll(lambda: _pulled(engine) == 75, 30, what="the scheduled pull")
    finally:
        scheduler.shutdown(wait=True)
    assert lease_until(engine, PULL_CADRE_COLLEGE.name) is not None


def test_a_failing_job_is_logged_and_releases_its_lease(
        engine: Engine, make_settings: Callable[..., Settings], db_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    def boom(_engine: Engine, _settings: Settings) -> Any:
        raise RuntimeError("boom")

    job = Job("test:boom", boom, lambda _s: 60)
    settings = make_settings(db_url)
    assert run_job(engine, settings, job) is False
    assert "test:boom failed" in caplog.text
    assert run_exclusive(engine, job.name, 30, lambda: None) is True  # not left held


def _take_over(engine: Engine, name: str = NAME, owner: str = "another-replica") -> None:
    """What another replica's acquire does once a stalled holder's lease has lapsed."""
    with engine.begin() as conn:
        conn.execute(update(job_locks).where(job_locks.c.name == name)
                     .values(owner=owner, until=datetime.now(UTC) + timedelta(seconds=30)))


def test_a_lapsed_lease_nobody_took_is_renewed_by_its_holder(engine: Engine) -> None:
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    assert acquire(engine, NAME, 1, "stalled-replica", now=long_ago) is True
    assert renew(engine, NAME, 30, "stalled-replica") is True
    until = lease_until(engine)
    assert until is not None and until > datetime.now(UTC) + timedelta(seconds=20)
    assert acquire(engine, NAME, 30, "another-replica") is False


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_write(engine: Engine) -> None:
    """No beat (a stalled process): the job's own check renews, finds the owner changed, stops."""
    ttl, wrote = 1.0, []

    def job() -> None:
        ensure_held()  # held: no query, no error
        wrote.append(1)
        poll(lambda: (lease_until(engine) or datetime.max.replace(tzinfo=UTC)) < datetime.now(UTC),
             15, interval=0.05, what="the lease to lapse")
        _take_over(engine)
        ensure_held()
        wrote.append(2)

    with pytest.raises(LeaseLost):
        run_exclusive(engine, NAME, ttl, job, keep_alive=False)
    assert wrote == [1]
    with engine.connect() as conn:  # the new holder's lease is left alone
        owner = conn.execute(select(job_locks.c.owner).where(job_locks.c.name == NAME)).scalar_one()
    assert owner == "another-replica"
    assert (lease_until(engine) or datetime.min.replace(tzinfo=UTC)) > datetime.now(UTC)


def test_a_run_that_never_checks_is_told_after_it_returns_and_the_tick_is_logged(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        caplog: pytest.LogCaptureFixture) -> None:
    ttl = 1.5

    def job(_engine: Engine, _settings: Settings) -> None:
        _take_over(engine, "test:taken")
        poll(lambda: "lease test:taken lost" in caplog.text, 15, interval=0.05,
             what="the keep-alive to find the lease taken")

    taken = Job("test:taken", job, lambda _s: 60, lambda _s: ttl)
    assert run_job(engine, make_settings(db_url), taken) is False
    assert "scheduled job test:taken stopped" in caplog.text
    assert "Traceback" not in caplog.text


def test_ensure_held_outside_a_run_does_nothing() -> None:
    ensure_held()
