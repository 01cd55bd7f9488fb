"""Hostile HTTP input: schemathesis against the real gateway's ``/openapi.json`` (issue 6).

A real gateway (uvicorn on 127.0.0.1, SQLite) is fuzzed operation by operation.  A hook signs
every partner request with the SPEC §7 HMAC scheme over the exact bytes sent (method,
path with query, timestamp, nonce, SHA-256 of the body) for a partner of the operation's own
adapter, and gives every other request an operator's bearer token, so generated requests get
past authentication and reach the code behind it.  Asserted for every example: no 5xx, and the
answer, refusals included, matches the response schema the OpenAPI document declares.

``make test`` runs a few examples per operation (``FUZZ_EXAMPLES``, default 8, keeps this
test near 15 s); ``make fuzz`` runs at least 1,000 in all and prints the count.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.signing import (
    HEADER_APP_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    sign_digest,
)
from gateway.store.db import make_engine, upgrade
from tests.conftest import SECRET_KEY
from tests.support.servers import uvicorn_thread

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "4"))  # per operation and generation mode
MIN_TOTAL = int(os.environ.get("FUZZ_MIN_TOTAL", "0"))  # make fuzz: at least 1,000
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ  # make test: the same examples every run


@dataclass(frozen=True)
class Fuzzed:
    url: str
    partners: dict[str, Partner]  # by adapter
    operator_token: str


class _Signer(requests.auth.AuthBase):
    """Signs the prepared request as sent (SPEC §7), or adds the operator's bearer token."""

    def __init__(self, partner: Partner | None, operator_token: str) -> None:
        self.partner, self.operator_token = partner, operator_token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.partner is None:
            request.headers["Authorization"] = f"Bearer {self.operator_token}"
            return request
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, bytes):  # a stream: schemathesis sends bytes, but be sure
            body = b"".join(body)
            request.body = body
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        request.headers.update({
            HEADER_APP_KEY: self.partner.app_key, HEADER_TIMESTAMP: ts, HEADER_NONCE: nonce,
            HEADER_SIGNATURE: sign_digest(self.partner.secret, request.method or "GET",
                                          request.path_url, ts, nonce,
                                          hashlib.sha256(body).hexdigest())})
        return request


# Which partner signs which signed operation (the rest are ops routes: bearer token).
SIGNED_BY = {
    ("POST", "/v1/records"): "canonical",
    ("DELETE", "/v1/records/{source_record_id}"): "canonical",
    ("POST", "/v1/partners/{adapter}/records"): "training_base",
    ("POST", "/v1/batches"): "health",
    ("GET", "/v1/batches/{batch_id}"): "health",
}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    from gateway.accounts import add_operator, add_partner
    from gateway.config import Settings
    from gateway.secrets_box import SecretBox

    root = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{root / 'store.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    box = SecretBox(SECRET_KEY)
    partners = {"canonical": add_partner(engine, box, "fuzz-canonical", "canonical"),
                "training_base": add_partner(engine, box, "fuzz-base", "training_base", "QHJD001"),
                "health": add_partner(engine, box, "fuzz-health", "health")}
    token = add_operator(engine, "fuzz-operator", "operator")[1]
    engine.dispose()
    settings_ = Settings(database_url=url, downstream_url="http://127.0.0.1:9",
                         secret_key=SECRET_KEY, batch_dir=root / "batches",
                         rate_limit_per_minute=0,  # the fuzzer is one partner at full speed
                         pull_interval_seconds=0, reference_sync_interval_seconds=0)
    with uvicorn_thread(create_app(settings_, run_worker=False)) as base:
        yield Fuzzed(base, partners, token)


def _conforms(ctx: Any, response: Any, case: Any) -> bool | None:
    """The declared response schema, refusals included (the app declares its coded error body)."""
    return response_schema_conformance(ctx, response, case)  # type: ignore[no-any-return]


def _fuzz(operation: Any, mode: GenerationMode, fuzzed: Fuzzed) -> list[int]:
    """Send up to ``EXAMPLES`` generated requests to one operation; their status codes."""
    adapter = SIGNED_BY.get((operation.method.upper(), operation.path))
    signer = _Signer(fuzzed.partners[adapter] if adapter else None, fuzzed.operator_token)
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    def send(case: Any) -> None:
        response = case.call(auth=signer, timeout=30)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, _conforms])

    send()
    return statuses


def test_no_generated_request_gets_a_server_error(
        fuzzed: Fuzzed, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    failures: list[str] = []
    sent: Counter[str] = Counter()
    authenticated: Counter[str] = Counter()  # answers other than 401
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                statuses = _fuzz(operation, mode, fuzzed)
                sent[label] += len(statuses)
                authenticated[label] += sum(status != 401 for status in statuses)
            except Unsatisfiable:
                pass  # nothing of it can be made invalid (no parameters, a free-text path)
            # Collected: every operation is fuzzed, then all failures are reported together
            # (schemathesis raises a FailureGroup, a BaseExceptionGroup).
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{label} ({mode.value}): {type(exc).__name__}: {exc}"[:4000])
    total = sum(sent.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} examples over {len(sent)} operations "
              f"(up to {EXAMPLES} per operation and generation mode), {len(failures)} failing")
    assert not failures, "\n\n".join(failures)
    # The hook's signatures and token work: every operation got past authentication.
    assert set(authenticated) == set(sent) and all(authenticated.values()), authenticated
    assert total >= MIN_TOTAL, (total, MIN_TOTAL)
