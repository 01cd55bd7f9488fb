r"""Request signing of SPEC §7, shared by the gateway (verifying) and partners (signing).

``signature = hex(HMAC-SHA256(secret, METHOD \n path-with-query \n timestamp \n nonce \n
hex(SHA-256(body))))``.  ``SigningClient`` wraps httpx so a partner (and our mocks, demo and
tests) signs every request the same way::

    with SigningClient("http://127.0.0.1:8000", app_key, secret) as client:
        client.post("/v1/records", json={"records": [...]})
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson

HEADER_APP_KEY = "X-CE-App-Key"
HEADER_TIMESTAMP = "X-CE-Timestamp"
HEADER_NONCE = "X-CE-Nonce"
HEADER_SIGNATURE = "X-CE-Signature"


def string_to_sign(method: str, path_with_query: str, timestamp: str, nonce: str,
                   body_sha256: str) -> str:
    return "\n".join([method.upper(), path_with_query, timestamp, nonce, body_sha256])


def sign_digest(secret: str, method: str, path_with_query: str, timestamp: str, nonce: str,
                body_sha256: str) -> str:
    """The signature from the body's hex SHA-256 (so a large file is hashed while streamed)."""
    message = string_to_sign(method, path_with_query, timestamp, nonce, body_sha256)
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path_with_query: str, timestamp: str, nonce: str, body: bytes) -> str:
    return sign_digest(secret, method, path_with_query, timestamp, nonce,
                       hashlib.sha256(body).hexdigest())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def signed_headers(app_key: str, secret: str, method: str, path_with_query: str, body: bytes,
                   *, timestamp: int | None = None, nonce: str | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    return {
        HEADER_APP_KEY: app_key,
        HEADER_TIMESTAMP: ts,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: sign(secret, method, path_with_query, ts, nonce, body),
    }


def _path_with_query(url: httpx.URL) -> str:
    return url.raw_path.decode("ascii")


class _SigningAuth(httpx.Auth):
    requires_request_body = True

    def __init__(self, app_key: str, secret: str) -> None:
        self.app_key, self.secret = app_key, secret

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        headers = signed_headers(self.app_key, self.secret, request.method,
                                 _path_with_query(request.url), request.content)
        request.headers.update(headers)
        yield request


class SigningClient(httpx.Client):
    """An ``httpx.Client`` that signs every request for one partner."""

    def __init__(self, base_url: str, app_key: str, secret: str, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 60.0)
        super().__init__(base_url=base_url, auth=_SigningAuth(app_key, secret), **kwargs)
        self._app_key, self._secret = app_key, secret

    def upload_batch(self, path: str | Path, *, adapter: str, kind: str, period: str,
                     row_count: int | None = None, total_credits: str | None = None,
                     ) -> httpx.Response:
        """Stream a batch file to ``POST /v1/batches`` (hashed first, never held in memory)."""
        query = httpx.QueryParams({"adapter": adapter, "kind": kind, "period": period})
        target = f"/v1/batches?{query}"
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        headers = {HEADER_APP_KEY: self._app_key, HEADER_TIMESTAMP: ts, HEADER_NONCE: nonce,
                   HEADER_SIGNATURE: sign_digest(self._secret, "POST", target, ts, nonce,
                                                 file_sha256(path)),
                   "Content-Type": "application/octet-stream",
                   # Percent-encoded: a header is ASCII, and partners' files have Chinese names.
                   "X-CE-Filename": quote(Path(path).name)}
        if row_count is not None:
            headers["X-CE-Row-Count"] = str(row_count)
        if total_credits is not None:
            headers["X-CE-Total-Credits"] = total_credits

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    yield block

        request = self.build_request("POST", target, headers=headers, content=chunks())
        return self.send(request, auth=None)

    def submit(self, records: list[dict[str, Any]]) -> httpx.Response:
        """POST canonical submissions (1–1,000) to ``/v1/records``."""
        return self.post("/v1/records", content=orjson.dumps({"records": records}),
                         headers={"Content-Type": "application/json"})


class AsyncSigningClient(httpx.AsyncClient):
    """The asyncio twin of :class:`SigningClient`."""

    def __init__(self, base_url: str, app_key: str, secret: str, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", 60.0)
        super().__init__(base_url=base_url, auth=_SigningAuth(app_key, secret), **kwargs)
