"""The ``training_base`` adapter: national and provincial CE bases (SPEC §8).

Bases POST ``{"base_code", "plan_id", "results": [...]}`` or upload a roster file with the
same columns plus ``base_code`` and ``plan_id``.  Results are training hours against a filed
plan (备案); the plan and base are judged by the rules (R9), not here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date
from decimal import Decimal
from typing import Any, ClassVar

from adapters.base import Adapter, ParsedRow
from adapters.normalize import mangled_number, parse_date, parse_decimal, to_ascii_digits
from adapters.tabular import row_error, row_error_zh
from contracts import Note
from contracts.errors import message
from gateway.pipeline.validate import note, validate_submission

RESULT_KEYS = ("result_id", "id_no", "name", "region", "hours", "completed_on")
OPTIONAL_KEYS = ("employer", "started_on", "passed", "certificate_no", "title")
# What a JSON value or a file cell may hold where the adapter reads text (bool is an int):
# a nested object or list is refused rather than turned into its Python repr.
SCALARS = (str, int, float, Decimal, date)
# Canonical field → native key, to name the partner's own key in errors.
NATIVE_FIELD = {"source_record_id": "result_id", "person.id_number": "id_no",
                "person.name": "name", "person.employer_name": "employer",
                "person.region_code": "region", "claimed.quantity": "hours",
                "activity.started_on": "started_on", "activity.completed_on": "completed_on",
                "evidence.certificate_no": "certificate_no", "activity.provider_code": "base_code",
                "activity.plan_id": "plan_id", "evidence.assessment": "passed"}
# ``passed`` as partners write it; text is compared stripped and case-folded (Excel and WPS
# write booleans to CSV as TRUE/FALSE).
TRUE = {True, "true", "1", "是", "合格", "通过", "yes", "y"}
FALSE = {False, "false", "0", "否", "不合格", "未通过", "no", "n"}


def native_notes(notes: Iterable[Note]) -> list[Note]:
    """``notes`` naming the base's own keys where they name a canonical field it sent.

    A push's answer names what the base wrote (SPEC §8 "Field names below are the partners'"),
    the rules' notes as its schema errors; a field it did not send (``credited_hours``) stays.
    """
    return [n if n.field not in NATIVE_FIELD else n.model_copy(update={"field": NATIVE_FIELD[n.field]})
            for n in notes]


def _passed(value: Any) -> bool | None:
    """True, False, or None when ``value`` is not a way of saying either."""
    key = value.strip().casefold() if isinstance(value, str) else value
    if not isinstance(key, (bool, int, float, str)):  # a list or an object says neither
        return None
    if key in TRUE:
        return True
    if key in FALSE:
        return False
    return None


def _schema(key: str, detail: str, detail_zh: str) -> Note:
    en, zh = message("SCHEMA")
    return Note(code="SCHEMA", field=key, message=f"{en} ({key}: {detail})",
                message_zh=f"{zh}（{key}：{detail_zh}）")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _year_of(value: Any) -> int | None:
    try:
        return date.fromisoformat(_text(value)[:10]).year
    except ValueError:
        return None


def _date(value: Any) -> str:
    """A date as a roster file may write it → ISO; unreadable text is kept for validation.

    SPEC §8: ``2026/3/5``, ``20260305``, ``2026年3月5日``, full-width digits, an Excel date cell.
    """
    if value is None or _text(value) == "":
        return ""
    try:
        return parse_date(value).isoformat()
    except ValueError:
        return _text(value)


def _number(value: Any) -> str:
    """Hours with full-width digits or spaces (``"２ ４"``) → ``"24"``; else kept for validation."""
    try:
        return str(parse_decimal(value))
    except ValueError:
        return _text(value)


def _code(value: Any) -> str:
    """An id or region code with full-width digits → ASCII (``"６３０１０２"`` → ``"630102"``)."""
    return to_ascii_digits(_text(value)).replace(" ", "").upper()


def _not_scalar(values: dict[str, Any]) -> list[Note]:
    return [_schema(key, f"expected text or a number, got {type(value).__name__}",
                    f"应为文本或数字，收到 {type(value).__name__}")
            for key, value in values.items() if value is not None and not isinstance(value, SCALARS)]


def result_to_row(index: int, base_code: Any, plan_id: Any, result: Any) -> ParsedRow:
    """One trainee's result → a canonical submission (or coded errors); never raises."""
    if not isinstance(result, dict):
        return ParsedRow(row=index, raw=result, errors=[_schema("results", "each result must be an object",
                                                                   "每条结果应为对象")])
    nested = _not_scalar({"base_code": base_code, "plan_id": plan_id,
                          **{k: result.get(k) for k in (*RESULT_KEYS, *OPTIONAL_KEYS)}})
    if nested:
        return ParsedRow(row=index, raw=result, errors=nested)
    missing = [k for k in RESULT_KEYS if _text(result.get(k)) == ""]
    if missing:
        return ParsedRow(row=index, raw=result, errors=[_schema(k, "required", "必填")
                                                              for k in missing])
    mangled = mangled_number(result["result_id"], _text(result["result_id"]))
    if mangled is not None:  # Excel rounded it: it could name another trainee's result
        return ParsedRow(row=index, raw=result, errors=[_schema("result_id", *mangled)])
    # A result that does not say is recorded as saying nothing (assessment "none"), never as
    # a pass the base did not report (青人社厅函〔2022〕394号 六(二) "根据考试考核结果如实出具").
    passed = _passed(result["passed"]) if "passed" in result else None
    if passed is None and "passed" in result:
        return ParsedRow(row=index, raw=result, errors=[_schema("passed", "expected true or false",
                                                                  "应为 true 或 false")])
    plan = _text(plan_id) or None
    completed_on = _date(result["completed_on"])
    submission = {
        "source_record_id": _text(result["result_id"]),
        "person": {"id_type": "resident_id", "id_number": _code(result["id_no"]),
                   "name": _text(result["name"]), "region_code": _code(result["region"]),
                   **({"employer_name": _text(result["employer"])} if _text(result.get("employer")) else {})},
        "year": _year_of(completed_on) or 0,
        "category": "professional", "activity_type": "training",
        "activity": {"title": _text(result.get("title")) or f"继续教育基地培训 {plan or _text(base_code)}",
                     "provider_code": _text(base_code) or None, "plan_id": plan, "mode": "offline",
                     "started_on": _date(result.get("started_on")) or None,
                     "completed_on": completed_on},
        "claimed": {"quantity": _number(result["hours"]), "unit": "hours", "details": {}},
        "evidence": {"certificate_no": _text(result.get("certificate_no")) or None,
                     "assessment": "none" if passed is None else "passed" if passed else "failed"},
    }
    v = validate_submission(submission)
    errors = native_notes(v.errors)
    return ParsedRow(row=index, raw=result, submission=v.submission, errors=errors,
                     warnings=list(v.warnings))


