"""The in-core connection cache (ICC): ``cache_size`` preallocated slots of backend sessions.

Sans-I/O: no sockets, no clock (callers pass ``now``, a monotonic time in seconds). The cache
decides; the caller does the I/O (logging sessions out, closing them) with what it returns.

A slot is FREE, ACTIVE (its session serves a client) or CACHED (its client logged out; the
session waits for the same user with the same password). Active plus cached never exceed
``cache_size``, as in up-imapproxy (which wastes one slot; we do not).

* Reuse: ``take_cached(user, digest, server)`` returns the most recently cached session of that
  user whose password digest matches (``hmac.compare_digest``) and that is on that server (the
  login's route: a user whose route changed never gets a session on the old server), so the
  warmest one is reused. Two simultaneous logins never get the same session: taking makes it
  ACTIVE.
* Expiry: cached slots are kept in the order they were cached, which is the order of their
  deadlines, so ``expire()`` pops from the front in O(1) each and ``next_deadline()`` is O(1).
* Pressure: ``acquire()`` takes a free slot, or evicts the oldest cached session.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from imapproxy.credentials import same_digest

S = TypeVar("S")


class SlotState(enum.Enum):
    FREE = "Free"
    ACTIVE = "Active"
    CACHED = "Cached"


class Slot(Generic[S]):
    """One preallocated place for a backend session."""

    __slots__ = ("index", "state", "username", "digest", "server", "session", "cached_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = SlotState.FREE
        self.username = b""
        self.digest = b""
        self.server: object = None  # the route the session was opened on (compared with ==)
        self.session: S | None = None
        self.cached_at = 0.0

    def clear(self) -> S | None:
        session, self.session = self.session, None
        self.state, self.username, self.digest, self.cached_at = SlotState.FREE, b"", b"", 0.0
        self.server = None
        return session


def _accepted(slot: Slot[S], accept: Callable[[S], bool] | None) -> bool:
    return accept is None or (slot.session is not None and accept(slot.session))


class ConnectionCache(Generic[S]):
    """``cache_size`` slots with a free list, a per-user index and expiry order."""

    def __init__(self, size: int) -> None:
        self.slots: list[Slot[S]] = [Slot(i) for i in range(size)]
        self._free = list(range(size - 1, -1, -1))  # pop() hands out low indices first
        self._by_user: dict[bytes, list[Slot[S]]] = {}  # cached slots, oldest first
        self._by_age: OrderedDict[int, Slot[S]] = OrderedDict()  # cached slots, oldest first

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def cached_count(self) -> int:
        return len(self._by_age)

    @property
    def active_count(self) -> int:
        return self.size - len(self._free) - len(self._by_age)

    def counts(self) -> tuple[int, int]:
        """``(active_count, cached_count)`` in one call (the gauges, at every checkout)."""
        cached = len(self._by_age)
        return len(self.slots) - len(self._free) - cached, cached

    def acquire(self) -> tuple[Slot[S] | None, S | None]:
        """An ACTIVE slot for a new session, and the evicted session to log out, if any.

        ``(None, None)`` when every slot serves a client: the caller refuses the login.
        """
        evicted = None
        if not self._free:
            if not self._by_age:
                return None, None
            oldest = next(iter(self._by_age.values()))
            evicted = self.release(oldest)
        slot = self.slots[self._free.pop()]
        slot.state = SlotState.ACTIVE
        return slot, evicted

    def assign(
        self, slot: Slot[S], username: bytes, digest: bytes, session: S, server: object = None
    ) -> None:
        """Record the session that now occupies an ACTIVE slot, whose it is and where."""
        slot.username, slot.digest, slot.session, slot.server = username, digest, session, server

    def take_cached(
        self,
        username: bytes,
        digest: bytes,
        server: object = None,
        accept: Callable[[S], bool] | None = None,
    ) -> Slot[S] | None:
        """The most recently cached slot of ``username`` on ``server`` with a matching digest
        (and a session that ``accept`` accepts, when given), made ACTIVE."""
        candidates = self._by_user.get(username)
        if not candidates:
            return None
        for slot in reversed(candidates):
            if (
                slot.server == server
                and same_digest(slot.digest, digest)
                and _accepted(slot, accept)
            ):
                self._uncache(slot)
                slot.state = SlotState.ACTIVE
                return slot
        return None

    def cache(self, slot: Slot[S], now: float) -> None:
        """The client of an ACTIVE slot logged out and its session is idle: keep it."""
        assert slot.state is SlotState.ACTIVE and slot.session is not None
        slot.state, slot.cached_at = SlotState.CACHED, now
        self._by_user.setdefault(slot.username, []).append(slot)
        self._by_age[slot.index] = slot

    def release(self, slot: Slot[S]) -> S | None:
        """Free a slot (ACTIVE or CACHED); return its session for the caller to close."""
        if slot.state is SlotState.FREE:
            return None
        if slot.state is SlotState.CACHED:
            self._uncache(slot)
        self._free.append(slot.index)
        return slot.clear()

    def stale_for(self, username: bytes, digest: bytes) -> list[S]:
        """Free the cached sessions of ``username`` under any other password.

        Called after the backend accepted a new password for that user: sessions opened with
        an older one must not outlive the password change.
        """
        stale = [s for s in self._by_user.get(username, ()) if not same_digest(s.digest, digest)]
        return [session for slot in stale if (session := self.release(slot)) is not None]

    def expire(self, now: float, ttl: float) -> list[S]:
        """Free the cached slots whose time is up; return their sessions to log out."""
        expired = []
        while self._by_age:
            oldest = next(iter(self._by_age.values()))
            if oldest.cached_at + ttl > now:
                break
            session = self.release(oldest)
            if session is not None:
                expired.append(session)
        return expired

    def next_deadline(self, ttl: float) -> float | None:
        if not self._by_age:
            return None
        return next(iter(self._by_age.values())).cached_at + ttl

    def in_use(self) -> Iterator[Slot[S]]:
        """Slots that hold a session (ACTIVE or CACHED), in index order (XPROXY_DUMPICC)."""
        return (slot for slot in self.slots if slot.state is not SlotState.FREE)

    def drain(self) -> list[S]:
        """Free every cached slot (shutdown); return their sessions to log out."""
        return [
            session
            for slot in list(self._by_age.values())
            if (session := self.release(slot)) is not None
        ]

    def take_oldest(self) -> Slot[S] | None:
        """The oldest cached slot, made ACTIVE (the hand-over ships it, then ``release``s it)."""
        if not self._by_age:
            return None
        slot = next(iter(self._by_age.values()))
        self._uncache(slot)
        slot.state = SlotState.ACTIVE
        return slot

    def adopt(
        self, username: bytes, digest: bytes, session: S, server: object, cached_at: float
    ) -> bool:
        """Cache a session handed over by another process, as if cached at ``cached_at``;
        False when every slot is taken (nothing is evicted for it). The expiry order holds:
        a session older than the newest cached one moves in before the newer ones."""
        if not self._free:
            return False
        slot = self.slots[self._free.pop()]
        slot.state = SlotState.ACTIVE
        self.assign(slot, username, digest, session, server)
        self.cache(slot, cached_at)
        newer = itertools.takewhile(
            lambda other: other.cached_at > cached_at,
            itertools.islice(reversed(self._by_age.values()), 1, None),
        )
        for later in reversed(list(newer)):  # none when sessions come oldest first
            self._by_age.move_to_end(later.index)
        return True

    def _uncache(self, slot: Slot[S]) -> None:
        del self._by_age[slot.index]
        user_slots = self._by_user[slot.username]
        user_slots.remove(slot)
        if not user_slots:
            del self._by_user[slot.username]
