"""Review of the annual vs monthly reconciliation (SPEC §2, §5 reconciliation, §7 dedup, §8).

Constructed cases the existing tests (test_reconciliation.py) do not cover: batches that failed
part-way, a queued month, an annual sent after the year closed, a correction the dedup judges a
conflict, withdrawn monthly records, a duplicate of another partner's record, reformatted
annual rows, moved completion dates, rows of another year; and a seeded model test comparing the
report with an oracle computed from the generated pushes alone.
"""

from __future__ import annotations

import os
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from adapters.health import CREDIT_CLASSES
from adapters.normalize import parse_date, parse_decimal
from gateway import reconcile
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.signing import file_sha256
from gateway.store.tables import batches
from mock_partners.files import FINANCE_HEADERS, HEALTH_HEADERS, write_csv, year_dataset

MakeSettings = Callable[..., Settings]
Row = dict[str, Any]
YEAR = 2026  # the fixtures' CE year, kept open by tests/conftest.py
AFTER = datetime(YEAR + 1, 1, 15, 9, 0, tzinfo=UTC)
ID = {"health": "记录编号", "finance": "流水号"}
ZERO = dict.fromkeys(reconcile.CATEGORIES, 0)
# The model test's seeds: three by default (among them renumbered twins, conflicting ones,
# months never pushed); CE_REVIEW_SEEDS=40 runs seeds 1..40 instead (80 s on SQLite).
SEEDS = (list(range(1, int(os.environ["CE_REVIEW_SEEDS"]) + 1))
         if os.environ.get("CE_REVIEW_SEEDS") else [4, 9, 32])


class Pusher:
    """Uploads as ``POST /v1/batches`` records them, processed by a BatchProcessor."""

    def __init__(self, engine: Engine, settings: Settings, tmp: Path) -> None:
        self.engine, self.settings, self.tmp, self.n = engine, settings, tmp, 0

    def push(self, partner: Partner, rows: list[Row], kind: str, period: str, *,
             uploaded_at: datetime | None = None, run: bool = True) -> str:
        self.n += 1
        path = self.tmp / f"b{self.n:03d}.csv"
        write_csv(path, rows, HEALTH_HEADERS if partner.adapter == "health" else FINANCE_HEADERS)
        batch = NewBatch(new_batch_id(), partner.partner_id, partner.adapter, kind, period, path,
                         "csv", path.stat().st_size, file_sha256(path))
        taken = record_batch(self.engine, batch, actor=partner.partner_id)
        if uploaded_at is not None and not taken.resent:
            with self.engine.begin() as conn:
                conn.execute(update(batches).where(batches.c.batch_id == batch.batch_id)
                             .values(created_at=uploaded_at))
        if run:
            processor = BatchProcessor(self.engine, self.settings, name="review")
            while processor.run_once():
                pass
        return taken.batch_id  # a byte-identical file: the batch that took it (a resend)

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                        .mappings().one())

    def report(self, adapter: str = "health") -> dict[str, Any]:
        with self.engine.connect() as conn:
            return reconcile.report(conn, adapter, YEAR, today=AFTER)


