"""The console's working pages: failed deliveries, reprocessing, record timelines, conflicts.

Every action is two steps: a POST that only counts or shows what would happen (the dry run,
"将重新投递 N 条"), then a confirming POST that carries a required reason.  Both steps need
the ``operator`` role and the session's CSRF token (``web.actor``); the work itself is done by
``gateway.ops.deliveries`` / ``gateway.ops.records``, which audit it with operator and reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from gateway.console.forms import (
    ConsoleError,
    DeliveryQuery,
    bad_param,
    choice,
    delivery_query,
    integer,
    reason,
    text,
)
from gateway.console.records_view import (
    changes_from,
    edit_fields,
    shown_values,
    summarize,
    typed_back,
    version_rows,
)
from gateway.console.render import Ident
from gateway.console.web import Actor, ConsoleRoute, Ctx, Viewer, require_role
from gateway.ops.deliveries import DeliveryFilter, list_deliveries, reprocess
from gateway.ops.records import edit_and_requeue, list_conflicts, record_view, resolve_conflict
from gateway.store.db import snapshot

router = APIRouter(route_class=ConsoleRoute)
DRY_RUN_REASON = "控制台预览（仅计数，未执行）"


def _filter(query: DeliveryQuery) -> DeliveryFilter:
    return DeliveryFilter(status=query.status, adapter=query.adapter, partner_id=query.partner_id,
                          error_code=query.error_code, since=query.since, until=query.until,
                          record_ids=tuple(str(rid) for rid in query.record_ids))


def _record_id(value: str) -> str:
    """A record id from the path; one no record can have (NUL, too long) finds nothing."""
    cleaned = value.strip()
    if not cleaned or len(cleaned) > 64 or any(ord(ch) < 32 for ch in cleaned):
        raise ConsoleError(404, "未找到", "没有这条记录。")
    return cleaned


@router.get("/deliveries")
def deliveries(ctx: Viewer) -> Response:
    params = ctx.request.query_params
    query = delivery_query(params, params.getlist("record_id"), ctx.render.zone,
                           default_status="dead")
    cursor = text(params, "cursor", 200)
    limit = integer(params, "limit", 50, 1, 200)
    with snapshot(ctx.state.engine) as conn:
        try:
            listing = list_deliveries(conn, _filter(query), cursor=cursor, limit=limit)
        except ValueError:
            raise bad_param("cursor", "无效（请从第一页重新翻页）") from None
    raw = {**query.raw, "limit": limit if limit != 50 else None}
    return ctx.page("deliveries.html", listing=listing, filters=raw, query=query, cursor=cursor)


@router.post("/deliveries/reprocess")
def reprocess_deliveries(ctx: Actor) -> Response:
    step = choice(ctx.form, "step", ("preview", "confirm")) or "preview"
    query = delivery_query(ctx.form, ctx.form_lists.get("record_id", []), ctx.render.zone)
    why = reason(ctx.form)
    flt = _filter(query)
    name = ctx.session.operator.name
    # The preview's newest delivery: the confirmation requeues nothing the operator was not shown.
    ceiling = (integer(ctx.form, "ceiling", 0, 0, 2**63 - 1)
               if text(ctx.form, "ceiling") is not None else None)
    if step == "confirm" and why is None:
        preview = reprocess(ctx.state.engine, flt, dry_run=True, reason=DRY_RUN_REASON, actor=name,
                            ceiling=ceiling)
        return ctx.page("reprocess.html", 400, query=query, matched=preview.matched,
                        ceiling=preview.ceiling, error="请填写重新投递的原因（必填，将记入审计日志）。")
    if step == "preview":
        preview = reprocess(ctx.state.engine, flt, dry_run=True, reason=why or DRY_RUN_REASON,
                            actor=name)
        return ctx.page("reprocess.html", query=query, matched=preview.matched,
                        ceiling=preview.ceiling, error=None)
    assert why is not None
    done = reprocess(ctx.state.engine, flt, dry_run=False, reason=why, actor=name, ceiling=ceiling,
                     config=ctx.state.rules_config)
    return ctx.page("reprocess_done.html", query=query, result=done, reason=why)


@router.get("/records/{record_id}")
def record_page(record_id: str, ctx: Viewer) -> Response:
    record_id = _record_id(record_id)
    with snapshot(ctx.state.engine) as conn:  # the record and its deliveries at one moment
        view = record_view(conn, record_id)
    if view is None:
        raise ConsoleError(404, "未找到", f"没有记录 {record_id}。")
    return ctx.page("record.html", record_id=record_id, view=view, summary=summarize(view),
                    versions=version_rows(view))


def _shown_version(ctx: Ctx, current: int | None) -> int:
    """The record version the submitted form was made on (its hidden ``version``).

    A form without one (a page from before this field) counts as made on no version; against
    ``current`` a mismatch is answered 409 here, else by the ops function (RECORD_CHANGED).
    """
    shown = integer(ctx.form, "version", 0, 0, 2**31 - 1)
    if current is not None and shown != current:
        raise ConsoleError(409, "记录已更新", f"该记录在页面显示之后已有新版本（当前为第 {current} 版），"
                           "请重新打开页面后再操作。")
    return shown


def _dead_view(ctx: Ctx, record_id: str) -> dict[str, Any]:
    with snapshot(ctx.state.engine) as conn:
        view = record_view(conn, record_id)
    if view is None:
        raise ConsoleError(404, "未找到", f"没有记录 {record_id}。")
    if view.get("status") != "dead":
        raise ConsoleError(409, "不能修改", "只有投递失败（死信）的记录可以修改后重新投递。")
    return view


@router.get("/records/{record_id}/edit")
def edit_form(record_id: str, ctx: Viewer) -> Response:
    require_role(ctx)
    record_id = _record_id(record_id)
    view = _dead_view(ctx, record_id)
    summary = summarize(view)
    fields, hidden = edit_fields(summary["editable"])
    return ctx.page("record_edit.html", record_id=record_id, summary=summary,
                    fields=fields, values=shown_values(summary["editable"], hidden), error=None)


@router.post("/records/{record_id}/edit")
def edit_submit(record_id: str, ctx: Actor) -> Response:
    record_id = _record_id(record_id)
    view = _dead_view(ctx, record_id)
    summary = summarize(view)
    # The fields are diffed against the version the form showed, never a newer one.
    shown = _shown_version(ctx, int(view["current_version"]))
    fields, hidden = edit_fields(summary["editable"])
    changes = changes_from(ctx.form, summary["editable"], fields, hidden)
    why = reason(ctx.form)
    error = None if changes else "没有修改任何字段。"
    error = error or (None if why else "请填写修改原因（必填，将记入审计日志）。")
    if error:
        # What was typed comes back, except write-only fields (never echoed).
        values = typed_back(ctx.form, shown_values(summary["editable"], hidden), fields, hidden)
        return ctx.page("record_edit.html", 400, record_id=record_id, summary=summary,
                        fields=fields, values=values, error=error)
    assert why is not None
    result = edit_and_requeue(ctx.state.engine, ctx.state.settings, record_id, changes,
                              reason=why, actor=ctx.session.operator.name, expected_version=shown)
    # The message holds nothing but constant text, the record's id and a version number.
    message = f"记录 {record_id} 已生成第 {result.get('version')} 版并重新排队投递。"
    return ctx.page("done.html", title="已修改并重新排队", message=Ident(message),
                    record_id=record_id, diff=result.get("diff"))


@router.get("/conflicts")
def conflicts(ctx: Viewer) -> Response:
    params = ctx.request.query_params
    cursor = text(params, "cursor", 200)
    with snapshot(ctx.state.engine) as conn:
        try:
            listing = list_conflicts(conn, cursor=cursor, limit=50)
        except ValueError:
            raise bad_param("cursor", "无效（请从第一页重新翻页）") from None
    return ctx.page("conflicts.html", listing=listing, cursor=cursor)


def _conflict_views(ctx: Ctx, record_id: str, other: str | None
                    ) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """Both records' facts, and ``other``."""
    with snapshot(ctx.state.engine) as conn:
        mine = record_view(conn, record_id)
        theirs = record_view(conn, other) if other else None
    if mine is None:
        raise ConsoleError(404, "未找到", f"没有记录 {record_id}。")
    return summarize(mine), summarize(theirs) if theirs else None, other


