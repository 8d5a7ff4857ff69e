"""Benchmarks: imapproxy against up-imapproxy and direct Dovecot (make bench)."""
