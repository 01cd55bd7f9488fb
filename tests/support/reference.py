"""Reference data for tests: a recognised base with a plan filed in time (SPEC §4 R9)."""

from __future__ import annotations

import csv
import tempfile
from datetime import date
from pathlib import Path

from sqlalchemy import Engine

from gateway.masking import mask_id
from gateway.reference import import_csv
from gateway.store.tables import reference_deferrals
from mock_partners.training_base import plan_period
from tests.support.keys import KEYS


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def load_base_and_plan(engine: Engine, base_code: str, plan_id: str, year: int = 2026,
                       hours: str = "40") -> None:
    """Import one active provincial base and one plan filed on 1 March of ``year``.

    The plan runs over the mock base's :func:`~mock_partners.training_base.plan_period`, so
    the mock's results lie inside it (R14: no INTEGRITY_OUTSIDE_PLAN).
    """
    starts_on, ends_on = plan_period(year)
    with tempfile.TemporaryDirectory() as tmp:
        bases = _write(Path(tmp) / "bases.csv", ["code", "name", "level", "status", "assessed_on"],
                       [[base_code, f"测试基地 {base_code}", "provincial", "active", f"{year - 1}-06-01"]])
        plans = _write(Path(tmp) / "plans.csv",
                       ["plan_id", "base_code", "title", "category", "hours", "starts_on", "ends_on",
                        "filed_on"],
                       [[plan_id, base_code, "专业技术人员能力提升研修班", "professional", hours,
                         starts_on.isoformat(), ends_on.isoformat(), f"{year}-03-01"]])
        for kind, path in (("bases", bases), ("plans", plans)):
            result = import_csv(engine, kind, path, actor="test", keys=KEYS)
            assert result.ok, result.as_dict()


def store_deferral(engine: Engine, id_number: str, from_year: int, reason: str,
                   approved_on: date) -> None:
    """An approved deferral (七(二)) as the reference sync stores it, keyed with KEYS."""
    with engine.begin() as conn:
        conn.execute(reference_deferrals.insert().values(
            person_key=KEYS.of("resident_id", id_number), from_year=from_year,
            id_masked=mask_id(id_number), reason=reason, approved_on=approved_on,
            version="ref-000001"))
