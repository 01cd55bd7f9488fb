"""The FastAPI application: partner routes, ops routes, health, coded errors, the worker.

``create_app(settings)`` builds one gateway process.  With ``run_worker`` the background half
(:class:`gateway.runtime.Background`: delivery worker, batch processor, scheduler) runs beside
the HTTP server (``serve``); ``serve --no-worker`` leaves it to ``ce-gateway worker``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.errors import message
from gateway import metrics
from gateway.api.limits import BodyLimit, BodyTooLarge
from gateway.api.routes import batches, deliveries, ops, partner, revalidate
from gateway.api.routes import metrics as metrics_route
from gateway.api.routes.batches import BATCH_UPLOAD_PATH
from gateway.config import Settings
from gateway.console.routes import router as console_router
from gateway.errors import PayloadRejected
from gateway.masking import install_log_masking, mask_text
from gateway.person_keys import WrongPersonKey, stored_check, verify
from gateway.pipeline.validate import zh_detail
from gateway.runtime import Background
from gateway.secrets_box import WrongSecretKey
from gateway.state import AppState
from gateway.store.db import is_sqlite, migration_gap, reading, upgrade_if_behind
from gateway.store.tables import partners

log = logging.getLogger(__name__)


class CodedError(BaseModel):
    """One refusal (SPEC §6): a stable code, the field at fault, English and Chinese messages."""

    code: str
    field: str | None = None
    message: str
    message_zh: str


class ErrorBody(BaseModel):
    error: CodedError


# What every refusal looks like, declared once for every route, so /openapi.json describes the
# bodies clients really get (FastAPI's default 422 body is not what this app answers).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (401, "UNAUTHENTICATED / REPLAYED"), (403, "SCOPE_VIOLATION / FORBIDDEN"),
        (404, "NOT_FOUND"), (409, "a state conflict (NOT_A_CONFLICT, NOT_EDITABLE, …)"),
        (413, "PAYLOAD_TOO_LARGE"), (422, "SCHEMA and the rules' codes"),
        (429, "RATE_LIMITED (Retry-After)"))}


# Starlette's own refusals (unknown path, wrong method, …) → their codes; others are SCHEMA.
_HTTP_CODES = {401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


def _coded(status: int, code: str, detail: str | None = None, field: str | None = None,
           detail_zh: str | None = None) -> JSONResponse:
    en, zh = message(code)
    detail_zh = detail_zh or detail  # as PayloadRejected: the English detail still names the value
    return JSONResponse(status_code=status, content={"error": {
        "code": code, "field": field, "message": f"{en} {detail}" if detail else en,
        "message_zh": f"{zh}{detail_zh}" if detail_zh else zh}})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PayloadRejected)
    async def _rejected(_: Request, exc: PayloadRejected) -> JSONResponse:
        # Details may quote the partner's input (a record id that is an identity number):
        # masked here, where every coded refusal leaves.  RateLimited carries Retry-After.
        error = {"code": exc.code, "field": exc.field, "message": mask_text(exc.message),
                 "message_zh": mask_text(exc.message_zh)}
        return JSONResponse(status_code=exc.status_code, content={"error": error},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        english = str(first.get("msg", "invalid"))
        chinese = zh_detail(str(first.get("type", "")), first.get("ctx"), english)
        en, zh = message("SCHEMA")
        where = f"{loc}: " if loc else ""
        return JSONResponse(status_code=422, content={"error": {
            "code": "SCHEMA", "field": loc or None, "message": mask_text(f"{en} ({where}{english})"),
            "message_zh": mask_text(f"{zh}（{where.replace(': ', '：')}{chinese}）")}})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):  # a body sent without a length, counted past the limit
            return exc.response()
        if exc.status_code == 400:  # FastAPI could not read the JSON body (not UTF-8, say)
            return _coded(422, "SCHEMA", field="body",
                          detail=f"(the body could not be read as JSON: {exc.__cause__ or exc.detail})",
                          detail_zh="（请求体无法按 JSON 读取，应为 UTF-8 编码的 JSON）")
        code = _HTTP_CODES.get(exc.status_code, "SCHEMA")
        # Starlette's own detail is the status phrase ("Not Found"): the code's messages say it,
        # in both languages.  A detail of our own is shown as PayloadRejected shows one.
        own = None if exc.detail == HTTPStatus(exc.status_code).phrase else str(exc.detail)
        response = _coded(exc.status_code, code, own)
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"error": {
            "code": "INTERNAL", "field": None, "message": "Internal error; nothing was committed.",
            "message_zh": "内部错误，本次请求未提交。"}})


_wrong_person_key_logged = threading.Event()


def _log_wrong_person_key_once() -> None:
    if not _wrong_person_key_logged.is_set():
        _wrong_person_key_logged.set()
        log.error("CE_GATEWAY_PERSON_KEY_SECRET is not the secret this store's person keys were "
                  "made with: this process would file people apart from the store's records "
                  "(dedup, caps, compliance); it is not ready")


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"status": "not ready", "reason": reason})


def create_app(settings: Settings, *, run_worker: bool = True, migrate: bool | None = None,
               run_scheduler: bool = True) -> FastAPI:
    install_log_masking()
    state = AppState.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if migrate if migrate is not None else is_sqlite(state.engine):
            upgrade_if_behind(state.engine, settings.database_url,
                              person_key_secret=settings.person_key_secret, settings=settings)
        # Served with another PERSON_KEY_SECRET, one person would be filed under two keys.
        with reading(state.engine) as conn:
            try:
                verify(conn, state.rules_config.keys)
            except WrongPersonKey:
                _log_wrong_person_key_once()
                raise
        background = Background(state.engine, settings, scheduler_enabled=run_scheduler).start() if run_worker else None
        state.worker = background.worker if background else None
        try:
            yield
        finally:
            if background is not None:
                background.stop()
            state.engine.dispose()

    app = FastAPI(title="CE Gateway", version="1.0.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="青海省专业技术人员继续教育学时对接网关 — partner intake, "
                              "validation, dedup, durable delivery and audit.")
    app.state.gateway = state
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=lambda: state.settings.max_body_bytes,
                       exempt=(BATCH_UPLOAD_PATH,))
    app.include_router(partner.router)
    app.include_router(batches.router)
    app.include_router(ops.router)
    app.include_router(revalidate.router)
    app.include_router(deliveries.router)
    app.include_router(console_router)  # /ops: the zh-CN web console

    # per app: tests run several
    app.state.metrics = metrics.build_registry(lambda: state.worker, state.engine)
    app.include_router(metrics_route.router)  # GET /metrics: no token, network boundary only

    # HEAD answers as GET without the body (RFC 9110 §9.1), for probes that check with HEAD;
    # left out of /openapi.json, which documents the GET.
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Ready: the store answers, is at this code's head, and both secrets fit it.

        PERSON_KEY_SECRET made its person keys, and SECRET_KEY opens its partner secrets.
        """
        try:
            with reading(state.engine) as conn:  # not queued behind a writer's lock (SQLite)
                gap = migration_gap(conn)
                if gap is not None:  # a store never migrated has no partners table to read
                    return _not_ready(gap)
                sealed = conn.execute(select(partners.c.secret_enc).where(
                    partners.c.active.is_(True)).limit(1)).scalar()
                person_check = stored_check(conn)
        except Exception as exc:  # the probe reports, it does not crash
            return _not_ready(type(exc).__name__)
        if person_check is not None and not state.rules_config.keys.matches(person_check):
            _log_wrong_person_key_once()
            return _not_ready("PERSON_KEY_SECRET is not the secret of this store's person keys")
        try:
            if sealed is not None:
                state.box.decrypt(sealed)
        except WrongSecretKey:
            return _not_ready("SECRET_KEY cannot open the partners' secrets")
        worker = state.worker
        return JSONResponse(content={
            "status": "ready",
            "worker": None if worker is None else {"name": worker.name, "circuit": worker.breaker.state.value},
        })

    return app
