"""Batch files (health, finance, training-base rosters): accept at once, process streaming.

Accepting (``POST /v1/batches``) is :mod:`gateway.batch_requests`' work: the file is made
durable and its ``batches`` row committed before the 202 (SPEC §7: acknowledged means
durable).  What a batch's status shows is :mod:`gateway.batch_status`'s.

Processing (:class:`BatchProcessor`, a thread beside the delivery worker): a batch is claimed
by lease, its rows read in constant memory, parsed by the adapter and ingested a chunk at a
time; each chunk's transaction also advances the batch's checkpoint (last row done, counts,
row errors), so a crash resumes after the last committed chunk with nothing lost or doubled.
Optional control totals (``X-CE-Row-Count``, ``X-CE-Total-Credits``) are checked in a first
pass before anything is ingested: a truncated or wrong file fails whole.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, insert, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from adapters.base import Adapter, ParsedRow
from adapters.finance import COLUMNS_OF as FINANCE_COLUMNS
from adapters.health import COLUMNS_OF as HEALTH_COLUMNS
from adapters.tabular import UnreadableFile, iter_rows
from adapters.training_base import NATIVE_FIELD as ROSTER_COLUMNS
from contracts import RecordAnswer
from gateway import audit, metrics
from gateway.batch_parse import ParseJob, RowParser, make_adapter, rules_for
from gateway.batch_status import OUTCOMES, rows_judged
from gateway.config import Settings
from gateway.delivery.worker import worker_id
from gateway.masking import mask_excerpt
from gateway.outage import Outage
from gateway.person_keys import PersonKeys
from gateway.pipeline.ingest import ingest_items, paused_gc
from gateway.pipeline.items import Item, PartnerRef, RulesContext
from gateway.reference import ReferenceCache
from gateway.signing import file_sha256
from gateway.store.tables import batch_errors, batches, partners

log = logging.getLogger(__name__)

# Canonical field → the file's column, per adapter: the rules (and scope checks) name canonical
# fields, but a partner reading ``rejected_rows`` looks for its own headers (SPEC §8).
NATIVE_COLUMNS: dict[str, Mapping[str, str]] = {
    "health": HEALTH_COLUMNS, "finance": FINANCE_COLUMNS, "training_base": ROSTER_COLUMNS}


@dataclass(frozen=True)
class Failure:
    """Why a batch failed as a whole: a catalogue code and the detail in English and Chinese."""

    code: str
    detail: str
    detail_zh: str

    @classmethod
    def of(cls, code: str, detail: str, detail_zh: str) -> Failure:
        # The texts quote what a partner declared (a header, a cell): masked like every error.
        return cls(code, mask_excerpt(detail, 500), mask_excerpt(detail_zh, 500))


def native_column(adapter: str, field: str | None) -> str | None:
    if not field:
        return None
    return NATIVE_COLUMNS.get(adapter, {}).get(field, field)[:64]


# Failures that are not the batch's: it is put back and resumed (BatchProcessor.run).
# TimeoutError: a parse worker gave no chunk for BATCH_STALL_SECONDS (it hangs).
TRANSIENT_FAILURES = (OperationalError, InterfaceError, BrokenProcessPool, TimeoutError)


class FileChanged(Exception):
    """The batch's file on disk is not the one acknowledged: gone, truncated or replaced."""

    def __init__(self, detail: str, detail_zh: str) -> None:
        super().__init__(detail)
        self.detail, self.detail_zh = detail, detail_zh


class LeaseLost(Exception):
    """Our lease on a batch ran out and another processor took it: stop, commit nothing."""


