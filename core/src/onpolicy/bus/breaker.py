"""A small circuit breaker: stop calling a backend that fails every request.

States: **closed** (calls go through; ``failure_threshold`` consecutive failures open it),
**open** (no calls for a cool-down; then the next caller becomes the one probe) and
**half-open** (one probe in flight: its success closes the breaker, its failure opens it
again with a doubled cool-down, up to ``max_reset_s``). :meth:`trip` opens it at once, for
errors that say every request will fail (a rejected API key, a model that does not exist).

Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import IntEnum


class State(IntEnum):
    """Values exported as the ``circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        reset_s: float = 5.0,
        max_reset_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, str], None] | None = None,
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.max_reset_s = max(max_reset_s, reset_s)
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0  # consecutive, while closed
        self.cooldown_s = reset_s  # the current cool-down (doubles while probes fail)
        self._opened_at = 0.0
        self.reason = ""  # why it is open (or last was): "failures" or what trip() was given
        self.last_error = ""

    # ------------------------------------------------------------------ queries
    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when closed or due)."""
        with self._lock:
            if self._state is not State.OPEN:
                return 0.0
            return max(self._opened_at + self.cooldown_s - self._clock(), 0.0)

    # ------------------------------------------------------------------ calls
    def permit(self) -> State | None:
        """May a call go out now? ``CLOSED``: yes; ``HALF_OPEN``: yes, as the one probe (once
        the cool-down has passed; it then awaits :meth:`success` or :meth:`failure`);
        ``None``: no."""
        with self._lock:
            if self._state is State.CLOSED:
                return State.CLOSED
            if self._state is State.OPEN and self._clock() >= self._opened_at + self.cooldown_s:
                self._set(State.HALF_OPEN)
                return State.HALF_OPEN
            return None

    def allow(self) -> bool:
        return self.permit() is not None

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self.cooldown_s = self.reset_s
            if self._state is not State.CLOSED:
                self._set(State.CLOSED)

    def failure(self, error: str = "") -> bool:
        """Count a failed call; True when this failure opened the breaker."""
        with self._lock:
            self.last_error = error
            if self._state is State.HALF_OPEN:  # the probe failed: wait longer
                self.cooldown_s = min(self.cooldown_s * 2, self.max_reset_s)
                self._open(self.reason or "failures")
                return True
            if self._state is State.OPEN:
                return False
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open("failures")
                return True
            return False

    def trip(self, reason: str, error: str = "") -> bool:
        """Open now (every call would fail, e.g. rejected credentials); True if it was not
        open already. A failed probe doubles the cool-down as :meth:`failure` does."""
        with self._lock:
            self.last_error = error
            if self._state is State.OPEN:
                return False
            if self._state is State.HALF_OPEN:
                self.cooldown_s = min(self.cooldown_s * 2, self.max_reset_s)
            self._open(reason)
            return True

    def release(self) -> None:
        """The probe ended with neither outcome (cancelled): open again, probe when due."""
        with self._lock:
            if self._state is State.HALF_OPEN:
                self._state = State.OPEN  # same reason and cool-down; no change reported
                self._opened_at = self._clock() - self.cooldown_s

    # ------------------------------------------------------------------ internals
    def _open(self, reason: str) -> None:
        self.reason = reason
        self._opened_at = self._clock()
        self._failures = 0
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state, self.reason)
