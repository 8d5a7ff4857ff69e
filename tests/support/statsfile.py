"""Closing a statistics file a test has mapped (``stats.Counters``, with ``stats.Totals``)."""

from __future__ import annotations

import mmap

from imapproxy import stats


def close_file(counters: stats.Counters, totals: stats.Totals | None = None) -> None:
    if totals is not None:
        totals.release()
    counters.release()
    assert isinstance(counters.buffer, mmap.mmap)
    counters.buffer.close()  # raises BufferError if a view was left behind
