"""Capability lists: what the backend says, what the proxy tells clients before login.

Sans-I/O. Before login the proxy answers for the backend, so it advertises the backend's
pre-login capabilities minus what it does not relay itself (the backend's SASL mechanisms,
SASL-IR, STARTTLS, LOGINDISABLED), plus what it does: its own mechanisms, SASL-IR, ID (RFC 2971)
and ``XIMAPPROXY`` (which Horde keys on). After login the backend's own list reaches the client,
less ``COMPRESS=*``, which would hide the command stream the proxy must frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PROXY_MECHANISMS: tuple[bytes, ...] = (b"AUTH=PLAIN", b"AUTH=LOGIN")


def parse_capability_list(text: bytes) -> tuple[bytes, ...]:
    """Atoms of a capability list, as in ``IMAP4rev1 IDLE AUTH=PLAIN`` (case kept)."""
    return tuple(text.split())


def from_response_code(code: bytes | None) -> tuple[bytes, ...] | None:
    """The list in a ``[CAPABILITY ...]`` response code, or None for another code."""
    if code is None:
        return None
    word, _, rest = code.partition(b" ")
    return parse_capability_list(rest) if word.upper() == b"CAPABILITY" else None


def has(capabilities: Iterable[bytes], name: bytes) -> bool:
    name = name.upper()
    return any(cap.upper() == name for cap in capabilities)


def _dropped_before_login(cap: bytes) -> bool:
    upper = cap.upper()
    return (
        upper.startswith(b"AUTH=")
        or upper.startswith(b"COMPRESS=")
        or upper in (b"SASL-IR", b"STARTTLS", b"LOGINDISABLED", b"XIMAPPROXY", b"ID")
    )


def for_clients(
    backend: Sequence[bytes], *, offer_starttls: bool = False, login_disabled: bool = False
) -> tuple[bytes, ...]:
    """The pre-login list the proxy advertises, built from the backend's pre-login list."""
    kept = [cap for cap in backend if not _dropped_before_login(cap)]
    if not any(cap.upper() in (b"IMAP4REV1", b"IMAP4REV2") for cap in kept):
        kept.insert(0, b"IMAP4rev1")
    kept.append(b"ID")
    if offer_starttls:
        kept.append(b"STARTTLS")
    if login_disabled:
        kept.append(b"LOGINDISABLED")
    else:
        kept.append(b"SASL-IR")
        kept.extend(PROXY_MECHANISMS)
    kept.append(b"XIMAPPROXY")
    return tuple(kept)


def without_compress(capabilities: Sequence[bytes]) -> tuple[bytes, ...]:
    """The backend's list less ``COMPRESS=*`` (RFC 4978), which the proxy cannot relay."""
    return tuple(cap for cap in capabilities if not cap.upper().startswith(b"COMPRESS="))


def filter_login_reply(status_text: bytes) -> bytes:
    """Drop ``COMPRESS=*`` from a ``[CAPABILITY ...]`` code in a login reply (``OK [...] text``)."""
    word, _, text = status_text.partition(b" ")
    if not text.startswith(b"[") or b"]" not in text:
        return status_text
    code, _, rest = text[1:].partition(b"]")
    caps = from_response_code(code)
    if caps is None:
        return status_text
    return word + b" [CAPABILITY " + b" ".join(without_compress(caps)) + b"]" + rest
