"""The circuit breaker, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from gateway.delivery.circuit import CircuitBreaker, CircuitState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, reset_seconds=30, clock=clock)


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN


def test_stays_closed_below_threshold(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold - 1):
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow() and breaker.allow()
    assert breaker.opened_count == 0


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    _open(breaker)
    assert breaker.opened_count == 1
    assert breaker.seconds_until_probe() == pytest.approx(30)


def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED


def test_open_refuses_until_reset_seconds(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open(breaker)
    assert not breaker.allow()
    clock.advance(29.9)
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    assert breaker.seconds_until_probe() == pytest.approx(0.1)


def test_half_open_allows_exactly_one_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open(breaker)
    clock.advance(30)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.seconds_until_probe() == 0
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open(breaker)
    clock.advance(31)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow() and breaker.allow()
    # Closed again means counting from zero: one failure does not reopen it.
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED


def test_probe_failure_reopens_for_a_full_reset_period(
        breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open(breaker)
    clock.advance(31)
    assert breaker.allow()
    breaker.record_failure()  # one failure suffices in half-open, not ``threshold``
    assert breaker.state is CircuitState.OPEN
    assert breaker.opened_count == 2
    assert not breaker.allow()
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()  # the next probe


def test_released_probe_lets_the_next_cycle_probe(
        breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open(breaker)
    clock.advance(30)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release_probe()  # nothing was sent after all
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
