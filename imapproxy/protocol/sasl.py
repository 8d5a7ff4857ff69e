"""SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) for AUTHENTICATE (RFC 9051 §6.2.2).

Sans-I/O: base64 in, credentials out, and back. Errors are ``ClientProtocolError`` carrying the
tagged ``BAD`` that RFC 9051 requires for invalid base64 or a cancelled exchange.
"""

from __future__ import annotations

import base64
import binascii

from imapproxy.errors import ClientProtocolError

# The server challenges of the LOGIN mechanism: base64 of "Username:" and "Password:".
LOGIN_USERNAME_CHALLENGE = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"

CANCEL = b"*"


def decode_response(line: bytes, tag: bytes) -> bytes:
    """Decode one client response line (CRLF stripped); ``*`` cancels (RFC 9051 §6.2.2)."""
    if line == CANCEL:
        raise ClientProtocolError("AUTHENTICATE cancelled", tag=tag)
    if line == b"=":  # an empty initial response (RFC 4959)
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise ClientProtocolError("Invalid base64 in AUTHENTICATE response", tag=tag) from None


def parse_plain(message: bytes, tag: bytes) -> tuple[bytes, bytes]:
    """Return (user name, password) from a PLAIN message ``authzid NUL authcid NUL passwd``.

    Acting as another user (an authzid different from the authcid) is refused: the proxy
    can only log the client in as itself.
    """
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise ClientProtocolError("Invalid PLAIN authentication message", tag=tag)
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        raise ClientProtocolError(
            "[AUTHORIZATIONFAILED] Authorization identity not allowed", tag=tag, status="NO"
        )
    return authcid, password


def encode_plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return base64.b64encode(authzid + b"\x00" + authcid + b"\x00" + password)
