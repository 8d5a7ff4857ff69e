"""imapproxy: a connection-caching IMAP proxy for webmail, drop-in for up-imapproxy."""

__version__ = "1.0.0"
