"""The console's pages: login, dashboard, batches, reconciliation.

Actions live in ``actions``; rejections and their edit in ``rejections``; revalidation and the
audit check in ``checks``.

Mounted by ``gateway.api.app`` under ``/ops``.  Reads go through the same modules as the ops
API (``gateway.ops.overview``, ``gateway.batch_status``, ``gateway.reconcile``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from sqlalchemy import func, select

from gateway import reconcile
from gateway.batch_status import batch_status, rows_judged
from gateway.console import actions, checks, rejections
from gateway.console import session as sessions
from gateway.console.forms import ConsoleError, bad_param, choice, integer, text
from gateway.console.render import TEMPLATES, Ident
from gateway.console.web import (
    ConsoleRoute,
    Posted,
    Viewer,
    renderer_of,
    safe_next,
    set_cookie,
    signer_of,
    state_of,
)
from gateway.errors import PayloadRejected
from gateway.ops.batches import BATCH_ADAPTERS, BATCH_KINDS, BATCH_STATUSES, batch_filters
from gateway.ops.batches import COLUMNS as BATCH_COLUMNS
from gateway.ops.overview import overview
from gateway.store.db import snapshot
from gateway.store.tables import batches

router = APIRouter(prefix="/ops", route_class=ConsoleRoute, include_in_schema=False)

RECONCILED = ("health", "finance")
PAGE = 50


def _login_page(request: Request, status_code: int = 200, error: str | None = None,
                next_path: str = "/ops") -> Response:
    nonce = sessions.new_login_nonce()
    response = renderer_of(request).page(
        "login.html", status_code, me=None, can_act=False, csrf="", path=request.url.path,
        login_csrf=Ident(sessions.login_csrf(signer_of(request), nonce)), error=error,
        next=next_path)
    set_cookie(request, response, sessions.LOGIN_COOKIE, nonce, sessions.LOGIN_SECONDS)
    return response


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the URL's name
    state = state_of(request)
    if sessions.load(state.engine, signer_of(request), request.cookies.get(sessions.COOKIE)):
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next_path=safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    token, csrf, next_path = (form.get("token"), form.get("csrf"), safe_next(form.get("next")))
    nonce = request.cookies.get(sessions.LOGIN_COOKIE) or ""
    signer = signer_of(request)
    if not nonce or not isinstance(csrf, str) or not signer.check_csrf("login/" + nonce, csrf):
        return _login_page(request, 403, "登录表单已过期，请重新输入令牌。", next_path)
    found = await run_in_threadpool(sessions.log_in, state_of(request).engine, signer,
                                    token if isinstance(token, str) else "")
    if found is None:
        return _login_page(request, 401, "令牌无效：请检查后重新输入。", next_path)
    response = RedirectResponse(next_path, status_code=303)
    set_cookie(request, response, sessions.COOKIE, found[0], sessions.SESSION_SECONDS)
    response.delete_cookie(sessions.LOGIN_COOKIE, path=sessions.COOKIE_PATH)
    return response


@router.post("/logout")
def logout(ctx: Posted) -> Response:
    sessions.log_out(ctx.state.engine, ctx.session)
    response = RedirectResponse("/ops/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=sessions.COOKIE_PATH, httponly=True,
                           samesite="strict")
    return response


@router.get("/console.css")
def stylesheet() -> Response:
    return Response((TEMPLATES / "console.css").read_bytes(), media_type="text/css",
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.get("")
def dashboard(ctx: Viewer) -> Response:
    with snapshot(ctx.state.engine) as conn:  # the tiles and the tables at one moment
        data = overview(conn, ctx.state.settings)
    worker = ctx.state.worker
    circuit = None if worker is None else worker.breaker.state.value
    return ctx.page("dashboard.html", data=data, circuit=circuit)


@router.get("/batches")
def batch_list(ctx: Viewer) -> Response:
    params = ctx.request.query_params
    adapter = choice(params, "adapter", BATCH_ADAPTERS)
    kind = choice(params, "kind", BATCH_KINDS)
    status = choice(params, "status", BATCH_STATUSES)
    partner_id = text(params, "partner_id")
    page = integer(params, "page", 1, 1, 100_000)
    where = batch_filters(adapter=adapter or None, kind=kind or None, status=status or None,
                          partner_id=partner_id or None)
    with snapshot(ctx.state.engine) as conn:
        total = conn.execute(select(func.count()).select_from(batches).where(*where)).scalar_one()
        rows = [{**r, "rows_judged": rows_judged(r)} for r in conn.execute(
            select(*BATCH_COLUMNS)
            .where(*where).order_by(batches.c.created_at.desc(), batches.c.batch_id.desc())
            .limit(PAGE).offset((page - 1) * PAGE)).mappings()]
    filters = {"adapter": adapter, "kind": kind, "status": status, "partner_id": partner_id}
    return ctx.page("batches.html", rows=rows, total=int(total), page=page,
                    pages=max(1, -(-int(total) // PAGE)), filters=filters,
                    statuses=BATCH_STATUSES, kinds=BATCH_KINDS)


@router.get("/batches/{batch_id}")
def batch_page(batch_id: str, ctx: Viewer) -> Response:
    params = ctx.request.query_params
    cursor = text(params, "cursor", 512)
    if not batch_id or len(batch_id) > 40 or any(ord(ch) < 32 for ch in batch_id):
        raise ConsoleError(404, "未找到", "没有这个批次。")
    with snapshot(ctx.state.engine) as conn:
        try:
            found = batch_status(conn, batch_id, cursor, 100)
        except PayloadRejected:  # another batch's page, or not a cursor at all
            raise bad_param("cursor", "无效（请从第一页重新翻页）") from None
    if found is None:
        raise ConsoleError(404, "未找到", f"没有批次 {batch_id}。")
    return ctx.page("batch.html", batch=found, cursor=cursor)


@router.get("/reconciliation")
def reconciliation(ctx: Viewer) -> Response:
    params = ctx.request.query_params
    this_year = datetime.now(UTC).astimezone(ctx.render.zone).year
    adapter = choice(params, "adapter", RECONCILED) or "health"
    year = integer(params, "year", this_year, 2000, 2100)
    with snapshot(ctx.state.engine) as conn:
        report: dict[str, Any] = reconcile.report(conn, adapter, year,
                                                  timezone=ctx.state.settings.timezone)
    return ctx.page("reconciliation.html", report=report, adapter=adapter, year=year,
                    adapters=RECONCILED)


router.include_router(actions.router)
router.include_router(rejections.router)
router.include_router(checks.router)
