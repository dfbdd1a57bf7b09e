"""The one retry policy for calls to other services (annotation-tool APIs): bounded, with backoff, never on 4xx.

Write-back retries are RQ job retries on the ``writeback`` queue (``Retry(interval=policy.intervals())``,
run by the worker's scheduler), so nothing sleeps inside a worker between attempts and retries never stack:
the HTTP client itself makes one attempt per job run.
"""

from __future__ import annotations

from dataclasses import dataclass

# 408 Request Timeout and 429 Too Many Requests are the 4xx worth another try; every other 4xx is final.
_RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first, `first_s` * `factor`**n apart, at most `max_s`."""

    retries: int = 5
    first_s: float = 5.0
    factor: float = 3.0
    max_s: float = 600.0

    def interval(self, n: int) -> int:
        """Whole seconds before retry number `n` (0-based): RQ's `Retry(interval=...)` takes integers."""
        try:
            grown = self.first_s * self.factor**n
        except OverflowError:  # hundreds of retries (a period of days): long past the cap
            grown = self.max_s
        return max(1, int(min(self.max_s, grown)))

    def intervals(self) -> list[int]:
        """The intervals of all `retries`, in order."""
        return [self.interval(n) for n in range(self.retries)]

    @classmethod
    def covering(cls, period_s: float, first_s: float, factor: float = 3.0, max_s: float = 600.0) -> RetryPolicy:
        """The fewest retries whose intervals add up to at least `period_s`, so an outage of the other service
        shorter than the period is outlasted whatever backoff it starts from (each interval stays capped)."""
        policy = cls(retries=0, first_s=first_s, factor=factor, max_s=max_s)
        retries, total = 0, 0
        while total < period_s:
            total += policy.interval(retries)
            retries += 1
        return cls(retries=retries, first_s=first_s, factor=factor, max_s=max_s)

    def delay(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (0-based) for in-process callers."""
        return min(self.max_s, self.first_s * self.factor**attempt)

    @staticmethod
    def retryable_status(status: int | None) -> bool:
        """None (no answer: connection refused, timeout) and 5xx are retried; 4xx are not (but 408/429)."""
        if status is None:
            return True
        return status >= 500 or status in _RETRYABLE_4XX


NO_RETRY = RetryPolicy(retries=0)
