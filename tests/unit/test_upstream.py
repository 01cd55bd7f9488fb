"""One upstream request, bounded as a whole (gateway.upstream.bounded_request).

On real sockets the reviews of the alerts and the reference sync, and the Cadre College pull's
tests, meet a server that trickles; here, the deadline and the size cap in memory, and what the
caller gets back.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.upstream import DEADLINE_TIMEOUTS, AnswerCutOff, bounded_request


def _client(answer: httpx.Response) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda _request: answer), timeout=2)


def test_the_answer_comes_back_read_whole_decoded_and_with_its_status() -> None:
    body = json.dumps({"items": ["高原"], "next": None}, ensure_ascii=False).encode()
    answer = httpx.Response(503, headers={"Content-Encoding": "gzip", "Retry-After": "7",
                                          "Content-Type": "application/json; charset=utf-8"},
                            content=gzip.compress(body))
    with _client(answer) as client:
        got = bounded_request(client, "GET", "https://api.example/ref", params={"since": "x"})
    assert got.status_code == 503 and got.headers["Retry-After"] == "7"
    assert got.content == body and got.json() == {"items": ["高原"], "next": None}
    assert "content-encoding" not in got.headers
    assert got.request.url.params["since"] == "x"


@pytest.mark.parametrize("declared", [True, False])
def test_an_answer_over_the_cap_is_cut_off_as_a_transport_error(declared: bool) -> None:
    content = b"x" * 5000
    answer = httpx.Response(200, content=content) if declared else \
        httpx.Response(200, content=iter([content[:2500], content[2500:]]))
    with _client(answer) as client, pytest.raises(AnswerCutOff, match="cap of 4096") as caught:
        bounded_request(client, "GET", "https://api.example/page", max_bytes=4096)
    assert isinstance(caught.value, httpx.TransportError)  # callers' httpx translation applies


def test_the_cap_holds_for_the_decoded_body_of_a_compressed_answer() -> None:
    bomb = gzip.compress(b"\0" * 1_000_000)
    answer = httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=bomb)
    assert len(bomb) < 65536
    with _client(answer) as client, pytest.raises(AnswerCutOff):
        bounded_request(client, "GET", "https://api.example/page", max_bytes=65536)


def test_an_answer_that_trickles_is_cut_off_at_a_few_timeouts() -> None:
    def trickle() -> Iterator[bytes]:
        while True:  # each byte well within any read timeout
            time.sleep(0.05)
            yield b" "

    started = time.monotonic()
    with _client(httpx.Response(200, content=trickle())) as client, \
            pytest.raises(AnswerCutOff, match="longer than"):
        bounded_request(client, "GET", "https://api.example/page", timeout_seconds=0.1)
    assert DEADLINE_TIMEOUTS * 0.1 <= time.monotonic() - started < 5
