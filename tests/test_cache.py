"""The in-core connection cache with a fake clock."""

from __future__ import annotations

import hmac

from imapproxy.cache import ConnectionCache, SlotState
from imapproxy.credentials import CredentialHasher, Credentials

HASH = CredentialHasher(b"k" * 32)


def digest(user: bytes, password: bytes) -> bytes:
    return HASH.digest(Credentials(user, password))


def new_session(cache: ConnectionCache[str], user: bytes, password: bytes, name: str) -> object:
    slot, evicted = cache.acquire()
    assert slot is not None
    cache.assign(slot, user, digest(user, password), name)
    return slot, evicted


def test_reuse_needs_same_user_and_password() -> None:
    cache: ConnectionCache[str] = ConnectionCache(4)
    slot, _ = new_session(cache, b"alice", b"pw", "s1")
    cache.cache(slot, now=10)
    assert cache.take_cached(b"alice", digest(b"alice", b"wrong")) is None
    assert cache.take_cached(b"Alice", digest(b"Alice", b"pw")) is None
    assert cache.take_cached(b"bob", digest(b"bob", b"pw")) is None
    taken = cache.take_cached(b"alice", digest(b"alice", b"pw"))
    assert taken is slot and taken.state is SlotState.ACTIVE
    assert cache.take_cached(b"alice", digest(b"alice", b"pw")) is None  # one client at a time


def test_warmest_session_is_reused_first() -> None:
    cache: ConnectionCache[str] = ConnectionCache(4)
    first, _ = new_session(cache, b"alice", b"pw", "s1")
    second, _ = new_session(cache, b"alice", b"pw", "s2")
    cache.cache(first, now=1)
    cache.cache(second, now=2)
    assert cache.take_cached(b"alice", digest(b"alice", b"pw")).session == "s2"


def test_expiry_in_deadline_order() -> None:
    cache: ConnectionCache[str] = ConnectionCache(4)
    slots = [new_session(cache, b"u%d" % i, b"pw", f"s{i}")[0] for i in range(3)]
    for i, slot in enumerate(slots):
        cache.cache(slot, now=100 + i)
    assert cache.next_deadline(ttl=300) == 400
    assert cache.expire(now=400.5, ttl=300) == ["s0"]
    assert cache.expire(now=402, ttl=300) == ["s1", "s2"]
    assert cache.next_deadline(ttl=300) is None
    assert cache.cached_count == 0 and cache.active_count == 0


def test_full_cache_evicts_oldest_cached_or_refuses() -> None:
    cache: ConnectionCache[str] = ConnectionCache(2)
    a, _ = new_session(cache, b"a", b"pw", "sa")
    b, _ = new_session(cache, b"b", b"pw", "sb")
    assert cache.acquire() == (None, None)  # both active: refuse
    cache.cache(a, now=1)
    cache.cache(b, now=2)
    slot, evicted = cache.acquire()
    assert slot is not None and evicted == "sa"
    assert cache.active_count == 1 and cache.cached_count == 1


def test_sessions_of_an_older_password_are_stale() -> None:
    cache: ConnectionCache[str] = ConnectionCache(4)
    old, _ = new_session(cache, b"alice", b"old", "s-old")
    cache.cache(old, now=1)
    assert cache.stale_for(b"alice", digest(b"alice", b"new")) == ["s-old"]
    assert cache.cached_count == 0


def test_release_and_counts() -> None:
    cache: ConnectionCache[str] = ConnectionCache(3)
    slot, _ = new_session(cache, b"a", b"pw", "s")
    assert cache.active_count == 1
    assert cache.release(slot) == "s"
    assert cache.release(slot) is None
    assert cache.active_count == 0 and len([s for s in cache.in_use()]) == 0


def test_sessions_are_reused_on_their_own_server_only() -> None:
    """The route is part of the key: a user whose route changed never gets the old session."""
    cache: ConnectionCache[str] = ConnectionCache(4)
    slot, _ = cache.acquire()
    assert slot is not None
    cache.assign(slot, b"alice", b"d1", "on-A", server=("A", 143))
    cache.cache(slot, now=0)
    assert cache.take_cached(b"alice", b"d1", ("B", 143)) is None
    taken = cache.take_cached(b"alice", b"d1", ("A", 143))
    assert taken is slot and taken.server == ("A", 143)
    assert cache.release(slot) == "on-A" and slot.server is None


def test_the_hand_over_takes_the_oldest_and_adopts_in_expiry_order() -> None:
    """A session handed over keeps its expiry time; one older than sessions cached here
    expires before them (the successor's own clients may check in while sessions arrive)."""
    old: ConnectionCache[str] = ConnectionCache(4)
    for name, at in (("s1", 10.0), ("s2", 20.0)):
        slot, _ = new_session(old, b"alice", b"pw", name)
        old.cache(slot, now=at)
    first = old.take_oldest()
    assert first is not None and first.session == "s1" and first.state is SlotState.ACTIVE
    assert old.cached_count == 1 and old.release(first) == "s1"
    new: ConnectionCache[str] = ConnectionCache(3)
    mine, _ = new_session(new, b"bob", b"pw", "mine")
    new.cache(mine, now=30)
    assert new.adopt(b"alice", digest(b"alice", b"pw"), "s2", None, 20.0)
    assert new.adopt(b"carol", digest(b"carol", b"pw"), "s3", None, 5.0)
    assert not new.adopt(b"dave", digest(b"dave", b"pw"), "s4", None, 1.0)  # full: no eviction
    assert new.next_deadline(100) == 105
    assert new.expire(125, 100) == ["s3", "s2"]
    assert new.take_cached(b"bob", digest(b"bob", b"pw")) is mine
    assert old.take_oldest() is not None and old.take_oldest() is None


def test_the_digest_is_hmac_sha256_of_user_nul_password() -> None:
    # a successor adopts the key and the digests (session_transfer): they must stay this
    key = b"k" * 32
    hasher = CredentialHasher(key)
    for user, password in ((b"alice", b"secret"), (b"bob", b""), (b"\xff", b"p\x00w" * 900)):
        expected = hmac.digest(key, user + b"\x00" + password, "sha256")
        assert hasher.digest(Credentials(user, password)) == expected
        assert hasher.digest(Credentials(user, password)) == expected  # the keyed copy is kept
