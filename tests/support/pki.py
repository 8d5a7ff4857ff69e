"""Test certificates from ``trustme``, written as world-readable PEM files (Dovecot's and the
proxy's service users read them)."""

from __future__ import annotations

from pathlib import Path

import trustme


def write_pki(directory: Path) -> dict[str, Path]:
    """In ``directory``: a CA (``ca``), a second CA nobody trusts (``other_ca``), a server
    certificate for "localhost" and 127.0.0.2 with its chain (``server``, ``key``) and a client
    certificate for the proxy (``client``, ``client_key``), all from ``ca``."""
    ca, other_ca = trustme.CA(), trustme.CA()
    names = ("ca", "other_ca", "server", "key", "client", "client_key")
    files = {name: directory / f"{name}.pem" for name in names}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    server = ca.issue_cert("localhost", "127.0.0.2")
    for index, pem in enumerate(server.cert_chain_pems):
        pem.write_to_path(str(files["server"]), append=index > 0)
    server.private_key_pem.write_to_path(str(files["key"]))
    client = ca.issue_cert("imapproxy.test")
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    for path in files.values():
        path.chmod(0o644)
    return files