def envelope_error(raw: Any) -> Note | None:
    """What is wrong with a pushed document as a whole, or None if it holds results to parse.

    Not a JSON object, or ``results`` not a non-empty list (SPEC §2: 1-1,000 results a
    request): there is no result in it to answer.
    """
    if not isinstance(raw, dict):
        return _schema("body", "expected a JSON object", "应为 JSON 对象")
    results = raw.get("results")
    if not isinstance(results, list):
        return _schema("results", "expected a list", "应为数组")
    if not results:
        return _schema("results", "expected at least one result", "至少应有一条结果")
    return None


class TrainingBaseAdapter(Adapter):
    """``parse`` takes the pushed JSON document and yields one row per result."""

    name: ClassVar[str] = "training_base"

    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        wrong = envelope_error(raw)
        if wrong is not None:  # the API refuses such a push whole, before parsing it
            yield ParsedRow(row=0, raw=raw, errors=[wrong])
            return
        for index, result in enumerate(raw["results"]):
            parsed = result_to_row(index, raw.get("base_code"), raw.get("plan_id"), result)
            if isinstance(result, dict):
                # Kept if rejected: with its document's base and plan, the result alone can be
                # judged again once the directory knows the base (gateway.revalidate).
                parsed.raw = {**result, "base_code": raw.get("base_code"),
                              "plan_id": raw.get("plan_id")}
            yield parsed


class TrainingBaseRosterAdapter(Adapter):
    """A roster file's row: the result columns plus ``base_code`` and ``plan_id``."""

    name: ClassVar[str] = "training_base_roster"

    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        row_no, cells = raw if isinstance(raw, tuple) and len(raw) == 2 else (None, raw)
        if not isinstance(cells, dict):
            yield ParsedRow(row=row_no, raw=cells, errors=[_schema("row", "unreadable row", "该行无法读取")])
            return
        reason = row_error(cells)
        if reason is not None:  # the reader's own reason (a bad byte, broken CSV), not "required"
            zh = row_error_zh(cells) or reason
            yield ParsedRow(row=row_no, raw=cells, errors=[note("SCHEMA", reason,
                                                                detail_zh=f"该行无法读取：{zh}")])
            return
        parsed = result_to_row(row_no or 0, cells.get("base_code"), cells.get("plan_id"), cells)
        parsed.row = row_no
        # The base and the filed plan are columns of every row (SPEC §8): without them a row
        # names no base's plan, a missing column and no policy's refusal.
        parsed.errors += [_schema(key, "required", "必填") for key in ("base_code", "plan_id")
                          if _text(cells.get(key)) == ""]
        yield parsed


def total_hours(rows: list[ParsedRow]) -> Decimal:
    return sum((r.submission.claimed.quantity for r in rows if r.submission), Decimal(0))
