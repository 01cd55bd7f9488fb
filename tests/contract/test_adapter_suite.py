"""The one adapter contract suite (STYLE.md "Adapters"), parametrized over every registered adapter.

For each name in :data:`adapters.registry.ADAPTERS` the table :data:`CASES` holds a golden
native payload and where its record's fields live.  Every adapter must then:

- parse the golden payload into rows that are all ``ok``, whose submissions validate as
  :class:`contracts.CESubmission` (and survive a dump/validate round trip), with the canonical
  fields the partner family implies (category, activity type, unit, year, an upper-case id);
- give stable dedup keys: the same payload parsed twice, or with every dict's keys in another
  order, has equal ``content_hash`` and ``natural_key``;
- answer malformed payloads (wrong shapes, missing keys, wrong types, a bad id check digit, a
  nested object where text belongs, huge strings) with coded errors and never an exception —
  also for random JSON-like values (hypothesis).

Registering an adapter without a row in :data:`CASES` fails :func:`test_every_adapter_has_cases`.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import Adapter, ParsedRow
from adapters.registry import ADAPTERS, get_adapter
from contracts import CESubmission
from contracts.errors import CATALOGUE
from gateway.pipeline import dedup
from mock_partners.generators import corrupt_check_digit, make_id_number
from tests.support.keys import KEYS

# A valid resident id whose check digit is X, sent in lower case: adapters must upper-case it.
ID_X = make_id_number(random.Random(8), "630102", date(1987, 4, 13))
assert ID_X.endswith("X")
ID_LOWER = ID_X.lower()
# The SPEC §3 example's own id (valid as printed).
SPEC_ID = "630102198704139126"

SPEC_EXAMPLE: dict[str, Any] = {
    "source_record_id": "JD-2026-000123",
    "person": {"id_type": "resident_id", "id_number": SPEC_ID, "name": "赵伟",
               "employer_name": "海东市平安区第一中学", "region_code": "630200"},
    "year": 2026, "category": "professional", "activity_type": "training",
    "activity": {"title": "高原生态修复技术研修班", "mode": "offline",
                 "started_on": "2026-05-10", "completed_on": "2026-05-13"},
    "claimed": {"quantity": "24", "unit": "hours", "details": {}},
    "evidence": {"certificate_no": "QH2026000123", "assessment": "passed"},
}

TRAINING_RESULT: dict[str, Any] = {
    "result_id": "QHJD-2026-00001", "id_no": ID_LOWER, "name": "祁海燕",
    "employer": "海东市平安区第一中学", "region": "630200", "hours": "24",
    "started_on": "2026-05-10", "completed_on": "2026-05-13", "passed": True,
    "certificate_no": "JD2026000001",
}
TRAINING_DOC: dict[str, Any] = {
    "base_code": "QHJD-001", "plan_id": "PLAN-2026-001",
    "results": [TRAINING_RESULT,
                {**TRAINING_RESULT, "result_id": "QHJD-2026-00002", "id_no": SPEC_ID,
                 "name": "赵伟", "hours": 16, "passed": "合格"}],
}
ROSTER_ROW: dict[str, Any] = {
    "base_code": "QHJD-001", "plan_id": "PLAN-2026-001", **TRAINING_RESULT,
    "passed": "true", "备注": "an extra column, ignored",
}
CADRE_ITEM: dict[str, Any] = {
    "xh": "GB2026000000123", "sfzh": ID_LOWER, "xm": "才让卓玛", "dwmc": "青海省农林科学院",
    "dqdm": "630100", "kcbh": "KC004", "kcmc": "生态文明建设与三江源保护", "xs": 4,
    "wcsj": "2026-05-13 14:22:05", "zsbh": "QHGBWY202600000123",
}
HEALTH_CELLS: dict[str, Any] = {
    "记录编号": "WJ-2026-000123", "身份证号": ID_LOWER, "姓名": "赵伟", "工作单位": "青海省人民医院",
    "地区代码": "630100", "项目编号": "2026-04-05-123(国)", "项目名称": "高原病防治新进展",
    "学分类别": "Ⅰ类", "学分": "2.5", "开始日期": "2026/3/3", "完成日期": "2026年3月5日",
    "证书编号": "CME2026000123",
}
FINANCE_CELLS: dict[str, Any] = {
    "流水号": "KJ-2026-000456", "证件号码": ID_LOWER, "姓名": "赵伟", "单位名称": "青海省财政厅",
    "统一社会信用代码": "", "地区代码": "630100", "学习方式": "面授", "课程名称": "政府会计制度专题",
    "科目类别": "专业科目", "学分": "24", "完成日期": "20260305",
}


@dataclass(frozen=True)
class Case:
    """How one adapter's golden payload looks, and where its (first) native record's fields are."""

    golden: Any  # deep-copied before every use
    rows: int  # how many rows the golden payload yields
    expect: dict[str, Any]  # canonical field (dotted) → value, for every golden row
    record: Callable[[Any], dict[str, Any]]  # the first native record inside a payload
    required: tuple[str, ...]  # dotted keys of that record whose absence is a SCHEMA error
    id_key: str
    text_key: str
    number_key: str
    date_key: str
    extra_malformed: dict[str, Any] = field(default_factory=dict)  # more whole payloads


def _cells(payload: Any) -> dict[str, Any]:
    cells = payload[1]
    assert isinstance(cells, dict)
    return cells


def _first_result(payload: Any) -> dict[str, Any]:
    result = payload["results"][0]
    assert isinstance(result, dict)
    return result


def _first_record(payload: Any) -> dict[str, Any]:
    record = payload["records"][0]
    assert isinstance(record, dict)
    return record


def _itself(payload: Any) -> dict[str, Any]:
    assert isinstance(payload, dict)
    return payload


PROFESSIONAL_TRAINING = {"category": "professional", "activity_type": "training", "year": 2026}

CASES: dict[str, Case] = {
    "canonical": Case(
        golden={"records": [SPEC_EXAMPLE]}, rows=1,
        expect={**PROFESSIONAL_TRAINING, "claimed.unit": "hours", "person.id_number": SPEC_ID},
        record=_first_record,
        required=("source_record_id", "person", "person.id_number", "person.name",
                  "person.region_code", "year", "category", "activity_type", "activity.title",
                  "activity.completed_on", "claimed", "claimed.quantity", "claimed.unit"),
        id_key="person.id_number", text_key="person.name", number_key="claimed.quantity",
        date_key="activity.completed_on",
        extra_malformed={"empty records": {"records": []}, "records not a list": {"records": "x"},
                         "gateway-owned key": {"records": [{**SPEC_EXAMPLE, "record_id": "R1"}]},
                         "unknown key": {"records": [{**SPEC_EXAMPLE, "yaer": 2026}]}},
    ),
    "training_base": Case(
        golden=TRAINING_DOC, rows=2,
        expect={**PROFESSIONAL_TRAINING, "claimed.unit": "hours",
                "activity.provider_code": "QHJD-001", "activity.plan_id": "PLAN-2026-001"},
        record=_first_result,
        required=("result_id", "id_no", "name", "region", "hours", "completed_on"),
        id_key="id_no", text_key="name", number_key="hours", date_key="completed_on",
        extra_malformed={"results not a list": {"base_code": "QHJD-001", "results": {}},
                         "no results": {"base_code": "QHJD-001", "results": []},
                         "result not an object": {"base_code": "QHJD-001", "results": ["x"]},
                         "nested base code": {**TRAINING_DOC, "base_code": {"code": "QHJD-001"}}},
    ),
    "training_base_roster": Case(
        golden=(2, ROSTER_ROW), rows=1,
        expect={**PROFESSIONAL_TRAINING, "claimed.unit": "hours",
                "activity.provider_code": "QHJD-001", "activity.plan_id": "PLAN-2026-001"},
        record=_cells,
        required=("base_code", "plan_id", "result_id", "id_no", "name", "region", "hours",
                  "completed_on"),
        id_key="id_no", text_key="name", number_key="hours", date_key="completed_on",
        extra_malformed={"reader row error": (5, {"__error__": "row 5: not valid CSV",
                                                  "__error_zh__": "第 5 行：不是有效的 CSV"})},
    ),
    "cadre_college": Case(
        golden=CADRE_ITEM, rows=1,
        expect={"category": "public", "activity_type": "online_course", "year": 2026,
                "claimed.unit": "hours", "activity.mode": "online"},
        record=_itself,
        required=("xh", "sfzh", "xm", "dqdm", "kcbh", "kcmc", "xs", "wcsj"),
        id_key="sfzh", text_key="xm", number_key="xs", date_key="wcsj",
    ),
    "health": Case(
        golden=(2, HEALTH_CELLS), rows=1,
        expect={**PROFESSIONAL_TRAINING, "claimed.unit": "credits", "person.industry": "health",
                "claimed.details": {"credit_class": "I"}},
        record=_cells,
        required=("记录编号", "身份证号", "姓名", "地区代码", "项目名称", "学分类别", "学分", "完成日期"),
        id_key="身份证号", text_key="姓名", number_key="学分", date_key="完成日期",
        extra_malformed={"reader row error": (5, {"__error__": "row 5: not valid CSV",
                                                  "__error_zh__": "第 5 行：不是有效的 CSV"})},
    ),
    "finance": Case(
        golden=(3, FINANCE_CELLS), rows=1,
        expect={**PROFESSIONAL_TRAINING, "claimed.unit": "credits",
                "person.industry": "accounting", "activity.mode": "offline"},
        record=_cells,
        required=("流水号", "证件号码", "姓名", "地区代码", "学习方式", "课程名称", "科目类别", "学分",
                  "完成日期"),
        id_key="证件号码", text_key="姓名", number_key="学分", date_key="完成日期",
        extra_malformed={"reader row error": (5, {"__error__": "row 5: not valid CSV",
                                                  "__error_zh__": "第 5 行：不是有效的 CSV"})},
    ),
}

NAMES = sorted(ADAPTERS)


def case_of(name: str) -> Case:
    if name not in CASES:
        pytest.fail(f"adapter {name!r} is registered but has no golden/malformed cases in CASES")
    return CASES[name]


def golden(name: str) -> Any:
    return copy.deepcopy(case_of(name).golden)


def parse(name: str, payload: Any) -> list[ParsedRow]:
    adapter: Adapter = get_adapter(name)
    return list(adapter.parse(payload))


def dotted(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part) if not isinstance(obj, dict) else obj[part]
    return obj.value if hasattr(obj, "value") else obj


def put(record: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted key; a no-op when a parent was already replaced by a non-object."""
    *parents, last = path.split(".")
    target: Any = record
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else None
    if isinstance(target, dict):
        target[last] = value


