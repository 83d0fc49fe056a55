"""Per-step request statistics that mapped work items can merge: counters plus a log-bucketed
latency histogram (3% resolution), so p50/p95 over millions of requests need no list of samples."""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

_GROWTH = 1.03
_LOG_GROWTH = math.log(_GROWTH)


class LatencyHistogram:
    def __init__(self, buckets: dict[int, int] | None = None) -> None:
        self.buckets: Counter[int] = Counter(buckets or {})

    def add(self, seconds: float) -> None:
        ms = max(seconds * 1000.0, 1e-3)
        self.buckets[math.floor(math.log(ms) / _LOG_GROWTH)] += 1

    @property
    def count(self) -> int:
        return sum(self.buckets.values())

    def quantile(self, q: float) -> float | None:
        """Upper edge (ms) of the bucket holding the q-quantile: within 3% of the true value."""
        total = self.count
        if not total:
            return None
        rank, seen = q * total, 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return round(_GROWTH ** (bucket + 1), 3)
        return round(_GROWTH ** (max(self.buckets) + 1), 3)

    def merge(self, other: "LatencyHistogram") -> None:
        self.buckets.update(other.buckets)


class RequestStats:
    """What one step asked of its model: requests sent (HTTP attempts or local generations),
    re-sends, tokens, errors by kind, latency. Safe to update from worker threads."""

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.errors: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self.breaker_opens = 0
        self.paused_s = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float | None, error: str | None = None, tokens_in: int = 0, tokens_out: int = 0) -> None:
        with self._lock:
            self.requests += 1
            if seconds is not None:
                self.latency.add(seconds)
            if error:
                self.errors[error] += 1
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out

    def count_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def add_tokens(self, tokens_in: int, tokens_out: int) -> None:
        with self._lock:
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def breaker_opened(self) -> None:
        with self._lock:
            self.breaker_opens += 1

    def paused(self, seconds: float) -> None:
        with self._lock:
            self.paused_s += seconds

    def to_dict(self, histogram: bool = True) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "requests": self.requests,
                "retries": self.retries,
                "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out,
                "errors": dict(sorted(self.errors.items())),
                "latency_ms": {
                    "p50": self.latency.quantile(0.5),
                    "p95": self.latency.quantile(0.95),
                    "count": self.latency.count,
                },
                "breaker_opens": self.breaker_opens,
                "paused_s": round(self.paused_s, 3),
            }
            if histogram:
                out["latency_histogram"] = {str(k): v for k, v in sorted(self.latency.buckets.items())}
            return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RequestStats":
        stats = cls()
        stats.merge_dict(data)
        return stats

    def merge_dict(self, data: dict[str, Any]) -> None:
        with self._lock:
            self.requests += int(data.get("requests", 0))
            self.retries += int(data.get("retries", 0))
            self.tokens_in += int(data.get("tokens_in", 0))
            self.tokens_out += int(data.get("tokens_out", 0))
            self.errors.update({k: int(v) for k, v in (data.get("errors") or {}).items()})
            self.latency.merge(LatencyHistogram({int(k): int(v) for k, v in (data.get("latency_histogram") or {}).items()}))
            self.breaker_opens += int(data.get("breaker_opens", 0))
            self.paused_s += float(data.get("paused_s", 0.0))

    def summary(self) -> str:
        d = self.to_dict(histogram=False)
        lat = d["latency_ms"]
        errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "none"
        return (
            f"{d['requests']} requests ({d['retries']} retries), tokens {d['tokens_in']} in / {d['tokens_out']} out, "
            f"latency p50 {lat['p50']} ms p95 {lat['p95']} ms, errors: {errors}"
        )
