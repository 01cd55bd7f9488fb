"""Batch rows → ingest items, in this process or in parse worker processes.

Parsing a row (adapter, validation, identity checks, credit conversion, serialising and
hashing the submission) is the CPU-heavy, database-free half of batch ingest.  With
``BATCH_PARSE_WORKERS`` > 0 it runs in that many worker processes while this process keeps
the single database writer busy: rows travel as plain ``(row_number, cells)`` tuples and come
back as :class:`~gateway.pipeline.items.Prepared` values, which pickle cheaply (the pydantic
models would cost ~25 µs a row each way).  Chunks come back in file order, and at most
:data:`IN_FLIGHT_PER_WORKER` per worker are in flight, so memory stays flat whatever the file's
size.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from itertools import islice
from typing import Any

from adapters.base import Adapter, ParsedRow
from adapters.finance import FinanceAdapter, FinanceConfig
from adapters.health import HealthAdapter, HealthConfig
from adapters.registry import BATCH_ADAPTERS, get_adapter
from contracts import Note
from gateway.person_keys import PersonKeys
from gateway.pipeline.ingest import paused_gc
from gateway.pipeline.items import Item, PartnerRef, Prepared, RulesContext, error_note, prepare
from gateway.pipeline.rules_tables import RulesConfig
from gateway.reference import ReferenceCache
from gateway.store.db import make_engine

Row = tuple[int, dict[str, Any]]

# Chunks queued or parsing per worker.  The writer and a worker take about the same CPU a row,
# but not chunk by chunk (a commit's fsync, a chunk of rejects): with two in flight each waited
# on the other, and 100,000 rows took 1.5× the two processes' CPU over two cores; with four,
# 1.2× (wall 23-29 s → 17-25 s on the same machine; benchmarks/RESULTS.md).  A 2,000-row
# chunk's answers pickle to ~2.5 MB; peak RSS did not move (217 vs 220 MB at 200,000 rows).
IN_FLIGHT_PER_WORKER = 4
WORKER_CHECK_SECONDS = 1.0  # how often a wait for a chunk checks that the workers are alive
# (row, raw cells when rejected, errors as dicts, native credits, prepared, native source id,
#  (source id, content hash) of a row the rules refused: a resend of a stored row is a duplicate)
Shipped = tuple[int | None, Any, list[dict[str, Any]], str | None, Prepared | None, str | None,
                tuple[str, str] | None]


@dataclass(frozen=True)
class ParseJob:
    adapter: str
    kind: str
    period: str
    partner_id: str
    base_code: str | None
    health_hours_per_credit: Decimal
    finance_hours_per_credit: Decimal
    database_url: str  # a worker reads the reference data itself (cached per version)
    received_at: datetime  # when the batch was accepted: the rules' "arrival" (R11)
    year_close: str = "12-30"
    timezone: str = "Asia/Shanghai"
    plan_filing_deadline: str = "07-31"
    title_applicant_deadline: str = "11-30"
    year_close_extensions: tuple[tuple[int, date], ...] = ()  # hashable: the job keys a cache
    # PERSON_KEY_SECRET's keys (pickled to a worker with the job); None keys nobody (an error).
    person_keys: PersonKeys | None = field(default=None, repr=False)

    @property
    def completion_column(self) -> str:
        return "completed_on" if self.adapter == "training_base" else "完成日期"


@lru_cache(maxsize=8)
def make_adapter(job: ParseJob) -> Adapter:
    name = BATCH_ADAPTERS[(job.adapter, job.kind)]
    if name == "health":
        return HealthAdapter(HealthConfig(hours_per_credit=job.health_hours_per_credit))
    if name == "finance":
        return FinanceAdapter(FinanceConfig(hours_per_credit=job.finance_hours_per_credit))
    return get_adapter(name)


def _year_check(parsed: ParsedRow, job: ParseJob) -> None:
    """A batch is for one CE year: a row completed in another year is ``OUTSIDE_YEAR``."""
    if parsed.submission is None or parsed.errors:
        return
    if parsed.submission.year != int(job.period[:4]):
        parsed.errors.append(error_note(
            "OUTSIDE_YEAR", job.completion_column,
            f"(completed in {parsed.submission.year}, batch is for {job.period[:4]})"))


def _native_id(cells: Any) -> str | None:
    if isinstance(cells, dict):
        for key in ("记录编号", "流水号", "result_id"):
            value = cells.get(key)
            if value not in (None, ""):
                return str(value)[:64]
    return None


@lru_cache(maxsize=4)
def _reference_cache(database_url: str, keys: PersonKeys) -> ReferenceCache:
    return ReferenceCache(make_engine(database_url), keys)


def rules_config(job: ParseJob) -> RulesConfig:
    return RulesConfig(year_close=job.year_close, timezone=job.timezone,
                       year_close_extensions=dict(job.year_close_extensions),
                       plan_filing_deadline=job.plan_filing_deadline,
                       title_applicant_deadline=job.title_applicant_deadline,
                       health_hours_per_credit=job.health_hours_per_credit,
                       finance_hours_per_credit=job.finance_hours_per_credit,
                       person_keys=job.person_keys)


def rules_for(job: ParseJob, cache: ReferenceCache | None = None) -> RulesContext:
    """The rules for a batch.

    A worker process reads the reference through its own engine (kept for the process's
    life); in-process callers pass their own engine's cache.
    """
    config = rules_config(job)
    cache = cache or _reference_cache(job.database_url, config.keys)
    return RulesContext(cache.current(), config)


def parse_rows(job: ParseJob, rows: list[Row], rules: RulesContext | None = None) -> list[Shipped]:
    """Parse and judge rows (the worker's entry point; also used in-process with ``rules``)."""
    adapter = make_adapter(job)
    partner = PartnerRef(job.partner_id, job.adapter, job.base_code)
    rules = rules or rules_for(job)
    shipped: list[Shipped] = []
    with paused_gc():  # a chunk's objects live until it is shipped: ~8 % of a row's CPU
        for row_no, cells in rows:
            for parsed in adapter.parse((row_no, cells)):
                _year_check(parsed, job)
                item = Item(raw=parsed.raw, submission=parsed.submission, errors=list(parsed.errors),
                            warnings=list(parsed.warnings),
                            credited_hours=parsed.credited_hours if parsed.ok else None,
                            rule_notes=list(parsed.rule_notes), row=row_no)
                prepare(item, partner, job.received_at, rules)
                credits = None if parsed.credits is None else str(parsed.credits)
                errors = [e.model_dump(mode="json") for e in item.errors]
                shipped.append((row_no, cells if errors else None, errors, credits, item.prepared,
                                _native_id(cells), item.refused))
    return shipped


def to_item(shipped: Shipped) -> tuple[Item, Decimal]:
    row, raw, errors, credits, prepared, native_id, refused = shipped
    item = Item(raw=raw, submission=None, errors=[Note.model_construct(**e) for e in errors],
                row=row, prepared=prepared, source_record_id=native_id, refused=refused)
    return item, Decimal(credits) if credits is not None else Decimal(0)


def _exit_with_parent(parent: int) -> None:
    """A parse worker ends when its gateway does, even after a SIGKILL (no orphans)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class RowParser:
    """Turns a stream of rows into chunks of ingest items, with or without workers."""

    def __init__(self, job: ParseJob, workers: int, rules: RulesContext,
                 timeout: float | None = None) -> None:
        # ``timeout``: the longest wait for one chunk from a worker; past it the worker is taken
        # to hang (TimeoutError), and the pool is torn down rather than waited for.
        self.job, self.workers, self.rules, self.timeout = job, workers, rules, timeout
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> RowParser:
        if self.workers > 0:
            # spawn, not fork: the parent runs threads (server, worker, scheduler).
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with_parent,
                                             initargs=(os.getpid(),))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._pool is None:
            return
        if exc_type is not None:
            # A worker may hang (or be dead): waiting for it would hang this processor too.
            # Nothing in flight is needed any more: its rows are parsed again on resume.
            processes = list(getattr(self._pool, "_processes", {}).values())
            for process in processes:
                process.kill()
            for process in processes:
                process.join(5)
            # A worker killed while writing its answer leaves half a message in the result
            # pipe, and the executor's manager thread reads it forever: shutdown() joined it
            # and hung the batch processor.  With every worker dead, closing our own end of the
            # pipe is its last writer gone: the read ends (EOF), the pool counts as broken, and
            # shutdown returns.
            results = getattr(self._pool, "_result_queue", None)
            writer = getattr(results, "_writer", None)
            if writer is not None and not any(p.is_alive() for p in processes):
                writer.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def chunks(self, rows: Iterable[Row], size: int) -> Iterator[list[tuple[Item, Decimal]]]:
        source = iter(rows)
        if self._pool is None:
            while batch := list(islice(source, size)):
                yield [to_item(s) for s in parse_rows(self.job, batch, self.rules)]
            return
        in_flight: deque[Future[list[Shipped]]] = deque()
        while True:
            while len(in_flight) < IN_FLIGHT_PER_WORKER * self.workers:
                batch = list(islice(source, size))
                if not batch:
                    break
                in_flight.append(self._pool.submit(parse_rows, self.job, batch))
            if not in_flight:
                return
            yield [to_item(s) for s in self._answer(in_flight.popleft())]

    def _answer(self, future: Future[list[Shipped]]) -> list[Shipped]:
        """A worker's chunk; :class:`BrokenProcessPool` as soon as a worker is found dead.

        The executor notices a dead worker by itself, except one killed while writing its
        answer: its manager thread then waits for the rest of that message, and the future
        would wait with it until the stall timeout (``TimeoutError``, 15 min by default).
        """
        assert self._pool is not None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = WORKER_CHECK_SECONDS if deadline is None else min(
                WORKER_CHECK_SECONDS, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(timeout=wait)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            processes = getattr(self._pool, "_processes", None) or {}
            if any(p.exitcode is not None for p in list(processes.values())):
                raise BrokenProcessPool("a parse worker died (killed while it answered)")