class BatchProcessor:
    """Claims queued batches by lease and processes them a chunk at a time."""

    def __init__(self, engine: Engine, settings: Settings, name: str | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.name = name or worker_id()
        self.progress = progress  # called with the last committed row number
        self._rules: RulesContext | None = None
        self._references = ReferenceCache(engine, PersonKeys(settings.person_key_secret))
        self._stop = threading.Event()
        self._progress_at = time.monotonic()  # the last chunk commit (stall detection)

    def claim(self, batch_id: str | None = None) -> dict[str, Any] | None:
        """Lease the oldest batch free to take (queued, or its lease run out), or only ``batch_id``.

        ``ingest`` claims its own batch by id: a broken batch someone else queued must not
        become every local ingest's failure (the workers take the others, oldest first).
        """
        now = datetime.now(UTC)
        free = select(batches).where(batches.c.status.in_(("queued", "processing")),
                                     or_(batches.c.lease_until.is_(None), batches.c.lease_until < now))
        if batch_id is not None:
            free = free.where(batches.c.batch_id == batch_id)
        with self.engine.begin() as conn:
            row = conn.execute(free.order_by(batches.c.created_at).limit(1)
                               .with_for_update(skip_locked=True)).mappings().first()
            if row is None:
                return None
            conn.execute(update(batches).where(batches.c.batch_id == row["batch_id"]).values(
                status="processing", lease_owner=self.name, started_at=row["started_at"] or now,
                lease_until=now + timedelta(seconds=self.settings.batch_lease_seconds),
                attempts=batches.c.attempts + 1))
            return {**row, "attempts": int(row["attempts"]) + 1}

    def _parsed_rows(self, batch: dict[str, Any], adapter: Adapter) -> Iterator[ParsedRow]:
        for row_no, cells in iter_rows(Path(batch["file_path"]), batch["file_format"]):
            for parsed in adapter.parse((row_no, cells)):
                parsed.row = row_no
                yield parsed

    def _control_totals_ok(self, batch: dict[str, Any], adapter: Adapter) -> Failure | None:
        if batch["declared_rows"] is None and batch["declared_credits"] is None:
            return None
        rows, credits = 0, Decimal(0)
        for parsed in self._parsed_rows(batch, adapter):
            rows += 1
            credits += parsed.credits or Decimal(0)
        declared_rows, declared_credits = batch["declared_rows"], batch["declared_credits"]
        if declared_rows is not None and rows != int(declared_rows):
            return Failure.of("CONTROL_TOTALS_MISMATCH",
                              f"X-CE-Row-Count says {declared_rows} rows, the file has {rows}",
                              f"X-CE-Row-Count 申报 {declared_rows} 行，文件实有 {rows} 行")
        if declared_credits is not None and credits != Decimal(declared_credits):
            return Failure.of("CONTROL_TOTALS_MISMATCH",
                              f"X-CE-Total-Credits says {declared_credits}, the file sums to {credits}",
                              f"X-CE-Total-Credits 申报 {declared_credits}，文件合计 {credits}")
        return None

    def _job(self, batch: dict[str, Any]) -> ParseJob:
        return ParseJob(batch["adapter"], batch["kind"], batch["period"], batch["partner_id"],
                        self._base_code(batch["partner_id"]),
                        self.settings.health_hours_per_credit, self.settings.finance_hours_per_credit,
                        self.settings.database_url, batch["created_at"],
                        self.settings.year_close, self.settings.timezone,
                        self.settings.plan_filing_deadline, self.settings.title_applicant_deadline,
                        tuple(sorted(self.settings.year_close_extensions.items())),
                        PersonKeys(self.settings.person_key_secret))

    def _base_code(self, partner_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(partners.c.base_code)
                                .where(partners.c.partner_id == partner_id)).scalar()

    def _workers(self, batch: dict[str, Any]) -> int:
        # A worker process costs ~1 s to start: worth it only for files of some size.
        if int(batch["file_size"]) < self.settings.batch_parse_min_bytes:
            return 0
        configured = self.settings.batch_parse_workers
        return max(0, (os.cpu_count() or 1) - 1) if configured < 0 else configured

    def process(self, batch: dict[str, Any]) -> None:
        """Process a batch we claimed, keeping our lease on it alive while we work."""
        with self._lease_kept(batch["batch_id"]):
            self._check_file(batch)
            self._process(batch)

    @staticmethod
    def _check_file(batch: dict[str, Any]) -> None:
        """The file on disk must be the one acknowledged (202): same size, same SHA-256.

        Checked on every claim, resumes included: a file truncated or replaced after the upload
        (a disk fault, a bad restore) would otherwise end ``done`` short of its rows.
        """
        path = Path(batch["file_path"])
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileChanged("the uploaded file is no longer in the batch directory",
                              "上传的文件已不在批次目录中") from None
        if size != int(batch["file_size"]) or file_sha256(path) != batch["sha256"]:
            raise FileChanged(f"the stored file changed after it was acknowledged ({size} bytes, "
                              f"{batch['file_size']} uploaded, or another SHA-256)",
                              f"确认接收后，存储的文件已被改动（现 {size} 字节，上传时 "
                              f"{batch['file_size']} 字节，或 SHA-256 不同）")

    @contextmanager
    def _lease_kept(self, batch_id: str) -> Iterator[None]:
        """Renew our lease every third of BATCH_LEASE_SECONDS until the block ends.

        The lease then says whether this processor is alive, not how long a chunk takes: renewed
        only at chunk commits, a lease shorter than a chunk (every chunk slows in a rush) let
        processors take the file from each other mid-chunk, and fencing made none commit.  A
        killed process stops renewing, and so does a stuck one: no chunk committed for
        BATCH_STALL_SECONDS.  Its lease expires and another processor resumes the batch.
        """
        seconds, stall = self.settings.batch_lease_seconds, self.settings.batch_stall_seconds
        done = threading.Event()
        self._progress_at = time.monotonic()

        def beat() -> None:
            while not done.wait(seconds / 3):
                if time.monotonic() - self._progress_at > stall:
                    log.error("batch %s: no chunk committed for %.0f s; letting the lease go so "
                              "another processor resumes it", batch_id, stall)
                    return
                try:
                    with self.engine.begin() as conn:
                        kept = conn.execute(update(batches).where(
                            batches.c.batch_id == batch_id, batches.c.lease_owner == self.name)
                            .values(lease_until=datetime.now(UTC) + timedelta(seconds=seconds))
                        ).rowcount
                except Exception:  # noqa: BLE001 - a store blip; the next beat tries again
                    log.warning("could not renew the lease on batch %s", batch_id, exc_info=True)
                    continue
                if kept != 1:
                    return  # finished, or taken over: the next commit is fenced anyway

        thread = threading.Thread(target=beat, name=f"lease:{batch_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _process(self, batch: dict[str, Any]) -> None:
        batch_id = batch["batch_id"]
        job = self._job(batch)
        if int(batch["rows_done"]) == 0:
            problem = self._control_totals_ok(batch, make_adapter(job))
            if problem is not None:
                self._finish(batch_id, "failed", problem)
                return
        partner = PartnerRef(batch["partner_id"], batch["adapter"], job.base_code)
        done_through = int(batch["rows_done"])
        rows = ((n, cells) for n, cells in iter_rows(Path(batch["file_path"]), batch["file_format"])
                if n > done_through)  # rows up to the checkpoint were committed before a crash
        # Rows come judged (prepared) from the parser; the context is only used for any the
        # parser left unprepared, and for its configuration (caps).
        self._rules = rules_for(job, self._references)
        with RowParser(job, self._workers(batch), self._rules,
                       timeout=self.settings.batch_stall_seconds) as parser:
            for chunk in parser.chunks(rows, self.settings.batch_chunk_rows):
                with paused_gc():
                    self._ingest_chunk(batch_id, partner, chunk)
                if self._stop.is_set():  # shutting down: whoever claims it next resumes here
                    with self.engine.begin() as conn:
                        conn.execute(update(batches).where(
                            batches.c.batch_id == batch_id, batches.c.lease_owner == self.name)
                            .values(lease_until=datetime.now(UTC)))
                    return
        self._finish(batch_id, "done", None)

    def _ingest_chunk(self, batch_id: str, partner: PartnerRef,
                      chunk: list[tuple[Item, Decimal]]) -> None:
        items = [item for item, _ in chunk]
        credits = sum((c for _, c in chunk), Decimal(0))
        last_row = max(item.row or 0 for item in items)

        def checkpoint(conn: Connection, answers: list[RecordAnswer]) -> None:
            counts = dict.fromkeys(OUTCOMES, 0)
            errors = []
            for item, answer in zip(items, answers, strict=True):
                counts[answer.status.value] += 1
                for e in answer.errors if answer.status.value in ("rejected", "conflict") else []:
                    errors.append({"batch_id": batch_id, "row_no": item.row or 0,
                                   "column_name": native_column(partner.adapter, e.field),
                                   "code": e.code,
                                   "message": e.message, "message_zh": e.message_zh or ""})
            # Fencing: a processor whose lease ran out and was taken over commits nothing.
            current, owner = conn.execute(select(batches.c.credits_total, batches.c.lease_owner)
                                          .where(batches.c.batch_id == batch_id)
                                          .with_for_update()).one()
            if owner != self.name:
                raise LeaseLost(f"batch {batch_id} is now leased by {owner}")
            now = datetime.now(UTC)
            conn.execute(update(batches).where(batches.c.batch_id == batch_id).values(
                rows_done=last_row,
                accepted=batches.c.accepted + counts["accepted"],
                duplicate=batches.c.duplicate + counts["duplicate"],
                corrected=batches.c.corrected + counts["corrected"],
                conflict=batches.c.conflict + counts["conflict"],
                rejected=batches.c.rejected + counts["rejected"],
                credits_total=str(Decimal(current) + credits), attempts=0,  # progress
                lease_until=now + timedelta(seconds=self.settings.batch_lease_seconds)))
            self._progress_at = time.monotonic()  # what the lease heartbeat checks for a stall
            if errors:
                conn.execute(insert(batch_errors), errors)

        ingest_items(self.engine, partner, items, batch_id=batch_id, in_tx=checkpoint,
                     rules=self._rules)
        metrics.count_batch_rows(partner.partner_id, partner.adapter, len(items))
        if self.progress is not None:
            self.progress(last_row)

    def _finish(self, batch_id: str, status: str, failure: Failure | None) -> None:
        now = datetime.now(UTC)
        error = failure.detail if failure else None
        with self.engine.begin() as conn:
            row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().one()
            # The audit chain's lock first, as every chunk takes it, then the fenced update.
            audit.append(conn, [audit.Event(f"batch_{status}", actor=self.name, detail={
                "batch_id": batch_id, "error": error,
                **({"code": failure.code} if failure else {}),
                **{k: row[k] for k in OUTCOMES}})],
                now)
            finished = conn.execute(update(batches).where(
                batches.c.batch_id == batch_id, batches.c.lease_owner == self.name).values(
                status=status, error=error, error_code=failure.code if failure else None,
                error_zh=failure.detail_zh if failure else None, finished_at=now,
                lease_owner=None, lease_until=None, rows_total=rows_judged(row))).rowcount
            if finished != 1:
                raise LeaseLost(f"batch {batch_id} is now leased by {row['lease_owner']}")

    def run(self, batch: dict[str, Any]) -> Exception | None:
        """Process a batch we claimed; a failure fails that batch alone and is returned, not raised.

        A transient failure (the store went away, a parse worker was killed) puts the batch back
        to be resumed after its last committed chunk, after a pause; so does a processor that
        dies.  A batch claimed :attr:`Settings.batch_max_attempts` times without committing a
        chunk is failed instead, so it cannot hold up the batches behind it for ever.
        """
        attempts, limit = int(batch.get("attempts") or 1), self.settings.batch_max_attempts
        if attempts > limit:
            self._fail(batch["batch_id"], Failure.of(
                "BATCH_FAILED", f"processing stopped {attempts - 1} times in a row without "
                f"committing a chunk (BATCH_MAX_ATTEMPTS {limit})",
                f"连续 {attempts - 1} 次处理中断且未提交任何数据块"))
            return None
        try:
            self.process(batch)
        except LeaseLost as lost:  # we stalled past the lease; the new holder carries on
            log.warning("%s; stopped without committing", lost)
        except TRANSIENT_FAILURES as exc:
            pause = min(self.settings.batch_lease_seconds, 2.0 ** (attempts - 1))
            log.warning("batch %s stopped (%s: %s); it resumes after its last chunk in %.0f s",
                        batch["batch_id"], type(exc).__name__, exc, pause)
            self._put_back(batch["batch_id"], pause)
            return exc
        except FileChanged as exc:
            log.error("batch %s failed: %s", batch["batch_id"], exc)
            self._fail(batch["batch_id"], Failure.of("BATCH_FAILED", exc.detail, exc.detail_zh))
            return exc
        except UnreadableFile as exc:  # the sender's file, not a fault of ours: no traceback
            log.warning("batch %s failed: the file cannot be read: %s", batch["batch_id"], exc)
            self._fail(batch["batch_id"], Failure.of("SCHEMA", f"the file cannot be read: {exc}",
                                                     f"文件无法读取：{exc}"))
            return exc
        except Exception as exc:  # one broken file must not stop the processor
            log.exception("batch %s failed", batch["batch_id"])
            # The partner reads this: the exception's class, not its text (SQL, server paths);
            # the log has the whole story.
            self._fail(batch["batch_id"], Failure.of(
                "BATCH_FAILED", f"{type(exc).__name__} (details in the gateway's log)",
                f"处理出错（{type(exc).__name__}，详见网关日志）"))
            return exc
        return None

    def _put_back(self, batch_id: str, pause: float) -> None:
        """Let our lease go so any processor resumes the batch after ``pause`` seconds."""
        try:
            with self.engine.begin() as conn:
                conn.execute(update(batches).where(
                    batches.c.batch_id == batch_id, batches.c.lease_owner == self.name).values(
                    lease_owner=None, lease_until=datetime.now(UTC) + timedelta(seconds=pause)))
        except (OperationalError, InterfaceError):  # still away: the lease runs out by itself
            log.warning("could not put batch %s back; its lease will run out", batch_id)

    def _fail(self, batch_id: str, failure: Failure) -> None:
        try:
            self._finish(batch_id, "failed", failure)
        except LeaseLost as lost:
            log.warning("%s; its failure is not ours to record", lost)

    def run_once(self) -> bool:
        batch = self.claim()
        if batch is None:
            return False
        self.run(batch)
        return True

    def run_forever(self, poll_seconds: float = 0.5) -> None:
        outage = Outage(log, "batch processor cycle", poll_seconds)
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                outage.succeeded()
            except Exception:  # a database blip: the lease keeps the batch safe
                busy = False
                self._stop.wait(outage.failed())
            if not busy:
                self._stop.wait(poll_seconds)

    def stop(self) -> None:
        self._stop.set()
