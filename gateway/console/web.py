"""The console's request plumbing: who is asking, may they act, and how refusals look.

:class:`ConsoleRoute` turns the console's own refusals into pages (a redirect to the login page,
or a Chinese error page) instead of the API's JSON errors.  :func:`viewer` and :func:`actor`
are the two dependencies (``Viewer`` and ``Actor`` as parameter types): any logged-in operator
may read; a POST also needs the session's CSRF token and the ``operator`` role (a ``viewer``
gets 403).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.console import session as sessions
from gateway.console.forms import ConsoleError, LoginRequired
from gateway.console.render import Ident, Renderer
from gateway.errors import PayloadRejected
from gateway.state import AppState

log = logging.getLogger(__name__)
REFUSAL_TITLES = {404: "未找到", 409: "操作未完成", 422: "参数有误"}


@lru_cache(maxsize=4)
def renderer(timezone: str) -> Renderer:
    return Renderer(timezone)


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.gateway
    return state


def signer_of(request: Request) -> sessions.Signer:
    return sessions.Signer(state_of(request).settings.secret_key.get_secret_value())


def renderer_of(request: Request) -> Renderer:
    return renderer(state_of(request).settings.timezone)


def safe_next(value: Any) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    target = str(value or "")
    if target.startswith("/ops") and not target.startswith("//") and "\\" not in target \
            and all(32 < ord(ch) < 127 for ch in target):
        return target
    return "/ops"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=sessions.COOKIE_PATH, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


@dataclass
class Ctx:
    """One console request: the gateway, the logged-in operator, the renderer and the form."""

    request: Request
    state: AppState
    session: sessions.ConsoleSession
    render: Renderer
    form: Mapping[str, Any] = field(default_factory=dict)
    form_lists: dict[str, list[str]] = field(default_factory=dict)

    def page(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return self.render.page(name, status_code, me=self.session.operator,
                                can_act=self.session.can_act, csrf=Ident(self.session.csrf),
                                path=self.request.url.path, **context)


def error_page(request: Request, status_code: int, title: str, message: str,
               detail: str | None = None) -> HTMLResponse:
    me = None
    try:
        me = sessions.load(state_of(request).engine, signer_of(request),
                           request.cookies.get(sessions.COOKIE))
    except Exception:  # the error page must render even when the store is the problem
        log.exception("console: session lookup for an error page failed")
    return renderer_of(request).page(
        "error.html", status_code, title=title, message=message, detail=detail,
        me=me.operator if me else None, can_act=bool(me and me.can_act),
        csrf=Ident(me.csrf) if me else "", path=request.url.path)


class ConsoleRoute(APIRoute):
    """Renders the console's refusals as pages; the API's JSON handlers never see them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                if request.method != "GET":
                    target = "/ops"
                return RedirectResponse(f"/ops/login?next={quote(safe_next(target), safe='')}",
                                        status_code=303)
            except ConsoleError as exc:
                return await run_in_threadpool(error_page, request, exc.status_code, exc.title,
                                               exc.message)
            except PayloadRejected as exc:  # a coded refusal from gateway.ops (404, 409, 422)
                title = REFUSAL_TITLES.get(exc.status_code, "操作未完成")
                return await run_in_threadpool(error_page, request, exc.status_code, title,
                                               exc.message_zh, f"{exc.code}: {exc.message}")
            except StarletteHTTPException as exc:  # e.g. a malformed form body (400)
                return await run_in_threadpool(error_page, request, exc.status_code, "请求有误",
                                               "请求无法处理，请返回上一页重试。", str(exc.detail))
            except Exception:  # a page, not the API's JSON; the traceback goes to the log
                log.exception("console: unexpected error on %s %s", request.method, request.url.path)
                return await run_in_threadpool(
                    error_page, request, 500, "内部错误",
                    "服务器内部错误，已记录日志。请刷新页面确认操作结果后再重试。")

        return guarded


def _session(request: Request) -> sessions.ConsoleSession:
    found = sessions.load(state_of(request).engine, signer_of(request),
                          request.cookies.get(sessions.COOKIE))
    if found is None:
        raise LoginRequired()
    return found


def viewer(request: Request) -> Ctx:
    """Any logged-in operator (a sync dependency: FastAPI runs it in the thread pool)."""
    return Ctx(request, state_of(request), _session(request), renderer_of(request))


async def posted(request: Request) -> Ctx:
    """A logged-in operator's POST with a valid CSRF token (any role: logging out)."""
    form = await request.form()
    found = await run_in_threadpool(_session, request)
    token = form.get("csrf")
    if not signer_of(request).check_csrf(found.sid, token if isinstance(token, str) else None):
        raise ConsoleError(403, "请求已失效", "表单校验失败（CSRF 令牌缺失或不符），请刷新页面后重试。")
    lists = {key: [str(v) for v in form.getlist(key)] for key in form}
    return Ctx(request, state_of(request), found, renderer_of(request),
               {k: v for k, v in form.items() if isinstance(v, str)}, lists)


async def actor(request: Request) -> Ctx:
    """A POST that changes something: CSRF checked and the ``operator`` role required."""
    ctx = await posted(request)
    if not ctx.session.can_act:
        raise ConsoleError(403, "无权操作",
                           f"账号 {ctx.session.operator.name} 的角色为只读（viewer），不能执行此操作。")
    return ctx


def require_role(ctx: Ctx) -> None:
    """For GET pages that exist only to confirm an action (a viewer has no use for them)."""
    if not ctx.session.can_act:
        raise ConsoleError(403, "无权操作",
                           f"账号 {ctx.session.operator.name} 的角色为只读（viewer），不能执行此操作。")


# The dependencies as the types of the pages' ``ctx`` parameters.
Viewer = Annotated[Ctx, Depends(viewer)]
Posted = Annotated[Ctx, Depends(posted)]
Actor = Annotated[Ctx, Depends(actor)]
