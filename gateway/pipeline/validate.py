"""First pipeline step: a partner's raw submission → a :class:`CESubmission` and coded notes.

Pure and total: :func:`validate_submission` takes whatever came out of a JSON parser and
never raises.  It checks the contract (SPEC §3) and the identity rules; the policy rules of
SPEC §4 live in ``gateway.pipeline.rules`` and run after it.

Errors and warnings are :class:`contracts.records.Note` with the catalogue's English and
Chinese message plus a detail.  No note ever carries a full identity number: ids are shown
through :func:`gateway.masking.mask_id`, and every note text goes through
:func:`gateway.masking.mask_text` as a last guard (a key or a pydantic message could echo one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from pydantic import ValidationError

from contracts.errors import message
from contracts.records import CESubmission, IdType, Note
from gateway.masking import mask_text
from gateway.pipeline.identity import check_uscc, region_known, resident_id_findings

__all__ = ["Validated", "note", "validate_submission", "zh_detail"]

# Chinese details for the pydantic error types a partner can meet (SPEC §6: every message in
# Chinese and English); ``{…}`` are the error's context values.  A type not listed here still
# gets a Chinese lead, with pydantic's English after it (zh_detail).
_ZH_DETAIL = {
    "missing": "缺少必填字段",
    "extra_forbidden": "未知字段",
    "invalid_key": "字段名必须是字符串",
    "string_pattern_mismatch": "格式不正确",
    "string_too_short": "不能为空",
    "string_too_long": "过长",
    "string_type": "应为文本",
    "enum": "取值不在允许范围内",
    "model_type": "应为对象",
    "model_attributes_type": "应为对象",
    "dict_type": "应为对象",
    "list_type": "应为数组",
    "bool_type": "应为布尔值",
    "bool_parsing": "应为布尔值",
    "greater_than_equal": "应大于或等于 {ge}",
    "greater_than": "应大于 {gt}",
    "less_than_equal": "应小于或等于 {le}",
    "less_than": "应小于 {lt}",
    "int_type": "应为整数",
    "int_parsing": "应为整数",
    "int_from_float": "应为整数，不能有小数部分",
    "decimal_type": "应为数字（文本或数值）",
    "decimal_parsing": "应为有效数字",
    "decimal_max_digits": "数字总位数不能超过 {max_digits} 位",
    "decimal_max_places": "小数不能超过 {decimal_places} 位",
    "decimal_whole_digits": "整数部分位数过多",
    "finite_number": "应为有限数值",
    "date_type": "应为日期（如 2026-03-05）",
    "date_parsing": "应为有效日期（如 2026-03-05）",
    "date_from_datetime_parsing": "应为有效日期（如 2026-03-05）",
    "date_from_datetime_inexact": "应为日期，不能带时间",
    "datetime_type": "应为带时区的时间",
    "datetime_parsing": "应为有效时间",
    "timezone_aware": "时间须带时区",
}


def zh_detail(kind: str, context: dict[str, object] | None, english: str) -> str:
    """The Chinese of a pydantic error of type ``kind`` (``english``: pydantic's message)."""
    template = _ZH_DETAIL.get(kind)
    if template is None:
        return f"取值无效（{english}）"
    try:
        return template.format(**(context or {}))
    except (KeyError, IndexError, ValueError):
        return template.split("{", 1)[0].rstrip() or f"取值无效（{english}）"


@dataclass(frozen=True)
class Validated:
    """The outcome of :func:`validate_submission`.

    ``submission`` is ``None`` only when the payload does not fit the contract at all; a
    parsed submission is returned alongside rule errors (the caller needs its ids to answer).
    The record is acceptable when ``errors`` is empty.
    """

    submission: CESubmission | None
    errors: list[Note] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.submission is not None and not self.errors


def note(
    code: str, detail: str = "", *, field: str | None = None, detail_zh: str | None = None
) -> Note:
    """A catalogue note for ``code`` with a detail; all text masked."""
    en, zh = message(code)
    zh_detail = detail if detail_zh is None else detail_zh
    return Note(
        code=code,
        field=mask_text(field) if field is not None else None,
        message=mask_text(f"{en} {detail}".rstrip()),
        message_zh=mask_text(f"{zh} {zh_detail}".rstrip()),
    )


def _dotted(loc: tuple[int | str, ...]) -> str | None:
    return ".".join(str(part) for part in loc) or None


def _schema_notes(exc: ValidationError) -> list[Note]:
    notes: list[Note] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err.get("loc", ()))
        kind = str(err.get("type", ""))
        path = _dotted(loc)
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            detail, zh = f"unknown field '{key}'", f"未知字段 '{key}'"
        else:
            english = str(err.get("msg", kind))
            detail = f"{path}: {english}" if path else english
            zh_text = zh_detail(kind, err.get("ctx"), english)
            zh = f"{path}: {zh_text}" if path else zh_text
        notes.append(note("SCHEMA", detail, field=path, detail_zh=zh))
    return notes


