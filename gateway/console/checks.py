"""The console's checks: re-running validation after a fix, and verifying the audit trail.

Revalidation (``/ops/revalidate``) is two steps like reprocessing: the page counts the open
rejections a filter selects (:func:`gateway.revalidate.count`; any operator may look), then a
confirming POST with a required reason runs :func:`gateway.revalidate.revalidate` (``operator``
role and CSRF, ``web.actor``), which audits it under the operator's name.  ``/ops/audit`` walks
the hash chain (:func:`gateway.audit.verify`) and names the first bad event; any operator may
run it.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select

from gateway import audit
from gateway.console.forms import RejectionQuery, reason, rejection_query
from gateway.console.web import Actor, ConsoleRoute, Ctx, Viewer
from gateway.revalidate import count, revalidate
from gateway.store.db import reading
from gateway.store.tables import audit_events

router = APIRouter(route_class=ConsoleRoute)

# gateway.audit.VerifyResult.problem, in Chinese.
VERIFY_ZH = {
    "missing": "事件缺失（被删除或重新编号）",
    "rewritten": "事件被改写，且重新计算了哈希",
    "unchained": "事件与前一条事件的哈希链接不符（被删除、移动或替换）",
    "altered": "事件内容与其哈希不符（内容被修改）",
    "truncated": "日志尾部被截断（与链头记录不符）",
}


def _preview(ctx: Ctx, query: RejectionQuery, status_code: int = 200,
             error: str | None = None) -> Response:
    matched = count(ctx.state.engine, query.filter)
    return ctx.page("revalidate.html", status_code, query=query, filters=query.raw,
                    matched=matched, error=error)


@router.get("/revalidate")
def revalidate_form(ctx: Viewer) -> Response:
    return _preview(ctx, rejection_query(ctx.request.query_params, ctx.render.zone))


@router.post("/revalidate")
def revalidate_submit(ctx: Actor) -> Response:
    query = rejection_query(ctx.form, ctx.render.zone)
    why = reason(ctx.form)
    if why is None:
        return _preview(ctx, query, 400, "请填写重新校验的原因（必填，将记入审计日志）。")
    result = revalidate(ctx.state.engine, query.filter, actor=ctx.session.operator.name,
                        reason=why, rules=ctx.state.rules())
    return ctx.page("revalidate_done.html", query=query, result=result, reason=why)


@router.get("/audit")
def audit_page(ctx: Viewer) -> Response:
    with reading(ctx.state.engine) as conn:  # no write lock held for the walk (SQLite)
        result = audit.verify(conn)
        kind = None if result.ok else conn.execute(select(audit_events.c.kind).where(
            audit_events.c.seq == result.first_bad_seq)).scalar()
    meaning = VERIFY_ZH.get(result.problem or "")
    return ctx.page("audit.html", result=result, kind=kind, meaning=meaning)
