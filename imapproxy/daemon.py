"""Becoming a well-kept Unix daemon: detaching, dropping privileges, chroot, limits, systemd.

The order, as up-imapproxy's (``main.c``): the caller binds its listening sockets and creates the
statistics and trace files as root, then ``detach()`` (unless in the foreground), then
``drop_privileges()``: supplementary groups cleared, ``setgid``, ``chroot`` and ``chdir("/")``,
``setuid``, ``PR_SET_NO_NEW_PRIVS``. Root is refused as the running user.

``notify()`` speaks systemd's sd_notify protocol (one datagram to ``$NOTIFY_SOCKET``), a few
lines instead of a dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import importlib
import os
import pwd
import resource
import socket
from dataclasses import dataclass

import gevent

PR_SET_NO_NEW_PRIVS = 38  # <linux/prctl.h>
FILES_PER_SLOT = 2  # a client socket and a backend socket, as up-imapproxy's cache_size*2+10
SPARE_FILES = 64  # listeners, log, stats, trace, DNS, pre-login clients beyond the cache


class DaemonError(Exception):
    """Start-up cannot become what the configuration asks."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def lookup_identity(username: str | None, groupname: str | None) -> Identity | None:
    """The user and group to run as; None when not started as root (nothing to drop)."""
    if os.geteuid() != 0:
        return None
    if not username:
        raise DaemonError("started as root, but proc_username is not set: refusing to run as root")
    try:
        user = pwd.getpwnam(username)
    except KeyError:
        raise DaemonError(f"proc_username {username}: no such user") from None
    if user.pw_uid == 0:
        raise DaemonError(f"proc_username {username} is root: refusing to run as root")
    gid = user.pw_gid
    if groupname:
        try:
            gid = grp.getgrnam(groupname).gr_gid
        except KeyError:
            raise DaemonError(f"proc_groupname {groupname}: no such group") from None
    return Identity(user.pw_uid, gid, username)


def hand_over(path: str, identity: Identity | None) -> None:
    """Give a file created as root to the service user (mode stays 0600)."""
    if identity is not None:
        os.chown(path, identity.uid, identity.gid)


# Modules Python or gevent import on first use. After the drop (or inside a chroot) the
# interpreter's files may be out of reach, so they are loaded before.
LAZY_IMPORTS = (
    "encodings.idna",
    "unicodedata",
    "stringprep",
    "gevent.resolver.thread",
    "gevent.threadpool",
    "ssl",
    "gevent.ssl",
    "linecache",
    "traceback",
    "pickle",  # gevent's threadpool keeps a failed task's traceback with it
    # the route sources that need nothing but the standard library (a SIGHUP may build one
    # after the drop); ldap3 and psycopg are imported when their source is built at start-up,
    # and only then: psycopg alone makes the process's memory grow (its bundled libraries)
    "imapproxy.route_map",
    "imapproxy.route_sql",
    "imapproxy.route_http",
    "sqlite3",
    "urllib.request",
    "http.client",
    "email.parser",
)


def preload() -> None:
    for name in LAZY_IMPORTS:
        importlib.import_module(name)
    "example.org".encode("idna")


def drop_privileges(identity: Identity | None, chroot_directory: str | None) -> None:
    """Become ``identity`` (inside ``chroot_directory``), for good."""
    preload()
    if identity is None:
        if chroot_directory:
            raise DaemonError("chroot_directory needs the proxy to be started as root")
        return
    os.setgroups([])
    os.setgid(identity.gid)
    if chroot_directory:
        try:
            os.chroot(chroot_directory)
        except OSError as error:
            raise DaemonError(f"chroot_directory {chroot_directory}: {error.strerror}") from None
        os.chdir("/")
    os.setuid(identity.uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise DaemonError("still root after setuid")
    set_no_new_privs()


def set_no_new_privs() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise DaemonError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")


def raise_file_limit(cache_size: int) -> None:
    """Make sure ``cache_size`` sessions fit in the open-file limit."""
    needed = cache_size * FILES_PER_SLOT + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            raise DaemonError(
                f"cache_size {cache_size} needs {needed} open files, but the limit is {hard} "
                "(raise it: ulimit -n, or LimitNOFILE= in the systemd unit)"
            ) from None
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def client_limit(configured: int, cache_size: int) -> int:
    """How many client connections may be open at once: ``max_client_connections``, or else
    what the open-file limit leaves beside the cache's backend sockets and the spares."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - cache_size - SPARE_FILES)


def detach() -> None:
    """Double fork, new session, stdio to /dev/null: the starting shell gets its prompt back.

    gevent.fork re-initialises the hub (and its resolver threads) in the child.
    """
    if gevent.fork() != 0:
        os._exit(0)
    os.setsid()
    if gevent.fork() != 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def notify(state: str) -> bool:
    """Tell systemd about our state (``READY=1``, ``STOPPING=1``, ...); False if not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
