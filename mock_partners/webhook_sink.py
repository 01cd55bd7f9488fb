"""Mock group-robot webhook (WeCom 企业微信 / DingTalk 钉钉): keeps what the gateway's alerts post.

A real FastAPI app: any ``POST`` outside ``/_mock`` is a robot message (the robots' own paths
are ``/cgi-bin/webhook/send?key=…`` and ``/robot/send?access_token=…``).  It answers like the
robots do, ``{"errcode": 0, "errmsg": "ok"}``, and keeps the message for tests to read back.

What it may touch: nothing outside this process; it imports nothing from ``gateway/``.

Endpoints:
- ``POST /<any path>`` — a message: stored with its path, query and JSON body
- ``GET /_mock/received`` → ``{"messages": [{"path", "query", "body", "received_at"}, …]}``;
  ``DELETE /_mock/received`` forgets them
- ``POST /_mock/faults`` ``{"fail_next": n, "status": 500, "errcode": 0, "delay_ms": 0,
  "per_minute": null}`` — the next ``n`` messages are refused (HTTP ``status``, or 200 with a
  robot ``errcode`` when it is not 0) and not stored; every answer waits ``delay_ms`` first;
  ``per_minute`` imitates the robots' rate limit (WeCom: 20 messages a minute): a message
  beyond it within 60 s is answered 200 ``errcode`` 45009 and not stored; ``GET /healthz``

As WeCom does, a markdown message whose content is over 4,096 bytes (UTF-8) is refused 200
``errcode`` 40058 and not stored.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

__all__ = ["SinkFaults", "create_app", "serve"]


class SinkFaults(BaseModel):
    fail_next: int = Field(0, ge=0)
    status: int = Field(500, ge=200, le=599)
    errcode: int = 0  # ≠ 0: answer 200 with this robot error code instead of ``status``
    delay_ms: int = Field(0, ge=0, le=10_000)  # a slow robot: every answer waits this long
    per_minute: int | None = Field(None, ge=1)  # the robot's rate limit (WeCom: 20)


# WeCom's limit on a markdown message's content, in UTF-8 bytes (errcode 40058 beyond it).
MARKDOWN_MAX_BYTES = 4096


@dataclass
class _Sink:
    messages: list[dict[str, Any]] = field(default_factory=list)
    faults: SinkFaults = field(default_factory=SinkFaults)
    taken_at: list[float] = field(default_factory=list)  # when the last minute's messages came
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app() -> FastAPI:
    app = FastAPI(title="Mock robot webhook (WeCom / DingTalk)")
    sink = _Sink()
    app.state.sink = sink

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/_mock/received")
    def received() -> dict[str, Any]:
        with sink.lock:
            return {"messages": list(sink.messages)}

    @app.delete("/_mock/received")
    def forget() -> dict[str, int]:
        with sink.lock:
            n = len(sink.messages)
            sink.messages.clear()
        return {"deleted": n}

    @app.post("/_mock/faults")
    def set_faults(faults: SinkFaults) -> dict[str, Any]:
        with sink.lock:
            sink.faults = faults
        return faults.model_dump()

    @app.post("/{path:path}")
    async def message(path: str, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(status_code=400, content={"errcode": 40001, "errmsg": "invalid json"})
        if sink.faults.delay_ms:
            await asyncio.sleep(sink.faults.delay_ms / 1000)
        with sink.lock:
            faults = sink.faults
            if faults.fail_next > 0:
                faults.fail_next -= 1
                if faults.errcode:
                    return JSONResponse({"errcode": faults.errcode, "errmsg": "refused by the mock"})
                return JSONResponse(status_code=faults.status, content={"errmsg": "refused by the mock"})
            markdown = body.get("markdown") if isinstance(body, dict) else None
            if isinstance(markdown, dict) and \
                    len(str(markdown.get("content", "")).encode()) > MARKDOWN_MAX_BYTES:
                return JSONResponse({"errcode": 40058, "errmsg": "markdown.content exceed max length"})
            now = time.monotonic()
            sink.taken_at = [t for t in sink.taken_at if t > now - 60]  # the last minute's
            if faults.per_minute is not None and len(sink.taken_at) >= faults.per_minute:
                return JSONResponse({"errcode": 45009, "errmsg": "api freq out of limit"})
            sink.taken_at.append(now)
            sink.messages.append({"path": "/" + path, "query": dict(request.query_params),
                                  "body": body, "received_at": datetime.now(UTC).isoformat()})
        return JSONResponse({"errcode": 0, "errmsg": "ok"})

    return app


def serve(host: str = "127.0.0.1", port: int = 8782) -> None:
    """Run the sink under uvicorn until interrupted."""
    uvicorn.run(create_app(), host=host, port=port, log_level="warning")
