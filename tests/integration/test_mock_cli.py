"""``ce-gateway mock ce-system`` takes every fault SPEC §8 lists from its command line.

A real child process on 127.0.0.1: its faults read back over ``/_mock/faults``, and the
outage window and Retry-After it was started with answer a real intake request.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.demo import free_port
from tests.support.servers import poll


@pytest.fixture
def mock_process(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "mock.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "mock", "ce-system", "--port", str(port),
         "--outage-seconds", "600", "--retry-after", "7", "--duplicate-receipts",
         "--replay-conflict", "--reject-title-marker", "[退回]", "--error-rate", "0.25",
         "--rate-limit-every", "5", "--latency-ms", "3", "--lost-reply-rate", "0.1", "--seed", "9"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mock exited with {proc.returncode}: {(tmp_path / 'mock.log').read_text()}")
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200

    try:
        poll(up, 60, what="the mock to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_mock_cli_starts_with_every_fault_it_is_given(mock_process: str) -> None:
    faults = httpx.get(f"{mock_process}/_mock/faults", timeout=10).json()
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
