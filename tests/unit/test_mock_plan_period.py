"""The mock partners' training data lies inside the plan period they file (SPEC §4 R14).

The demo and the suite file the mock base's plan with ``training_base.plan_period``; were a
generated result dated outside it, every run would carry INTEGRITY_OUTSIDE_PLAN
(青人社厅函〔2022〕394号 六(五) 培训时限) and the warning would mean nothing.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from adapters.training_base import result_to_row
from gateway.pipeline.rules import BaseInfo, PlanInfo, StaticReference, judge
from mock_partners import generators as gen
from mock_partners import training_base as tb
from tests.support.years import fixture_rules_config


@pytest.mark.parametrize("year", [2025, 2026, 2028])  # 2028: a leap year
def test_mock_base_results_lie_in_its_plan_period(year: int) -> None:
    starts_on, ends_on = tb.plan_period(year)
    rows = tb.results(random.Random(year), 2000, year=year)
    starts = [date.fromisoformat(r["started_on"]) for r in rows]
    ends = [date.fromisoformat(r["completed_on"]) for r in rows]
    assert starts_on <= min(starts) and max(ends) <= ends_on
    assert all(s <= e for s, e in zip(starts, ends, strict=True))


@pytest.mark.parametrize("within", [tb.plan_period(), (date(2026, 5, 10), date(2026, 5, 13))])
def test_canonical_records_for_a_plan_lie_in_its_period(within: tuple[date, date]) -> None:
    rng = random.Random(3)
    for i in range(500):
        act = gen.canonical_submission(rng, f"S-{i}", within=within)["activity"]
        started, completed = (date.fromisoformat(act[k]) for k in ("started_on", "completed_on"))
        assert within[0] <= started <= completed <= within[1]


def test_the_rules_see_the_mock_base_s_results_inside_its_plan() -> None:
    starts_on, ends_on = tb.plan_period(2026)
    reference = StaticReference(
        bases={"QHJD-001": BaseInfo("QHJD-001", "基地", "provincial", "active", date(2025, 6, 30))},
        plans={"PLAN-1": PlanInfo("PLAN-1", "QHJD-001", "研修班", "professional", Decimal(40),
                                  starts_on, ends_on, date(2026, 3, 1))})
    for index, result in enumerate(tb.results(random.Random(1), 200)):
        row = result_to_row(index, "QHJD-001", "PLAN-1", result)
        assert row.submission is not None, row.errors
        j = judge(row.submission, adapter="training_base", reference=reference,
                  received_at=datetime(2026, 12, 20, tzinfo=UTC), config=fixture_rules_config())
        assert "INTEGRITY_OUTSIDE_PLAN" not in {w.code for w in j.warnings}
