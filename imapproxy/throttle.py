"""Slowing down repeated failed logins, without slowing anyone who logs in successfully.

As Dovecot's ``auth_failure_delay``, the reply to a failed login waits; here the wait grows with
the recent failures of the same user name or of the same client address (doubling, up to
``MAX_DELAY_S``, counted over ``WINDOW_S``). Only failures wait: webmail sends every user from
one address, so a delay on successful logins, or before every attempt from an address, would
punish all its users for one attacker. Sans-I/O: the caller sleeps, the clock is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from cachetools import TTLCache

WINDOW_S: Final = 300.0  # failures older than this are forgotten
MAX_DELAY_S: Final = 30.0
MAX_TRACKED: Final = 100_000  # user names and addresses remembered at once (bounded memory)


class LoginThrottle:
    """Counts recent failures per user name and per client address."""

    def __init__(self, base_delay: float, clock: Callable[[], float]) -> None:
        self.base_delay = base_delay
        self._failures: TTLCache[tuple[str, bytes | str], int] = TTLCache(
            MAX_TRACKED, ttl=WINDOW_S, timer=clock
        )

    def failed(self, username: bytes, address: str) -> float:
        """Record a failure; return how long its reply must wait."""
        counts = [self._bump(("user", username)), self._bump(("address", address))]
        if self.base_delay <= 0:
            return 0.0
        doublings = min(max(counts) - 1, 16)
        return min(self.base_delay * (1 << doublings), MAX_DELAY_S)

    def _bump(self, key: tuple[str, bytes | str]) -> int:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        return count
