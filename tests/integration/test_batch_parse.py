"""Parse worker processes answer exactly as parsing in the writer's own process does.

Large batches are parsed in spawned worker processes (``BATCH_PARSE_WORKERS``): each row's
judgement crosses the process boundary pickled.  Whatever that costs to make fast (compact
pickles, the GC paused per chunk), a row must arrive as the same item, in file order.
"""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from adapters.tabular import iter_rows
from gateway.batch_parse import ParseJob, RowParser, parse_rows, rules_for
from gateway.pipeline.items import Prepared
from gateway.store.db import upgrade
from mock_partners import files
from tests.support.keys import KEYS
from tests.support.years import FIXTURE_YEAR_EXTENSIONS


def _job(url: str) -> ParseJob:
    return ParseJob("health", "annual", "2026", "health-test", None, Decimal("3"), Decimal("1"),
                    url, datetime(2026, 11, 26, 2, 0, tzinfo=UTC),
                    year_close_extensions=tuple(sorted(FIXTURE_YEAR_EXTENSIONS.items())),
                    person_keys=KEYS)


def _items(parser: RowParser, path: Path) -> list[tuple[object, ...]]:
    out = []
    for chunk in parser.chunks(iter_rows(path, "csv"), 40):
        for item, credits in chunk:
            out.append((item.row, item.prepared, [e.model_dump() for e in item.errors],
                        item.raw, item.source_record_id, item.refused, credits))
    return out


def test_workers_answer_as_the_writer_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    upgrade(url)
    path = tmp_path / "health.csv"
    files.write_csv(path, files.health_rows(7, 300, 2026, bad_ratio=0.2), files.HEALTH_HEADERS)
    job = _job(url)

    with RowParser(job, 0, rules_for(job)) as local:
        in_process = _items(local, path)
    with RowParser(job, 2, rules_for(job)) as pooled:
        via_workers = _items(pooled, path)

    assert [r[0] for r in in_process] == list(range(2, 302))  # every row, in file order
    accepted = [r for r in in_process if r[1] is not None]
    rejected = [r for r in in_process if r[2]]
    assert accepted and rejected, "the file should hold both kinds of row"
    assert via_workers == in_process


def test_prepared_pickles_to_an_equal_value(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    upgrade(url)
    path = tmp_path / "health.csv"
    files.write_csv(path, files.health_rows(11, 20, 2026), files.HEALTH_HEADERS)
    job = _job(url)
    shipped = parse_rows(job, list(iter_rows(path, "csv")), rules_for(job))
    prepared = [s[4] for s in shipped if s[4] is not None]
    assert len(prepared) == 20
    back = pickle.loads(pickle.dumps(prepared))
    assert back == prepared
    assert all(type(p) is Prepared for p in back)
    assert isinstance(back[0].hours, Decimal) and back[0].completed_on == prepared[0].completed_on