def _type_name(raw: object) -> str:
    if raw is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(raw), type(raw).__name__
    )


def validate_submission(raw: object, *, today: date | None = None) -> Validated:
    """Parse and check one submission; never raises.

    ``raw`` is one element of ``{"records": [...]}`` as a JSON parser produced it.  A resident
    id that passes is returned upper-cased (``x`` → ``X``) so later steps key on one spelling.
    ``today`` (Asia/Shanghai) is for tests of the "birth date in the future" rule.
    """
    if not isinstance(raw, dict):
        detail = f"a record must be a JSON object, got {_type_name(raw)}"
        return Validated(
            None,
            [note("SCHEMA", detail, detail_zh=f"记录必须是 JSON 对象，实际为 {_type_name(raw)}")],
            [],
        )
    try:
        submission = CESubmission.model_validate(raw)
    except ValidationError as exc:
        return Validated(None, _schema_notes(exc) or [note("SCHEMA")], [])
    except Exception as exc:  # noqa: BLE001 - the contract: one bad record never raises
        detail = f"the record could not be read ({type(exc).__name__})"
        return Validated(None, [note("SCHEMA", detail, detail_zh=f"无法读取该记录（{type(exc).__name__}）")], [])
    try:
        return _check(submission, today)
    except Exception as exc:  # noqa: BLE001 - a bug here must reject one record, not a batch
        detail = f"the record could not be checked ({type(exc).__name__})"
        return Validated(submission, [note("SCHEMA", detail,
                                           detail_zh=f"无法检查该记录（{type(exc).__name__}）")], [])


def _check(sub: CESubmission, today: date | None) -> Validated:
    errors: list[Note] = []
    warnings: list[Note] = []
    person = sub.person

    if person.id_type == IdType.RESIDENT_ID:
        findings = resident_id_findings(person.id_number, today=today)
        for finding in findings:
            target = warnings if finding.code == "ID_REGION_UNKNOWN" else errors
            target.append(
                note(
                    finding.code,
                    finding.detail,
                    field="person.id_number",
                    detail_zh=finding.detail_zh,
                )
            )
        if not any(f.code == "ID_NUMBER_INVALID" for f in findings):
            canonical = person.id_number.strip().upper()
            if canonical != person.id_number:
                person = person.model_copy(update={"id_number": canonical})
                sub = sub.model_copy(update={"person": person})

    if not region_known(person.region_code):
        errors.append(note("REGION_UNKNOWN", f"'{person.region_code}'", field="person.region_code"))

    if person.employer_uscc is not None:
        for code in check_uscc(person.employer_uscc):
            # The code is not echoed: 18 mostly-digit characters would be masked like an id.
            warnings.append(note(code, field="person.employer_uscc"))

    act = sub.activity
    if act.completed_on.year != sub.year:
        errors.append(
            note(
                "OUTSIDE_YEAR",
                f"completed on {act.completed_on.isoformat()}, CE year {sub.year}",
                field="activity.completed_on",
                detail_zh=f"完成日期 {act.completed_on.isoformat()}，继续教育年度 {sub.year}",
            )
        )
    if act.started_on is not None and act.started_on > act.completed_on:
        errors.append(
            note(
                "SCHEMA",
                f"started_on {act.started_on.isoformat()} is after completed_on "
                f"{act.completed_on.isoformat()}",
                field="activity.started_on",
                detail_zh=f"开始日期 {act.started_on.isoformat()} 晚于完成日期 "
                f"{act.completed_on.isoformat()}",
            )
        )
    return Validated(sub, errors, warnings)
