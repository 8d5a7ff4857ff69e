"""The privileged reader: the small part of the proxy that keeps root to re-read TLS files.

Why: after start-up the relay runs as ``proc_username``, but a private key is normally root's
alone (mode 0600, or 0640 ``root:ssl-cert``). So that a renewed certificate (a certbot hook,
then ``systemctl reload``) takes effect on SIGHUP without making the key readable by the
service user, a child forked just before the privilege drop stays root, outside any
``chroot_directory``, and does one thing: when asked, it reads the configuration file it was
started with, as root, and returns the bytes of the TLS files that file names.

Rules:

* It serves only the files that the configuration file, as *it* reads it, names for the keys
  of ``tls.FILE_KEYS``: the relay says which key and path it wants, and a path that is not the
  file's value for that key is refused. A relay taken over cannot make it read anything else.
* It has no network socket and no other descriptor than its end of a socket pair (stdio
  aside); ``PR_SET_NO_NEW_PRIVS``; it ignores SIGHUP and SIGUSR1 (meant for the relay) and
  exits when the relay goes (end of file on its socket, or ``PR_SET_PDEATHSIG``).
* Messages both ways: a 4-byte big-endian length, then JSON. Request ``{"files": {key: path}}``;
  reply ``{key: {"data": base64}}`` or ``{key: {"error": text}}``.
* The hand-over (SIGUSR2, ``takeover``): the successor must start as root, as the proxy did
  (root-only keys, its files, its own privileged reader), so the reader starts it. Request
  ``{"successor": true}``: it forks and execs the command line it recorded when it was forked
  (the relay names nothing: a relay taken over cannot make it run anything else), with
  ``--take-over``; reply ``{"pid": N}``. ``{"successor_status": N}``: the exit status of that
  child (``waitpid`` without waiting; ``null`` while it runs), so the relay can log why a
  successor failed.

Not a descriptor opened before the drop and read again: certbot renews by writing new files and
moving a symbolic link, so an old descriptor would go on reading the old certificate.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import json
import os
import signal
import struct
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import socket
from gevent.lock import Semaphore

from imapproxy import config as config_module
from imapproxy import daemon
from imapproxy.config import Config
from imapproxy.errors import ConfigError
from imapproxy.tls import FILE_KEYS, MAX_FILE_BYTES, file_paths, read_file

LENGTH = struct.Struct("!I")
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = len(FILE_KEYS) * (MAX_FILE_BYTES * 4 // 3 + 4096)  # base64 and JSON
REPLY_TIMEOUT_S = 10.0  # reading six small files; a reader that takes longer is stuck
PROCESS_NAME = b"imapproxy-files"  # /proc/PID/comm: 15 bytes at most
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # <linux/prctl.h>


class KeeperError(Exception):
    """The privileged reader did not answer (gone, stuck, or a malformed reply)."""


class Keeper:
    """The relay's end: ask the privileged reader for the TLS files of a configuration."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self._lock = Semaphore()  # two SIGHUPs in a row: one question at a time
        self._broken = ""  # why the conversation can no longer be trusted
        self._asked = 0  # the number of the latest question (the reader echoes it)
        self._buffer = b""  # what came of a reply that a time limit cut short

    def read_files(self, config: Config) -> dict[str, bytes]:
        """As ``tls.read_files``, read as root; ``ConfigError`` names the file that failed."""
        wanted = file_paths(config)
        if not wanted:
            return {}
        reply = self._ask({"files": wanted})
        contents = {}
        for key, path in wanted.items():
            answer = reply.get(key)
            if not isinstance(answer, dict) or not isinstance(answer.get("data"), str):
                reason = answer.get("error") if isinstance(answer, dict) else None
                raise config.origin.error(key, f"{path}: {reason or 'no answer'}")
            contents[key] = base64.b64decode(answer["data"])
        return contents

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One question, its answer. Each question is numbered and the reader echoes the
        number: an answer that comes after its question's time limit is dropped when the next
        question reads, never taken for that one's (what came of it is kept across the limit).
        A reply that cannot be read (too big, not JSON) or a question left half-sent (the
        asker killed) ends the conversation: the connection is closed and later questions
        fail."""
        with self._lock:
            if self._broken:
                raise KeeperError(
                    f"the privileged reader (pid {self.pid}) is not asked again after an earlier "
                    f"failure ({self._broken})"
                )
            self._asked += 1
            try:
                self.sock.settimeout(REPLY_TIMEOUT_S)
                _send(self.sock.sendall, json.dumps({**request, "id": self._asked}).encode())
                reply = self._answer_to(self._asked)
            except TimeoutError as error:
                raise KeeperError(
                    f"the privileged reader (pid {self.pid}) did not answer: {error}"
                ) from None
            except (OSError, ValueError) as error:
                self._break(f"no answer: {error}")
                raise KeeperError(
                    f"the privileged reader (pid {self.pid}) did not answer: {error}"
                ) from None
            except BaseException:
                self._break("left in the middle of a question")
                raise
        if not isinstance(reply, dict):
            raise KeeperError(f"the privileged reader (pid {self.pid}) is gone")
        return reply

    def _answer_to(self, number: int) -> object:
        """The reply that echoes ``number`` (earlier ones, late, are dropped); None at the end
        of the stream."""
        while True:
            message = self._next_message()
            if message is None:
                return None
            reply = json.loads(message)
            if not isinstance(reply, dict) or reply.get("id") == number:
                return reply

    def _next_message(self) -> bytes | None:
        while True:
            if len(self._buffer) >= LENGTH.size:
                end = LENGTH.size + _size(self._buffer[: LENGTH.size], MAX_REPLY_BYTES)
                if len(self._buffer) >= end:
                    message, self._buffer = self._buffer[LENGTH.size : end], self._buffer[end:]
                    return message
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk

    def _break(self, why: str) -> None:
        self._broken = why
        self.sock.close()

    def start_successor(self) -> int:
        """Have the reader start the successor (``--take-over``) as root; its pid."""
        reply = self._ask({"successor": True})
        if not isinstance(reply.get("pid"), int):
            raise KeeperError(f"cannot start the successor: {reply.get('error', 'no answer')}")
        return int(reply["pid"])

    def successor_status(self, pid: int) -> int | None:
        """The successor's exit status (as ``os.waitstatus_to_exitcode``), None while it runs."""
        status = self._ask({"successor_status": pid}).get("status")
        return status if isinstance(status, int) else None


