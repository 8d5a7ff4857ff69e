"""The C loop of the response scanner (``_scan.c``); see ``scanner.py``."""

def scan(
    buf: bytearray, end: int, literal_remaining: int, events: list[tuple[bytes, bytes]], /
) -> tuple[int, int, bool, bool]: ...
