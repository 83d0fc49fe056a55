"""Backpressure for one endpoint: the circuit breaker that holds every request while one probe
at a time checks whether a failing endpoint is back, and the parsing of Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from typing import Callable

from megapairs_ops.stages.annotate.backends import EndpointUnavailable
from megapairs_ops.stages.annotate.request_stats import RequestStats

log = logging.getLogger(__name__)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class CircuitBreaker:
    """Shared by all requests of one endpoint. Closed: requests flow. After `threshold`
    consecutive failures it opens for `cooldown_s` (doubling on each failed probe, up to
    `max_cooldown_s`); then one probe request at a time goes through until one succeeds.
    `pause(seconds)` (a Retry-After) holds every request without counting as a failure."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        max_cooldown_s: float,
        outage_timeout_s: float,
        stats: Callable[[], list[RequestStats]],
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown_s
        self.cooldown = cooldown_s
        self.max_cooldown = max(max_cooldown_s, cooldown_s)
        self.outage_timeout = outage_timeout_s
        self.clock = clock
        self.name = name
        self._stats = stats
        self.consecutive = 0
        self.is_open = False
        self.open_until = 0.0
        self.not_before = 0.0
        self.down_since: float | None = None
        self.probing = False
        self._changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        event = self._event()
        event.set()
        self._changed = asyncio.Event()

    async def acquire(self, stats: RequestStats) -> bool:
        """Wait until a request may be sent; True when it is the probe of an open breaker."""
        waited_from = None
        try:
            while True:
                now = self.clock()
                if self.is_open and self.down_since is not None and now - self.down_since > self.outage_timeout:
                    raise EndpointUnavailable(
                        f"{self.name}: endpoint down for {now - self.down_since:.0f}s "
                        f"(outage_timeout_s={self.outage_timeout:g}); finished records are kept"
                    )
                wake = max(self.not_before, self.open_until if self.is_open else 0.0)
                if now >= wake:
                    if not self.is_open:
                        return False
                    if not self.probing:
                        self.probing = True
                        return True
                    wake = now + self.cooldown  # wait for the probe's verdict, re-check now and then
                if waited_from is None:
                    waited_from = now
                try:
                    await asyncio.wait_for(self._event().wait(), timeout=max(wake - now, 0.001))
                except asyncio.TimeoutError:
                    pass
        finally:
            if waited_from is not None:
                stats.paused(self.clock() - waited_from)

    def success(self, probe: bool) -> None:
        self.consecutive = 0
        self.down_since = None
        if probe or self.is_open:
            self.is_open = False
            self.probing = False
            self.cooldown = self.base_cooldown
            log.info("%s: endpoint answers again; circuit closed", self.name)
            self._notify()

    def failure(self, probe: bool) -> bool:
        """Record an endpoint failure; True when the endpoint now counts as down."""
        now = self.clock()
        self.consecutive += 1
        if self.down_since is None:
            self.down_since = now
        if probe:
            self.probing = False
            self.open_until = now + self.cooldown
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._notify()
            return True
        if self.is_open:
            return True
        if self.consecutive >= self.threshold:
            self.is_open = True
            self.open_until = now + self.cooldown
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            for stats in self._stats():
                stats.breaker_opened()
            log.warning(
                "%s: %d failures in a row; pausing all requests (circuit open for %.1fs)",
                self.name, self.consecutive, self.open_until - now,
            )
            self._notify()
            return True
        return False

    def bind_loop(self) -> None:
        """A new session runs on a new event loop; waiters of the old one are gone."""
        self._changed = None
        self.probing = False

    def abandon_probe(self) -> None:
        if self.probing:
            self.probing = False
            self._notify()

    def pause(self, seconds: float) -> None:
        self.not_before = max(self.not_before, self.clock() + seconds)
