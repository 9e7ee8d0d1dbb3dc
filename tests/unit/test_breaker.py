"""The circuit breaker shared by the services' stream processors."""

from __future__ import annotations

import threading

import pytest

from onpolicy.bus.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_opens_after_consecutive_failures_only(clock):
    changes = []
    breaker = CircuitBreaker(3, reset_s=10, clock=clock, on_change=lambda s, r: changes.append(s))
    assert not breaker.failure("e") and not breaker.failure("e")
    breaker.success()  # a success in between starts the count again
    assert not breaker.failure("e") and not breaker.failure("e")
    assert breaker.closed and breaker.permit() is State.CLOSED
    assert breaker.failure("boom")  # the third in a row
    assert breaker.state is State.OPEN and breaker.reason == "failures"
    assert breaker.last_error == "boom" and changes == [State.OPEN]
    assert breaker.permit() is None and not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10)


def test_half_open_lets_one_probe_through_after_the_cool_down(clock):
    breaker = CircuitBreaker(1, reset_s=10, max_reset_s=25, clock=clock)
    breaker.failure()
    clock.now += 9.9
    assert breaker.permit() is None
    clock.now += 0.1
    assert breaker.permit() is State.HALF_OPEN
    assert breaker.permit() is None  # only one probe at a time
    assert breaker.failure()  # the probe failed: open again, for twice as long
    assert breaker.state is State.OPEN and breaker.cooldown_s == 20
    clock.now += 19
    assert breaker.permit() is None
    clock.now += 1
    assert breaker.permit() is State.HALF_OPEN
    breaker.failure()
    assert breaker.cooldown_s == 25  # capped
    clock.now += 25
    assert breaker.permit() is State.HALF_OPEN
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.cooldown_s == 10
    assert breaker.permit() is State.CLOSED


def test_trip_opens_at_once_with_its_reason_and_a_probe_failure_backs_off(clock):
    breaker = CircuitBreaker(100, reset_s=5, clock=clock)
    assert breaker.trip("config", "HTTP 401")
    assert breaker.state is State.OPEN and breaker.reason == "config"
    assert not breaker.trip("config", "HTTP 401")  # already open
    clock.now += 5
    assert breaker.permit() is State.HALF_OPEN
    assert breaker.trip("config", "HTTP 401")
    assert breaker.cooldown_s == 10 and breaker.reason == "config"


def test_a_cancelled_probe_is_released_for_the_next_caller(clock):
    breaker = CircuitBreaker(1, reset_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.permit() is State.HALF_OPEN
    breaker.release()
    assert breaker.state is State.OPEN
    assert breaker.permit() is State.HALF_OPEN  # due at once, same cool-down
    assert breaker.cooldown_s == 5


def test_threads_get_exactly_one_probe(clock):
    breaker = CircuitBreaker(1, reset_s=1, clock=clock)
    breaker.failure()
    clock.now += 1
    grants = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        grants.append(breaker.permit())

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grants.count(State.HALF_OPEN) == 1 and grants.count(None) == 7


def test_threshold_must_be_positive():
    with pytest.raises(ValueError):
        CircuitBreaker(0)
