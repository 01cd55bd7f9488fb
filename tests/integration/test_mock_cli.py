"""``ce-gateway mock ce-system|cadre-college`` take their faults from the command line (SPEC §5).

A real child process on 127.0.0.1: its faults read back over ``/_mock/faults``, and the
outage window and Retry-After it was started with answer a real intake request.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.demo import free_port
from tests.support.servers import poll


@contextmanager
def _mock(tmp_path: Path, *args: str) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "mock.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "mock", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mock exited with {proc.returncode}: {(tmp_path / 'mock.log').read_text()}")
        return httpx.get(f"{url}/healthz").status_code == 200

    try:
        poll(up, 60, what="the mock to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def mock_process(tmp_path: Path) -> Iterator[str]:
    with _mock(tmp_path, "ce-system", "--outage-seconds", "600", "--retry-after", "7",
               "--duplicate-receipts", "--replay-conflict", "--reject-title-marker", "[退回]",
               "--error-rate", "0.25", "--rate-limit-every", "5", "--latency-ms", "3",
               "--lost-reply-rate", "0.1", "--seed", "9") as url:
        yield url


def test_the_mock_cli_starts_with_every_fault_it_is_given(mock_process: str) -> None:
    faults = httpx.get(f"{mock_process}/_mock/faults").json()
    assert {k: faults[k] for k in ("retry_after", "duplicate_receipts", "replay_conflict",
                                   "reject_title_marker", "error_rate", "rate_limit_every",
                                   "latency_ms", "lost_reply_rate", "seed")} == {
        "retry_after": "7", "duplicate_receipts": True, "replay_conflict": True,
        "reject_title_marker": "[退回]", "error_rate": 0.25, "rate_limit_every": 5,
        "latency_ms": 3, "lost_reply_rate": 0.1, "seed": 9}
    assert faults["outage_until"] is not None

    answer = httpx.post(f"{mock_process}/api/v1/ce-records/batch", json={"records": []},
                        headers={"Idempotency-Key": "k-1"}, timeout=10)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "7"


def test_the_mock_college_starts_with_every_fault_it_is_given(tmp_path: Path) -> None:
    with _mock(tmp_path, "cadre-college", "--outage", "--retry-after", "4", "--error-rate", "0.5",
               "--fail-next", "2", "--rate-limit-every", "3", "--latency-ms", "2",
               "--bad-item-every", "7", "--seed", "5") as url:
        faults = httpx.get(f"{url}/_mock/faults").json()
        page = httpx.get(f"{url}/api/completions")
    assert {k: faults[k] for k in ("outage", "retry_after", "error_rate", "fail_next",
                                   "rate_limit_every", "latency_ms", "bad_item_every", "seed")} == {
        "outage": True, "retry_after": "4", "error_rate": 0.5, "fail_next": 2,
        "rate_limit_every": 3, "latency_ms": 2, "bad_item_every": 7, "seed": 5}
    assert page.status_code == 503 and page.headers["Retry-After"] == "4"
