"""The console's rejections: the list of rejected submissions, and correcting one of them.

The list is :func:`gateway.ops.records.list_rejections` (as ``GET /v1/rejections``), paged by
its keyset cursor; the correction is :func:`gateway.ops.edits.edit_rejection` (as
``POST /v1/rejections/{id}/edit``), which runs the edited payload through the pipeline and
audits the diff with the operator and the reason.

A rejection keeps its payload in the shape of the adapter it came through (a canonical
submission, a training base's result, a health row's cells …), so the edit form offers the
payload's own fields by dotted path, plus a few empty rows for a field the payload lacks.  A
field that holds an identity number is write-only, as on the record edit page: the form never
shows it, an empty box means unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Response

from adapters.finance import COLUMNS_OF as FINANCE_COLUMNS
from adapters.health import COLUMNS_OF as HEALTH_COLUMNS
from gateway.console.forms import (
    ConsoleError,
    choice,
    integer,
    reason,
    rejection_query,
    text,
)
from gateway.console.records_view import Fields, changes_from, typed_back
from gateway.console.render import Ident
from gateway.console.web import Actor, ConsoleRoute, Ctx, Viewer, require_role
from gateway.errors import PayloadRejected
from gateway.labels import status_zh
from gateway.masking import mask_id, mask_text
from gateway.ops.records import edit_rejection, list_rejections
from gateway.store.db import reading, snapshot
from gateway.store.tables import rejections

router = APIRouter(route_class=ConsoleRoute)

STATUSES = ("open", "revalidated", "superseded")
# The adapters' names for it: canonical, training base, cadre college, health and finance.
ID_KEYS = frozenset({"id_number", "id_no", "sfzh", HEALTH_COLUMNS["person.id_number"],
                     FINANCE_COLUMNS["person.id_number"]})
PREFIX = "f:"  # a payload field's input name: no payload key can clash with csrf or reason
EXTRA_ROWS = 3
MAX_FIELDS = 80
_ID = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class PayloadForm:
    """A rejection's payload as form fields: (dotted path, label, input type) and values."""

    fields: Fields
    current: dict[str, str]  # each field as text, as the form shows and compares it
    originals: dict[str, Any]  # each field as stored (numbers and booleans stay typed)
    write_only: frozenset[str]


def payload_form(payload: str) -> PayloadForm:
    """The scalar fields of a stored payload; lists and keys holding a dot are not offered."""
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raw = None
    fields: list[tuple[str, str, str]] = []
    current: dict[str, str] = {}
    originals: dict[str, Any] = {}
    secret: set[str] = set()

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str) or not key or "." in key or len(fields) >= MAX_FIELDS:
                continue
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
                continue
            if isinstance(value, list):
                continue
            dotted = path + key
            shown = value if isinstance(value, str) else "" if value is None \
                else orjson.dumps(value).decode()
            # An identity number, or anything holding one: the page would print it masked, and
            # a masked value sent back unchanged would overwrite the real one.
            hidden = key in ID_KEYS or mask_text(shown) != shown
            label = f"{dotted}（当前 {mask_id(shown)}，留空表示不修改）" if hidden else dotted
            fields.append((dotted, label, "password" if hidden else "text"))
            current[dotted], originals[dotted] = ("" if hidden else shown), value
            if hidden:
                secret.add(dotted)

    if isinstance(raw, dict):
        walk(raw, "")
    return PayloadForm(tuple(fields), current, originals, frozenset(secret))


