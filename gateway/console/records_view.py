"""A record as the console shows it: the facts an operator needs, the identity number masked.

``summarize`` reads what ``gateway.ops.records.record_view`` answers (the same shape as
``GET /v1/records/{id}``) and never hands a template the clear identity number.  A version whose
payload was pruned by retention shows as such instead of failing.  ``EDITABLE`` lists the
fields "reprocess with edit" offers; the identity number is write-only there (an empty box means
unchanged), so the form never shows it either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.masking import mask_id, mask_text

Fields = tuple[tuple[str, str, str], ...]

# (dotted field of the canonical record, label, input type)
EDITABLE: tuple[tuple[str, str, str], ...] = (
    ("person.name", "姓名", "text"),
    ("person.id_number", "身份证号（留空表示不修改）", "password"),
    ("person.employer_name", "工作单位", "text"),
    ("activity.title", "项目名称", "text"),
    ("activity.started_on", "开始日期", "date"),
    ("activity.completed_on", "完成日期", "date"),
    ("claimed.quantity", "申报数量", "text"),
    ("evidence.certificate_no", "证书编号", "text"),
)
WRITE_ONLY = frozenset({"person.id_number"})
PRUNED_LABEL = "payload pruned (已按保留期清理)"


def edit_fields(editable: Mapping[str, str]) -> tuple[Fields, frozenset[str]]:
    """``EDITABLE`` for one record, and which of its fields are write-only.

    Besides the identity number, any field whose text the page would print masked (a
    certificate number or title holding an id-like run of digits) is write-only: shown masked
    in its label, its box empty.  Sent back as shown, the masked text would differ from the
    stored value and overwrite it.
    """
    fields: list[tuple[str, str, str]] = []
    hidden = set(WRITE_ONLY)
    for key, label, kind in EDITABLE:
        value = editable.get(key, "")
        if key not in WRITE_ONLY and value and mask_text(value) != value:
            hidden.add(key)
            fields.append((key, f"{label}（当前 {mask_text(value)}，留空表示不修改）", "password"))
        else:
            fields.append((key, label, kind))
    return tuple(fields), frozenset(hidden)


def shown_values(editable: Mapping[str, str], hidden: frozenset[str]) -> dict[str, str]:
    """The form's initial values: write-only fields empty."""
    return {key: ("" if key in hidden else value) for key, value in editable.items()}


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def is_pruned(payload: Any) -> bool:
    return isinstance(payload, Mapping) and bool(payload.get("pruned"))


def summarize(view: Mapping[str, Any]) -> dict[str, Any]:
    """Display facts of a record view; the clear identity number never leaves this function."""
    record = view.get("record") or {}
    pruned = bool(view.get("payload_pruned")) or is_pruned(record)
    id_number = _get(record, "person.id_number")
    claimed = record.get("claimed") or {}
    source = record.get("source") or {}
    editable = {key: ("" if key in WRITE_ONLY else _text(_get(record, key))) for key, _, _ in EDITABLE}
    return {
        "record_id": record.get("record_id") or view.get("record_id"),
        "version": record.get("version"),
        "current_version": view.get("current_version"),
        "status": view.get("status"),
        "pruned": pruned,
        "pruned_label": PRUNED_LABEL,
        "withdrawn": bool(record.get("withdrawn")),
        "name": _get(record, "person.name"),
        "id_type": _get(record, "person.id_type"),
        "id_masked": mask_id(str(id_number)) if id_number else None,
        "region_code": _get(record, "person.region_code"),
        "employer_name": _get(record, "person.employer_name"),
        "year": record.get("year"),
        "category": record.get("category"),
        "activity_type": record.get("activity_type"),
        "title": _get(record, "activity.title"),
        "mode": _get(record, "activity.mode"),
        "started_on": _get(record, "activity.started_on"),
        "completed_on": _get(record, "activity.completed_on"),
        "claimed": f"{claimed.get('quantity')} {claimed.get('unit')}" if claimed else None,
        "credited_hours": record.get("credited_hours"),
        "partner_id": source.get("partner_id"),
        "adapter": source.get("adapter"),
        "source_record_id": source.get("source_record_id"),
        "received_at": source.get("received_at"),
        "rule_notes": list(record.get("rule_notes") or []),
        "warnings": list(record.get("warnings") or []),
        "duplicate_of": view.get("duplicate_of"),
        "conflicts_with": view.get("conflicts_with"),
        "review_authority": view.get("review_authority"),
        "reference_version": view.get("reference_version"),
        "editable": editable,
    }


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def version_rows(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The versions list, each with a ``pruned`` flag whatever shape the view gave it."""
    rows = []
    for v in view.get("versions") or []:
        pruned = bool(v.get("pruned") or v.get("pruned_at") or is_pruned(v.get("payload")))
        rows.append({"version": v.get("version"), "created_at": v.get("created_at"),
                     "pruned": pruned, "pruned_at": v.get("pruned_at"),
                     "batch_id": v.get("batch_id"), "content_hash": v.get("content_hash")})
    return rows



def changes_from(form: Mapping[str, Any], current: Mapping[str, str], fields: Fields = EDITABLE,
                 write_only: frozenset[str] = WRITE_ONLY, prefix: str = "") -> dict[str, Any]:
    """The editable fields the operator changed (dotted names → new text).

    Each field's input is named ``prefix`` + its dotted name; a write-only field left empty
    means unchanged.
    """
    changes: dict[str, Any] = {}
    for key, _, _ in fields:
        raw = form.get(prefix + key)
        if not isinstance(raw, str):
            continue
        value = raw.strip()
        if key in write_only:
            if value:
                changes[key] = value
        elif value != current.get(key, "") and not (value == "" and current.get(key) in (None, "")):
            changes[key] = value if value != "" else None
    return changes


def typed_back(form: Mapping[str, Any], current: Mapping[str, str], fields: Fields = EDITABLE,
               write_only: frozenset[str] = WRITE_ONLY, prefix: str = "") -> dict[str, str]:
    """The form's values to show again after a refusal; write-only ones never echoed."""
    return {**current, **{key: form.get(prefix + key, "") for key, _, _ in fields
                          if key not in write_only}}