def months_of(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {m["month"]: {k: v for k, v in m.items() if k != "month"} for m in report["months"]}


@pytest.fixture
def pusher(engine: Engine, db_url: str, tmp_path: Path, make_settings: MakeSettings) -> Pusher:
    return Pusher(engine, make_settings(db_url, batch_dir=tmp_path / "batches"), tmp_path)


def some_rows(seed: int = 13, adapter: str = "health") -> list[list[Row]]:
    """Valid monthly rows (index 0 = January), none sharing a person, project and day."""
    monthly, _, _ = year_dataset(seed, YEAR, people=20, per_month=6, adapter=adapter)  # type: ignore[arg-type]
    return monthly


@contextmanager
def chunk_fails(pusher: Pusher, nth: int) -> Iterator[None]:
    """The ``nth`` chunk of the next batch raises (a store blip): the batch fails part-way.

    BatchProcessor.run fails the batch on any exception; the chunks before stay committed.
    """
    pusher.settings = pusher.settings.model_copy(update={"batch_chunk_rows": 2})
    original = BatchProcessor._ingest_chunk
    calls = {"n": 0}

    def flaky(self: BatchProcessor, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            raise RuntimeError("the store went away")
        original(self, *args, **kwargs)

    BatchProcessor._ingest_chunk = flaky  # type: ignore[method-assign]
    try:
        yield
    finally:
        BatchProcessor._ingest_chunk = original  # type: ignore[method-assign]
        pusher.settings = pusher.settings.model_copy(update={"batch_chunk_rows": 2000})


# -- findings (fixed) ---------------------------------------------------------------------------------

def test_records_a_failed_month_committed_before_it_failed_are_reconciled(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    rows = some_rows()[0][:6]
    with chunk_fails(pusher, 2):
        failed = pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    assert pusher.batch(failed)["status"] == "failed" and pusher.batch(failed)["accepted"] == 2
    again = pusher.push(partner, rows, "monthly", f"{YEAR}-01")  # the partner uploads it again
    assert (pusher.batch(again)["accepted"], pusher.batch(again)["duplicate"]) == (4, 2)
    annual = pusher.push(partner, rows, "annual", str(YEAR))
    assert pusher.batch(annual)["duplicate"] == 6
    report = pusher.report()
    # Before the fix: monthly_records 4, repeated 4: two of January's records and the annual's two rows
    # repeating them are in no category.
    assert report["totals"] == {**ZERO, "monthly_records": 6, "repeated": 6}


def test_an_annual_that_failed_part_way_then_uploaded_again_keeps_its_corrections(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    monthly = some_rows()
    rows, new = monthly[0][:6], monthly[1][0]
    pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    # Corrects rows[0], adds ``new``, repeats rows[1:5], lacks rows[5].
    annual = [{**rows[0], "学分": "9"}, new, *rows[1:5]]
    with chunk_fails(pusher, 2):
        failed = pusher.push(partner, annual, "annual", str(YEAR))
    first = pusher.batch(failed)
    assert (first["status"], first["corrected"], first["accepted"]) == ("failed", 1, 1)
    pusher.push(partner, annual, "annual", str(YEAR))
    report = pusher.report()
    # Before the fix: repeated 5, corrected 0, added 0, lacking 1.
    assert report["totals"] == {**ZERO, "monthly_records": 6, "repeated": 4, "corrected": 1,
                                "lacking": 1, "added": 1}
    assert report["samples"]["corrected"] == [rows[0]["记录编号"]]
    assert report["samples"]["added"] == [new["记录编号"]]


def test_an_annual_row_duplicating_another_partners_record_is_reported(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    ours, theirs = new_partner(engine, adapter="health"), new_partner(engine, adapter="health")
    rows = some_rows()[0][:4]
    pusher.push(ours, rows[:3], "monthly", f"{YEAR}-01")
    pusher.push(theirs, [rows[3]], "monthly", f"{YEAR}-01")
    pusher.push(theirs, [rows[3]], "annual", str(YEAR))
    late = {**rows[3], "记录编号": "OURS-LATE-1"}  # the same activity, ours under our number
    annual = pusher.push(ours, [*rows[:3], late], "annual", str(YEAR))
    assert pusher.batch(annual)["duplicate"] == 4
    report = pusher.report()
    # Before the fix: added 0 and no sample: the annual's fourth row is not in the report.
    assert report["totals"]["added"] == 1
    assert report["samples"]["added"] == ["OURS-LATE-1"]


def test_an_annual_correction_refused_after_the_year_closed_is_not_lacking(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    pusher.settings = pusher.settings.model_copy(update={"year_close_extensions": {}})
    rows = some_rows()[0][:4]
    pusher.push(partner, rows, "monthly", f"{YEAR}-01", uploaded_at=datetime(YEAR, 2, 1, tzinfo=UTC))
    year_end = datetime(YEAR, 12, 31, 2, tzinfo=UTC)  # 10:00 on 31 December in Xining
    annual = pusher.push(partner, [{**rows[0], "学分": "9"}, *rows[1:]], "annual", str(YEAR),
                         uploaded_at=year_end)
    assert (pusher.batch(annual)["duplicate"], pusher.batch(annual)["rejected"]) == (3, 1)
    report = pusher.report()
    # Before the fix: lacking 1, samples.lacking == [rows[0]'s number].
    assert report["totals"]["lacking"] == 0
    assert rows[0]["记录编号"] not in report["samples"]["lacking"]
    # It is listed as what it is: the annual's change of it was refused, the month's stands.
    assert report["totals"]["refused"] == 1 and report["samples"]["refused"] == [rows[0]["记录编号"]]


def test_a_month_whose_batch_is_still_queued_is_not_never_pushed(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    monthly = some_rows()
    pusher.push(partner, monthly[0][:3], "monthly", f"{YEAR}-01")
    pusher.push(partner, monthly[1][:3], "monthly", f"{YEAR}-02", run=False)
    with engine.connect() as conn:
        alert = reconcile.months_never_pushed(conn, "health", YEAR, today=AFTER)
    assert f"{YEAR}-02" not in alert
    report = pusher.report()
    assert f"{YEAR}-02" not in report["months_never_pushed"]


def test_an_annual_correction_judged_a_conflict_is_reported_as_a_conflict(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    first, second = some_rows()[0][:2]
    pusher.push(partner, [first, second], "monthly", f"{YEAR}-01")
    # The annual reports ``second``'s number on ``first``'s activity, with other credits.
    moved = {**first, "记录编号": second["记录编号"], "学分": str(parse_decimal(first["学分"]) + 2)}
    annual = pusher.push(partner, [first, moved], "annual", str(YEAR))
    assert (pusher.batch(annual)["duplicate"], pusher.batch(annual)["conflict"]) == (1, 1)
    report = pusher.report()
    # Before the fix: corrected 1, conflicts 0 (the batch says 1 conflict, the report none).
    assert report["totals"]["conflicts"] == 1
    assert report["samples"]["conflicts"] == [second["记录编号"]]


def test_a_withdrawn_monthly_record_the_annual_leaves_out_is_not_lacking(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    rows = some_rows()[0][:3]
    pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    answer = withdraw(engine, PartnerRef(partner.partner_id, "health"), rows[0]["记录编号"])
    assert answer is not None
    pusher.push(partner, rows[1:], "annual", str(YEAR))
    report = pusher.report()
    # Before the fix: lacking 1, samples.lacking == [rows[0]'s number].
    assert report["totals"]["lacking"] == 0
    assert report["samples"]["lacking"] == []
    assert report["totals"]["withdrawn"] == 1 and report["samples"]["withdrawn"] == [rows[0]["记录编号"]]


def test_a_december_month_arriving_after_the_annual_is_reconciled_as_a_month(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    monthly = some_rows()
    november, december = monthly[10][:3], monthly[11][:3]
    pusher.push(partner, november, "monthly", f"{YEAR}-11")
    pusher.push(partner, [*november, *december[:2]], "annual", str(YEAR))
    month = pusher.push(partner, december, "monthly", f"{YEAR}-12")
    assert (pusher.batch(month)["duplicate"], pusher.batch(month)["accepted"]) == (2, 1)
    report = pusher.report()
    # Before the fix: 2026-12 {monthly_records 1, lacking 1, added 2}.
    assert months_of(report)[f"{YEAR}-12"] == {**ZERO, "monthly_records": 3, "repeated": 2,
                                                 "lacking": 1}


# -- probes that held -------------------------------------------------------------------------

def _reformatted(row: Row, adapter: str) -> Row:
    """The same record as another export might write it: other date form, credits, class."""
    out = dict(row)
    for column in ("完成日期", "开始日期"):
        if out.get(column):
            day = parse_date(out[column])
            out[column] = f"{day.year}年{day.month}月{day.day}日"
    credits = parse_decimal(out["学分"])
    out["学分"] = f" {credits}.0 " if credits == credits.to_integral() else f" {credits}0 "
    if adapter == "health":
        folded = unicodedata.normalize("NFKC", out["学分类别"]).upper().replace(" ", "")
        out["学分类别"] = {"I": "一类", "II": "二类"}[CREDIT_CLASSES[folded]]
    return out


@pytest.mark.parametrize("adapter", ["health", "finance"])
def test_an_annual_written_in_other_spellings_repeats_the_months(
        adapter: str, pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    """Dates, credits (``5`` / ``５`` / `` 5.0 ``) and class spellings are compared normalized."""
    partner = new_partner(engine, adapter=adapter)
    monthly = some_rows(21, adapter)
    pushed = []
    for m in (0, 1):
        pusher.push(partner, monthly[m][:4], "monthly", f"{YEAR}-{m + 1:02d}")
        pushed += monthly[m][:4]
    annual = pusher.push(partner, [_reformatted(r, adapter) for r in pushed], "annual", str(YEAR))
    assert pusher.batch(annual)["duplicate"] == len(pushed)
    assert pusher.report(adapter)["totals"] == {**ZERO, "monthly_records": 8, "repeated": 8}


def test_a_record_moved_to_another_month_stays_in_its_pushed_month_as_corrected(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    rows = some_rows()[0][:2]
    pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    moved = {**rows[0], "完成日期": f"{YEAR}-06-15", "开始日期": ""}
    pusher.push(partner, [moved, rows[1]], "annual", str(YEAR))
    assert months_of(pusher.report()) == {
        f"{YEAR}-01": {**ZERO, "monthly_records": 2, "repeated": 1, "corrected": 1}}


def test_rows_of_another_year_and_an_all_rejected_month(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    """Another year's rows are refused (OUTSIDE_YEAR) and appear nowhere; an all-refused month.

    A month all of whose rows were refused was pushed: it is not "never pushed".
    """
    partner = new_partner(engine, adapter="health")
    monthly = some_rows()
    bad = [{**r, "身份证号": "123"} for r in monthly[1][:2]]
    feb = pusher.push(partner, bad, "monthly", f"{YEAR}-02")
    assert pusher.batch(feb)["rejected"] == 2
    old = {**monthly[0][0], "完成日期": f"{YEAR - 1}-12-20", "开始日期": ""}
    jan = pusher.push(partner, [old, monthly[0][1]], "monthly", f"{YEAR}-01")
    annual = pusher.push(partner, [old, monthly[0][1]], "annual", str(YEAR))
    assert (pusher.batch(jan)["rejected"], pusher.batch(annual)["rejected"]) == (1, 1)
    report = pusher.report()
    assert months_of(report) == {f"{YEAR}-01": {**ZERO, "monthly_records": 1, "repeated": 1}}
    assert f"{YEAR}-02" not in report["months_never_pushed"]
    assert f"{YEAR}-03" in report["months_never_pushed"]


# -- a seeded model test ----------------------------------------------------------------------

class Oracle:
    """What the report must say, from the pushes alone (one partner, no failures).

    Rows only ever change by their credits or employer, never by the natural key (person,
    project, completion date), and are compared normalized, as the gateway does.  A monthly
    record: its month is the first monthly batch carrying it; ``corrected`` if some annual row
    made a new version of it, else ``repeated`` if some annual row carried it unchanged or a
    renumbered twin with its credits did, else (a twin with other credits: a conflict, counted
    where the twin was completed) nothing, else ``lacking``.  A record first carried by an
    annual is ``added`` in the month it was completed.
    """

    def __init__(self, id_column: str, employer: str) -> None:
        self.id_column, self.employer = id_column, employer
        self.current: dict[str, tuple[str, str]] = {}
        self.key_of: dict[str, tuple[str, ...]] = {}
        self.holder: dict[tuple[str, ...], str] = {}
        self.month_of: dict[str, str] = {}
        self.added_month: dict[str, str] = {}
        self.conflict_month: dict[str, str] = {}
        self.corrected: set[str] = set()
        self.repeated: set[str] = set()
        self.conflicted: set[str] = set()
        self.pushed: set[str] = set()
        self.files: set[tuple[str, str, str]] = set()

    def _key(self, row: Row) -> tuple[str, ...]:
        return (row.get("身份证号") or row.get("证件号码", ""), row.get("项目名称") or row.get("课程名称", ""),
                row.get("项目编号", ""), str(parse_date(row["完成日期"])))

    def push(self, rows: list[Row], kind: str, period: str) -> None:
        if kind == "monthly":
            self.pushed.add(period)
        sent = (kind, period, repr(rows))  # the same rows in the same order: the same file
        if sent in self.files:
            return  # a resend: answered by the batch that took the file, never taken twice
        self.files.add(sent)
        for row in rows:
            rid = row[self.id_column]
            content = (str(parse_decimal(row["学分"])), row.get(self.employer, ""))
            before, key = self.current.get(rid), self._key(row)
            holder = self.holder.get(key)
            if before is None and holder is not None:  # a renumbered twin of a record
                if self.current[holder][0] == content[0]:
                    self.repeated.add(holder)
                else:
                    self.conflicted.add(holder)
                    self.conflict_month[rid] = f"{parse_date(row['完成日期']):%Y-%m}"
            elif before is None:
                self.holder[key] = rid
                if kind == "monthly":
                    self.month_of[rid] = period
                else:
                    self.added_month[rid] = f"{parse_date(row['完成日期']):%Y-%m}"
            elif kind == "annual" and rid in self.month_of:
                (self.repeated if before == content else self.corrected).add(rid)
            self.current[rid] = content

    def lacking(self) -> list[str]:
        return sorted(set(self.month_of) - self.corrected - self.repeated - self.conflicted)

    def expected(self) -> tuple[dict[str, dict[str, int]], list[str]]:
        months: dict[str, dict[str, int]] = defaultdict(lambda: dict(ZERO))
        for rid, month in self.month_of.items():
            months[month]["monthly_records"] += 1
            kind = ("corrected" if rid in self.corrected else "repeated" if rid in self.repeated
                    else None if rid in self.conflicted else "lacking")
            if kind:
                months[month][kind] += 1
        for month in self.added_month.values():
            months[month]["added"] += 1
        for month in self.conflict_month.values():
            months[month]["conflicts"] += 1
        never = [f"{YEAR}-{m:02d}" for m in range(1, 13) if f"{YEAR}-{m:02d}" not in self.pushed]
        return dict(months), never


def _scenario(rng: random.Random, adapter: str, monthly: list[list[Row]]) -> list[tuple[list[Row], str, str]]:
    """Random pushes: months, one or two annuals, now and then a month sent after the annual.

    Some months are sent twice (corrected rows, one new), some correct an earlier month's row;
    the second annual is a re-upload or a corrected annual.
    """
    id_column = ID[adapter]
    employer = "工作单位" if adapter == "health" else "单位名称"

    def changed(row: Row) -> Row:
        if rng.random() < 0.5:
            return {**row, "学分": str(parse_decimal(row["学分"]) + rng.choice([1, 2]))}
        return {**row, employer: f"{row[employer]}（{rng.randrange(100)}）"}

    latest: dict[str, Row] = {}
    pushes: list[tuple[list[Row], str, str]] = []
    skip = set(rng.sample(range(12), rng.randrange(0, 3)))
    for m in range(12):
        if m in skip:
            continue
        period = f"{YEAR}-{m + 1:02d}"
        rows = list(monthly[m][:rng.randrange(1, 5)])
        if latest and rng.random() < 0.3:  # a correction of an earlier month's row
            rows.append(changed(latest[rng.choice(sorted(latest))]))
        pushes.append((rows, "monthly", period))
        latest.update((r[id_column], r) for r in rows)
        if rng.random() < 0.25:  # the month sent again, some rows corrected, one new
            again = [changed(r) if rng.random() < 0.4 else r for r in rows]
            again += monthly[m][5:6]
            pushes.append((again, "monthly", period))
            latest.update((r[id_column], r) for r in again)
    extras = [r for m in sorted(skip) for r in monthly[m][:2]] + [
        r for m in range(12) if m not in skip for r in monthly[m][6:6 + rng.randrange(0, 2)]]
    annual = []
    for n, rid in enumerate(sorted(latest)):
        roll = rng.random()
        if roll < 0.15:  # left out; now and then reported under another number
            if rng.random() < 0.4:
                credits = parse_decimal(latest[rid]["学分"]) + rng.choice([0, 0, 1])
                annual.append({**latest[rid], id_column: f"TWIN-{n:04d}", "学分": str(credits),
                               "_twin": True})
            continue
        annual.append(changed(latest[rid]) if roll < 0.3 else latest[rid])
    annual += extras
    rng.shuffle(annual)
    pushes.append((annual, "annual", str(YEAR)))
    if rng.random() < 0.5:  # a re-upload, or a corrected annual (twins left as they were)
        second = [changed(r) if rng.random() < 0.1 and "_twin" not in r else r for r in annual]
        pushes.append((second, "annual", str(YEAR)))
    if rng.random() < 0.5:  # a month sent again after the annual
        rows, _, period = next(p for p in pushes if p[1] == "monthly")
        pushes.append(([changed(r) if rng.random() < 0.3 else r for r in rows], "monthly", period))
    return pushes


@pytest.mark.parametrize("adapter", ["health", "finance"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_report_matches_an_oracle_of_random_pushes(
        seed: int, adapter: str, pusher: Pusher, new_partner: Callable[..., Partner],
        engine: Engine) -> None:
    rng = random.Random(f"{seed}-{adapter}")
    # No empty month: the generator leaves one or two out, the scenario chooses its own.
    full, _, _ = year_dataset(200 + seed, YEAR, people=40, per_month=8, adapter=adapter)  # type: ignore[arg-type]
    monthly, _, _ = year_dataset(100 + seed, YEAR, people=40, per_month=8, adapter=adapter)  # type: ignore[arg-type]
    monthly = [rows or full[m] for m, rows in enumerate(monthly)]
    partner = new_partner(engine, adapter=adapter)
    oracle = Oracle(ID[adapter], "工作单位" if adapter == "health" else "单位名称")
    for rows, kind, period in _scenario(rng, adapter, monthly):
        batch = pusher.push(partner, rows, kind, period)
        status = pusher.batch(batch)
        assert status["status"] == "done" and status["rejected"] == 0, status
        oracle.push(rows, kind, period)
    months, never = oracle.expected()
    report = pusher.report(adapter)
    assert months_of(report) == months
    assert report["totals"] == {c: sum(m[c] for m in months.values()) for c in reconcile.CATEGORIES}
    assert report["months_never_pushed"] == never
    assert report["samples"]["lacking"] == oracle.lacking()[:reconcile.SAMPLE]
    assert report["samples"]["conflicts"] == sorted(oracle.conflict_month)[:reconcile.SAMPLE]
    assert Counter(report["samples"]["added"]) == Counter(sorted(oracle.added_month)[:reconcile.SAMPLE])


def test_a_month_is_never_pushed_only_once_it_ended_in_the_deployments_time_zone(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_operator: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``months_never_pushed`` ends a month at midnight in ``CE_GATEWAY_TIMEZONE``.

    The report took Asia/Shanghai's midnight whatever the setting (review 32): at
    2026-03-31T17:00Z, still 31 March in UTC, a UTC deployment was told March was never pushed.
    """
    import httpx

    from gateway.api.app import create_app
    from tests.support.servers import uvicorn_thread

    at = datetime(2026, 3, 31, 17, 0, tzinfo=UTC)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return cls.fromtimestamp(at.timestamp(), tz)

    monkeypatch.setattr(reconcile, "datetime", Clock)
    token = new_operator(engine, "viewer")
    never: dict[str, list[str]] = {}
    for zone in ("UTC", "Asia/Shanghai"):
        settings = make_settings(db_url, timezone=zone)
        with uvicorn_thread(create_app(settings, run_worker=False)) as url:
            answer = httpx.get(f"{url}/v1/reconciliation/health/2026",
                               headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        never[zone] = answer.json()["months_never_pushed"]
    assert never["UTC"] == ["2026-01", "2026-02"]
    assert never["Asia/Shanghai"] == ["2026-01", "2026-02", "2026-03"]