@dataclass(frozen=True)
class Successor:
    """The command line a successor is started with: this program's, plus ``--take-over``."""

    argv: tuple[str, ...]
    cwd: str


def start(config_path: str, successor: Successor | None = None) -> Keeper:
    """Fork the privileged reader (call it as root, just before the privilege drop)."""
    ours, theirs = socket.socketpair()
    pid = gevent.fork()
    if pid == 0:  # the child: never returns into the proxy's code
        try:
            ours.close()
            _serve(theirs.detach(), config_path, successor)
        finally:
            os._exit(0)
    theirs.close()
    return Keeper(ours, pid)


def _serve(fd: int, config_path: str, successor: Successor | None = None) -> None:
    _become_reader(fd)
    children: set[int] = set()
    while (request := _receive(lambda n: os.read(fd, n), MAX_REQUEST_BYTES)) is not None:
        reply = _successor_answer(request, fd, successor, children) or answer(request, config_path)
        _send(lambda data: _write_all(fd, data), _numbered(reply, request))


def _numbered(reply: bytes, request: bytes) -> bytes:
    """The reply with the request's number (``Keeper._ask`` drops late answers by it)."""
    try:
        number = json.loads(request).get("id")
        body = json.loads(reply)
    except (ValueError, AttributeError):
        return reply
    if not isinstance(body, dict) or not isinstance(number, int):
        return reply
    return json.dumps({**body, "id": number}).encode()


def _successor_answer(
    request: bytes, fd: int, successor: Successor | None, children: set[int]
) -> bytes | None:
    """The reply to a successor request; None for other requests."""
    try:
        message = json.loads(request)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if message.get("successor") is True:
        if successor is None:
            return json.dumps({"error": "no command line recorded"}).encode()
        try:
            pid = _spawn(successor, fd)
        except OSError as error:
            return json.dumps({"error": error.strerror or str(error)}).encode()
        children.add(pid)
        return json.dumps({"pid": pid}).encode()
    child = message.get("successor_status")
    if isinstance(child, int) and child in children:
        done, status = os.waitpid(child, os.WNOHANG)
        if done == 0:
            return json.dumps({"status": None}).encode()
        children.discard(child)
        return json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode()
    if "successor_status" in message:
        return json.dumps({"error": "not a successor of ours"}).encode()
    return None


def _spawn(successor: Successor, fd: int) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.close(fd)
            for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)  # an ignored signal stays ignored in exec
            os.chdir(successor.cwd)
            os.execv(successor.argv[0], list(successor.argv))
        finally:
            os._exit(127)
    return pid


def _become_reader(fd: int) -> None:
    os.set_blocking(fd, True)
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)
    if os.getppid() == 1:  # the relay died before PR_SET_PDEATHSIG took hold
        os._exit(0)
    daemon.set_no_new_privs()


def answer(request: bytes, config_path: str) -> bytes:
    """The reply to one request: each wanted file's bytes, or why not."""
    try:
        wanted = json.loads(request)["files"]
        if not isinstance(wanted, dict):
            raise ValueError("files is not an object")
    except (ValueError, KeyError, TypeError) as error:
        return json.dumps({"error": f"malformed request: {error}"}).encode()
    try:
        named = file_paths(config_module.load(config_path))
        problem = ""
    except ConfigError as error:
        named, problem = {}, f"{config_path}, read as root: {error}"
    reply = {}
    for key, path in wanted.items():
        if key not in FILE_KEYS or not isinstance(path, str):
            continue
        reply[key] = _one_file(key, path, named, problem or f"not the {key} of {config_path}")
    return json.dumps(reply).encode()


def _one_file(key: str, path: str, named: dict[str, str], refusal: str) -> dict[str, str]:
    if named.get(key) != path:
        return {"error": refusal}
    try:
        return {"data": base64.b64encode(read_file(path)).decode("ascii")}
    except OSError as error:
        return {"error": error.strerror or str(error)}


# -- framing ---------------------------------------------------------------------------------


def _send(send: Any, payload: bytes) -> None:
    send(LENGTH.pack(len(payload)) + payload)


def _receive(recv: Any, limit: int) -> bytes | None:
    """One message; None at end of file; ``ValueError`` if it is over ``limit``."""
    header = _read_exactly(recv, LENGTH.size)
    if header is None:
        return None
    size = _size(header, limit)
    return _read_exactly(recv, size) if size else b""


def _size(header: bytes, limit: int) -> int:
    """The length a message's header gives; ``ValueError`` if it is over ``limit``."""
    (size,) = LENGTH.unpack(header)
    if size > limit:
        raise ValueError(f"message of {size} bytes, over {limit}")
    return int(size)


def _read_exactly(recv: Any, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
