"""Which worker process owns a user, and each worker's share of the cache (``workers N``).

A user's backend sessions live in one worker, so that the cache hit ratio with N workers is the
one of a single process. The owner is drawn from the login name alone, exactly as the cache
keys it (the bytes the client sent), with a hash that is the same in every process and every
run: a worker restarted, or a successor after a restart, serves the same users.
"""

from __future__ import annotations

import hashlib


def owner(username: bytes, workers: int) -> int:
    """The index of the worker that serves ``username`` (0 when there is one worker)."""
    if workers <= 1:
        return 0
    digest = hashlib.blake2b(username, digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total`` (``cache_size``, ``max_client_connections``): the
    parts add up to ``total``, and none is below 1."""
    part, extra = divmod(total, workers)
    return max(1, part + (1 if index < extra else 0))
