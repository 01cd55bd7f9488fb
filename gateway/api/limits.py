"""Every request body is bounded before anything reads it (SPEC §7; issue 6 "request body limits").

The partner routes count their own bytes (:func:`gateway.api.deps.read_body`), but the ops API
and the console have their bodies parsed by FastAPI and Starlette (a JSON model, a form) before
any dependency runs, so before the operator is known: without a bound here, anyone who reaches
the port could make a replica buffer and parse a body of any size.  :class:`BodyLimit` refuses a
declared ``Content-Length`` over ``MAX_BODY_BYTES`` at once and counts the bytes of a body sent
without one, answering 413 ``PAYLOAD_TOO_LARGE``.  ``POST /v1/batches`` streams to disk under
its own ``MAX_BATCH_BYTES`` and is left to its route.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.errors import message

Body = tuple[str, str]  # (English, Chinese) detail of the refusal


def _details(limit: int) -> Body:
    return f"(limit {limit} bytes)", f"（上限 {limit} 字节）"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without a declared length passes the limit.

    FastAPI lets an ``HTTPException`` raised while it reads a body through unchanged (any other
    exception there becomes a 400); the app's handler answers it with :meth:`response`, the
    same coded 413 as a declared length over the limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, _details(limit)[0])
        self.limit = limit

    def response(self) -> JSONResponse:
        return _refusal(self.limit)


class BodyLimit:
    """ASGI middleware: at most ``limit()`` bytes of body, but on the ``exempt`` paths."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int], exempt: Collection[str]) -> None:
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # "/v1/batches/" is redirected to the upload route, so it is exempt as well.
        if scope["type"] != "http" or scope["path"].rstrip("/") in self.exempt:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refusal(limit)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            got = await receive()
            if got["type"] == "http.request":
                received += len(got.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return got

        await self.app(scope, counted, send)


def _refusal(limit: int) -> JSONResponse:
    en, zh = message("PAYLOAD_TOO_LARGE")
    detail, detail_zh = _details(limit)
    return JSONResponse(status_code=413, headers={"Connection": "close"}, content={"error": {
        "code": "PAYLOAD_TOO_LARGE", "field": None, "message": f"{en} {detail}",
        "message_zh": f"{zh}{detail_zh}"}})