def _typed(value: Any, original: Any) -> Any:
    """Typed text back to the stored value's type where it had one (a number, a boolean)."""
    if isinstance(value, str) and original is not None and not isinstance(original, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        return parsed if parsed is not None and not isinstance(parsed, str | dict | list) \
            else value
    return value


def _extra_rows(form: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The free rows: (dotted path, new value) for fields the payload lacks."""
    rows = []
    for i in range(EXTRA_ROWS):
        path = text(form, f"new_path_{i}", 200) or ""
        value = str(form.get(f"new_value_{i}", "")).strip()
        rows.append((path, value))
    return rows


def form_changes(form: Mapping[str, Any], payload: PayloadForm) -> dict[str, Any]:
    """What the operator changed: the payload's fields, then the free rows."""
    changes = {key: _typed(value, payload.originals.get(key))
               for key, value in changes_from(form, payload.current, payload.fields,
                                              payload.write_only, PREFIX).items()}
    changes.update({path: value for path, value in _extra_rows(form) if path})
    return changes


def _rejection_id(value: str) -> int:
    if not _ID.fullmatch(value) or int(value) == 0:
        raise ConsoleError(404, "未找到", "没有这条驳回记录。")
    return int(value)


def _open_rejection(ctx: Ctx, rejection_id: int) -> dict[str, Any]:
    with reading(ctx.state.engine) as conn:
        row = conn.execute(rejections.select().where(rejections.c.id == rejection_id)
                           ).mappings().first()
    if row is None:
        raise ConsoleError(404, "未找到", f"没有驳回记录 {rejection_id}。")
    if row["status"] != "open":
        raise ConsoleError(409, "不能修改", f"驳回记录 {rejection_id} 的状态为“"
                           f"{status_zh(row['status'])}”，只有未处理的驳回记录"
                           "可以修改后重新处理。")
    return {**dict(row), "errors": orjson.loads(row["errors"])}


def _edit_page(ctx: Ctx, row: Mapping[str, Any], payload: PayloadForm, status_code: int = 200,
               error: str | None = None) -> Response:
    values, extra = payload.current, [("", "")] * EXTRA_ROWS
    if error is not None:
        values = typed_back(ctx.form, payload.current, payload.fields, payload.write_only, PREFIX)
        # A typed identity number is never echoed, in the free rows either.
        extra = [(p, v if mask_text(v) == v else "") for p, v in _extra_rows(ctx.form)]
    return ctx.page("rejection_edit.html", status_code, row=row, fields=payload.fields,
                    values=values, prefix=PREFIX, extra=extra, error=error)


@router.get("/rejections")
def rejection_list(ctx: Viewer) -> Response:
    params = ctx.request.query_params
    query = rejection_query(params, ctx.render.zone)
    status = choice(params, "status", (*STATUSES, "all")) or "open"
    cursor = text(params, "cursor", 512)
    limit = integer(params, "limit", 50, 1, 200)
    flt = query.filter
    with snapshot(ctx.state.engine) as conn:
        listing = list_rejections(conn, partner_id=flt.partner_id, adapter=flt.adapter,
                                  error_code=flt.error_code, since=flt.since, until=flt.until,
                                  status=None if status == "all" else status, cursor=cursor,
                                  limit=limit, batch_id=flt.batch_id)
    filters = {**query.raw, "status": status, "limit": limit if limit != 50 else None}
    return ctx.page("rejections.html", listing=listing, filters=filters, status=status,
                    statuses=STATUSES, cursor=cursor)


@router.get("/rejections/{rejection_id}/edit")
def rejection_edit_form(rejection_id: str, ctx: Viewer) -> Response:
    require_role(ctx)
    row = _open_rejection(ctx, _rejection_id(rejection_id))
    return _edit_page(ctx, row, payload_form(row["payload"]))


@router.post("/rejections/{rejection_id}/edit")
def rejection_edit_submit(rejection_id: str, ctx: Actor) -> Response:
    rid = _rejection_id(rejection_id)
    row = _open_rejection(ctx, rid)
    payload = payload_form(row["payload"])
    changes = form_changes(ctx.form, payload)
    why = reason(ctx.form)
    error = None if changes else "没有修改任何字段。"
    error = error or (None if why else "请填写修改原因（必填，将记入审计日志）。")
    if error:
        return _edit_page(ctx, row, payload, 400, error)
    assert why is not None
    try:
        result = edit_rejection(ctx.state.engine, ctx.state.settings, rid, changes, reason=why,
                                actor=ctx.session.operator.name, rules=ctx.state.rules())
    except PayloadRejected as exc:
        if exc.status_code != 422:  # gone or taken meanwhile: the error page says so
            raise
        return _edit_page(ctx, row, payload, 422, f"{exc.code}：{exc.message_zh}（{exc.message}）")
    status = status_zh(result["status"])
    # Nothing but constant text, gateway ids, a version number and a status label.
    message = (f"驳回记录 {rid} 已修改并重新处理：生成记录 {result['record_id']}"
               f"（第 {result['version']} 版），判定为“{status}”。")
    return ctx.page("done.html", title="已修改并重新处理", message=Ident(message),
                    record_id=result["record_id"], diff=result.get("diff"))
