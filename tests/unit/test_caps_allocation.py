"""R10 caps as a pure allocation, and the cross-record R14 helpers (SPEC §4)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.errors import CATALOGUE
from gateway.pipeline.rules import (
    RulesConfig,
    allocate,
    cap_note,
    day_totals,
    overlapping,
    overlaps,
)

D = Decimal
CAPS = RulesConfig().caps


def test_papers_the_20th_and_21st_hour() -> None:
    # 四(二)1: sole papers 10 h each, "每年最多折算为 20 学时"
    cap = CAPS["paper"]
    assert allocate([("p1", D(10)), ("p2", D(10))], cap) == {"p1": 10, "p2": 10}
    shares = allocate([("p1", D(10)), ("p2", D(10)), ("p3", D(10))], cap)
    assert shares == {"p1": 10, "p2": 10, "p3": 0}
    notes = cap_note(D(10), shares["p3"], cap, "paper")
    assert notes is not None
    warning, rule_note = notes
    assert warning.code == rule_note.code == "CAP_APPLIED"
    assert warning.message.startswith(CATALOGUE["CAP_APPLIED"].message_en)
    assert "四(二)1" in rule_note.message and "20" in (rule_note.message_zh or "")


def test_a_co_authored_paper_after_17_5_hours_gets_2_5() -> None:
    shares = allocate([("p1", D("17.5")), ("p2", D(5))], CAPS["paper"])
    assert shares == {"p1": D("17.5"), "p2": D("2.5")}
    assert cap_note(D(5), shares["p2"], CAPS["paper"], "paper") is not None
    assert cap_note(D("17.5"), shares["p1"], CAPS["paper"], "paper") is None


@pytest.mark.parametrize(("kind", "claims", "expected"), [
    ("book", [D(30), D(20)], [D(30), D(10)]),  # 四(二)2: 40 h
    ("lecture", [D(18), D(18)], [D(18), D(12)]),  # 四(二)3: 3 h × 6 twice; 30 h
    ("exam_setting", [D(24), D(12), D(1)], [D(24), D(6), D(0)]),  # 四(二)4: 30 h
])
def test_the_other_caps(kind: str, claims: list[Decimal], expected: list[Decimal]) -> None:
    ids = [f"r{i}" for i in range(len(claims))]
    assert list(allocate(list(zip(ids, claims, strict=True)), CAPS[kind]).values()) == expected


def test_withdrawal_and_correction_move_shares_to_later_records() -> None:
    cap = CAPS["paper"]
    before = allocate([("p1", D(10)), ("p2", D(10)), ("p3", D(10))], cap)
    after = allocate([("p2", D(10)), ("p3", D(10))], cap)  # p1 withdrawn
    assert {k for k in after if after[k] != before[k]} == {"p3"} and after["p3"] == 10
    corrected = allocate([("p1", D(5)), ("p2", D(10)), ("p3", D(10))], cap)  # p1 → co-author
    assert corrected == {"p1": 5, "p2": 10, "p3": 5}


def test_a_record_may_not_claim_twice() -> None:
    with pytest.raises(ValueError):
        allocate([("p1", D(10)), ("p1", D(5))], D(20))


_HOURS = st.decimals(min_value=0, max_value=200, places=1)
_OPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), _HOURS),
    st.tuples(st.just("correct"), st.integers(min_value=0, max_value=30), _HOURS),
    st.tuples(st.just("withdraw"), st.integers(min_value=0, max_value=30)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS, cap=st.sampled_from([D(20), D(30), D(40), D("0"), D("12.5")]))
def test_replayed_operations_never_exceed_the_cap(ops: list[tuple[object, ...]],
                                                  cap: Decimal) -> None:
    current: dict[str, Decimal] = {}  # record id → hours; insertion order is arrival order
    serial = 0
    for op in ops:
        if op[0] == "submit":
            serial += 1
            current[f"r{serial}"] = op[1]  # type: ignore[assignment]
        elif current:
            record_id = list(current)[op[1] % len(current)]  # type: ignore[operator]
            if op[0] == "correct":
                current[record_id] = op[2]  # type: ignore[assignment]  # keeps its place
            else:
                del current[record_id]
        shares = allocate(list(current.items()), cap)
        assert set(shares) == set(current)
        assert sum(shares.values(), D(0)) == min(cap, sum(current.values(), D(0)))
        for record_id, hours in current.items():
            assert D(0) <= shares[record_id] <= hours
        # First come, first served: a record is cut only once the cap is used up before it.
        used = D(0)
        for record_id, hours in current.items():
            assert shares[record_id] == min(hours, cap - used)
            used += shares[record_id]


# -- R14 across records ---------------------------------------------------------------------------


def test_overlaps() -> None:
    may = [(date(2026, 5, 10), date(2026, 5, 13)), (date(2026, 5, 14), date(2026, 5, 15))]
    assert not overlaps(may)
    assert overlaps([*may, (date(2026, 5, 13), date(2026, 5, 13))])
    assert not overlaps([])


def test_overlapping_names_every_record_involved() -> None:
    spans = [("a", date(2026, 5, 1), date(2026, 5, 10)), ("b", date(2026, 5, 2), date(2026, 5, 3)),
             ("c", date(2026, 5, 8), date(2026, 5, 8)), ("d", date(2026, 6, 1), date(2026, 6, 2)),
             ("e", date(2026, 6, 3), date(2026, 6, 3))]
    assert overlapping(spans) == {"a", "b", "c"}


def test_day_totals_spread_hours_over_the_days() -> None:
    totals = day_totals([(date(2026, 5, 10), date(2026, 5, 13), D(24)),
                         (None, date(2026, 5, 13), D(20))])
    assert totals[date(2026, 5, 10)] == 6 and totals[date(2026, 5, 13)] == 26
    over = [day for day, h in totals.items() if h > RulesConfig().integrity_day_limit_hours]
    assert over == [date(2026, 5, 13)]
