"""pimpstat: the curses monitor of the imapproxy statistics file."""