def drop(record: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        record = record[part]
    del record[last]


def reordered(value: Any) -> Any:
    """The same payload with every dict's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    if isinstance(value, tuple):
        return tuple(reordered(v) for v in value)
    return value


ENGLISH_PHRASE = re.compile(r"Input should|should have|valid |unable to|expected |required\b|"
                            r"[A-Za-z]{4,} [A-Za-z]{3,} [A-Za-z]{3,}")


def assert_coded(rows: list[ParsedRow], *, code: str | None = None) -> None:
    """At least one row has errors; every error is catalogued and has both messages."""
    errors = [e for r in rows for e in r.errors]
    assert errors, f"no row error for a malformed payload: {rows}"
    for e in errors:
        assert e.code in CATALOGUE, e
        assert e.message and e.message_zh, e
        # SPEC §6: the Chinese message is Chinese, not the English detail copied (the field
        # name and a quoted value may still be ASCII).
        assert not ENGLISH_PHRASE.search(e.message_zh), e.message_zh
    for r in rows:
        assert r.ok or r.errors, f"a row neither ok nor coded: {r}"
    if code is not None:
        assert code in {e.code for e in errors}, errors


# -- the table covers the registry -------------------------------------------------------------


def test_every_adapter_has_cases() -> None:
    assert set(CASES) == set(ADAPTERS), (
        "every registered adapter needs a row in CASES (and no stale rows): "
        f"missing {sorted(set(ADAPTERS) - set(CASES))}, stale {sorted(set(CASES) - set(ADAPTERS))}")


# -- golden payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_golden_payload_parses_to_valid_submissions(name: str) -> None:
    case = case_of(name)
    rows = parse(name, golden(name))
    assert len(rows) == case.rows
    for row in rows:
        assert row.ok, row.errors
        assert row.errors == []
        sub = row.submission
        assert isinstance(sub, CESubmission)
        assert CESubmission.model_validate(sub.model_dump()) == sub
        assert CESubmission.model_validate_json(sub.model_dump_json()) == sub
        assert CESubmission.model_validate(sub.model_dump(mode="json")) == sub
        for path, value in case.expect.items():
            assert dotted(sub, path) == value, path
        number = sub.person.id_number
        assert number == number.upper() and number in (ID_X, SPEC_ID)
        assert sub.activity.completed_on.year == sub.year
        for note in (*row.warnings, *row.rule_notes):
            assert note.code and note.message


@pytest.mark.parametrize("name", NAMES)
def test_golden_payload_is_not_mutated(name: str) -> None:
    payload = golden(name)
    parse(name, payload)
    assert payload == case_of(name).golden


# -- dedup keys ----------------------------------------------------------------------------------


def keys(rows: list[ParsedRow]) -> list[tuple[str, str]]:
    subs = [r.submission for r in rows]
    assert all(s is not None for s in subs)
    return [(dedup.content_hash(s), dedup.natural_key(s, KEYS)) for s in subs if s is not None]


@pytest.mark.parametrize("name", NAMES)
def test_dedup_keys_are_stable(name: str) -> None:
    first = keys(parse(name, golden(name)))
    assert keys(parse(name, golden(name))) == first
    assert keys(parse(name, reordered(golden(name)))) == first
    assert len({k for k, _ in first}) == len(first)  # distinct records hash apart


@pytest.mark.parametrize("name", NAMES)
def test_dedup_keys_follow_the_content(name: str) -> None:
    case = case_of(name)
    base = keys(parse(name, golden(name)))[0]
    changed = golden(name)
    value = dotted(case.record(changed), case.number_key)
    put(case.record(changed), case.number_key, "7" if str(value) != "7" else "8")
    content, natural = keys(parse(name, changed))[0]
    assert content != base[0]  # a correction, not a resend
    assert natural == base[1]  # still the same activity


def test_canonical_key_ignores_key_order_inside_details() -> None:
    a = copy.deepcopy(SPEC_EXAMPLE)
    a["claimed"]["details"] = {"credit_class": "I", "program": "x"}
    b = reordered(a)
    assert list(b["claimed"]["details"]) == ["program", "credit_class"]
    assert keys(parse("canonical", [a])) == keys(parse("canonical", [b]))


# -- malformed payloads ---------------------------------------------------------------------------

SHAPES: dict[str, Any] = {
    "None": None, "number": 42, "text": "junk", "empty list": [], "empty object": {},
    "huge text": "垃圾" * 500_000, "list of junk": [None, 1, "x"], "bool": True,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_malformed_shapes_are_row_errors(name: str, shape: str) -> None:
    assert_coded(parse(name, copy.deepcopy(SHAPES[shape])), code="SCHEMA")


@pytest.mark.parametrize("name", NAMES)
def test_adapter_specific_malformed_payloads(name: str) -> None:
    for label, payload in case_of(name).extra_malformed.items():
        try:
            rows = parse(name, copy.deepcopy(payload))
        except Exception as exc:  # pragma: no cover - the failure message names the case
            pytest.fail(f"{name} raised on {label!r}: {exc!r}")
        assert_coded(rows, code="SCHEMA")


@pytest.mark.parametrize("name", NAMES)
def test_each_missing_required_key_is_a_schema_error(name: str) -> None:
    case = case_of(name)
    for key in case.required:
        payload = golden(name)
        drop(case.record(payload), key)
        rows = parse(name, payload)
        assert_coded(rows, code="SCHEMA")
        assert not rows[0].ok, key
        for blank in ("", "   ", None):
            payload = golden(name)
            if isinstance(dotted(case.record(payload), key), dict):
                continue
            put(case.record(payload), key, blank)
            assert_coded(parse(name, payload), code="SCHEMA")


def mutated(name: str, key_attr: str, value: Any) -> list[ParsedRow]:
    case = case_of(name)
    payload = golden(name)
    put(case.record(payload), getattr(case, key_attr), value)
    return parse(name, payload)


@pytest.mark.parametrize("name", NAMES)
def test_bad_id_check_digit(name: str) -> None:
    rows = mutated(name, "id_key", corrupt_check_digit(ID_X))
    assert_coded(rows, code="ID_NUMBER_INVALID")
    assert not rows[0].ok
    bad = rows[0].errors[0]
    assert corrupt_check_digit(ID_X) not in f"{bad.message}{bad.message_zh}"  # masked
    assert all(r.ok for r in rows[1:])  # one bad record never fails its neighbours


@pytest.mark.parametrize(
    ("key_attr", "value"),
    [("text_key", {"surname": "赵", "given": "伟"}), ("text_key", ["赵", "伟"]),
     ("text_key", "赵" * 100_000), ("id_key", "6" * 100_000), ("id_key", {"n": ID_X}),
     ("number_key", ["24"]), ("number_key", {"hours": 24}), ("number_key", "二十四"),
     ("number_key", "-3"), ("number_key", "9" * 5000), ("date_key", True),
     ("date_key", "2026-02-30"), ("date_key", {"y": 2026}), ("date_key", "x" * 100_000)],
    ids=lambda v: str(v)[:24])
@pytest.mark.parametrize("name", NAMES)
def test_wrong_types_and_huge_values_are_row_errors(name: str, key_attr: str, value: Any) -> None:
    rows = mutated(name, key_attr, value)
    assert_coded(rows)
    assert not rows[0].ok


# -- random input never raises --------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
JSON = st.recursive(JSON_SCALARS,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=20)
# Values a file cell or JSON field could plausibly hold, biased towards near-misses.
NEAR = (JSON | st.sampled_from(["", " ", "0", "-1", "2026-13-01", "2026年2月30日", "Ⅲ类", "NaN",
                                "1e9", "１２", ID_LOWER, ID_X + "1", "630100", "\x00", "\ud800"])
        | st.floats() | st.dates().map(str) | st.dates())
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_total(name: str, payload: Any) -> None:
    rows = parse(name, payload)  # must not raise
    for row in rows:
        if not row.ok:
            assert row.errors, row
            assert all(e.code in CATALOGUE and e.message and e.message_zh for e in row.errors)
        else:
            assert isinstance(row.submission, CESubmission)


@pytest.mark.parametrize("name", NAMES)
def test_random_payloads_never_raise(name: str) -> None:
    @FUZZ
    @given(payload=JSON | st.tuples(st.integers(0, 10**6), JSON))
    def run(payload: Any) -> None:
        check_total(name, payload)

    run()


@pytest.mark.parametrize("name", NAMES)
def test_random_field_values_never_raise(name: str) -> None:
    case = case_of(name)
    template = case.record(golden(name))
    paths = sorted({*case.required, *template})

    @FUZZ
    @given(changes=st.dictionaries(st.sampled_from(paths), NEAR, min_size=1, max_size=3),
           extra=st.dictionaries(st.text(max_size=8), JSON, max_size=2))
    def run(changes: dict[str, Any], extra: dict[str, Any]) -> None:
        payload = golden(name)
        record = case.record(payload)
        for path, value in changes.items():
            put(record, path, value)
        for key, value in extra.items():
            record.setdefault(key, value)
        check_total(name, payload)

    run()
