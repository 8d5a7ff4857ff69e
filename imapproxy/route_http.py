"""The HTTP source: a route from a service that speaks nginx's mail ``auth_http`` protocol.

So that services written for nginx's mail proxy work unchanged, the request is nginx's: a GET of
``route_http_url`` with ``Auth-Method`` (as nginx says it: ``plain`` for IMAP LOGIN and
AUTHENTICATE PLAIN, ``login`` for AUTHENTICATE LOGIN), ``Auth-User``, ``Auth-Pass`` (only with
``route_http_send_password yes``), ``Auth-Protocol: imap``, ``Auth-Login-Attempt: 1``,
``Client-IP``; user name and password URL-escaped as nginx escapes them (space, ``%`` and bytes
outside printable ASCII).

The answer: ``Auth-Status: OK`` with ``Auth-Server`` and ``Auth-Port`` (and optionally
``Auth-User``, the name to log in with there) is a route; any other ``Auth-Status`` is the
reason for the client's ``NO``, given after ``Auth-Wait`` seconds when the service asks for a
wait. An HTTP status other than 200, a missing ``Auth-Server``, or no answer in time means the
service is unavailable (``NO [UNAVAILABLE]``). nginx's ``Auth-Pass`` in the answer (a password
to use instead of the client's) is not supported: the client's own password is sent.

The standard library's ``urllib`` blocks, so lookups run in the router's thread pool.
"""

from __future__ import annotations

import string
import urllib.error
import urllib.request
from email.message import Message
from urllib.parse import quote

from imapproxy.route import (
    Route,
    RouteDenied,
    RouteError,
    RouteRequest,
    RouteUnavailable,
    make_route,
)

MAX_AUTH_WAIT_S = 30.0  # an Auth-Wait longer than this is cut short (the client is waiting)
MAX_REASON_CHARS = 200  # the part of an Auth-Status text a client sees
# nginx's NGX_ESCAPE_MAIL_AUTH leaves printable ASCII but space and "%" as it is
_SAFE = "".join(c for c in string.printable if c not in " %\t\n\r\x0b\x0c")


def escape(value: str) -> str:
    return quote(value.encode("utf-8", "surrogateescape"), safe=_SAFE)


def request_headers(request: RouteRequest, send_password: bool) -> dict[str, str]:
    headers = {
        "Auth-Method": "login" if request.mechanism == "AUTH-LOGIN" else "plain",
        "Auth-User": escape(request.username),
        "Auth-Protocol": "imap",
        "Auth-Login-Attempt": "1",
        "Client-IP": request.client_ip,
    }
    if send_password:
        headers["Auth-Pass"] = escape(request.password.decode("utf-8", "surrogateescape"))
    return headers


def route_from_answer(headers: Message) -> Route:
    """The route an answer gives; ``RouteDenied`` or ``RouteUnavailable`` otherwise."""
    status = (headers.get("Auth-Status") or "").strip()
    if status != "OK":
        raise RouteDenied(reason_text(status), auth_wait(headers.get("Auth-Wait")))
    server = (headers.get("Auth-Server") or "").strip()
    if not server:
        raise RouteUnavailable("auth service said OK without Auth-Server")
    try:
        return make_route(
            server, port=headers.get("Auth-Port") or None, destuser=headers.get("Auth-User")
        )
    except RouteError as error:
        raise RouteUnavailable(f"auth service gave an unusable route: {error}") from None


def reason_text(status: str) -> str:
    """The Auth-Status as text fit for an IMAP response: printable ASCII, bounded."""
    text = "".join(c for c in status if " " <= c <= "~").strip()[:MAX_REASON_CHARS]
    return text or "Authentication failed."


def auth_wait(value: str | None) -> float:
    try:
        return min(max(0.0, float(value or 0)), MAX_AUTH_WAIT_S)
    except ValueError:
        return 0.0


class HttpSource:
    """``route_http_url``: one GET per lookup (answers are cached by the router)."""

    blocking = True

    def __init__(self, url: str, send_password: bool, timeout: float) -> None:
        self.url, self.send_password, self.timeout = url, send_password, timeout
        self.name = f"auth service {url}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def lookup(self, request: RouteRequest) -> Route | None:
        http_request = urllib.request.Request(
            self.url, headers=request_headers(request, self.send_password)
        )
        try:
            with self._opener.open(http_request, timeout=self.timeout) as response:
                if response.status != 200:
                    raise RouteUnavailable(f"{self.name}: HTTP status {response.status}")
                return route_from_answer(response.headers)
        except urllib.error.HTTPError as error:
            raise RouteUnavailable(f"{self.name}: HTTP status {error.code}") from None
        except (OSError, ValueError) as error:
            raise RouteUnavailable(f"{self.name}: {error}") from None

    def close(self) -> None:
        pass
