"""The configuration: every key, the errors (file, line, key), both sample files."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from imapproxy import config
from imapproxy.config import SETTINGS, Config, ConfigError
from tests.support.proxy import REPO, run_imapproxyd

DEBIAN_CONF = Path("/etc/imapproxy.conf")
UP_IMAPPROXY_KEYS = [
    "server_hostname",
    "server_port",
    "listen_address",
    "listen_port",
    "connect_retries",
    "connect_delay",
    "cache_size",
    "cache_expiration_time",
    "proc_username",
    "proc_groupname",
    "stat_filename",
    "protocol_log_filename",
    "syslog_facility",
    "syslog_prioritymask",
    "send_tcp_keepalives",
    "enable_select_cache",
    "foreground_mode",
    "force_tls",
    "chroot_directory",
    "preauth_command",
    "enable_admin_commands",
    "tls_ca_file",
    "tls_ca_path",
    "tls_cert_file",
    "tls_key_file",
    "tls_verify_server",
    "tls_ciphers",
    "tls_no_tlsv1",
    "tls_no_tlsv1.1",
    "tls_no_tlsv1.2",
    "auth_sasl_plain_username",
    "auth_sasl_plain_password",
    "auth_shared_secret",
    "auth_sasl_mech",
    "dns_rr",
    "ipversion_only",
]


def parse(text: str) -> Config:
    return config.parse_lines(iter(text.splitlines(keepends=True)), "imapproxy.conf")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        parse(text)
    return str(raised.value)


def test_every_up_imapproxy_key_is_known() -> None:
    assert set(UP_IMAPPROXY_KEYS) <= set(SETTINGS)


def test_documented_defaults() -> None:
    c = parse("server_hostname imap.example.org\n")
    assert (c.connect_retries, c.connect_delay, c.cache_size, c.cache_expiration_time) == (
        10,
        5,
        3072,
        300,
    )
    assert (c.server_port, c.listen_port, c.syslog_facility) == (143, 143, "LOG_MAIL")
    assert not c.enable_select_cache and not c.enable_admin_commands and not c.force_tls


def test_every_key_parses_a_value() -> None:
    values = {
        "server_hostname": ("imap.example.org", "imap.example.org"),
        "server_port": ("993", 993),
        "listen_address": ("127.0.0.1 ::1", ("127.0.0.1", "::1")),
        "listen_port": ("imap", 143),
        "connect_retries": ("0", 0),
        "connect_delay": ("2", 2),
        "cache_size": ("10", 10),
        "cache_expiration_time": ("0", 0),
        "proc_username": ("nobody", "nobody"),
        "proc_groupname": ("nogroup", "nogroup"),
        "stat_filename": ("/tmp/s", "/tmp/s"),
        "protocol_log_filename": ("/tmp/p", "/tmp/p"),
        "syslog_facility": ("log_local3", "LOG_LOCAL3"),
        "syslog_prioritymask": ("LOG_WARNING", "LOG_WARNING"),
        "send_tcp_keepalives": ("Y", True),
        "enable_select_cache": ("TRUE", True),
        "foreground_mode": ("yes", True),
        "force_tls": ("no", False),
        "chroot_directory": ("/var/empty", "/var/empty"),
        "preauth_command": ('ID ("GUID" "1")', 'ID ("GUID" "1")'),
        "enable_admin_commands": ("n", False),
        "tls_ca_file": ("/ca.pem", "/ca.pem"),
        "tls_ca_path": ("/etc/ssl/certs/", "/etc/ssl/certs/"),
        "tls_cert_file": ("/c.pem", "/c.pem"),
        "tls_key_file": ("/k.pem", "/k.pem"),
        "tls_verify_server": ("yes", True),
        "tls_ciphers": ("ALL:!aNULL:!eNULL", "ALL:!aNULL:!eNULL"),
        "tls_no_tlsv1": ("yes", True),
        "tls_no_tlsv1.1": ("yes", True),
        "tls_no_tlsv1.2": ("false", False),
        "auth_sasl_plain_username": ("master", "master"),
        "auth_sasl_plain_password": ("p w", "p w"),
        "auth_shared_secret": ("s", "s"),
        "auth_sasl_mech": ("PLAIN", "plain"),
        "dns_rr": ("yes", True),
        "ipversion_only": ("6", 6),
        "listen_backlog": ("50", 50),
        "client_login_timeout": ("5", 5),
        "client_idle_timeout": ("60", 60),
        "max_client_connections": ("500", 500),
        "workers": ("4", 4),
        "server_connect_timeout": ("3", 3),
        "server_response_timeout": ("9", 9),
        "shutdown_timeout": ("0", 0),
        "auth_failure_delay": ("0", 0),
        "server_tls": ("yes", True),
        "client_tls_cert_file": ("/c.pem", "/c.pem"),
        "client_tls_key_file": ("/k.pem", "/k.pem"),
        "client_tls_chain_file": ("/chain.pem", "/chain.pem"),
        "client_tls_ciphers": ("HIGH", "HIGH"),
        "client_tls_min_version": ("tlsv1.3", "TLSv1.3"),
        "client_tls_port": ("993", 993),
        "client_starttls": ("yes", True),
        "client_tls_required": ("yes", True),
        "proxy_protocol_trusted_networks": (
            "10.0.0.1, 192.0.2.0/24",
            (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("192.0.2.0/24")),
        ),
        "forward_client_address": ("no", False),
        "forward_trusted_networks": ("::1", (ipaddress.ip_network("::1/128"),)),
        "reuse_same_client_address": ("yes", True),
        "reuse_after_enable": ("yes", True),
        "metrics_listen": ("[::1]:9117", ("::1", 9117)),
        "metrics_allow": ("192.0.2.9", (ipaddress.ip_network("192.0.2.9/32"),)),
        "takeover_socket": ("/run/ipx.takeover", "/run/ipx.takeover"),
        "route_map": ("/etc/imapproxy.routes", "/etc/imapproxy.routes"),
        "route_ldap_base": ("dc=example,dc=com", "dc=example,dc=com"),
        "route_ldap_filter": ("(&(objectClass=*)(mail=%u))", "(&(objectClass=*)(mail=%u))"),
        "route_ldap_attribute": ("mailRoutingAddress", "mailRoutingAddress"),
        "route_ldap_bind_dn": ("cn=proxy,dc=example,dc=com", "cn=proxy,dc=example,dc=com"),
        "route_ldap_bind_password": ("s e", "s e"),
        "route_ldap_tls_ca_file": ("/ca.pem", "/ca.pem"),
        "route_sql_query": (
            "SELECT host FROM r WHERE u = :user",
            "SELECT host FROM r WHERE u = :user",
        ),
        "route_http_send_password": ("yes", True),
        "route_lookup_timeout": ("2", 2),
        "route_cache_ttl": ("0", 0),
        "server_down_after": ("1", 1),
        "server_down_max_backoff": ("8", 8),
    }
    text = "".join(
        f"{key.upper() if i % 2 else key}\t {raw}  # comment\n"
        for i, (key, (raw, _)) in enumerate(values.items())
    )
    c = parse(text)
    for key, (_, expected) in values.items():
        assert getattr(c, SETTINGS[key].name) == expected, key
    # one route source at a time: the other three are tested on their own
    missing = set(SETTINGS) - set(values) - {"admin_allow"}
    assert missing == {"route_ldap_uri", "route_sql_url", "route_http_url"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "server_hostname x\ncache_size abc\n",
            'imapproxy.conf:2: cache_size: expected a positive integer, got "abc"',
        ),
        (
            "server_hostname x\ncache_size 0\n",
            'imapproxy.conf:2: cache_size: expected a positive integer, got "0"',
        ),
        (
            "server_hostname x\nlisten_port 99999\n",
            'imapproxy.conf:2: listen_port: expected a port number from 1 to 65535, got "99999"',
        ),
        ("server_hostname x\n\n# c\nfoo_bar 1\n", "imapproxy.conf:4: foo_bar: unknown key"),
        (  # the rest of the word is not shown: it would be the secret
            "server_hostname x\nauth_shared_secret=Hunter2\n",
            "imapproxy.conf:2: auth_shared_secret: not a key: key and value are separated by "
            "spaces or tabs",
        ),
        (
            "server_hostname x\nforce_tls maybe\n",
            'imapproxy.conf:2: force_tls: expected yes or no, got "maybe"',
        ),
        (
            "server_hostname x\nsyslog_facility LOG_KERN\n",
            "imapproxy.conf:2: syslog_facility: expected a syslog facility",
        ),
        (
            "server_hostname x\nworkers 0\n",
            'imapproxy.conf:2: workers: expected a positive integer, got "0"',
        ),
        (
            "server_hostname x\nworkers 257\n",
            "imapproxy.conf:2: workers: expected at most 256 workers, got 257",
        ),
        (
            "server_hostname x\nipversion_only 5\n",
            'imapproxy.conf:2: ipversion_only: expected 4 or 6, got "5"',
        ),
        (
            "server_hostname x\nconnect_delay\n",
            'imapproxy.conf:2: connect_delay: expected a non-negative integer, got ""',
        ),
        ("cache_size 5\n", "imapproxy.conf: server_hostname: required, but not set"),
        (
            "server_hostname x\n\ntls_key_file /k\n",
            "imapproxy.conf:3: tls_key_file: set, but tls_cert_file is not",
        ),
        (
            "server_hostname x\nauth_shared_secret s\n",
            "imapproxy.conf:2: auth_shared_secret: auth_sasl_plain_username, auth_sasl_plain_password and auth_shared_secret must be set together",
        ),
        (
            "server_hostname x\nclient_starttls yes\n",
            "imapproxy.conf:2: client_starttls: needs client_tls_cert_file",
        ),
        (
            "server_hostname x\nclient_tls_cert_file /c\nclient_tls_required yes\n",
            "imapproxy.conf:3: client_tls_required: needs client_starttls or client_tls_port",
        ),
        (
            "server_hostname x\nclient_tls_min_version SSLv3\n",
            'imapproxy.conf:2: client_tls_min_version: expected one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, got "SSLv3"',
        ),
        (
            "route_map /r\nroute_http_url http://127.0.0.1/\n",
            "imapproxy.conf:2: route_http_url: one route source, not route_map, route_http_url",
        ),
        (
            "route_sql_url sqlite:///r.db\n",
            "imapproxy.conf: route_sql_query: required with route_sql_url",
        ),
        (
            "route_ldap_uri ldap://127.0.0.1\n",
            "imapproxy.conf: route_ldap_base: required with route_ldap_uri",
        ),
        (
            "route_map /r\nroute_sql_url mysql://x\n",
            "imapproxy.conf:2: route_sql_url: expected sqlite:///PATH or postgresql://",
        ),
        (
            "route_map /r\nroute_ldap_filter (mail=%s)\n",
            "imapproxy.conf:2: route_ldap_filter: only %u, %n, %d and %% may follow a %",
        ),
        (
            "route_map /r\nroute_ldap_filter mail=%u\n",
            "imapproxy.conf:2: route_ldap_filter: expected a filter in parentheses",
        ),
        (
            "route_map /r\nroute_http_url ftp://x/\n",
            'imapproxy.conf:2: route_http_url: expected an http:// or https:// URL, got "ftp://x/"',
        ),
        (
            "server_hostname x\nadmin_allow 10.0.0.0/8 nonsense\n",
            'imapproxy.conf:2: admin_allow: expected addresses or networks, got "nonsense"',
        ),
        (
            "server_hostname x\nproxy_protocol_trusted_networks 10.0.0.300\n",
            "imapproxy.conf:2: proxy_protocol_trusted_networks: expected addresses or networks, "
            'got "10.0.0.300"',
        ),
        (
            "server_hostname x\nmetrics_listen 9117\n",
            'imapproxy.conf:2: metrics_listen: expected ADDRESS:PORT, got "9117"',
        ),
        (
            "server_hostname x\nmetrics_listen ::1:9117\n",
            "imapproxy.conf:2: metrics_listen: expected [IPV6]:PORT for an IPv6 address",
        ),
        (
            "server_hostname x\nmetrics_listen 127.0.0.1:0\n",
            'imapproxy.conf:2: metrics_listen: expected a port number from 1 to 65535, got "0"',
        ),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    assert error_of(text).startswith(message)


def test_a_mistyped_secret_line_is_not_echoed() -> None:
    assert "Hunter2" not in error_of("server_hostname x\nauth_shared_secret=Hunter2\n")
    static = "auth_sasl_plain_username u\nauth_sasl_plain_password Hunter3\n"
    config = parse("server_hostname x\nauth_shared_secret Hunter2\n" + static)
    assert "Hunter2" not in repr(config) and "Hunter3" not in repr(config)


def test_hash_starts_a_comment_anywhere() -> None:
    c = parse("server_hostname imap.example.org#here\npreauth_command NOOP # trailing\n")
    assert c.server_hostname == "imap.example.org" and c.preauth_command == "NOOP"


def test_our_sample_loads_and_documents_every_key() -> None:
    sample = REPO / "etc" / "imapproxy.conf"
    c = config.load(str(sample))
    assert (c.server_hostname, c.listen_port, c.proc_username) == ("localhost", 1143, "nobody")
    text = sample.read_text()
    for key in SETTINGS:
        assert f"## {key}\n" in text or f"#{key} " in text or f"\n{key} " in text, key


@pytest.mark.skipif(not DEBIAN_CONF.exists(), reason="Debian imapproxy package not installed")
def test_debian_sample_loads() -> None:
    c = config.load(str(DEBIAN_CONF))
    assert c.listen_port == 1143 and c.chroot_directory == "/var/lib/imapproxy/chroot"


def test_describe_masks_secrets() -> None:
    c = parse(
        "server_hostname x\nauth_sasl_plain_username m\nauth_sasl_plain_password hunter2\n"
        "auth_shared_secret s3cr3t\n"
    )
    text = config.describe(c)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "auth_sasl_plain_password ********" in text and "cache_size 3072" in text


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.conf"
    good.write_text("server_hostname localhost\ncache_size 7\n")
    run = run_imapproxyd("-f", str(good), "--check-config")
    assert run.returncode == 0 and "cache_size 7\n" in run.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("server_hostname localhost\ncache_size abc\n")
    run = run_imapproxyd("-f", str(bad), "--check-config")
    assert run.returncode == 78
    assert (
        run.stderr.strip()
        == f'in.imapproxyd: {bad}:2: cache_size: expected a positive integer, got "abc"'
    )


def test_config_is_frozen() -> None:
    c = parse("server_hostname x\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cache_size = 5  # type: ignore[misc]


def test_a_route_source_stands_in_for_server_hostname() -> None:
    c = parse("route_map /etc/imapproxy.routes\n")
    assert c.server_hostname is None and c.route_map == "/etc/imapproxy.routes"


def test_the_sql_url_is_a_secret() -> None:
    c = parse("route_sql_url postgresql://u:Hunter4@127.0.0.1/r\nroute_sql_query SELECT 1\n")
    assert "Hunter4" not in repr(c) and "Hunter4" not in config.describe(c)


def test_workers_auto_is_one_per_core() -> None:
    from imapproxy import supervisor

    auto = parse("server_hostname x\nworkers AUTO\n")
    assert auto.workers == 0
    assert supervisor.worker_count(auto.workers) == len(os.sched_getaffinity(0))
    assert supervisor.worker_count(3) == 3
    assert "workers auto\n" in config.describe(auto)