@router.get("/conflicts/{record_id}/resolve")
def resolve_form(record_id: str, ctx: Viewer) -> Response:
    require_role(ctx)
    record_id = _record_id(record_id)
    mine, theirs, other = _conflict_views(ctx, record_id, text(ctx.request.query_params, "other"))
    return ctx.page("conflict_resolve.html", record_id=record_id, other=other, mine=mine,
                    theirs=theirs, error=None, keep=None)


@router.post("/conflicts/{record_id}/resolve")
def resolve_submit(record_id: str, ctx: Actor) -> Response:
    record_id = _record_id(record_id)
    keep = choice(ctx.form, "keep", ("this", "existing"))
    why = reason(ctx.form)
    if keep is None or why is None:
        mine, theirs, other = _conflict_views(ctx, record_id, text(ctx.form, "other"))
        return ctx.page("conflict_resolve.html", 400, record_id=record_id, other=other,
                        mine=mine, theirs=theirs, keep=keep,
                        error="请选择保留哪一版，并填写原因（必填，将记入审计日志）。")
    result = resolve_conflict(ctx.state.engine, ctx.state.settings, record_id, keep=keep,
                              reason=why, actor=ctx.session.operator.name,
                              expected_version=_shown_version(ctx, None))
    message = ("已采用本记录并转发投递，原记录被取代。" if keep == "this"
               else "已保留原有记录，本记录关闭，不转发。")
    return ctx.page("done.html", title="冲突已解决", message=Ident(f"记录 {record_id}：{message}"),
                    record_id=record_id, diff=result.get("diff"))
